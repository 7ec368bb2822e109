"""Timing and reporting shared by every benchmark.

The rules each figure follows:

* warm-up calls run first and are never timed: they trace and compile the
  training step, fill tf.data caches and warm the oneDNN primitive cache;
* each figure is the median of at least `MIN_REPEATS` timed repeats, and
  every repeat is kept in the report so the spread can be seen;
* the two sides of a comparison alternate (A, B, A, B, ...), so a slow
  spell of the machine hits both sides instead of one;
* TensorFlow's thread pools stay at their defaults (0: one thread per core),
  so a figure is what a user gets without tuning.

`report` prints one JSON object per result on its own line; `python -m
benchmarks` collects those lines and writes RESULTS.md from them.
"""

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

MIN_REPEATS = 5


def parse_args(description, argv=None, *, parts=()):
    """The options every benchmark script takes: `--quick`, and `--part NAME`
    (repeatable) where the script names its `parts`: run only those."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick", action="store_true",
        help="small inputs and few steps: checks that the benchmark runs and reports, not how fast",
    )
    if parts:
        parser.add_argument("--part", action="append", choices=parts,
                            help=f"run only this part (repeatable; default all): {', '.join(parts)}")
    args = parser.parse_args(argv)
    if parts:
        args.part = args.part or list(parts)
    return args


def cpu_model():
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine():
    """{"cores": logical CPUs, "cpu": model name}."""
    return {"cores": os.cpu_count(), "cpu": cpu_model()}


def versions():
    """The library versions a figure depends on."""
    import keras
    import numpy
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": numpy.__version__,
    }


def threads():
    """TensorFlow's intra- and inter-op pool sizes; 0 is the default (one per core)."""
    import tensorflow as tf

    return {
        "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
    }


def forkserver(preload):
    """multiprocessing's forkserver context, its server started now (it imports `preload` on its own
    while this process goes on). A process has one server: `preload` counts only for the first call,
    later ones share the server that call started."""
    import multiprocessing.forkserver

    # TensorFlow's start-up chatter, once per forked process otherwise (the server reads os.environ).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(preload))
    multiprocessing.forkserver.ensure_running()
    return context


def interleaved(runs, *, warmup, repeats):
    """Times each callable of `runs`, alternating between them repeat by repeat.

    Args:
        runs: {label: fn}. `fn()` does one repeat's work and returns how many
            items (images) it processed; it must return only once the work
            is done (e.g. after reading a loss back as a number). A fn that
            times itself, to leave out clean-up the comparison is not about,
            returns (items, seconds) instead. Calls follow the dict's order,
            so a later fn may rely on state an earlier one set up in the same
            repeat.
        warmup: untimed calls of each fn before the first timed one.
        repeats: timed calls of each fn, at least MIN_REPEATS.

    Returns:
        {label: [items per second, one per repeat]}.
    """
    if repeats < MIN_REPEATS:
        raise ValueError(f"repeats={repeats} is too few: each figure is a median of at least {MIN_REPEATS}.")
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    rates = {label: [] for label in runs}
    for _ in range(repeats):
        for label, fn in runs.items():
            start = time.perf_counter()
            items = fn()
            seconds = time.perf_counter() - start
            if isinstance(items, tuple):
                items, seconds = items
            rates[label].append(items / seconds)
    return rates


def build_optimizers(*models):
    """Creates each compiled model's optimizer variables now, for --quick runs.

    Keras creates them while it traces the first training step, and TensorFlow then traces
    that step a second time without them: a second of CPU or more a model, where a quick
    run's steps take milliseconds. Full runs leave the step as the apps run it (the second
    trace falls in their warm-up).
    """
    for model in models:
        model.optimizer.build(model.trainable_variables)


