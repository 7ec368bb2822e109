"""What an app declares for a hyperparameter search: the hyperparameters it
can search (`Param`) and its default space and search settings (`Tuning`),
in its own `tuning.py`; `dlsuite tune` reads them through the app table.
Nothing here imports TensorFlow.
"""

import dataclasses
import numbers

from dlsuite.apps.core import choices


def number_text(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return repr(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclasses.dataclass(frozen=True)
class Param:
    """One hyperparameter an app can search and the values that make sense.

    Attributes:
        kind: "float", "int", "choice" (strings) or "bool".
        low, high: bounds of a number; `low_open`/`high_open` exclude them.
        values: the allowed strings of a choice, or a function returning
            them (the model registry is read only when a space is checked).
    """

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    values: tuple | object = ()

    def allowed_values(self):
        return tuple(self.values() if callable(self.values) else self.values)

    def bounds_text(self):
        return f"{'(' if self.low_open else '['}{number_text(self.low)}, {number_text(self.high)}{')' if self.high_open else ']'}"

    def contains(self, value):
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below


# The optimizer and schedule fields of `optim.OptimizerConfig`, plus batch
# size and epochs, which `HyperModel.fit` searches: every app has them.
TRAINING_PARAMS = {
    "batch_size": Param("int", 1, 65536),
    "epochs": Param("int", 1, 100_000),
    # L-BFGS trains full-batch outside model.fit; the tuner's trials use fit.
    "optimizer": Param("choice", values=tuple(name for name in choices.OPTIMIZERS if name != "lbfgs")),
    "lr": Param("float", 0.0, 10.0, low_open=True),
    "momentum": Param("float", 0.0, 1.0, high_open=True),
    "weight_decay": Param("float", 0.0, 1.0),
    "clip_norm": Param("float", 0.0, 1000.0, low_open=True),
    "lr_schedule": Param("choice", values=choices.SCHEDULES),
    "lr_drop": Param("float", 0.0, 1.0, low_open=True),
    "lr_every": Param("int", 1, 100_000),
    "lr_decay": Param("float", 0.0, 1.0, high_open=True),
    "warmup_epochs": Param("int", 0, 100_000),
}


@dataclasses.dataclass(frozen=True)
class Tuning:
    """What an app declares so that `dlsuite tune` can search it.

    Attributes:
        params: {name: Param}, every hyperparameter a space may set.
        defaults: the default space, {name: value | [choices] | {min, max, ...}}.
        objectives: {metric: "max" or "min"}, what the hypermodel's fit reports.
        objective: the default objective.
        epochs: default epochs per trial.
        max_trials: default number of trials (random and bayesian).
        data_name: the data's short name, from the parsed options (default --dir).
        data_defaults: keyword arguments of `add_data_arguments`.
        fixing_options: {option dest: help} options that fix a hyperparameter
            of the space (classify's --model).
        extra_options: ((dest, flag, kwargs), ...) tune-only data options,
            passed to the app's task.
        help: the one-line help.
        examples: the epilog's examples.
    """

    params: dict
    defaults: dict
    objectives: dict
    objective: str
    epochs: int
    max_trials: int
    data_name: object
    data_defaults: dict = dataclasses.field(default_factory=dict)
    fixing_options: dict = dataclasses.field(default_factory=dict)
    extra_options: tuple = ()
    help: str = ""
    examples: str = ""
