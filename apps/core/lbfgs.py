"""Full-batch L-BFGS training, the seed's second-order method, through SciPy.

L-BFGS approximates Newton's step from the last few gradient pairs instead of
forming the inverse Hessian, and needs neither a learning rate nor mini-batches:
each iteration evaluates the loss and gradient over the whole training set
(batch gradient descent in the seed's terms) and picks its own step by line
search. SciPy's `L-BFGS-B` is a well-kept, widely used implementation, so we
hand it the flattened weights and a TensorFlow function that returns the loss
and gradient. Suits small models (LeNet-5 on digits); memory grows with
`history` x parameters.
"""

import math
import os

import keras
import numpy as np
import scipy.optimize
import tensorflow as tf

from dlsuite import callbacks as dl_callbacks
from dlsuite.apps.core import atomic, loop_parts, rundir


class _FlatWeights:
    """Views the model's trainable weights as one float64 vector for SciPy."""

    def __init__(self, variables):
        self.variables = variables
        self.shapes = [tuple(v.shape) for v in variables]
        self.sizes = [int(np.prod(s)) for s in self.shapes]

    def get(self):
        return np.concatenate([np.ravel(v.numpy()) for v in self.variables]).astype("float64")

    def set(self, flat):
        for variable, piece, shape in zip(self.variables, np.split(flat, np.cumsum(self.sizes)[:-1]), self.shapes):
            variable.assign(piece.reshape(shape).astype(variable.dtype))


def train_lbfgs(model, train_dataset, validation_dataset=None, *, iterations, loss, history=10, on_iteration=None):
    """Minimizes `loss` over the whole of `train_dataset` with L-BFGS.

    The objective is evaluated in inference mode (dropout off, batch norm on
    its moving statistics) so that the line search sees one deterministic
    function.

    Args:
        model: a built Keras model whose output `loss` accepts.
        train_dataset: batched (x, y) dataset; all of it forms each evaluation.
        validation_dataset: optional batched (x, y) dataset for val metrics.
        iterations: maximum L-BFGS iterations (the app's --epochs).
        loss: a Keras loss object (sum over the batch is averaged here).
        history: gradient pairs L-BFGS remembers (its memory).
        on_iteration: called as on_iteration(iteration, logs) after each one,
            with loss, accuracy, val_loss, val_accuracy; return True to stop.

    Returns:
        (history dict of per-iteration lists, `stop_reason`: None when all
        `iterations` ran or the loop was stopped from inside).
    """
    weights = _FlatWeights(model.trainable_variables)
    accuracy = keras.metrics.SparseCategoricalAccuracy()

    # The objective is the mean loss per example, the scale SciPy's absolute
    # tolerances assume (gtol 1e-5 on the largest gradient component). A Keras
    # loss already averages over its batch, so each batch counts as mean x size;
    # summing those means instead shrank loss and gradient by the batch size and
    # "converged" runs far from a minimum, silently (issue #27; measured: a
    # dense net on 1,200 digits as one batch stopped after 24 of 300
    # iterations at a true loss of 0.07).
    def batch_total(y, predictions):
        size = tf.cast(tf.shape(predictions)[0], "float32")
        return (tf.reduce_mean(loss(y, predictions)) + tf.add_n([0.0] + model.losses)) * size

    @tf.function
    def batch_loss_and_gradients(x, y):
        with tf.GradientTape() as tape:
            predictions = model(x, training=False)
            total = batch_total(y, predictions)
        return total, tape.gradient(total, model.trainable_variables)

    def objective(flat):
        weights.set(flat)
        total, count = 0.0, 0
        gradient = np.zeros_like(flat)
        for x, y in train_dataset:
            value, gradients = batch_loss_and_gradients(x, y)
            total += float(value)
            count += int(x.shape[0])
            gradient += np.concatenate([np.ravel(g.numpy()) for g in gradients])
        return total / count, gradient / count

    def evaluate(dataset):
        accuracy.reset_state()
        total, count = 0.0, 0
        for x, y in dataset:
            predictions = model(x, training=False)
            total += float(tf.reduce_mean(loss(y, predictions))) * int(x.shape[0])
            count += int(x.shape[0])
            accuracy.update_state(y, predictions)
        return total / count, float(accuracy.result())

    log = {"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": []}

    class _Stop(Exception):
        pass

    def callback(flat):
        weights.set(flat)
        logs = dict(zip(("loss", "accuracy"), evaluate(train_dataset)))
        if validation_dataset is not None:
            logs.update(zip(("val_loss", "val_accuracy"), evaluate(validation_dataset)))
        for key, value in logs.items():
            log[key].append(value)
        if not math.isfinite(logs["loss"]) or (on_iteration and on_iteration(len(log["loss"]) - 1, logs)):
            raise _Stop

    try:
        result = scipy.optimize.minimize(
            objective, weights.get(), jac=True, method="L-BFGS-B", callback=callback,
            options={"maxiter": iterations, "maxcor": history, "gtol": GTOL},
        )
    except _Stop:  # a non-finite loss (the caller's loss watch reports it) or the caller's request
        return {k: v for k, v in log.items() if v}, None
    weights.set(result.x)
    return {k: v for k, v in log.items() if v}, stop_reason(result, iterations)


