"""The run lifecycle, the same for every app of the table that trains
(`table.APPS`): a tiny run, interrupted and resumed, leaves the
whole run directory and an export that loads; bad output paths and bad
options fail before training with nothing on disk; a two-worker run on
localhost leaves one run directory and one export, the chief's."""

import csv
import json
import os
import pathlib
import subprocess

import keras
import pytest

import multiworker_cluster
from dlsuite.apps import cli
from dlsuite.apps.core import lifecycle
from dlsuite.apps import table
from dlsuite.models import fused_rnn

# The smallest run of each app that still trains on real (generated or bundled) data.
TINY = {
    "classify": ["classify", "train", "--dataset", "shapes", "--shapes-size", "32", "--shapes-count", "120",
                 "--batch-size", "32"],
    "lm": ["lm", "train", "--max-chars", "4000", "--units", "16", "--layers", "1", "--embedding", "8",
           "--seq-len", "20", "--batch-size", "16"],
    "transfer": ["transfer", "finetune", "--backbone", "lenet5", "--weights", "none", "--dataset", "shapes",
                 "--shapes-size", "32", "--shapes-count", "120", "--freeze-epochs", "1", "--finetune-epochs", "1"],
    "caption": ["caption", "train", "--scenes-count", "40", "--scenes-size", "32", "--units", "8", "--embedding", "8",
                "--batch-size", "16", "--max-length", "8", "--beam", "2"],
}
EPOCHS = {"transfer": []}  # transfer's two epochs are its phase options
ONE_EPOCH = {"transfer": ["--finetune-epochs", "0"]}
APPS = sorted(app.name for app in table.APPS if app.task)


def test_every_app_of_the_table_has_a_tiny_run():
    assert sorted(TINY) == APPS
    for name in APPS:
        task_class = table.get(name).task_class()
        assert task_class.app == name and TINY[name][:2] == [name, "finetune" if name == "transfer" else "train"]


def run(argv, capsys):
    status = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def epochs(app):
    return EPOCHS.get(app, ["--epochs", "2"])


