"""Stop training on a NaN or infinite loss and say what the seed says."""

import math

import keras

NAN_ADVICE = (
    "the loss became {value} at epoch {epoch}, batch {batch}: the learning rate is "
    "probably too high (the seed: 'loss goes to NaN: too high learning rate'); "
    "lower --lr (for example by 10x) or add --clip-norm"
)


class NaNGuard(keras.callbacks.Callback):
    """Stops at the first non-finite batch loss and records why.

    Unlike keras.callbacks.TerminateOnNaN it keeps the message for the app to
    print and leaves the best checkpoint written so far untouched.
    """

    def __init__(self):
        super().__init__()
        self.message = None
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.message = NAN_ADVICE.format(value=float(loss), epoch=self._epoch + 1, batch=batch + 1)
            self.model.stop_training = True
