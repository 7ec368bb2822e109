"""Data at scale: how the image input pipeline's cost grows with the data (#25).

    python -m benchmarks.data_scale                       # 1,000, 10,000 and 50,000 photos, 224x224
    python -m benchmarks.data_scale --quick               # 100 and 500 photos of 64x64, 64x64
    python -m benchmarks.data_scale --data-dir DIR        # keep the generated photos in DIR between runs
    python -m benchmarks.data_scale --sizes 1000,10000    # other sizes
    python -m benchmarks --only data_scale                # the same, rows into benchmarks/RESULTS.md

Data: photo-like JPEGs (smooth colour fields, a few filled shapes, Gaussian
noise; 320x240, quality 85, 22 KB each on average, as real photos of that
size are) in 10 class subfolders, generated with numpy and PIL in a process
pool (50,000 took 225 s on 2 cores shared with other work, load 6 to 8;
about 2.5 ms of CPU a photo). They are written once into a pool
and each size's folder holds hard links to the pool's first N photos, so
the 1,000 folder is part of the 10,000 one, which is part of the 50,000 one.
Without `--data-dir` (or `DLSUITE_DATA_SCALE_DIR`) they go to a temporary
folder that is removed at the end.

Each measurement is ONE fresh Python process (`python -m
benchmarks.data_scale --child SPEC`), so its peak resident memory (VmHWM of
/proc/self/status) is its own. It imports TensorFlow, Keras and the app's
vision modules (both sides the same), then, timed from before the dataset
is loaded:

* first batch: seconds from before loading (ours: `datasets.load`, which
  lists and checks every file; Keras: `image_dataset_from_directory`, which
  lists them) to the first batch received;
* images/s: training images of one full pass over the time from the
  dataset's creation (after loading) to the last batch received, batches of
  32 at 224x224, only iterating (no model); the iterator's shutdown is left
  out, and so is the wait for the end of the sequence after the last batch:
  tf.data signals it when its autotuning thread next wakes (see
  input_pipeline's doc), which rounded some 40,000-image passes of about
  45 s up to 81.9 s before the clock stopped at the last batch. The end-to-end time (loading + the
  whole pass) and that wait are in the row's fields;
* peak memory: the process's VmHWM at the end of the pass, in MiB.

Both sides pass over the same 80% of the photos: ours holds out validation
0.1 and test 0.1 (`datasets.load(validation_fraction=0.1,
test_fraction=0.1)`), Keras `validation_split=0.2, subset="training"` (it
has no test split); both list and check or list all the files.

"ours" is `ours_first_pass(folder)` (the app's `datasets.load` then
`pipeline.epoch_order(...).epoch(0)`): the one place to change when the
pipeline's API changes. Ours keeps state between runs (a file-check
manifest); `ours_reset` removes it before each "first run": every file or
folder in the data folder that the generator did not write, and the
process's XDG_CACHE_HOME, which each ours process gets pointed at a folder
of this benchmark's own. A "second run" is a new process on the same folder
after a first run: ours then reuses what its first run left; Keras lists
the files again.

Each size runs MIN_REPEATS rounds of: reset, ours first run, Keras first
run, ours second run, Keras second run, one process each, one at a time
(--quick: ours and Keras side by side); before the rounds every file is read
once so both sides find the files in the page cache. Rows (ratio = ours /
Keras, of the medians):

    data_scale_<N>_first_batch_run1 / _run2    seconds, lower is better
    data_scale_<N>_images_per_s_run1 / _run2   images/s, bar >= 1 (at least Keras's)
    data_scale_<N>_peak_memory_run1 / _run2    MiB, lower is better

`common.report`'s "best" ratio is of the largest samples: for seconds and
MiB that is the slowest and largest repeat, so these rows carry
`lowest_ratio` (smallest over smallest) as well. The issue's targets, set for
50,000 photos, are printed beside the figures and stored in each row
(`target`, `meets_target`), never asserted: peak memory at most 1.5x Keras
and at most 1 GiB above ours at the smallest size; first batch at most 2x
Keras on a first run and at most 1x on a second; images/s at least Keras's.

Memory guard: a process whose resident memory passes `--memory-cap-gb`
(default 18, `DLSUITE_DATA_SCALE_MEMORY_CAP_GB`) or that leaves the machine
under 1 GiB available is killed, and ours is skipped at that size with the
reason printed (Keras's figures are still printed). Before a size, ours'
peak is extrapolated linearly from the two sizes before it; ours is skipped
when that passes the cap or what the machine has available.

`--quick` (100 and 500 photos of 64x64, read at 64x64) checks that the
benchmark runs and reports, not how fast. To keep it short (the image rows
took 70 s on 2 cores shared with other work, the text rows 36 s more) its
processes are forked from one that imported TensorFlow already (a
multiprocessing forkserver, which `python -m benchmarks --quick` starts
beside an earlier benchmark) instead of paying the 6 s import each, and ours
and Keras run side by side (each process's peak memory is still its own); a
forked process counts only the pages it touches, so its peak memory is
lower than a fresh process's. The text rows' processes are forked from the
same server.

Text: when `benchmarks/text_scale.py` exists, its `text_rows(sizes_mb=(10,
100, 500), quick=...)` runs after the images (`--part text` alone) and its
rows are printed, a line each; they measure each size once against a fixed
bar, without the 5 repeats and the reference a RESULTS.md row needs, so
they stay out of it (see `run_text`). Without the module a line says so.
"""

