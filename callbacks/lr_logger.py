"""Record the learning rate each epoch used, whatever set it."""

import keras

from dlsuite.models import compat


class LearningRateLogger(keras.callbacks.Callback):
    """Adds `learning_rate` to each epoch's logs (and so to history.csv).

    The rate is read when the epoch begins, after a schedule callback such as
    StepDecay has set it (put this logger after them). For a per-step schedule
    it is the rate of the epoch's first step, `epoch * steps_per_epoch`, also
    when a resumed run starts in the middle of the epoch.

    Args:
        steps_per_epoch: steps in one epoch; None reads the rate at the
            optimizer's current step.
    """

    def __init__(self, steps_per_epoch=None):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self._rate = None

    def on_epoch_begin(self, epoch, logs=None):
        optimizer = self.model.optimizer
        schedule = compat.learning_rate_schedule(optimizer)
        rate = (schedule(epoch * self.steps_per_epoch) if schedule is not None and self.steps_per_epoch
                else optimizer.learning_rate)
        self._rate = float(keras.ops.convert_to_numpy(rate))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self._rate is not None:
            logs["learning_rate"] = self._rate
