"""Text for the language-modeling app: corpus, vocabulary, training windows.

The recipe the app follows, one function a step:

1. `load_text(spec)`: the text, from a UTF-8 file, a TensorFlow Datasets text
   set ("tfds:NAME") or, by default, `default_corpus()`: the docstrings of the
   Python standard library, real English every machine already has. A file
   can also be read a piece at a time (`read_text_chunks`), in the same
   characters.
2. `build_vocabulary(text, level=...)`: characters, or words as
   `keras.layers.TextVectorization` counts and orders them; `TokenCounts`
   gathers the same counts a piece at a time. A `Vocabulary` encodes and
   decodes.
3. `split_by_position(ids)`: train is the start of the text, validation its
   end, so no validation token was ever a training target.
4. `windows(ids, ...)`, `window_order(ids, ...)`: (inputs, targets) batches,
   targets shifted by one, gathered batch by batch from the ids (an array, or
   a `token_file.TokenSpan` on disk).
5. `unigram_entropy(...)`: the baseline a model must beat.

Word-level tokenization is TextVectorization's own, written out here so that
an exported model can repeat it with `tf.strings` (see `word_tokens`):

1. lower-case ASCII letters only (`tf.strings.lower`; "É" stays "É");
2. delete the 32 ASCII punctuation characters of `string.punctuation`
   (`tf.strings.regex_replace(text, PUNCTUATION_REGEX, "")`; so "don't" is
   "dont" and "a-b" is "ab"; other characters such as "—" or "«" stay);
3. split on runs of ASCII whitespace, " \\t\\n\\v\\f\\r" (`tf.strings.split`;
   a no-break space does not split).
"""

import ast
import codecs
import collections
import dataclasses
import functools
import gc
import math
import numbers
import os
import re
import string
import sysconfig

import numpy as np
import tensorflow as tf

from dlsuite.apps.core import epochs, tfds_sets
from dlsuite.apps.core.errors import UsageError

TFDS_PREFIX = "tfds:"
DEFAULT_CORPUS_NAME = "stdlib-docstrings"
LEVELS = ("char", "word")
PADDING = ""  # id 0
UNKNOWN = "[UNK]"  # id 1, every token outside the vocabulary
RESERVED = (PADDING, UNKNOWN)
WORD_MAX_TOKENS = 20_000

# TextVectorization's settings for words and, verbatim from Keras 3, the regex
# behind its "strip_punctuation": exactly the characters of string.punctuation.
STANDARDIZE = "lower_and_strip_punctuation"
SPLIT = "whitespace"
PUNCTUATION_REGEX = r'[!"#$%&()\*\+,-\./:;<=>?@\[\\\]^_`{|}~\']'
# The same rules for Python strings: one pass of str.translate is ~50x faster
# than the regex, and the tests check both against the layer.
_STANDARDIZE_TABLE = str.maketrans(string.ascii_uppercase, string.ascii_lowercase, string.punctuation)
_WORD = re.compile(r"[^ \t\n\v\f\r]+")  # tf.strings.split's whitespace is ASCII only
_ASCII_SPACES = " \t\v\f\r"  # tf.strings.split's whitespace, but the line end
# A line of whitespace only (str.isspace, as str.strip sees it): the word
# vocabulary has always been adapted on the text's non-blank lines, so the
# tokens of such a line (a no-break space) are not counted.
_BLANK_LINES = re.compile(r"^[^\S\n]+$", re.MULTILINE)
# Bytes of a text file read at a time: a few MB keep the reading fast and
# the memory of a piece (its str, UTF-32 code points, ids) under 100 MB.
CHUNK_BYTES = 4 * 2**20

# Standard-library folders whose docstrings are not prose worth learning from
# (tests, codec tables, generated help topics, demos) or not the stdlib at all.
_SKIPPED_FOLDERS = frozenset({
    "__pycache__", "dist-packages", "encodings", "ensurepip", "idlelib", "lib2to3", "pydoc_data",
    "site-packages", "test", "tests", "turtledemo",
})
# A paragraph is kept as prose when it is this long and this much letters and spaces.
_MIN_PARAGRAPH_CHARS = 40
_MIN_LETTER_FRACTION = 0.85
# Deletes letters and spaces, leaving the characters that count against prose.
_NOT_PROSE = str.maketrans("", "", string.ascii_letters + " ")
_DEFINITIONS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_BLOCKS = (ast.If, ast.Try, getattr(ast, "TryStar", ast.Try), ast.With, ast.AsyncWith, ast.For,
           ast.AsyncFor, ast.While)


