"""Checks of image files, made before training reads them: fast (a file's
header and last bytes, not its pixels), in order, and remembered (a manifest
of size, modification time and verdict, so a second run re-checks only what
changed).

No TensorFlow here: `dlsuite data pack` and the apps' file checks need none.
"""

import concurrent.futures
import multiprocessing
import os
import resource
import sys
import time
import typing
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from dlsuite.apps.core.errors import UsageError
from dlsuite.apps.vision import manifest


# Files looked at in a class folder; anything else (.txt, .csv, ...) is ignored.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


# Formats `tf.io.decode_image` reads, as PIL names them.
DECODABLE_FORMATS = ("PNG", "JPEG", "BMP", "GIF")


# First bytes of each decodable format, to name a file whose header PIL rejects.
_SIGNATURES = {b"\x89PNG": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF", b"BM": "BMP"}


# PIL modes without colour; palette images are judged by their colours.
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


class FileCheck(typing.NamedTuple):
    """What checking one file found: an error reason, or its shape and colour.
    A named tuple: a second run makes one per file from the manifest, and a
    frozen dataclass took 6 us of the 15 us per file that run spends."""

    path: str
    reason: str | None = None
    shape: tuple | None = None  # (H, W, C) with C 3 for colour, 1 for gray
    colour: bool = False


def _is_colour(image):
    if image.mode in _GRAY_MODES:
        return False
    if image.mode in ("P", "PA"):
        # A palette can hold only grays; look at the colours actually used.
        rgb = np.asarray(image.convert("RGB"))
        return not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]))
    return True


def _sniff_format(path):
    """The decodable format `path` starts like, or None."""
    try:
        with open(path, "rb") as file:
            start = file.read(8)
    except OSError:
        return None
    return next((name for signature, name in _SIGNATURES.items() if start.startswith(signature)), None)


def _bmp_problem(path, mode):
    """Why TensorFlow's BMP decoder would fail on or misread `path`, or None.

    It reads only uncompressed 24- and 32-bit pixels and 8-bit ones as gray
    levels, ignoring any palette; PIL reads every variant, so check the header.
    """
    with open(path, "rb") as file:
        header = file.read(34)
    header_size = int.from_bytes(header[14:18], "little")
    bits = int.from_bytes(header[28:30], "little")
    compression = int.from_bytes(header[30:34], "little")
    if header_size < 40 or compression not in (0, 3):  # 3: bit fields, the usual 32-bit layout
        return "compressed or OS/2 BMP, which TensorFlow cannot decode (save it as PNG)"
    if bits in (24, 32) or (bits == 8 and mode == "L"):
        return None
    if bits == 8:
        return "8-bit colour-palette BMP, which TensorFlow decodes as gray levels (save it as PNG)"
    return f"{bits}-bit BMP, which TensorFlow cannot decode (save it as PNG)"


