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
    """

    def __init__(self, elements, *, buffer, seed, finish):
        self.elements = elements
        self.buffer = int(buffer)
        self.seed = int(seed)
        self.finish = finish

    def epoch(self, epoch):
        """The batches of `epoch` (0-based)."""
        seed = (self.seed * _EPOCH_STRIDE + int(epoch)) % 2**31
        return self.finish(self.elements.shuffle(self.buffer, seed=seed, reshuffle_each_iteration=False))

    @property
    def steps_per_epoch(self):
        """Batches in one epoch; None when tf.data cannot tell without reading."""
        steps = int(self.epoch(0).cardinality())
        return steps if steps > 0 else None

    def stream(self, first_epoch, end_epoch, skip_batches=0):
        """Epochs first_epoch .. end_epoch - 1 back to back, without their
        first `skip_batches` batches: what `model.fit(steps_per_epoch=...)`
        reads from one iterator across its epochs."""
        # Python seeds, so epochs are concatenated: a seed tensor inside
        # flat_map fails in tf.random's seed check when the global seed is 0.
        batches = self.epoch(first_epoch)
        for epoch in range(first_epoch + 1, end_epoch):
            batches = batches.concatenate(self.epoch(epoch))
        if skip_batches:
            batches = batches.skip(skip_batches)
        return batches.prefetch(tf.data.AUTOTUNE)

    def dataset(self):
        """A dataset that is a new epoch each time it is iterated (epoch 0's
        order first): for consumers that only read batches (batch-norm
        statistics, a monitor's sample batch, a tuner)."""
        return self.finish(self.elements.shuffle(self.buffer, seed=self.seed, reshuffle_each_iteration=True))


def as_dataset(train):
    """`train` as a plain dataset, whether an `EpochOrder` or a dataset already."""
    return train.dataset() if isinstance(train, EpochOrder) else train