# --- corpus -----------------------------------------------------------------------


def _stdlib_sources():
    """The standard library's .py files outside `_SKIPPED_FOLDERS`, in sorted relative path order."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for folder, subfolders, filenames in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in _SKIPPED_FOLDERS and not d.startswith(".")]
        found.extend(os.path.join(folder, f) for f in filenames if f.endswith(".py"))
    return sorted(found, key=lambda path: os.path.relpath(path, root).split(os.sep))


def _docstrings(node):
    """Yields the docstrings of `node` and the classes and functions in it, in source order.

    Walks statements only (definitions, also under if/try/with/for/while):
    `ast.walk` would visit every expression and take twice as long.
    """
    docstring = ast.get_docstring(node, clean=True)  # clean: through inspect.cleandoc
    if docstring:
        yield docstring
    pending = list(reversed(node.body))
    while pending:
        child = pending.pop()
        if isinstance(child, _DEFINITIONS):
            yield from _docstrings(child)
        elif isinstance(child, _BLOCKS):
            nested = [*child.body, *getattr(child, "handlers", ()), *getattr(child, "orelse", ()),
                      *getattr(child, "finalbody", ())]
            pending.extend(reversed(nested))
        elif isinstance(child, ast.ExceptHandler):
            pending.extend(reversed(child.body))


def _is_prose(paragraph):
    """Whether a docstring paragraph reads as English rather than code, doctest or table."""
    if len(paragraph) < _MIN_PARAGRAPH_CHARS or not paragraph.isascii():
        return False
    if any(line.lstrip().startswith(">>>") for line in paragraph.splitlines()):
        return False  # a doctest, its outputs included
    # Indentation would pass code off as prose: judge the words alone.
    words = " ".join(paragraph.split())
    return len(words.translate(_NOT_PROSE)) <= (1.0 - _MIN_LETTER_FRACTION) * len(words)


def _parse(source, path):
    """`ast.parse` with the cyclic garbage collector paused.

    A parse allocates tens of thousands of nodes, which trigger collections;
    with TensorFlow loaded each one walks a large heap, doubling the corpus
    time. The trees hold no reference cycles, so reference counting frees them.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(source, filename=path)
    finally:
        if enabled:
            gc.enable()


def default_corpus(max_chars=3_000_000):
    """Gathers English prose from the docstrings of the Python standard library.

    Every Python installation carries it, so the language-modeling app has real
    text with no download and none copied into this repository. The source
    files are parsed with `ast`, never imported (importing runs module code),
    in sorted path order; module, class and function docstrings are cleaned
    with `inspect.cleandoc` and cut into paragraphs at blank lines. A paragraph
    is kept when it is ASCII, at least 40 characters, at least 85% letters and
    spaces once runs of whitespace count as one space, and has no doctest
    (`>>>`) line; the few non-ASCII paragraphs would add characters seen only a
    handful of times. Kept paragraphs are joined with blank lines.

    The text depends on the Python version only: Python 3.11.7 gives 1.37
    million characters over 96 distinct ones, in about 2 seconds.

    Args:
        max_chars: stop before the paragraph that would make the text longer.

    Returns:
        The corpus, at most `max_chars` characters.
    """
    kept, size = [], 0
    for path in _stdlib_sources():
        with open(path, "rb") as file:
            source = file.read()
        try:
            tree = _parse(source, path)
        except (SyntaxError, ValueError):  # a file for another Python version; no prose lost
            continue
        for docstring in _docstrings(tree):
            for paragraph in re.split(r"\n[ \t]*\n", docstring):
                paragraph = paragraph.strip("\n")
                if not _is_prose(paragraph):
                    continue
                size += len(paragraph) + (2 if kept else 0)
                if size > max_chars:
                    return "\n\n".join(kept)
                kept.append(paragraph)
    return "\n\n".join(kept)


def load_text(spec, *, data_dir=None):
    """Loads the text to train a language model on.

    Args:
        spec: None for `default_corpus()`; "tfds:NAME[/CONFIG]" for the train
            split of a TensorFlow Datasets set with a string feature (e.g.
            "tfds:tiny_shakespeare"), downloaded if needed; otherwise the path
            of a UTF-8 text file.
        data_dir: TFDS only, where TensorFlow Datasets keeps its files.

    Returns:
        (name, text): "stdlib-docstrings", "tfds:NAME" or the path as given,
        and the text with line ends as "\\n".

    Raises:
        UsageError: a missing, empty, binary or non-UTF-8 file; an unknown
            TFDS name or one without a string feature.
    """
    if spec is None:
        return DEFAULT_CORPUS_NAME, default_corpus()
    spec = os.fspath(spec)
    if spec.startswith(TFDS_PREFIX):
        name = spec[len(TFDS_PREFIX):]
        return f"{TFDS_PREFIX}{name}", _load_tfds(name, data_dir=data_dir)
    return spec, _read_text_file(spec)


