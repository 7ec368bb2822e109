"""Token files: a text file encoded once into ids on disk, read memory-mapped.

`lm train --text FILE` reads the text twice, a few MB at a time, and never
holds it whole (#25: a 204 MB file held 1.23 GB before the first step):

1. the characters used (`--max-chars`, 0 for all) are counted into the
   vocabulary (`text.TokenCounts`), and the whole file is checked as
   `text.load_text` checks it;
2. they are encoded into `<cache>/<file name>-<key>.bin`, raw ids as uint16
   when the vocabulary has at most 65,536 ids, else uint32 (nanoGPT's
   `data/shakespeare_char/prepare.py` writes `train.bin` the same way), with
   `<...>.json` beside it: the vocabulary, the counts, what the key was made of.

The key hashes the file's absolute path, size and modification time with the
level, max_tokens and max_chars, so a later run on the same text reuses the
file and an edited text gets a new one. Both files are written under a
temporary name and renamed into place, the .bin first: a killed run leaves a
temporary (removed by the next write) or a .bin without its .json, and a
.bin whose size is not the .json's count is rebuilt, never read.

Training reads windows from the file with `TokenSpan.gather`, which maps the
file for one batch at a time; nothing else of the file is held.
"""

import dataclasses
import hashlib
import json
import mmap
import os
import pathlib
import time
import weakref

import numpy as np

from dlsuite.apps.core import atomic, rundir, user_cache
from dlsuite.apps.core.errors import UsageError
from dlsuite.apps.lm import text

FORMAT_VERSION = 1


def default_cache_dir():
    """`$XDG_CACHE_HOME/dlsuite/tokens`, or `~/.cache/dlsuite/tokens`: where
    token files go unless `--token-cache` says otherwise."""
    return pathlib.Path(user_cache.root()) / "tokens"


class _OpenFile:
    """A token file held open for reading while any span of it is in use.

    Read through its descriptor, a run keeps reading the file it started
    with even if the cache folder is emptied or the file rebuilt meanwhile.
    """

    def __init__(self, path):
        self.path = str(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        self._close = weakref.finalize(self, os.close, self.fd)

    def read(self, offset, size):
        """`size` bytes from `offset` (pread, so spans share the descriptor without a file position)."""
        parts = []
        while size > 0:
            part = os.pread(self.fd, min(size, 2**30), offset)
            if not part:
                raise UsageError(f"Token file {self.path!r} is shorter than its .json says: delete it and run again.")
            parts.append(part)
            offset, size = offset + len(part), size - len(part)
        return b"".join(parts)


@dataclasses.dataclass(frozen=True)
class TokenSpan:
    """Ids `start` to `stop` of a token file: a 1-D sequence that stays on disk.

    What `text.windows`, `text.split_by_position`, `text.unigram_entropy`
    and `Vocabulary.decoded_length` take in place of an array: slicing gives
    another span of the same file, `chunks` reads it in order, `gather`
    reads windows.
    """

    file: _OpenFile = dataclasses.field(repr=False, compare=False)
    dtype: str
    start: int
    stop: int

    @property
    def path(self):
        return self.file.path

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, key):
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError(f"a TokenSpan takes a slice with step 1, received {key!r}")
        start, stop, _ = key.indices(len(self))
        return dataclasses.replace(self, start=self.start + start, stop=self.start + max(start, stop))

    def __array__(self, dtype=None, copy=None):
        """All the ids in memory (a short span, a test, a parameter-server run)."""
        ids = self._read(self.start, len(self))
        return ids if dtype is None else ids.astype(dtype)

    def _read(self, start, count):
        itemsize = np.dtype(self.dtype).itemsize
        return np.frombuffer(self.file.read(start * itemsize, count * itemsize), dtype=self.dtype)

    def chunks(self, size):
        """Yields the ids in order as int64 arrays of at most `size`.

        Read with file reads, not through a memory map: a pass over the
        whole file would otherwise leave every page of it in this process's
        resident memory.
        """
        for start in range(self.start, self.stop, size):
            yield self._read(start, min(size, self.stop - start)).astype(np.int64)

    def gather(self, starts, width):
        """The ids `starts[i] : starts[i] + width` of this span, as int32 (len(starts), width).

        The file is memory-mapped for this call only: as nanoGPT's
        `train.py` recreates its `np.memmap` every batch, so that the pages
        read do not stay in the process's resident memory over an epoch.
        """
        offsets = self.start + np.asarray(starts, dtype=np.int64)[:, None] + np.arange(width)  # (windows, width)
        with mmap.mmap(self.file.fd, 0, access=mmap.ACCESS_READ) as mapped:
            ids = np.frombuffer(mapped, dtype=self.dtype)
            windows = ids[offsets].astype(np.int32)
            del ids  # the map closes only once no array points into it
        return windows


@dataclasses.dataclass
class Corpus:
    """A text ready for training.

    Attributes:
        name: the file as given, "stdlib-docstrings" or "tfds:NAME".
        vocabulary: a `text.Vocabulary`.
        ids: the token ids: an int32 array, or a `TokenSpan` of `token_file`.
        characters: the characters used (the first `--max-chars`).
        total_characters: the characters of the whole text.
        token_file: the .bin that `ids` reads, or None for ids in memory.
        seconds: how long writing the token file took; None when it was there already.
    """

    name: str
    vocabulary: object
    ids: object
    characters: int
    total_characters: int
    token_file: pathlib.Path | None = None
    seconds: float | None = None


def in_memory(name, whole, *, level, max_tokens, max_chars):
    """A `Corpus` of a text already in memory (the default corpus, TFDS), cut to `max_chars` (None: all)."""
    used = whole[:max_chars]
    vocabulary = text.build_vocabulary(used, level=level, max_tokens=max_tokens)
    return Corpus(name, vocabulary, vocabulary.encode(used), characters=len(used), total_characters=len(whole))


