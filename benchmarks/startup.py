"""Start-up: `dlsuite --help` and every `dlsuite APP --help` against `python -c
"import tensorflow"`, each a fresh process as a user runs it.

    python -m benchmarks.startup            # `dlsuite --help` and `dlsuite APP --help` for every app
    python -m benchmarks.startup --quick    # 3 apps, no warm-up, `import numpy` as the reference

The apps come from `dlsuite.apps.cli.build_parser()`, so a new app (one more
line in SUBCOMMANDS) is measured without touching this file. Every command
builds the whole parser tree whichever help it prints, so `dlsuite classify
train --help` costs what `dlsuite classify --help` does and is not timed
separately. Help must stay instant: the parsers may not import TensorFlow
(the apps import it lazily, inside their run functions). Each result also
records whether the command imported TensorFlow, checked in a separate run
of the same argv.
Bar: ratio >= 5, i.e. the help answers in a fifth of TensorFlow's import.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

from benchmarks import common

# Runs `dlsuite.apps.cli.main(argv)` and prints whether TensorFlow or Keras got imported.
IMPORT_CHECK = """
import contextlib, io, json, sys
from dlsuite.apps import cli
with contextlib.redirect_stdout(io.StringIO()):
    status = cli.main(json.loads(sys.argv[1]))
print(json.dumps({"status": status, "tensorflow": "tensorflow" in sys.modules, "keras": "keras" in sys.modules}))
"""


def apps():
    """The names of the `dlsuite` subcommands, in the parser's order; aliases left out."""
    from dlsuite.apps import cli

    found, seen = [], set()
    for action in cli.build_parser()._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for name, subparser in action.choices.items():
            if id(subparser) not in seen:
                seen.add(id(subparser))
                found.append(name)
    return found


def _dlsuite():
    """The installed `dlsuite` console script, or `python -m` the CLI module."""
    script = pathlib.Path(sys.executable).with_name("dlsuite")
    return [str(script)] if script.exists() else [sys.executable, "-m", "dlsuite.apps.cli"]


def imports(argv, env):
    """{"tensorflow": bool, "keras": bool} that `dlsuite *argv` imports."""
    done = subprocess.run([sys.executable, "-c", IMPORT_CHECK, json.dumps(argv)],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"dlsuite {' '.join(argv)}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# The apps a --quick run times (each row costs five `import tensorflow` references' worth of time).
QUICK_APPS = ("models", "classify", "lm")


def main(argv=None):
    args = common.parse_args(__doc__, argv)
    mode = "quick" if args.quick else "full"
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # what `dlsuite` sets for itself; the same for import
    paths = [()] + [(app,) for app in apps()]
    if args.quick:
        # Enough rows to check the report; the full run times every app.
        paths = [()] + [path for path in paths if path and path[0] in QUICK_APPS]

    def run(command):
        def once():
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} exited {done.returncode}: {done.stderr[-2000:]}")
            return 1
        return once

    # --quick checks that the rows come out, not the bar: five imports of TensorFlow (half a
    # minute) would be most of its time, so NumPy's import stands in for the reference there.
    reference_module = "numpy" if args.quick else "tensorflow"
    runs = {"reference": run([sys.executable, "-c", f"import {reference_module}"])}
    for path in paths:
        runs[" ".join(path)] = run(_dlsuite() + list(path) + ["--help"])
    # One reference repeat per round of help commands: every row is compared
    # with the same `import tensorflow` samples, taken in between its own.
    # Warm-up fills the page cache; --quick only checks that the rows come out.
    warmup = 0 if args.quick else 1
    rates = common.interleaved(runs, warmup=warmup, repeats=common.MIN_REPEATS)
    reference = rates.pop("reference")
    import_seconds = 1 / statistics.median(reference)
    for path in paths:
        label = " ".join(path)
        imported = imports(list(path) + ["--help"], env)
        seconds = 1 / statistics.median(rates[label])
        # The fastest runs: other work only slows a run down (see common.report's best_ratio).
        fastest, fastest_import = 1 / max(rates[label]), 1 / max(reference)
        command = " ".join(["dlsuite", *path, "--help"])
        common.report(
            "startup_" + "_".join([*path, "help"]),
            ours=rates[label], reference=reference, mode=mode, unit="runs/s", bar=5,
            config={"command": command, "repeats": common.MIN_REPEATS, "warmup_repeats": warmup,
                    "console_script": _dlsuite()[0]},
            imports_tensorflow=imported["tensorflow"], imports_keras=imported["keras"],
            seconds={"ours": seconds, "reference": import_seconds},
            details=f"`{command}` {seconds * 1000:.0f} ms against {import_seconds:.2f} s of `import {reference_module}` "
                    f"(fastest runs: {fastest * 1000:.0f} ms against {fastest_import:.2f} s); "
                    + ("imports TensorFlow" if imported["tensorflow"] else "imports no TensorFlow")
                    + ("" if imported["tensorflow"] or not imported["keras"] else " but imports Keras"),
            ours_label=f"`{command}`, a fresh process (Python start-up included)",
            reference_label=f"`python -c \"import {reference_module}\"`, a fresh process",
        )


if __name__ == "__main__":
    main()
