"""The language-modeling data layer: corpus, text loading, vocabularies, windows, baseline,
and the token files of large texts."""

import collections
import json
import math
import os
import re
import string

import keras
import numpy as np
import pytest
import tensorflow as tf

from dlsuite.apps import cli
from dlsuite.apps.core import epochs
from dlsuite.apps.core.errors import UsageError
from dlsuite.apps.lm import text, token_file
from dlsuite.apps.lm.task import LanguageModelTask, LMConfig

# --- the default corpus ----------------------------------------------------------


@pytest.fixture(scope="module")
def corpus():
    """The default corpus (its gathering speed is a benchmark's business, not a test's)."""
    return text.default_corpus(), None


def test_default_corpus_is_english_prose(corpus):
    corpus, _ = corpus
    assert len(corpus) > 500_000
    assert corpus.isascii()
    assert corpus.count(" the ") > 5_000 and " of " in corpus and " and " in corpus
    letters_and_spaces = sum(c in string.ascii_letters or c == " " for c in corpus)
    assert letters_and_spaces > 0.8 * len(corpus)
    paragraphs = corpus.split("\n\n")
    assert all(len(paragraph) >= 40 for paragraph in paragraphs)
    assert not any(line.lstrip().startswith(">>>") for line in corpus.splitlines())


def test_default_corpus_is_deterministic_and_cut_at_a_paragraph(corpus):
    corpus, _ = corpus
    assert text.default_corpus() == corpus
    short = text.default_corpus(max_chars=10_000)
    assert 9_000 < len(short) <= 10_000
    assert corpus.startswith(short + "\n\n")


def test_default_corpus_unigram_baseline(corpus):
    # Not a test of a model: it pins the bar the app reports, in bits per char.
    corpus, _ = corpus
    vocabulary = text.build_vocabulary(corpus, level="char")
    assert 90 <= vocabulary.size <= 100
    train, validation = text.split_by_position(vocabulary.encode(corpus), min_tokens=101)
    bits = text.unigram_entropy(train, validation, vocabulary.size) / math.log(2)
    assert 4.3 < bits < 4.9


def test_no_spec_loads_the_default_corpus(monkeypatch):
    monkeypatch.setattr(text, "default_corpus", lambda: "the corpus")
    assert text.load_text(None) == ("stdlib-docstrings", "the corpus")


# --- text files ----------------------------------------------------------------------


def test_text_file_loads_with_bom_and_windows_line_ends_removed(tmp_path):
    path = tmp_path / "poem.txt"
    path.write_bytes("\ufeffOne line\r\nÉtoile\rthree\n".encode("utf-8"))
    assert text.load_text(str(path)) == (str(path), "One line\nÉtoile\nthree\n")


@pytest.mark.parametrize(
    "content, message",
    [
        (None, r"does not exist: check the path"),
        (b"", r"is empty"),
        (b" \n\t\n", r"is empty"),
        (b"text\x00with a NUL", r"looks binary \(it has NUL bytes\)"),
        (b"caf\xe9 latin-1", r"is not valid UTF-8 \(byte 3\)"),
        ("folder", r"is a folder: give a UTF-8 text file"),
    ],
    ids=["missing", "empty", "blank", "binary", "latin1", "folder"],
)
def test_bad_text_files_raise_naming_the_file(tmp_path, content, message):
    path = tmp_path / "input.txt"
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(UsageError, match=re.escape(repr(str(path))) + ".*" + message):
        text.load_text(str(path))


# --- TensorFlow Datasets (mocked, offline) -----------------------------------------


