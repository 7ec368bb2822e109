"""Language-model SavedModel: layout, in-graph generation and scoring served by
TensorFlow alone, equality with the Keras model, biLM embeddings, atomicity, bad input."""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from dlsuite import models
from dlsuite.apps.lm import generate as generation
from dlsuite.apps.core import versions
from dlsuite.apps.lm import export as lm_export
from dlsuite.apps.core.errors import UsageError
from dlsuite.apps.lm.export import ExportedLanguageModel
from dlsuite.apps.lm.text import Vocabulary
from dlsuite.models.bilm import embedding_model

# Longer than one scoring chunk, with characters the vocabulary lacks.
SCORED_TEXT = "abc" * 300 + "a€zb" + "cab" * 100
WORD_TOKENS = ["", "[UNK]", "the", "cat", "sat", "on", "mat", "É"]


def _train_abc():
    """A 2x16 char LSTM trained on "abcabc...": its only good guess is the cycle."""
    vocabulary = Vocabulary(level="char", tokens=["", "[UNK]", "a", "b", "c"])
    ids = vocabulary.encode("abc" * 100)
    seq_len = 12
    count = (len(ids) - 1) // seq_len
    x = ids[: count * seq_len].reshape(count, seq_len)  # (windows, time)
    y = ids[1 : count * seq_len + 1].reshape(count, seq_len)  # x shifted by one
    model = models.build("lstm", vocab_size=vocabulary.size, units=16, layers=2, embedding_dim=8,
                         classifier_activation=None)
    model.compile(keras.optimizers.Adam(0.03), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=8, epochs=20, verbose=0)
    return model, vocabulary


def _keras_loss_sum(model, ids):
    """Summed next-token cross-entropy of `ids`, the whole sequence in one pass."""
    ids = np.asarray(ids, dtype="int32")[np.newaxis]  # (1, n)
    # predict, not an eager call: eager recurrent layers step in Python.
    logits = model.predict(ids[:, :-1], verbose=0)  # (1, n - 1, V)
    losses = keras.losses.sparse_categorical_crossentropy(ids[:, 1:], logits, from_logits=True)
    return float(np.sum(losses))


@pytest.fixture(scope="module")
def abc_export(tmp_path_factory):
    """(model, vocabulary, version folder) of the trained char LSTM."""
    keras.utils.set_random_seed(0)
    model, vocabulary = _train_abc()
    base_dir = tmp_path_factory.mktemp("saved_models")
    path = lm_export.export_language_model(
        model, vocabulary, name="abc", base_dir=base_dir, metadata={"seq_len": 12, "cell": "lstm"}
    )
    return model, vocabulary, path


@pytest.fixture(scope="module")
def word_export(tmp_path_factory):
    """(model, vocabulary, version folder) of a random word-level GRU."""
    keras.utils.set_random_seed(1)
    vocabulary = Vocabulary(level="word", tokens=list(WORD_TOKENS))
    model = models.build("gru", vocab_size=vocabulary.size, units=12, layers=2, embedding_dim=6,
                         classifier_activation=None)
    path = lm_export.export_language_model(
        model, vocabulary, name="words", base_dir=tmp_path_factory.mktemp("saved_models")
    )
    return model, vocabulary, path


@pytest.fixture(scope="module")
def served(abc_export):
    """The abc export loaded once: loading restores every traced loop (seconds)."""
    return ExportedLanguageModel.load(abc_export[2].parent)  # the NAME folder


def test_layout_metadata_and_next_version(abc_export, tmp_path):
    model, vocabulary, path = abc_export
    assert path.name == "1" and sorted(os.listdir(path.parent)) == ["1"]
    assert (path / "saved_model.pb").is_file()
    assert (path / "variables" / "variables.index").is_file()
    stored = json.loads((path / "assets" / "vocabulary.json").read_text(encoding="utf-8"))
    assert Vocabulary.from_json(stored) == vocabulary
    metadata = json.loads((path / "assets" / "dlsuite.json").read_text(encoding="utf-8"))
    assert metadata["format"] == "dlsuite.language_model" and metadata["kind"] == "next_token"
    assert (metadata["level"], metadata["vocabulary_size"]) == ("char", 5)
    assert (metadata["seq_len"], metadata["cell"]) == (12, "lstm")
    assert metadata["signatures"] == list(lm_export.SIGNATURES["next_token"])
    # Each weight stored once (keras-team/keras#23553 would store it twice).
    stored_values = sum(
        int(np.prod(shape))
        for name, shape in tf.train.list_variables(str(path / "variables" / "variables"))
        if name != "_CHECKPOINTABLE_OBJECT_GRAPH"
    )
    assert stored_values == model.count_params()

    # A second export of the same name lands next to the first as version 2.
    (tmp_path / "again" / "1").mkdir(parents=True)
    second = lm_export.export_language_model(model, vocabulary, name="again", base_dir=tmp_path)
    assert second.name == "2" and sorted(os.listdir(tmp_path / "again")) == ["1", "2"]