def _read_text_file(spec):
    return "".join(read_text_chunks(spec))


def text_file_path(spec):
    """The path of the text file `spec` (with ~ expanded).

    Raises:
        UsageError: a folder, or no file there.
    """
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        raise UsageError(f"Text path {spec!r} is a folder: give a UTF-8 text file.")
    if not os.path.exists(path):
        raise UsageError(f"Text file {spec!r} does not exist: check the path.")
    return path


def read_text_chunks(spec, *, chunk_bytes=CHUNK_BYTES):
    """Reads a UTF-8 text file a piece at a time, in the characters of `load_text`.

    The pieces joined are `load_text(spec)`'s text: a byte order mark at the
    start dropped, "\\r\\n" and "\\r" read as "\\n" (a CRLF across two reads
    too), a character split across two reads decoded whole.

    Args:
        spec: the path of the file, as the user gave it.
        chunk_bytes: bytes read at a time.

    Returns:
        An iterator of non-empty strings. The path is checked now; the
        content as it is read, with `load_text`'s errors: the NUL check and
        the UTF-8 check cover the whole file, so an error comes once the
        file is read up to it (a NUL, at once) or, for an empty file or one
        that is not UTF-8, at its end (a NUL further on is reported first).

    Raises:
        UsageError: a missing, unreadable, empty, binary or non-UTF-8 file.
    """
    path = text_file_path(spec)
    try:
        file = open(path, "rb")
    except OSError as error:
        raise UsageError(f"Cannot read text file {spec!r}: {error.strerror}.") from None
    return _decoded_pieces(file, spec, int(chunk_bytes))


def _decoded_pieces(file, spec, chunk_bytes):
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, blank, bad_byte, held, started = 0, True, None, "", False
    with file:
        while True:
            try:
                data = file.read(chunk_bytes)
            except OSError as error:
                raise UsageError(f"Cannot read text file {spec!r}: {error.strerror}.") from None
            final = not data
            if b"\x00" in data:
                raise UsageError(
                    f"Text file {spec!r} looks binary (it has NUL bytes): give a UTF-8 text file."
                )
            blank = blank and not data.strip()
            if bad_byte is None:  # after the first bad byte, the rest is only checked for NULs
                pending = len(decoder.getstate()[0])  # bytes of a character the last read split
                try:
                    text = decoder.decode(data, final=final)
                except UnicodeDecodeError as error:
                    bad_byte, text = offset - pending + error.start, ""
                if text and not started:
                    text, started = text.removeprefix("\ufeff"), True
                # A "\r" at the end may be the first half of a CRLF: it waits for the next piece.
                text, held = held + text, ""
                if text.endswith("\r") and not final:
                    text, held = text[:-1], "\r"
                # A BOM or Windows line ends would each add a character to the vocabulary.
                text = text.replace("\r\n", "\n").replace("\r", "\n")
                if text:
                    yield text
            offset += len(data)
            if final:
                break
    if blank:
        raise UsageError(f"Text file {spec!r} is empty: give a file with the text to train on.")
    if bad_byte is not None:
        raise UsageError(
            f"Text file {spec!r} is not valid UTF-8 (byte {bad_byte}): convert it, e.g. "
            "`iconv -f latin1 -t utf-8`."
        )


def whole_lines(pieces, *, longest=CHUNK_BYTES):
    """Regroups text pieces so that each ends at a line end ("\\n"), but the last.

    What word-level counting and encoding read: no word is cut in two, nor
    any line up to `longest` characters. A longer one is cut after an ASCII
    space between its first and its last non-space character, so memory
    stays bounded and neither part reads as a blank line; a line of nothing
    but whitespace is never cut.
    """
    carry = ""
    for piece in pieces:
        carry += piece
        cut = carry.rfind("\n") + 1
        if not cut and len(carry) > longest:
            first, end = len(carry) - len(carry.lstrip()), len(carry.rstrip())
            cut = max(carry.rfind(space, first, end) for space in _ASCII_SPACES) + 1
        if cut:
            yield carry[:cut]
            carry = carry[cut:]
    if carry:
        yield carry


