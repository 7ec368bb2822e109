"""Record the learning rate each epoch used, whatever set it."""

import keras


class LearningRateLogger(keras.callbacks.Callback):
    """Adds `learning_rate` to each epoch's logs (and so to history.csv).

    The rate is read when the epoch begins, after a schedule callback such as
    StepDecay has set it (put this logger after them); for per-step schedules
    it is the rate of the epoch's first step.
    """

    def __init__(self):
        super().__init__()
        self._rate = None

    def on_epoch_begin(self, epoch, logs=None):
        self._rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self._rate is not None:
            logs["learning_rate"] = self._rate
