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

import keras
import numpy as np
import scipy.optimize
import tensorflow as tf


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
        (history dict of per-iteration lists, SciPy's result message).
    """
    weights = _FlatWeights(model.trainable_variables)
    accuracy = keras.metrics.SparseCategoricalAccuracy()

    @tf.function
    def batch_loss_and_gradients(x, y):
        with tf.GradientTape() as tape:
            predictions = model(x, training=False)
            total = tf.reduce_sum(loss(y, predictions)) + tf.add_n([0.0] + model.losses) * tf.cast(tf.shape(x)[0], "float32")
        return total, tape.gradient(total, model.trainable_variables), predictions

    def objective(flat):
        weights.set(flat)
        total, count = 0.0, 0
        gradient = np.zeros_like(flat)
        for x, y in train_dataset:
            value, gradients, _ = batch_loss_and_gradients(x, y)
            total += float(value)
            count += int(x.shape[0])
            gradient += np.concatenate([np.ravel(g.numpy()) for g in gradients])
        return total / count, gradient / count

    def evaluate(dataset):
        accuracy.reset_state()
        total, count = 0.0, 0
        for x, y in dataset:
            predictions = model(x, training=False)
            total += float(tf.reduce_sum(loss(y, predictions)))
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
            options={"maxiter": iterations, "maxcor": history},
        )
        weights.set(result.x)
        message = str(result.message)
    except _Stop:
        message = "stopped"
    return {k: v for k, v in log.items() if v}, message