def _string_feature(features, tfds):
    """The name of the feature to read text from: "text" if it is a string, else the first string one."""
    if not isinstance(features, tfds.features.FeaturesDict):
        return None
    strings = [
        key for key, feature in features.items()
        if isinstance(feature, tfds.features.Text)
        or (isinstance(feature, tfds.features.Tensor) and feature.shape == ()
            and tf.as_dtype(feature.dtype) == tf.string)
    ]
    return "text" if "text" in strings else next(iter(strings), None)


def _load_tfds(name, *, data_dir):
    """The train split's string feature, example texts joined by newlines."""
    import tensorflow_datasets as tfds

    builder = tfds_sets.builder(name, data_dir=data_dir, kind="text sets, e.g. tfds:tiny_shakespeare")
    features = builder.info.features
    key = _string_feature(features, tfds)
    if key is None:
        keys = list(features.keys()) if isinstance(features, tfds.features.FeaturesDict) else []
        raise UsageError(
            f"tfds:{name} has no text: it needs a string feature such as 'text' "
            f"(it has: {', '.join(keys) or type(features).__name__})."
        )
    try:
        builder.download_and_prepare()
    except OSError as error:
        raise UsageError(
            f"Could not download or prepare tfds:{name}: {error} (check the network, or pass the "
            "data_dir that already holds it)."
        ) from None
    if "train" not in builder.info.splits:
        raise UsageError(f"tfds:{name} has no 'train' split (splits: {', '.join(builder.info.splits)}).")
    dataset = tfds.load(name, split="train", data_dir=data_dir, shuffle_files=False, download=False)
    # Batched: one Python step per 1024 examples, not per example (imdb_reviews has 25,000).
    batches = dataset.map(lambda example: example[key]).batch(1024)
    parts = [item.decode("utf-8", errors="replace") for batch in batches.as_numpy_iterator() for item in batch]
    text = "\n".join(parts)
    if not text.strip():
        raise UsageError(f"tfds:{name} has no text in its train split's {key!r} feature.")
    return text


# --- vocabulary -----------------------------------------------------------------


def word_tokens(text):
    """Splits `text` into words by TextVectorization's "lower_and_strip_punctuation" and "whitespace".

    See the module docstring for the rules; `tf_word_tokens` is the same in
    TensorFlow ops.
    """
    return _WORD.findall(text.translate(_STANDARDIZE_TABLE))


def tf_word_tokens(strings):
    """`word_tokens` in `tf.strings` ops, for tokenizing inside an exported model.

    Args:
        strings: a tf.string tensor of shape (N,).

    Returns:
        A tf.RaggedTensor (N, None) of words, as TextVectorization splits them.
    """
    standardized = tf.strings.regex_replace(tf.strings.lower(strings), PUNCTUATION_REGEX, "")
    return tf.strings.split(standardized)


def _check_level(level):
    if level not in LEVELS:
        raise UsageError(f"level={level!r} is not a vocabulary level: choose one of {', '.join(LEVELS)}.")


