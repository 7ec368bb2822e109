"""Training batches whose order is a function of (seed, epoch) alone.

`dataset.shuffle(reshuffle_each_iteration=True)` draws each epoch's order
from a generator inside the process, so a run resumed in a fresh process
saw epoch 1's order again (#15: every resumed run ended with other weights).
Here epoch e is shuffled with its own seed, so the batches at (epoch, step)
are the same in any process, and a resumed run's position is two numbers,
not a saved iterator: saving a `tf.data` iterator saves its shuffle buffer
and in-memory cache, gigabytes for an image split.
"""

import tensorflow as tf

# Keeps the epochs' seeds apart from the run's other seeds (seed, seed + 1, ...).
_EPOCH_STRIDE = 1_000_003


class EpochOrder:
    """The training split as epochs in a fixed order.

    Args:
        elements: the unbatched, unshuffled examples (cache them before: every
            epoch reads them again).
        buffer: the shuffle buffer, in examples.
        seed: the run's seed.
        finish: dataset -> dataset, what follows the shuffle (batching and
            per-batch work); it must keep the number of batches fixed.
        batch_size: the examples `finish` puts in a batch, when a resumed
            epoch should skip examples before `finish` (encoded records,
            not decoded images); None skips finished batches.
        worker_share: (worker, workers, batch_size) -> the EpochOrder of
            that worker's own part of the data (its own files) in batches of
            `batch_size`, or None where the data cannot be divided; None
            when no part of the data is any worker's own.
    """

    worker_share = None  # IndexOrder's data is in memory or read by index: no worker's own

    def __init__(self, elements, *, buffer, seed, finish, batch_size=None, worker_share=None):
        self.elements = elements
        self.buffer = int(buffer)
        self.seed = int(seed)
        self.finish = finish
        self.batch_size = batch_size
        self.worker_share = worker_share

    def epoch(self, epoch, skip_batches=0):
        """The batches of `epoch` (0-based), without its first `skip_batches`."""
        shuffled = self.elements.shuffle(self.buffer, seed=epoch_seed(self.seed, epoch), reshuffle_each_iteration=False)
        if self.batch_size and skip_batches:
            return self.finish(shuffled.skip(int(skip_batches) * self.batch_size))
        batches = self.finish(shuffled)
        return batches.skip(skip_batches) if skip_batches else batches

    @property
    def steps_per_epoch(self):
        """Batches in one epoch; None when tf.data cannot tell without reading."""
        steps = int(self.epoch(0).cardinality())
        return steps if steps > 0 else None

    def stream(self, first_epoch, end_epoch, skip_batches=0, *, steps=None):
        """Epochs first_epoch .. end_epoch - 1 back to back, without their
        first `skip_batches` batches: what `model.fit(steps_per_epoch=...)`
        reads from one iterator across its epochs. `steps`: each epoch cut,
        or padded with its first batch again, to that many batches (workers
        reading parts of different sizes must all take the same steps)."""
        # Python seeds, so epochs are concatenated: a seed tensor inside
        # flat_map fails in tf.random's seed check when the global seed is 0.
        def epoch(number, skip=0):
            batches = self.epoch(number, skip)
            return batches if steps is None else fixed_steps(batches, steps - skip)

        batches = epoch(first_epoch, skip_batches)
        for number in range(first_epoch + 1, end_epoch):
            batches = batches.concatenate(epoch(number))
        return batches.prefetch(tf.data.AUTOTUNE)

    def dataset(self):
        """A dataset that is a new epoch each time it is iterated (epoch 0's
        order first): for consumers that only read batches (batch-norm
        statistics, a monitor's sample batch, a tuner)."""
        return self.finish(self.elements.shuffle(self.buffer, seed=self.seed, reshuffle_each_iteration=True))


class IndexOrder(EpochOrder):
    """Epochs as permutations of example indices: what a large image split
    shuffles instead of decoded pixels (#25). Epoch e visits the indices
    0 .. count - 1 in an order drawn from (seed, e) by
    `tf.random.experimental.index_shuffle`, a bijection computed index by
    index, so no permutation is held in memory; a resumed epoch skips
    indices, not batches, so nothing it skips is read or decoded.

    Args:
        count: examples in the split.
        seed: the run's seed.
        batch_size: examples per batch (the last batch of an epoch may be smaller).
        read: dataset of (position, index) int64 pairs -> dataset of
            batches, each epoch's positions running from the first one not
            skipped. Examples it leaves out (files that fail to decode) may
            shorten an epoch: its first batch is then repeated, so that every
            epoch keeps the ceil(count / batch_size) batches that
            `model.fit(steps_per_epoch=...)` reads.
    """

    def __init__(self, count, *, seed, batch_size, read):
        self.count = int(count)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.read = read

    def indices(self, epoch, first=0):
        """(position, index) of `epoch` from position `first` on."""
        seed = tf.constant([epoch_seed(self.seed, epoch), 0], tf.int64)
        last = self.count - 1

        @tf.autograph.experimental.do_not_convert
        def index(position):
            return position, tf.random.experimental.index_shuffle(position, seed=seed, max_index=last)

        return tf.data.Dataset.range(first, self.count).map(index)

    def epoch(self, epoch, skip_batches=0):
        batches = self.read(self.indices(epoch, first=int(skip_batches) * self.batch_size))
        return fixed_steps(batches, self.steps_per_epoch - int(skip_batches))

    @property
    def steps_per_epoch(self):
        return -(-self.count // self.batch_size)

    def dataset(self):
        # A new order each iteration: positions reshuffled with a buffer of
        # int64 indices (8 bytes each), never of decoded examples.
        positions = tf.data.Dataset.range(self.count)
        shuffled = positions.shuffle(max(1, self.count), seed=self.seed, reshuffle_each_iteration=True)
        return self.read(tf.data.Dataset.zip(positions, shuffled))


def fixed_steps(batches, steps):
    """`batches` cut, or padded with its first batch again, to `steps` batches."""
    return batches.concatenate(batches.take(1).repeat()).take(steps)


def epoch_seed(seed, epoch):
    """The shuffle seed of `epoch` of a run seeded `seed`."""
    return (int(seed) * _EPOCH_STRIDE + int(epoch)) % 2**31


def as_dataset(train):
    """`train` as a plain dataset, whether an `EpochOrder` or a dataset already."""
    return train.dataset() if isinstance(train, EpochOrder) else train