def _write_tfds_metadata(data_dir, name, split_sizes):
    """Writes the dataset_info.json that `mock_data` reads for split names and sizes."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=str(data_dir))
    os.makedirs(builder.data_dir, exist_ok=True)
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(
            name=split, shard_lengths=[size], num_bytes=0,
            filename_template=tfds.core.ShardedFileTemplate(
                data_dir=builder.data_dir, dataset_name=name, split=split, filetype_suffix="tfrecord"),
        )
        for split, size in split_sizes.items()
    ]))
    builder.info.write_to_directory(builder.data_dir)


@pytest.mark.parametrize(
    "name, split_sizes, examples",
    [
        # tiny_shakespeare: each split is one example, the whole text.
        ("tiny_shakespeare", {"train": 1, "validation": 1, "test": 1}, 1),
        # imdb_reviews: one review an example, a "text" and a "label" feature.
        ("imdb_reviews", {"train": 25_000, "test": 25_000}, 5),
    ],
)
def test_tfds_text_with_mock_data(tmp_path, name, split_sizes, examples):
    import tensorflow_datasets as tfds

    _write_tfds_metadata(tmp_path, name, split_sizes)
    with tfds.testing.mock_data(num_examples=examples, policy=tfds.testing.MockPolicy.USE_FILES,
                                data_dir=str(tmp_path)):
        loaded_name, loaded = text.load_text(f"tfds:{name}", data_dir=str(tmp_path))
    assert loaded_name == f"tfds:{name}"
    assert isinstance(loaded, str) and loaded.strip()
    assert len(loaded.split("\n")) == examples  # the mock's texts hold no newline of their own


@pytest.mark.parametrize(
    "spec, message",
    [
        ("tfds:no_such_dataset_xyz", r"Unknown TensorFlow Datasets name 'no_such_dataset_xyz'"),
        ("tfds:mnist", r"tfds:mnist has no text: .*\(it has: image, label\)"),
    ],
)
def test_bad_tfds_specs_raise(tmp_path, spec, message):
    with pytest.raises(UsageError, match=message):
        text.load_text(spec, data_dir=str(tmp_path))


# --- vocabularies --------------------------------------------------------------------


def test_char_vocabulary_orders_by_frequency_then_code_point():
    vocabulary = text.build_vocabulary("abracadabra!", level="char")
    assert vocabulary.tokens == ["", "[UNK]", "a", "b", "r", "!", "c", "d"]
    assert vocabulary.size == 8
    ids = vocabulary.encode("cab!")
    assert ids.dtype == np.int32 and ids.tolist() == [6, 2, 3, 5]
    assert vocabulary.decode(ids) == "cab!"
    assert vocabulary.decode([0, 2, 0, 3]) == "ab"  # padding skipped
    assert vocabulary.encode("zaé").tolist() == [1, 2, 1]
    assert vocabulary.unknown_count("zaé!") == 2


def test_char_vocabulary_max_tokens_maps_the_rarest_to_unknown():
    vocabulary = text.build_vocabulary("abracadabra!", level="char", max_tokens=4)
    assert vocabulary.tokens == ["", "[UNK]", "a", "b"]
    assert vocabulary.encode("bar").tolist() == [3, 2, 1]
    assert vocabulary.decode([3, 2, 1]) == "ba[UNK]"


# Punctuation of every kind, case, non-ASCII letters and dashes, and every
# whitespace character TextVectorization does or does not split on.
TRICKY = (
    "The cat's hat -- THE HAT! (the) cat\t \n dog_house a.b.c\r\n"
    "Élan école «quoted» em—dash no\u00a0break \x0bvertical\x0cfeed [UNK] 3.14 x+y=z\n"
    "the the cat"
)


def test_word_tokens_follow_the_documented_rules():
    assert text.word_tokens("Don't STOP—now, Élan\u00a0x\ty.") == ["dont", "stop—now", "Élan\u00a0x", "y"]
    assert text.word_tokens("") == [] and text.word_tokens(" -- \n ") == []
    # The Keras regex deletes exactly the ASCII punctuation characters.
    deleted = {chr(c) for c in range(128) if re.fullmatch(text.PUNCTUATION_REGEX, chr(c))}
    assert deleted == set(string.punctuation)


def test_word_ids_equal_the_text_vectorization_layer():
    vocabulary = text.build_vocabulary(TRICKY, level="word")
    # "the" 5 times; "hat" and "cat" twice each ("cat's" is "cats"), the tie in reverse order.
    assert vocabulary.tokens[:5] == ["", "[UNK]", "the", "hat", "cat"]
    layer = keras.layers.TextVectorization(
        standardize="lower_and_strip_punctuation", split="whitespace", output_mode="int")
    layer.adapt([TRICKY])
    assert vocabulary.tokens == layer.get_vocabulary()

    probe = TRICKY + " unseen WORDS, école's"
    expected = np.asarray(layer([probe]))[0]
    np.testing.assert_array_equal(vocabulary.encode(probe), expected)
    # "unseen", "words" and "écoles": "É" is not lower-cased, and "école's" loses its apostrophe.
    assert vocabulary.unknown_count(probe) == 3 == int((expected == 1).sum())


def test_tf_word_tokens_match_word_tokens():
    lines = TRICKY.split("\n")
    ragged = text.tf_word_tokens(tf.constant(lines))
    assert [[t.decode() for t in row] for row in ragged.to_list()] == [text.word_tokens(line) for line in lines]


def test_word_vocabulary_ties_max_tokens_and_decode():
    vocabulary = text.build_vocabulary("b b a a c d d d", level="word")
    # Frequency first; ties in TextVectorization's order (reverse byte order).
    assert vocabulary.tokens == ["", "[UNK]", "d", "b", "a", "c"]
    small = text.build_vocabulary("b b a a c d d d", level="word", max_tokens=4)
    assert small.tokens == ["", "[UNK]", "d", "b"]
    assert small.encode("D, a b!").tolist() == [2, 1, 3]
    assert small.decode([2, 1, 3, 0]) == "d [UNK] b"
    assert vocabulary.decode(vocabulary.encode("a b c d")) == "a b c d"


@pytest.mark.parametrize("level", ["char", "word"])
def test_vocabulary_json_round_trip(level):
    vocabulary = text.build_vocabulary("Hello, hello world. Wörld!", level=level)
    data = json.loads(json.dumps(vocabulary.to_json()))
    again = text.Vocabulary.from_json(data)
    assert again == vocabulary
    sample = "hello wörld, new"
    np.testing.assert_array_equal(again.encode(sample), vocabulary.encode(sample))
    if level == "word":
        assert (data["standardize"], data["split"]) == ("lower_and_strip_punctuation", "whitespace")


@pytest.mark.parametrize(
    "data, message",
    [
        ([], r"must be a dict"),
        ({"level": "byte", "tokens": ["", "[UNK]", "a"]}, r"level='byte' is not a vocabulary level"),
        ({"level": "char", "tokens": ["a", "b"]}, r"starting with '' and '\[UNK\]'"),
        ({"level": "char", "tokens": ["", "[UNK]", "a", "a"]}, r"distinct strings"),
        ({"level": "char", "tokens": ["", "[UNK]", "ab"]}, r"single characters"),
        ({"level": "word", "tokens": ["", "[UNK]", "a"], "standardize": "lower"}, r"rebuild the vocabulary"),
    ],
)
def test_damaged_vocabulary_json_raises(data, message):
    with pytest.raises(UsageError, match=message):
        text.Vocabulary.from_json(data)


@pytest.mark.parametrize(
    "source, kwargs, message",
    [
        ("abc", {"level": "byte"}, r"level='byte' is not a vocabulary level: choose one of char, word"),
        ("abc", {"max_tokens": 2}, r"max_tokens=2 leaves no room"),
        ("", {"level": "char"}, r"no chars to build a vocabulary from"),
        ("!!! -- ...", {"level": "word"}, r"no words to build a vocabulary from"),
    ],
)
def test_bad_vocabulary_arguments_raise(source, kwargs, message):
    with pytest.raises(UsageError, match=message):
        text.build_vocabulary(source, **kwargs)


# --- splitting, windows, baseline ----------------------------------------------------


def test_split_by_position_keeps_train_first_and_validation_last():
    train, validation = text.split_by_position(np.arange(100), validation_fraction=0.1, min_tokens=10)
    np.testing.assert_array_equal(train, np.arange(90))
    np.testing.assert_array_equal(validation, np.arange(90, 100))
    assert train.dtype == validation.dtype == np.int32


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"min_tokens": 11}, r"too short: its 100 tokens split into 90 for training and 10 for validation"),
        ({"validation_fraction": 0.0}, r"validation_fraction=0\.0 is out of range"),
        ({"validation_fraction": 1.0}, r"validation_fraction=1\.0 is out of range"),
    ],
)
def test_split_by_position_rejects(kwargs, message):
    with pytest.raises(UsageError, match=message):
        text.split_by_position(np.arange(100), **kwargs)


def _epoch(dataset):
    return [(x.numpy(), y.numpy()) for x, y in dataset]


def test_windows_shift_targets_by_one_and_cover_each_target_once():
    ids = np.arange(1, 24)  # 23 tokens, the value is the position + 1
    dataset = text.windows(ids, seq_len=5, batch_size=3, shuffle=False)
    assert dataset.element_spec == (tf.TensorSpec((None, 5), tf.int32),) * 2
    assert int(dataset.cardinality()) == 2  # (23 - 1) // 5 = 4 windows
    batches = _epoch(dataset)
    assert [x.shape for x, _ in batches] == [(3, 5), (1, 5)]
    x = np.concatenate([x for x, _ in batches])
    y = np.concatenate([y for _, y in batches])
    np.testing.assert_array_equal(y, x + 1)
    # Each token from the second to the 21st is a target once; the last 2 make no full window.
    np.testing.assert_array_equal(np.sort(y.reshape(-1)), np.arange(2, 22))
    np.testing.assert_array_equal(x.reshape(-1), np.arange(1, 21))


def test_windows_fewer_than_a_batch_still_yield_one_batch():
    for drop_remainder in (False, True):
        batches = _epoch(text.windows(np.arange(11), seq_len=5, batch_size=64, shuffle=True,
                                      drop_remainder=drop_remainder))
        assert [x.shape for x, _ in batches] == [(2, 5)]
    dropped = _epoch(text.windows(np.arange(26), seq_len=5, batch_size=2, shuffle=False, drop_remainder=True))
    assert [x.shape for x, _ in dropped] == [(2, 5), (2, 5)]


def test_windows_shuffle_is_seeded_and_new_each_epoch():
    ids = np.arange(401)  # 100 windows of 4

    def order(dataset):
        return [int(x[0]) // 4 for batch, _ in dataset for x in batch.numpy()]

    dataset = text.windows(ids, seq_len=4, batch_size=8, shuffle=True, seed=3)
    first, second = order(dataset), order(dataset)
    assert sorted(first) == sorted(second) == list(range(100))
    assert first != list(range(100)) and second != first
    assert order(text.windows(ids, seq_len=4, batch_size=8, shuffle=True, seed=3)) == first
    assert order(text.windows(ids, seq_len=4, batch_size=8, shuffle=True, seed=4)) != first


@pytest.mark.parametrize(
    "ids, kwargs, message",
    [
        (np.arange(5), {"seq_len": 5}, r"too short: 5 tokens make no sequence of seq_len=5"),
        (np.arange(50), {"seq_len": 0}, r"seq_len=0 must be a positive integer"),
        (np.arange(50), {"seq_len": 5, "batch_size": 0}, r"batch_size=0 must be a positive integer"),
    ],
)
def test_bad_windows_raise(ids, kwargs, message):
    kwargs = {"batch_size": 2, **kwargs}
    with pytest.raises(UsageError, match=message):
        text.windows(ids, shuffle=False, **kwargs)


def test_unigram_entropy_by_hand():
    # Counts over 4 ids from [2, 2, 3] plus one each: [1, 1, 3, 2] of 7.
    expected = -(math.log(3 / 7) + math.log(2 / 7)) / 2
    assert text.unigram_entropy([2, 2, 3], [2, 3], vocab_size=4) == pytest.approx(expected)
    # An unseen id costs log(7) nats, not infinity.
    assert text.unigram_entropy([2, 2, 3], [1], vocab_size=4) == pytest.approx(math.log(7))
    with pytest.raises(ValueError, match=r"eval_ids hold ids outside 0\.\.3"):
        text.unigram_entropy([2], [4], vocab_size=4)


# --- large texts: reading in pieces, token files, windows from disk (#25) -----------

# A BOM, CRLF and CR line ends, 2-, 3- and 4-byte characters, lines of Unicode
# spaces only (blank for the word vocabulary), a no-break space inside a line.
AWKWARD = ("\ufeffThe café's «menu» — naïve\r\nÉtoile 東京 \U0001F600 emoji\r\r\n\u00a0\r\n"
           "the cat\u00a0sat; the CAT sat!\n\u3000\u2003\nend, the end.\r") * 7


def _write(path, content):
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return str(path)


def _old_vocabulary(whole, level, max_tokens=None):
    """The vocabulary as it was built before #25: a Counter, or TextVectorization adapted on the non-blank lines."""
    if level == "char":
        counts = collections.Counter(whole)
        learned = sorted(counts, key=lambda c: (-counts[c], c))
        return ["", "[UNK]", *(learned if max_tokens is None else learned[:max_tokens - 2])]
    layer = keras.layers.TextVectorization(max_tokens=max_tokens or text.WORD_MAX_TOKENS, standardize=text.STANDARDIZE,
                                           split=text.SPLIT, output_mode="int")
    layer.adapt(tf.constant([line for line in whole.split("\n") if line.strip()]), batch_size=4096)
    return layer.get_vocabulary()


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 7, 1 << 20])
def test_reading_in_pieces_gives_load_texts_characters(tmp_path, chunk_bytes):
    spec = _write(tmp_path / "awkward.txt", AWKWARD)
    pieces = list(text.read_text_chunks(spec, chunk_bytes=chunk_bytes))
    whole = "".join(pieces)
    assert whole == text.load_text(spec)[1]
    assert not whole.startswith("\ufeff") and "\r" not in whole
    assert whole.count("\ufeff") == 6  # only the first BOM goes
    assert "\n\n\u00a0\n" in whole  # "\r\r\n" is two line ends
    lines = list(text.whole_lines(pieces))
    assert "".join(lines) == whole and all(line.endswith("\n") for line in lines[:-1])
    assert "".join(text.whole_lines(pieces, longest=4)) == whole  # long lines cut at a space


