"""`dlsuite tune`: a search end to end (trials table, best hyperparameters,
plot, restored best model scored on test and exported), resuming, failing
trials, the failure limit, a language-model search, a distributed search with
a chief and two workers, and every bad input the issue lists."""

import csv
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import zygote
from dlsuite.apps import cli
from dlsuite.apps.tune import space as search_space

# LeNet-5 trains; AlexNet needs 67-pixel images, so at --image-size 32 its
# trials fail when built: the recorded error and the search going on.
SPACE = """
model: [lenet5, alexnet]
batch_size: [32, 64]
lr: 0.003
optimizer: adam
lr_schedule: constant
dropout: 0.0
l2: 1.0e-4
batch_norm: true
"""
ALEXNET_ERROR = "image_size 32 is too small for alexnet, which needs at least 67"


def run(argv, capsys):
    status = cli.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def read_rows(directory):
    with open(directory / "trials.csv") as handle:
        return list(csv.DictReader(handle))


def tune_argv(directory, space_file, *extra):
    return ["tune", "classify", "--space", str(space_file), "--image-size", "32", "--epochs", "1",
            "--dir", str(directory), *extra]


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    """Three trials of four combinations: one or two of them AlexNet, which fail."""
    root = tmp_path_factory.mktemp("tune")
    (root / "space.yaml").write_text(SPACE)
    argv = tune_argv(root / "search", root / "space.yaml", "--max-trials", "3", "--export-dir", str(root / "exports"))
    assert cli.main(argv) == 0
    return root


def test_search_records_every_trial_and_goes_on_past_failures(search):
    rows = read_rows(search / "search")
    assert [row["trial"] for row in rows] == ["0", "1", "2"]
    assert len({(row["model"], row["batch_size"]) for row in rows}) == 3  # no combination twice
    models = [row["model"] for row in rows]
    assert "lenet5" in models and "alexnet" in models  # three of four combinations hold both
    for row in rows:
        if row["model"] == "alexnet":
            assert row["status"] == "FAILED" and ALEXNET_ERROR in row["error"] and row["val_accuracy"] == ""
        else:
            assert row["status"] == "COMPLETED" and row["error"] == ""
            assert 0.5 < float(row["val_accuracy"]) <= 1.0
            assert row["epochs"] == "1" and row["best_epoch"] == "1" and float(row["seconds"]) > 0
        assert row["worker"] == "tuner0"
        trial = json.loads((search / "search" / "trials" / f"trial_{row['trial']}" / "trial.json").read_text())
        assert trial["status"] == row["status"]
        if row["status"] == "FAILED":
            assert ALEXNET_ERROR in trial["message"]  # keras-tuner keeps the traceback


