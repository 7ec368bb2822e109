"""Where the examples of an image split come from, and how one is read.

A split is a `Source`: a known count of examples, their labels, and a way to
read them. Image files and arrays in memory are read by index, so an epoch
shuffles indices (8 bytes an example) and reads what it needs, in any order
(#25: the pixel shuffle buffer and the float32 cache held 1 MB an image).
Packed shards and TensorFlow Datasets are read in sequence: an epoch
shuffles their encoded records through a buffer bounded in bytes, and
decodes after the shuffle.

Every source reads to the same elements: a uint8 image at the size and
channel count the model takes, and an int32 label. Rounding the resized
pixels to uint8 here is what lets a cached epoch (uint8, 4x smaller than
float32) equal a streamed one batch for batch.
"""

import dataclasses
import hashlib
import os
import sys

import numpy as np
import tensorflow as tf

# Every function this module hands to tf.data is written in TensorFlow ops
# (tf.cond, not `if` on a tensor): converting them with AutoGraph would add
# nothing and costs about 1.4 s before a pipeline's first batch.
_plain = tf.autograph.experimental.do_not_convert

# The most bytes of encoded records a sequential source's shuffle buffer holds.
RECORD_BUFFER_BYTES = 256 * 2**20
MAX_RECORD_BUFFER = 10_000


def prepared(image_size, channels, dtype=tf.uint8):
    """(uint8 image of any size and 1 or 3 channels) -> image at `image_size`
    with `channels`, as `dtype`: uint8 (what a cache stores), or float32
    holding the same whole numbers (what a streamed epoch batches: no cast
    to uint8 and back, a tenth of a streamed image's CPU at 224x224)."""
    height, width = image_size

    def prepare(image):
        if image.shape[-1] not in (1, 3):
            raise ValueError(f"Images must have a known channel count of 1 or 3, received shape {image.shape}.")
        # RGB -> gray before the resize, gray -> RGB after: resize one channel, not three.
        if image.shape[-1] == 3 and channels == 1:
            image = tf.image.rgb_to_grayscale(image)
        if tuple(image.shape[:2]) != (height, width):
            # Rounded half up, as the cache stores it. Bilinear weights are
            # convex, so the result is within 0..255 up to float error:
            # adding 0.5 then truncating (the cast, or floor) rounds it
            # (tf.round and a clip took a sixth of a streamed image's CPU, #25).
            resized = tf.image.resize(image, (height, width), method="bilinear") + 0.5
            image = tf.cast(resized, tf.uint8) if dtype == tf.uint8 else tf.floor(resized)
        else:
            image = tf.cast(tf.ensure_shape(image, (height, width, image.shape[-1])), dtype)
        if image.shape[-1] == 1 and channels == 3:
            image = tf.tile(image, [1, 1, 3])
        return image

    return prepare


def decode_file(channels, image_shape=None):
    """(encoded image bytes) -> uint8 (H, W, channels); PNG, JPEG, BMP and GIF (first frame)."""

    def decode(data):
        # BMP and GIF decode only to 3 channels; for a grayscale dataset go
        # through RGB, which round-trips gray pixels exactly.
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        if channels == 1:
            image = tf.image.rgb_to_grayscale(image)
        return tf.ensure_shape(image, image_shape or (None, None, channels))

    return decode


@dataclasses.dataclass
class Source:
    """One split's examples.

    Attributes:
        count: examples in the split.
        labels: int32 (count,), label of each index.
        channels: the channels the images decode to (1 or 3).
        image_shape: native (H, W, C) when every image shares it, else None.
        identity: names what the split holds (files, sizes and times, or the
            dataset's name and split): the key of a disk cache.
    """

    count: int
    labels: np.ndarray
    channels: int
    image_shape: tuple | None
    identity: str

    random_access = True

    def cache_key(self):
        """What names a disk cache of this split: `identity`, and for files their sizes and times."""
        return self.identity

    def native(self, index):
        """index (int64 scalar tensor) -> uint8 image at its own size."""
        raise NotImplementedError

    def subset(self, indices):
        """The split of the examples at `indices` (in that order)."""
        raise NotImplementedError

    def read(self, order, prepare, *, record=True):
        """(position, index) pairs, positions consecutive up to `count` - 1 ->
        (prepared image, label, index), in position order; an example that
        cannot be read is left out (and with `record`, its name kept in this process)."""
        labels = tf.constant(self.labels, tf.int32)

        @_plain
        def load(position, index):
            return prepare(self.native(index)), tf.gather(labels, index), index

        return order.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def read_batches(self, order, prepare, batch_size, *, record=True):
        """`read` in batches of `batch_size`: (images (B, H, W, C) as `prepare` makes them, labels (B,), indices (B,))."""
        return self.read(order, prepare, record=record).batch(int(batch_size), num_parallel_calls=tf.data.AUTOTUNE,
                                                             deterministic=True)

    def in_order(self):
        """(position, index) of every example in index order."""
        return tf.data.Dataset.range(self.count).map(_twice)

    def dataset(self):
        """Unbatched (uint8 image at its own size, int32 label) in index order."""
        return self.read(self.in_order(), _unchanged).map(_image_and_label)


