"""The tf.data input pipeline: from an image split to model batches.

`batches` and `epoch_order` turn a split into batches of float32 images of
one size and channel count, pixels left at 0..255: scaling and normalization
live inside the model, so a saved model takes raw pixels.

A split is a `sources.Source` (image files, arrays, packed shards, TFDS):
memory stays bounded whatever its size. Training shuffles indices, or
encoded records through a buffer bounded in bytes, never decoded pixels;
decoded images are kept between epochs only in an `image_cache.Cache`
(uint8, in memory or in a local file) when the run's plan chose one.
A plain tf.data dataset of (uint8 image, label) is taken too (caption's
images, files given on the command line): it is decoded in order and, with
`cache`, kept in memory as uint8.
"""

import numbers

import tensorflow as tf

from dlsuite.apps.core import epochs
from dlsuite.apps.core.errors import UsageError
from dlsuite.apps.vision import sources

# Functions handed to tf.data here are plain TensorFlow ops: not for AutoGraph (see sources).
_plain = tf.autograph.experimental.do_not_convert

# Largest shuffle buffer of a plain dataset's examples.
MAX_SHUFFLE_BUFFER = 10_000


def batches(split, *, image_size, channels, batch_size, training, seed=0, cache=True):
    """Batches a split for training (`training`: shuffled with `seed`, a new
    order each iteration) or evaluation (in order).

    Args:
        split: a `sources.Source`, or an unbatched (uint8 image, label) dataset.
        image_size: (height, width) of the output images.
        channels: 1 or 3, the channels the model takes.
        batch_size: images per batch; the last batch may be smaller.
        training: shuffle with `seed`, in a new order every epoch.
        seed: shuffle seed.
        cache: for a Source, an `image_cache.Cache` of it or None; for a
            dataset, keep the resized images in memory (uint8) after the first pass.

    Returns:
        A dataset of (images float32 (B, H, W, C) with values 0..255, labels int32 (B,)).

    Raises:
        UsageError: a non-positive size or batch size, or channels not 1 or 3.
    """
    _check(image_size, channels, batch_size)
    if training:
        return epoch_order(split, image_size=image_size, channels=channels, batch_size=batch_size, seed=seed,
                           cache=cache).dataset()
    if not isinstance(split, sources.Source):
        return _batched(_prepared_dataset(split, image_size, channels, cache), batch_size)
    read = _reader(split, image_size, channels, batch_size, cache)
    if _cached(cache):
        # The cache knows which images are readable: with the count, Keras does not warn
        # "Your input ran out of data" at the end of the first validation pass.
        steps = -(-int(cache.readable.sum()) // int(batch_size))
        return read(split.in_order()).apply(tf.data.experimental.assert_cardinality(steps)).prefetch(tf.data.AUTOTUNE)
    return read(split.in_order()).prefetch(tf.data.AUTOTUNE) if split.random_access else read(None)


def epoch_order(split, *, image_size, channels, batch_size, seed=0, cache=True, service=None, in_process=True):
    """The training batches of `batches(training=True)` as an `epochs.EpochOrder`:
    each epoch's order a function of (seed, epoch), so a resumed run goes on
    with the batches the interrupted one would have seen. With `service`
    (a tf.data service dispatcher's address, `core.data_service`), its
    workers read and decode each epoch's examples, in their own order.
    `in_process`: False when the pipeline runs in other processes (a
    parameter-server cluster's workers): files that fail are then named on
    those processes' stderr only."""
    _check(image_size, channels, batch_size)
    if not isinstance(split, sources.Source):
        examples = _prepared_dataset(split, image_size, channels, cache)
        size = int(examples.cardinality())
        buffer = MAX_SHUFFLE_BUFFER if size < 0 else max(1, min(size, MAX_SHUFFLE_BUFFER))
        return epochs.EpochOrder(examples, buffer=buffer, seed=seed, finish=lambda shuffled: _batched(shuffled, batch_size))
    read = _reader(split, image_size, channels, batch_size, cache, service=service, in_process=in_process)
    if split.random_access or _cached(cache):
        return epochs.IndexOrder(split.count, seed=seed, batch_size=batch_size, read=read)
    def worker_share(worker, workers, batch_size):
        share = split.worker_share(worker, workers) if split.worker_share else None
        return None if share is None else epoch_order(share, image_size=image_size, channels=channels, batch_size=batch_size,
                                                      seed=seed, cache=None, service=service, in_process=in_process)

    # Encoded records, shuffled before they are decoded.
    return epochs.EpochOrder(split.records(), buffer=split.shuffle_buffer(), seed=seed, batch_size=int(batch_size),
                             finish=read, worker_share=worker_share if split.worker_share else None)


def _cached(cache):
    return cache is not None and not isinstance(cache, bool)


def _reader(split, image_size, channels, batch_size, cache, *, service=None, in_process=True):
    """The function from an epoch's (position, index) pairs (or, for a
    sequential source, its shuffled records) to float32 batches."""
    size = tuple(int(d) for d in image_size)
    batch_size = int(batch_size)
    if _cached(cache):
        labels = tf.constant(split.labels, tf.int32)
        readable = tf.constant(cache.readable)

        @_plain
        def is_readable(position, index):
            return tf.gather(readable, index)

        @_plain
        def index_of(position, index):
            return index

        @_plain
        def gathered(indices):
            return _floats(cache.gather(indices)), tf.gather(labels, indices)

        def from_cache(order):
            indices = order.filter(is_readable).map(index_of)
            return indices.batch(batch_size).map(gathered, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

        return from_cache
    # Streamed: the cache's values as floats, no cast to uint8 and back; the
    # tf.data service's workers send uint8, a quarter of the bytes.
    prepare = sources.prepared(size, channels, tf.uint8 if service else tf.float32)
    if split.random_access:
        def from_source(order):
            if service is None:
                return split.read_batches(order, prepare, batch_size, record=in_process).map(
                    _float_batch_of, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            # The service's workers read the files: failures are named in their processes.
            examples = split.read(order, prepare, record=False).map(_without_index)
            return _batched(_served(examples, service), batch_size, prefetch=False)

        return from_source

    def from_records(records):
        records = split.records() if records is None else records
        return _batched(_served(split.decode(records, prepare), service), batch_size, prefetch=False)

    return from_records


def _served(examples, service):
    """`examples`, made by the tf.data service's workers when there is one."""
    if service is None:
        return examples
    from dlsuite.apps.core import data_service

    return data_service.distribute(examples, service)


@_plain
def _without_index(image, label, index):
    return image, label


def _floats(images):
    return tf.cast(images, tf.float32)


def _batched(examples, batch_size, *, prefetch=True):
    batched = examples.batch(int(batch_size), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    batched = batched.map(_float_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return batched.prefetch(tf.data.AUTOTUNE) if prefetch else batched


@_plain
def _float_batch(images, labels):
    return _floats(images), tf.cast(labels, tf.int32)


@_plain
def _float_batch_of(images, labels, indices):
    return _float_batch(images, labels)


def _prepared_dataset(dataset, image_size, channels, cache):
    prepare = sources.prepared(tuple(int(d) for d in image_size), channels)

    @_plain
    def prepared_example(image, label):
        return prepare(image), tf.cast(label, tf.int32)

    examples = dataset.map(prepared_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    # After the deterministic work, before any shuffle: uint8, a quarter of float32.
    return examples.cache() if cache else examples


def _check(image_size, channels, batch_size):
    if len(image_size) != 2 or any(not isinstance(d, numbers.Integral) or d < 1 for d in image_size):
        raise UsageError(f"image_size={image_size!r} must be two positive integers (height, width).")
    if channels not in (1, 3):
        raise UsageError(f"channels={channels!r} must be 1 (grayscale) or 3 (RGB).")
    if not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise UsageError(f"batch_size={batch_size!r} must be a positive integer.")


def count(dataset):
    """Returns the number of elements when tf.data knows it without reading, else None."""
    size = int(dataset.cardinality())
    return None if size < 0 else size
