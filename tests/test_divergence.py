"""Divergence is a failure (issue #15, item 6): the guard on synthetic logs
(measured shapes of healthy and diverging runs), a real training that
diverges (exit 1, metrics.json stopped with the reason, no export), the curve
doctor naming it, and a tuner trial recorded as failed."""

import csv
import json
import math
import types

import pytest

from dlsuite.apps import cli
from dlsuite.apps.diagnose import curve_doctor
from dlsuite.callbacks import NaNGuard, nan_guard

# Running epoch losses as Keras logs them after each batch (the mean so far),
# measured on `classify train` (LeNet-5, digits, batch 32): the defaults, and
# --optimizer sgd --lr 1e6.
HEALTHY_EPOCHS = [
    [2.587, 2.033, 1.796, 1.588, 1.434, 1.318, 1.246, 1.182, 1.118, 1.057, 0.537],
    [0.18, 0.211, 0.191, 0.211, 0.221, 0.228, 0.223, 0.219, 0.215, 0.21, 0.195],
]
DIVERGING_EPOCH = [2.587, 4.36e5, 2.68e6, 4.29e6, 5.49e6, 5.78e6, 6.68e6]


def feed(guard, epochs):
    """Runs `guard` over {epoch: running losses}; returns (epoch, batch) where it stopped, or None."""
    guard.set_model(types.SimpleNamespace(stop_training=False))
    for epoch, losses in enumerate(epochs):
        guard.on_epoch_begin(epoch)
        for batch, loss in enumerate(losses):
            guard.on_train_batch_end(batch, {"loss": loss})
            if guard.model.stop_training:
                return epoch, batch
        guard.on_epoch_end(epoch, {"loss": losses[-1]})
        if guard.model.stop_training:
            return epoch, None
    return None


def test_healthy_runs_never_stop():
    guard = NaNGuard()
    assert feed(guard, HEALTHY_EPOCHS) is None and guard.message is None
    # A noisy start: a lucky first batch far below the epoch's mean.
    assert feed(NaNGuard(), [[0.3, 2.0, 2.4, 2.5, 2.6, 2.6, 2.5]]) is None


def test_an_exploding_loss_stops_at_the_fifth_batch_with_the_seeds_advice():
    guard = NaNGuard()
    assert feed(guard, [DIVERGING_EPOCH]) == (0, 4)
    assert guard.message.startswith("the loss diverged at epoch 1, batch 5: it reached 5.49e+06, "
                                    "2,122,149 times the first batch's 2.587")
    assert "the learning rate is probably too high" in guard.message and "--lr" in guard.message
    assert nan_guard.stop_cause(guard.message) == "divergence"


def test_short_epochs_are_checked_at_their_end():
    guard = NaNGuard()
    assert feed(guard, [[2.3, 1e4]]) == (0, None)
    assert guard.message.startswith("the loss diverged at epoch 1: it reached 1e+04")


def test_a_resumed_fit_from_a_trained_model_uses_the_floor():
    # First batch 0.001 (a trained model), then ordinary running losses of
    # 0.1: 100 times the first batch, but far below 10 x LOSS_FLOOR.
    guard = NaNGuard()
    assert feed(guard, [[0.001, 0.05, 0.08, 0.1, 0.1, 0.1, 0.1]]) is None
    # The caller may pass the untrained loss it knows (a resumed run's history).
    guard = NaNGuard(reference=2.3)
    assert feed(guard, [[0.001, 30.0, 30.0, 30.0, 30.0]]) == (0, 4)


def test_a_loss_growing_for_several_epochs_stops():
    epochs = [[2.3, 1.0], [0.6, 0.5], [0.7, 0.8], [1.0, 1.2], [1.5, 1.9], [2.0, 2.0]]
    guard = NaNGuard()
    assert feed(guard, epochs) == (4, None)
    assert guard.message.startswith("the loss diverged at epoch 5: the epoch loss rose 3 epochs in a row, "
                                    "0.5 -> 0.8 -> 1.2 -> 1.9 (3.8x)")
    # Rises that stay small, or a tiny loss creeping up near a perfect fit, go on.
    assert nan_guard.growth([0.5, 0.55, 0.6, 0.65], 2.3) is None
    assert nan_guard.growth([0.002, 0.003, 0.004, 0.005], 2.3) is None
    assert nan_guard.growth([1.0, 1.2, 1.1, 2.5], 2.3) is None  # not every epoch rose


