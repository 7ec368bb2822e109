"""`python -m benchmarks [--quick] [--only NAME] [--part PART] [--results PATH]`

Runs each benchmark module in its own process (a fresh TensorFlow, nothing
left over from the one before), passes its output through, collects the JSON
result lines and writes a Markdown table of the latest figures to
benchmarks/RESULTS.md, with their data in RESULTS.json beside it. A result
replaces the stored one of the same name and mode (full or quick); results
of benchmarks not run this time are kept.

`--quick` checks that every benchmark runs and reports, not how fast: it runs
them one after another in this process, which starts TensorFlow once instead
of once per benchmark (about 6 s of CPU each), except those in OWN_PROCESS;
and it starts some of them early, beside another one (EARLY).
"""

import argparse
import contextlib
import gc
import importlib
import io
import json
import os
import pathlib
import subprocess
import sys
import threading
import time
import traceback

from benchmarks import common

# Benchmark modules in this package, run in this order; a new one is one entry.
BENCHMARKS = ("train_throughput", "bfloat16", "input_pipeline", "lm_speed", "lstm_tuning", "serving_latency", "serving_http",
              "caption_speed",
              "checkpoint_cost",
              "startup", "memory", "model_parallel",
              "data_scale",
              "gpu_check")  # without a GPU (and in --quick) it prints one line and no results
# Benchmarks that configure TensorFlow before it starts (model_parallel makes logical CPU
# devices), so that --quick too runs each in a process of its own.
OWN_PROCESS = ("model_parallel",)
# --quick starts these benchmarks, or their slow part, when the benchmark named here starts, to use
# the core that one leaves idle (it traces, or runs commands, one at a time); their turn then finds
# the work done or under way. One of OWN_PROCESS starts its process, whose output is shown at its
# turn; another one's `start_early()` starts the processes it waits for (each imports TensorFlow, 6 s
# of a core). model_parallel trains at once, so it goes beside startup, whose commands use no
# TensorFlow: beside a TensorFlow benchmark, their thread pools slowed both down to a third.
EARLY = {"data_scale": "train_throughput", "serving_http": "input_pipeline", "memory": "serving_latency",
         "model_parallel": "startup"}

PACKAGE = pathlib.Path(__file__).resolve().parent
DEFAULT_RESULTS = PACKAGE / "RESULTS.md"
# Set in each benchmark's environment: a benchmark that writes RESULTS.md itself when run alone
# (gpu_check) leaves that to this runner, which may have been given another --results.
RUNNER_ENV = "DLSUITE_BENCHMARKS_RUNNER"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run the benchmarks and write a table of the latest figures.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and few steps: checks that every benchmark runs and reports")
    parser.add_argument("--only", action="append", choices=BENCHMARKS, metavar="NAME",
                        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}")
    parser.add_argument("--part", action="append", metavar="PART",
                        help="passed to each benchmark run: only that part of it (e.g. lm_speed's training); "
                             "its other stored rows are kept")
    parser.add_argument("--results", type=pathlib.Path, default=DEFAULT_RESULTS,
                        help="Markdown file to write; its data goes beside it as .json "
                             f"(default {DEFAULT_RESULTS.relative_to(PACKAGE.parent)})")
    return parser.parse_args(argv)


def _result(line):
    """The result a benchmark printed on `line`, or None for any other line."""
    if not line.startswith("{"):
        return None
    try:
        result = json.loads(line)
    except json.JSONDecodeError:
        return None
    return result if isinstance(result, dict) and "name" in result and "ratio" in result else None


def _arguments(quick, parts):
    return (["--quick"] if quick else []) + [option for part in parts for option in ("--part", part)]


def run_benchmark(name, *, quick, parts=(), out=None):
    """Runs one benchmark module in a process of its own; echoes its stdout (to `out`, default sys.stdout)
    and returns (exit status, results)."""
    out = out or sys.stdout
    command = [sys.executable, "-m", f"{PACKAGE.name}.{name}", *_arguments(quick, parts)]
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
    env[RUNNER_ENV] = "1"
    results = []
    # stderr is not captured: warnings and tracebacks reach the user as they come.
    with subprocess.Popen(command, cwd=PACKAGE.parent, env=env, stdout=subprocess.PIPE, text=True) as process:
        for line in process.stdout:
            out.write(line)
            out.flush()
            if (result := _result(line)) is not None:
                results.append(result)
    return process.returncode, results


