"""`--config FILE`: a command's options from a YAML or JSON file.

The file maps option names (the config fields, e.g. `epochs`, `lr`,
`batch_norm`) to values; they become the parser's defaults, so flags on the
command line override the file. The `config.json` a run writes is itself a
valid file: its "config" part is read, its optimizer fields are flattened
into the options they came from, and its `out` is dropped, so that
`dlsuite classify train --config runs/classify/<time>/config.json` repeats
the run into a new run directory.
"""

import argparse
import json
import pathlib

from dlsuite.apps.core.errors import UsageError

# Options a file cannot set: they say which file or which run to read.
NOT_FROM_FILE = ("config", "resume", "help")


def read(path):
    """The {option: value} mapping of a config file; raises UsageError naming the file and what is wrong."""
    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise UsageError(f"config {str(path)!r}: {error.strerror or error}; pass a YAML or JSON file",
                         option="config") from None
    except UnicodeDecodeError:
        raise UsageError(f"config {str(path)!r} is not UTF-8 text; pass a YAML or JSON file", option="config") from None
    try:
        values = json.loads(text) if path.suffix == ".json" else _yaml(text)
    except ValueError as error:
        raise UsageError(f"config {str(path)!r} does not parse: {' '.join(str(error).split())}",
                         option="config") from None
    if isinstance(values, dict) and isinstance(values.get("config"), dict) and "resolved" in values:
        values = dict(values["config"])  # a run's config.json
        values.pop("out", None)  # a repeat gets a run directory of its own
    if not isinstance(values, dict):
        raise UsageError(f"config {str(path)!r} must map option names to values, e.g. 'epochs: 5'; it holds a "
                         f"{type(values).__name__}", option="config")
    optimizer = values.pop("optimizer", None)
    if isinstance(optimizer, dict):  # config.json nests the optimizer fields
        values = {**optimizer, **values}
    elif optimizer is not None:
        values["optimizer"] = optimizer
    return values


def _yaml(text):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:  # names the line and column
        raise ValueError(str(error)) from None


def apply(parser, path, *, command):
    """Sets the options of `parser` that `path` names as its defaults.

    Raises:
        UsageError: an unknown key, or a value of the wrong type, naming the
            key, the file and what is allowed.
    """
    values = read(path)
    actions = {action.dest: action for action in parser._actions
               if action.option_strings and action.dest not in NOT_FROM_FILE}
    defaults = {}
    for key, value in values.items():
        if key not in actions:
            raise UsageError(f"config {str(path)!r}: unknown key {key!r} for `{command}`; allowed keys: "
                             f"{', '.join(sorted(actions))}", option="config")
        defaults[key] = _checked(actions[key], value, key=key, path=path)
    parser.set_defaults(**defaults)


def _checked(action, value, *, key, path):
    """`value` as the option would have parsed it, or a UsageError."""
    if value is None:
        return None
    flags = "/".join(action.option_strings)
    where = f"config {str(path)!r}: {key} ({flags})"
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):  # a switch
        if not isinstance(value, bool):
            raise UsageError(f"{where} takes true or false, received {value!r}", option="config")
        return value
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        return [_one(action, item, where) for item in items]
    if isinstance(value, list) and action.type is not None and action.nargs in (None, "?"):
        value = ",".join(str(item) for item in value)  # list-valued options parse "a,b" (augment, input size)
    return _one(action, value, where)


def _one(action, value, where):
    parse = action.type
    try:
        if parse is not None:
            if isinstance(value, bool):
                raise ValueError("true or false is not an option value here")
            if parse is int and isinstance(value, float) and not value.is_integer():
                raise ValueError("a whole number is needed")
            value = parse(value) if parse in (int, float) else parse(str(value))
    except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
        detail = f" ({error})" if str(error) else ""
        raise UsageError(f"{where} cannot be {value!r}{detail}", option="config") from None
    if action.choices is not None and value not in action.choices:
        raise UsageError(f"{where} must be one of {', '.join(map(str, action.choices))}, received {value!r}",
                         option="config")
    return value
