"""The default `dlsuite lm train` recipe against wall time: validation loss
after each epoch, and the whole command's time.

    python -m benchmarks.lm_default_run                            # the standard library's docstrings
    python -m benchmarks.lm_default_run --text book.txt --epochs 11
    python -m benchmarks.lm_default_run --runs runs/lm/A runs/lm/B --plot curves.png   # curves of finished runs

Each run is the plain command (`dlsuite lm train [--text FILE] [--epochs N]`,
nothing else but `--out` and `--no-export`) in a fresh process, timed from
its start to its exit; the per-epoch times are the ones its `train.log`
records. It takes as long as the run (about 12 minutes for the default on 2
CPU cores), so it is not one of `python -m benchmarks`' modules.
"""

import argparse
import json
import pathlib
import re
import subprocess
import sys
import time

EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+) .*?val_loss (\S+) time (\S+)s$")


def curve(run_dir):
    """[(epoch, training seconds so far, val_loss)] from a run's train.log."""
    points, elapsed = [], 0.0
    for line in (pathlib.Path(run_dir) / "train.log").read_text().splitlines():
        match = EPOCH_LINE.match(line)
        if match:
            elapsed += float(match.group(4))
            points.append((int(match.group(1)), elapsed, float(match.group(3))))
    return points


def run(text, epochs, out):
    command = [sys.executable, "-m", "dlsuite.apps.cli", "lm", "train", "--out", str(out), "--no-export"]
    command += ["--text", text] if text else []
    command += ["--epochs", str(epochs)] if epochs else []
    started = time.monotonic()
    subprocess.run(command, check=True)
    return command, time.monotonic() - started


def plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for label, points in runs:
        axis.plot([0] + [seconds / 60 for _, seconds, _ in points], [None] + [loss for *_, loss in points],
                  marker="o", label=label)
    for bar in (1.60, 1.45):
        axis.axhline(bar, color="gray", linestyle=":", linewidth=1)
    axis.set_xlabel("training minutes (2 CPU cores)")
    axis.set_ylabel("validation loss, nats per character")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lm_default_run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", help="a UTF-8 text (default: the standard library's docstrings)")
    parser.add_argument("--epochs", type=int, help="the recipe at another length (default: lm train's)")
    parser.add_argument("--out", default="runs/lm_default_run", help="where the run directory goes")
    parser.add_argument("--runs", nargs="+", metavar="RUN_DIR", help="report finished runs instead of training")
    parser.add_argument("--plot", metavar="PNG", help="draw the curves into this file")
    args = parser.parse_args(argv)
    if args.runs:
        runs = [(pathlib.Path(path).name, curve(path)) for path in args.runs]
    else:
        out = pathlib.Path(args.out) / f"{pathlib.Path(args.text).stem if args.text else 'stdlib'}-{int(time.time())}"
        command, wall = run(args.text, args.epochs, out)
        runs = [(out.name, curve(out))]
        print(json.dumps({"command": " ".join(["dlsuite", *command[3:]]), "wall_seconds": round(wall, 1),
                          "final_val_loss": runs[0][1][-1][2]}))
    for label, points in runs:
        print(f"{label}: " + ", ".join(f"epoch {epoch} {seconds / 60:.1f} min {loss:.3f}" for epoch, seconds, loss in points))
    if args.plot:
        plot(runs, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
