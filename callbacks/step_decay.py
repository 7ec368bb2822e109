"""Learning-rate step decay: multiply the rate by `drop` every `every` epochs."""

import math

import keras


class StepDecay(keras.callbacks.Callback):
    """Sets lr = initial_lr * drop ** floor(epoch / every) before each epoch.

    The seed's first schedule: "reduce the learning rate by some factor every
    few epochs". The rate is set on the optimizer, so it survives `--resume`
    (the epoch number alone decides it) and shows in the logs as
    `learning_rate`.

    Args:
        initial_lr: rate for epochs 0 .. every-1.
        drop: factor in (0, 1] applied at each step (0.5 halves it).
        every: epochs between drops, >= 1.
        min_lr: floor under which the rate never falls.
    """

    def __init__(self, initial_lr, drop=0.5, every=10, min_lr=0.0):
        super().__init__()
        if not initial_lr > 0:
            raise ValueError(f"initial_lr must be > 0, received {initial_lr!r}.")
        if not 0 < drop <= 1:
            raise ValueError(f"drop must be in (0, 1], received {drop!r}; 0.5 halves the rate.")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1 (epochs), received {every!r}.")
        if min_lr < 0:
            raise ValueError(f"min_lr must be >= 0, received {min_lr!r}.")
        self.initial_lr = float(initial_lr)
        self.drop = float(drop)
        self.every = every
        self.min_lr = float(min_lr)

    def rate(self, epoch):
        """The learning rate for `epoch` (counted from 0)."""
        return max(self.min_lr, self.initial_lr * self.drop ** math.floor(epoch / self.every))

    def on_epoch_begin(self, epoch, logs=None):
        self.model.optimizer.learning_rate = self.rate(epoch)

    def get_config(self):
        return {"initial_lr": self.initial_lr, "drop": self.drop, "every": self.every, "min_lr": self.min_lr}
