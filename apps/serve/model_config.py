"""`dlsuite serve --model-config-file`: TensorFlow Serving's ModelServerConfig, the parts we serve.

The file is TensorFlow Serving's `--model_config_file`, an ASCII
`ModelServerConfig`, parsed with the package's own message
(`tensorflow_serving.config.model_server_config_pb2`), so a file written for
one server is read the same by the other:

    model_config_list {
      config {
        name: "scaler"
        base_path: "/models/scaler"
        model_platform: "tensorflow"
        model_version_policy { specific { versions: 1 versions: 3 } }
        version_labels { key: "stable" value: 1 }
        version_labels { key: "canary" value: 3 }
      }
    }

Supported: `name`, `base_path` (absolute, or relative to the file's folder),
`model_platform` "tensorflow" (or unset), `model_version_policy` (`latest`
N, TensorFlow Serving's default with N = 1; `all`; `specific` versions) and
`version_labels`. Anything else (`custom_model_config`, `logging_config`,
another platform) is refused in one line, as is a parse error, which names
the file, line and column protobuf reports.

`read` parses and checks a file; `select` is what a version policy keeps of
the version folders found.
"""

import dataclasses
import pathlib

from tensorflow_serving.config import model_server_config_pb2

from dlsuite.apps.core.errors import UsageError
from dlsuite.apps.serve import text_proto

OPTION = "model_config_file"


@dataclasses.dataclass(frozen=True)
class Policy:
    """A version policy: kind "latest" (the `count` highest), "all", or "specific" (`versions`)."""

    kind: str = "latest"
    count: int = 1
    versions: tuple = ()

    def describe(self):
        if self.kind == "latest":
            return f"latest {self.count}"
        if self.kind == "specific":
            return "specific " + ", ".join(map(str, self.versions))
        return "all"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One `config { ... }` entry: a model, where its versions are, which to serve and their labels."""

    name: str
    base_path: pathlib.Path
    policy: Policy
    labels: tuple  # ((label, version), ...) sorted by label


def select(policy, found):
    """The version numbers of `found` (the version folders) that `policy` serves, ascending.

    As TensorFlow Serving's FileSystemStoragePathSource aspires them: latest N
    is the N highest folders (N < 1 counts as 1), all is every folder,
    specific is the listed ones that exist.
    """
    found = sorted(found)
    if policy.kind == "all":
        return found
    if policy.kind == "specific":
        return [number for number in found if number in policy.versions]
    return found[-max(policy.count, 1):] if found else []


def parse(text, *, path):
    """The ModelConfigs of a ModelServerConfig in text format; `path` names the file in errors and
    anchors relative base paths.

    Raises:
        UsageError: one line naming the file (and the line and column of a
            parse error), for anything the server would not serve as written.
    """
    message = model_server_config_pb2.ModelServerConfig()
    text_proto.parse(text, message, path=path, option=OPTION)
    if message.WhichOneof("config") == "custom_model_config":
        raise UsageError(f"{OPTION} {path}: custom_model_config is not supported; write a model_config_list",
                         option=OPTION)
    models, names = [], set()
    for index, entry in enumerate(message.model_config_list.config, start=1):
        models.append(_model(entry, index, path))
        if models[-1].name in names:
            raise UsageError(f"{OPTION} {path}: model {models[-1].name!r} is configured twice; give each "
                             "config a different name", option=OPTION)
        names.add(models[-1].name)
    return models


def read(path):
    """`parse` of the file at `path`; an unreadable file is a UsageError too."""
    return parse(text_proto.read(path, option=OPTION), path=pathlib.Path(path))


def _model(entry, index, path):
    where = f"{OPTION} {path}: config {index}"
    name = entry.name
    if not name or "/" in name or ":" in name:
        raise UsageError(f"{where}: name must be a name usable in a URL (no '/' or ':'), received {name!r}",
                         option=OPTION)
    where = f"{OPTION} {path}: model {name!r}"
    if entry.model_platform not in ("", "tensorflow"):
        raise UsageError(f"{where}: model_platform {entry.model_platform!r} is not served; dlsuite serve serves "
                         "\"tensorflow\" SavedModels", option=OPTION)
    if entry.HasField("logging_config"):
        raise UsageError(f"{where}: logging_config is not supported; remove it", option=OPTION)
    if not entry.base_path:
        raise UsageError(f"{where}: base_path is missing; name the folder holding its versions 1/, 2/, ...",
                         option=OPTION)
    base_path = pathlib.Path(entry.base_path)
    if not base_path.is_absolute():
        base_path = path.parent / base_path
    if not base_path.is_dir():
        raise UsageError(f"{where}: could not find base path {base_path}", option=OPTION)
    if (base_path / "saved_model.pb").is_file():
        raise UsageError(f"{where}: base path {base_path} is a version folder (it holds saved_model.pb); name the "
                         "folder above it", option=OPTION)
    choice = entry.model_version_policy.WhichOneof("policy_choice")
    if choice == "specific":
        versions = tuple(sorted(set(entry.model_version_policy.specific.versions)))
        if not versions:
            raise UsageError(f"{where}: the specific version policy lists no versions; add versions: N",
                             option=OPTION)
        policy = Policy(kind="specific", versions=versions)
    elif choice == "all":
        policy = Policy(kind="all")
    else:  # latest, or no policy: TensorFlow Serving's default is latest 1
        policy = Policy(kind="latest", count=max(entry.model_version_policy.latest.num_versions, 1))
    labels = tuple(sorted(entry.version_labels.items()))
    for label, version in labels:
        if not label or "/" in label or ":" in label:
            raise UsageError(f"{where}: a version label must be usable in a URL (no '/' or ':'), received "
                             f"{label!r}", option=OPTION)
        if version < 0:
            raise UsageError(f"{where}: label {label!r} names version {version}; versions are 0 or more",
                             option=OPTION)
    return ModelConfig(name=name, base_path=base_path, policy=policy, labels=labels)
