"""The CNN family through the registry: shapes, parameter counts, gradients,
save/load, the seed's knobs, Keras weight compatibility and argument errors."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from dlsuite import models
from dlsuite.models import googlenet, summary

CNN_NAMES = models.names(kind="cnn")
# ResNet-101 and -152 are ResNet-50's layers in longer stages: its round trip
# covers theirs, which would write 170 and 240 MB files (about 30 s).
SAVED_LIKE_RESNET50 = ("resnet101", "resnet152")

# Parameters at each paper configuration (default input, 1000 classes, 10 for
# LeNet), keras.applications conventions: conv biases, and batch-norm moving
# statistics counted (non-trainable). VGG, ResNet-50/101/152, AlexNet and
# LeNet-5 are the published Keras / hand-computed figures. The others were
# checked by hand:
# - zfnet: conv 14,208 + 614,656 + 885,120 + 1,327,488 + 884,992, FC on 6x6x256
#   37,752,832 + 16,781,312 + 4,097,000 = 62,357,608.
# - resnet18/34: torchvision's counts without conv biases (11,689,512 and
#   21,797,672) plus one bias and two moving statistics per conv channel
#   (4,800 and 8,512 channels): 11,703,912 and 21,823,208.
# - googlenet: stem 9,472 + 4,160 + 110,784, then each inception module's six
#   convolutions (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool projection) with
#   Table 1's widths, then 1024*1000+1000: 6,998,552 (summed by hand in Python;
#   no auxiliary heads, LRN has no weights).
# - lenet5_caffe: 520 + 25,050 + 800*500+500 + 5,010 = 431,080 at 28x28.
PINNED_PARAMS = {
    "alexnet": 62_378_344,
    "googlenet": 6_998_552,
    "lenet5": 61_706,
    "lenet5_caffe": 431_080,
    "resnet18": 11_703_912,
    "resnet34": 21_823_208,
    "resnet50": 25_636_712,
    "resnet101": 44_707_176,
    "resnet152": 60_419_944,
    "vgg11": 132_863_336,
    "vgg13": 133_047_848,
    "vgg16": 138_357_544,
    "vgg19": 143_667_240,
    "zfnet": 62_357_608,
}


def small_shape(name):
    spec = models.get(name)
    return (spec.min_input_size, spec.min_input_size, spec.default_input_shape[-1])


def test_every_cnn_has_a_pinned_count():
    assert sorted(PINNED_PARAMS) == CNN_NAMES


@pytest.mark.parametrize("name", CNN_NAMES)
def test_parameter_count_at_paper_configuration(name):
    with summary.shapes_only():  # counts need shapes, not 100M initialized weights
        model = models.build(name)
    assert model.count_params() == PINNED_PARAMS[name]


@pytest.mark.parametrize("name", CNN_NAMES)
def test_smallest_input_trains_and_round_trips(name, tmp_path):
    """At its minimum input size each model runs forward, every trainable
    weight gets a finite gradient, and `.keras` reloads with equal outputs;
    one pixel less is refused before any layer is built."""
    spec = models.get(name)
    size, channels = spec.min_input_size, spec.default_input_shape[-1]
    with pytest.raises(ValueError, match=f"at least {size}x{size}"):
        models.build(name, input_shape=(size - 1, size - 1, channels), classes=5)
    shape = (size, size, channels)
    model = models.build(name, input_shape=shape, classes=5)
    images = np.random.default_rng(0).uniform(0, 1, (2, *shape)).astype("float32")
    labels = np.array([1, 3])

    with tf.GradientTape() as tape:
        probabilities = model(images, training=True)
        loss = keras.losses.sparse_categorical_crossentropy(labels, probabilities)
    gradients = tape.gradient(loss, model.trainable_weights)

    assert probabilities.shape == (2, 5)
    assert np.all(np.isfinite(probabilities))
    np.testing.assert_allclose(np.sum(probabilities, axis=1), 1.0, rtol=1e-5)
    missing = [w.path for w, g in zip(model.trainable_weights, gradients) if g is None]
    assert not missing, f"weights without gradient: {missing}"
    assert all(np.all(np.isfinite(g)) for g in gradients)

    if name in SAVED_LIKE_RESNET50:
        return
    path = tmp_path / f"{name}.keras"
    model.save(path)
    restored = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(restored(images, training=False), model(images, training=False), atol=1e-6)


@pytest.mark.parametrize("name", ["lenet5", "vgg11", "resnet18", "googlenet"])
@pytest.mark.parametrize("pooling, rank", [(None, 4), ("avg", 2), ("max", 2)])
def test_feature_extractor_outputs(name, pooling, rank):
    model = models.build(name, include_top=False, pooling=pooling, input_shape=small_shape(name))
    assert len(model.output_shape) == rank
    assert "predictions" not in [layer.name for layer in model.layers]


def test_filter_progressions_follow_the_seed_table():
    def conv_filters(model):
        return [l.filters for l in model.layers if isinstance(l, keras.layers.Conv2D)]

    assert conv_filters(models.build("alexnet")) == [96, 256, 384, 384, 256]
    assert conv_filters(models.build("lenet5_caffe")) == [20, 50]
    vgg = conv_filters(models.build("vgg16", input_shape=(32, 32, 3)))
    assert sorted(set(vgg)) == [64, 128, 256, 512]
    assert vgg == [64] * 2 + [128] * 2 + [256] * 3 + [512] * 6


def test_resnet_block_names_match_keras():
    ours = models.build("resnet50", input_shape=(32, 32, 3))
    theirs = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3))
    assert [l.name for l in ours.layers if l.weights] == [l.name for l in theirs.layers if l.weights]
    assert ours.get_layer("conv4_block6_out").output.shape == (None, 2, 2, 1024)


@pytest.mark.parametrize(
    "ours, theirs",
    [("resnet50", keras.applications.ResNet50), ("vgg16", keras.applications.VGG16)],
)
def test_keras_applications_weights_load_and_match(ours, theirs, tmp_path):
    shape = (64, 64, 3)
    reference = theirs(weights=None, input_shape=shape, include_top=False, pooling="avg")
    path = tmp_path / "keras.weights.h5"
    reference.save_weights(path)

    model = models.build(ours, weights=str(path), input_shape=shape, include_top=False, pooling="avg")
    images = np.random.default_rng(1).uniform(0, 255, (2, *shape)).astype("float32")
    np.testing.assert_allclose(model.predict(images, verbose=0), reference.predict(images, verbose=0), rtol=1e-5, atol=1e-5)


def test_imagenet_weights_come_from_the_keras_cache(tmp_path):
    """A Keras-format ImageNet file in $KERAS_HOME/models is what "imagenet" loads.

    The test writes that file itself (from keras.applications with random
    weights, in the legacy HDF5 layout Keras publishes) and runs offline.
    """
    script = f"""
