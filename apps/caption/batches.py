"""Training batches: every (image, reference) pair, its image row gathered from the feature cache."""

import numpy as np


def caption_pairs(captions, vocabulary, *, max_length):
    """Every (image, reference) pair of a split: image indices and teacher-forcing ids.

    Returns:
        (image_index int32 (P,), inputs, targets int32 (P, max_length + 1), truncated count).
    """
    image_index = np.array([i for i, references in enumerate(captions) for _ in references], np.int32)
    flat = [reference for references in captions for reference in references]
    inputs, targets, truncated = vocabulary.encode(flat, max_length=max_length)
    return image_index, inputs, targets, truncated


def caption_batches(cache, pairs, *, batch_size, shuffle, seed=0):
    """((features or pixels, inputs), targets) batches of the pairs, rows gathered from `cache`.

    The pair list (a few ints each) is shuffled whole every epoch; the image
    rows are read from the memory-mapped cache per batch, so a cache larger
    than memory still trains.
    """
    pair_rows, finish = _caption_pipeline(cache, pairs, batch_size=batch_size)
    if shuffle:
        return finish(pair_rows.shuffle(len(pairs[0]), seed=seed, reshuffle_each_iteration=True))
    return finish(pair_rows)


def caption_order(cache, pairs, *, batch_size, seed=0):
    """The shuffled training batches of `caption_batches` as an
    `epochs.EpochOrder`: each epoch's order a function of (seed, epoch), so a
    resumed run sees what the interrupted one would have."""
    from dlsuite.apps.core import epochs

    pair_rows, finish = _caption_pipeline(cache, pairs, batch_size=batch_size)
    return epochs.EpochOrder(pair_rows, buffer=len(pairs[0]), seed=seed, finish=finish)


def _caption_pipeline(cache, pairs, *, batch_size):
    """(the unbatched (image index, inputs, targets) rows, the function that
    batches them and gathers their image rows from `cache`)."""
    import tensorflow as tf

    image_index, inputs, targets, _ = pairs
    dtype = tf.float32 if cache.dtype == np.float32 else tf.uint8
    row_shape = cache.shape[1:]

    def rows(indices):
        return np.ascontiguousarray(cache[indices])

    def gather(index, inputs, targets):
        values = tf.numpy_function(rows, [index], dtype, stateful=False)
        values = tf.cast(tf.ensure_shape(values, (None, *row_shape)), tf.float32)
        return (values, inputs), targets

    def finish(dataset):
        dataset = dataset.batch(batch_size).map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return dataset.prefetch(tf.data.AUTOTUNE)

    return tf.data.Dataset.from_tensor_slices((image_index, inputs, targets)), finish