import argparse
import concurrent.futures
import gc
import importlib.util
import io
import json
import multiprocessing
import multiprocessing.connection
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

from benchmarks import common

FULL_SIZES = (1_000, 10_000, 50_000)
QUICK_SIZES = (100, 500)  # two folders, small: each size is 20 measuring processes
FULL_PHOTO = (320, 240)  # width, height of the generated files
QUICK_PHOTO = (64, 64)
FULL_IMAGE_SIZE = (224, 224)  # height, width the pipelines resize to
QUICK_IMAGE_SIZE = (64, 64)
BATCH_SIZE = 32
CLASSES = 10
SEED = 0
VALIDATION_FRACTION = 0.1
TEST_FRACTION = 0.1
JPEG_QUALITY = 85
NOISE_STDDEV = 12.0  # gives about 20 KB per 320x240 file at quality 85
GENERATOR_VERSION = 1
PARTS = ("images", "text")
TEXT_SIZES_MB = (10, 100, 500)

DEFAULT_MEMORY_CAP_GB = 18.0
MIN_AVAILABLE_BYTES = 2**30  # a process that leaves the machine less than this is killed
GIB = 2**30
MIB = 2**20
CHILD_PREFIX = "DATA_SCALE_CHILD "
POLL_SECONDS = 0.1

CLASS_NAMES = tuple(f"c{label}" for label in range(CLASSES))
_FILE_PATTERN = re.compile(r"img_\d{6}\.jpg")

# The targets (at 50,000 photos): ratio ours / Keras at most (first
# batch, memory) or at least (images/s) this.
TARGETS = {
    ("first_batch", "run1"): ("<=", 2.0),
    ("first_batch", "run2"): ("<=", 1.0),
    ("images_per_s", "run1"): (">=", 1.0),
    ("images_per_s", "run2"): (">=", 1.0),
    ("peak_memory", "run1"): ("<=", 1.5),
    ("peak_memory", "run2"): ("<=", 1.5),
}
MEMORY_GROWTH_TARGET_GIB = 1.0


# --- the two sides ----------------------------------------------------------------


def ours_first_pass(folder, *, image_size=FULL_IMAGE_SIZE, batch_size=BATCH_SIZE):
    """The app's training batches of one pass (epoch 0) over `folder`, as
    `classify train` makes them: the split's files, the cache its plan chooses
    (`image_cache.plan`: memory while the images fit the budget, else
    decoded every epoch), the epoch's order of file indices.

    Returns an iterable of (images (B, H, W, C), labels (B,)) batches; the
    time to its first batch includes this call (loading, file checks, a cache fill)."""
    from dlsuite.apps.vision import datasets, image_cache, pipeline, sources

    data = datasets.load(folder, validation_fraction=VALIDATION_FRACTION, test_fraction=TEST_FRACTION, seed=SEED)
    train, size = data.sources["train"], tuple(image_size)
    choice = image_cache.plan([("train", train.count, size, data.channels)], mode="auto", cache_dir=None)["train"]
    print(f"[data_scale] ours: {choice.line}", flush=True)
    cache = image_cache.build(train, sources.prepared(size, data.channels), image_size=size, channels=data.channels,
                              kind=choice.kind)
    order = pipeline.epoch_order(train, image_size=size, channels=data.channels, batch_size=batch_size, seed=SEED,
                                 cache=cache)
    return order.epoch(0)


def ours_reset(folder, state_dir):
    """Removes what ours keeps between runs of `folder`: every entry of the
    folder that the generator did not write, and `state_dir` (the
    XDG_CACHE_HOME ours' processes get)."""
    for entry in os.scandir(folder):
        if entry.is_dir(follow_symlinks=False) and entry.name in CLASS_NAMES:
            for item in os.scandir(entry.path):
                if not (item.is_file(follow_symlinks=False) and _FILE_PATTERN.fullmatch(item.name)):
                    _remove(item.path)
        else:
            _remove(entry.path)
    shutil.rmtree(state_dir, ignore_errors=True)
    os.makedirs(state_dir, exist_ok=True)


