"""`.keras` files given by the user, loaded in Keras's safe mode with one-line errors.

Safe mode stays on: a Lambda layer's Python function, an arbitrary
function or a TFSMLayer (a SavedModel inside the file) is refused, as Keras
refuses them. A missing file, a folder, a truncated file or one that is not
a zip archive, and a zip that Keras cannot read as a model are each a
`UsageError` naming the path.
"""

import json
import pathlib
import zipfile

from dlsuite.apps.core.errors import UsageError


def check(path, *, option=None):
    """Checks, without TensorFlow, that `path` is a whole `.keras` archive
    whose model config Keras's safe mode would rebuild: for checks made
    before any work (a search's --weights), before a strategy exists.

    Raises:
        UsageError: the file is missing, a folder, not a zip archive, damaged
            (a member fails its CRC), without a readable config.json, or
            holding what safe mode refuses (a Python lambda, a TFSMLayer).
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise UsageError(f"{str(path)!r} does not exist; pass a .keras file such as runs/.../model.keras",
                         option=option)
    if not path.is_file():
        raise UsageError(f"{str(path)!r} is a folder, not a .keras file; pass runs/.../model.keras", option=option)
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # reads every member: a scrambled byte fails its CRC
            config = json.loads(archive.read("config.json")) if "config.json" in archive.namelist() else None
    except (zipfile.BadZipFile, OSError, EOFError):
        raise UsageError(f"{str(path)!r} is not a .keras file (not a zip archive: truncated, or another format); "
                         "pass a model saved by Keras 3, such as runs/.../model.keras", option=option) from None
    except (ValueError, UnicodeDecodeError):  # config.json is not JSON
        config, damaged = "damaged", None
    if damaged is not None:
        raise UsageError(f"{str(path)!r} is damaged ({damaged} fails its checksum); copy or save the model again",
                         option=option)
    if not isinstance(config, dict):
        what = "a damaged config.json" if config == "damaged" else "no config.json"
        raise UsageError(f"{str(path)!r} is a zip archive but not a .keras model ({what} in it); pass a model "
                         "saved by Keras 3, such as runs/.../model.keras", option=option)
    refused = _refused_in_safe_mode(config)
    if refused:
        raise UsageError(f"cannot load {str(path)!r}: it holds {refused}, which Keras's safe mode refuses (it can "
                         "run arbitrary code); rebuild the model without it", option=option)


def _refused_in_safe_mode(config):
    """What Keras's safe mode refuses in a model config (a Python lambda, a TFSMLayer), in words, or None.
    A pre-check only: `load` keeps safe mode on, which decides."""
    stack = [config]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            kind = item.get("class_name")
            if kind == "__lambda__":
                return "a Lambda layer whose function is Python bytecode"
            if kind == "TFSMLayer":
                return "a TFSMLayer (a SavedModel run inside the model)"
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def load(path, *, option=None):
    """The Keras model in the `.keras` file `path`, not compiled; a Sequential
    model comes back as the functional model of its layers.

    Args:
        option: the config field `path` came from, for the CLI's flag.

    Raises:
        UsageError: what `check` raises, or a file Keras cannot rebuild in safe mode.
    """
    import keras

    check(path, option=option)
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    # What a readable zip with a bad model inside raises: ValueError for JSON, an
    # unknown class or a safe-mode refusal (Lambda, TFSMLayer); TypeError or
    # KeyError for a config that does not fit its class; BadZipFile (CRC) or
    # OSError for a damaged member, h5py's OSError for bad weights.
    except (ValueError, TypeError, KeyError, zipfile.BadZipFile, OSError) as error:
        detail = " ".join(str(error).split())[:240] or type(error).__name__
        raise UsageError(f"cannot load {str(path)!r} as a Keras model ({detail})", option=option) from None
    if isinstance(model, keras.Sequential):
        # The same layers as a functional model: a loaded Sequential has no `.input`
        # ("never been called"), which cutting a model at a layer needs.
        model = keras.Model(model.inputs, model.outputs, name=model.name)
    return model