def test_best_hyperparameters_and_plot(search):
    rows = read_rows(search / "search")
    completed = [row for row in rows if row["status"] == "COMPLETED"]
    best_row = max(completed, key=lambda row: float(row["val_accuracy"]))
    best = json.loads((search / "search" / "best_hyperparameters.json").read_text())
    assert best["trial"] == best_row["trial"]
    assert best["objective"] == {"name": "val_accuracy", "direction": "max", "value": pytest.approx(float(best_row["val_accuracy"]))}
    assert best["hyperparameters"] == {
        "model": "lenet5", "batch_size": int(best_row["batch_size"]), "lr": 0.003, "optimizer": "adam",
        "lr_schedule": "constant", "dropout": 0.0, "l2": 1e-4, "batch_norm": True, "epochs": 1,
    }
    assert (search / "search" / "objective.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tune = json.loads((search / "search" / "tune.json").read_text())
    assert tune["space"]["model"] == {"choice": ["lenet5", "alexnet"]} and tune["tuner"] == "random"


def test_best_model_is_the_best_epoch_scored_once_on_test_and_exported(search):
    import keras

    from dlsuite.apps.vision import datasets, export, pipeline

    metrics = json.loads((search / "search" / "metrics.json").read_text())
    best = json.loads((search / "search" / "best_hyperparameters.json").read_text())
    assert metrics["status"] == "finished" and metrics["best_trial"] == best["trial"]
    assert metrics["how"] == "restored from its best epoch" and metrics["test_accuracy"] > 0.5
    model = keras.saving.load_model(search / "search" / "model.keras")
    data = datasets.load("digits", seed=0)
    validation = pipeline.batches(data.validation, image_size=(32, 32), channels=1, batch_size=64, training=False)
    labels = np.concatenate([np.asarray(y) for _, y in validation])
    probabilities = model.predict(validation, verbose=0)
    # The restored model is exactly the one the search scored on validation.
    assert np.mean(probabilities.argmax(axis=1) == labels) == pytest.approx(best["objective"]["value"], abs=1e-6)

    exported = pathlib.Path(metrics["export"])
    assert exported == search / "exports" / "lenet5_digits" / "1" and (exported / "saved_model.pb").exists()
    images = np.concatenate([np.asarray(x) for x, _ in validation])[:16]
    served = export.ExportedClassifier.load(exported.parent)
    np.testing.assert_allclose(served.predict_pixels(images), probabilities[:16], atol=1e-5)


def test_same_command_resumes_without_repeating_trials(search, tmp_path, capsys):
    directory = tmp_path / "search"
    shutil.copytree(search / "search", directory)
    before = read_rows(directory)

    status, out, err = run(tune_argv(directory, search / "space.yaml", "--max-trials", "4", "--export-dir", str(tmp_path / "exports")), capsys)
    assert status == 0, err
    assert "trial 3 on tuner0:" in out and not any(f"trial {i} on" in out for i in range(3))
    after = read_rows(directory)
    assert after[:3] == before and len(after) == 4
    assert {(row["model"], row["batch_size"]) for row in after} == {(m, b) for m in ("lenet5", "alexnet") for b in ("32", "64")}
    exports = sorted(p.name for p in (tmp_path / "exports").glob("*/*")) if (tmp_path / "exports").exists() else []

    status, out, err = run(tune_argv(directory, search / "space.yaml", "--max-trials", "4", "--export-dir", str(tmp_path / "exports")), capsys)
    assert status == 0, err
    assert " on tuner0:" not in out and "already scored and exported" in out
    assert read_rows(directory) == after
    assert (sorted(p.name for p in (tmp_path / "exports").glob("*/*")) if (tmp_path / "exports").exists() else []) == exports


def test_without_its_checkpoint_the_best_trial_is_retrained_to_the_same_model(search, tmp_path, capsys):
    """As on a chief whose workers ran elsewhere: each trial is a function of
    its hyperparameters and the seed, so retraining gives the same model."""
    directory = tmp_path / "search"
    shutil.copytree(search / "search", directory)
    restored = json.loads((directory / "metrics.json").read_text())
    (directory / "metrics.json").unlink()
    (directory / "trials" / f"trial_{restored['best_trial']}" / "checkpoint.weights.h5").unlink()
    status, out, err = run(tune_argv(directory, search / "space.yaml", "--max-trials", "3", "--no-export"), capsys)
    assert status == 0, err
    retrained = json.loads((directory / "metrics.json").read_text())
    assert retrained["how"] == "retrained" and retrained["best_trial"] == restored["best_trial"]
    assert retrained["test_accuracy"] == pytest.approx(restored["test_accuracy"], abs=1e-9)
    assert retrained["test_loss"] == pytest.approx(restored["test_loss"], rel=1e-4)


def test_a_different_search_in_the_same_directory_is_refused(search, tmp_path, capsys):
    directory = tmp_path / "search"
    shutil.copytree(search / "search", directory)
    table = (directory / "trials.csv").read_bytes()
    status, _, err = run(tune_argv(directory, search / "space.yaml", "--objective", "val_loss"), capsys)
    assert status == 2
    assert "holds a search with another objective" in err and len(err.strip().splitlines()) == 1
    assert (directory / "trials.csv").read_bytes() == table


def test_search_stops_after_max_failures_in_a_row(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("model: [alexnet, zfnet]\nbatch_size: 32\n")
    status, _, err = run(tune_argv(tmp_path / "search", space, "--max-failures", "1", "--no-export"), capsys)
    assert status == 1
    assert "search stopped: 1 trial in a row failed (--max-failures 1)" in err and "too small for" in err
    rows = read_rows(tmp_path / "search")
    assert len(rows) == 1 and rows[0]["status"] == "FAILED" and "too small for" in rows[0]["error"]
    assert not (tmp_path / "search" / "metrics.json").exists()


def test_language_model_search_reports_perplexity_and_exports(tmp_path, capsys):
    from dlsuite.apps.lm import text

    (tmp_path / "corpus.txt").write_text(text.default_corpus(max_chars=20_000))
    space = tmp_path / "lm.json"
    space.write_text(json.dumps({"cell": "gru", "layers": 1, "units": 16, "embedding": 8, "batch_size": 16,
                                 "seq_len": 20, "lr": 0.01, "optimizer": "adam", "lr_schedule": "constant", "dropout": 0}))
    status, out, err = run(["tune", "lm", "--space", str(space), "--text", str(tmp_path / "corpus.txt"), "--max-trials", "1",
                            "--epochs", "1", "--objective", "val_perplexity", "--dir", str(tmp_path / "search"),
                            "--export", "gru-tuned", "--export-dir", str(tmp_path / "exports")], capsys)
    assert status == 0, err
    rows = read_rows(tmp_path / "search")
    assert len(rows) == 1 and rows[0]["status"] == "COMPLETED"
    trial = json.loads((tmp_path / "search" / "trials" / "trial_0" / "trial.json").read_text())
    val_loss = trial["metrics"]["metrics"]["val_loss"]["observations"][0]["value"][0]
    assert float(rows[0]["val_perplexity"]) == pytest.approx(np.exp(val_loss), rel=1e-6)
    metrics = json.loads((tmp_path / "search" / "metrics.json").read_text())
    # About 80 characters: a uniform guess has perplexity 80; one small epoch learns far more.
    assert 1 < metrics["test_perplexity"] < 40
    assert metrics["export"] == str(tmp_path / "exports" / "gru-tuned" / "1")
    assert (tmp_path / "exports" / "gru-tuned" / "1" / "saved_model.pb").exists()


def test_caption_search_scores_bleu_on_validation_and_exports_the_best_captioner(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the search caches the features
    space = tmp_path / "caption.yaml"
    space.write_text("decoder: [lstm, gru]\nattention: false\nunits: 64\nembedding: 32\ndropout: 0.2\n"
                     "batch_size: 32\nlr: 0.005\noptimizer: adam\n")
    status, out, err = run(["tune", "caption", "--space", str(space), "--scenes-count", "500", "--max-trials", "2",
                            "--epochs", "2", "--beam", "2", "--dir", str(tmp_path / "search"),
                            "--export-dir", str(tmp_path / "exports")], capsys)
    assert status == 0, err
    rows = read_rows(tmp_path / "search")
    assert sorted(row["decoder"] for row in rows) == ["gru", "lstm"]
    assert all(row["status"] == "COMPLETED" and 0 < float(row["val_bleu4"]) <= 1 for row in rows)
    metrics = json.loads((tmp_path / "search" / "metrics.json").read_text())
    assert metrics["best_val_bleu4"] == max(float(row["val_bleu4"]) for row in rows)
    # The captions describe the images: far above the most frequent training caption.
    assert metrics["bleu4"] > metrics["baseline"]["bleu4"] + 0.1
    assert metrics["beam"]["beam_size"] == 2 and 0 < metrics["greedy"]["bleu4"] <= 1
    best = json.loads((tmp_path / "search" / "best_hyperparameters.json").read_text())
    export = pathlib.Path(metrics["export"])
    assert export == tmp_path / "exports" / f"vgg11_{best['hyperparameters']['decoder']}_scenes" / "1"
    metadata = json.loads((export / "assets" / "dlsuite.json").read_text())
    assert metadata["beam_size"] == 2 and metadata["test_bleu"]["bleu4"] == metrics["bleu4"]
    assert not list(tmp_path.glob("dlsuite-tune-caption-*"))  # the feature cache is gone


@pytest.mark.parametrize("extra, message", [
    (["--objective", "val_accuracy"], "--objective 'val_accuracy' is not reported by caption; choose one of val_bleu4, val_loss"),
    (["--fine-tune-encoder"], "unrecognized arguments: --fine-tune-encoder"),
    (["--images", "photos"], "--images and --captions go together"),
])
def test_caption_search_bad_input(extra, message, tmp_path, capsys):
    status, _, err = run(["tune", "caption", "--dir", str(tmp_path / "search"), *extra], capsys)
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "search").exists()


@pytest.mark.parametrize(
    "extra, space, message",
    [
        (["tune", "nope"], None, "invalid choice: 'nope'"),
        (["--tuner", "grid"], None, "argument --tuner: invalid choice: 'grid' (choose from 'random', 'hyperband', 'bayesian')"),
        (["--max-trials", "0"], None, "argument --max-trials: expected a positive integer, received '0'"),
        (["--objective", "val_f1"], None, "--objective 'val_f1' is not reported by classify; choose one of val_accuracy, val_loss"),
        ([], "learning_rate: 0.1\n", "unknown key 'learning_rate' for classify; allowed keys: activation, batch_norm, batch_size"),
        ([], "lr: {min: 0.1, max: 0.001}\n", "'lr': min 0.1 > max 0.001; swap them"),
        ([], "l2: {min: 0, max: 0.01, sampling: log}\n", "'l2': log sampling needs min > 0, received min 0"),
        ([], "optimizer: [adam, adamw]\n", "'optimizer': unknown choice 'adamw'; allowed: sgd, momentum, nesterov, adagrad, rmsprop, adam"),
        ([], "dropout: {min: 0, max: 1.5}\n", "'dropout': max 1.5 is outside the allowed range [0, 1)"),
        ([], "model: {min: 1, max: 2}\n", "'model': takes no min/max range; list the choices instead"),
        ([], "batch_size: [32, 32.5]\n", "'batch_size': expected an integer in [1, 65536], received 32.5"),
        ([], "lr: {min: 1.0e-4, max: 0.1, spread: 2}\n", "'lr': a range takes the keys min, max, step, sampling"),
        ([], "lr: [0.1\n", "is not valid YAML"),
        (["--model", "lenet7"], None, "--model: unknown choice 'lenet7'; allowed: alexnet"),
        (["--tuner", "hyperband"], "epochs: {min: 1, max: 5}\n", "hyperband chooses each trial's epochs itself"),
        (["--strategy", "multi-worker"], None, "--strategy multi-worker cannot train a trial"),
        (["--strategy", "parameter-server"], None, "--strategy parameter-server cannot train a trial"),
        (["--export", "a/b"], None, "Invalid export name 'a/b'"),
        (["--space", "missing.yaml"], None, "--space 'missing.yaml': no such file"),
        ([], "batch_size: 5000\n", "batch_size 5000 in the search space is larger than the 1257 training examples"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(extra, space, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if extra[:1] == ["tune"]:
        argv = extra
    else:
        argv = ["tune", "classify", "--dir", str(tmp_path / "search"), "--export-dir", str(tmp_path / "exports"), *extra]
        if space is not None:
            (tmp_path / "space.yaml").write_text(space)
            argv += ["--space", str(tmp_path / "space.yaml")]
    status, out, err = run(argv, capsys)
    assert status == 2
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("dlsuite: error: ") and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["space.yaml"] if space is not None else [])


def test_incomplete_distributed_settings_are_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "127.0.0.1")
    monkeypatch.delenv("KERASTUNER_ORACLE_PORT", raising=False)
    monkeypatch.delenv("KERASTUNER_TUNER_ID", raising=False)
    status, _, err = run(["tune", "classify", "--dir", str(tmp_path / "search")], capsys)
    assert status == 2
    assert "KERASTUNER_ORACLE_IP is set (127.0.0.1) but KERASTUNER_ORACLE_PORT and KERASTUNER_TUNER_ID not" in err
    assert not (tmp_path / "search").exists()


def test_space_files_yaml_json_and_the_recorded_space_agree(tmp_path):
    import keras_tuner

    (tmp_path / "a.yaml").write_text("lr: {min: 1e-4, max: 1e-1, sampling: log}\nbatch_size: {choice: [16, 64]}\nmodel: lenet5\n")
    space = search_space.load(tmp_path / "a.yaml", "classify", epochs=3)
    # YAML reads 1e-4 as a string; the space takes it as the number it means.
    assert space.entries["lr"] == {"min": 1e-4, "max": 0.1, "step": None, "sampling": "log"}
    assert space.entries["epochs"] == {"fixed": 3} and space.entries["batch_norm"] == {"choice": [True, False]}
    (tmp_path / "b.json").write_text(json.dumps(space.to_json()))
    assert search_space.load(tmp_path / "b.json", "classify", epochs=99).entries == space.entries
    hp = keras_tuner.HyperParameters()
    values = space.declare(hp)
    assert values["model"] == "lenet5" and values["batch_size"] == 16 and values["epochs"] == 3
    assert {p.name: type(p).__name__ for p in hp.space}["lr"] == "Float" and hp.space[0].name == "model"
    assert space.searched() == ["batch_norm", "batch_size", "lr", "optimizer", "lr_schedule", "dropout", "l2"]


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_distributed_search_shares_the_trials_between_workers(tmp_path):
    """A chief and two workers on localhost, through keras-tuner's variables:
    every trial runs once, on a worker, and both workers take one."""
    (tmp_path / "space.yaml").write_text(SPACE.replace("[lenet5, alexnet]", "lenet5"))
    argv = [sys.executable, "-m", "dlsuite.apps.cli", *tune_argv(tmp_path / "search", tmp_path / "space.yaml"),
            "--max-trials", "2", "--no-export"]
    port = _free_port()
    processes, logs = {}, {}

    def start(tuner_id):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "KERASTUNER_TUNER_ID": tuner_id,
               "KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": str(port)}
        logs[tuner_id] = open(tmp_path / f"{tuner_id}.log", "w")
        processes[tuner_id] = zygote.Popen(argv, env=env, cwd=tmp_path, stdout=logs[tuner_id], stderr=subprocess.STDOUT)

    def output(tuner_id):
        return (tmp_path / f"{tuner_id}.log").read_text()

    try:
        # All at once: the workers wait for the chief (gRPC wait_for_ready), and
        # both ask for a trial within about a second, well inside a trial's time.
        for tuner_id in ("chief", "tuner0", "tuner1"):
            start(tuner_id)
        for tuner_id, process in processes.items():
            assert process.wait(timeout=300) == 0, output(tuner_id)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
        for handle in logs.values():
            handle.close()

    rows = read_rows(tmp_path / "search")
    assert [row["status"] for row in rows] == ["COMPLETED", "COMPLETED"]
    assert sorted(row["worker"] for row in rows) == ["tuner0", "tuner1"]  # one trial each
    assert sorted(row["batch_size"] for row in rows) == ["32", "64"]
    for row in rows:
        assert f"ran trials {row['trial']};" in output(row["worker"])  # and no other
        assert f"chief: trial {row['trial']} done: val_accuracy" in output("chief")
    assert json.loads((tmp_path / "search" / "metrics.json").read_text())["status"] == "finished"
