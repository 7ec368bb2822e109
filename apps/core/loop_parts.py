"""What every training loop of the engine shares (Keras fit, the
multi-worker loop, the parameter-server loop, L-BFGS): the fit result, the
callbacks a run directory gets, the loss and accuracy sums the custom loops
reduce, and the non-finite loss they stop at."""

import dataclasses

import keras
import tensorflow as tf

from dlsuite import callbacks as dl_callbacks
from dlsuite.apps.core import atomic, optim, rundir
from dlsuite.apps.core.errors import UsageError
from dlsuite.callbacks.nan_guard import NAN_ADVICE


@dataclasses.dataclass
class FitResult:
    history: dict
    stopped_reason: str | None  # None, or a message (NaN loss, ...)
    best_checkpoint: str | None
    epochs_run: int


class NonFiniteLoss(UsageError):
    """The training loss became NaN or infinite; training stopped.

    Raised by `train_custom_loop` at the first step whose loss (reduced over
    all replicas, so every worker raises at the same step) is not finite. It
    is a `UsageError` because the usual cause is a too high learning rate; the
    message says what to change.

    Attributes:
        epoch: 0-based epoch of the step.
        step: 0-based step within the epoch.
        value: the non-finite mean batch loss.
        history: the history of the epochs completed before, as returned by
            `train_custom_loop`.
    """

    def __init__(self, *, epoch, step, value, history):
        super().__init__(NAN_ADVICE.format(value=value, epoch=epoch + 1, batch=step + 1))
        self.epoch = epoch
        self.step = step
        self.value = value
        self.history = history


def run_callbacks(paths, *, epochs, resume, initial_epoch, best_checkpoint):
    """What a run directory gets from training: the best checkpoint,
    history.csv, train.log and TensorBoard logs."""
    best_value = None
    if resume:  # the best checkpoint must beat what the interrupted part reached
        previous = rundir.read_history(paths["history"])
        best_value = min(previous["val_loss"]) if previous.get("val_loss") else None
    return [
        *([dl_callbacks.BestCheckpoint(paths["best"], monitor="val_loss", best=best_value, save=atomic.save_model)] if best_checkpoint else []),
        keras.callbacks.CSVLogger(paths["history"], append=resume or initial_epoch > 0),
        dl_callbacks.EpochLog(paths["log"], epochs),
        *_tensorboard(paths["tensorboard"]),
    ]


def _tensorboard(path):
    """TensorBoard logs when the tensorboard package is present (it is optional)."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return []
    return [keras.callbacks.TensorBoard(path, write_graph=False)]


def per_example_loss_fn(loss):
    """Returns `fn(y_true, y_pred)` -> one loss per example, shape (batch,)."""
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        # `Loss.call` gives the unreduced losses; `__call__` would reduce them
        # with the object's reduction. Cast as `Loss.__call__` does.
        def unreduced(y_true, y_pred):
            return loss.call(
                tf.nest.map_structure(lambda t: tf.cast(t, loss.dtype), y_true),
                tf.nest.map_structure(lambda t: tf.cast(t, loss.dtype), y_pred),
            )
    elif callable(loss):
        unreduced = loss
    else:
        raise ValueError(f"loss must be a keras loss object, name or function, got {loss!r}")

    def per_example(y_true, y_pred):
        losses = unreduced(y_true, y_pred)
        # Losses per time step or pixel: their mean, as "sum_over_batch_size" weighs them.
        if losses.shape.rank > 1:
            losses = tf.reduce_mean(losses, axis=list(range(1, losses.shape.rank)))
        return losses

    return per_example


def per_example_accuracy(y_true, y_pred, binary_threshold):
    """1.0 per correctly classified example (mean over positions for sequences)."""
    if y_pred.shape[-1] == 1:
        correct = keras.metrics.binary_accuracy(y_true, y_pred, threshold=binary_threshold)
    elif y_true.shape.rank == y_pred.shape.rank and y_true.shape[-1] == y_pred.shape[-1]:
        correct = keras.metrics.categorical_accuracy(y_true, y_pred)
    else:
        correct = keras.metrics.sparse_categorical_accuracy(y_true, y_pred)
    correct = tf.cast(correct, tf.float32)
    if correct.shape.rank > 1:
        correct = tf.reduce_mean(correct, axis=list(range(1, correct.shape.rank)))
    return correct


def batch_sums(y, y_pred, per_example, regularization, *, with_accuracy, binary_threshold):
    """(loss sum, correct predictions, examples) of one replica's batch."""
    count = tf.cast(tf.shape(per_example)[0], tf.float32)
    loss_sum = tf.reduce_sum(tf.cast(per_example, tf.float32)) + count * regularization
    correct = (
        tf.reduce_sum(per_example_accuracy(y, y_pred, binary_threshold)) if with_accuracy else tf.constant(0.0)
    )
    return tf.stack([loss_sum, correct, count])


def regularization(model):
    """The sum of `model.losses` (weight penalties), float32."""
    losses = model.losses
    return tf.add_n([tf.cast(value, tf.float32) for value in losses]) if losses else tf.constant(0.0)


def stateful_callbacks(optimizer_config, early_stopping):
    """The callbacks whose state spans epochs: the learning-rate schedule's
    and early stopping's (a resumed run replays the history into them)."""
    return [*optim.schedule_callbacks(optimizer_config),
            *([keras.callbacks.EarlyStopping(monitor="val_loss", patience=early_stopping)] if early_stopping else [])]
