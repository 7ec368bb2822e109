"""`dlsuite lm` end to end on a small text: training beats the unigram
baseline, the export generates and scores, the biLM embeds, bad input is named."""

import json

import numpy as np
import pytest

from dlsuite.apps import cli

TEXT = "the quick brown fox jumps over the lazy dog. " * 120 + "a lazy dog sleeps in the sun. " * 60
# The default recipe (two layers, cosine to 0, dropout 0.1) at a toy size; 0.01 decays too
# soon in 80 steps, so 12 epochs. Two layers: a two-layer export once failed (a state shape lost).
SMALL = ["--units", "48", "--layers", "2", "--embedding", "16", "--seq-len", "40", "--batch-size", "16", "--lr", "0.02"]


def run(argv, capsys):
    status = cli.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "fox.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    status = cli.main(["lm", "train", "--text", str(corpus), "--epochs", "12", *SMALL,
                       "--out", str(root / "run"), "--export-dir", str(root / "exports"), "--export", "fox"])
    assert status == 0
    return root


def test_training_beats_the_unigram_baseline_by_far(trained):
    metrics = json.loads((trained / "run" / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    assert metrics["validation_perplexity"] < metrics["unigram_perplexity"] / 3
    assert metrics["bits_per_character"] < 1.5
    for name in ("config.json", "vocabulary.json", "history.csv", "curves.png", "model.keras"):
        assert (trained / "run" / name).exists(), name


def test_generate_streams_reproducible_text_from_the_export(trained, capsys):
    export = str(trained / "exports" / "fox")
    argv = ["lm", "generate", export, "--prompt", "the quick ", "--length", "60", "--seed", "3", "--temperature", "0.5"]
    status, first, _ = run(argv, capsys)
    assert status == 0
    status, second, _ = run(argv, capsys)
    assert first == second and first.startswith("the quick ")
    assert len(first.rstrip("\n")) == len("the quick ") + 60
    assert set(first.rstrip("\n")) <= set(TEXT)
    assert "brown" in first or "lazy" in first  # it learned the text


def test_evaluate_reports_perplexity_on_any_text(trained, corpus, capsys):
    status, out, _ = run(["lm", "evaluate", str(trained / "exports" / "fox"), "--text", str(corpus), "--json"], capsys)
    assert status == 0
    figures = json.loads(out)
    assert figures["characters"] == len(TEXT)
    assert figures["validation_perplexity"] < 3.0
    assert figures["bits_per_character"] == pytest.approx(figures["validation_loss"] * figures["tokens"] / len(TEXT) / np.log(2))


def test_prompt_outside_the_vocabulary_warns(trained, capsys):
    status, out, err = run(["lm", "generate", str(trained / "exports" / "fox"), "--prompt", "QZ", "--length", "5"], capsys)
    assert status == 0
    assert "warning: 2 prompt characters are not in the vocabulary" in err


def test_bilm_trains_and_embeds(corpus, tmp_path, capsys):
    status, _, err = run(["lm", "train", "--text", str(corpus), "--cell", "bilstm", "--epochs", "1", *SMALL,
                          "--out", str(tmp_path / "run"), "--export-dir", str(tmp_path / "exports"), "--export", "bifox"], capsys)
    assert status == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "backward_perplexity" in metrics
    status, out, err = run(["lm", "embed", str(tmp_path / "exports" / "bifox"), "--text", str(corpus),
                            "--out", str(tmp_path / "fox.npz")], capsys)
    assert status == 0, err
    saved = np.load(tmp_path / "fox.npz")
    assert saved["embeddings"].shape == (len(TEXT), 96)  # one per character, forward 48 + backward 48
    assert len(saved["tokens"]) == len(TEXT)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (b"\x00\x01\x02binary\x00", "binary"),
        ("tiny text".encode(), "too short"),
    ],
)
def test_bad_text_files(content, message, tmp_path, capsys):
    path = tmp_path / "input.txt"
    path.write_bytes(content)
    status, _, err = run(["lm", "train", "--text", str(path), *SMALL, "--out", str(tmp_path / "never")], capsys)
    assert status == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--temperature", "0"], "--temperature must be > 0, received 0.0"),
        (["--length", "0"], "--length must be > 0 tokens, received 0"),
    ],
)
def test_bad_generation_options(trained, extra, message, capsys):
    status, _, err = run(["lm", "generate", str(trained / "exports" / "fox"), *extra], capsys)
    assert status == 2 and message in err


def test_irnn_needs_the_simple_rnn(corpus, tmp_path, capsys):
    status, _, err = run(["lm", "train", "--text", str(corpus), "--irnn", "--out", str(tmp_path / "never")], capsys)
    assert status == 2 and "--irnn applies to cell rnn" in err


def test_word_level_model_trains_generates_and_scores(corpus, tmp_path, capsys):
    status, _, err = run(["lm", "train", "--text", str(corpus), "--level", "word", "--epochs", "3", "--units", "32",
                          "--layers", "1", "--embedding", "8", "--seq-len", "10", "--batch-size", "8", "--lr", "0.01",
                          "--out", str(tmp_path / "run"), "--export-dir", str(tmp_path / "exports"), "--export", "words"], capsys)
    assert status == 0, err
    vocabulary = json.loads((tmp_path / "run" / "vocabulary.json").read_text())
    assert vocabulary["level"] == "word" and vocabulary["tokens"][:2] == ["", "[UNK]"]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["validation_perplexity"] < metrics["unigram_perplexity"]
    status, out, _ = run(["lm", "generate", str(tmp_path / "exports" / "words"), "--prompt", "the quick", "--length", "6",
                          "--seed", "2"], capsys)
    words = out.strip().split()
    assert status == 0 and words[:2] == ["the", "quick"] and len(words) == 8
    assert set(words[2:]) <= set(TEXT.replace(".", "").split())