def _is_utf8(path):
    """False for a file name os.listdir gave with undecodable bytes (surrogate escapes): tf.data takes UTF-8 only."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _truncated(path, format_, size, tail=None):
    """Whether `path` ends before its format's end marker: a cut-off copy or
    download, found from the file's last bytes (`tail`, read here when not
    given) without decoding it."""
    if tail is None:
        with open(path, "rb") as file:
            file.seek(max(0, size - 64))
            tail = file.read()
    tail = tail.rstrip(b"\x00\r\n ")  # padding some writers add after the end
    if format_ == "JPEG":
        return b"\xff\xd9" not in tail
    if format_ == "PNG":
        return b"IEND" not in tail
    if format_ == "GIF":
        return not tail.endswith(b";")
    return False


def _bmp_truncated(image, size):
    """Whether an uncompressed BMP holds fewer bytes than its pixel rows need."""
    offset = image.tile[0][2] if image.tile else 0
    bits = image.info.get("bits") or {"1": 1, "L": 8, "P": 8, "RGB": 24, "RGBA": 32}.get(image.mode, 24)
    row = (image.size[0] * bits + 31) // 32 * 4
    return offset + row * image.size[1] > size


# JPEG start-of-frame markers (the frame's size and components follow); C4, C8 and CC are other segments.
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


_JPEG_HEAD_BYTES = 65_536  # EXIF and ICC segments come before the frame
_JPEG_FIRST_BYTES = 4_096  # where a photo without them has its frame: read first


def _jpeg_frame(head):
    """(height, width, components) from a JPEG's frame header, parsed without
    PIL (whose header parse is Python code holding the GIL: a third of the
    check's time); None when not found in `head`, the file's first bytes."""
    if not head.startswith(b"\xff\xd8"):
        return None
    at = 2
    while at + 9 < len(head):
        if head[at] != 0xFF:
            return None
        marker = head[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        length = int.from_bytes(head[at + 2:at + 4], "big")
        if marker in _JPEG_FRAMES:
            height, width = int.from_bytes(head[at + 5:at + 7], "big"), int.from_bytes(head[at + 7:at + 9], "big")
            return height, width, head[at + 9]
        at += 2 + length
    return None


def _check_jpeg(path, size):
    """The check of a JPEG with 1 or 3 components, from its frame header and
    end marker; None to leave the file to PIL (anything else, damage included).
    Read with `os.open` / `os.read`, no buffered file object: half the time
    of the check at 50,000 photos."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        head = os.read(descriptor, _JPEG_FIRST_BYTES)
        frame = _jpeg_frame(head)
        if frame is None and len(head) == _JPEG_FIRST_BYTES:  # EXIF or ICC segments first
            head += os.read(descriptor, _JPEG_HEAD_BYTES - len(head))
            frame = _jpeg_frame(head)
        if frame is None or frame[2] not in (1, 3) or 0 in frame[:2]:
            return None
        # Most photos fit in the head: their end is in it, no second read.
        tail = head[-64:] if size <= len(head) else os.pread(descriptor, 64, max(0, size - 64))
    finally:
        os.close(descriptor)
    if _truncated(path, "JPEG", size, tail=tail):
        return FileCheck(path, reason="truncated JPEG")
    height, width, components = frame
    return FileCheck(path, shape=(height, width, components), colour=components == 3)


def _check_image(path, size=None):
    """Checks `path` from its header and its last bytes, without decoding the
    pixels (about 20x faster than a full decode: damage in the middle of a
    file is found when training reads it, and the file is skipped then);
    returns a `FileCheck` with a reason if it cannot be used. `size`: the
    file's size when the caller has just read it."""
    format_ = None  # known once PIL has read the header
    if not _is_utf8(path):
        return FileCheck(path, reason="its name is not UTF-8, which TensorFlow cannot open (rename the file)")
    try:
        size = os.path.getsize(path) if size is None or size < 0 else size
        if size == 0:
            return FileCheck(path, reason="empty file")
        if path.lower().endswith((".jpg", ".jpeg")) and (check := _check_jpeg(path, size)):
            return check
        with Image.open(path) as image:
            format_ = image.format
            if format_ not in DECODABLE_FORMATS:
                return FileCheck(path, reason=f"{format_} image, which TensorFlow cannot decode "
                                               f"(use {', '.join(DECODABLE_FORMATS)})")
            if format_ == "BMP" and (problem := _bmp_problem(path, image.mode)):
                return FileCheck(path, reason=problem)
            if _truncated(path, format_, size) or (format_ == "BMP" and _bmp_truncated(image, size)):
                return FileCheck(path, reason=f"truncated {format_}")
            colour = _is_colour(image)
            width, height = image.size
    except UnidentifiedImageError:
        format_ = _sniff_format(path)
        return FileCheck(path, reason=f"damaged {format_} header" if format_ else "not an image")
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        # PIL reports damage as OSError ("image file is truncated", "Truncated
        # File Read"), SyntaxError ("broken PNG file") or ValueError, by format.
        message = " ".join(str(error).split()) or type(error).__name__
        if isinstance(error, (PermissionError, FileNotFoundError)):
            return FileCheck(path, reason=f"cannot open: {error.strerror}")
        format_ = format_ or _sniff_format(path) or "image"
        if "truncated" in message.lower():
            return FileCheck(path, reason=f"truncated {format_}")
        return FileCheck(path, reason=f"damaged {format_}: {message}")
    return FileCheck(path, shape=(height, width, 3 if colour else 1), colour=colour)


def list_class_files(root):
    """Returns the sorted class names and, per class, its sorted image files (recursive)."""
    entries = sorted(os.scandir(root), key=lambda entry: entry.name)
    class_dirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
    files = {}
    for class_dir in class_dirs:
        found = []
        for folder, subfolders, filenames in os.walk(class_dir.path, followlinks=True):
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
            found.extend(
                os.path.join(folder, f) for f in filenames
                if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
            )
        files[class_dir.name] = sorted(found)
    return [e.name for e in class_dirs], files


# Seconds between progress lines of a long check.
PROGRESS_EVERY = 5.0


# Files checked in one go before deciding whether the checks wait on the disk.
CHECK_CHUNK = 1_000


# Files left to check after the first chunk for the checks to go to processes.
PROCESS_MIN_FILES = 10_000


def _checked(files):
    """Yields `_check_image` of each (path, size) of `files`, in order.

    This thread checks a first chunk. If that waited on the disk for one
    file in ten (a cold or network disk, where reads overlap), a pool of
    threads checks the rest. Else the files are in the page cache and the
    checks are CPU work: with many left and more than one core, processes
    forked from this one check them (threads would only contend for the GIL,
    2x to 4x slower measured at 50,000 photos); otherwise this thread goes on."""
    at = 0
    while at < len(files):
        waits = _blocking_waits()
        for path, size in files[at:at + CHECK_CHUNK]:
            yield _check_image(path, size)
        at += CHECK_CHUNK
        if _blocking_waits() - waits > CHECK_CHUNK // 10:
            yield from _pooled(files[at:], threads=True)
            return
        if len(files) - at >= PROCESS_MIN_FILES and _processes() > 1:
            yield from _pooled(files[at:], threads=False)
            return


def _processes():
    """Processes the checks may fork: the cores, where forking is safe (Linux)."""
    return (os.cpu_count() or 1) if sys.platform.startswith("linux") else 1


def _pooled(files, *, threads):
    """`_check_image` of each of `files`, in order, by a pool of threads or of forked processes."""
    chunks = [files[i:i + CHECK_CHUNK // 10] for i in range(0, len(files), CHECK_CHUNK // 10)]
    if threads:
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) + 4))
        try:
            for checks in pool.map(_check_each, chunks):
                yield from checks
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return
    with warnings.catch_warnings():
        # Python 3.12+ warns that forking a process with threads (TensorFlow's)
        # may deadlock the child: these children run only os and PIL calls.
        warnings.simplefilter("ignore", DeprecationWarning)
        pool = multiprocessing.get_context("fork").Pool(_processes())
    try:
        for checks in pool.imap(_check_each, chunks):
            yield from checks
    finally:
        pool.terminate()