# Run with TensorFlow and numpy only, as TF Serving or any other client would:
# Keras and dlsuite are made unimportable, so a graph that still needed them
# could not load.
TF_ONLY_CLIENT = r"""
import json, pathlib, sys
for blocked in ("keras", "tf_keras", "dlsuite"):
    sys.modules[blocked] = None  # `import keras` now raises ImportError

import tensorflow as tf

loaded = tf.saved_model.load(sys.argv[1])
generate = loaded.signatures["serving_default"]

def text(prompt, length, temperature, seed):
    outputs = generate(prompt=tf.constant(prompt), length=tf.constant(length),
                       temperature=tf.constant(temperature), seed=tf.constant(seed, tf.int64))
    return outputs["text"].numpy().decode("utf-8"), outputs["token_ids"].numpy().tolist()

greedy = loaded.signatures["generate_top_k"](
    prompt=tf.constant("a"), length=tf.constant(30), temperature=tf.constant(1.0),
    seed=tf.constant(0, tf.int64), top_k=tf.constant(1))
scored = loaded.signatures["score"](text=tf.constant(pathlib.Path(sys.argv[2]).read_text(encoding="utf-8")))
results = {
    "seed_7": text("ab", 40, 5.0, 7),
    "seed_7_again": text("ab", 40, 5.0, 7),
    "seed_8": text("ab", 40, 5.0, 8),
    "unknown_prompt": text("zz€a ", 25, 1.0, 1),
    "empty_prompt": text("", 10, 1.0, 2),
    "greedy": greedy["text"].numpy().decode("utf-8"),
    "loss_sum": float(scored["loss_sum"]),
    "tokens": int(scored["tokens"]),
    "signatures": sorted(loaded.signatures),
    "foreign_modules": sorted(
        name for name, module in sys.modules.items()
        if module is not None and name.split(".")[0] in ("keras", "tf_keras", "dlsuite")
    ),
}
print(json.dumps(results))
"""