def test_nan_still_stops_at_once():
    guard = NaNGuard()
    assert feed(guard, [[2.3, math.nan]]) == (0, 1)
    assert guard.message.startswith("the loss became nan at epoch 1, batch 2")
    assert nan_guard.stop_cause(guard.message) == "nan"


def test_curve_doctor_names_an_old_diverged_history_from_its_config():
    # The run: 30 epochs of sgd at lr 1e6 on 10 classes, which the
    # doctor called underfitting.
    history = {"loss": [1.04e7, 9.19e6, 8.54e6, 9.58e6, 8.15e6, 6.2e6, 5.9e6],
               "accuracy": [0.17, 0.26, 0.27, 0.25, 0.28, 0.3, 0.31]}
    findings = curve_doctor.diagnose(history, untrained_loss=math.log(10))
    assert findings[0].name == "divergence" and "underfitting" not in [f.name for f in findings]
    assert findings[0].evidence == "loss 5.9e+06 at epoch 7, 2,562,337 times an untrained model's (2.303)"
    assert "decrease the rate until convergence" in findings[0].remedies[0]
    growing = {"loss": [2.0, 0.5, 0.7, 1.0, 1.6, 1.7]}
    [finding] = curve_doctor.diagnose(growing)
    assert finding.name == "divergence" and finding.evidence.endswith("(3.2x), by epoch 5")


@pytest.fixture(scope="module")
def diverged(tmp_path_factory):
    """A real run at --lr 1e6: stopped in its first epoch."""
    root = tmp_path_factory.mktemp("diverged")
    status = cli.main(["classify", "train", "--optimizer", "sgd", "--lr", "1e6", "--epochs", "3",
                       "--out", str(root / "run"), "--export-dir", str(root / "exports")])
    return root, status


def test_a_diverging_training_exits_1_with_the_reason_and_exports_nothing(diverged):
    root, status = diverged
    assert status == 1
    metrics = json.loads((root / "run" / "metrics.json").read_text())
    assert metrics["status"] == "stopped" and metrics["cause"] == "divergence"
    assert metrics["reason"].startswith("the loss diverged at epoch 1, batch 5: it reached ")
    assert "learning rate is probably too high" in metrics["reason"]
    assert not (root / "exports").exists()
    assert not (root / "run" / "model.keras").exists()
    with open(root / "run" / "history.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 1  # stopped in its first epoch


def test_the_curve_doctor_names_the_stopped_run_divergence(diverged, capsys):
    root, _ = diverged
    capsys.readouterr()
    assert cli.main(["diagnose", "run", str(root / "run"), "--json", "--out", str(root / "doctor")]) == 0
    findings = json.loads(capsys.readouterr().out)["findings"]
    assert [f["name"] for f in findings][0] == "divergence"
    assert "underfitting" not in [f["name"] for f in findings]
    assert findings[0]["evidence"].startswith("training stopped: the loss diverged at epoch 1, batch 5")


def test_a_diverging_tuner_trial_is_recorded_as_failed(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    # lr 10, the most a space allows: the running loss passes 14 times the
    # first batch's by the fifth batch.
    space.write_text("model: lenet5\nbatch_size: 32\noptimizer: sgd\nlr: 10\nlr_schedule: constant\ndropout: 0.0\n"
                     "l2: 0.0\nbatch_norm: true\n")
    status = cli.main(["tune", "classify", "--space", str(space), "--image-size", "32", "--epochs", "2",
                       "--dir", str(tmp_path / "search"), "--max-trials", "1", "--max-failures", "1", "--no-export"])
    err = capsys.readouterr().err
    assert status == 1 and "search stopped" in err
    with open(tmp_path / "search" / "trials.csv") as handle:
        [row] = list(csv.DictReader(handle))
    assert row["status"] == "FAILED" and "the loss diverged at epoch 1" in row["error"]
    assert "this trial's lr is 10" in row["error"]