def _blocking_waits():
    """How often this thread has blocked (a read waiting on the disk, or on
    the network for a network disk): its voluntary context switches. Time
    taken by other processes on a busy machine is not counted, as it would be
    by comparing CPU and wall time. 0 where the system does not say (the
    checks then stay in this thread)."""
    try:
        return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw
    except (AttributeError, OSError):
        return 0


def _check_each(files):
    return [_check_image(path, size) for path, size in files]


def check_images(paths, *, strict, manifest_path=None):
    """Checks every file (`_check_image`, see `_checked`), keeping the order.

    With `manifest_path`, a file whose size and modification time match its
    line in that manifest keeps the verdict found then, and the manifest is
    rewritten with this run's verdicts.

    Returns:
        [FileCheck] in the order of `paths`; `reused`, the count taken from
        the manifest, as an attribute of the list.
    """
    known = manifest.read(manifest_path) if manifest_path else {}
    verdicts = {}  # a manifest's verdict -> its FileCheck fields: most files share a few
    stats, checks, todo = [], [None] * len(paths), []
    for i, path in enumerate(paths):
        try:
            stat = os.stat(path)
            stats.append((stat.st_size, stat.st_mtime_ns))
        except OSError:
            stats.append((-1, -1))
        entry = known.get(path)
        if entry and entry[:2] == stats[-1]:
            verdict = entry[2]
            if verdict not in verdicts:
                verdicts[verdict] = _from_verdict(verdict)
            if verdicts[verdict] is not None:
                checks[i] = FileCheck(path, *verdicts[verdict])
                continue
        todo.append(i)
    start = last = time.monotonic()
    checked = _checked([(paths[i], stats[i][0]) for i in todo])
    try:
        for done, (i, check) in enumerate(zip(todo, checked), 1):
            checks[i] = check
            if strict and check.reason:
                raise UsageError(f"Cannot read image {check.path!r}: {check.reason} (strict mode; "
                                 "fix or remove the file, or run without strict to skip it).")
            if time.monotonic() - last > PROGRESS_EVERY:
                last = time.monotonic()
                print(f"checking images: {done:,}/{len(todo):,} ({done / (last - start):,.0f} files/s)",
                      file=sys.stderr, flush=True)
    finally:
        checked.close()  # a strict stop cancels the checks still queued
    if strict:
        bad = next((check for check in checks if check.reason), None)
        if bad:
            raise UsageError(f"Cannot read image {bad.path!r}: {bad.reason} (strict mode; "
                             "fix or remove the file, or run without strict to skip it).")
    if manifest_path and (todo or len(known) != len(paths)):  # unchanged: nothing to rewrite
        manifest.write(manifest_path, [(check.path, *stat, _fields(check)) for check, stat in zip(checks, stats)
                                       if stat[0] >= 0])
    result = _Checks(checks)
    result.reused = len(paths) - len(todo)
    return result


class _Checks(list):
    """A list of `FileCheck` that also says how many came from the manifest."""

    reused = 0


def _fields(check):
    """A check as the manifest's verdict fields."""
    if check.reason:
        return [check.reason]
    return ["ok", *map(str, check.shape), "colour" if check.colour else "gray"]


def _from_verdict(verdict):
    """(reason, shape, colour) from a manifest line's verdict, or None for one it cannot read."""
    fields = verdict.split("\t")
    if fields[0] != "ok":
        return fields[0], None, False
    if len(fields) != 5 or not all(field.isdigit() for field in fields[1:4]):
        return None
    return None, tuple(int(field) for field in fields[1:4]), fields[4] == "colour"