@pytest.mark.parametrize("level", ["char", "word"])
@pytest.mark.parametrize("chunk_bytes", [1, 3, 1 << 20])
def test_token_file_equals_the_in_memory_encoding(tmp_path, level, chunk_bytes):
    spec = _write(tmp_path / "awkward.txt", AWKWARD)
    whole = text.load_text(spec)[1]
    corpus = token_file.load(spec, level=level, max_tokens=None, max_chars=None, cache_dir=tmp_path / "cache",
                             chunk_bytes=chunk_bytes)
    vocabulary = text.build_vocabulary(whole, level=level)
    assert corpus.vocabulary == vocabulary and vocabulary.tokens == _old_vocabulary(whole, level)
    ids = np.asarray(corpus.ids)
    assert ids.dtype == np.uint16 and corpus.token_file.stat().st_size == 2 * len(ids)
    np.testing.assert_array_equal(ids, vocabulary.encode(whole))
    assert corpus.characters == corpus.total_characters == len(whole)
    assert vocabulary.decoded_length(corpus.ids) == len(vocabulary.decode(ids))


@pytest.mark.parametrize("level, max_tokens", [("char", 5), ("word", 4), ("word", None)])
def test_a_cut_text_and_max_tokens_give_the_old_vocabulary(tmp_path, level, max_tokens):
    spec = _write(tmp_path / "awkward.txt", AWKWARD)
    whole = text.load_text(spec)[1]
    for max_chars in (1, 150, 151, len(whole) - 1):  # 150 cuts a word, 151 a surrogate pair's character
        corpus = token_file.load(spec, level=level, max_tokens=max_tokens, max_chars=max_chars,
                                 cache_dir=tmp_path / "cache", chunk_bytes=5)
        used = whole[:max_chars]
        if level == "word" and not text.word_tokens(used):
            continue
        assert corpus.vocabulary.tokens == _old_vocabulary(used, level, max_tokens)
        np.testing.assert_array_equal(np.asarray(corpus.ids), corpus.vocabulary.encode(used))
        assert (corpus.characters, corpus.total_characters) == (max_chars, len(whole))


