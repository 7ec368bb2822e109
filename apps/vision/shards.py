"""Packed image datasets: a class-subfolder image folder as TFRecord shards.

`pack(folder, out)` reads a folder with one subfolder of images per class
(the layout `datasets.load` reads) once, checks every file, and writes::

    OUT/shard-00000-of-00008.tfrecord ...   tf.train.Example records
    OUT/labels.npy                          int32, the label of each index
    OUT/dataset.json                        classes, counts, shards, shape

for data too large to list and check on every run, or kept on GCS or S3
(`tf.io.gfile` writes OUT, so `gs://` and `s3://` paths work). Each record
holds `image/encoded` (the file's own bytes, or a JPEG at `image_size`),
`image/class/label`, `image/index` (the image's position in the packed
order: classes sorted, then paths sorted, as `file_checks.list_class_files`
gives them) and `image/filename` (relative to the folder).

Image `i` goes to shard `i % shards`, so every shard holds every class in its
share, and a worker that reads only its own shard files still sees them all.
`labels.npy` lets a reader split by index (`datasets`' stratified split)
without reading a shard; `records(files)` gives back (index, encoded, label)
to keep the elements of a split.

A pack is written into `OUT.partial-<pid>` beside OUT and renamed into place
at the end, so a killed pack leaves no OUT that `read_info` accepts; the next
pack to the same OUT removes what it left. On an object store, where a folder
cannot be renamed in one step, the files move one by one with dataset.json
last: OUT counts as packed only once dataset.json is there.
"""

import dataclasses
import io
import json
import math
import os
import re
import shutil
import time

import numpy as np
import tensorflow as tf

from dlsuite.apps.core import atomic
from dlsuite.apps.core.errors import UsageError
from dlsuite.apps.vision import file_checks

FORMAT = "dlsuite-shards"
VERSION = 1
INFO_FILE = "dataset.json"
LABELS_FILE = "labels.npy"
OWNER_FILE = "owner.json"  # in OUT.partial-<pid> only: who writes it, to tell a killed pack from a running one
SHARD_NAME = "shard-{index:05d}-of-{count:05d}.tfrecord"
# At least this many shards (when there are that many images): tf.distribute's
# FILE auto-sharding and `tf.data.experimental.service` give each worker whole
# files, so fewer files than workers leaves workers idle (or makes FILE fall
# back to DATA, every worker reading everything). 8 covers the usual 2 to 8
# workers of `docs/scaling.md`; larger clusters get more from `shard_mb`.
MIN_SHARDS = 8
JPEG_QUALITY = 95
# Bytes per pixel of a JPEG at quality 95, to size the shards of a resized
# pack before encoding: scikit-learn's two sample photos at 64x64 to 640x427
# took 0.28 to 0.86 in RGB (chroma subsampled), 0.23 to 0.68 in gray. Only
# the shard count depends on it.
JPEG_BYTES_PER_PIXEL = 0.6
PROGRESS_EVERY_S = 5.0

FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
    "image/index": tf.io.FixedLenFeature([], tf.int64),
    "image/filename": tf.io.FixedLenFeature([], tf.string, default_value=""),
}

_HINT = "write one with `dlsuite data pack FOLDER OUT`"
_AGAIN = "pack the source folder again with `dlsuite data pack FOLDER OUT --overwrite`"


@dataclasses.dataclass
class PackedInfo:
    """What `dataset.json` and `labels.npy` of a packed dataset say.

    Attributes:
        path: the packed folder (OUT).
        class_names: label i is `class_names[i]`.
        labels: int32 (count,), the label of each index.
        channels: 1 (every image gray) or 3.
        image_shape: (H, W, C) when every image has that shape (always after
            a resize), else None.
        files: the shard files' full paths, in order.
        shard_counts: the number of records in each file of `files`.
        count: the number of images.
        skipped: [(path, reason)] files of the source folder left out as unreadable.
        resized: (H, W) the images were resized to, or None (original bytes).
        source: the folder that was packed.
    """

    path: str
    class_names: list
    labels: np.ndarray
    channels: int
    image_shape: tuple | None
    files: list
    shard_counts: list
    count: int
    skipped: list
    resized: tuple | None = None
    source: str | None = None