def matmul_rates(*, n=2048, chain=4, warmup=1, repeats=MIN_REPEATS, dtype="float32"):
    """FLOP/s of large matrix products (float32 unless `dtype` says otherwise), one figure per repeat.

    Runs `chain` dependent (n, n) @ (n, n) products in one tf.function (so
    nothing can be deduplicated), 2 n^3 FLOPs each. The best of these, taken
    over calls spread through a run, is the machine's practical peak: on a
    shared machine a single call can run at half speed.
    """
    import tensorflow as tf

    # Scaled so that repeated products keep values near 1, far from overflow (float16's too).
    matrix = tf.cast(tf.random.stateless_normal((n, n), seed=(0, 0)) / math.sqrt(n), dtype)

    @tf.function
    def products(x):
        for _ in range(chain):
            x = tf.matmul(x, matrix)
        return tf.reduce_sum(x)

    def run():
        products(matrix).numpy()
        return chain * 2 * n**3

    return interleaved({"matmul": run}, warmup=warmup, repeats=repeats)["matmul"]


# (module, argv) of the benchmark `python -m benchmarks --quick` runs in its own process now;
# None when a benchmark runs as its own script.
_running = None


@contextlib.contextmanager
def running(module, argv):
    """Results reported inside this block belong to benchmark `module` run with `argv`."""
    global _running
    _running = (module, list(argv))
    try:
        yield
    finally:
        _running = None


def _module_and_argv():
    """(the running benchmark's module name or None, its arguments)."""
    if _running is not None:
        return _running
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return (spec.name if spec is not None else None), sys.argv[1:]


def command():
    """The command line that reproduces this process's results."""
    module, argv = _module_and_argv()
    program = f"python -m {module}" if module is not None else f"python {sys.argv[0]}"
    return " ".join([program, *argv])


def _significant(value, digits=4):
    """`value` rounded to `digits` significant digits, inside dicts and lists too."""
    if isinstance(value, dict):
        return {key: _significant(item, digits) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_significant(item, digits) for item in value]
    if isinstance(value, float) and math.isfinite(value) and value != 0:
        return round(value, digits - 1 - math.floor(math.log10(abs(value))))
    return value


def report(name, *, ours, reference, mode, config, unit="images/s", bar=None, **fields):
    """Prints one result as one JSON line on stdout and returns it.

    Args:
        name: the result's name, unique within its benchmark, e.g. "train_resnet50".
        ours, reference: per-repeat rates (at least MIN_REPEATS each), repeat
            i of both taken back to back; the figures are their medians, the
            ratio is ours / reference, the paired ratio the median of the
            per-repeat quotients and the best ratio that of the fastest repeats.
        mode: "full" or "quick".
        config: what was measured (sizes, steps, repeats, ...), JSON-able.
        unit: the rates' unit.
        bar: the ratio the issue asks for, or None.
        **fields: more JSON-able fields, e.g. `ours_label`, `details`.
    """
    for side, samples in (("ours", ours), ("reference", reference)):
        if len(samples) < MIN_REPEATS:
            raise ValueError(f"{name}: {side} has {len(samples)} repeats; a figure needs {MIN_REPEATS}.")
    ours_median, reference_median = statistics.median(ours), statistics.median(reference)
    module, _ = _module_and_argv()
    result = {
        "name": name,
        "benchmark": module.rpartition(".")[2] if module is not None else None,
        "mode": mode,
        "ours": _significant(ours_median),
        "reference": _significant(reference_median),
        "ratio": _significant(ours_median / reference_median),
        # Repeat i of each side ran back to back, so their quotient cancels
        # slow swings of machine speed that the medians still carry.
        "paired_ratio": _significant(statistics.median(o / r for o, r in zip(ours, reference))),
        # The fastest repeat of each side: other processes only ever slow a
        # repeat down, so on a shared machine this is the least disturbed
        # comparison (the rule `timeit` follows).
        "best_ratio": _significant(max(ours) / max(reference)),
        "unit": unit,
        "bar": bar,
        "meets_bar": None if bar is None else ours_median / reference_median >= bar,
        "ours_samples": _significant(ours),
        "reference_samples": _significant(reference),
        "config": config,
        **_significant(fields),
        **machine(),
        # Runnable processes over the last 1, 5 and 15 minutes: above the
        # core count, other work shared the cores with this benchmark.
        "load_average": _significant(list(os.getloadavg())),
        "threads": threads(),
        "versions": versions(),
        "command": command(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    print(json.dumps(result), flush=True)
    return result