def keras_first_pass(folder, *, image_size=FULL_IMAGE_SIZE, batch_size=BATCH_SIZE):
    """`keras.utils.image_dataset_from_directory` on `folder`, its training 80%."""
    import keras

    return keras.utils.image_dataset_from_directory(
        folder, image_size=tuple(image_size), batch_size=batch_size, shuffle=True, seed=SEED,
        validation_split=VALIDATION_FRACTION + TEST_FRACTION, subset="training",
    )


SIDES = {"ours": ours_first_pass, "keras": keras_first_pass}


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


# --- photo-like files ------------------------------------------------------------

_NOISE = {}


def _noise_field(width, height):
    """A Gaussian noise field twice the photo's size, made once per process; a
    photo takes a random window of it (fresh noise per photo costs more than
    the rest of the photo)."""
    if (width, height) not in _NOISE:
        rng = np.random.default_rng([width, height, SEED])
        _NOISE[(width, height)] = np.round(rng.normal(0.0, NOISE_STDDEV, (2 * height, 2 * width, 3))).astype(np.int16)
    return _NOISE[(width, height)]


def photo(index, *, width, height):
    """Photo `index` (deterministic) as a PIL image: a smooth colour field tinted
    by its class, 3 to 7 filled shapes, Gaussian noise."""
    from PIL import Image, ImageDraw

    label = index % CLASSES
    rng = np.random.default_rng([index, SEED, GENERATOR_VERSION])
    tint = np.array([(label * 37) % 256, (label * 91 + 60) % 256, (label * 53 + 120) % 256], np.float32)
    grid = rng.uniform(0, 255, (3, 4, 3)).astype(np.float32) * 0.6 + tint * 0.4
    image = Image.fromarray(grid.astype(np.uint8)).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * (width, height)
        w, h = rng.uniform(0.1, 0.5, 2) * (width, height)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
        elif kind == 1:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=colour)
        else:
            draw.polygon([tuple(p) for p in rng.uniform(0, 1, (3, 2)) * (width, height)], fill=colour)
    noise = _noise_field(width, height)
    top, left = int(rng.integers(0, height)), int(rng.integers(0, width))
    pixels = np.asarray(image, np.int16) + noise[top:top + height, left:left + width]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _relative(index):
    return os.path.join(CLASS_NAMES[index % CLASSES], f"img_{index:06d}.jpg")


def _write_photos(pool, indices, width, height):
    """Writes photos `indices` into `pool`; returns their total bytes."""
    total = 0
    for index in indices:
        buffer = io.BytesIO()
        photo(index, width=width, height=height).save(buffer, "JPEG", quality=JPEG_QUALITY)
        path = os.path.join(pool, _relative(index))
        with open(path + ".tmp", "wb") as file:
            file.write(buffer.getbuffer())
        os.replace(path + ".tmp", path)
        total += buffer.tell()
    return total


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


def _write_json(path, value):
    with open(path + ".tmp", "w", encoding="utf-8") as file:
        json.dump(value, file)
    os.replace(path + ".tmp", path)