import numpy as np, keras
from keras.src.legacy.saving import legacy_h5_format
import h5py
from dlsuite import models
reference = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
with h5py.File({str(tmp_path / 'models' / 'vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5')!r}, "w") as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, reference)
model = models.build("vgg16", weights="imagenet", include_top=False, input_shape=(32, 32, 3))
x = np.random.default_rng(0).uniform(0, 255, (1, 32, 32, 3)).astype("float32")
print("max difference", float(np.max(np.abs(model.predict(x, verbose=0) - reference.predict(x, verbose=0)))))
"""
    (tmp_path / "models").mkdir()
    env = {**os.environ, "KERAS_HOME": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.split("max difference")[-1]) < 1e-4


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "elu", "tanh", "sigmoid", "maxout"])
@pytest.mark.parametrize("name", ["lenet5", "resnet18", "googlenet"])
def test_every_activation_builds_and_trains(name, activation):
    shape = small_shape(name)
    model = models.build(name, activation=activation, input_shape=shape, classes=4)
    images = np.random.default_rng(2).normal(size=(2, *shape)).astype("float32")
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(model(images, training=True))
    gradients = tape.gradient(loss, model.trainable_weights)
    assert model.output_shape == (None, 4)
    assert all(g is not None for g in gradients)
    layer_types = {type(l).__name__ for l in model.layers}
    assert ("Maxout" in layer_types) == (activation == "maxout")


def test_maxout_doubles_the_linear_units_it_follows():
    plain = models.build("lenet5")
    maxout = models.build("lenet5", activation="maxout")
    assert maxout.get_layer("conv1").filters == 2 * plain.get_layer("conv1").filters
    assert maxout.get_layer("conv1_maxout").output.shape == plain.get_layer("conv1").output.shape


def test_regularization_knobs_reach_every_kernel():
    model = models.build("lenet5", l1=1e-4, l2=1e-3, max_norm=2.0, dropout=0.3)
    kernels = [l for l in model.layers if isinstance(l, (keras.layers.Conv2D, keras.layers.Dense))]
    assert all(l.kernel_regularizer.l1 == pytest.approx(1e-4) and l.kernel_regularizer.l2 == pytest.approx(1e-3) for l in kernels)
    assert all(isinstance(l.kernel_constraint, keras.constraints.MaxNorm) for l in kernels)
    assert len(model.losses) == len(kernels)
    assert model.get_layer("fc1_dropout").rate == pytest.approx(0.3)


def test_max_norm_caps_each_unit_after_an_update():
    model = models.build("lenet5", max_norm=0.5, kernel_initializer="large_normal")
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    model.fit(np.zeros((4, 32, 32, 1), "float32"), np.zeros(4), epochs=1, verbose=0)
    kernel = model.get_layer("fc1").kernel.numpy()
    assert np.max(np.linalg.norm(kernel, axis=0)) <= 0.5 + 1e-5


@pytest.mark.parametrize(
    "initializer, check",
    [
        ("zeros", lambda k: np.all(k == 0)),
        ("small_normal", lambda k: 0.005 < np.std(k) < 0.015),
        ("large_normal", lambda k: 0.9 < np.std(k) < 1.1),
        ("he_normal", lambda k: 0.8 * np.sqrt(2 / 150) < np.std(k) < 1.2 * np.sqrt(2 / 150)),
    ],
)
def test_kernel_initializer(initializer, check):
    model = models.build("lenet5", kernel_initializer=initializer)
    assert check(model.get_layer("conv2").kernel.numpy())  # fan-in 5*5*6 = 150


def test_batch_norm_inference_uses_moving_statistics():
    model = models.build("vgg11", batch_norm=True, input_shape=(32, 32, 3), classes=3, dropout=0)
    assert "block1_conv1_bn" in [l.name for l in model.layers]
    images = np.random.default_rng(3).normal(size=(4, 32, 32, 3)).astype("float32")
    alone = model(images[:1], training=False).numpy()
    in_batch = model(images, training=False).numpy()[:1]
    np.testing.assert_allclose(alone, in_batch, rtol=1e-4, atol=1e-6)
    # Training mode normalizes with the batch's own statistics instead.
    assert not np.allclose(model(images[:2], training=True).numpy()[:1], model(images, training=True).numpy()[:1])


def test_googlenet_auxiliary_classifiers_train_and_drop_for_inference():
    model = models.build("googlenet", aux_classifiers=True, input_shape=(64, 64, 3), classes=6)
    assert [o.shape for o in model.outputs] == [(None, 6)] * 3
    assert googlenet.aux_loss_weights(model) == [1.0, 0.3, 0.3]
    served = googlenet.inference_model(model)
    images = np.random.default_rng(4).uniform(size=(2, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(served.predict(images, verbose=0), model.predict(images, verbose=0)[0], atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"classes": 0}, "classes must be a positive integer, received 0"),
        ({"classes": -3}, "received -3"),
        ({"pooling": "sum"}, "pooling must be None, 'avg' or 'max', received 'sum'"),
        ({"input_shape": (64, 64)}, r"input_shape must be \(height, width, channels\)"),
        ({"input_shape": (64, "x", 3)}, "received \\(64, 'x', 3\\)"),
        ({"activation": "swishy"}, "Unknown activation 'swishy'"),
        ({"kernel_initializer": "ones"}, "Unknown kernel_initializer 'ones'"),
        ({"l2": -1}, "l2 must be a number >= 0, received -1"),
        ({"dropout": 1.5}, r"dropout must be in \[0, 1\), received 1.5"),
        ({"max_norm": 0}, "max_norm must be > 0"),
        ({"weights": "/no/such/file.weights.h5"}, "existing weights file, received '/no/such/file.weights.h5'"),
        ({"weights": "imagenet"}, "No ImageNet weights are published for resnet18"),
        ({"input_shape": (None, None, 3)}, "fixed height and width"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        models.build("resnet18", **kwargs)


def test_imagenet_needs_1000_classes_with_top():
    with pytest.raises(ValueError, match="classes=1000, received classes=10"):
        models.build("vgg16", weights="imagenet", classes=10)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="Unknown model 'resnet999'. Known models: .*resnet50"):
        models.build("resnet999")
