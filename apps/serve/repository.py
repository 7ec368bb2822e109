"""The models a server holds: found on disk, loaded, reloaded and unloaded as TensorFlow Serving does.

A model is a folder of versions, `NAME/1/`, `NAME/2/`, ... (the layout
TensorFlow Serving polls with `--model_base_path`); a base folder such as
`saved_models/` holds models. `Repository.scan`, called every poll, makes
the loaded versions match the folders:

* only folders named by an integer are versions (`.tmp-2-ab12cd34`, where
  our exports are written before their rename, is not);
* a version is loaded once it is complete (`saved_model.pb` and
  `variables/`, with `variables.index` beside any variable data) and its
  files have stopped changing (the same sizes and times as at the previous
  scan, or untouched for a poll interval), so a folder copied into place
  file by file is not loaded half-written;
* a version whose load fails is retried with a growing delay (up to a
  minute), at once if its files change; the others keep serving;
* a version whose folder is gone is unloaded: requests already running on
  it finish, new ones go to the versions left;
* every version found is served (TensorFlow Serving's `all` version
  policy), unless a model config file (`model_config.py`, `configure`)
  gives the model a version policy: then only the versions it selects are
  loaded, and one it no longer selects is unloaded once a selected one
  serves (availability first, as TensorFlow Serving's default);
* a request without a version gets the highest one loaded; one with a
  version label (from the config file) gets the version the label names.

Each load and unload is one line through `log`; so is each version a
`specific` policy names that is not on disk, and each label naming a
version the policy does not serve (warnings, once per config).
"""

import dataclasses
import json
import pathlib
import re
import threading
import time

import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import error_codes_pb2

from dlsuite.apps.core import saved_models
from dlsuite.apps.core.errors import UsageError
from dlsuite.apps.serve import model_config, tensors
from dlsuite.apps.serve.errors import invalid, not_found

DEFAULT_SIGNATURE = "serving_default"
_INT64_MAX = (1 << 63) - 1
_MAX_RETRY_SECONDS = 60.0
# dlsuite.json "format" of our exports -> what the page shows for them.
KINDS = {
    "dlsuite.image_classifier": "classifier",
    "dlsuite.image_captioner": "captioner",
    "dlsuite.language_model": "language_model",
}


@dataclasses.dataclass(frozen=True)
class Signature:
    """A callable signature of a loaded version and what it takes and returns."""

    function: object
    inputs: dict  # name -> tensors.TensorSpec
    outputs: dict  # name -> tensors.TensorSpec
    tf_dtypes: dict  # input name -> tf.DType


@dataclasses.dataclass
class Version:
    """One loaded version of a model.

    Attributes:
        model: the model's name.
        number: the version.
        path: its folder.
        signatures: {name: Signature}, what `:predict` can call.
        signature_defs: the SavedModel's signature map in TensorFlow
            Serving's metadata JSON (every signature of the MetaGraphDef).
        info: assets/dlsuite.json of our exports, else None.
        saved_model: the loaded object, which owns the variables.
    """

    model: str
    number: int
    path: pathlib.Path
    signatures: dict
    signature_defs: dict
    info: dict | None
    saved_model: object = dataclasses.field(repr=False, default=None)

    @property
    def kind(self):
        info = self.info or {}
        kind = KINDS.get(info.get("format"), "saved_model")
        if kind == "language_model" and info.get("kind") not in (None, "next_token"):
            return "embedder"  # a biLM export: serving_default embeds
        return kind

    def predict(self, signature_name, arrays):
        """Runs a signature on {input: np.ndarray}; returns {output: np.ndarray}."""
        signature = self.signatures[signature_name]
        feeds = {name: tf.constant(array, dtype=signature.tf_dtypes[name]) for name, array in arrays.items()}
        return {name: value.numpy() for name, value in signature.function(**feeds).items()}


@dataclasses.dataclass
class _Failure:
    fingerprint: tuple
    attempts: int
    retry_at: float
    message: str
    code: str


def load_version(model, number, path, *, trust_model=False):
    """Loads `path` (a SavedModel folder) with the MetaGraph tagged "serve", as TensorFlow Serving does.

    Args:
        trust_model: serve it even if its graph reads or writes files or
            prints (`core.saved_models`; `dlsuite serve --trust-model`).

    Raises:
        UsageError: a damaged, foreign or untrusted SavedModel, in words for the server's log.
    """
    try:
        graph = saved_models.check(path, trust_model=trust_model)
        loaded = saved_models.load(path, trust_model=trust_model)
    except UsageError as error:  # the log names the flag, as the command line would
        raise UsageError(re.sub(r"\btrust_model\b", "--trust-model", str(error))) from None
    signatures = {name: _signature(function) for name, function in loaded.signatures.items()}
    signature_defs = {
        name: json_format.MessageToDict(definition, preserving_proto_field_name=True,
                                        always_print_fields_with_no_presence=True)
        for name, definition in sorted(graph.signature_def.items())
    }
    return Version(model=model, number=number, path=path, signatures=signatures, signature_defs=signature_defs,
                   info=_read_info(path), saved_model=loaded)


