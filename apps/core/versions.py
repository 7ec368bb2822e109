"""Export versions: `base_dir/NAME/<version>/`, the layout TensorFlow Serving
polls with `--model_base_path=base_dir/NAME`, written atomically by every
app's export, and the checks an export's name and folder get before any
training starts.
"""

import os
import pathlib
import re
import secrets
import shutil

from dlsuite.apps.core import atomic
from dlsuite.apps.core.errors import UsageError

_NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]+")


def check_export_name(name):
    """Returns `name` if it is usable as one directory name, else raises UsageError.

    Letters, digits, '-', '_' and '.' only, and not '.' or '..', so the name
    can never climb out of `base_dir` or create nested folders.
    """
    if (
        not isinstance(name, str)
        or not _NAME_PATTERN.fullmatch(name)
        or name in (".", "..")
    ):
        raise UsageError(
            f"Invalid export name {name!r}: use letters, digits, '-', '_' and "
            "'.' only (one directory name, not '.' or '..'), e.g. 'mnist-lenet5'."
        )
    return name


def next_version(base_dir):
    """Returns 1 + the largest integer-named subfolder of `base_dir` (1 if none).

    `base_dir` is the folder that holds the versions, `base_dir/NAME`; a
    missing folder has no versions yet.
    """
    return 1 + max(versions(pathlib.Path(base_dir)), default=0)


def versions(model_dir):
    """The integer-named subfolders of `model_dir`, the ones TF Serving sees."""
    if not model_dir.is_dir():
        return []
    return [
        int(child.name)
        for child in model_dir.iterdir()
        if child.is_dir() and child.name.isdigit()
    ]


def check_export_dir(base_dir):
    """Raises UsageError unless exports can be written under `base_dir`
    (`atomic.check_writable`); called before training, so that a bad
    --export-dir costs nothing."""
    return atomic.check_writable(base_dir, what="exports", option="export_dir")


def write_version_atomically(model_dir, version, write):
    """Creates `model_dir/<version>/` by `write(temporary_folder)` and one rename.

    The temporary folder is hidden inside `model_dir` (same file system, and
    a name TF Serving ignores because it is not an integer), so a reader never
    sees a half-written version; on any failure it is removed, and so is
    `model_dir` if this call created it. Its name holds its owner
    (`.tmp-<version>-<host>-<pid>-<hex>`), so the next export removes what
    a killed one left (`atomic.clean_abandoned`). Every app's export writes
    this way.

    Args:
        model_dir: `base_dir/NAME`, the folder holding the versions.
        version: a positive int, or None for `next_version(model_dir)`.
        write: a callable that fills the folder it is given.

    Returns:
        The `pathlib.Path` of the version folder.

    Raises:
        UsageError: a bad or existing version, an unwritable folder, or no
            space left (the partial version removed, the others untouched).
    """
    model_dir = pathlib.Path(model_dir)
    if version is None:
        version = next_version(model_dir)
    elif isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise UsageError(f"Export version must be a positive integer, received {version!r}.")
    target = model_dir / str(version)
    if target.exists():
        raise UsageError(
            f"{target} already exists; pick another version or leave it out "
            f"to get the next one ({next_version(model_dir)})."
        )
    created_model_dir = not model_dir.exists()
    # A killed export could not remove its folder: the next export of the
    # model does, once no live process owns it (its name holds the owner).
    atomic.clean_abandoned(model_dir, ".tmp-*")
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        # mkdir, not tempfile.mkdtemp: mkdtemp's 0700 mode would survive the
        # rename and lock out a TF Serving process running as another user.
        temporary = model_dir / f".tmp-{version}-{atomic.owner_tag()}-{secrets.token_hex(4)}"
        temporary.mkdir()
    except OSError as error:
        if atomic.out_of_space(error):
            raise atomic.no_space_error(model_dir, error) from None
        raise UsageError(
            f"Cannot write exports to {model_dir.parent}: {error.strerror or error}. "
            "Pick a folder you can write to."
        ) from None
    try:
        write(temporary)
        try:
            os.rename(temporary, target)
        except OSError:
            if target.exists():  # a concurrent export took the same version
                raise UsageError(f"{target} appeared during the export; run it again.") from None
            raise
    except BaseException as error:
        # KeyboardInterrupt included: nothing half-written may stay behind.
        shutil.rmtree(temporary, ignore_errors=True)
        if created_model_dir:
            try:
                model_dir.rmdir()
            except OSError:
                pass  # not empty: another export put something there meanwhile
        if isinstance(error, Exception) and atomic.out_of_space(error):
            # TensorFlow wraps the OS error; the versions before stay as they were.
            raise atomic.no_space_error(target, error, partial="version") from None
        raise
    return target


def resolve_version_dir(path):
    """Returns the version folder `path` names: itself, or NAME's highest version.

    Raises:
        UsageError: `path` is missing or holds no SavedModel.
    """
    path = pathlib.Path(path)
    if (path / "saved_model.pb").is_file():
        return path
    if not path.is_dir():
        raise UsageError(f"No exported model at {path}: the folder does not exist.")
    complete = [
        version for version in sorted(versions(path), reverse=True)
        if (path / str(version) / "saved_model.pb").is_file()
    ]
    if not complete:
        raise UsageError(
            f"No exported model at {path}: expected saved_model.pb there or in a "
            "version subfolder such as 1/."
        )
    return path / str(complete[0])


