"""The results of a `dlsuite tune` search: the table of trials printed at the
end, and the files written beside the trials in the tuning directory:

    trials.csv                 one row a trial: hyperparameters, objective, epochs, time
    best_hyperparameters.json  the best trial's values
    objective.png              the objective against each searched hyperparameter

It reads no keras-tuner object: `driver` turns the trial records into
`TrialRow`s, and finishes the best trial this picks.
"""

import csv
import dataclasses
import json
import math
import os
import sys


def value_text(value):
    """A hyperparameter's value as the table and the trial lines show it."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@dataclasses.dataclass
class TrialRow:
    """One trial as the report shows it: its status, values, score and who ran it."""

    trial_id: str
    status: str
    values: dict
    score: float | None
    epochs: int | None
    best_epoch: int | None
    seconds: float | None
    worker: str | None
    error: str | None


def _table(rows, columns, objective, best_id):
    header = ["trial", "status", *columns, objective, "best/epochs", "seconds", "worker"]
    lines = []
    for row in rows:
        mark = "*" if row.trial_id == best_id else " "
        lines.append([
            f"{row.trial_id}{mark}", row.status.lower(), *(value_text(row.values.get(name, "-")) for name in columns),
            f"{row.score:.4f}" if row.score is not None else "-",
            f"{row.best_epoch}/{row.epochs}" if row.epochs is not None else "-",
            f"{row.seconds:.1f}" if row.seconds is not None else "-", row.worker or "-",
        ])
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
    text = ["  ".join(str(cell).ljust(width) for cell, width in zip(header, widths))]
    text += ["  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)) for line in lines]
    for row in rows:
        if row.error:
            text.append(f"trial {row.trial_id} error: {row.error}")
    return "\n".join(text)


def _write_csv(path, rows, columns, objective):
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["trial", "status", *columns, objective, "epochs", "best_epoch", "seconds", "worker", "error"])
        for row in rows:
            writer.writerow([row.trial_id, row.status, *(row.values.get(name, "") for name in columns),
                             "" if row.score is None else row.score, row.epochs or "", row.best_epoch or "",
                             "" if row.seconds is None else round(row.seconds, 2), row.worker or "", row.error or ""])
    os.replace(temporary, path)


def _plot(path, rows, space, objective, best_id):
    """The objective against each searched hyperparameter, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [row for row in rows if row.score is not None]
    names = [name for name in space.searched() if name in space.entries] or ["trial"]
    columns = min(3, len(names))
    lines = math.ceil(len(names) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.4 * lines), squeeze=False)
    for axis, name in zip(axes.flat, names):
        spec = space.entries.get(name, {})
        if name == "trial":
            xs = [int(row.trial_id) for row in done]
        else:
            xs = [row.values.get(name) for row in done]
        categorical = "choice" in spec and not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec["choice"])
        if categorical:
            labels = [str(v) for v in spec["choice"]]
            xs = [labels.index(str(x)) if str(x) in labels else -1 for x in xs]
            axis.set_xticks(range(len(labels)), labels=labels, rotation=30 if len(labels) > 3 else 0)
        else:
            if spec.get("sampling") in ("log", "reverse_log") or (
                    "choice" in spec and min(spec["choice"]) > 0 and max(spec["choice"]) / min(spec["choice"]) >= 8):
                axis.set_xscale("log")
            if "choice" in spec:  # the values themselves as ticks: 16, 32, 64, 128
                axis.set_xticks(spec["choice"], labels=[value_text(v) for v in spec["choice"]])
                axis.minorticks_off()
        ys = [row.score for row in done]
        axis.scatter(xs, ys, color="tab:blue", alpha=0.8)
        best = [(x, row.score) for x, row in zip(xs, done) if row.trial_id == best_id]
        if best:
            axis.scatter(*zip(*best), color="tab:red", marker="*", s=180, label="best", zorder=3)
            axis.legend(loc="best", fontsize=8)
        axis.set_xlabel(name)
        axis.set_ylabel(objective)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(names):]:
        axis.set_visible(False)
    figure.suptitle(f"{objective} of {len(done)} trials against the searched hyperparameters")
    figure.tight_layout()
    temporary = path.with_name(f".{path.stem}.tmp{path.suffix}")
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    os.replace(temporary, path)


def summarize(rows, space, *, directory, objective, direction, stopped):
    """Prints the table of trials and writes the report files; returns the
    best trial's row for the search to finish, or None when there is nothing
    to finish (the search was stopped, or no trial completed: said on stderr)."""
    completed = [row for row in rows if row.score is not None]
    pick = max if direction == "max" else min
    best = pick(completed, key=lambda row: row.score) if completed else None
    best_id = best.trial_id if best else None
    columns = space.searched()
    print()
    print(_table(rows, columns, objective, best_id))
    _write_csv(directory / "trials.csv", rows, columns, objective)
    if completed:
        _plot(directory / "objective.png", rows, space, objective, best_id)
    if best is not None:
        values = {name: best.values[name] for name in space.entries if name in best.values}
        if "tuner/epochs" in best.values:
            values["epochs"] = best.values["tuner/epochs"]
        _write_json(directory / "best_hyperparameters.json", {
            "trial": best_id, "objective": {"name": objective, "direction": direction, "value": best.score},
            "hyperparameters": values,
        })
        print(f"\nbest: trial {best_id}, {objective} {best.score:.4f}: {json.dumps(values)}")
    failed = sum(1 for row in rows if row.status == "FAILED")
    written = "trials.csv, best_hyperparameters.json, objective.png" if completed else "trials.csv"
    print(f"{len(rows)} trial{'s' if len(rows) != 1 else ''} ({len(completed)} completed, {failed} failed); "
          f"{written} in {directory}", flush=True)
    if stopped:
        errors = [row.error for row in rows if row.error]
        print(f"dlsuite: search stopped: {stopped}; the last error: {errors[-1] if errors else 'see above'}. Fix the space "
              "or raise --max-failures, then run the same command to resume", file=sys.stderr)
        return None
    if best is None:
        print("dlsuite: no trial finished, so there is no best model; see the errors above", file=sys.stderr)
    return best


def _write_json(path, data):
    from dlsuite.apps.core import rundir  # numpy: kept out of `dlsuite --help`

    rundir.write_json(path, data)