@dataclasses.dataclass
class Vocabulary:
    """Token <-> id mapping for a language model.

    Attributes:
        level: "char" (a token is one character) or "word" (TextVectorization's
            words, see `word_tokens`).
        tokens: `tokens[i]` is the token with id i; id 0 is "" (padding), id 1
            "[UNK]" (any token outside the vocabulary), then tokens by
            descending frequency in the text the vocabulary was built from.
    """

    level: str
    tokens: list

    @property
    def size(self):
        """The number of ids, padding and [UNK] included: the model's output width."""
        return len(self.tokens)

    @functools.cached_property
    def _index(self):
        return {token: i for i, token in enumerate(self.tokens) if i >= len(RESERVED)}

    @functools.cached_property
    def _char_table(self):
        """The id of every code point up to the largest in the vocabulary, and 1 ([UNK]) one past it."""
        table = np.ones(max((ord(token) for token in self._index), default=0) + 2, dtype=np.int32)
        for token, i in self._index.items():
            table[ord(token)] = i
        return table

    def _split(self, text):
        return list(text) if self.level == "char" else word_tokens(text)

    def encode(self, text):
        """Returns the int32 ids of `text`'s tokens; a token outside the vocabulary is 1."""
        if self.level == "word":
            index = self._index
            return np.array([index.get(word, 1) for word in word_tokens(text)], dtype=np.int32)
        # Characters: one table lookup over the code points, 4 million characters in about 70 ms
        # and three arrays of 4 bytes a character.
        table = self._char_table
        return table[np.minimum(_code_points(text), len(table) - 1)]

    def decode(self, ids):
        """Returns the text of `ids`: characters joined, or words joined by spaces; padding skipped.

        Id 1 gives "[UNK]"; the ids must be below `size`.
        """
        tokens = [self.tokens[i] for i in np.asarray(ids, dtype=np.int64).reshape(-1) if i != 0]
        return ("" if self.level == "char" else " ").join(tokens)

    def decoded_length(self, ids):
        """`len(self.decode(ids))`, counted a chunk of ids at a time (ids as `windows` takes them)."""
        lengths = np.array([len(token) for token in self.tokens], dtype=np.int64)
        characters = tokens = 0
        for chunk in _id_chunks(ids):
            counts = np.bincount(chunk, minlength=self.size)
            characters += int(counts @ lengths)
            tokens += len(chunk) - int(counts[0])
        return characters + (max(tokens - 1, 0) if self.level == "word" else 0)  # words are joined by spaces

    def unknown_count(self, text):
        """How many tokens of `text` are outside the vocabulary (encoded as [UNK])."""
        index = self._index
        return sum(token not in index for token in self._split(text))

    def to_json(self):
        """A JSON-serializable dict; for words it also names the tokenization rules."""
        data = {"level": self.level, "tokens": list(self.tokens)}
        if self.level == "word":
            data.update(standardize=STANDARDIZE, split=SPLIT)
        return data

    @classmethod
    def from_json(cls, data):
        """Rebuilds a `Vocabulary` from `to_json()`'s dict.

        Raises:
            UsageError: the dict is not a vocabulary this version can use.
        """
        if not isinstance(data, dict):
            raise UsageError(f"Vocabulary data must be a dict from to_json(), received {type(data).__name__}.")
        level, tokens = data.get("level"), data.get("tokens")
        _check_level(level)
        if not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)
                and tuple(tokens[:len(RESERVED)]) == RESERVED and len(set(tokens)) == len(tokens)):
            raise UsageError(
                "Vocabulary data is damaged: 'tokens' must be distinct strings starting with '' and '[UNK]'."
            )
        if level == "char" and any(len(t) != 1 for t in tokens[len(RESERVED):]):
            raise UsageError("Vocabulary data is damaged: a char vocabulary holds single characters.")
        rules = (data.get("standardize", STANDARDIZE), data.get("split", SPLIT))
        if level == "word" and rules != (STANDARDIZE, SPLIT):
            raise UsageError(
                f"Vocabulary uses standardize={rules[0]!r}, split={rules[1]!r}; this version tokenizes "
                f"words with {STANDARDIZE!r} and {SPLIT!r}: rebuild the vocabulary."
            )
        return cls(level=level, tokens=list(tokens))


def build_vocabulary(text, *, level="char", max_tokens=None):
    """Builds the vocabulary of `text`.

    Args:
        text: the training text.
        level: "char": every character that occurs, most frequent first, ties
            by code point. "word": the vocabulary `keras.layers.TextVectorization(
            standardize="lower_and_strip_punctuation", split="whitespace")`
            adapted on the text's non-blank lines learns (most frequent first,
            ties in reverse byte order), so ids equal the layer's.
        max_tokens: the most ids, padding and [UNK] included (as
            TextVectorization counts); less frequent tokens become [UNK].
            Default: every character for "char", 20,000 for "word".

    Returns:
        A `Vocabulary`.

    Raises:
        UsageError: an unknown level, max_tokens below 3, or a text with no token.
    """
    counts = TokenCounts(level, max_tokens=max_tokens)
    counts.add(text)
    return counts.vocabulary()


