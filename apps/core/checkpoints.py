"""Checkpoints to resume from exactly: written during every epoch and at its
end, each beside the last, switched into place atomically, two kept.

A checkpoint is one `.npz` file: every variable of the model (weights and
its random generators' states), of the optimizer (slots, iterations, the
learning rate) and of the compiled metrics (the epoch's running means), and
a record of where training stood (`epoch`, and `batch`, the batches of that
epoch already trained). With `epochs.EpochOrder` the batches after that
position are known, so a resumed run goes on with the same updates as if it
had never stopped. Keras's `BackupAndRestore` writes its files in place
(a kill mid-write left a truncated backup), saves no generator or metric
state and restarts an epoch from its first batch (../shared/notes/resume.md).

`.npz` is a zip file with a CRC-32 per array, so a truncated or scrambled
checkpoint is found when it is read, and the one before it is used.
"""

import concurrent.futures
import contextlib
import dataclasses
import json
import os
import pathlib
import re
import sys
import time
import zipfile

import keras
import numpy as np

from dlsuite.apps.core import atomic
from dlsuite.apps.core.errors import UsageError
from dlsuite.models import compat

FORMAT = 1
KEEP = 2  # the newest and the one before it, for a newest that does not load
FINISHED = "finished.json"  # training of this phase ended (all epochs, early stopping)
LATEST = "latest.json"  # names the newest checkpoint written: a missing one is told, not skipped
_NAME = re.compile(r"^ckpt-(\d{8})\.npz$")


@dataclasses.dataclass
class Saved:
    """A checkpoint read back: where training stood and the variables' values."""

    path: pathlib.Path
    epoch: int  # the epoch to go on with
    batch: int  # batches of that epoch already trained
    values: list  # numpy arrays, in the order of `state_variables`
    variables: list  # [path, shape] of each, to check they fit the model
    history: dict  # the epoch logs up to `epoch`: history.csv is rewritten from them


def state_variables(model):
    """Every variable a resumed run needs, in a fixed order: the model's
    (with random-generator states), the optimizer's, the compiled metrics'."""
    optimizer = getattr(model, "optimizer", None)
    return [*model.variables, *(optimizer.variables if optimizer is not None else []), *model.metrics_variables]


