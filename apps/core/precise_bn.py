"""Precise batch-norm statistics: the population mean and unbiased variance
of every batch-norm layer's inputs over the training set, with the final
weights (the seed: "use the unbiased estimation of mean and variance from
all train batches"; pycls's precise BN, PyTorch's `swa_utils.update_bn`).

Keras keeps moving averages instead (momentum 0.99), which mix statistics of
weights from the last few hundred steps and lag behind the final ones. Here
each layer's momentum is set to 0 for one pass, so that after a
training-mode forward of a batch its moving statistics hold that batch's
mean and (biased) variance; those are pooled over the batches, weighted by
their element counts, into the population mean and the unbiased variance.
As in `update_bn`, the forward pass runs in training mode, so a layer sees
its inputs normalized by the batch statistics of the layers before it.
Frozen batch-norm layers (a transfer backbone's) run in inference mode and
keep their statistics.
"""

import numpy as np


def batch_norm_layers(model):
    """The BatchNormalization layers of `model` (nested models included) that train."""
    import keras

    return [layer for layer in _all_layers(model)
            if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable and not layer.renorm]


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def recompute(model, batches, *, max_batches=None):
    """Sets the moving statistics of `model`'s batch-norm layers to the
    population statistics of their inputs over `batches` ((x, y) or x).

    Args:
        model: a built Keras model.
        batches: an iterable of batches, e.g. the training tf.data batches.
        max_batches: use at most this many batches (None: all of them).

    Returns:
        The number of batches used (0 when the model has no batch norm that trains).
    """
    import tensorflow as tf

    layers = batch_norm_layers(model)
    if not layers:
        return 0
    momentums = [layer.momentum for layer in layers]
    sums = [None] * len(layers)  # per layer: [count, sum of means * count, sum of (var + mean^2) * count]
    forward = tf.function(lambda x: model(x, training=True), reduce_retracing=True)
    used = 0
    try:
        for layer in layers:
            layer.momentum = 0.0  # read when `forward` is traced: moving statistics = this batch's
        for batch in batches:
            if max_batches is not None and used >= max_batches:
                break
            x = batch[0] if isinstance(batch, tuple) else batch
            forward(x)
            for index, layer in enumerate(layers):
                count = _elements_per_channel(layer, x)
                mean = np.asarray(layer.moving_mean, dtype=np.float64)
                second = np.asarray(layer.moving_variance, dtype=np.float64) + mean ** 2
                if sums[index] is None:
                    sums[index] = [0.0, np.zeros_like(mean), np.zeros_like(mean)]
                sums[index][0] += count
                sums[index][1] += mean * count
                sums[index][2] += second * count
            used += 1
    finally:
        for layer, momentum in zip(layers, momentums):
            layer.momentum = momentum
    if used:
        for layer, (count, mean_sum, second_sum) in zip(layers, sums):
            mean = mean_sum / count
            variance = (second_sum / count - mean ** 2) * count / max(count - 1, 1)  # Bessel's correction
            layer.moving_mean.assign(mean.astype("float32"))
            layer.moving_variance.assign(np.maximum(variance, 0.0).astype("float32"))
    return used


def _elements_per_channel(layer, x):
    """How many values one channel of `layer`'s input held in this batch:
    batch size times the positions the layer reduces over."""
    import tensorflow as tf

    batch = int(tf.nest.flatten(x)[0].shape[0])
    shape = layer.input.shape if _has_input(layer) else None
    positions = 1
    if shape is not None:
        axes = [axis % len(shape) for axis in np.atleast_1d(layer.axis)]
        for axis, size in enumerate(shape):
            if axis != 0 and axis not in axes and size is not None:
                positions *= int(size)
    return batch * positions


def _has_input(layer):
    try:
        layer.input  # noqa: B018 (raises for a layer used more than once or never)
    except (AttributeError, ValueError):
        return False
    return True