GTOL = 1e-5  # SciPy's default, named here so that the stop line can quote it


def stop_reason(result, iterations):
    """Why SciPy's L-BFGS-B ended before `iterations`, as a line for the user,
    or None when it ran them all.

    SciPy ends quietly on three grounds: convergence (status 0: the largest
    gradient component under GTOL, or the loss falling by less than about
    2e-9 of itself in an iteration), its limit on loss evaluations (status
    1), or a line search that found no lower loss along its direction
    (status 2), which a float32 loss causes near a minimum, where rounding
    hides the decrease the gradient promises.
    """
    if result.nit >= iterations:
        return None
    largest = float(np.max(np.abs(result.jac)))
    if result.status == 0 and largest <= GTOL:
        why = f"converged (largest gradient component {largest:.1e} <= {GTOL:g})"
    elif result.status == 0:
        why = f"converged (loss {result.fun:.6g} stopped falling; largest gradient component {largest:.1e})"
    elif result.status == 1:
        why = f"the limit of {result.nfev} loss evaluations was reached"
    else:
        why = f"line search failed (loss {result.fun:.6g}, largest gradient component {largest:.1e}: {result.message})"
    return f"L-BFGS stopped after {result.nit} of {iterations} iterations: {why}"


def fit(model, train, validation, *, optimizer_config, loss, epochs, paths):
    """`--optimizer lbfgs`: `train_lbfgs` for `epochs` iterations, with the
    run directory's best checkpoint, train.log and history.csv, and the line
    that says why it stopped early when it did."""
    best = dl_callbacks.BestCheckpoint(paths["best"], monitor="val_loss", save=atomic.save_model)
    best.set_model(model)
    log = dl_callbacks.EpochLog(paths["log"], epochs)

    def on_iteration(iteration, logs):
        best.on_epoch_end(iteration, logs)
        log.on_epoch_end(iteration, logs)
        print(f"L-BFGS iteration {iteration + 1}/{epochs}: "
              + " ".join(f"{k} {v:.4f}" for k, v in logs.items()), flush=True)
        return False

    # Compiled only so that evaluate/predict/save behave as after fit.
    model.compile(optimizer="sgd", loss=loss, metrics=["accuracy"])
    history, early_stop = train_lbfgs(
        model, train, validation, iterations=epochs, loss=loss, on_iteration=on_iteration,
    )
    rundir.write_history(paths["history"], history)
    watch = dl_callbacks.nan_guard.LossWatch()
    losses = history.get("loss", [])
    any(watch.epoch(iteration, loss) for iteration, loss in enumerate(losses))
    reason = watch.message
    if early_stop and not reason:  # converged or line search failed: not an error, but said (issue #27)
        print(early_stop, flush=True)
        with open(paths["log"], "a") as handle:  # train.log, beside the iteration lines
            handle.write(early_stop + "\n")
    return loop_parts.FitResult(history, reason, paths["best"] if os.path.exists(paths["best"]) else None, len(losses))