class Store:
    """The checkpoints of one training phase, in `folder`."""

    def __init__(self, folder):
        self.folder = pathlib.Path(folder)
        self._writer = None  # the background thread that writes checkpoints
        self._pending = None  # the write in flight

    def paths(self):
        """The checkpoint files, newest first."""
        if not self.folder.is_dir():
            return []
        named = [(int(m.group(1)), self.folder / m.group(0)) for m in map(_NAME.match, os.listdir(self.folder)) if m]
        return [path for _, path in sorted(named, reverse=True)]

    def has_any(self):
        return bool(self.paths())

    def was_written(self):
        """True once a checkpoint was written here, even if the files are gone."""
        return (self.folder / LATEST).exists()

    def _newest_name(self):
        try:
            return json.loads((self.folder / LATEST).read_text())["newest"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @property
    def finished(self):
        return (self.folder / FINISHED).exists()

    def write(self, variables, *, epoch, batch, history):
        """Checkpoints `variables` at (epoch, batch) with the epochs' logs so
        far: their values are copied now, and the file is written, synced,
        renamed into place and noted in latest.json on a background thread
        while training goes on (a ResNet-18 checkpoint took 3.9 s to sync on
        this machine's disk, 6.5% of a minute); then all but the newest KEEP
        go. Returns the checkpoint's path.

        Raises:
            UsageError: the write before this one ran out of disk space.
        """
        self.wait()  # one write at a time, and its error surfaces here
        self.folder.mkdir(parents=True, exist_ok=True)
        paths = self.paths()
        number = int(_NAME.match(paths[0].name).group(1)) + 1 if paths else 1
        path = self.folder / f"ckpt-{number:08d}.npz"
        record = {"format": FORMAT, "epoch": int(epoch), "batch": int(batch), "time": time.time(),
                  "variables": [[v.path, list(v.shape)] for v in variables],
                  "history": {key: list(values) for key, values in history.items()}}
        arrays = {f"v{index}": _value(v) for index, v in enumerate(variables)}
        if self._writer is None:
            self._writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending = self._writer.submit(self._write_file, path, record, arrays)
        return path

    def _write_file(self, path, record, arrays):
        _write_atomically(path, lambda file: np.savez(file, record=np.array(json.dumps(record)), **arrays))
        _write_atomically(self.folder / LATEST, lambda file: file.write(json.dumps({"newest": path.name}).encode()))
        for old in self.paths()[KEEP:]:
            old.unlink(missing_ok=True)

    def wait(self):
        """Waits for the checkpoint being written; raises its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def mark_finished(self, epochs):
        self.wait()
        _write_atomically(self.folder / FINISHED, lambda file: file.write(json.dumps({"epochs": epochs}).encode()))

    def latest(self):
        """The newest checkpoint that reads back whole; a bad one is named on
        stderr and the one before it is used. None when there is none.

        Raises:
            UsageError: there are checkpoints but none reads back.
        """
        problems = []
        newest = self._newest_name()
        if newest and not (self.folder / newest).exists():
            problems.append(f"{self.folder / newest} (the file is missing)")
        for path in self.paths():
            try:
                saved = _read(path)
            except _Unreadable as problem:
                problems.append(f"{path} ({problem})")
                continue
            if problems:
                print(f"dlsuite: checkpoint {problems[-1]} does not load; resuming from the one before it, {path}",
                      file=sys.stderr, flush=True)
            return saved
        if problems:
            raise UsageError(f"resume: no checkpoint of this run loads: {'; '.join(problems)}; the run cannot go on "
                             "exactly: start a new run", option="resume")
        return None

    def clear(self):
        """Removes the checkpoints (the run finished: nothing to resume)."""
        self.wait()
        for path in self.paths():
            path.unlink(missing_ok=True)
        for name in (FINISHED, LATEST):
            (self.folder / name).unlink(missing_ok=True)
        atomic.clean_abandoned(self.folder, ".*.tmp-*")
        with contextlib.suppress(OSError):
            self.folder.rmdir()


def _value(variable):
    """A copy of `variable`'s value; a mirrored one's (tf.distribute) from its first copy."""
    value = variable.value
    return np.array(value.numpy() if hasattr(value, "numpy") else keras.ops.convert_to_numpy(value))


def restore(variables, saved):
    """Assigns a checkpoint's values to `variables`.

    Raises:
        UsageError: the checkpoint holds another model's variables.
    """
    # Shapes, in order: names carry Keras's per-process counters (dense_3).
    if [shape for _, shape in saved.variables] != [list(v.shape) for v in variables]:
        raise UsageError(f"resume: {saved.path} holds the variables of another model than this run's config builds "
                         "(was config.json edited?); start a new run", option="resume")
    for variable, value in zip(variables, saved.values):
        variable.assign(value)


class _Unreadable(Exception):
    pass


def _read(path):
    """A `Saved` from `path`, every array read (which checks its CRC-32)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            record = json.loads(str(archive["record"]))
            values = [archive[f"v{index}"] for index in range(len(record["variables"]))]
    except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as error:
        raise _Unreadable(f"{type(error).__name__}: {error}") from None
    if record.get("format") != FORMAT:
        raise _Unreadable(f"format {record.get('format')!r}, not {FORMAT}")
    variables = [[name, list(shape)] for name, shape in record["variables"]]
    return Saved(pathlib.Path(path), int(record["epoch"]), int(record["batch"]), values, variables,
                 record.get("history", {}))


def _write_atomically(path, write):
    """Writes `path` through `write(file)`, synced to disk before it is
    renamed into place (`atomic.replacing`: a full disk is one line)."""
    with atomic.replacing(path) as temporary, open(temporary, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())


class ResumeCheckpoint(keras.callbacks.Callback):
    """Writes a checkpoint every `every` seconds during an epoch and at each
    epoch's end; restores `saved` when training begins.

    Put it last among the callbacks: its epoch-end checkpoint must follow the
    history row and the best checkpoint of that epoch.

    Args:
        store: the phase's `Store`.
        every: seconds between checkpoints inside an epoch; 0 or None: only
            at epoch ends (a dataset without `epochs.EpochOrder` cannot go on
            mid-epoch).
        saved: a `Saved` to continue from, or None.
        batch_offset: batches of the first epoch trained before this fit.
        element_spec: the training batches' (x, y) spec, to create the
            optimizer's and metrics' variables before restoring them.
        history: the epochs' logs before this fit; `history` grows with
            each epoch and goes into every checkpoint.
    """

    def __init__(self, store, *, every, saved=None, batch_offset=0, element_spec=None, history=None):
        super().__init__()
        self.history = {key: list(values) for key, values in (history or {}).items()}
        self.store = store
        self.element_spec = element_spec
        self.every = every
        self.saved = saved
        self.batch_offset = batch_offset
        self._epoch = None
        self._offset = 0
        self._last = time.monotonic()

    def on_train_begin(self, logs=None):
        if self.saved is not None:
            compat.build_training_state(self.model, self.element_spec)
            restore(state_variables(self.model), self.saved)

    def on_epoch_begin(self, epoch, logs=None):
        first = self._epoch is None
        self._epoch, self._offset = epoch, (self.batch_offset if first else 0)
        if first and self.saved is not None and self.saved.batch:
            # fit reset the metrics before this epoch: give back the running means of its first batches
            restore(state_variables(self.model), self.saved)
        self._last = time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        steps = (self.params or {}).get("steps")
        if steps and batch + 1 >= steps:
            return  # the epoch's end writes one next, after its validation: a resume always has a batch to go on with
        if self.every and time.monotonic() - self._last >= self.every:
            self.store.write(state_variables(self.model), epoch=self._epoch, batch=self._offset + batch + 1,
                             history=self.history)
            self._last = time.monotonic()

    def on_train_end(self, logs=None):
        self.store.wait()  # the last checkpoint on disk before fit returns

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        self.store.write(state_variables(self.model), epoch=epoch + 1, batch=0, history=self.history)
        self._last = time.monotonic()


class HistoryReplay(keras.callbacks.Callback):
    """Gives callbacks that keep state across epochs (early stopping, the
    plateau schedule) the epochs trained before a resume, as if they had
    watched them: their `on_train_begin` forgets them.

    Put it right after them; the learning rate they would set again is kept.
    """

    def __init__(self, targets, history):
        super().__init__()
        self.targets = list(targets)
        self.history = history

    def on_train_begin(self, logs=None):
        rows = len(self.history.get("loss", []))
        if not rows or not self.targets:
            return
        optimizer = self.model.optimizer
        # the plateau schedule lowers the rate as it replays; the rate now is already the result
        plateau = any(isinstance(target, keras.callbacks.ReduceLROnPlateau) for target in self.targets)
        rate = float(keras.ops.convert_to_numpy(optimizer.learning_rate)) if plateau else None
        stop = self.model.stop_training
        for epoch in range(rows):
            logs = {key: values[epoch] for key, values in self.history.items() if epoch < len(values)}
            for target in self.targets:
                target.on_epoch_end(epoch, logs)
        if rate is not None:
            optimizer.learning_rate = rate
        self.model.stop_training = stop