def test_word_counts_of_lines_cut_for_length_are_the_whole_texts():
    whole = ("word " * 40 + "\u00a0 last\n" + "\u00a0\u2003\n" + "x" * 30 + " y\n") * 3
    counts = text.TokenCounts("word")
    for piece in text.whole_lines([whole[i:i + 7] for i in range(0, len(whole), 7)], longest=16):
        counts.add(piece)
    assert counts.vocabulary().tokens == _old_vocabulary(whole, "word")
    assert "\u00a0\u2003" not in counts.vocabulary().tokens  # a blank line's, never counted


def test_the_token_file_is_reused_and_a_damaged_or_stale_one_rebuilt(tmp_path):
    spec = _write(tmp_path / "poem.txt", "one two three\n" * 50)

    def load():
        corpus = token_file.load(spec, level="char", max_tokens=None, max_chars=None, cache_dir=tmp_path / "cache")
        return corpus, corpus.seconds is not None

    first, written = load()
    assert written and first.token_file.parent == tmp_path / "cache"
    ids = np.array(first.ids)
    again, written = load()
    assert not written and again.token_file == first.token_file
    with open(first.token_file, "r+b") as file:  # a half-written file
        file.truncate(first.token_file.stat().st_size // 2)
    again, written = load()
    assert written and np.array_equal(np.asarray(again.ids), ids)
    meta = first.token_file.with_suffix(".json")
    meta.write_text(meta.read_text().replace('"tokens": 700', '"tokens": 699'))  # a .json that does not fit
    assert load()[1]
    first.token_file.with_suffix(".json").unlink()  # a .bin whose .json never came
    assert load()[1]
    os.utime(spec, ns=(1, 1))  # the text edited: a new key, the old files go
    edited, written = load()
    assert written and edited.token_file != first.token_file and not first.token_file.exists()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        [edited.token_file.name, edited.token_file.with_suffix(".json").name])
    # A span already open keeps reading its file after the cache is emptied.
    for path in (tmp_path / "cache").iterdir():
        path.unlink()
    np.testing.assert_array_equal(edited.ids.gather(np.array([0, 14]), 3), [ids[:3], ids[14:17]])


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", r"is empty"),
        (b" \n\t\n" * 5, r"is empty"),
        (b"caf\xc3\xa9 ok " * 3 + b"caf\xe9 latin-1" + b"\x00", r"looks binary \(it has NUL bytes\)"),
        (b"caf\xc3\xa9 ok " * 3 + b"caf\xe9 latin-1", r"is not valid UTF-8 \(byte 30\)"),
        (b"ok \xe2\x82", r"is not valid UTF-8 \(byte 3\)"),  # a character cut by the end of the file
    ],
    ids=["empty", "blank", "nul-after-bad-byte", "latin1", "truncated-character"],
)
def test_bad_text_files_are_named_whatever_the_piece_size(tmp_path, content, message):
    path = tmp_path / "input.txt"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=re.escape(repr(str(path))) + ".*" + message):
        text.load_text(str(path))
    for chunk_bytes in (1, 2, 4):
        with pytest.raises(UsageError, match=re.escape(repr(str(path))) + ".*" + message):
            token_file.load(str(path), level="char", max_tokens=None, max_chars=None, cache_dir=tmp_path / "cache",
                            chunk_bytes=chunk_bytes)
    assert not (tmp_path / "cache").exists()