@dataclasses.dataclass
class ArraySource(Source):
    """Images held in memory: (count, H, W, C) uint8 (digits, generated shapes)."""

    images: np.ndarray = None

    def native(self, index):
        return tf.gather(self._images, index)

    @property
    def _images(self):
        return _constant(self, self.images)

    def cache_key(self):
        # The pixels themselves: held in memory already, and a split depends on more than its name.
        return f"{self.identity}:{_digest(self.images)}:{_digest(self.labels)}"

    def subset(self, indices):
        indices = np.asarray(indices, dtype=np.int64)
        return dataclasses.replace(self, count=len(indices), labels=self.labels[indices], images=self.images[indices])


@dataclasses.dataclass
class FileSource(Source):
    """Image files, decoded when read. A file that fails then (damaged after
    the check, or in a way only a full decode finds) is left out, named on
    stderr and kept in `failures`; a full epoch keeps its batch count
    (`epochs.IndexOrder`)."""

    paths: np.ndarray = None
    failures: set = dataclasses.field(default_factory=set)

    def native(self, index):
        return decode_file(self.channels, self.image_shape)(tf.io.read_file(tf.gather(self._paths, index)))

    def cache_key(self):
        # Made only for a disk cache: a stat of every file is seconds at a million files.
        digest = hashlib.sha1()
        for path in self.paths:
            try:
                stat = os.stat(path)
                digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
            except OSError:
                digest.update(f"{path}\0missing\n".encode("utf-8", "surrogateescape"))
        return f"{self.identity}:{digest.hexdigest()}"

    @property
    def _paths(self):
        return _constant(self, self.paths)

    def subset(self, indices):
        indices = np.asarray(indices, dtype=np.int64)
        return dataclasses.replace(self, count=len(indices), labels=self.labels[indices], paths=self.paths[indices],
                                   failures=self.failures)

    def read(self, order, prepare, *, record=True):
        return self.read_batches(order, prepare, 1, record=record).unbatch()

    def read_batches(self, order, prepare, batch_size, *, record=True):
        # A gap in a batch's positions is a file that failed, named then (per
        # batch: a check per image took a sixth of a streamed image's CPU).
        # An end marker at position `count` is batched with the images to
        # close the gap of failures at the very end: it rides in the last
        # batch, or in one of its own within the epoch's count of batches
        # (a failure left room for it), so a reader that stops at that count
        # (`epochs.fixed_steps`) still has every failure named.
        labels = tf.constant(self.labels, tf.int32)

        @_plain
        def load(position, index):
            return position, prepare(self.native(index)), tf.gather(labels, index), index

        loaded = order.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
        end = tf.data.Dataset.from_tensors(tuple(
            tf.fill([1 if d is None else d for d in spec.shape], tf.constant(self.count, spec.dtype)) if i == 0
            else tf.zeros([1 if d is None else d for d in spec.shape], spec.dtype)
            for i, spec in enumerate(loaded.element_spec)))
        batched = loaded.concatenate(end).batch(int(batch_size), num_parallel_calls=tf.data.AUTOTUNE,
                                                deterministic=True)
        first = order.take(1).reduce(tf.constant(self.count, tf.int64), _first_position)

        @_plain
        def check(expected, batch):
            positions = batch[0]
            gaps = positions[-1] + 1 - expected - tf.size(positions, tf.int64)
            tf.cond(gaps > 0, lambda: self._name_failures(order, first, expected, positions, record=record),
                    lambda: tf.constant(0, tf.int64))
            return positions[-1] + 1, batch

        @_plain
        def without_end(positions, images, labels, indices):
            # A slice of the whole batch is no copy (StridedSlice's identity case).
            kept = tf.size(positions) - tf.cast(positions[-1] >= self.count, tf.int32)
            return images[:kept], labels[:kept], indices[:kept]

        @_plain
        def not_empty(images, labels, indices):
            return tf.size(indices) > 0

        return batched.scan(first, check).map(without_end).filter(not_empty)

    def _name_failures(self, order, first, expected, positions, *, record):
        """Names the files at the positions from `expected` to the last of
        `positions` that are not in `positions`; `first`: `order`'s first position."""
        paths = self._paths
        span = tf.range(expected, positions[-1] + 1)
        missing = tf.boolean_mask(span, tf.reduce_all(span[:, None] != positions[None, :], axis=1))

        @_plain
        def at(position):
            return order.skip(position - first).take(1)

        @_plain
        def report(total, pair):
            path = tf.gather(paths, pair[1])
            tf.print("dlsuite: skipped", path, "(it could not be read or decoded when the epoch reached it)",
                     output_stream=sys.stderr)
            if record:
                tf.numpy_function(self._record, [path], [], stateful=True)
            return total + 1

        return tf.data.Dataset.from_tensor_slices(missing).flat_map(at).reduce(tf.constant(0, tf.int64), report)

    def _record(self, path):
        self.failures.add(path.decode("utf-8", "surrogateescape"))
        return []