@pytest.mark.parametrize("app", APPS)
def test_an_interrupted_run_resumes_and_leaves_the_whole_run(app, tmp_path, capsys, interrupt_at_epoch_end):
    run_dir, exports = tmp_path / "run", tmp_path / "exports"
    interrupt_at_epoch_end(1)
    status, _, err = run([*TINY[app], *epochs(app), "--out", run_dir, "--export-dir", exports], capsys)
    assert status == 130 and "interrupted" in err
    assert not (run_dir / "metrics.json").exists() and not exports.exists()
    config = (run_dir / "config.json").read_text()

    status, out, err = run([app, TINY[app][1], "--resume", run_dir], capsys)
    assert status == 0, err
    metrics = json.loads((run_dir / "metrics.json").read_text())
    with open(run_dir / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert metrics["status"] == "finished" and metrics["epochs_run"] == len(rows) == 2
    assert (run_dir / "config.json").read_text() == config  # the interrupted run's, unchanged
    keras.saving.load_model(run_dir / "model.keras")  # loads in safe mode
    export = pathlib.Path(metrics["export"])
    assert export.parent.parent == exports and (export / "saved_model.pb").exists()
    import tensorflow as tf

    assert "serving_default" in tf.saved_model.load(str(export)).signatures
    assert not list(run_dir.rglob("resume")) and not list(run_dir.rglob(".*tmp*"))

    status, _, err = run([app, TINY[app][1], "--resume", run_dir], capsys)
    assert status == 2 and "that run finished; start a new run instead" in err


@pytest.mark.parametrize("app", APPS)
@pytest.mark.parametrize("bad, message", [
    (["--export-dir", "a-file/exports"], "cannot write exports under 'a-file/exports': 'a-file' is not a folder"),
    (["--lr", "-1"], "--lr must be > 0, received -1.0"),
    (["--export", "../up"], "Invalid export name '../up'"),
])
def test_bad_output_or_option_fails_before_anything_is_written(app, bad, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pathlib.Path("a-file").write_text("not a folder")
    status, _, err = run([*TINY[app], *epochs(app), *bad], capsys)
    assert status == 2 and err.startswith("dlsuite: error: ") and message in err, err
    assert sorted(os.listdir(tmp_path)) == ["a-file"]


def test_bad_input_found_while_building_removes_the_new_run_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, _, err = run([*TINY["transfer"], "--unfreeze", "9"], capsys)
    assert status == 2 and "--unfreeze 9 is more than the 3 layers" in err
    assert os.listdir(tmp_path) == []  # not even runs/


def test_resume_refuses_a_folder_without_a_run(tmp_path):
    (tmp_path / "config.json").write_text('{"resolved": {}}')
    with pytest.raises(lifecycle.UsageError, match="config.json is not a config this app wrote"):
        lifecycle.resumed_config(lifecycle.train_args.TrainingConfig, tmp_path)


# classify's two workers: test_a_lost_worker_stops_the_other_with_one_line_and_both_resume.
@pytest.mark.parametrize("app", [app for app in APPS if app != "classify"])
def test_two_workers_leave_one_run_directory_and_one_export(app, tmp_path):
    """TF_CONFIG as on a cluster: the chief writes the run directory and the
    export; the other worker leaves nothing behind."""
    workers = multiworker_cluster.start(
        [*TINY[app], *ONE_EPOCH.get(app, ["--epochs", "1"]), "--strategy", "multi-worker", "--out", tmp_path / "run",
         "--export-dir", tmp_path / "exports"], tmp_path, ports=[multiworker_cluster.free_port() for _ in range(2)])
    outputs = multiworker_cluster.outputs(workers)
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    assert "2 workers, all-reduce (2 replicas)" in outputs[0]
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]
    assert resolved["replicas"] == 2
    # The lm app sets TensorFlow's threads for its recurrent loops before TensorFlow starts; the others keep its default.
    assert resolved["intra_op_threads"] == (fused_rnn.intra_op_threads() if app == "lm" else 0)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs_run"] == 1
    assert len(list((tmp_path / "exports").glob("*/1/saved_model.pb"))) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exports", "run"]


def test_a_lost_worker_stops_the_other_with_one_line_and_both_resume(tmp_path):
    """SIGKILL one of two workers after the first epoch: the chief stops
    within the coordination service's heartbeat timeout, naming the lost
    task, and both started again with --resume finish the run."""
    ports = [multiworker_cluster.free_port() for _ in range(2)]

    def start(argv):
        return multiworker_cluster.start(argv, tmp_path, ports=ports, stderr=subprocess.PIPE)

    workers = start([*TINY["classify"], "--epochs", "3", "--strategy", "multi-worker", "--out", str(tmp_path / "run"),
                     "--export-dir", str(tmp_path / "exports")])
    try:
        for line in workers[0].stdout:
            if line.startswith("Epoch 1/3"):
                workers[1].kill()
                break
        _, err = workers[0].communicate(timeout=120)
    finally:
        for worker in workers:
            worker.kill()
    assert workers[0].returncode == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "the cluster lost worker 1" in lines[0] and "--resume" in lines[0], err
    assert "Traceback" not in err

    workers = start(["classify", "train", "--resume", str(tmp_path / "run")])
    try:
        outputs = [worker.communicate(timeout=300) for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    assert "resuming from" in outputs[0][0] and "2 workers, all-reduce (2 replicas)" in outputs[0][0]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["epochs_run"] == 3
    assert len(list((tmp_path / "exports").glob("*/1/saved_model.pb"))) == 1  # the chief's, once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exports", "run"]  # worker 1's scratch folder gone
    with open(tmp_path / "run" / "history.csv") as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == ["0", "1", "2"]