def _config(path, tmp_path, **fields):
    return LMConfig(text=str(path), token_cache=str(tmp_path / "cache"), **fields)


def test_the_cap_says_how_much_it_used_and_zero_uses_all(tmp_path):
    spec = _write(tmp_path / "book.txt", "abcdefghij" * 120)
    task = LanguageModelTask(_config(spec, tmp_path, max_chars=1000, seq_len=10))
    task.load_data()
    assert (task.characters, task.tokens) == (1000, 1000)
    # The first line a run prints.
    assert task.describe(None, None).startswith(
        f"2x512 lstm on {spec}: the first 1,000 characters of 1,200 (--max-chars 0 uses all of it), 1,000 char tokens "
        f"(12 in the vocabulary) in {task.corpus.token_file} (written in ")
    task = LanguageModelTask(_config(spec, tmp_path, max_chars=0, seq_len=10))
    task.load_data()
    assert f"on {spec}: 1,200 characters, 1,200 char tokens (12 in the vocabulary) in " in task.describe(None, None)
    resolved = task.resolved(None, None)
    assert (resolved["characters"], resolved["text_characters"], resolved["tokens"]) == (1200, 1200, 1200)
    assert resolved["token_file"] == str(task.corpus.token_file) and resolved["token_file"].endswith(".bin")
    again = LanguageModelTask(_config(spec, tmp_path, max_chars=0, seq_len=10))
    again.load_data()
    assert again.describe(None, None).split("; ")[0].endswith(f"in {task.corpus.token_file} (reused)")
    assert cli.build_parser().parse_args(["lm", "train", "--max-chars", "0"]).max_chars == 0


