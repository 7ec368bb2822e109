"""The run directory every app writes: config, history, metrics and plots.

`runs/<app>/<timestamp>/` by default, holding `config.json` (enough to repeat
the run), `history.csv`, `metrics.json`, `curves.png` and whatever the app
adds. Every file is written atomically (`atomic.replacing`: a temporary file
beside it, then one rename): a kill leaves the earlier file or none, the next
write removes what a killed one left, and a full disk is one line.
"""

import csv
import dataclasses
import datetime
import json
import pathlib
import re
import tempfile

import numpy as np

from dlsuite.apps.core import atomic
from dlsuite.apps.core.errors import UsageError


def create(out, app):
    """Makes (or reuses) the run directory and checks it is writable.

    What a killed run left half-written (`atomic.clean_tree`) goes first:
    in a reused directory, and in every earlier run beside a new
    `runs/<app>/<timestamp>`, so the next run of the same command leaves no
    temporary behind.

    Args:
        out: the --out value (or the path `run_path` made), or None for
            `runs/<app>/<timestamp>`.
        app: the app's name, e.g. "classify".
    """
    path = run_path(out, app)
    if path.parent == pathlib.Path("runs", app):  # the default layout: the app's earlier runs
        for earlier in sorted(path.parent.glob("*")) if path.parent.is_dir() else ():
            if earlier.is_dir():
                atomic.clean_tree(earlier)
    elif path.is_dir():
        atomic.clean_tree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as error:
        raise UsageError(
            f"cannot write the run directory {str(path)!r} ({error.strerror or error}); "
            "pass --out with a writable folder"
        ) from None
    return path


def run_path(out, app):
    """The run directory --out names, or `runs/<app>/<timestamp>`."""
    if out is None:
        return pathlib.Path("runs", app, datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    return pathlib.Path(out)


def slug(text):
    """`text` as a safe folder-name piece: "tfds:mnist" -> "mnist"."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text.replace("tfds:", "")).strip("_.") or "data"


def _default(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (pathlib.Path,)):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def write_json(path, data):
    """Writes `data` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, default=_default) + "\n"  # a TypeError before any file is touched
    with atomic.replacing(path) as temporary:
        temporary.write_text(text)


def read_json(path):
    return json.loads(pathlib.Path(path).read_text())


def read_history(path):
    """history.csv as {column: [values]} (empty when the file is missing)."""
    path = pathlib.Path(path)
    if not path.exists():
        return {}
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    return {key: [float(row[key]) for row in rows if row.get(key) not in (None, "")] for key in (rows[0] if rows else {})}


def write_history(path, history, *, first_epoch=0):
    """Writes {metric: [per-epoch values]} as history.csv with an epoch column."""
    keys = sorted(history)
    epochs = max((len(v) for v in history.values()), default=0)
    with atomic.replacing(path) as temporary, temporary.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", *keys])
        for index in range(epochs):
            writer.writerow([first_epoch + index] + [history[k][index] if index < len(history[k]) else "" for k in keys])


def plot_curves(history, path, *, title=""):
    """Loss and accuracy, train against validation, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in ("loss", "accuracy") if m in history]
    figure, axes = plt.subplots(1, max(1, len(metrics)), figsize=(5 * max(1, len(metrics)), 3.6), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        epochs = np.arange(1, len(history[metric]) + 1)
        axis.plot(epochs, history[metric], label="train")
        if f"val_{metric}" in history:
            axis.plot(epochs[: len(history[f"val_{metric}"])], history[f"val_{metric}"], label="validation")
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    save_figure(figure, path)


def plot_confusion(matrix, class_names, path, *, title="Confusion matrix (test)"):
    """A labelled confusion matrix: rows are true classes, columns predictions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(matrix)
    size = max(4.0, 0.45 * len(class_names) + 2)
    figure, axis = plt.subplots(figsize=(size + 1, size))
    image = axis.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axis, fraction=0.046)
    ticks = np.arange(len(class_names))
    axis.set_xticks(ticks, labels=class_names, rotation=90 if len(class_names) > 6 else 0)
    axis.set_yticks(ticks, labels=class_names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    if len(class_names) <= 30:
        threshold = matrix.max() / 2 if matrix.size else 0
        for i in range(matrix.shape[0]):
            for j in range(matrix.shape[1]):
                axis.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                          color="white" if matrix[i, j] > threshold else "black")
    axis.set_title(title)
    figure.tight_layout()
    save_figure(figure, path)


def save_figure(figure, path):
    import matplotlib.pyplot as plt

    try:
        with atomic.replacing(path) as temporary:
            figure.savefig(temporary, dpi=110)
    finally:
        plt.close(figure)