def _signature(function):
    _, specs = function.structured_input_signature
    outputs = function.structured_outputs
    outputs = outputs if isinstance(outputs, dict) else {"output_0": outputs}
    return Signature(
        function=function,
        inputs={name: _spec(name, spec) for name, spec in specs.items()},
        outputs={name: _spec(name, spec) for name, spec in outputs.items()},
        tf_dtypes={name: spec.dtype for name, spec in specs.items()},
    )


def _spec(name, spec):
    dtype = spec.dtype
    shape = None if spec.shape.rank is None else tuple(spec.shape.as_list())
    numpy_dtype = object if dtype == tf.string else np.dtype(dtype.as_numpy_dtype)
    return tensors.TensorSpec(name=name, dtype_name=types_pb2.DataType.Name(dtype.as_datatype_enum),
                              numpy_dtype=numpy_dtype, shape=shape)


def _read_info(path):
    try:
        info = json.loads((path / "assets" / "dlsuite.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _version_number(folder):
    name = folder.name
    if not (name.isascii() and name.isdigit()):
        return None
    number = int(name)
    return number if number <= _INT64_MAX else None


def _fingerprint(folder):
    """(name, size, mtime) of the files a load reads, or None while the version is incomplete."""
    graph = folder / "saved_model.pb"
    variables = folder / "variables"
    try:
        if not graph.is_file() or not variables.is_dir():
            return None
        files = [graph] + sorted(variables.iterdir())
        names = {file.name for file in files}
        if any(name.startswith("variables.data-") for name in names) and "variables.index" not in names:
            return None
        return tuple((file.name, stat.st_size, stat.st_mtime_ns) for file in files for stat in [file.stat()])
    except OSError:  # removed while we looked
        return None


class Repository:
    """The models of a server and their loaded versions.

    Args:
        models: {name: folder} of the models given one by one.
        bases: folders whose subfolders are models (new ones are picked up).
        poll_seconds: how often `scan` runs; a version untouched for this
            long is settled.
        log: where the one line per load and unload goes.
        loader: `load_version`, replaceable in tests.
        configs: `model_config.ModelConfig`s of a model config file, served
            instead of `models` and `bases` (see `configure`).
    """

    def __init__(self, *, models=None, bases=(), poll_seconds=2.0, log=print, loader=load_version, configs=None):
        self._explicit = dict(models or {})
        self._bases = [pathlib.Path(base) for base in bases]
        self._policies = {}  # name -> model_config.Policy; a model without one serves every version
        self._labels = {}  # name -> {label: version}
        self._warned = set()  # the warnings said since the last configure
        self._settle_seconds = poll_seconds
        self._log = log
        self._loader = loader
        self._scan_lock = threading.Lock()
        # Replaced, never changed in place, so readers on other threads see whole snapshots.
        self._folders = dict(self._explicit)
        self._versions = {}  # name -> {number: Version}
        self._loading = frozenset()  # (name, number)
        self._failures = {}  # (name, number) -> _Failure
        self._seen = {}  # (name, number) -> fingerprint at the previous scan
        if configs is not None:
            self.configure(configs)

    def configure(self, configs):
        """Serves exactly the models of a model config file from now on (the next `scan` applies it).

        Args:
            configs: `model_config.ModelConfig`s: each model's base path,
                version policy and labels. Models not among them are
                unloaded at the next scan, as are versions their policy
                no longer selects.
        """
        with self._scan_lock:
            for config in configs:  # a model moved to another base path starts over from there
                if config.name in self._folders and self._folders[config.name] != config.base_path:
                    self._unload_all(config.name, reason=f"base path changed to {config.base_path}")
            self._explicit = {config.name: config.base_path for config in configs}
            self._bases = []
            self._policies = {config.name: config.policy for config in configs}
            self._labels = {config.name: dict(config.labels) for config in configs if config.labels}
            self._warned = set()

    # -- scanning ------------------------------------------------------------------------------------

    def scan(self):
        """Loads the versions that appeared, unloads those that went; never raises for a bad version."""
        with self._scan_lock:
            folders = dict(self._explicit)
            for base in self._bases:
                for child in _subfolders(base):
                    if not child.name.startswith(".") and ":" not in child.name:
                        folders.setdefault(child.name, child)
            self._folders = folders
            for name in list(self._versions):
                if name not in folders:
                    self._unload_all(name, reason="model folder removed")
            self._failures = {key: value for key, value in self._failures.items() if key[0] in folders}
            self._seen = {key: value for key, value in self._seen.items() if key[0] in folders}
            for name, folder in folders.items():
                wanted = self._scan_model(name, folder)
                for label, number in sorted(self._labels.get(name, {}).items()):
                    if number not in wanted:
                        self._warn(f"serve: warning: label {label} of model {name} names version {number}, which "
                                   f"its version policy does not serve from {folder}; requests on it are "
                                   "answered NOT_FOUND")

    def _warn(self, line):
        if line not in self._warned:
            self._warned.add(line)
            self._log(line)

    def _scan_model(self, name, folder):
        """Makes `name`'s loaded versions match its folder and policy; returns the versions it should serve."""
        found = {}
        for child in _subfolders(folder):
            number = _version_number(child)
            if number is not None:
                found[number] = child
        for number in sorted(self._versions.get(name, {})):
            if number not in found:
                self._unload(name, number, reason="folder removed")
        policy = self._policies.get(name)
        wanted = set(found) if policy is None else set(model_config.select(policy, found))
        if policy is not None and policy.kind == "specific":
            for number in policy.versions:
                if number not in found:  # TensorFlow Serving's FileSystemStoragePathSource warns so too
                    self._warn(f"serve: warning: version {number} of model {name}, which its specific version "
                               f"policy names, was not found in {folder}; serving "
                               f"{', '.join(map(str, sorted(wanted))) or 'nothing of it until it appears'}")
        gone = {key for key in [*self._failures, *self._seen] if key[0] == name and key[1] not in found}
        self._failures = {key: value for key, value in self._failures.items() if key not in gone}
        self._seen = {key: value for key, value in self._seen.items() if key not in gone}
        now = time.monotonic()
        for number in sorted(wanted, reverse=True):  # the default version first
            if number in self._versions.get(name, {}):
                continue
            path = found[number]
            key = (name, number)
            fingerprint = _fingerprint(path)
            previous = self._seen.get(key)
            self._seen[key] = fingerprint
            if fingerprint is None:
                continue  # still being written
            newest = max(mtime for _, _, mtime in fingerprint) / 1e9
            if fingerprint != previous and time.time() - newest < self._settle_seconds:
                continue  # changed since the last scan: wait until it stops changing
            failure = self._failures.get(key)
            if failure and failure.fingerprint == fingerprint and now < failure.retry_at:
                continue
            self._load(name, number, path, fingerprint, failure)
        loaded = set(self._versions.get(name, {}))
        if loaded & wanted or not wanted:  # availability first: keep the old until a wanted one serves
            for number in sorted(loaded - wanted):
                self._unload(name, number, reason=f"not in the version policy, {policy.describe()}")
        return wanted

    def _load(self, name, number, path, fingerprint, failure):
        key = (name, number)
        self._loading = self._loading | {key}
        started = time.monotonic()
        try:
            version = self._loader(name, number, path)
        except Exception as error:  # any load error: this version waits, the server keeps serving
            attempts = failure.attempts + 1 if failure and failure.fingerprint == fingerprint else 1
            delay = min(_MAX_RETRY_SECONDS, self._settle_seconds * 2 ** attempts)
            message = " ".join(str(error).split())[:500] or type(error).__name__
            code = _error_code(error)
            self._failures = {**self._failures, key: _Failure(fingerprint, attempts, time.monotonic() + delay, message,
                                                              code)}
            self._log(f"serve: cannot load {name} version {number} ({path}): {message}; retrying in {delay:.1f} s")
            return
        finally:
            self._loading = self._loading - {key}
        self._failures = {other: value for other, value in self._failures.items() if other != key}
        self._versions = {**self._versions, name: {**self._versions.get(name, {}), number: version}}
        signatures = ", ".join(sorted(version.signatures)) or "no signatures"
        self._log(f"serve: loaded {name} version {number} from {path} in {time.monotonic() - started:.1f} s "
                  f"({signatures})")

    def _unload(self, name, number, *, reason):
        versions = dict(self._versions.get(name, {}))
        version = versions.pop(number, None)
        self._versions = {**self._versions, name: versions}
        self._seen.pop((name, number), None)
        if version is not None:
            self._log(f"serve: unloaded {name} version {number} ({reason})")

    def _unload_all(self, name, *, reason):
        for number in sorted(self._versions.get(name, {})):
            self._unload(name, number, reason=reason)
        self._versions = {key: value for key, value in self._versions.items() if key != name}

    # -- reading -------------------------------------------------------------------------------------

    def names(self):
        return sorted(self._folders)

    def loaded(self):
        """{name: [version numbers loaded], ascending} of the models with at least one loaded."""
        return {name: sorted(versions) for name, versions in self._versions.items() if versions}

    def label_version(self, name, label):
        """The version `label` names for model `name` (the model config file's version_labels).

        Raises:
            ServingError: INVALID_ARGUMENT for a label the model does not have,
                with TensorFlow Serving's message (`ServerCore::GetModelVersionForLabel`).
        """
        number = self._labels.get(name, {}).get(label)
        if number is None:
            raise invalid(f"Unrecognized servable version label: {label}")
        return number

    def labels(self, name):
        """{label: version} of model `name`."""
        return dict(self._labels.get(name, {}))

    def get(self, name, version=None, *, label=None):
        """The Version a request names: `version`, its version `label`, or the highest loaded one.

        Raises:
            ServingError: NOT_FOUND, with TensorFlow Serving's message, for an
                unknown model or a version not loaded (also when a label names
                it); INVALID_ARGUMENT for a label the model does not have.
        """
        if label is not None:
            version = self.label_version(name, label)
        versions = self._versions.get(name, {})
        if version is None:
            if not versions:
                raise not_found(f"Servable not found for request: Latest({name})")
            return versions[max(versions)]
        if version not in versions:
            raise not_found(f"Servable not found for request: Specific({name}, {version})")
        return versions[version]

    def status(self, name, version=None):
        """GetModelStatusResponse's model_version_status list, highest version first.

        Raises:
            ServingError: NOT_FOUND for an unknown model or version.
        """
        entries = {number: ("AVAILABLE", "OK", "") for number in self._versions.get(name, {})}
        for (model, number), failure in self._failures.items():  # a snapshot: scans replace the dict
            if model == name and number not in entries:
                entries[number] = ("END", failure.code, failure.message)
        for model, number in self._loading:
            if model == name:
                entries[number] = ("LOADING", "OK", "")
        if version is not None:
            if version not in entries:
                raise not_found(f"Could not find version {version} of model {name}")
            entries = {version: entries[version]}
        if not entries:
            raise not_found(f"Could not find any versions of model {name}")
        return [{"version": str(number), "state": state, "status": {"error_code": code, "error_message": message}}
                for number, (state, code, message) in sorted(entries.items(), reverse=True)]

    def describe(self):
        """The models with a loaded version, for the page: versions, kind, signatures, our metadata."""
        models, loaded = [], self._versions
        for name in self.names():
            versions = loaded.get(name, {})
            if not versions:
                continue
            default = versions[max(versions)]
            models.append({
                "name": name,
                "default_version": default.number,
                "versions": sorted(versions, reverse=True),
                "labels": self.labels(name),
                "kind": default.kind,
                "signatures": {
                    signature_name: {
                        "inputs": {k: _describe_spec(s) for k, s in sorted(signature.inputs.items())},
                        "outputs": {k: _describe_spec(s) for k, s in sorted(signature.outputs.items())},
                    }
                    for signature_name, signature in sorted(default.signatures.items())
                },
                "dlsuite": default.info,
            })
        return {"models": models}


def _describe_spec(spec):
    return {"dtype": spec.dtype_name,
            "shape": None if spec.shape is None else [-1 if d is None else d for d in spec.shape]}


def _subfolders(folder):
    try:
        return sorted(child for child in pathlib.Path(folder).iterdir() if child.is_dir())
    except OSError:  # missing or unreadable right now: nothing there this scan
        return []


def _error_code(error):
    if isinstance(error, tf.errors.OpError):
        return op_error_name(error)
    if isinstance(error, FileNotFoundError):
        return "NOT_FOUND"
    if isinstance(error, UsageError):  # damaged, foreign or untrusted: the folder must change first
        return "FAILED_PRECONDITION"
    return "UNKNOWN"


def op_error_name(error):
    """The canonical code name of a tf.errors.OpError ("INVALID_ARGUMENT", ...)."""
    try:
        return error_codes_pb2.Code.Name(error.error_code)
    except ValueError:
        return "UNKNOWN"