class TokenCounts:
    """Token frequencies gathered a piece of text at a time, and the vocabulary they give.

    `build_vocabulary(text)` is `add(text)` then `vocabulary()`; adding the
    text in pieces gives the same vocabulary, without the whole text in
    memory. Characters are counted with one `np.bincount` a piece, words with
    a `collections.Counter`; the word order is the one TextVectorization's
    `finalize_state` sorts by (`np.lexsort((tokens, counts))[::-1]`: count,
    then UTF-8 bytes, descending), and, as its `adapt` was fed the text's
    non-blank lines, the words of a blank line (one of Unicode spaces, such as
    a no-break space, which `word_tokens` does not split on) are not counted.

    Args:
        level: "char" or "word".
        max_tokens: as `build_vocabulary`'s.

    Raises:
        UsageError: an unknown level, or max_tokens below 3.
    """

    def __init__(self, level, *, max_tokens=None):
        _check_level(level)
        if max_tokens is not None and (not isinstance(max_tokens, numbers.Integral) or max_tokens <= len(RESERVED)):
            raise UsageError(
                f"max_tokens={max_tokens!r} leaves no room for tokens: choose an integer above "
                f"{len(RESERVED)} (ids 0 and 1 are padding and [UNK])."
            )
        self.level = level
        self.max_tokens = max_tokens
        self._characters = np.zeros(0, dtype=np.int64)  # count by code point
        self._words = collections.Counter()

    def add(self, piece):
        """Counts the tokens of `piece`: any run of characters at the char
        level, whole lines at the word level (see `whole_lines`)."""
        if self.level == "word":
            self._words.update(word_tokens(_BLANK_LINES.sub("", piece)))
            return
        counts = np.bincount(_code_points(piece))
        if len(counts) > len(self._characters):
            self._characters = np.pad(self._characters, (0, len(counts) - len(self._characters)))
        self._characters[:len(counts)] += counts

    def vocabulary(self):
        """The `Vocabulary` of the text counted.

        Raises:
            UsageError: no token was counted.
        """
        if self.level == "char":
            points = np.flatnonzero(self._characters)
            order = np.lexsort((points, -self._characters[points]))  # by count, descending, then code point
            learned = [chr(point) for point in points[order]]
            if self.max_tokens is not None:
                learned = learned[:self.max_tokens - len(RESERVED)]
        else:
            ranked = sorted(self._words.items(), key=lambda item: (item[1], item[0]), reverse=True)
            limit = (WORD_MAX_TOKENS if self.max_tokens is None else int(self.max_tokens)) - len(RESERVED)
            # Python orders strings by code point, which is the order of their UTF-8 bytes.
            learned = [word for word, _ in ranked[:limit]]
        if not learned:
            raise UsageError(f"The text has no {self.level}s to build a vocabulary from: give a longer text.")
        return Vocabulary(level=self.level, tokens=[*RESERVED, *learned])


