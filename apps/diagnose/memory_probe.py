"""Measures what one training step of a registry model really holds in memory,
to set beside the estimate of `dlsuite.models.summary` (the seed's "memory
concerns": parameters, the updater's slots, batch size, sample size and the
activations).

The measurement runs in a fresh Python process, so nothing the caller did
earlier (other models, traced functions, cached buffers) pollutes the peak:

1. build the model (its weights), then the optimizer's slot variables, each
   measured as the growth of the process's memory around it;
2. run one warm-up step: it traces the step function and creates the kernels,
   a one-off cost (30-140 MB on CPU) that is not training memory and would
   swamp a small model;
3. run a few more steps and take the highest peak above the memory held
   before the step: gradients, the activations backprop keeps and the
   temporaries of the update.

On CPU the memory is the process's resident set (RSS), its peak read from
/proc/self/status after resetting the high-water mark (Linux). TensorFlow's
oneDNN build normally serves large tensors from a pool that never shrinks,
so a step's peak would stay resident and hide the next step's; the child
process asks oneDNN for the system allocator instead and makes glibc hand
every block of 64 KiB or more straight back to the kernel, so the resident
set follows the tensors that are alive. On a GPU the allocator's own
counters (`tf.config.experimental.get_memory_info`) give the same three
figures.
"""

import gc
import json
import os
import subprocess
import sys

# Environment of the measuring process: see the module docstring.
CHILD_ENV = {
    "TF_ONEDNN_USE_SYSTEM_ALLOCATOR": "1",
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}
WARMUP_STEPS = 1
MEASURED_STEPS = 3
_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


class MeasurementError(RuntimeError):
    """The measuring process failed (out of memory, a crash)."""


# --- inside the measuring process ---------------------------------------------------------


def _status_bytes(field):
    with open(_STATUS) as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise MeasurementError(f"{_STATUS} has no {field} line")


class _ProcessMemory:
    """Resident set and its high-water mark, resettable (Linux >= 4.0)."""

    name = "process resident set (RSS)"

    def current(self):
        return _status_bytes("VmRSS")

    def reset_peak(self):
        with open(_CLEAR_REFS, "w") as handle:
            handle.write("5")  # 5: reset the peak resident set to the current one

    def peak(self):
        return _status_bytes("VmHWM")


class _AllocatorMemory:
    """TensorFlow's allocator counters on a GPU."""

    def __init__(self, device):
        self.device = device
        self.name = f"TensorFlow allocator on {device}"

    def current(self):
        import tensorflow as tf

        return tf.config.experimental.get_memory_info(self.device)["current"]

    def reset_peak(self):
        import tensorflow as tf

        tf.config.experimental.reset_memory_stats(self.device)

    def peak(self):
        import tensorflow as tf

        return tf.config.experimental.get_memory_info(self.device)["peak"]


def _meter():
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return _AllocatorMemory("GPU:0")
    if not (os.path.exists(_CLEAR_REFS) and os.path.exists(_STATUS)):
        raise MeasurementError(
            "measuring CPU memory needs Linux's /proc/self/clear_refs and /proc/self/status; "
            "run on Linux or on a GPU"
        )
    return _ProcessMemory()


def measure_here(build, *, batch_size, optimizer, input_shape, classes, seed=0):
    """Measures a training step in this process (call it in a fresh one).

    Args:
        build: () -> a keras.Model taking `input_shape` images and giving
            `classes` probabilities.
        batch_size: examples per step.
        optimizer: a name of `dlsuite.apps.core.optim.OPTIMIZERS` (not lbfgs).
        input_shape: (H, W, C).
        classes: output classes, for the labels.

    Returns:
        A dict of bytes: `weights` (growth while building the model),
        `optimizer` (growth while creating the slot variables), `step` (the
        highest peak of a training step above the memory before it), `steps`
        (each measured step's peak), `total` and `meter` (what was read).
    """
    import keras
    import numpy as np
    import tensorflow as tf

    from dlsuite.apps.core import optim

    meter = _meter()
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    # The batch exists before the baseline: a data pipeline holds it either way.
    images = tf.constant(rng.uniform(0, 1, (batch_size, *input_shape)).astype("float32"))
    labels = tf.constant(rng.integers(0, classes, batch_size).astype("int32"))

    gc.collect()  # what the batch's construction left for the collector goes before the baseline
    before = meter.current()
    model = build()
    after_build = meter.current()
    model.compile(
        optimizer=optim.make_optimizer(optim.OptimizerConfig(optimizer=optimizer), steps_per_epoch=1, epochs=1),
        loss=keras.losses.SparseCategoricalCrossentropy(),
    )
    model.optimizer.build(model.trainable_variables)
    after_slots = meter.current()
    for _ in range(WARMUP_STEPS):
        model.train_on_batch(images, labels)
    peaks = []
    for _ in range(MEASURED_STEPS):
        base = meter.current()
        meter.reset_peak()
        model.train_on_batch(images, labels)
        peaks.append(max(0, meter.peak() - base))
    measured = {
        "weights": after_build - before,
        "optimizer": after_slots - after_build,
        "step": max(peaks),
        "steps": peaks,
    }
    measured["total"] = measured["weights"] + measured["optimizer"] + measured["step"]
    measured["meter"] = meter.name
    return measured