@_plain
def _without_position(data, label, position):
    return data, label


@_plain
def _twice(index):
    return index, index


@_plain
def _unchanged(image):
    return image


@_plain
def _image_and_label(image, label, index):
    return image, label


@_plain
def _first_position(_, pair):
    return pair[0]


def _constant(source, array):
    """`array` as one eager tensor per source, made outside any function
    being traced, so every pipeline of the source captures the same one."""
    if "_tensor" not in source.__dict__:
        with tf.init_scope():
            source.__dict__["_tensor"] = tf.constant(array)
    return source.__dict__["_tensor"]


def _digest(array):
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


@dataclasses.dataclass
class RecordSource(Source):
    """Encoded images read in sequence: packed shards or a TensorFlow Datasets split.

    Attributes:
        make_records: () -> dataset of (encoded image bytes, int32 label, int64 position), in
            sequence; the position is the example's index in the split (what a cache holds it at).
        record_bytes: the mean size of an encoded record, for the shuffle buffer.
        worker_share: (worker, workers) -> the RecordSource of the examples in
            that worker's own files, or None when the files cannot be divided
            among the workers; None for a source that is not in files.
        files: the files the records are read from, when there are files.
    """

    make_records: object = None
    record_bytes: int = 100_000
    worker_share: object = None
    files: tuple = ()

    random_access = False

    def records(self):
        """(encoded, label) in sequence."""
        return self.make_records().map(_without_position)

    def shuffle_buffer(self):
        """Records an epoch shuffles through: the whole split when it fits
        RECORD_BUFFER_BYTES of encoded bytes, else what does."""
        return max(1, min(self.count, MAX_RECORD_BUFFER, RECORD_BUFFER_BYTES // max(1, self.record_bytes)))

    def decode(self, records, prepare):
        """(encoded, label) records -> (prepared uint8 image, label); a record that does not decode is left out."""
        decode = self._decoder()
        @_plain
        def decoded(data, label):
            return prepare(decode(data)), label

        return records.map(decoded, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors(log_warning=True)

    def read(self, order, prepare, *, record=True):
        # In sequence only: `order` must be `in_order()`.
        decode = self._decoder()
        @_plain
        def decoded(data, label, position):
            return prepare(decode(data)), label, position

        return self.make_records().map(decoded, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors(log_warning=True)

    def _decoder(self):
        decode = decode_file(self.channels, self.image_shape)

        def decode_record(data):
            # A source that hands over decoded pixels (TFDS's mock data does) needs no decoding.
            return decode(data) if data.dtype == tf.string else data

        return decode_record

    def dataset(self):
        decode = self._decoder()
        @_plain
        def decoded(data, label):
            return decode(data), label

        return self.records().map(decoded, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def subset(self, indices):
        raise NotImplementedError("a sequential source is split when it is made (shards: by index mask)")
