"""The decoded-image cache: in memory while it fits a budget, else a local file, else none.

A split's images are cached as uint8 at the size the model sees, one array
(count, H, W, C) indexed like the split, so a cached epoch reads the same
examples in the same order as a streamed one (`sources`). Before the first
epoch `plan` estimates what each split needs and chooses, and says which and
why; `--cache memory|disk|none|auto` overrides it.

The disk cache is a raw array file named by what it holds (the split's
identity, the size and channels): a run killed while writing it leaves only
a temporary `.NAME.tmp-HOST-PID-...`, which the next run removes once that
process is gone (`core.atomic`; `Dataset.cache(filename)` instead leaves a
lockfile that fails every later run, tensorflow/tensorflow#28798).
"""

import dataclasses
import hashlib
import os
import sys
import time

import numpy as np
import tensorflow as tf

from dlsuite.apps.core import atomic, user_cache
from dlsuite.apps.core.errors import UsageError

MODES = ("auto", "memory", "disk", "none")
# What an automatic memory cache may take: a quarter of the memory available
# when the run starts, and no more than 1.5 GB, so that a run on 16,000
# photos at 224x224 stays under 3 GB resident (#25; TensorFlow and the model
# hold about 1.5 GB more). `--cache memory` caches whatever the size.
BUDGET_FRACTION = 0.25
MAX_BUDGET = 1.5e9
FILL_BATCH = 64


def default_cache_dir():
    return os.path.join(user_cache.root(), "images")


def available_memory():
    """Bytes of memory available now (MemAvailable), or the physical memory where that is unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_budget():
    return int(min(available_memory() * BUDGET_FRACTION, MAX_BUDGET))


def check_options(mode, cache_dir):
    """Raises UsageError for an unknown mode or a cache folder that cannot be written; creates nothing."""
    if mode not in MODES:
        raise UsageError(f"cache {mode!r} is not one of {', '.join(MODES)}", option="cache")
    if cache_dir is not None:
        atomic.check_writable(cache_dir, what="the image cache folder", option="cache_dir",
                              hint="pass --cache-dir with a local folder you can write to")


def needed_bytes(count, image_size, channels):
    return int(count) * int(image_size[0]) * int(image_size[1]) * int(channels)


@dataclasses.dataclass(frozen=True)
class Choice:
    """Where one split's images live between epochs: "memory", "disk" or "none" (decoded every epoch)."""

    kind: str
    line: str


def plan(splits, *, mode, cache_dir, budget=None):
    """Chooses a cache for each split, in the order given (the budget goes to the first ones).

    Args:
        splits: [(name, count, (height, width), channels)].
        mode: one of MODES.
        cache_dir: the disk cache's folder (None: `default_cache_dir()`).
        budget: bytes an automatic memory cache may take (default `memory_budget()`).

    Returns:
        {name: Choice}, each with the line that says what was chosen and why.
    """
    budget = memory_budget() if budget is None else int(budget)
    chosen, left = {}, budget
    for name, count, size, channels in splits:
        need = needed_bytes(count, size, channels)
        what = f"{count:,} {name} images at {size[0]}x{size[1]}x{channels}"
        folder = cache_dir or default_cache_dir()
        if mode == "memory":
            chosen[name] = Choice("memory", f"caching {what} in memory, {_size(need)} (--cache memory)")
        elif mode == "disk":
            chosen[name] = Choice("disk", f"caching {what} in {folder}, {_size(need)} (--cache disk)")
        elif mode == "none":
            chosen[name] = Choice("none", f"streaming {what} from their files every epoch (--cache none)")
        elif need <= left:
            left -= need
            chosen[name] = Choice("memory", f"caching {what} in memory, {_size(need)} "
                                            f"(within the {_size(budget)} budget for it)")
        elif cache_dir is not None:
            chosen[name] = Choice("disk", f"caching {what} in {folder}: {_size(need)}, more than the "
                                          f"{_size(left)} of memory budget left")
        else:
            chosen[name] = Choice("none", f"streaming: {what} would need {_size(need)}, more than the "
                                          f"{_size(left)} of memory budget left; they are decoded every epoch "
                                          "(--cache memory caches them anyway, --cache-dir DIR in a local file)")
    return chosen


def _size(count):
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


@dataclasses.dataclass
class Cache:
    """A split's prepared images: uint8 (count, H, W, C), and which indices could be read."""

    images: np.ndarray
    readable: np.ndarray  # bool (count,)

    @tf.autograph.experimental.do_not_convert  # AutoGraph would rewrite `take` and call it wrongly
    def gather(self, indices):
        """uint8 images at `indices` (a batch), read through NumPy: a memory-mapped file stays on disk."""
        images = tf.numpy_function(self.take, [indices], tf.uint8, stateful=False)
        return tf.ensure_shape(images, (None, *self.images.shape[1:]))

    def take(self, indices):
        return np.ascontiguousarray(self.images[indices])


def build(source, prepare, *, image_size, channels, kind, cache_dir=None, label="images"):
    """The cache of `source`'s images made by `prepare`, read or written; None for kind "none"."""
    if kind == "none":
        return None
    shape = (source.count, int(image_size[0]), int(image_size[1]), int(channels))
    if kind == "memory":
        images = np.empty(shape, dtype=np.uint8)
        return _fill(source, prepare, images, label=label)
    folder = cache_dir or default_cache_dir()
    os.makedirs(folder, exist_ok=True)
    atomic.clean_abandoned(folder, ".*.tmp-*")
    key = hashlib.sha1(f"{source.cache_key()}|{shape}".encode("utf-8", "surrogateescape")).hexdigest()[:20]
    path = os.path.join(folder, f"images-{key}-{'x'.join(map(str, shape))}.u8")
    if os.path.exists(path) and os.path.exists(path + ".readable.npy"):
        print(f"reading the cached {label} from {path}", flush=True)
        return Cache(np.memmap(path, dtype=np.uint8, mode="r", shape=shape), np.load(path + ".readable.npy"))
    partial, readable = atomic.temporary_file(path), atomic.temporary_file(path + ".readable.npy")
    try:
        images = np.memmap(partial, dtype=np.uint8, mode="w+", shape=shape)
        cache = _fill(source, prepare, images, label=label)
        images.flush()
        with open(readable, "wb") as file:
            np.save(file, cache.readable)
        os.replace(readable, path + ".readable.npy")
        os.replace(partial, path)  # last: a whole array file is always complete
    except BaseException:
        for leftover in (partial, readable):
            atomic.remove(leftover)
        raise
    return Cache(np.memmap(path, dtype=np.uint8, mode="r", shape=shape), cache.readable)


def _fill(source, prepare, images, *, label):
    """Reads every example of `source` in index order into `images`, showing progress."""
    readable = np.zeros(len(images), dtype=bool)
    stream = source.read_batches(source.in_order(), prepare, FILL_BATCH).prefetch(2)
    start = last = time.monotonic()
    done = 0
    for batch, _, indices in stream.as_numpy_iterator():
        images[indices] = batch
        readable[indices] = True
        done += len(indices)
        if time.monotonic() - last > 10:
            last = time.monotonic()
            rate = done / (last - start)
            print(f"  caching {label}: {done:,}/{len(images):,} ({rate:,.0f}/s)", file=sys.stderr, flush=True)
    return Cache(images, readable)


