"""An app's export, read back: the version folder, assets/dlsuite.json, and which signatures to load.

Every app's export (`export_classifier`, `export_language_model`,
`export_captioner`) writes `base_dir/NAME/<version>/` with
`assets/dlsuite.json`, whose "format" tells it from other SavedModels. Each
`Exported*.load` is the same recipe: `read` (written here once) resolves the
version folder (`versions.resolve_version_dir`), reads the metadata and the
app's other JSON assets, and refuses a folder another program wrote or a
newer dlsuite wrote; then `saved_models.load` scans and loads the SavedModel
with the signatures `read` chose. An app passes only an `ExportFormat`: its
format name and version, its signatures, the JSON files it reads and its
wording.
"""

import dataclasses
import json

from dlsuite.apps.core.errors import UsageError
from dlsuite.apps.core.versions import resolve_version_dir

METADATA_FILE = "dlsuite.json"


@dataclasses.dataclass(frozen=True)
class ExportFormat:
    """What tells one app's exports from other SavedModels, and how its errors read.

    Attributes:
        name: the metadata's "format" ("dlsuite.image_classifier").
        version: the newest "format_version" this dlsuite reads.
        signatures: the signature names a load needs; or, with `kind_key`,
            {kind: names}, where a kind outside it reads as a newer export.
        not_ours: the error for a folder without valid metadata, after
            "{path} is not ": what it should be and what to do.
        assets: the other JSON files of assets/ the app reads with the
            metadata; one missing or unparsable reads as not ours.
        kind_key: the metadata key `signatures` is keyed by, or None.
        stop: what ends the newer-export error, as the app's other errors
            end ("." or "").
    """

    name: str
    version: int
    signatures: object
    not_ours: str
    assets: tuple = ()
    kind_key: str = None
    stop: str = "."


@dataclasses.dataclass(frozen=True)
class Found:
    """An export `read` accepted; nothing of its graph loaded yet.

    Attributes:
        path: the version folder.
        metadata: assets/dlsuite.json, the app's keys included.
        assets: {file name: parsed JSON} of the format's other assets.
        signatures: the signature names to load it with.
    """

    path: object
    metadata: dict
    assets: dict
    signatures: tuple


def read(path, export_format):
    """Resolves `path` to a version folder and checks its metadata against `export_format`.

    Args:
        path: a version folder, or the NAME folder (its highest version).
        export_format: the app's `ExportFormat`.

    Raises:
        UsageError: nothing there, no valid metadata of this format (or an
            asset missing), or a format version or kind this dlsuite does
            not know.
    """
    path = resolve_version_dir(path)
    assets_dir = path / "assets"
    try:
        metadata = json.loads((assets_dir / METADATA_FILE).read_text(encoding="utf-8"))
        assets = {name: json.loads((assets_dir / name).read_text(encoding="utf-8"))
                  for name in export_format.assets}
    except (OSError, ValueError):
        metadata = None
    if not isinstance(metadata, dict) or metadata.get("format") != export_format.name:
        raise UsageError(f"{path} is not {export_format.not_ours}")
    signatures = export_format.signatures
    kind = ""
    if export_format.kind_key is not None:
        value = metadata.get(export_format.kind_key)
        signatures = signatures.get(value) if isinstance(value, str) else None
        kind = f", {export_format.kind_key} {value!r}"
    if metadata.get("format_version", 0) > export_format.version or signatures is None:
        raise UsageError(f"{path} was exported by a newer dlsuite (format version {metadata.get('format_version')}"
                         f"{kind}); upgrade dlsuite to read it{export_format.stop}")
    return Found(path=path, metadata=metadata, assets=assets, signatures=tuple(signatures))
