"""Checkpoints survive their own faults (#15 item 3): a truncated, scrambled
or deleted newest checkpoint is named and the one before it is used; when
none loads, or the checkpoints of a run that trained are gone, the resume is
refused with one line, never continued from fresh weights."""

import json
import shutil

import keras
import numpy as np
import pytest

from dlsuite.apps import cli
from dlsuite.apps.core import checkpoints
from dlsuite.apps.core.errors import UsageError
from test_lifecycle import TINY


def variables(value):
    return [keras.Variable(np.full((3, 2), value, "float32")), keras.Variable(np.float32(value))]


def store_with_two(tmp_path):
    store = checkpoints.Store(tmp_path / "resume")
    store.write(variables(1.0), epoch=1, batch=0, history={"loss": [0.5]})
    store.write(variables(2.0), epoch=1, batch=3, history={"loss": [0.5]})
    store.wait()
    return store


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def scramble(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def delete(path):
    path.unlink()


def test_two_are_kept_and_the_newest_is_read_back(tmp_path):
    store = store_with_two(tmp_path)
    store.write(variables(3.0), epoch=2, batch=0, history={"loss": [0.5, 0.4]})
    store.wait()
    assert [p.name for p in store.paths()] == ["ckpt-00000003.npz", "ckpt-00000002.npz"]
    saved = store.latest()
    assert (saved.epoch, saved.batch, saved.history) == (2, 0, {"loss": [0.5, 0.4]})
    target = variables(0.0)
    checkpoints.restore(target, saved)
    assert [float(np.max(v.numpy())) for v in target] == [3.0, 3.0]
    assert not list(store.folder.glob(".*tmp*"))


@pytest.mark.parametrize("damage", [truncate, scramble, delete])
def test_a_bad_newest_checkpoint_is_named_and_the_one_before_used(damage, tmp_path, capsys):
    store = store_with_two(tmp_path)
    newest = store.paths()[0]
    damage(newest)
    saved = store.latest()
    assert saved.path.name == "ckpt-00000001.npz" and saved.batch == 0
    err = capsys.readouterr().err
    assert f"checkpoint {newest}" in err and "resuming from the one before it" in err
    if damage is delete:
        assert "the file is missing" in err


def test_no_loadable_checkpoint_is_refused_naming_each(tmp_path):
    store = store_with_two(tmp_path)
    for path in store.paths():
        truncate(path)
    with pytest.raises(UsageError, match="no checkpoint of this run loads: .*ckpt-00000002.*ckpt-00000001") as error:
        store.latest()
    assert "start a new run" in str(error.value)


def test_another_models_checkpoint_is_refused(tmp_path):
    saved = store_with_two(tmp_path).latest()
    with pytest.raises(UsageError, match="holds the variables of another model"):
        checkpoints.restore([keras.Variable(np.zeros((4, 2), "float32"))], saved)


def run(capsys, *argv):
    status = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_a_run_whose_checkpoints_are_gone_is_refused_or_started_over(tmp_path, capsys, interrupt_at_epoch_end):
    run_dir = tmp_path / "run"
    interrupt_at_epoch_end(2)
    status, _, _ = run(capsys, *TINY["classify"], "--epochs", "3", "--out", run_dir, "--no-export")
    assert status == 130
    resume = run_dir / "checkpoints" / "resume"
    shutil.rmtree(resume)  # two epochs trained, their checkpoints deleted
    status, out, err = run(capsys, "classify", "train", "--resume", run_dir)
    assert status == 2 and "Epoch" not in out  # refused before any training
    assert err.strip().splitlines() == [err.strip()] and "2 epochs were trained but their checkpoints" in err
    assert not (run_dir / "metrics.json").exists()

    # One epoch's row and no checkpoint: the kill came between the two writes; the run starts over.
    history = (run_dir / "history.csv").read_text().splitlines()
    (run_dir / "history.csv").write_text("\n".join(history[:2]) + "\n")
    status, out, err = run(capsys, "classify", "train", "--resume", run_dir)
    assert status == 0, err
    assert "no checkpoint was written before the run stopped; it starts over" in out
    assert json.loads((run_dir / "metrics.json").read_text())["epochs_run"] == 3