@pytest.mark.parametrize("value", ["-1", "many"])
def test_a_bad_max_chars_is_one_line(value, capsys):
    assert cli.main(["lm", "train", "--max-chars", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max-chars" in err[0] and "0 for the whole text" in err[0], err


def _old_window_order(ids, *, seq_len, batch_size, seed):
    """`text.window_order` as it was before #25: every window a tensor slice, shuffled with a buffer of all."""
    count = (len(ids) - 1) // seq_len
    x = ids[:count * seq_len].reshape(count, seq_len)
    y = ids[1:count * seq_len + 1].reshape(count, seq_len)
    return epochs.EpochOrder(tf.data.Dataset.from_tensor_slices((x, y)), buffer=count, seed=seed,
                             finish=lambda dataset: dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE))


def _batches(dataset):
    return [(x.numpy(), y.numpy()) for x, y in dataset]


def _assert_same_batches(first, second):
    assert len(first) == len(second)
    for (x1, y1), (x2, y2) in zip(first, second):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)


def test_window_batches_from_a_token_file_equal_the_old_in_memory_batches(tmp_path):
    spec = _write(tmp_path / "corpus.txt", text.default_corpus(max_chars=20_000))
    corpus = token_file.load(spec, level="char", max_tokens=None, max_chars=None, cache_dir=tmp_path / "cache")
    ids = corpus.vocabulary.encode(text.load_text(spec)[1])
    old = _old_window_order(ids, seq_len=50, batch_size=32, seed=3)
    for source in (corpus.ids, ids):  # on disk (numpy_function per batch) and in memory (tf.gather)
        new = text.window_order(source, seq_len=50, batch_size=32, seed=3)
        assert isinstance(new, epochs.EpochOrder) and new.steps_per_epoch == old.steps_per_epoch == 13
        for epoch in (0, 1):
            _assert_same_batches(_batches(new.epoch(epoch)), _batches(old.epoch(epoch)))
        _assert_same_batches(_batches(new.stream(1, 3, 5)), _batches(old.stream(1, 3, 5)))
        _assert_same_batches(_batches(text.windows(source, seq_len=50, batch_size=32, shuffle=False)),
                             _batches(old.elements.batch(32)))


