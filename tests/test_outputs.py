"""Outputs written whole or not at all (issue #15, items 4 and 5): a process
SIGKILLed in the middle of an export, a `.keras` save or a run file leaves a
temporary that the next write of the same output removes; a full disk (a
real small tmpfs) is one line naming the path, with the partial file removed
and the earlier version untouched; output folders are checked before any
training."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from dlsuite.apps import cli
from dlsuite.apps.core import atomic, engine, rundir, versions
from dlsuite.apps.core.errors import UsageError


def start_and_kill(script, ready, *args):
    """Runs `script` in a fresh Python, waits until it creates the file
    `ready` (its write is under way), then SIGKILLs it."""
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), str(ready), *map(str, args)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not pathlib.Path(ready).exists():
        if process.poll() is not None:
            raise AssertionError(f"the writer ended early: {process.stderr.read().decode()[-2000:]}")
        assert time.monotonic() < deadline, "the writer never got to its write"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    return process.pid


# A write that gets half way and hangs until it is killed.
HANGING_EXPORT = """
    import pathlib, sys, time
    from dlsuite.apps.core import versions

    ready, model_dir = sys.argv[1:]

    def write(folder):
        (folder / "saved_model.pb").write_bytes(b"half")
        pathlib.Path(ready).touch()
        time.sleep(600)

    versions.write_version_atomically(model_dir, None, write)
