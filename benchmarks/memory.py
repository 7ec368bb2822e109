"""Memory: the measured peak of a training step against the `dlsuite models
show` estimate, side by side.

    python -m benchmarks.memory            # ResNet-50, 224x224x3, 1000 classes, batch 32, momentum
    python -m benchmarks.memory --quick    # LeNet-5, 32x32x1, 10 classes, batch 8, momentum

Result `memory_<model>_b<batch>`, in MiB:

* ours: the estimate, `models.summary.memory` on the registry model built
  shapes-only: the "total" line of `dlsuite models show NAME --batch-size N
  --optimizer momentum` (weights, optimizer slots, bookkeeping, and at the
  step's peak the gradients, kept activations and workspace). It is
  computed, not timed, so its samples are one figure repeated.
* reference: the measurement, `apps.diagnose.memory_probe.measure` in 3 (--quick: 2) fresh Python
  processes, each of which builds the model and its slots, runs one warm-up
  step and measures the resident-set peak of three more; a sample is one
  measured step: its process's weights + slots + that step's peak (`dlsuite
  diagnose memory NAME` prints the highest step of one process).

Ratio = estimate / measured: 1 is exact, above 1 the estimate errs on the
safe side. The row's details split both into the persistent part and the
step's peak (`memory_probe.compare`, of the median sample). Full mode runs
the processes one after another; quick mode runs them side by side, or
(`python -m benchmarks --quick`) one after another beside earlier benchmarks,
which changes how long they take but not what each one holds (the resident
set is per process).
"""

import concurrent.futures
import statistics

from benchmarks import common

MIB = 2**20
OPTIMIZER = "momentum"
# (registry name, input shape, classes, batch size) per mode.
FULL = ("resnet50", (224, 224, 3), 1000, 32)
QUICK = ("lenet5", (32, 32, 1), 10, 8)
# Fresh processes measured, 3 steps each: 9 samples, an odd count, so the
# median is one of them and its parts can be shown. --quick measures in 2 (6
# samples, the lower middle one shown): each process is a TensorFlow start,
# about 7 s of a core in the suite's quick run.
PROCESSES = {"full": 3, "quick": 2}


def estimate(name, *, input_shape, classes, batch_size):
    """The `dlsuite models show` estimate, a dict of bytes."""
    from dlsuite import models
    from dlsuite.models import summary

    with summary.shapes_only():  # reads shapes only, as `models show` builds it
        model = models.get(name).builder(input_shape=input_shape, classes=classes)
    return summary.memory(model, batch_size=batch_size, optimizer=OPTIMIZER)


def measure_steps(name, *, input_shape, classes, batch_size, processes, parallel):
    """Starts `processes` runs of `memory_probe.measure`, each a fresh process; returns their futures.

    Each run reports its weights and slots and the peak of each of its
    measured steps; one step's total (weights + slots + that step's peak) is
    one sample.
    """
    from dlsuite.apps.diagnose import memory_probe

    def one():
        return memory_probe.measure(name, batch_size=batch_size, optimizer=OPTIMIZER, input_shape=input_shape,
                                    classes=classes, classes_count=classes)

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=processes if parallel else 1)
    futures = [pool.submit(one) for _ in range(processes)]
    pool.shutdown(wait=False)
    return futures


# The quick measurements `start_early` started, for main to collect.
_early = None


def start_early():
    """`python -m benchmarks --quick` calls this beside an earlier benchmark: the measuring processes
    import TensorFlow and measure there."""
    global _early
    name, input_shape, classes, batch_size = QUICK
    # One at a time: they take the core the other benchmark leaves idle, not its own.
    _early = measure_steps(name, input_shape=input_shape, classes=classes, batch_size=batch_size,
                           processes=PROCESSES["quick"], parallel=False)


def main(argv=None):
    from dlsuite.apps.diagnose import memory_probe

    global _early
    args = common.parse_args(__doc__, argv)
    mode = "quick" if args.quick else "full"
    name, input_shape, classes, batch_size = QUICK if args.quick else FULL
    how = "side by side" if args.quick else "in turn"
    if args.quick and _early is not None:
        futures, _early, how = _early, None, "in turn, beside earlier benchmarks"
    else:
        # Started first: the children import TensorFlow while this process does.
        futures = measure_steps(name, input_shape=input_shape, classes=classes, batch_size=batch_size,
                                processes=PROCESSES[mode], parallel=args.quick)
    estimated = estimate(name, input_shape=input_shape, classes=classes, batch_size=batch_size)
    runs = [future.result() for future in futures]
    # One sample per measured step: (its process's measurement, that step's peak).
    samples = [(run, peak) for run in runs for peak in run["steps"]]
    totals = [(run["weights"] + run["optimizer"] + peak) / MIB for run, peak in samples]
    # The median sample (of an even count, the lower middle one) is the one split into its parts.
    run, peak = samples[totals.index(statistics.median_low(totals))]
    rows = memory_probe.compare(estimated, {**run, "step": peak, "total": run["weights"] + run["optimizer"] + peak})
    highest = max(run["total"] for run in runs) / MIB
    shape = ",".join(map(str, input_shape))
    common.report(
        f"memory_{name}_b{batch_size}", ours=[estimated["total"] / MIB] * len(totals), reference=totals, mode=mode,
        unit="MiB",
        config={"model": name, "input_shape": list(input_shape), "classes": classes, "batch_size": batch_size,
                "optimizer": OPTIMIZER, "processes": len(runs), "run": how,
                "warmup_steps": memory_probe.WARMUP_STEPS, "measured_steps": memory_probe.MEASURED_STEPS,
                "meter": run["meter"]},
        estimate_mib={key: value / MIB for key, value in estimated.items()},
        measured_mib=[{"weights": r["weights"] / MIB, "optimizer": r["optimizer"] / MIB,
                       "steps": [value / MIB for value in r["steps"]], "total": r["total"] / MIB} for r in runs],
        rows=[{**row, "estimate": row["estimate"] / MIB, "measured": row["measured"] / MIB} for row in rows],
        highest_measured_mib=highest,
        details="; ".join(f"{row['what']}: {row['estimate'] / MIB:.1f} MiB estimated, {row['measured'] / MIB:.1f} "
                          f"MiB measured ({row['difference']:+.0%})" for row in rows)
        + f" (the median step); highest step of the {len(runs)} processes {highest:.1f} MiB",
        ours_label=f"estimate: `dlsuite models show {name} --input-shape {shape} --batch-size {batch_size} "
                   f"--optimizer {OPTIMIZER}`, total (models.summary.memory)",
        reference_label=f"measured: weights + slots + the peak of one training step, {memory_probe.MEASURED_STEPS} "
                        f"steps after a warm-up in each of {len(runs)} fresh processes (apps.diagnose.memory_probe.measure, "
                        f"{run['meter']}); `dlsuite diagnose memory {name} --input-shape {shape} --batch-size "
                        f"{batch_size} --optimizer {OPTIMIZER}` prints one process's highest step",
    )


if __name__ == "__main__":
    main()
