"""Optimizers and learning-rate schedules, as the command line names them.

The seed's update rules: SGD, momentum, Nesterov, AdaGrad, RMSprop, Adam (and
L-BFGS, trained full-batch by `dlsuite.apps.core.lbfgs`), each with the learning
rate, momentum, decoupled weight decay and global gradient-norm clipping; and
its schedules: step decay (a callback in `dlsuite.callbacks`), exponential and
1/t decay, plus cosine, linear warm-up and reduce-on-plateau.
"""

import dataclasses

import keras

from dlsuite.apps.core.choices import OPTIMIZERS, SCHEDULES  # noqa: F401 (re-exported)
from dlsuite.apps.core.errors import UsageError
from dlsuite.callbacks import StepDecay

# Rates that train the registry's models on the bundled data from a cold start.
DEFAULT_LR = {
    "sgd": 0.01, "momentum": 0.01, "nesterov": 0.01, "adagrad": 0.01,
    "rmsprop": 0.001, "adam": 0.001, "lbfgs": 1.0,
}


@keras.saving.register_keras_serializable(package="dlsuite")
class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """Rises linearly from 0 to `target` over `warmup_steps`, then holds."""

    def __init__(self, target, warmup_steps):
        self.target = float(target)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        fraction = keras.ops.minimum(1.0, (step + 1.0) / max(1, self.warmup_steps))
        return self.target * fraction

    def get_config(self):
        return {"target": self.target, "warmup_steps": self.warmup_steps}


@dataclasses.dataclass
class OptimizerConfig:
    """How to update the weights; every field is a command-line option.

    Attributes:
        optimizer: one of OPTIMIZERS.
        lr: learning rate; None takes DEFAULT_LR for the optimizer.
        momentum: for momentum and nesterov (the seed's mu, about 0.9), and
            rmsprop's momentum term.
        weight_decay: decoupled weight decay (0 = off).
        clip_norm: clip the global gradient norm to this value (None = off),
            the seed's fix for exploding gradients.
        lr_schedule: one of SCHEDULES.
        lr_drop: step and plateau factor (0.5 halves the rate).
        lr_every: epochs between step-decay drops.
        lr_decay: per-epoch rate for exponential (lr * decay^epoch) and 1/t
            (lr / (1 + decay * epoch)) schedules.
        warmup_epochs: epochs of linear warm-up for "warmup" and "cosine".
        lr_patience: epochs without val_loss improvement before a plateau drop.
    """

    optimizer: str = "adam"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    clip_norm: float | None = None
    lr_schedule: str = "constant"
    lr_drop: float = 0.5
    lr_every: int = 10
    lr_decay: float = 0.1
    warmup_epochs: int = 0
    lr_patience: int = 3

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"Unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}.", option="optimizer")
        if self.lr_schedule not in SCHEDULES:
            raise UsageError(f"Unknown learning-rate schedule {self.lr_schedule!r}; choose one of {', '.join(SCHEDULES)}.", option="lr_schedule")
        if self.lr is not None and not self.lr > 0:
            raise UsageError(f"lr must be > 0, received {self.lr}; try 0.001.", option="lr")
        if not 0 <= self.momentum < 1:
            raise UsageError(f"momentum must be in [0, 1), received {self.momentum}; 0.9 is typical.", option="momentum")
        if self.weight_decay < 0:
            raise UsageError(f"weight_decay must be >= 0, received {self.weight_decay}.", option="weight_decay")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise UsageError(f"clip_norm must be > 0, received {self.clip_norm}; try 5.", option="clip_norm")
        if not 0 < self.lr_drop <= 1:
            raise UsageError(f"lr_drop must be in (0, 1], received {self.lr_drop}; 0.5 halves the rate.", option="lr_drop")
        if self.lr_every < 1:
            raise UsageError(f"lr_every must be >= 1 epoch, received {self.lr_every}.", option="lr_every")
        if self.lr_decay < 0:
            raise UsageError(f"lr_decay must be >= 0, received {self.lr_decay}.", option="lr_decay")
        if self.warmup_epochs < 0:
            raise UsageError(f"warmup_epochs must be >= 0, received {self.warmup_epochs}.", option="warmup_epochs")
        if self.optimizer == "lbfgs" and self.lr_schedule != "constant":
            raise UsageError(
                f"lr_schedule {self.lr_schedule} does not apply to lbfgs, which chooses "
                "its own step sizes by line search; leave the schedule constant.", option="lr_schedule",
            )

    @property
    def learning_rate(self):
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]


def make_schedule(config, *, steps_per_epoch, epochs):
    """The learning rate the optimizer takes: a float or a per-step schedule."""
    rate, steps = config.learning_rate, max(1, steps_per_epoch)
    if config.lr_schedule == "exponential":
        return keras.optimizers.schedules.ExponentialDecay(rate, decay_steps=steps, decay_rate=1 - config.lr_decay)
    if config.lr_schedule == "inverse_time":
        return keras.optimizers.schedules.InverseTimeDecay(rate, decay_steps=steps, decay_rate=config.lr_decay)
    if config.lr_schedule == "cosine":
        warmup = config.warmup_epochs * steps
        return keras.optimizers.schedules.CosineDecay(
            0.0 if warmup else rate,
            decay_steps=max(1, epochs * steps - warmup),
            warmup_target=rate if warmup else None,
            warmup_steps=warmup,
        )
    if config.lr_schedule == "warmup":
        return LinearWarmup(rate, max(1, config.warmup_epochs) * steps)
    return rate  # constant, or set each epoch by a callback (step, plateau)


def make_optimizer(config, *, steps_per_epoch, epochs):
    """Builds the Keras optimizer for `config` (not lbfgs, which is not one)."""
    if config.optimizer == "lbfgs":
        raise ValueError("lbfgs is trained by dlsuite.apps.core.lbfgs, not a Keras optimizer.")
    common = {
        "learning_rate": make_schedule(config, steps_per_epoch=steps_per_epoch, epochs=epochs),
        "weight_decay": config.weight_decay or None,
        "global_clipnorm": config.clip_norm,
    }
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(**common)
    if config.optimizer in ("momentum", "nesterov"):
        return keras.optimizers.SGD(momentum=config.momentum, nesterov=config.optimizer == "nesterov", **common)
    if config.optimizer == "adagrad":
        return keras.optimizers.Adagrad(**common)
    if config.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(**common)
    return keras.optimizers.Adam(**common)


def schedule_callbacks(config):
    """Callbacks that set the rate epoch by epoch (step decay, plateau)."""
    if config.lr_schedule == "step":
        return [StepDecay(config.learning_rate, drop=config.lr_drop, every=config.lr_every)]
    if config.lr_schedule == "plateau":
        return [keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=config.lr_drop, patience=config.lr_patience, verbose=0
        )]
    return []