def _code_points(text):
    """The code points of `text` as a uint32 array (lone surrogates included)."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


# --- training data ----------------------------------------------------------------

# Ids read at a time by the passes over a whole split (the unigram counts,
# decoded lengths): 4M ids, 16 to 32 MB as int32 / int64.
ID_CHUNK = 4 * 2**20
# Up to this many windows an epoch's order is tf.data's shuffle with a buffer
# of every window, the order of the runs before token files (#25), so their
# batches, resumes and recipes hold. The buffer costs about 190 bytes a window
# and fills before an epoch's first batch: 5 M windows (500 MB of text at
# seq_len 100) took 945 MB and 4.7 s on 2 cores. Above it, the order is
# `tf.random.experimental.index_shuffle`, a stateless permutation computed
# per batch: no buffer, no wait.
SHUFFLE_BUFFER_WINDOWS = 2**17


def _as_ids(ids):
    """`ids` as a 1-D int32 array, or as they are when they stay on disk (a `token_file.TokenSpan`)."""
    return ids if hasattr(ids, "gather") else np.asarray(ids, dtype=np.int32).reshape(-1)


def _id_chunks(ids):
    """Yields `ids` (an array or a `token_file.TokenSpan`) as int64 arrays of at most `ID_CHUNK`."""
    ids, size = _as_ids(ids), ID_CHUNK
    if hasattr(ids, "chunks"):
        yield from ids.chunks(size)
        return
    for start in range(0, len(ids), size):
        yield ids[start:start + size].astype(np.int64)


def split_by_position(ids, *, validation_fraction=0.1, min_tokens=2):
    """Splits token ids into train (the start) and validation (the end).

    By position, never by random windows: overlapping windows drawn at random
    would put validation targets in the training set.

    Args:
        ids: 1-D token ids of the whole text, or a `token_file.TokenSpan`.
        validation_fraction: share of the tokens, at the end, held out.
        min_tokens: the fewest tokens each part needs, e.g. seq_len + 1 for
            one training sequence.

    Returns:
        (train_ids, validation_ids): int32 arrays, or spans of the same file.

    Raises:
        UsageError: a fraction outside (0, 1), or a part shorter than `min_tokens`.
    """
    ids = _as_ids(ids)
    if not 0.0 < validation_fraction < 1.0:
        raise UsageError(
            f"validation_fraction={validation_fraction!r} is out of range: choose a value between 0 and 1, "
            "e.g. 0.1."
        )
    n_validation = int(round(len(ids) * validation_fraction))
    train, validation = ids[:len(ids) - n_validation], ids[len(ids) - n_validation:]
    if min(len(train), len(validation)) < min_tokens:
        raise UsageError(
            f"The text is too short: its {len(ids)} tokens split into {len(train)} for training and "
            f"{len(validation)} for validation, and each part needs at least {min_tokens} (one sequence "
            "plus its next token): give a longer text or a shorter sequence length."
        )
    return train, validation


def windows(ids, *, seq_len, batch_size, shuffle, seed=0, drop_remainder=False):
    """Cuts token ids into (inputs, targets) batches for next-token prediction.

    Window i is `ids[i * seq_len : i * seq_len + seq_len + 1]`: inputs are its
    first seq_len tokens, targets its last seq_len. Windows share one token
    at their edges, so each token from the second on is a target exactly once
    an epoch, except a final stretch shorter than seq_len, which is dropped.

    Args:
        ids: 1-D token ids, e.g. `split_by_position`'s train part, or a
            `token_file.TokenSpan`, read batch by batch.
        seq_len: tokens per sequence (T).
        batch_size: sequences per batch (B).
        shuffle: shuffle the windows with `seed`, in a new order every epoch;
            otherwise keep the text order.
        seed: shuffle seed; the same seed gives the same orders.
        drop_remainder: drop a last, smaller batch, unless it is the only one.

    Returns:
        A prefetched dataset of (x int32 (B, T), y int32 (B, T)), y[:, t] the
        token after x[:, t]; its cardinality is known.

    Raises:
        UsageError: seq_len or batch_size not positive, or fewer than seq_len + 1 ids.
    """
    order = WindowOrder(ids, seq_len=seq_len, batch_size=batch_size, seed=seed, drop_remainder=drop_remainder)
    return order.dataset() if shuffle else order.in_text_order()


def window_order(ids, *, seq_len, batch_size, seed=0, drop_remainder=False, then=None):
    """The shuffled training batches of `windows` as an `epochs.EpochOrder`:
    each epoch's order a function of (seed, epoch) alone, so a resumed run
    sees what the interrupted one would have. `then` maps each batch
    (the bidirectional model's pairs)."""
    return WindowOrder(ids, seq_len=seq_len, batch_size=batch_size, seed=seed, drop_remainder=drop_remainder,
                       then=then)


class WindowOrder(epochs.EpochOrder):
    """The windows of `windows` as epochs: window numbers are shuffled, then
    batched, then each batch gathers its windows from the ids.

    No window is materialized: an epoch is an order of window numbers
    (`SHUFFLE_BUFFER_WINDOWS` says which), and a batch of B numbers becomes
    the (B, T + 1) tokens they start at. Ids in memory are a constant of the
    graph, gathered with `tf.gather`, so the pipeline is plain graph ops (a
    parameter server's workers rebuild it from its graph). Ids on disk (a
    `token_file.TokenSpan`) are gathered by one `tf.numpy_function` per batch:
    reading a file at computed offsets has no TensorFlow op, and a function
    per batch, not per window, keeps the Python calls to one a step.

    Args:
        ids: 1-D token ids, or a `token_file.TokenSpan`.
        seq_len, batch_size, seed, drop_remainder: as `windows`'.
        then: a function mapped over each (x, y) batch, or None.

    Raises:
        UsageError: seq_len or batch_size not positive, or fewer than seq_len + 1 ids.
    """

    def __init__(self, ids, *, seq_len, batch_size, seed=0, drop_remainder=False, then=None):
        for label, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if not isinstance(value, numbers.Integral) or value < 1:
                raise UsageError(f"{label}={value!r} must be a positive integer.")
        ids = _as_ids(ids)
        count = (len(ids) - 1) // seq_len
        if count < 1:
            raise UsageError(
                f"The text is too short: {len(ids)} tokens make no sequence of seq_len={seq_len} plus its "
                "next token: give a longer text or a shorter sequence length."
            )
        super().__init__(tf.data.Dataset.range(count), buffer=count, seed=seed, finish=self._batches)
        self.count = count
        self._batch_size = int(batch_size)
        self._drop_remainder = bool(drop_remainder) and count >= batch_size
        self._then = then
        self._gather = _numpy_gather(ids, int(seq_len)) if hasattr(ids, "gather") else _graph_gather(ids, int(seq_len))

    def epoch(self, epoch, skip_batches=0):
        """The batches of `epoch` (0-based), without its first `skip_batches`."""
        if self.count <= SHUFFLE_BUFFER_WINDOWS:
            batches = super().epoch(epoch)
            return batches.skip(skip_batches) if skip_batches else batches
        positions = tf.data.Dataset.range(int(skip_batches) * self._batch_size, self.count)  # skipped: never read
        return self._batches(positions, permutation=tf.constant([self.seed % 2**31, int(epoch)], tf.int64))

    def dataset(self):
        """A dataset that is a new order each time it is iterated."""
        if self.count <= SHUFFLE_BUFFER_WINDOWS:
            return super().dataset()
        draws = tf.data.Dataset.random(seed=self.seed, rerandomize_each_iteration=True).take(1)

        def batches(draw):
            return self._batches(self.elements, permutation=tf.stack([draw, tf.constant(-1, tf.int64)]))

        return draws.flat_map(batches)

    def in_text_order(self):
        """The batches in the text's order, e.g. for validation."""
        return self._batches(self.elements)

    def _batches(self, numbers, permutation=None):
        """Window numbers -> (x, y) batches; `permutation`, an int64 seed pair,
        sends position i of the epoch to window `index_shuffle(i)`."""
        batches = numbers.batch(self._batch_size, drop_remainder=self._drop_remainder)
        if permutation is not None:
            last = tf.constant(self.count - 1, tf.int64)

            def permute(positions):
                return tf.random.experimental.index_shuffle(positions, permutation, last)

            batches = batches.map(permute)
        batches = batches.map(self._gather)
        if self._then is not None:
            batches = batches.map(self._then)
        return batches.prefetch(tf.data.AUTOTUNE)


def _graph_gather(ids, seq_len):
    """Window numbers (B,) -> (x, y) int32 (B, T), from ids held as a graph constant."""
    ids = tf.constant(ids, dtype=tf.int32)
    width = tf.range(seq_len + 1, dtype=tf.int64)

    def gather(numbers):
        window = tf.gather(ids, numbers[:, None] * seq_len + width)  # (batch, time + 1)
        return window[:, :-1], window[:, 1:]

    return gather


def _numpy_gather(span, seq_len):
    """Window numbers (B,) -> (x, y) int32 (B, T), read from a `token_file.TokenSpan`."""

    def read(numbers):
        return span.gather(numbers * seq_len, seq_len + 1)

    def gather(numbers):
        window = tf.numpy_function(read, [numbers], tf.int32, stateful=False)
        window.set_shape((None, seq_len + 1))  # (batch, time + 1)
        return window[:, :-1], window[:, 1:]

    return gather


def unigram_entropy(train_ids, eval_ids, vocab_size):
    """The unigram baseline: cross-entropy of `eval_ids` under train's token frequencies.

    Frequencies are add-one smoothed over all `vocab_size` ids, so a token
    unseen in training costs a finite amount. exp() of the result is the
    unigram perplexity a language model should beat by a wide margin.

    Args:
        train_ids: 1-D token ids the frequencies are counted on (an array or
            a `token_file.TokenSpan`, read a chunk at a time).
        eval_ids: 1-D token ids to score, likewise.
        vocab_size: number of ids (`Vocabulary.size`); every id must be below it.

    Returns:
        Mean negative log-likelihood of `eval_ids`, in nats per token.

    Raises:
        ValueError: no eval ids, or an id outside 0..vocab_size - 1.
    """
    def counted(label, ids):
        counts = np.zeros(vocab_size, dtype=np.int64)
        for chunk in _id_chunks(ids):
            if len(chunk) and (chunk.min() < 0 or chunk.max() >= vocab_size):
                raise ValueError(f"{label} hold ids outside 0..{vocab_size - 1} (vocab_size={vocab_size}).")
            counts += np.bincount(chunk, minlength=vocab_size)
        return counts

    train_counts, eval_counts = counted("train_ids", train_ids), counted("eval_ids", eval_ids)
    if not eval_counts.any():
        raise ValueError("unigram_entropy needs at least one eval id.")
    counts = train_counts + 1.0
    log_probabilities = np.log(counts) - math.log(counts.sum())
    # Counts, not the ids: a pass over each split a chunk at a time, whatever its length.
    return float(-(eval_counts @ log_probabilities) / eval_counts.sum())