def test_many_windows_take_a_stateless_permutation(tmp_path, monkeypatch):
    monkeypatch.setattr(text, "SHUFFLE_BUFFER_WINDOWS", 4)
    spec = _write(tmp_path / "count.txt", "".join(chr(0x4E00 + i) for i in range(401)))  # every id once
    corpus = token_file.load(spec, level="char", max_tokens=None, max_chars=None, cache_dir=tmp_path / "cache")
    decoded = np.array([ord(token) - 0x4E00 for token in corpus.vocabulary.tokens[2:]])

    def windows(order, *args):
        batches = _batches(order.epoch(*args))
        x = np.concatenate([x for x, _ in batches])
        np.testing.assert_array_equal(np.concatenate([y for _, y in batches])[:, :-1], x[:, 1:])
        return [int(start) // 4 for start in decoded[x[:, 0] - 2]], [len(x) for x, _ in batches]

    order = text.window_order(corpus.ids, seq_len=4, batch_size=8, seed=3)
    first, sizes = windows(order, 0)
    assert sorted(first) == list(range(100)) and first != list(range(100)) and sizes == [8] * 12 + [4]
    assert windows(text.window_order(corpus.ids, seq_len=4, batch_size=8, seed=3), 0)[0] == first
    second = windows(order, 1)[0]
    assert sorted(second) == list(range(100)) and second != first
    assert windows(order, 1, 3)[0] == second[24:]  # a resumed epoch skips whole batches
    streamed = [int(start) // 4 for x, _ in _batches(order.stream(0, 2, 10)) for start in decoded[x[:, 0] - 2]]
    assert streamed == (first + second)[80:]
    assert windows(text.window_order(corpus.ids, seq_len=4, batch_size=8, seed=4), 0)[0] != first
    dropped = text.window_order(corpus.ids, seq_len=4, batch_size=8, seed=3, drop_remainder=True)
    assert windows(dropped, 0)[1] == [8] * 12 and dropped.steps_per_epoch == 12
    reshuffled = text.windows(corpus.ids, seq_len=4, batch_size=8, shuffle=True, seed=3)
    draws = [[int(x[0, 0]) for x, _ in _batches(reshuffled)] for _ in range(2)]
    assert len(draws[0]) == 13 and draws[0] != draws[1]


def test_a_parameter_server_run_reads_its_ids_in_the_graph(tmp_path):
    spec = _write(tmp_path / "book.txt", "abcdefghij" * 120)

    def python_functions(strategy):
        task = LanguageModelTask(_config(spec, tmp_path, seq_len=10, strategy=strategy))
        task.load_data()
        stream = task.batches(8).train.stream(0, 1)
        graph = tf.raw_ops.DatasetToGraphV2(input_dataset=tf.data.experimental.to_variant(stream),
                                            external_state_policy=0)
        return b"PyFunc" in graph.numpy()

    assert python_functions("auto") and not python_functions("parameter-server")


def test_unigram_entropy_reads_a_token_file_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(text, "ID_CHUNK", 7)
    spec = _write(tmp_path / "book.txt", "abracadabra, abracadabra!\n" * 20)
    corpus = token_file.load(spec, level="char", max_tokens=None, max_chars=None, cache_dir=tmp_path / "cache")
    on_disk = text.split_by_position(corpus.ids, validation_fraction=0.2)
    in_memory = text.split_by_position(np.asarray(corpus.ids), validation_fraction=0.2)
    assert [len(part) for part in on_disk] == [len(part) for part in in_memory] == [416, 104]
    assert text.unigram_entropy(*on_disk, corpus.vocabulary.size) == pytest.approx(
        text.unigram_entropy(*in_memory, corpus.vocabulary.size), rel=1e-12)
