"""Kill -9 anywhere and resume exactly (#15), for every app that trains.

Each app's tiny run is killed with SIGKILL (`kill_worker.py`, in a process of
its own forked from `zygote`) mid-epoch,
then its resume is killed inside a checkpoint's write (half a file on
disk); a last `--resume` finishes it. The run must end with the weights and
the history of the same run never interrupted: equal, not close, because on
CPU with a fixed seed every batch, random number and running mean is the
same (`checkpoints`, `epochs`). Nothing temporary may be left.
"""

import csv
import json
import os
import pathlib
import sys

import keras
import numpy as np
import pytest

import zygote
from dlsuite.apps import cli
from test_lifecycle import TINY

WORKER = pathlib.Path(__file__).with_name("kill_worker.py")
EPOCHS = {"transfer": ["--freeze-epochs", "2", "--finetune-epochs", "2"]}
# (point, count) of the two kills: the first mid-epoch (for transfer in its
# first phase), the second inside a checkpoint write (transfer: its second phase).
KILLS = {"classify": [("batch", 5), ("checkpoint", 3)], "lm": [("batch", 13), ("checkpoint", 4)],
         "transfer": [("batch", 4), ("checkpoint", 5)], "caption": [("batch", 4), ("checkpoint", 3)]}
EVERY_BATCH = ["--checkpoint-every", "0.000001"]


def argv(app, run_dir, exports):
    return [*TINY[app], *EPOCHS.get(app, ["--epochs", "3"]), *EVERY_BATCH, "--out", str(run_dir),
            "--export-dir", str(exports)]


def killed(point, count, arguments, cwd):
    done = zygote.run([sys.executable, str(WORKER), point, str(count), *arguments], cwd=cwd,
                      capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, f"not killed at {point} {count}: {done.returncode}\n{done.stderr[-2000:]}"
    return done


def weights(path):
    return keras.saving.load_model(path, compile=False).get_weights()


def history(run_dir):
    with open(run_dir / "history.csv") as handle:
        return list(csv.DictReader(handle))


def leftovers(*folders):
    return sorted(str(p) for folder in folders for p in pathlib.Path(folder).rglob("*")
                  if ".tmp" in p.name or p.name == "resume")


@pytest.mark.parametrize("app", sorted(KILLS))
def test_a_run_killed_twice_ends_as_if_never_killed(app, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # The run never killed is the reference for weights and history only: its export is not compared.
    assert cli.main([*argv(app, tmp_path / "whole", tmp_path / "whole-exports"), "--no-export"]) == 0

    run_dir, exports = tmp_path / "run", tmp_path / "exports"
    (first, first_count), (second, second_count) = KILLS[app]
    killed(first, first_count, argv(app, run_dir, exports), tmp_path)
    killed(second, second_count, [app, TINY[app][1], "--resume", str(run_dir)], tmp_path)
    assert list((run_dir / ("freeze" if app == "transfer" else "") / "checkpoints" / "resume").glob(".*.tmp-*")) \
        or app == "transfer", "the second kill left no half-written checkpoint to step over"
    capsys.readouterr()
    assert cli.main([app, TINY[app][1], "--resume", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out

    for ours, whole in zip(weights(run_dir / "model.keras"), weights(tmp_path / "whole" / "model.keras")):
        np.testing.assert_array_equal(ours, whole)
    assert history(run_dir) == history(tmp_path / "whole")  # every epoch once, the same numbers
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["epochs_run"] == len(history(run_dir))
    assert leftovers(run_dir, exports) == []
    assert [p.name for p in pathlib.Path(metrics["export"]).parent.iterdir()] == ["1"]


def test_a_run_killed_while_it_saves_then_while_it_exports_resumes_into_those_steps(tmp_path, capsys):
    run_dir, exports = tmp_path / "run", tmp_path / "exports"
    killed("model", 1, argv("classify", run_dir, exports), tmp_path)  # model.keras half written
    assert not (run_dir / "metrics.json").exists()
    killed("export", 1, ["classify", "train", "--resume", str(run_dir)], tmp_path)  # the SavedModel not renamed
    assert not (run_dir / "metrics.json").exists() and list(exports.glob("*/.tmp-*"))
    capsys.readouterr()
    assert cli.main(["classify", "train", "--resume", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "resuming from" not in out and "finished before" in out  # nothing trained again
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["epochs_run"] == 3
    keras.saving.load_model(run_dir / "model.keras")
    assert [p.name for p in pathlib.Path(metrics["export"]).parent.iterdir()] == ["1"]
    assert leftovers(run_dir, exports) == []