def is_packed(path):
    """True when `path` is a folder holding a dataset.json (local, gs://, s3://)."""
    path = _expand(os.fspath(path))
    try:
        return tf.io.gfile.isdir(path) and tf.io.gfile.exists(_join(path, INFO_FILE))
    except tf.errors.OpError:  # a scheme TensorFlow has no file system for, a bucket it may not read
        return False


def read_info(out):
    """Reads and checks the description of the packed dataset `out`.

    Returns:
        A `PackedInfo`.

    Raises:
        UsageError: `out` is missing or holds no dataset.json, the JSON is
            malformed or of another format, a listed shard file is missing,
            or labels.npy disagrees with the counts; one line naming the path.
    """
    out = _strip(_expand(os.fspath(out)))
    info_path = _join(out, INFO_FILE)
    if not tf.io.gfile.exists(info_path):
        if not tf.io.gfile.exists(out):
            problem = "it does not exist" + _interrupted_note(out)
        elif not tf.io.gfile.isdir(out):
            problem = "it is a file"
        else:
            problem = "no dataset.json" + _interrupted_note(out)
        raise UsageError(f"{out} is not a packed dataset: {problem}; {_HINT}")
    try:
        with tf.io.gfile.GFile(info_path, "rb") as file:
            info = json.loads(file.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise UsageError(f"{info_path} is not valid JSON ({_one_line(error)}); {_AGAIN}") from None
    _check_format(info, info_path)
    count = info["count"]
    names = set(tf.io.gfile.listdir(out))
    files, shard_counts = [], []
    for shard in info["shards"]:
        if shard["file"].rstrip("/") not in names:
            raise UsageError(f"{_join(out, shard['file'])} is missing, a shard file that {info_path} lists; copy "
                             f"the whole folder again, or {_AGAIN}")
        files.append(_join(out, shard["file"]))
        shard_counts.append(shard["count"])
    if sum(shard_counts) != count:
        raise UsageError(f"{info_path} is inconsistent: its shards hold {sum(shard_counts)} images, its count "
                         f"says {count}; {_AGAIN}")
    labels = _read_labels(_join(out, LABELS_FILE), info, names)
    return PackedInfo(
        path=out, class_names=list(info["classes"]), labels=labels, channels=info["channels"],
        image_shape=None if info["image_shape"] is None else tuple(info["image_shape"]),
        files=files, shard_counts=shard_counts, count=count,
        skipped=[tuple(entry) for entry in info["skipped"]],
        resized=None if info["resized"] is None else tuple(info["resized"]), source=info["source"])


def records(files):
    """The records of the shard `files`, read in the given order.

    Args:
        files: shard paths (`PackedInfo.files`, or a worker's share of them).

    Returns:
        A deterministic tf.data.Dataset of (index int64, encoded string,
        label int32): the image's packed position, its encoded bytes, its label.
    """
    files = [files] if isinstance(files, (str, os.PathLike)) else list(files)

    def parse(record):
        example = tf.io.parse_single_example(record, FEATURES)
        return (example["image/index"], example["image/encoded"],
                tf.cast(example["image/class/label"], tf.int32))

    return tf.data.TFRecordDataset([os.fspath(f) for f in files]).map(
        parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def pack(folder, out, *, image_size=None, shard_mb=128, strict=False, overwrite=False, progress=print):
    """Writes the images of a class-subfolder folder as TFRecord shards.

    Args:
        folder: a local folder with one subfolder of images per class.
        out: the folder to write (local, gs:// or s3://); it must not exist,
            be empty, or (with `overwrite`) hold an earlier pack.
        image_size: None to store each file's bytes unchanged, or (H, W):
            every image resized to exactly H x W (bilinear, as
            `tf.image.resize` in the training pipeline) and stored as a JPEG
            of quality 95, gray images with 1 channel.
        shard_mb: about how many MB each shard holds; there are at least
            `min(MIN_SHARDS, images)` shards, so that workers can each read
            their own files.
        strict: stop at the first unreadable image instead of skipping it.
        overwrite: replace an earlier pack at `out`.
        progress: called with a line of text: what is checked, then every
            PROGRESS_EVERY_S seconds images done, images/s and MB written.

    Returns:
        The `PackedInfo` of what was written.

    Raises:
        UsageError: a bad folder, option or OUT; an unreadable image with `strict`.
    """
    folder, out = os.fspath(folder), _strip(_expand(os.fspath(out)))
    root = os.path.expanduser(folder)
    image_size = _check_options(image_size, shard_mb)
    _check_folder(folder, root, out)
    _check_out(out, overwrite=overwrite)

    class_names, class_files = _list_classes(folder, root)
    paths = [path for name in class_names for path in class_files[name]]
    labels = [label for label, name in enumerate(class_names) for _ in class_files[name]]
    progress(f"checking {len(paths)} images in {len(class_names)} class folders of {folder} ...")
    checks = file_checks.check_images(paths, strict=strict)
    kept = [i for i, check in enumerate(checks) if check.reason is None]
    for check in checks:
        if check.reason:
            progress(f"skipped {check.path}: {check.reason}")
    for label, name in enumerate(class_names):
        if not any(labels[i] == label for i in kept):
            raise UsageError(f"Class folder {os.path.join(folder, name)!r} has no readable image: add images or "
                             "remove the folder.")
    channels = 3 if any(checks[i].colour for i in kept) else 1
    if image_size is not None:
        image_shape = (*image_size, channels)
    else:
        native = {checks[i].shape[:2] for i in kept}
        image_shape = (*native.pop(), channels) if len(native) == 1 else None
    images = [(paths[i], labels[i]) for i in kept]
    if image_size is None:
        estimate = sum(os.path.getsize(path) for path, _ in images)
    else:
        estimate = len(images) * image_size[0] * image_size[1] * JPEG_BYTES_PER_PIXEL
    n_shards = shard_count(len(images), estimate, shard_mb)

    source = os.path.abspath(root)
    description = {
        "format": FORMAT, "version": VERSION, "classes": class_names, "count": len(images),
        "class_counts": np.bincount([label for _, label in images], minlength=len(class_names)).tolist(),
        "channels": channels, "image_shape": None if image_shape is None else list(image_shape),
        "shards": [], "resized": None if image_size is None else list(image_size),
        "skipped": [[os.path.abspath(check.path), check.reason] for check in checks if check.reason],
        "source": source,
    }
    _remove_abandoned_partials(out, progress)
    partial = f"{out}.partial-{os.getpid()}"
    try:
        _remove_tree(partial)
        tf.io.gfile.makedirs(partial)
        _write_bytes(_join(partial, OWNER_FILE), json.dumps({"host": atomic.host(), "pid": os.getpid()}).encode())
        description["shards"] = _write_shards(partial, images, root=root, n_shards=n_shards, image_size=image_size,
                                              channels=channels, progress=progress)
        buffer = io.BytesIO()
        np.save(buffer, np.array([label for _, label in images], dtype=np.int32))
        _write_bytes(_join(partial, LABELS_FILE), buffer.getvalue())
        tf.io.gfile.remove(_join(partial, OWNER_FILE))
        _write_bytes(_join(partial, INFO_FILE), (json.dumps(description, indent=1) + "\n").encode())
        _commit(partial, out)
    except BaseException as error:  # KeyboardInterrupt too: no half-written folder stays behind
        _remove_tree(partial)
        if isinstance(error, Exception) and atomic.out_of_space(error):
            raise atomic.no_space_error(out, error, partial="pack") from None
        raise
    return read_info(out)


def shard_count(images, total_bytes, shard_mb):
    """How many shards `images` images of `total_bytes` bytes go into:
    enough for about `shard_mb` MB each, at least min(MIN_SHARDS, images),
    and never more than one per image."""
    by_size = math.ceil(total_bytes / (shard_mb * 1e6))
    return max(1, min(images, max(by_size, MIN_SHARDS)))


# --- writing ------------------------------------------------------------------------


def _loader(image_size, channels):
    """The tf.data map function: path -> the bytes to store."""
    if image_size is None:
        return tf.io.read_file

    def load(path):
        # As `datasets.decoder` reads it (BMP and GIF decode only to 3
        # channels), then as `pipeline.batches` resizes it.
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        if channels == 1:
            image = tf.image.rgb_to_grayscale(image)
        image = tf.image.resize(image, image_size, method="bilinear")
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
        return tf.io.encode_jpeg(image, quality=JPEG_QUALITY)

    return load


def _example(encoded, *, label, index, filename):
    """One serialized tf.train.Example (the FEATURES)."""
    feature = {
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
        "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        "image/index": tf.train.Feature(int64_list=tf.train.Int64List(value=[index])),
        "image/filename": tf.train.Feature(bytes_list=tf.train.BytesList(value=[filename.encode("utf-8")])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _write_shards(partial, images, *, root, n_shards, image_size, channels, progress):
    """Writes `images` [(path, label)] into `n_shards` files in `partial`:
    index i into shard i % n_shards, shard after shard. Returns the
    dataset.json "shards" list."""
    order = [index for shard in range(n_shards) for index in range(shard, len(images), n_shards)]
    # tf.data's parallel map reads (and decodes, resizes, encodes) on every
    # core while this thread serializes and writes; `deterministic` keeps
    # `order`. On 2 cores, resizing 2,000 400x300 JPEGs to 224x224 took
    # 10.2 s with one call at a time, 5.2 s with AUTOTUNE.
    encoded_images = tf.data.Dataset.from_tensor_slices([images[i][0] for i in order]).map(
        _loader(image_size, channels), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True,
    ).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()
    shards, done, written = [], 0, 0
    start = last_report = time.monotonic()
    for shard in range(n_shards):
        name = SHARD_NAME.format(index=shard, count=n_shards)
        indices = range(shard, len(images), n_shards)
        with tf.io.TFRecordWriter(_join(partial, name)) as writer:
            for index in indices:
                encoded = next(encoded_images)
                path, label = images[index]
                filename = os.path.relpath(path, root).replace(os.sep, "/")
                record = _example(encoded, label=label, index=index, filename=filename)
                writer.write(record)
                done, written = done + 1, written + len(record)
                if time.monotonic() - last_report >= PROGRESS_EVERY_S:
                    last_report = time.monotonic()
                    progress(_progress_line(done, len(images), written, last_report - start))
        shards.append({"file": name, "count": len(indices)})
    progress(_progress_line(done, len(images), written, time.monotonic() - start) + f" in {n_shards} shards")
    return shards


def _progress_line(done, total, written, seconds):
    rate = done / seconds if seconds > 0 else 0.0
    return f"packed {done}/{total} images, {rate:.0f} images/s, {written / 1e6:.1f} MB written"


def _write_bytes(path, data):
    with tf.io.gfile.GFile(path, "wb") as file:
        file.write(data)


def _commit(partial, out):
    """Puts the finished `partial` in the place of `out` (absent, empty, or
    an earlier pack that `_check_out` let through)."""
    if _is_remote(out):
        # Object stores rename object by object: remove the old dataset.json
        # first and move the new one last, so that OUT never reads as packed
        # with files of two packs.
        if tf.io.gfile.exists(out):
            with_info = [INFO_FILE] if INFO_FILE in tf.io.gfile.listdir(out) else []
            for name in with_info + [n for n in tf.io.gfile.listdir(out) if n != INFO_FILE]:
                _remove_tree(_join(out, name))
        tf.io.gfile.makedirs(out)
        names = sorted(tf.io.gfile.listdir(partial), key=lambda n: n.rstrip("/") == INFO_FILE)
        for name in names:
            tf.io.gfile.rename(_join(partial, name), _join(out, name), overwrite=True)
        _remove_tree(partial)
        return
    if os.path.isdir(out) and os.listdir(out):  # an earlier pack: swap, then remove it
        old = f"{out}.old-{os.getpid()}"
        os.rename(out, old)
        os.rename(partial, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if os.path.isdir(out):
            os.rmdir(out)
        os.rename(partial, out)


# --- checks ---------------------------------------------------------------------------


def _check_options(image_size, shard_mb):
    if image_size is not None:
        try:
            image_size = tuple(int(side) for side in image_size)
        except (TypeError, ValueError):
            image_size = ()
        if len(image_size) != 2 or min(image_size) < 1:
            raise UsageError("image_size must be two positive integers (height, width), e.g. 224,224",
                             option="image_size")
    if not isinstance(shard_mb, (int, float)) or not 0 < shard_mb < math.inf:
        raise UsageError(f"shard_mb must be a number > 0, e.g. 128; received {shard_mb!r}", option="shard_mb")
    return image_size


def _check_folder(folder, root, out):
    if _is_remote(folder):
        raise UsageError(f"Cannot pack {folder!r}: the image folder must be local (OUT may be gs:// or s3://); "
                         "copy it to this machine first")
    if not os.path.isdir(root):
        what = "is a file" if os.path.exists(root) else "does not exist"
        raise UsageError(f"Dataset folder {folder!r} {what}: give a folder with one subfolder of images per class.")
    if os.path.isfile(os.path.join(root, INFO_FILE)):
        raise UsageError(f"{folder} is already a packed dataset (it holds {INFO_FILE}); train on it directly")
    if not _is_remote(out):
        inside = os.path.realpath(os.path.join(out, ""))  # resolved, even when out does not exist yet
        source = os.path.realpath(root)
        if os.path.commonpath([inside, source]) in (inside, source):
            raise UsageError(f"OUT {out!r} and the image folder {folder!r} overlap; write the pack outside the "
                             "folder (it would become a class folder of the next pack)")


def _check_out(out, *, overwrite):
    """Refuses an OUT that holds files, unless `overwrite` and it is an earlier pack."""
    if not _is_remote(out):
        atomic.check_writable(out, what="the packed dataset", hint="choose another OUT")
    if not tf.io.gfile.exists(out):
        return
    if not tf.io.gfile.isdir(out):
        raise UsageError(f"OUT {out!r} is a file; give a folder that does not exist yet")
    if not tf.io.gfile.listdir(out):
        return
    if not overwrite:
        raise UsageError(f"OUT {out!r} already exists and is not empty: choose another folder, or pass overwrite "
                         "to replace an earlier pack there", option=("overwrite",))
    if not tf.io.gfile.exists(_join(out, INFO_FILE)):
        raise UsageError(f"OUT {out!r} holds files but no {INFO_FILE}, so it is no earlier pack and overwrite "
                         "does not delete it: remove it yourself or choose another folder", option=("overwrite",))


def _list_classes(folder, root):
    class_names, files = file_checks.list_class_files(root)
    if not class_names:
        problem = "is empty" if not os.listdir(root) else "has no class subfolders"
        raise UsageError(f"Dataset folder {folder!r} {problem}: put one subfolder of images per class in it.")
    if len(class_names) < 2:
        raise UsageError(f"Dataset folder {folder!r} has one class subfolder ({class_names[0]!r}); it needs at "
                         "least 2 class subfolders.")
    return class_names, files


def _check_format(info, info_path):
    """Raises a UsageError unless `info` is a dataset.json of this version."""
    def bad(what):
        return UsageError(f"{info_path} is not a dlsuite packed dataset description ({what}); {_AGAIN}")

    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise bad(f"format is not {FORMAT!r}")
    if info.get("version") != VERSION:
        raise UsageError(f"{info_path} has version {info.get('version')!r}; this dlsuite reads version {VERSION}: "
                         "update dlsuite, or pack the source again")
    expected = {"classes": list, "count": int, "class_counts": list, "channels": int, "shards": list,
                "skipped": list, "source": str, "image_shape": (list, type(None)), "resized": (list, type(None))}
    for key, kinds in expected.items():
        if key not in info or not isinstance(info[key], kinds) or isinstance(info[key], bool):
            raise bad(f"{key!r} is missing or not a {kinds.__name__ if isinstance(kinds, type) else 'list or null'}")
    if info["channels"] not in (1, 3):
        raise bad(f"channels is {info['channels']}, not 1 or 3")
    for shard in info["shards"]:
        if not (isinstance(shard, dict) and isinstance(shard.get("file"), str) and isinstance(shard.get("count"), int)
                and "/" not in shard["file"].rstrip("/")):
            raise bad(f"shard entry {shard!r} is not {{'file': name, 'count': n}}")
    if len(info["class_counts"]) != len(info["classes"]) or sum(info["class_counts"]) != info["count"]:
        raise bad("class_counts do not match classes and count")


def _read_labels(path, info, names):
    if LABELS_FILE not in names:
        raise UsageError(f"{path} is missing; copy the whole folder again, or {_AGAIN}")
    try:
        with tf.io.gfile.GFile(path, "rb") as file:
            labels = np.load(io.BytesIO(file.read()), allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise UsageError(f"{path} is not a NumPy label array ({_one_line(error)}); {_AGAIN}") from None
    if labels.ndim != 1 or len(labels) != info["count"]:
        raise UsageError(f"{path} holds {labels.size} labels but {_join(os.path.dirname(path), INFO_FILE)} counts "
                         f"{info['count']} images; copy the whole folder again, or {_AGAIN}")
    classes = len(info["classes"])
    in_range = labels.dtype.kind in "iu" and (labels.size == 0 or 0 <= labels.min() <= labels.max() < classes)
    if not in_range or np.bincount(labels, minlength=classes).tolist() != info["class_counts"]:
        raise UsageError(f"{path} disagrees with the class_counts of {INFO_FILE}; {_AGAIN}")
    return labels.astype(np.int32)


# --- paths and leftovers -------------------------------------------------------------


def _is_remote(path):
    return "://" in path


def _expand(path):
    return path if _is_remote(path) else os.path.expanduser(path)


def _strip(path):
    stripped = path.rstrip("/")
    return stripped if stripped and not stripped.endswith(":/") else path


def _join(folder, name):
    return f"{folder.rstrip('/')}/{name}" if _is_remote(folder) else os.path.join(folder, name)


def _one_line(error):
    return " ".join(str(error).split()) or type(error).__name__


def _remove_tree(path):
    if tf.io.gfile.exists(path):
        if tf.io.gfile.isdir(path):
            tf.io.gfile.rmtree(path)
        else:
            tf.io.gfile.remove(path)


def _partials(out):
    """[(path, pid)] of the `OUT.partial-<pid>` folders beside `out`."""
    parent, base = os.path.split(out) if not _is_remote(out) else out.rsplit("/", 1)
    parent = parent or "."
    if not tf.io.gfile.isdir(parent):
        return []
    pattern = re.compile(rf"{re.escape(base)}\.partial-(\d+)/?")
    return [(_join(parent, name.rstrip("/")), int(match[1])) for name in tf.io.gfile.listdir(parent)
            if (match := pattern.fullmatch(name))]


def _interrupted_note(out):
    partials = [path for path, _ in _partials(out)]
    if not partials:
        return ""
    return f" ({partials[0]} beside it is a pack that was interrupted or is still running)"


def _remove_abandoned_partials(out, progress):
    """Removes the `OUT.partial-<pid>` folders that a killed pack left: on
    this machine, those whose process is gone; any, once older than a day
    (a pack on another machine sharing the folder)."""
    for path, pid in _partials(out):
        if pid == os.getpid():
            continue
        owner = {}
        try:
            with tf.io.gfile.GFile(_join(path, OWNER_FILE), "rb") as file:
                owner = json.loads(file.read().decode("utf-8"))
        except (tf.errors.OpError, ValueError, UnicodeDecodeError):
            pass
        if owner.get("host") == atomic.host() and owner.get("pid") == pid:
            abandoned = not atomic.process_alive(pid)
        else:
            abandoned = time.time() - _mtime(path) > atomic.FOREIGN_AGE_S
        if abandoned:
            _remove_tree(path)
            progress(f"removed {path}, left by a pack that was killed")


def _mtime(path):
    try:
        return tf.io.gfile.stat(path).mtime_nsec / 1e9
    except tf.errors.OpError:
        return time.time()
