"""Search spaces for `dlsuite tune`: what each app can search, the default
space, and `--space FILE` (YAML or JSON) to narrow or widen it.

The seed's advice shapes the defaults: search the hyperparameters that matter
most (network structure, batch size, learning rate on a log scale), then
optimizer, dropout, L2 and the learning-rate schedule; sample at random
within ranges rather than on a grid.

A space file maps hyperparameter names to one of::

    model: lenet5                        # fixed: one value
    optimizer: [adam, nesterov]          # choice among values
    lr: {min: 1.0e-4, max: 0.1, sampling: log}   # range; also step, or sampling linear/reverse_log
    batch_size: {choice: [32, 64]}       # the long forms, as tune.json records them
    epochs: {fixed: 5}

Names the file leaves out keep the app's default; names the app does not
know, impossible ranges and unknown choices are errors naming the key and
what it allows. Nothing here imports TensorFlow.
"""

import dataclasses
import json
import math
import numbers
import pathlib

from dlsuite.apps.core import search
from dlsuite.apps.core.errors import UsageError

SAMPLINGS = ("linear", "log", "reverse_log")
RANGE_KEYS = ("min", "max", "step", "sampling")


def _tuning(app):
    from dlsuite.apps import table

    return table.get(app).search()


def default_text(app):
    """The default space and the keys a space file may set, for --help (no checks, no TensorFlow)."""

    def flow(value):
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, list):
            return "[" + ", ".join(flow(v) for v in value) + "]"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k}: {flow(v)}" for k, v in value.items()) + "}"
        return _number(value) if not isinstance(value, str) else value

    tuning = _tuning(app)
    lines = [f"  {name}: {flow(value)}" for name, value in tuning.defaults.items()]
    lines.append("  epochs: <--epochs>")
    keys = ", ".join(sorted(tuning.params))
    return "default search space:\n" + "\n".join(lines) + f"\nkeys a --space file may set: {keys}\n"


_number = search.number_text


@dataclasses.dataclass
class SearchSpace:
    """A checked search space: {name: {"fixed": v} | {"choice": [...]} |
    {"min", "max", "step", "sampling"}} for one app."""

    app: str
    entries: dict

    def declare(self, hp):
        """Registers every entry with keras-tuner's `hp` and returns the
        values of the current trial, {name: value}."""
        values = {}
        for name, spec in self.entries.items():
            kind = _tuning(self.app).params[name].kind
            if "fixed" in spec or ("choice" in spec and len(spec["choice"]) == 1):
                values[name] = hp.Fixed(name, spec["fixed"] if "fixed" in spec else spec["choice"][0])
            elif "choice" in spec and kind == "bool":
                # A Choice of booleans travels to distributed workers as 0/1.
                values[name] = hp.Boolean(name, default=spec["choice"][0])
            elif "choice" in spec:
                values[name] = hp.Choice(name, spec["choice"])
            else:
                number = hp.Int if kind == "int" else hp.Float
                values[name] = number(name, spec["min"], spec["max"], step=spec["step"], sampling=spec["sampling"])
        return values

    def searched(self):
        """Names with more than one possible value, in the space's order."""
        return [name for name, spec in self.entries.items()
                if not ("fixed" in spec or ("choice" in spec and len(spec["choice"]) == 1)
                        or ("min" in spec and spec["min"] == spec["max"]))]

    def describe(self):
        """One line, e.g. "model in {lenet5, lenet5_caffe}, lr in [0.0001, 0.1] log, epochs = 6"."""
        parts = []
        for name, spec in self.entries.items():
            if "fixed" in spec:
                parts.append(f"{name} = {_number(spec['fixed']) if not isinstance(spec['fixed'], str) else spec['fixed']}")
            elif "choice" in spec:
                parts.append(f"{name} in {{{', '.join(v if isinstance(v, str) else _number(v) for v in spec['choice'])}}}")
            else:
                extra = "" if spec["sampling"] == "linear" else f" {spec['sampling']}"
                step = f" step {_number(spec['step'])}" if spec["step"] is not None else ""
                parts.append(f"{name} in [{_number(spec['min'])}, {_number(spec['max'])}]{extra}{step}")
        return ", ".join(parts)

    def to_json(self):
        return {name: dict(spec) for name, spec in self.entries.items()}


def build(app, *, epochs, overrides=None, source="--space", options=None):
    """The app's default space with `overrides` (a parsed --space mapping) applied.

    Args:
        app: the name of a searchable app of `table.APPS`.
        epochs: the fixed epochs per trial when the overrides do not set them.
        overrides: {name: spec} as read from a space file, or None.
        source: how errors name where the overrides came from.
        options: {name: value} fixed by command-line options (classify's
            --model); they win over the file.

    Raises:
        UsageError: an unknown name or an invalid spec, naming the key and
            what it allows.
    """
    tuning = _tuning(app)
    params = tuning.params
    raw = {**tuning.defaults, "epochs": epochs}
    if overrides is not None:
        if not isinstance(overrides, dict):
            raise UsageError(f"{source}: expected a mapping of hyperparameter names to values, ranges or "
                             f"choices, received a {type(overrides).__name__}; for example 'lr: {{min: 1.0e-4, max: 0.1, sampling: log}}'")
        unknown = [str(name) for name in overrides if name not in params]
        if unknown:
            raise UsageError(f"{source}: unknown key {unknown[0]!r} for {app}; allowed keys: {', '.join(sorted(params))}")
        raw.update(overrides)
    entries = {name: _check_entry(name, spec, params[name], source) for name, spec in raw.items()}
    for name, value in (options or {}).items():
        option = f"--{name.replace('_', '-')}"
        entries[name] = {"fixed": _check_value(value, params[name], option)}
    return SearchSpace(app, entries)


