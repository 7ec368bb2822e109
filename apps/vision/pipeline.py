"""The tf.data input pipeline: from an `ImageDataset` split to model batches.

`batches` turns unbatched `(uint8 image, label)` elements into batches of
float32 images of one size and channel count. It leaves pixels at 0..255:
scaling and normalization live inside the model, so a saved model takes raw
pixels.
"""

import numbers

import tensorflow as tf

from dlsuite.apps.core import epochs
from dlsuite.apps.core.errors import UsageError

# Largest shuffle buffer: beyond it the buffer costs memory and start-up time
# for little extra randomness.
MAX_SHUFFLE_BUFFER = 10_000


def _match_channels_before_resize(image, channels):
    # RGB -> gray first: resizing one channel is cheaper than three.
    if image.shape[-1] == 3 and channels == 1:
        return tf.image.rgb_to_grayscale(image)
    return image


def _match_channels_after_resize(image, channels):
    # Gray -> RGB last, for the same reason.
    if image.shape[-1] == 1 and channels == 3:
        return tf.tile(image, [1, 1, 3])
    return image


def _preparer(image_size, channels):
    """Returns the map function: (image, label) -> (float32 image at image_size, int32 label)."""
    height, width = image_size

    def prepare(image, label):
        source_channels = image.shape[-1]
        if source_channels not in (1, 3):
            raise ValueError(
                f"Images must have a known channel count of 1 or 3, received shape {image.shape}."
            )
        image = _match_channels_before_resize(image, channels)
        if tuple(image.shape[:2]) == (height, width):
            image = tf.cast(image, tf.float32)
        else:
            # Bilinear keeps values inside the input range, so pixels stay 0..255.
            image = tf.image.resize(image, (height, width), method="bilinear")
        image = _match_channels_after_resize(image, channels)
        return image, tf.cast(label, tf.int32)

    return prepare


def _shuffle_buffer(dataset):
    size = int(dataset.cardinality())
    if size < 0:  # unknown or infinite
        return MAX_SHUFFLE_BUFFER
    return max(1, min(size, MAX_SHUFFLE_BUFFER))


def batches(dataset, *, image_size, channels, batch_size, training, seed=0, cache=True):
    """Batches an unbatched (image, label) dataset for training or evaluation.

    Resizes every image to `image_size` (bilinear; skipped when it already is
    that size), matches `channels` (gray tiled to RGB, RGB to luminance),
    caches the result, then shuffles (training only), batches and prefetches.

    Args:
        dataset: unbatched (image, label) with uint8 (H, W, 1 or 3) images,
            e.g. `ImageDataset.train`.
        image_size: (height, width) of the output images.
        channels: 1 or 3, the channels the model takes.
        batch_size: images per batch; the last batch may be smaller.
        training: shuffle with `seed`, in a new order every epoch; otherwise
            keep the dataset's order.
        seed: shuffle seed.
        cache: keep the resized images in memory after the first pass.

    Returns:
        A dataset of (images float32 (B, H, W, channels) with values 0..255,
        labels int32 (B,)).

    Raises:
        UsageError: a non-positive size or batch size, or channels not 1 or 3.
    """
    examples = _prepared(dataset, image_size=image_size, channels=channels, batch_size=batch_size, cache=cache)
    if training:
        return _order(examples, batch_size=batch_size, seed=seed).dataset()
    return _batched(examples, batch_size)


def epoch_order(dataset, *, image_size, channels, batch_size, seed=0, cache=True):
    """The training batches of `batches(training=True)` as an `epochs.EpochOrder`:
    each epoch's order a function of (seed, epoch), so a resumed run goes on
    with the batches the interrupted one would have seen."""
    examples = _prepared(dataset, image_size=image_size, channels=channels, batch_size=batch_size, cache=cache)
    return _order(examples, batch_size=batch_size, seed=seed)


def _prepared(dataset, *, image_size, channels, batch_size, cache):
    """Checks the arguments; the resized, channel-matched and (with `cache`) cached examples."""
    if len(image_size) != 2 or any(not isinstance(d, numbers.Integral) or d < 1 for d in image_size):
        raise UsageError(f"image_size={image_size!r} must be two positive integers (height, width).")
    if channels not in (1, 3):
        raise UsageError(f"channels={channels!r} must be 1 (grayscale) or 3 (RGB).")
    if not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise UsageError(f"batch_size={batch_size!r} must be a positive integer.")

    dataset = dataset.map(_preparer(tuple(int(d) for d in image_size), channels),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if cache:
        # After the deterministic work, before the shuffle: epochs 2+ skip
        # decoding and resizing but still see a new order.
        dataset = dataset.cache()
    return dataset


def _order(examples, *, batch_size, seed):
    return epochs.EpochOrder(examples, buffer=_shuffle_buffer(examples), seed=seed,
                             finish=lambda shuffled: _batched(shuffled, batch_size))


def _batched(dataset, batch_size):
    dataset = dataset.batch(int(batch_size), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.prefetch(tf.data.AUTOTUNE)


def count(dataset):
    """Returns the number of elements when tf.data knows it without reading, else None."""
    size = int(dataset.cardinality())
    return None if size < 0 else size