def _child(spec):
    """Entry point of the measuring process: builds the registry model of `spec`."""
    from dlsuite import models

    model_spec = models.get(spec["name"])
    kwargs = {"input_shape": tuple(spec["input_shape"])}
    if spec.get("classes") is not None:
        kwargs["classes"] = spec["classes"]

    def build():
        return model_spec.builder(**kwargs)

    measured = measure_here(
        build, batch_size=spec["batch_size"], optimizer=spec["optimizer"],
        input_shape=tuple(spec["input_shape"]), classes=spec["classes_count"],
    )
    print(json.dumps(measured), flush=True)


# --- in the calling process -----------------------------------------------------------------


def measure(name, *, batch_size, optimizer, input_shape, classes_count, classes=None, timeout=900):
    """Measures one training step of registry model `name` in a fresh process.

    Args:
        name: a registry CNN name.
        batch_size: examples per step.
        optimizer: a Keras optimizer name of `dlsuite.apps.core.optim.OPTIMIZERS`.
        input_shape: (H, W, C) the model is built for.
        classes_count: how many classes the built model outputs (for labels).
        classes: the `classes` argument to pass the builder (None: its default).
        timeout: seconds before the measurement is abandoned.

    Returns:
        The dict of `measure_here`.

    Raises:
        MeasurementError: the process failed, e.g. ran out of memory.
    """
    spec = {
        "name": name, "batch_size": batch_size, "optimizer": optimizer,
        "input_shape": list(input_shape), "classes": classes, "classes_count": classes_count,
    }
    env = {**os.environ, **CHILD_ENV}
    try:
        result = subprocess.run(
            [sys.executable, "-c", "import sys, json; from dlsuite.apps.diagnose import memory_probe; "
             "memory_probe._child(json.loads(sys.argv[1]))", json.dumps(spec)],
            capture_output=True, text=True, env=env, timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise MeasurementError(f"the measurement of {name} took over {timeout} s") from None
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {result.returncode}"
        if result.returncode in (-9, 137):
            reason = "killed, probably out of memory; try a smaller --batch-size or --input-shape"
        raise MeasurementError(f"measuring {name} failed: {reason}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def compare(estimate, measured):
    """Estimate against measurement, row by row: [{"what", "estimate", "measured", "difference"}].

    The persistent part (weights, optimizer slots and, for process memory,
    the framework's per-variable bookkeeping) against what building the model
    and its slots added; the step's peak (gradients, activations, workspace)
    against the measured peak above that; and the totals. On a GPU the
    allocator sees tensors only, so the estimate leaves the host-side
    bookkeeping out.
    """
    bookkeeping = estimate["framework"] if measured["meter"].startswith("process") else 0
    persistent = estimate["weights"] + estimate["optimizer"] + bookkeeping
    step = estimate["gradients"] + estimate["activations"] + estimate["workspace"]
    pairs = [
        ("weights + slots" + (" + bookkeeping" if bookkeeping else ""), persistent,
         measured["weights"] + measured["optimizer"]),
        ("step peak (gradients, activations)", step, measured["step"]),
        ("total", persistent + step, measured["total"]),
    ]
    return [{"what": what, "estimate": est, "measured": meas, "difference": est / meas - 1 if meas else float("inf")}
            for what, est, meas in pairs]
