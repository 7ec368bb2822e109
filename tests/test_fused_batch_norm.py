"""dlsuite.models.layers.BatchNormalization (the fused kernel) gives keras.layers.BatchNormalization's numbers.

The registry CNNs use it (models/common.conv_block) because TensorFlow's fused
kernel normalizes a bfloat16 activation in one pass; the training step of
ResNet-50 under mixed_bfloat16 got 1.6x faster with it (docs/scaling.md).
What a user relies on: the same outputs, gradients and moving statistics as
Keras's layer on the same weights, in float32 and under mixed_bfloat16, and
the Keras computation wherever the fused kernel does not apply.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from dlsuite import models
from dlsuite.apps.core import precise_bn
from dlsuite.models.layers import BatchNormalization as FusedBatchNormalization


@pytest.fixture
def policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    keras.mixed_precision.set_global_policy("float32")


def _twins(shape, **kwargs):
    """A Keras BatchNormalization and a fused one with the same non-default weights."""
    stock, fused = keras.layers.BatchNormalization(**kwargs), FusedBatchNormalization(**kwargs)
    stock.build(shape)
    fused.build(shape)
    rng = np.random.default_rng(0)
    weights = [w + rng.uniform(0.1, 0.5, w.shape).astype("float32") for w in stock.get_weights()]
    stock.set_weights(weights)
    fused.set_weights(weights)
    return stock, fused


def _step(layer, x, training):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=training)
        # A different weight for every output, so that no gradient cancels out within a channel.
        weights = np.random.default_rng(9).normal(size=y.shape).astype("float32")
        loss = tf.reduce_sum(tf.cast(y, "float32") * weights)
    gradients = tape.gradient(loss, [x, *layer.trainable_weights])
    return [y, *gradients, layer.moving_mean, layer.moving_variance]


@pytest.mark.parametrize("policy, tolerance", [("float32", 2e-5), ("mixed_bfloat16", 2e-2)], indirect=["policy"])
@pytest.mark.parametrize("shape", [(2, 2, 1, 8), (4, 5, 5, 3), (16, 7, 7, 32)])  # 4 values a channel: n / (n - 1) shows
@pytest.mark.parametrize("training", [True, False])
def test_same_outputs_gradients_and_moving_statistics_as_keras(policy, tolerance, shape, training):
    stock, fused = _twins(shape, momentum=0.9, epsilon=1.001e-5)
    x = np.random.default_rng(1).normal(3.0, 2.0, shape).astype("float32")
    stock_values, fused_values = _step(stock, x, training), _step(fused, x, training)
    assert fused_values[0].dtype == stock_values[0].dtype == keras.mixed_precision.global_policy().compute_dtype
    for stock_value, fused_value in zip(stock_values, fused_values):
        stock_value, fused_value = (np.asarray(v, dtype="float32") for v in (stock_value, fused_value))
        np.testing.assert_allclose(fused_value, stock_value, rtol=tolerance, atol=tolerance * np.abs(stock_value).max())
    # Training moved the statistics (biased batch variance, as Keras keeps it); inference left them.
    moved = not np.allclose(fused.moving_variance, _twins(shape)[1].moving_variance)
    assert moved == training


@pytest.mark.parametrize("make", [
    lambda: FusedBatchNormalization(axis=1),                   # channels first
    lambda: FusedBatchNormalization(epsilon=1e-6),             # below cuDNN's minimum
    lambda: FusedBatchNormalization(renorm=True),
    lambda: FusedBatchNormalization(center=False, scale=False),
])
def test_where_the_kernel_does_not_apply_or_weights_are_missing_keras_numbers_hold(make):
    x = np.random.default_rng(2).normal(size=(4, 3, 3, 3)).astype("float32")
    fused = make()
    stock = keras.layers.BatchNormalization.from_config(fused.get_config())
    for layer in (fused, stock):
        layer.build(x.shape)
    stock.set_weights(fused.get_weights())
    np.testing.assert_allclose(fused(x, training=True), stock(x, training=True), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fused.moving_variance, stock.moving_variance, rtol=1e-5)


def test_a_frozen_layer_runs_in_inference_mode_like_keras():
    stock, fused = _twins((4, 3, 3, 5))
    stock.trainable = fused.trainable = False
    x = np.random.default_rng(3).normal(size=(4, 3, 3, 5)).astype("float32")
    np.testing.assert_allclose(fused(x, training=True), stock(x, training=True), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(fused.moving_mean, stock.moving_mean)


def test_registry_cnns_use_it_and_precise_bn_finds_it_and_it_round_trips(tmp_path):
    model = models.build("resnet18", input_shape=(32, 32, 3), classes=3)
    norms = precise_bn.batch_norm_layers(model)
    assert norms and all(isinstance(layer, FusedBatchNormalization) for layer in norms)
    x = np.random.default_rng(4).uniform(size=(8, 32, 32, 3)).astype("float32")
    assert precise_bn.recompute(model, [x[:4], x[4:]]) == 2
    path = tmp_path / "resnet18.keras"
    model.save(path)
    restored = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(restored.get_layer(norms[0].name), FusedBatchNormalization)
    np.testing.assert_allclose(restored.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