def generate_pool(root, *, count, width, height):
    """Makes sure `root/pool` holds photos 0 .. count - 1; generates the missing
    ones in a process pool over the cores, printing progress. Returns
    {"count", "seconds", "mean_kb"} of this call."""
    pool = os.path.join(root, "pool")
    marker = os.path.join(root, "pool.json")
    params = {"width": width, "height": height, "quality": JPEG_QUALITY, "noise": NOISE_STDDEV,
              "version": GENERATOR_VERSION, "seed": SEED}
    stored = _read_json(marker)
    have = stored["count"] if stored and stored.get("params") == params else 0
    if not have:
        shutil.rmtree(pool, ignore_errors=True)
    if have >= count:
        sizes = [os.path.getsize(os.path.join(pool, _relative(i))) for i in range(0, count, max(1, count // 200))]
        print(f"[data_scale] reusing {count:,} generated photos in {pool} "
              f"(mean {np.mean(sizes) / 1024:.1f} KB)", flush=True)
        return {"count": 0, "seconds": 0.0, "mean_kb": float(np.mean(sizes) / 1024)}
    for name in CLASS_NAMES:
        os.makedirs(os.path.join(pool, name), exist_ok=True)
    start = time.perf_counter()
    todo = range(have, count)
    chunk = 250
    chunks = [todo[i:i + chunk] for i in range(0, len(todo), chunk)]
    written, total_bytes, next_print = 0, 0, 5_000
    print(f"[data_scale] generating {len(todo):,} photos of {width}x{height} into {pool} "
          f"on {os.cpu_count()} processes", flush=True)
    # fork: this process has imported no TensorFlow yet.
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count(), mp_context=context) as executor:
        futures = [executor.submit(_write_photos, pool, indices, width, height) for indices in chunks]
        for future, indices in zip(futures, chunks):
            total_bytes += future.result()
            written += len(indices)
            if written >= next_print or written == len(todo):
                seconds = time.perf_counter() - start
                print(f"[data_scale]   {written:,}/{len(todo):,} photos, {seconds:.0f} s "
                      f"({written / seconds:.0f}/s, mean {total_bytes / written / 1024:.1f} KB)", flush=True)
                next_print += 5_000
    _write_json(marker, {"count": count, "params": params})
    seconds = time.perf_counter() - start
    return {"count": len(todo), "seconds": seconds, "mean_kb": total_bytes / max(1, len(todo)) / 1024}


def size_folder(root, size):
    """`root/n<size>`: hard links to the pool's first `size` photos (copies
    where links fail); made once, reused while its marker is there."""
    folder = os.path.join(root, f"n{size}")
    marker = folder + ".json"
    if _read_json(marker) == {"count": size} and os.path.isdir(folder):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    for name in CLASS_NAMES:
        os.makedirs(os.path.join(folder, name))
    pool = os.path.join(root, "pool")
    for index in range(size):
        relative = _relative(index)
        try:
            os.link(os.path.join(pool, relative), os.path.join(folder, relative))
        except OSError:
            shutil.copyfile(os.path.join(pool, relative), os.path.join(folder, relative))
    _write_json(marker, {"count": size})
    return folder


def _read_all(folder):
    """Reads every file once, so both sides find them in the page cache."""
    total = 0
    for name in CLASS_NAMES:
        for entry in os.scandir(os.path.join(folder, name)):
            with open(entry.path, "rb") as file:
                total += len(file.read())
    return total


# --- one measurement, in its own process ------------------------------------------


def _status(field):
    """A /proc/self/status field in bytes (VmHWM, VmRSS), or None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss():
    """This process's peak resident memory in bytes: VmHWM, else ru_maxrss."""
    peak = _status("VmHWM")
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return peak


def measure(spec):
    """One pass of `spec["side"]` over `spec["folder"]`, in this process; the figures as a dict."""
    imports_start = time.perf_counter()
    import keras  # noqa: F401  (both sides import the same modules before the clock starts)
    import tensorflow as tf  # noqa: F401

    from dlsuite.apps.vision import datasets, pipeline  # noqa: F401

    imports_seconds = time.perf_counter() - imports_start
    if spec.get("xdg_cache_home"):
        os.environ["XDG_CACHE_HOME"] = spec["xdg_cache_home"]
    started_at = time.time()
    start = time.perf_counter()
    batches = SIDES[spec["side"]](spec["folder"], image_size=spec["image_size"], batch_size=spec["batch_size"])
    built = time.perf_counter()
    rss_built = _status("VmRSS")
    images, count, first, last, shape = 0, 0, None, None, None
    for batch in batches:
        last = time.perf_counter()
        if first is None:
            first = last
            shape = [int(d) for d in batch[0].shape]
        images += int(batch[0].shape[0])
        count += 1
    # The pass ends at its last batch: the end of the sequence comes later, when
    # tf.data's autotuning thread next wakes (at 1.27, 2.55, 5.11, ... 81.9 s
    # after the iterator starts; see input_pipeline's doc), which would round
    # every pass up to one of those marks.
    stopped = time.perf_counter()
    if first is None:
        raise RuntimeError(f"{spec['side']}: the pass over {spec['folder']} gave no batch")
    end = last
    return {
        "side": spec["side"], "run": spec["run"], "size": spec["size"],
        "images": images, "batches": count, "first_batch_shape": shape,
        "imports_seconds": imports_seconds,
        # From the parent starting the process to the clock's start: Python, imports, TensorFlow.
        "launch_to_start_seconds": started_at - spec["launched_at"] if spec.get("launched_at") else 0.0,
        "load_seconds": built - start,
        "first_batch_seconds": first - start,
        "pass_seconds": end - built,
        "images_per_second": images / (end - built),
        "end_to_end_seconds": end - start,
        "end_of_sequence_wait_seconds": stopped - last,
        "peak_rss_bytes": _peak_rss(),
        "rss_after_load_bytes": rss_built,
        "pid": os.getpid(),
    }


def _child_main(spec_json):
    """`--child SPEC`: one measurement; prints its figures on one prefixed line."""
    result = measure(json.loads(spec_json))
    print(CHILD_PREFIX + json.dumps(result), flush=True)
    return 0


def _forked_child(spec, connection):
    """A forkserver child's target: one measurement, sent back through `connection`."""
    # The objects inherited from the server (TensorFlow's modules) stay out of the garbage
    # collector's sight: its passes over them would copy their pages into this process (a
    # measurement took 0.44 s instead of 0.19).
    gc.freeze()
    try:
        connection.send({"ok": measure(spec)})
    except BaseException as error:  # noqa: BLE001 - reported to the parent as text
        connection.send({"error": f"{type(error).__name__}: {error}\n{traceback.format_exc()[-3000:]}"})
    finally:
        connection.close()


def _proc_status(pid, field):
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _available():
    from dlsuite.apps.vision import image_cache  # the app's own reading of MemAvailable

    return image_cache.available_memory()


class _Spawned:
    """A measurement in a fresh `python -m benchmarks.data_scale --child` process."""

    def __init__(self, spec, env, scratch):
        self.out = tempfile.TemporaryFile(mode="w+", dir=scratch)
        self.err = tempfile.TemporaryFile(mode="w+", dir=scratch)
        command = [sys.executable, "-m", "benchmarks.data_scale", "--child", json.dumps(spec)]
        self.process = subprocess.Popen(command, cwd=common_root(), env=env, stdout=self.out, stderr=self.err)
        self.pid = self.process.pid

    def done(self):
        return self.process.poll() is not None

    def kill(self):
        self.process.kill()
        self.process.wait()

    def result(self):
        self.out.seek(0)
        self.err.seek(0)
        stdout, stderr = self.out.read(), self.err.read()
        self.out.close()
        self.err.close()
        for line in reversed(stdout.splitlines()):
            if line.startswith(CHILD_PREFIX):
                return json.loads(line[len(CHILD_PREFIX):]), None
        return None, f"exit status {self.process.returncode}: {(stderr or stdout)[-3000:]}"


class _Forked:
    """A measurement in a process forked from a forkserver that imported TensorFlow (--quick)."""

    def __init__(self, spec, context):
        self.receive, send = context.Pipe(duplex=False)
        self.process = context.Process(target=_forked_child, args=(spec, send))
        self.process.start()
        send.close()
        self.pid = self.process.pid
        self.message = None

    def done(self):
        if self.message is None and self.receive.poll():
            try:
                self.message = self.receive.recv()
            except EOFError:
                self.message = {"error": "the child exited without a result"}
        return self.message is not None or not self.process.is_alive()

    def kill(self):
        self.process.kill()
        self.process.join()

    def result(self):
        self.done()
        self.process.join()
        message = self.message or {"error": f"exit status {self.process.exitcode}"}
        return message.get("ok"), message.get("error")


def common_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_forkserver():
    """Starts multiprocessing's forkserver that --quick forks its measurements (and text_scale's) from,
    and returns its context. The server imports TensorFlow on its own while this process goes on."""
    # Also what each child would import (and, with PYTHONDONTWRITEBYTECODE, compile) again: this
    # module, to unpickle its target, and the image cache ours builds.
    return common.forkserver(["tensorflow", "keras", "dlsuite.apps.vision.datasets", "dlsuite.apps.vision.pipeline",
                              "dlsuite.apps.vision.image_cache", __name__])


def start_early():
    """`python -m benchmarks --quick` calls this beside an earlier benchmark: the forkserver's import
    runs there."""
    start_forkserver()


class Runner:
    """Starts measurement processes and watches their memory."""

    def __init__(self, *, fork, memory_cap, scratch):
        self.fork = fork
        self.memory_cap = memory_cap
        self.scratch = scratch
        self.context = start_forkserver() if fork else None
        # TensorFlow's start-up chatter, once per process otherwise.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        self.env = dict(os.environ)

    def run(self, specs):
        """Runs `specs` side by side; returns [(result or None, error or None, watched peak bytes)]."""
        started = []
        for spec in specs:
            spec = {**spec, "launched_at": time.time()}
            started.append(_Forked(spec, self.context) if self.fork else _Spawned(spec, self.env, self.scratch))
        peaks = [0] * len(started)
        killed = [None] * len(started)
        while not all(child.done() for child in started):
            available = _available()
            for i, child in enumerate(started):
                if child.done() or killed[i]:
                    continue
                rss = _proc_status(child.pid, "VmRSS") or 0
                peaks[i] = max(peaks[i], rss)
                reason = None
                if rss > self.memory_cap:
                    reason = f"resident memory {rss / GIB:.1f} GiB passed the cap of {self.memory_cap / GIB:.1f} GiB"
                elif available is not None and available < MIN_AVAILABLE_BYTES:
                    reason = (f"the machine had {available / GIB:.2f} GiB available (process at "
                              f"{rss / GIB:.1f} GiB)")
                if reason:
                    killed[i] = reason
                    child.kill()
            if self.fork:  # a forked child's result ends the wait at once
                multiprocessing.connection.wait([c.receive for c in started if c.message is None], POLL_SECONDS)
            else:
                time.sleep(POLL_SECONDS)
        outcomes = []
        for i, child in enumerate(started):
            result, error = child.result()
            if killed[i]:
                result, error = None, f"killed: {killed[i]}"
            outcomes.append((result, error, peaks[i]))
        return outcomes


# --- the benchmark -----------------------------------------------------------------


def size_label(size):
    return f"{size // 1000}k" if size >= 1000 and size % 1000 == 0 else str(size)


FIGURES = {
    # figure: (result key, unit, scale)
    "first_batch": ("first_batch_seconds", "s", 1.0),
    "images_per_s": ("images_per_second", "images/s", 1.0),
    "peak_memory": ("peak_rss_bytes", "MiB", 1 / MIB),
}


def _meets(op, ratio, limit):
    return ratio <= limit if op == "<=" else ratio >= limit


def measure_size(runner, *, folder, size, image_size, state_dir, repeats, skip_ours, side_by_side=False):
    """MIN_REPEATS rounds of (reset, ours run1, keras run1, ours run2, keras run2); with
    `side_by_side`, ours and Keras of a run at once.

    Returns ({(side, run): [result, ...]}, ours_skip_reason or None)."""
    samples = {(side, run): [] for side in SIDES for run in ("run1", "run2")}
    base = {"folder": folder, "size": size, "image_size": list(image_size), "batch_size": BATCH_SIZE,
            "xdg_cache_home": state_dir}
    skip = skip_ours

    def spec(side, run):
        return {**base, "side": side, "run": run}

    for repeat in range(repeats):
        for run in ("run1", "run2"):
            if run == "run1" and not skip:
                ours_reset(folder, state_dir)
            specs = ([] if skip else [spec("ours", run)]) + [spec("keras", run)]
            for group in [specs] if side_by_side else [[s] for s in specs]:  # else one process at a time
                for s, (result, error, watched) in zip(group, runner.run(group)):
                    if result is None:
                        if s["side"] == "ours":
                            skip = f"ours failed at {size:,} photos ({run}, repeat {repeat + 1}): {error}"
                            print(f"[data_scale] {skip}", flush=True)
                            continue
                        raise RuntimeError(f"Keras failed at {size:,} photos ({run}): {error}")
                    result["watched_peak_rss_bytes"] = watched
                    samples[(s["side"], run)].append(result)
                    print(f"[data_scale]   {size:,} {run} {s['side']:5s} repeat {repeat + 1}: first batch "
                          f"{result['first_batch_seconds']:.2f} s (load {result['load_seconds']:.2f} s), "
                          f"{result['images_per_second']:.0f} images/s over {result['images']:,}, peak "
                          f"{result['peak_rss_bytes'] / MIB:,.0f} MiB", flush=True)
    return samples, skip


def report_size(samples, *, size, mode, config, base_peaks, photo_info):
    """The size's rows, ours / Keras; returns ours' median peak (bytes) or None."""
    label = size_label(size)
    have_ours = all(len(samples[("ours", run)]) >= common.MIN_REPEATS for run in ("run1", "run2"))
    lines = []
    ours_peak = None
    for figure, (key, unit, scale) in FIGURES.items():
        for run in ("run1", "run2"):
            keras_values = [r[key] * scale for r in samples[("keras", run)]]
            keras_median = statistics.median(keras_values)
            if not have_ours:
                lines.append(f"{figure} {run}: Keras {keras_median:,.2f} {unit}; ours skipped")
                continue
            ours_values = [r[key] * scale for r in samples[("ours", run)]]
            ours_median = statistics.median(ours_values)
            ratio = ours_median / keras_median
            op, limit = TARGETS[(figure, run)]
            target = f"ours/keras {op} {limit} (at 50,000)"
            meets = _meets(op, ratio, limit)
            fields = {}
            notes = [f"target {target}: {'met' if meets else 'missed'}"]
            if figure == "peak_memory" and run == "run1":
                ours_peak = ours_median * MIB
            if figure == "peak_memory" and base_peaks.get(run) is not None and base_peaks[run][0] != size:
                base_size, base_peak = base_peaks[run]
                growth = ours_median * MIB - base_peak
                fields["growth_over_smallest_gib"] = growth / GIB
                fields["meets_growth_target"] = growth <= MEMORY_GROWTH_TARGET_GIB * GIB
                notes.append(f"{growth / GIB:+.2f} GiB over ours at {base_size:,} (target <= "
                             f"{MEMORY_GROWTH_TARGET_GIB:g} GiB: "
                             f"{'met' if fields['meets_growth_target'] else 'missed'})")
            ours_runs, keras_runs = samples[("ours", run)], samples[("keras", run)]
            what = {"first_batch": "time to first batch", "images_per_s": "images/s over one pass",
                    "peak_memory": "peak resident memory"}[figure]
            run_words = "first run (ours' state removed)" if run == "run1" else "second run on the same folder"
            common.report(
                f"data_scale_{label}_{figure}_{run}",
                ours=ours_values, reference=keras_values, mode=mode, unit=unit,
                bar=1.0 if figure == "images_per_s" else None,
                config={**config, "photos": size, "run": run},
                lower_is_better=figure != "images_per_s",
                **({} if figure == "images_per_s" else {"lowest_ratio": min(ours_values) / min(keras_values)}),
                target=target, meets_target=meets, **fields,
                train_images={"ours": ours_runs[0]["images"], "keras": keras_runs[0]["images"]},
                seconds={side: {part: statistics.median(r[part] for r in runs)
                                for part in ("load_seconds", "first_batch_seconds", "pass_seconds",
                                             "end_to_end_seconds", "end_of_sequence_wait_seconds",
                                             "imports_seconds", "launch_to_start_seconds")}
                         for side, runs in (("ours", ours_runs), ("keras", keras_runs))},
                rss_after_load_mib={"ours": statistics.median(r["rss_after_load_bytes"] for r in ours_runs) / MIB,
                                    "keras": statistics.median(r["rss_after_load_bytes"] for r in keras_runs) / MIB},
                photos=photo_info,
                details=f"{size:,} photos, {what}, {run_words}; " + "; ".join(notes),
                ours_label=("datasets.load(folder, validation_fraction=0.1, test_fraction=0.1) + "
                            "pipeline.epoch_order(train, batch_size=32, seed=0).epoch(0), one pass, "
                            f"{config['process']} (benchmarks.data_scale.ours_first_pass)"),
                reference_label=("keras.utils.image_dataset_from_directory(folder, image_size, batch_size=32, "
                                 "shuffle=True, seed=0, validation_split=0.2, subset='training'), one pass, "
                                 f"{config['process']}"),
            )
            lines.append(f"{figure} {run}: ours {ours_median:,.2f} {unit}, Keras {keras_median:,.2f} {unit}, "
                         f"ratio {ratio:.2f}; " + "; ".join(notes))
    print(f"[data_scale] {size:,} photos:", flush=True)
    for line in lines:
        print(f"[data_scale]   {line}", flush=True)
    return ours_peak


def _predicted_peak(peaks, size):
    """Ours' peak at `size`, extrapolated linearly from the two largest sizes measured."""
    if len(peaks) < 2:
        return None
    (n0, p0), (n1, p1) = sorted(peaks.items())[-2:]
    return p1 + (p1 - p0) / (n1 - n0) * (size - n1)


def run_images(args, *, mode):
    quick = args.quick
    sizes = tuple(args.sizes) if args.sizes else (QUICK_SIZES if quick else FULL_SIZES)
    width, height = QUICK_PHOTO if quick else FULL_PHOTO
    image_size = QUICK_IMAGE_SIZE if quick else FULL_IMAGE_SIZE
    memory_cap = int(args.memory_cap_gb * GIB)
    keep = args.data_dir is not None
    root_parent = os.path.abspath(os.path.expanduser(args.data_dir)) if keep else tempfile.mkdtemp(
        prefix="dlsuite-data-scale-")
    root = os.path.join(root_parent, f"photos-{width}x{height}")
    os.makedirs(root, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="dlsuite-data-scale-state-")
    timings = {}
    try:
        runner = Runner(fork=quick, memory_cap=memory_cap, scratch=scratch)  # its forkserver starts meanwhile
        start = time.perf_counter()
        generated = generate_pool(root, count=max(sizes), width=width, height=height)
        timings["generate"] = time.perf_counter() - start
        photo_info = {"width": width, "height": height, "jpeg_quality": JPEG_QUALITY, "classes": CLASSES,
                      "mean_kb": generated["mean_kb"]}
        config = {"image_size": list(image_size), "batch_size": BATCH_SIZE, "validation_fraction": VALIDATION_FRACTION,
                  "test_fraction": TEST_FRACTION, "repeats": common.MIN_REPEATS, "photo": f"{width}x{height} JPEG",
                  "process": "forked from a forkserver, ours and Keras side by side (quick)" if quick
                  else "fresh python process"}
        ours_peaks, base_peaks = {}, {}
        for size in sorted(sizes):
            size_start = time.perf_counter()
            folder = size_folder(root, size)
            read = _read_all(folder)
            print(f"[data_scale] {size:,} photos in {folder} ({read / 2**20:,.0f} MiB, read once into the page "
                  "cache)", flush=True)
            skip = None
            predicted = _predicted_peak(ours_peaks, size)
            available = _available()
            if predicted is not None and predicted > memory_cap:
                skip = (f"ours skipped at {size:,} photos: its peak, extrapolated from "
                        f"{', '.join(f'{n:,}' for n in sorted(ours_peaks))}, would be {predicted / GIB:.1f} GiB, "
                        f"over the cap of {memory_cap / GIB:.1f} GiB")
            elif predicted is not None and available is not None and predicted > available - MIN_AVAILABLE_BYTES:
                skip = (f"ours skipped at {size:,} photos: its extrapolated peak {predicted / GIB:.1f} GiB is more "
                        f"than the machine has available ({available / GIB:.1f} GiB)")
            if skip:
                print(f"[data_scale] {skip}", flush=True)
            samples, skip = measure_size(runner, folder=folder, size=size, image_size=image_size,
                                         state_dir=os.path.join(scratch, "ours-xdg-cache"),
                                         repeats=common.MIN_REPEATS, skip_ours=skip, side_by_side=quick)
            peak = report_size(samples, size=size, mode=mode, config=config, base_peaks=base_peaks,
                               photo_info=photo_info)
            if peak is not None:
                ours_peaks[size] = peak
                for run in ("run1", "run2"):
                    if run not in base_peaks:
                        values = [r["peak_rss_bytes"] for r in samples[("ours", run)]]
                        base_peaks[run] = (size, statistics.median(values))
            elif skip:
                print(f"[data_scale] no ours rows at {size:,} photos: {skip}", flush=True)
            timings[f"size_{size}"] = time.perf_counter() - size_start
            print(f"[data_scale] {size:,} photos took {timings[f'size_{size}']:.0f} s", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not keep:
            shutil.rmtree(root_parent, ignore_errors=True)
    print("[data_scale] timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()), flush=True)


def run_text(args, *, mode):
    """benchmarks/text_scale.py's rows, when that module exists.

    `text_rows` measures each size once (a fresh process that writes the token
    file, one that reuses it) against a fixed bar (peak under 2 GB at 500 MB),
    with no reference side and no repeats, so its rows cannot be
    `common.report` rows (a median of 5 against a reference): they are
    printed here, a line each, and left out of RESULTS.md. A row that does
    carry `ours` and `reference` samples is reported like the image rows.
    """
    if importlib.util.find_spec("benchmarks.text_scale") is None:
        print("[data_scale] text rows skipped: benchmarks/text_scale.py does not exist (yet)", flush=True)
        return
    from benchmarks import text_scale

    start = time.perf_counter()
    sizes = "its quick sizes" if args.quick else f"{', '.join(map(str, TEXT_SIZES_MB))} MB"
    print(f"[data_scale] text rows: benchmarks.text_scale.text_rows, {sizes}", flush=True)
    rows = (text_scale.text_rows(quick=True) if args.quick
            else text_scale.text_rows(sizes_mb=TEXT_SIZES_MB, quick=False))
    for row in rows or ():
        if not isinstance(row, dict):
            print(f"[data_scale] text: {row!r}", flush=True)
            continue
        if "ratio" in row:
            continue  # printed by common.report inside text_scale
        samples = (row.get("ours"), row.get("reference"))
        if all(isinstance(s, (list, tuple)) and len(s) >= common.MIN_REPEATS for s in samples):
            row = dict(row)
            name, ours, reference = row.pop("name"), row.pop("ours"), row.pop("reference")
            row.pop("mode", None)
            common.report(name, ours=ours, reference=reference, mode=mode, config=row.pop("config", {}), **row)
            continue
        summary = ", ".join(f"{key} {row[key]}" for key in (
            "size_mb", "tokens", "token_file_mib", "peak_mib", "seconds", "reuse_peak_mib", "reuse_seconds",
            "bar_mib", "meets_bar") if key in row)
        print(f"[data_scale] text {row.get('name', '?')}: {summary}", flush=True)
        # Prefixed: a line starting with "{" is read as a result row.
        print(f"[data_scale] text row: {json.dumps(row)}", flush=True)
    print(f"[data_scale] text rows took {time.perf_counter() - start:.0f} s", flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="100 and 500 photos of 64x64: checks that the benchmark runs and reports, not how fast")
    parser.add_argument("--part", action="append", choices=PARTS,
                        help=f"run only this part (repeatable; default all): {', '.join(PARTS)}")
    parser.add_argument("--data-dir", default=os.environ.get("DLSUITE_DATA_SCALE_DIR"),
                        help="keep the generated photos here between runs (default: a temporary folder, removed; "
                             "or $DLSUITE_DATA_SCALE_DIR)")
    parser.add_argument("--sizes", type=lambda text: [int(n) for n in text.split(",")],
                        help="photo counts, comma-separated (default 1000,10000,50000; quick 100,500)")
    parser.add_argument("--memory-cap-gb", type=float,
                        default=float(os.environ.get("DLSUITE_DATA_SCALE_MEMORY_CAP_GB", DEFAULT_MEMORY_CAP_GB)),
                        help="kill a measurement process above this resident memory and skip ours at that size "
                             f"(default {DEFAULT_MEMORY_CAP_GB:g})")
    args = parser.parse_args(argv)
    args.part = args.part or list(PARTS)
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return _child_main(argv[1])
    args = parse_args(argv)
    mode = "quick" if args.quick else "full"
    print(f"[data_scale] {common.cpu_model()}, {os.cpu_count()} cores", flush=True)
    if "images" in args.part:
        run_images(args, mode=mode)
    if "text" in args.part:
        run_text(args, mode=mode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