def load(path, app, *, epochs, options=None):
    """Reads a --space file (.json as JSON, anything else as YAML) and builds the space."""
    path = pathlib.Path(path)
    try:
        content = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--space {str(path)!r}: no such file; pass a YAML or JSON file of hyperparameter ranges") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--space {str(path)!r}: cannot read it ({error})") from None
    source = f"--space {path}"
    if path.suffix.lower() == ".json":
        try:
            overrides = json.loads(content)
        except json.JSONDecodeError as error:
            raise UsageError(f"{source} is not valid JSON ({error})") from None
    else:
        import yaml

        try:
            overrides = yaml.safe_load(content)
        except yaml.YAMLError as error:
            raise UsageError(f"{source} is not valid YAML ({' '.join(str(error).split())})") from None
    return build(app, epochs=epochs, overrides=overrides if overrides is not None else {}, source=source, options=options)


def _check_entry(name, spec, param, source):
    where = f"{source}: {name!r}"
    if isinstance(spec, dict):
        keys = set(spec)
        if keys == {"fixed"}:
            return {"fixed": _check_value(spec["fixed"], param, where)}
        if keys == {"choice"}:
            spec = spec["choice"]
            if not isinstance(spec, list):
                raise UsageError(f"{where}: choice takes a list of values, received {spec!r}")
        elif keys <= set(RANGE_KEYS) and {"min", "max"} <= keys:
            return _check_range(spec, param, where)
        else:
            raise UsageError(f"{where}: a range takes the keys {', '.join(RANGE_KEYS)} (min and max required), or use "
                             f"{{choice: [...]}} or {{fixed: value}}; received keys: {', '.join(map(str, spec))}")
    if isinstance(spec, list):
        if not spec:
            raise UsageError(f"{where}: an empty list of choices; list at least one value")
        values = [_check_value(value, param, where) for value in spec]
        for index, value in enumerate(values):
            if value in values[:index]:
                raise UsageError(f"{where}: {value!r} is listed twice")
        return {"choice": values}
    return {"fixed": _check_value(spec, param, where)}


def _coerce_number(value, param, where):
    # YAML 1.1 reads 1e-3 (no dot) as a string; accept it as the number it means.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise UsageError(f"{where}: expected a number in {param.bounds_text()}, received {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise UsageError(f"{where}: expected a number in {param.bounds_text()}, received {value!r}")
    if param.kind == "int":
        if value != int(value):
            raise UsageError(f"{where}: expected an integer in {param.bounds_text()}, received {value!r}")
        return int(value)
    return float(value)


def _check_value(value, param, where):
    if param.kind in ("int", "float"):
        value = _coerce_number(value, param, where)
        if not param.contains(value):
            raise UsageError(f"{where}: {_number(value)} is outside the allowed range {param.bounds_text()}")
        return value
    if param.kind == "bool":
        if not isinstance(value, bool):
            raise UsageError(f"{where}: expected true or false, received {value!r}")
        return value
    allowed = param.allowed_values()
    if value not in allowed:
        raise UsageError(f"{where}: unknown choice {value!r}; allowed: {', '.join(allowed)}")
    return value


def _check_range(spec, param, where):
    if param.kind not in ("int", "float"):
        listed = "true, false" if param.kind == "bool" else ", ".join(param.allowed_values())
        raise UsageError(f"{where}: takes no min/max range; list the choices instead, from: {listed}")
    low, high = (_coerce_number(spec[key], param, f"{where} {key}") for key in ("min", "max"))
    sampling = spec.get("sampling", "linear")
    if sampling not in SAMPLINGS:
        raise UsageError(f"{where}: unknown sampling {sampling!r}; allowed: {', '.join(SAMPLINGS)}")
    if low > high:
        raise UsageError(f"{where}: min {_number(low)} > max {_number(high)}; swap them")
    for key, value in (("min", low), ("max", high)):
        if not param.contains(value):
            raise UsageError(f"{where}: {key} {_number(value)} is outside the allowed range {param.bounds_text()}")
    if sampling != "linear" and low <= 0:
        raise UsageError(f"{where}: {sampling} sampling needs min > 0, received min {_number(low)}")
    step = spec.get("step")
    if step is not None:
        step = _coerce_number(step, dataclasses.replace(param, low=0, high=math.inf, low_open=True, high_open=True), f"{where} step")
        if step <= 0 or (sampling != "linear" and step <= 1):
            need = "> 1 (a factor)" if sampling != "linear" else "> 0"
            raise UsageError(f"{where}: step must be {need} with {sampling} sampling, received {_number(step)}")
    return {"min": low, "max": high, "step": step, "sampling": sampling}