def test_saved_model_generates_and_scores_with_tensorflow_alone(abc_export, tmp_path):
    model, vocabulary, path = abc_export
    (tmp_path / "scored.txt").write_text(SCORED_TEXT, encoding="utf-8")
    client = subprocess.run(
        [sys.executable, "-c", TF_ONLY_CLIENT, str(path), str(tmp_path / "scored.txt")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert client.returncode == 0, client.stderr[-3000:]
    results = json.loads(client.stdout.splitlines()[-1])

    assert results["foreign_modules"] == []
    assert results["signatures"] == sorted(lm_export.SIGNATURES["next_token"])
    text, token_ids = results["seed_7"]
    assert len(text) == len(token_ids) == 40 and set(text) <= set("abc")
    assert min(token_ids) >= 2  # never padding or [UNK]
    assert results["seed_7_again"] == results["seed_7"]
    assert results["seed_8"] != results["seed_7"]
    # Unknown prompt characters read as [UNK] instead of failing.
    assert len(results["unknown_prompt"][0]) == 25 and set(results["unknown_prompt"][0]) <= set("abc")
    assert len(results["empty_prompt"][0]) == 10
    assert results["greedy"] == "bc" + "abc" * 9 + "a"

    ids = vocabulary.encode(SCORED_TEXT)
    assert len(ids) > 2 * lm_export.SCORE_CHUNK  # chunks with the state carried over
    assert results["tokens"] == len(ids) - 1
    assert results["loss_sum"] == pytest.approx(_keras_loss_sum(model, ids), abs=1e-3)


def test_saved_model_cli_lists_the_signatures(abc_export):
    _, _, path = abc_export
    cli = pathlib.Path(sys.executable).parent / "saved_model_cli"
    command = (
        [str(cli)] if cli.exists()
        else [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
    )
    shown = subprocess.run(
        command + ["show", "--dir", str(path), "--all"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert shown.returncode == 0, shown.stderr[-3000:]
    for signature in lm_export.SIGNATURES["next_token"]:
        assert f"signature_def['{signature}']" in shown.stdout
    for fragment in ("inputs['prompt']", "inputs['length']", "inputs['temperature']",
                     "inputs['seed']", "inputs['top_k']", "inputs['text']", "inputs['token_ids']",
                     "outputs['text']", "outputs['loss_sum']", "outputs['tokens']",
                     "outputs['logits']", "DT_STRING", "DT_INT64"):
        assert fragment in shown.stdout, fragment


def test_the_export_passes_the_saved_model_scan(abc_export, word_export):
    """Nothing `saved_model_cli scan` flags (#15): our exports load without --trust-model."""
    from dlsuite.apps.core import saved_models

    for path in (abc_export[2], word_export[2]):
        assert saved_models.denylisted_ops(saved_models.read(path)) == []
        saved_models.check(path, signatures=lm_export.SIGNATURES["next_token"])


def test_exported_language_model_reads_the_newest_version(abc_export, served):
    model, vocabulary, path = abc_export
    assert served.path == path
    assert served.vocabulary == vocabulary and served.level == "char"
    assert served.metadata["seq_len"] == 12 and not served.can_embed

    assert served.generate("a", length=30, temperature=1.0, seed=0, top_k=1) == "bc" + "abc" * 9 + "a"
    text = served.generate("ab", length=20, temperature=2.0, seed=11)
    assert "".join(served.stream("ab", length=20, temperature=2.0, seed=11)) == text
    assert len(served.generate("", length=7)) == 7  # a fresh seed each call
    loss_sum, tokens = served.score(SCORED_TEXT)
    ids = vocabulary.encode(SCORED_TEXT)
    assert tokens == len(ids) - 1
    assert loss_sum == pytest.approx(_keras_loss_sum(model, ids), abs=1e-3)
    assert served.score("a") == (0.0, 0)
    ids = np.array([[2, 3, 4, 2], [4, 4, 3, 1]], dtype="int32")
    np.testing.assert_allclose(served.next_token_logits(ids), model(ids).numpy(), atol=1e-5)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"length": 0}, "length must be a positive number of tokens, received 0"),
        ({"temperature": 0.0}, "temperature must be a number > 0"),
        ({"temperature": -1}, "received -1"),
        ({"top_k": 0}, "top_k must be a positive integer"),
        ({"seed": 1.5}, "seed must be an integer"),
    ],
)
def test_bad_generation_options_are_usage_errors(served, options, message):
    with pytest.raises(UsageError, match=message):
        served.generate(**{"prompt": "a", "length": 5, "temperature": 1.0, **options})
    with pytest.raises(UsageError, match="one-direction"):
        served.embed("abc")


def test_word_level_tokenizes_in_the_graph_as_the_vocabulary_does(word_export):
    model, vocabulary, path = word_export
    served = ExportedLanguageModel.load(path)
    # Case, punctuation, an unknown word, non-ASCII letters (É is not lower-cased,
    # as TextVectorization does not), a no-break space (not a separator).
    text = "The CAT sat, on the mat!  The dog's mat... É é the\u00a0cat\ncat"
    ids = vocabulary.encode(text)
    loss_sum, tokens = served.score(text)
    assert tokens == len(ids) - 1
    assert loss_sum == pytest.approx(_keras_loss_sum(model, ids), abs=1e-3)

    # Greedy decoding is the same in the graph and in apps.lm.generate.
    expected = "".join(generation.generate(model, vocabulary, prompt="The cat", length=12, top_k=1))
    assert " " + served.generate("The cat", length=12, temperature=1.0, seed=0, top_k=1) == expected
    pieces = list(served.stream("the", length=6, temperature=1.0, seed=3))
    assert " " + served.generate("the", length=6, temperature=1.0, seed=3) == "".join(pieces)
    assert all(piece[0] == " " and piece[1:] in WORD_TOKENS[2:] for piece in pieces)


def test_bilm_exports_embeddings_and_a_forward_score(tmp_path):
    vocabulary = Vocabulary(level="char", tokens=["", "[UNK]", "a", "b", "c", " "])
    model = models.build("bilm", vocab_size=vocabulary.size, units=6, embedding_dim=4,
                         layers_per_direction=2)
    path = lm_export.export_language_model(model, vocabulary, name="bi", base_dir=tmp_path)
    served = ExportedLanguageModel.load(path)
    assert served.kind == "bilm" and served.can_embed
    from dlsuite.apps.core import saved_models

    assert saved_models.denylisted_ops(saved_models.read(path)) == []  # passes the scan (#15)
    tokens, embeddings = served.embed("ab ca€")
    assert tokens == list("ab ca€")
    expected = embedding_model(model)(vocabulary.encode("ab ca€")[np.newaxis])[0]
    np.testing.assert_allclose(embeddings, expected, atol=1e-5)
    assert served.embed("")[1].shape == (0, 12)
    ids = vocabulary.encode("abc abc cab")
    logits = model(ids[np.newaxis, :-1])[0]  # forward direction
    expected_loss = float(np.sum(keras.losses.sparse_categorical_crossentropy(
        ids[np.newaxis, 1:], logits, from_logits=True)))
    assert served.score("abc abc cab") == (pytest.approx(expected_loss, abs=1e-4), len(ids) - 1)
    with pytest.raises(UsageError, match="biLM export"):
        served.generate("a", length=3)


def _fail(*args, **kwargs):
    raise RuntimeError("disk full")


def _write_partly(stepper, tokens, *, level, start_id, path):
    # Stands in for the SavedModel (the folder mechanics are under test, not
    # the tracing) and leaves a file behind, as an interrupted save would.
    pathlib.Path(path, "saved_model.pb").write_bytes(b"partial")


@pytest.mark.parametrize("attribute", ["_write_saved_model", "_write_assets", "os.rename"])
def test_failed_export_leaves_nothing_behind(tmp_path, monkeypatch, attribute):
    model = models.build("gru", vocab_size=5, units=4, layers=1, embedding_dim=2, classifier_activation=None)
    vocabulary = Vocabulary(level="char", tokens=["", "[UNK]", "a", "b", "c"])
    (tmp_path / "kept" / "1").mkdir(parents=True)
    monkeypatch.setattr(lm_export, "_write_saved_model", _write_partly)
    # The rename is the shared atomic writer's, core/versions.write_version_atomically.
    target = versions.os if attribute == "os.rename" else lm_export
    monkeypatch.setattr(target, attribute.split(".")[-1], _fail)

    for name in ("kept", "fresh"):
        with pytest.raises(RuntimeError, match="disk full"):
            lm_export.export_language_model(model, vocabulary, name=name, base_dir=tmp_path)
    assert sorted(os.listdir(tmp_path / "kept")) == ["1"]
    assert sorted(os.listdir(tmp_path)) == ["kept"]  # "fresh" never appeared


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"name": "../up"}, "Invalid export name"),
        ({"version": 0}, "positive integer"),
        ({"metadata": {"level": "word"}}, r"may not set \['level'\]"),
        ({"metadata": {"when": object()}}, "JSON-serializable"),
        ({"metadata": [1, 2]}, "must be a dict"),
        ({"vocabulary": Vocabulary(level="char", tokens=["", "[UNK]", "a"])}, "predicts 5 tokens"),
        ({"model": "sequence"}, "does not return its steps"),
    ],
)
def test_export_argument_errors(tmp_path, changes, message):
    arguments = {
        "model": models.build("lstm", vocab_size=5, units=4, layers=1, embedding_dim=2),
        "vocabulary": Vocabulary(level="char", tokens=["", "[UNK]", "a", "b", "c"]),
        "name": "m", "base_dir": tmp_path, **changes,
    }
    if arguments["model"] == "sequence":
        arguments["model"] = models.build("gru", vocab_size=5, units=4, layers=1, head="sequence")
    with pytest.raises(UsageError, match=message):
        lm_export.export_language_model(arguments.pop("model"), arguments.pop("vocabulary"), **arguments)
    assert os.listdir(tmp_path) == []  # checked before anything is written


def test_loading_something_else_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        ExportedLanguageModel.load(tmp_path / "missing")
    foreign = tmp_path / "foreign" / "1"
    foreign.mkdir(parents=True)
    (foreign / "saved_model.pb").write_bytes(b"not ours")
    with pytest.raises(UsageError, match="is not a language model exported by dlsuite"):
        ExportedLanguageModel.load(tmp_path / "foreign")