"""


def test_a_killed_export_leaves_a_folder_the_next_export_removes(tmp_path, capsys):
    model_dir = tmp_path / "exports" / "digits"
    pid = start_and_kill(HANGING_EXPORT, tmp_path / "ready", model_dir)
    [left] = model_dir.glob(".tmp-*")
    assert f"-{pid}-" in left.name and not (model_dir / "1").exists()
    # Another export running meanwhile (this process, alive) keeps its folder.
    alive = model_dir / f".tmp-7-{atomic.owner_tag()}-0123abcd"
    alive.mkdir()

    target = versions.write_version_atomically(model_dir, None, lambda folder: (folder / "saved_model.pb").write_text("ok"))
    assert target == model_dir / "1" and (target / "saved_model.pb").read_text() == "ok"
    assert sorted(p.name for p in model_dir.iterdir()) == [alive.name, "1"]
    assert "removed 1 temporary file(s) a killed run left" in capsys.readouterr().err


def test_temporaries_from_before_the_owner_tag_go_once_they_are_old(tmp_path):
    model_dir = tmp_path / "digits"
    (model_dir / "1").mkdir(parents=True)
    old, recent = model_dir / ".tmp-2-0123abcd", model_dir / ".tmp-3-4567cdef"
    old.mkdir(), recent.mkdir()
    hour_ago = time.time() - atomic.LEGACY_AGE_S - 60
    os.utime(old, (hour_ago, hour_ago))
    foreign = model_dir / ".tmp-4-otherhost-1-89abcdef"  # another machine's: asked by age only
    foreign.mkdir()
    versions.write_version_atomically(model_dir, None, lambda folder: (folder / "saved_model.pb").write_text("ok"))
    assert sorted(p.name for p in model_dir.iterdir()) == [".tmp-3-4567cdef", foreign.name, "1", "2"]


HANGING_SAVE = """
    import pathlib, sys, time
    import keras
    from dlsuite.apps.core import atomic

    ready, path = sys.argv[1:]

    def save(self, filepath, **kwargs):
        pathlib.Path(filepath).write_bytes(b"PK half a zip")
        pathlib.Path(ready).touch()
        time.sleep(600)

    keras.Model.save = save
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    atomic.save_model(model, path)
"""


def tiny_model(units=2):
    import keras

    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(units)])


def test_a_killed_model_save_leaves_a_temporary_the_next_save_removes(tmp_path):
    import keras

    path = tmp_path / "run" / "model.keras"
    path.parent.mkdir()
    legacy = path.parent / "model.tmp.keras"  # the name before #15, without an owner: goes once old
    legacy.write_bytes(b"left by a version before #15")
    os.utime(legacy, (time.time() - atomic.LEGACY_AGE_S - 60,) * 2)
    pid = start_and_kill(HANGING_SAVE, tmp_path / "ready", path)
    [left] = path.parent.glob(".model.tmp-*.keras")
    assert f"-{pid}-" in left.name and not path.exists()

    model = tiny_model()
    atomic.save_model(model, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.keras"]
    np.testing.assert_array_equal(keras.saving.load_model(path).get_weights()[0], model.get_weights()[0])


HANGING_JSON = """
    import pathlib, sys, time
    from dlsuite.apps.core import rundir

    ready, path = sys.argv[1:]
    write_text = pathlib.Path.write_text

    def slow(self, text, *args, **kwargs):
        write_text(self, text[: len(text) // 2])
        pathlib.Path(ready).touch()
        time.sleep(600)

    pathlib.Path.write_text = slow
    rundir.write_json(path, {"status": "finished", "values": list(range(1000))})
"""


def test_a_killed_json_write_keeps_the_earlier_file_and_the_next_write_cleans(tmp_path):
    path = tmp_path / "metrics.json"
    rundir.write_json(path, {"status": "before"})
    start_and_kill(HANGING_JSON, tmp_path / "ready", path)
    assert len(list(tmp_path.glob(".metrics.tmp-*.json"))) == 1
    assert rundir.read_json(path) == {"status": "before"}
    rundir.write_json(path, {"status": "after"})
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "ready") == ["metrics.json"]
    assert rundir.read_json(path) == {"status": "after"}


def test_a_new_run_removes_what_a_killed_run_left_in_the_earlier_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = tmp_path / "runs" / "classify" / "20250101-000000"
    (killed / "checkpoints").mkdir(parents=True)
    (killed / "history.csv").write_text("epoch,loss\n0,1.0\n")
    left = [killed / f".model.tmp-{atomic.host()}-{dead.pid}-0123abcd.keras",
            killed / "checkpoints" / f".best.tmp-{atomic.host()}-{dead.pid}-4567cdef.keras"]
    for path in left:
        path.write_bytes(b"half")
    mine = killed / f".metrics.tmp-{atomic.owner_tag()}-89abcdef.json"  # a live owner's: stays
    mine.write_text("{")
    run_dir = rundir.create(None, "classify")
    assert run_dir.resolve().parent == killed.parent and run_dir.is_dir()
    assert not any(path.exists() for path in left) and mine.exists() and (killed / "history.csv").exists()


# --- disk full ---------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A real 256 KiB tmpfs (the tests run as root); skipped where mount is not permitted."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode}): "
                    "the disk-full tests need root with CAP_SYS_ADMIN")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_disk_full_writing_a_run_file_is_one_line_and_keeps_the_earlier_file(small_disk):
    path = small_disk / "history.json"
    rundir.write_json(path, {"epochs": 1})
    with pytest.raises(UsageError) as error:
        rundir.write_json(path, {"values": ["x" * 1000] * 1000})  # 1 MB
    assert str(error.value) == (f"cannot write {str(path)!r}: no space left on the device; the partial file was "
                                "removed. Free some space there or write to another disk")
    assert sorted(p.name for p in small_disk.iterdir()) == ["history.json"]
    assert rundir.read_json(path) == {"epochs": 1}


def test_disk_full_saving_a_keras_model_is_one_line_and_keeps_the_earlier_one(small_disk):
    import keras

    path = small_disk / "model.keras"
    small = tiny_model()
    atomic.save_model(small, path)
    before = path.read_bytes()
    with pytest.raises(UsageError, match=r"cannot write '.*model\.keras': no space left on the device; the partial "
                                         r"file was removed"):
        atomic.save_model(tiny_model(units=100_000), path)  # 1.6 MB of weights
    assert sorted(p.name for p in small_disk.iterdir()) == ["model.keras"]
    assert path.read_bytes() == before
    assert keras.saving.load_model(path).count_params() == small.count_params()


def test_disk_full_during_a_real_export_exits_2_in_one_line_and_keeps_version_1(tmp_path, small_disk, capsys):
    export_dir = small_disk / "exports"
    (export_dir / "digits" / "1").mkdir(parents=True)
    (export_dir / "digits" / "1" / "saved_model.pb").write_bytes(b"version 1")
    # LeNet-5's SavedModel (its variables alone are 250 KB) does not fit; training and the run
    # directory are elsewhere.
    status = cli.main(["classify", "train", "--epochs", "1", "--out", str(tmp_path / "run"),
                       "--export-dir", str(export_dir), "--export", "digits"])
    err = capsys.readouterr().err
    assert status == 2
    lines = err.strip().splitlines()
    assert lines[-1] == (f"dlsuite: error: cannot write {str(export_dir / 'digits' / '2')!r}: no space left on the "
                         "device; the partial version was removed. Free some space there or write to another disk")
    assert "Traceback" not in err
    assert sorted(p.name for p in (export_dir / "digits").iterdir()) == ["1"]
    assert (export_dir / "digits" / "1" / "saved_model.pb").read_bytes() == b"version 1"


# --- output folders checked before training ----------------------------------------------------


def test_tune_checks_its_directory_and_export_folder_before_any_trial(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    base = ["tune", "classify", "--image-size", "32", "--epochs", "1", "--max-trials", "1"]
    status = cli.main([*base, "--dir", str(blocker / "search"), "--no-export"])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert f"cannot write the tuning directory under {str(blocker / 'search')!r}: {str(blocker)!r} is not a folder" in err
    status = cli.main([*base, "--dir", str(tmp_path / "search"), "--export-dir", str(blocker / "exports")])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and "cannot write exports under" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing created


def test_writability_check_creates_nothing(tmp_path):
    atomic.check_writable(tmp_path / "a" / "b", what="the run directory")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UsageError, match="is not a folder"):
        (tmp_path / "f").write_text("")
        atomic.check_writable(tmp_path / "f" / "x", what="the run directory")


def test_out_of_space_is_recognized_through_tensorflows_wrapping():
    import tensorflow as tf

    wrapped = tf.errors.ResourceExhaustedError(None, None, "/x/variables/part-0.tempstate1; No space left on device")
    assert atomic.out_of_space(wrapped)
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as error:
            raise RuntimeError("while saving") from error
    except RuntimeError as chained:
        assert atomic.out_of_space(chained)
    assert not atomic.out_of_space(OSError(13, "Permission denied"))
    assert "the disk quota is exceeded" in str(atomic.no_space_error("p", OSError(122, "Disk quota exceeded")))
