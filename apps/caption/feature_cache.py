"""Each split's images run once, through the frozen encoder or just resized, kept in a memory-mapped .npy."""

import os
import sys

import numpy as np


def cache_split(split, *, path, image_size, channels, batch_size, encoder=None, label="images"):
    """Runs the images of `split` once and keeps the result in a .npy file (memory-mapped).

    With a frozen `encoder` the file holds its feature maps (float32), so
    decoder epochs read features instead of re-running the CNN; with
    `encoder=None` (end-to-end training) it holds the resized pixels (uint8),
    so epochs skip decoding and resizing. Written to a temporary name and
    renamed, so a half-written cache is never read.

    Returns:
        The array, memory-mapped read-only: (N, h, w, c) features or (N, H, W, C) pixels.
    """
    import keras

    from dlsuite.apps.vision import pipeline

    count = len(split)
    if encoder is not None:
        shape, dtype = tuple(int(d) for d in encoder.output.shape[1:]), np.float32
    else:
        shape, dtype = (*image_size, channels), np.uint8
    batches = pipeline.batches(split.images.map(lambda image: (image, 0)), image_size=image_size, channels=channels,
                               batch_size=batch_size, training=False, cache=False)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = path + ".tmp.npy"
    array = np.lib.format.open_memmap(temporary, mode="w+", dtype=dtype, shape=(count, *shape))
    progress = keras.utils.Progbar(count, unit_name="image", verbose=1 if sys.stdout.isatty() else 2)
    position = 0
    try:
        for images, _ in batches:
            values = encoder(images, training=False) if encoder is not None else images
            values = np.asarray(values)
            array[position:position + len(values)] = values.astype(dtype) if encoder is not None else np.round(values)
            position += len(values)
            progress.update(position)
        if position != count:
            raise RuntimeError(f"{label}: the pipeline gave {position} images for {count} captioned ones")
        array.flush()
        del array
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return np.load(path, mmap_mode="r")