def load(spec, *, level, max_tokens, max_chars, cache_dir, chunk_bytes=text.CHUNK_BYTES):
    """The `Corpus` of the text file `spec`, from its token file, written first if needed.

    Args:
        spec: the path of a UTF-8 text file, as the user gave it.
        level, max_tokens: as `text.build_vocabulary`'s.
        max_chars: use the first this many characters; None for all.
        cache_dir: the folder of token files.
        chunk_bytes: bytes of the text read at a time.

    Raises:
        UsageError: a bad text file (as `text.load_text`), bad vocabulary
            options, a cache folder that cannot be written, or a file that
            changed while it was read.
    """
    path = text.text_file_path(spec)
    counts = text.TokenCounts(level, max_tokens=max_tokens)  # bad options before any reading
    stat = os.stat(path)
    source = {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    settings = {"format_version": FORMAT_VERSION, "source": source, "level": level, "max_tokens": max_tokens,
                "max_chars": max_chars}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    stem = rundir.slug(os.path.basename(path))[:64]
    bin_path = pathlib.Path(cache_dir).expanduser() / f"{stem}-{key}.bin"
    corpus = _open(spec, bin_path, settings)
    if corpus is not None:
        return corpus
    atomic.check_writable(bin_path.parent, what="token files", option="token_cache",
                          hint="pass --token-cache with a folder you can write to")
    started = time.monotonic()
    used, total = _count(spec, counts, max_chars=max_chars, chunk_bytes=chunk_bytes)
    vocabulary = counts.vocabulary()
    dtype = "uint16" if vocabulary.size <= 2**16 else "uint32"
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(bin_path) as temporary, open(temporary, "wb") as file:
        written = 0
        for piece in _used_pieces(spec, level, max_chars=max_chars, chunk_bytes=chunk_bytes):
            ids = vocabulary.encode(piece).astype(dtype)
            ids.tofile(file)
            written += len(ids)
    stat = os.stat(path)
    if (stat.st_size, stat.st_mtime_ns) != (source["size"], source["mtime_ns"]):
        atomic.remove(bin_path)
        raise UsageError(f"Text file {spec!r} changed while it was read: run again once it is written.")
    meta = {**settings, "dtype": dtype, "tokens": written, "characters": used, "total_characters": total,
            "vocabulary": vocabulary.to_json()}
    rundir.write_json(bin_path.with_suffix(".json"), meta)
    _remove_stale(bin_path, source)
    return dataclasses.replace(_corpus(spec, bin_path, meta, vocabulary), seconds=time.monotonic() - started)


def _count(spec, counts, *, max_chars, chunk_bytes):
    """Adds the used characters' tokens to `counts`; returns (characters used, characters of the file).

    The whole file is read, past `max_chars` too: for its length, and so
    that every bad byte is reported as `text.load_text` reports it.
    """
    total = 0

    def tallied(pieces):
        nonlocal total
        for piece in pieces:
            total += len(piece)
            yield piece

    pieces = tallied(text.read_text_chunks(spec, chunk_bytes=chunk_bytes))
    used = 0
    for piece in _aligned(_first(pieces, max_chars), counts.level):
        counts.add(piece)
        used += len(piece)
    for _ in pieces:  # after the cap: counted and checked only
        pass
    return used, total


def _used_pieces(spec, level, *, max_chars, chunk_bytes):
    """The first `max_chars` characters of the file, in pieces ready to encode."""
    pieces = text.read_text_chunks(spec, chunk_bytes=chunk_bytes)
    return _aligned(_first(pieces, max_chars), level)


def _first(pieces, limit):
    """The pieces of the first `limit` characters (all of them for None); stops at the limit."""
    left = limit
    for piece in pieces:
        if left is not None:
            piece = piece[:left]
            left -= len(piece)
        if piece:
            yield piece
        if left == 0:
            return


def _aligned(pieces, level):
    """Words are counted and encoded on whole lines; characters on any piece."""
    return text.whole_lines(pieces) if level == "word" else pieces


def _open(spec, bin_path, settings):
    """The `Corpus` of an existing token file made with `settings`, or None (absent, damaged, other settings)."""
    try:
        meta = json.loads(bin_path.with_suffix(".json").read_text(encoding="utf-8"))
        size = bin_path.stat().st_size
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or any(meta.get(key) != value for key, value in settings.items()):
        return None
    try:
        vocabulary = text.Vocabulary.from_json(meta["vocabulary"])
        complete = size == int(meta["tokens"]) * np.dtype(meta["dtype"]).itemsize
    except (KeyError, TypeError, ValueError, UsageError):
        return None
    return _corpus(spec, bin_path, meta, vocabulary) if complete else None


def _corpus(spec, bin_path, meta, vocabulary):
    ids = TokenSpan(_OpenFile(bin_path), meta["dtype"], 0, int(meta["tokens"]))
    return Corpus(spec, vocabulary, ids, characters=int(meta["characters"]),
                  total_characters=int(meta["total_characters"]), token_file=bin_path)


def _remove_stale(bin_path, source):
    """Removes the token files of earlier versions of the same text file (another size or time): no key reaches them."""
    for meta_path in bin_path.parent.glob(f"{atomic.glob_escape(bin_path.stem.rsplit('-', 1)[0])}-*.json"):
        try:
            old = json.loads(meta_path.read_text(encoding="utf-8"))["source"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(old, dict) and old.get("path") == source["path"] and old != source:
            atomic.remove(meta_path.with_suffix(".bin"))
            atomic.remove(meta_path)