class _Echo(io.TextIOBase):
    """stdout that passes everything through and keeps the result lines."""

    def __init__(self, out):
        self.out, self.results, self.pending = out, [], ""

    def write(self, text):
        self.out.write(text)
        lines = (self.pending + text).split("\n")
        self.pending = lines.pop()
        self.results += [result for line in lines if (result := _result(line)) is not None]
        return len(text)

    def flush(self):
        self.out.flush()


def run_here(name, *, quick, parts=()):
    """Runs one benchmark module's `main` in this process; returns (exit status, results) as run_benchmark does.

    A failure prints its traceback and gives status 1, as the module's own process would, and the
    next benchmark still runs.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ[RUNNER_ENV] = "1"
    module, argv = f"{PACKAGE.name}.{name}", _arguments(quick, parts)
    echo = _Echo(sys.stdout)
    with contextlib.redirect_stdout(echo), common.running(module, argv):
        try:
            entry = importlib.import_module(module).main
            # What is alive now (TensorFlow, Keras, the modules) leaves the garbage collector's
            # sight: each full collection (clear_session's below, Python's own) then skips it,
            # about 0.4 s each.
            gc.freeze()
            status = entry(argv) or 0
        except SystemExit as exit:
            status = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
        except Exception:  # noqa: BLE001  (reported as its own process's crash would be)
            traceback.print_exc()
            status = 1
    if "keras" in sys.modules:  # the next benchmark starts from Keras's defaults
        import keras

        keras.backend.clear_session()
        keras.mixed_precision.set_global_policy("float32")
    return status, echo.results


def _start_early(name, *, parts):
    """Starts benchmark `name` early (see EARLY). Returns `_in_background`'s function for a benchmark
    of OWN_PROCESS, else None once the module's `start_early()` ran (a failure is printed, and its
    turn then runs it all)."""
    if name in OWN_PROCESS:
        return _in_background(name, parts=parts)
    try:
        importlib.import_module(f"{PACKAGE.name}.{name}").start_early()
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    return None


def _in_background(name, *, parts):
    """Starts `run_benchmark(name, quick=True)` on a thread; returns a function that waits for it,
    writes its output to stdout and returns (exit status, results, seconds it took)."""
    out, outcome = io.StringIO(), {}

    def run():
        started = time.perf_counter()
        try:
            outcome["result"] = run_benchmark(name, quick=True, parts=parts, out=out)
        finally:
            outcome["seconds"] = time.perf_counter() - started

    thread = threading.Thread(target=run, name=f"benchmark {name}", daemon=True)
    thread.start()

    def finish():
        thread.join()
        sys.stdout.write(out.getvalue())
        sys.stdout.flush()
        status, produced = outcome.get("result", (1, []))  # no result: the thread's traceback was printed
        return status, produced, outcome["seconds"]

    return finish


def read_stored(path):
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def merge(stored, results, *, completed):
    """The stored results updated with the new ones.

    A new result replaces the stored one with the same name and mode. For a
    benchmark that completed, stored results of that mode it no longer
    produces (renamed or removed) are dropped.
    """
    new = {(result["name"], result["mode"]) for result in results}
    kept = [
        result for result in stored
        if (result["name"], result["mode"]) not in new
        and (result.get("benchmark"), result["mode"]) not in completed
    ]
    order = {name: index for index, name in enumerate(BENCHMARKS)}
    merged = kept + results
    # Full before quick, then in BENCHMARKS order; a benchmark's results in the order it printed them.
    return sorted(merged, key=lambda r: (r["mode"] != "full", order.get(r.get("benchmark"), len(order))))


def _number(value):
    if not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def markdown(results):
    """RESULTS.md: one table row per result, then what each row compares."""
    lines = [
        "# Benchmark results",
        "",
        "Written by `python -m benchmarks`; do not edit by hand. Each row is the latest figure for its",
        "result and mode, the median of at least 5 timed repeats after warm-up, the two sides",
        "interleaved. Ratio = ours / reference, of the medians; paired = the median of the per-repeat",
        "quotients, which cancels slow swings of machine speed; best = of the fastest repeats, the",
        "least disturbed figure when other processes share the cores (load above the core count).",
        "Machine: the 5-minute load average during the row; \"(shared)\" marks a load above the core",
        "count: other work shared the cores, so the absolute figures are low and the spread wide",
        "(compare the paired ratio). Rerun a row with its command.",
        "",
        "| Result | Mode | Ours | Reference | Ratio | Paired | Best | Bar | Details | Command | Date | Machine | Versions |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        bar = "" if r.get("bar") is None else f"≥ {r['bar']} {'met' if r.get('meets_bar') else '**missed**'}"
        versions = r.get("versions", {})
        lines.append("| " + " | ".join([
            f"`{r['name']}`",
            r["mode"],
            f"{_number(r['ours'])} {r.get('unit', '')}",
            f"{_number(r['reference'])} {r.get('unit', '')}",
            f"{r['ratio']:.3f}",
            "" if r.get("paired_ratio") is None else f"{r['paired_ratio']:.3f}",
            "" if r.get("best_ratio") is None else f"{r['best_ratio']:.3f}",
            bar,
            r.get("details", ""),
            f"`{r.get('command', '')}`",
            r.get("date", ""),
            (f"{r['device']}, " if r.get("device") else "") + f"{r.get('cores')} cores, {r.get('cpu', '')}" + (
                f", load {r['load_average'][1]:.1f}" if r.get("load_average") else "") + (
                " (shared)" if r.get("load_average") and r["load_average"][1] > (r.get("cores") or 0) else ""),
            f"TF {versions.get('tensorflow')}, Keras {versions.get('keras')}, Python {versions.get('python')}",
        ]) + " |")
    lines += ["", "## What each row compares", ""]
    for r in results:
        lines.append(
            f"- `{r['name']}` ({r['mode']}): ours = {r.get('ours_label', '?')}; "
            f"reference = {r.get('reference_label', '?')}. "
            f"Per-repeat ours {r.get('ours_samples')}, reference {r.get('reference_samples')}. "
            f"Config: `{json.dumps(r.get('config', {}))}`"
        )
    return "\n".join(lines) + "\n"


def write_results(results, *, path=DEFAULT_RESULTS, completed=()):
    """Merges `results` into the stored ones (see `merge`) and writes the Markdown table at `path`
    and its data beside it as .json."""
    data_path = path.with_suffix(".json")
    merged = merge(read_stored(data_path), results, completed=set(completed))
    path.parent.mkdir(parents=True, exist_ok=True)
    data_path.write_text(json.dumps(merged, indent=1) + "\n", encoding="utf-8")
    path.write_text(markdown(merged), encoding="utf-8")
    print(f"Wrote {path} and {data_path.name} ({len(results)} new results).", file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    results_path = args.results
    mode = "quick" if args.quick else "full"
    results, completed, failed = [], set(), []
    names, background = list(args.only or BENCHMARKS), {}
    for index, name in enumerate(names):
        for early, partner in EARLY.items():
            if args.quick and partner == name and early in names[index + 1:]:
                background[early] = _start_early(early, parts=args.part or ())
        started = time.perf_counter()
        if background.get(name):
            status, produced, seconds = background.pop(name)()
        else:
            run = run_here if args.quick and name not in OWN_PROCESS else run_benchmark
            status, produced = run(name, quick=args.quick, parts=args.part or ())
            seconds = time.perf_counter() - started
        print(f"benchmarks: {name} took {seconds:.0f} s", file=sys.stderr, flush=True)
        results += produced
        if status != 0:
            failed.append(f"{name} (exit status {status})")
        elif not args.part and produced:  # a partial run, or one with nothing to measure, leaves the rows it did not make
            completed.add((name, mode))

    write_results(results, path=results_path, completed=completed)
    if failed:
        print(f"Failed: {', '.join(failed)}; see the output above.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
