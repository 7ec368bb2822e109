"""Local Response Normalization and Maxout: numerics, shapes, serialization."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from dlsuite.models.layers import LocalResponseNormalization, Maxout


def test_lrn_matches_the_paper_formula_and_tensorflow():
    x = np.random.default_rng(0).normal(size=(2, 3, 3, 7)).astype("float32")
    ours = LocalResponseNormalization(depth_radius=2, bias=2.0, alpha=1e-4, beta=0.75)(x)
    # TensorFlow does not divide alpha by the window size n = 5.
    theirs = tf.nn.local_response_normalization(x, depth_radius=2, bias=2.0, alpha=1e-4 / 5, beta=0.75)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    # Channel 0 by hand: its window is channels 0..2.
    expected = x[..., 0] / (2.0 + 1e-4 / 5 * np.sum(x[..., 0:3] ** 2, axis=-1)) ** 0.75
    np.testing.assert_allclose(ours[..., 0], expected, rtol=1e-5)


def test_maxout_without_units_takes_the_max_of_each_group():
    x = np.array([[1.0, 5.0, -2.0, -1.0, 3.0, 3.5]], dtype="float32")
    np.testing.assert_array_equal(Maxout(pieces=2)(x), [[5.0, -1.0, 3.5]])
    np.testing.assert_array_equal(Maxout(pieces=3)(x), [[5.0, 3.5]])


def test_maxout_with_units_is_a_max_of_affine_maps():
    layer = Maxout(pieces=2, units=3)
    x = np.random.default_rng(1).normal(size=(4, 5)).astype("float32")
    y = layer(x).numpy()
    z = x @ layer.kernel.numpy() + layer.bias.numpy()
    np.testing.assert_allclose(y, np.max(z.reshape(4, 3, 2), axis=-1), rtol=1e-6)
    assert layer.count_params() == 5 * 6 + 6


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Maxout(pieces=1), "pieces >= 2, received 1"),
        (lambda: Maxout(units=0), "units must be >= 1, received 0"),
        (lambda: Maxout(pieces=2)(np.zeros((1, 5), "float32")), "divisible by 2, received 5"),
        (lambda: LocalResponseNormalization(depth_radius=-1), "depth_radius must be >= 0, received -1"),
    ],
)
def test_bad_layer_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_layers_round_trip_with_safe_mode(tmp_path):
    inputs = keras.Input((4, 4, 6))
    x = LocalResponseNormalization(name="lrn")(inputs)
    x = Maxout(pieces=2, name="maxout_plain")(x)
    x = keras.layers.Flatten()(x)
    x = Maxout(pieces=2, units=4, name="maxout_unit")(x)
    model = keras.Model(inputs, x)
    path = tmp_path / "layers.keras"
    model.save(path)
    restored = keras.saving.load_model(path, safe_mode=True)
    data = np.random.default_rng(2).normal(size=(3, 4, 4, 6)).astype("float32")
    np.testing.assert_allclose(restored(data), model(data), rtol=1e-6)
    assert restored.get_layer("maxout_unit").get_config()["units"] == 4
