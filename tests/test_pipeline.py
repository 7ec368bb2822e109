"""The tf.data pipeline: shapes, dtypes, channels, resizing, order and shuffling."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from dlsuite.apps.vision import datasets, pipeline
from dlsuite.apps.core.errors import UsageError


def _toy(images, labels=None):
    images = np.asarray(images, dtype=np.uint8)
    labels = np.arange(len(images)) if labels is None else labels
    return tf.data.Dataset.from_tensor_slices((images, np.asarray(labels, dtype=np.int64)))


def _collect(batched):
    images, labels = zip(*((x.numpy(), y.numpy()) for x, y in batched))
    return np.concatenate(images), np.concatenate(labels)


@pytest.fixture(scope="module")
def digits():
    return datasets.load("digits")


def test_digits_batches_for_lenet(digits):
    batched = pipeline.batches(digits.train, image_size=(32, 32), channels=1, batch_size=100, training=True)
    assert batched.element_spec == (
        tf.TensorSpec((None, 32, 32, 1), tf.float32), tf.TensorSpec((None,), tf.int32))
    images, labels = _collect(batched)
    assert images.shape == (digits.sizes["train"], 32, 32, 1)
    assert images.min() == 0.0 and images.max() <= 255.0 and images.max() > 250.0
    assert sorted(np.unique(labels)) == list(range(10))


@pytest.mark.parametrize(
    "source_channels, channels",
    [(1, 1), (1, 3), (3, 1), (3, 3)],
)
def test_channels_are_adapted(source_channels, channels):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 6, 7, source_channels))
    batched = pipeline.batches(_toy(images), image_size=(6, 7), channels=channels, batch_size=2,
                               training=False)
    out, _ = _collect(batched)
    assert out.shape == (5, 6, 7, channels) and out.dtype == np.float32
    if source_channels == channels:  # same size and channels: the pixels pass through untouched
        np.testing.assert_array_equal(out, images)
    elif channels == 3:
        for c in range(3):
            np.testing.assert_array_equal(out[..., c], images[..., 0])
    else:
        np.testing.assert_array_equal(out, tf.image.rgb_to_grayscale(images.astype(np.uint8)).numpy())


def test_images_of_any_size_are_resized_bilinearly_within_0_255(tmp_path):
    for name, size in (("a", (9, 17)), ("a", (40, 30)), ("b", (5, 5)), ("b", (64, 3))):
        path = tmp_path / "data" / name / f"{size[0]}x{size[1]}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full(size + (3,), 255, np.uint8)).save(path)
    data = datasets.load(str(tmp_path / "data"), validation_fraction=0.25, test_fraction=0.25)
    for split in (data.train, data.validation, data.test):
        images, _ = _collect(pipeline.batches(split, image_size=(16, 12), channels=3, batch_size=4,
                                              training=False))
        assert images.shape[1:] == (16, 12, 3)
        np.testing.assert_allclose(images, 255.0, atol=1e-3)  # a flat image stays flat

    ramp = np.tile(np.arange(0, 256, 32, dtype=np.uint8), (8, 1))[None, ..., None]
    out, _ = _collect(pipeline.batches(_toy(ramp), image_size=(8, 16), channels=1, batch_size=1,
                                       training=False))
    expected = tf.image.resize(ramp.astype(np.float32), (8, 16), method="bilinear").numpy()
    np.testing.assert_allclose(out, expected)


def test_evaluation_keeps_order_and_partial_last_batch(digits):
    batched = pipeline.batches(digits.test, image_size=(8, 8), channels=1, batch_size=64, training=False)
    sizes = [len(labels) for _, labels in batched]
    assert sizes[:-1] == [64] * (len(sizes) - 1) and sum(sizes) == digits.sizes["test"]
    _, first = _collect(batched)
    _, second = _collect(batched)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, [int(label) for _, label in digits.test])


def test_training_shuffles_by_seed_and_reshuffles_every_epoch():
    data = _toy(np.zeros((200, 4, 4, 1)))

    def epochs(seed, cache):
        batched = pipeline.batches(data, image_size=(4, 4), channels=1, batch_size=50, training=True,
                                   seed=seed, cache=cache)
        return [_collect(batched)[1] for _ in range(2)]

    first, second = epochs(seed=7, cache=True)
    assert sorted(first) == list(range(200)) and sorted(second) == list(range(200))
    assert not np.array_equal(first, np.arange(200))
    assert not np.array_equal(first, second)
    again = epochs(seed=7, cache=False)
    np.testing.assert_array_equal(again[0], first)
    np.testing.assert_array_equal(again[1], second)
    assert not np.array_equal(epochs(seed=8, cache=True)[0], first)


def test_count_reads_the_cardinality(digits):
    assert pipeline.count(digits.validation) == digits.sizes["validation"]
    assert pipeline.count(digits.train.filter(lambda image, label: label > 0)) is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_size": (0, 32)}, r"image_size=\(0, 32\) must be two positive integers"),
        ({"image_size": (32,)}, r"image_size=\(32,\) must be two positive integers"),
        ({"channels": 2}, r"channels=2 must be 1 \(grayscale\) or 3 \(RGB\)"),
        ({"batch_size": 0}, r"batch_size=0 must be a positive integer"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    arguments = {"image_size": (8, 8), "channels": 1, "batch_size": 4, "training": False, **kwargs}
    with pytest.raises(UsageError, match=message):
        pipeline.batches(_toy(np.zeros((2, 8, 8, 1))), **arguments)
