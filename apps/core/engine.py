"""The training engine every app shares: device defaults, and training by
`model.fit`, or by the loop the strategy or optimizer needs (`multi_worker`,
`parameter_server`, `lbfgs`), each in its own module over `loop_parts`.

An app builds its model inside `strategy.scope()`, then calls `fit(...)`; the
engine compiles, trains with checkpoints, resume, logs and NaN guard, and
returns what happened.
"""

import contextlib
import dataclasses
import os
import pathlib
import shutil
import sys

import keras
import tensorflow as tf

from dlsuite import callbacks as dl_callbacks
from dlsuite.apps.core import (checkpoints, cpu_features, distribute, lbfgs, loop_parts, multi_worker, optim,
                               parameter_server, rundir)
from dlsuite.apps.core import epochs as epochs_lib
from dlsuite.apps.core.choices import SWITCHES
from dlsuite.apps.core.errors import UsageError
from dlsuite.models import compat


def device_kind():
    """"tpu", "gpu" or "cpu": the accelerator this process trains on."""
    if tf.config.list_logical_devices("TPU"):
        return "tpu"
    if tf.config.list_physical_devices("GPU"):
        return "gpu"
    return "cpu"


def default_batch_size(device=None):
    """The seed's ranges: 32-256 is common on CPU, 32-1024 on GPU."""
    return {"cpu": 32, "gpu": 128, "tpu": 1024}[device or device_kind()]


# The policies a run's config.json may record (resolved.policy).
POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")


@dataclasses.dataclass(frozen=True)
class Precision:
    """The dtype policy a run trains in and why, as config.json records them."""

    policy: str
    reason: str


def choose_precision(mode, device=None, *, recorded=None, cpuinfo=None):
    """The policy for --mixed-precision auto|on|off on `device`, and why.

    auto turns mixed precision on where the hardware computes it natively:
    float16 on GPUs with tensor cores (compute capability >= 7.0), bfloat16
    on TPUs and on CPUs whose flags show native bfloat16
    (`cpu_features.bfloat16`: AVX512-BF16 or AMX, 1.5x faster ResNet-50
    training, issue 28); float32 elsewhere, and where the CPU cannot tell.
    on takes bfloat16 on CPUs and TPUs, float16 on GPUs; off keeps float32.

    Args:
        mode: "auto", "on" or "off".
        device: "cpu", "gpu" or "tpu"; default `device_kind()`.
        recorded: the `Precision` a resumed run's config.json holds; it wins
            over `mode`, so a run goes on in the policy it started in (the
            checkpoints hold that policy's optimizer state: a float16 run's
            loss scale), on whatever machine resumes it (issue 28 item 5).
        cpuinfo: the processor's flags file instead of /proc/cpuinfo (tests).
    """
    if mode not in SWITCHES:
        raise UsageError(f"mixed_precision must be one of {', '.join(SWITCHES)}, received {mode!r}.", option="mixed_precision")
    if recorded is not None:
        return recorded
    device = device or device_kind()
    if mode == "off":
        return Precision("float32", "off")
    if mode == "on":
        if device == "gpu":
            return Precision("mixed_float16", "on: float16 on a GPU")
        return Precision("mixed_bfloat16", f"on: bfloat16 on a {device.upper()}")
    if device == "tpu":
        return Precision("mixed_bfloat16", "auto: TPUs compute bfloat16 natively")
    if device == "gpu":
        details = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0])
        capability = details.get("compute_capability", (0, 0))
        if capability >= (7, 0):
            return Precision("mixed_float16", f"auto: this GPU has tensor cores (compute capability "
                                              f"{capability[0]}.{capability[1]})")
        return Precision("float32", f"auto: this GPU has no tensor cores (compute capability "
                                    f"{capability[0]}.{capability[1]}, below 7.0)")
    support = cpu_features.bfloat16(cpuinfo)
    if not support.native:
        return Precision("float32", f"auto: {support.why}")
    if os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "0":  # Eigen then emulates bfloat16, slower than float32
        return Precision("float32", f"auto: {support.why}, but TF_ENABLE_ONEDNN_OPTS=0 turns off oneDNN, "
                                    "which computes it")
    return Precision("mixed_bfloat16", f"auto: {support.why}")


def set_precision(mode, device=None, *, recorded=None, cpuinfo=None):
    """Sets Keras's global dtype policy as `choose_precision` decides (the
    layers built next read it); returns the `Precision`."""
    precision = choose_precision(mode, device, recorded=recorded, cpuinfo=cpuinfo)
    keras.mixed_precision.set_global_policy(precision.policy)
    return precision


def jit_setting(mode):
    """--jit-compile auto|on|off as Keras's compile argument.

    auto leaves the choice to Keras, which enables XLA only off CPU and outside
    tf.distribute; on CPU, XLA made ResNet-50 training about 2x slower in our
    trials.
    """
    if mode not in SWITCHES:
        raise UsageError(f"jit_compile must be one of {', '.join(SWITCHES)}, received {mode!r}.", option="jit_compile")
    return {"auto": "auto", "on": True, "off": False}[mode]


def set_intra_op_threads(threads):
    """Sets TensorFlow's intra-op thread count for this process; before its
    first op only, so a process where TensorFlow already runs (a library
    caller, a test) keeps its own. None, or TF_NUM_INTRAOP_THREADS set by the
    user, leaves TensorFlow's choice."""
    if threads is None or os.environ.get("TF_NUM_INTRAOP_THREADS"):
        return
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    except RuntimeError:  # "cannot be modified after initialization"
        pass


def set_seed(seed, *, deterministic):
    """Seeds Python, NumPy and TensorFlow; `deterministic` also makes ops so."""
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def run_paths(run_dir):
    run_dir = os.fspath(run_dir)
    return {
        "history": os.path.join(run_dir, "history.csv"),
        "log": os.path.join(run_dir, "train.log"),
        "best": os.path.join(run_dir, "checkpoints", "best.keras"),
        "resume": os.path.join(run_dir, "checkpoints", "resume"),
        "tensorboard": os.path.join(run_dir, "tensorboard"),
    }


def fit(
    model, train, validation, *, strategy, optimizer_config, loss, epochs, steps_per_epoch,
    global_batch_size, run_dir, early_stopping=0, jit_compile="auto", resume=False,
    metrics=("accuracy",), monitors=(), callbacks=(), initial_epoch=0, compile=True, best_checkpoint=True,
    verbose=None, checkpoint_every=60.0, resume_dir=None,
):
    """Compiles and trains `model`, writing checkpoints and logs into `run_dir`.

    Args:
        model: built inside `strategy.scope()`.
        train: the training batches (global batch size): an
            `epochs.EpochOrder`, which resumes mid-epoch exactly, or a
            tf.data dataset of (x, y), which resumes at epoch ends.
        validation: a batched (x, y) tf.data dataset.
        strategy: the tf.distribute strategy the model was built under.
        optimizer_config: an `optim.OptimizerConfig`.
        loss: a Keras loss object.
        epochs: total epochs (iterations for lbfgs).
        steps_per_epoch: batches in one pass over `train`, for the schedules.
        global_batch_size: batch size across all replicas.
        run_dir: the run directory (`rundir.create`).
        early_stopping: patience in epochs on val_loss; 0 disables it.
        jit_compile: "auto", True or False (`jit_setting`).
        metrics: Keras metric names, or one list per output.
        monitors: names of `dlsuite.callbacks.monitors.MONITORS` ("updates",
            "gradients", "dead-relu") to watch while training (model.fit only).
        resume: continue from the checkpoint an interrupted run left in run_dir.
        callbacks: more Keras callbacks, run first (metrics they add to the
            logs reach the checkpoints and the history); model.fit only.
        initial_epoch: the epoch to start at (Hyperband continuing a trial).
        compile: False when the caller compiled the model already (`compile`).
        best_checkpoint: keep checkpoints/best.keras (a tuner trial keeps
            keras-tuner's own instead).
        verbose: model.fit's verbosity (default: a progress bar on a
            terminal, a line an epoch otherwise).
        checkpoint_every: seconds between checkpoints inside an epoch (0:
            at epoch ends only; None: no checkpoints to resume from, for a
            tuner's trials).
        resume_dir: the run directory whose checkpoint `resume` goes on
            from (a cluster's workers: the chief's); default `run_dir`.

    Returns:
        A `loop_parts.FitResult`; the model holds the final weights (the caller may load the
        best checkpoint).
    """
    paths = run_paths(run_dir)
    os.makedirs(os.path.dirname(paths["best"]), exist_ok=True)
    order = train if isinstance(train, epochs_lib.EpochOrder) else None
    train = epochs_lib.as_dataset(train)
    if distribute.is_parameter_server(strategy):
        return parameter_server.fit(
            model, order or train, validation, strategy=strategy, optimizer_config=optimizer_config, loss=loss,
            metrics=metrics, epochs=epochs, steps_per_epoch=steps_per_epoch, global_batch_size=global_batch_size,
            paths=paths, early_stopping=early_stopping, resume=resume, callbacks=callbacks,
            initial_epoch=initial_epoch, best_checkpoint=best_checkpoint, checkpoint_every=checkpoint_every,
            verbose=verbose, resume_paths=run_paths(resume_dir or run_dir) if resume else None,
        )
    if monitors and (optimizer_config.optimizer == "lbfgs" or distribute.needs_custom_loop(strategy)):
        path = "L-BFGS" if optimizer_config.optimizer == "lbfgs" else "the multi-worker loop"
        print(f"dlsuite: --monitor watches model.fit training; {path} trains without it", file=sys.stderr)
    if optimizer_config.optimizer == "lbfgs":
        return lbfgs.fit(model, train, validation, optimizer_config=optimizer_config, loss=loss, epochs=epochs, paths=paths)
    if distribute.needs_custom_loop(strategy):
        return multi_worker.fit(
            model, train, validation, order=order, strategy=strategy, optimizer_config=optimizer_config, loss=loss,
            epochs=epochs, steps_per_epoch=steps_per_epoch, global_batch_size=global_batch_size, paths=paths,
            resume_paths=run_paths(resume_dir or run_dir) if resume else None, checkpoint_every=checkpoint_every,
        )

    if compile:
        compile_model(model, strategy=strategy, optimizer_config=optimizer_config, loss=loss, metrics=metrics,
                      steps_per_epoch=steps_per_epoch, epochs=epochs, jit_compile=jit_compile)
    # Outside a strategy scope Keras creates these variables inside the first traced step, and
    # tf.function then traces the whole step a second time: made first, the step traces once.
    with strategy.scope():
        compat.build_training_state(model, train.element_spec)
    store = checkpoints.Store(paths["resume"])
    saved = checkpoints.Store(run_paths(resume_dir or run_dir)["resume"]).latest() if resume else None
    start_epoch, start_batch = (saved.epoch, saved.batch) if saved else (initial_epoch, 0)
    if saved and saved.history:  # history.csv as the checkpoint knew it: rows written after it are trained again
        rundir.write_history(paths["history"], saved.history)
    elif saved:  # no epoch ended before it: CSVLogger starts the file, header and all
        pathlib.Path(paths["history"]).unlink(missing_ok=True)
    if saved:
        print(f"resuming from {saved.path}: epoch {start_epoch + 1}, batch {start_batch}", flush=True)
    steps = (order.steps_per_epoch if order else None) or steps_per_epoch
    # A resumed epoch's remaining batches are a fit of their own, then the epochs after it.
    segments = [(start_epoch, start_epoch + 1, start_batch)] if start_batch else []
    if start_epoch + bool(start_batch) < epochs:
        segments.append((start_epoch + bool(start_batch), epochs, 0))

    before = saved.history.get("loss", []) if saved else []  # the divergence guard sees the whole run
    nan_guard = dl_callbacks.NaNGuard(reference=before[0] if before else None, epoch_losses=before)
    stateful = loop_parts.stateful_callbacks(optimizer_config, early_stopping)
    run_callbacks = [
        *callbacks, *stateful, dl_callbacks.LearningRateLogger(steps_per_epoch=steps), nan_guard,
        dl_callbacks.EpochProgress.for_batches(train.element_spec, global_batch_size),  # a line every 30 s in a log
        *loop_parts.run_callbacks(paths, epochs=epochs, resume=resume, initial_epoch=initial_epoch,
                        best_checkpoint=best_checkpoint),
    ]
    if monitors:
        run_callbacks += _monitor_callbacks(monitors, train, paths, run_dir, steps_per_epoch)
    if resume:  # early stopping and the plateau schedule count the epochs before the interruption
        run_callbacks.insert(len(callbacks) + len(stateful),
                             checkpoints.HistoryReplay(stateful, rundir.read_history(paths["history"])))

    epochs_run, history, logged = 0, None, saved.history if saved else {}
    try:
        for index, (first, end, skip) in enumerate(segments):
            resumer = [] if checkpoint_every is None else [checkpoints.ResumeCheckpoint(
                store, every=checkpoint_every if order else 0, saved=saved if index == 0 else None, batch_offset=skip,
                element_spec=train.element_spec, history=logged)]
            history = model.fit(
                order.stream(first, end, skip) if order else train, validation_data=validation, epochs=end,
                initial_epoch=first, steps_per_epoch=steps - skip if order else None,
                callbacks=[*run_callbacks, *resumer],  # the checkpoint last: after the epoch's history row
                shuffle=False,  # tf.data shuffles
                verbose=(1 if sys.stdout.isatty() else 2) if verbose is None else verbose,
            )
            epochs_run += len(history.history.get("loss", []))
            logged = resumer[0].history if resumer else logged
            for callback in run_callbacks:  # the next segment appends to history.csv
                if isinstance(callback, keras.callbacks.CSVLogger):
                    callback.append = True
            if nan_guard.message or model.stop_training:
                break
    except BaseException:  # Ctrl-C included: the checkpoint being written goes to disk whole first
        with contextlib.suppress(Exception):
            store.wait()
        raise
    if checkpoint_every is not None and not nan_guard.message:
        store.mark_finished(epochs_run)
    full_history = rundir.read_history(paths["history"]) or (history.history if history else {})
    full_history.pop("epoch", None)
    return loop_parts.FitResult(
        history=full_history,
        stopped_reason=nan_guard.message,
        best_checkpoint=paths["best"] if os.path.exists(paths["best"]) else None,
        epochs_run=epochs_run,
    )


def compile_model(model, *, strategy, optimizer_config, loss, metrics, steps_per_epoch, epochs, jit_compile="auto"):
    """Compiles `model` with the optimizer and schedule of `optimizer_config`;
    returns the optimizer."""
    with strategy.scope():
        optimizer = optim.make_optimizer(optimizer_config, steps_per_epoch=steps_per_epoch, epochs=epochs)
        # A list of lists gives each output of a multi-output model its own.
        model.compile(optimizer=optimizer, loss=loss, metrics=list(metrics), jit_compile=jit_compile)
    return optimizer


def _monitor_callbacks(names, train, paths, run_dir, steps_per_epoch):
    """--monitor: the monitors, measuring about 4 times an epoch (at most
    every 100 batches) on the first training batch, held."""
    sample = next(iter(train))
    every = max(1, min(100, steps_per_epoch // 4))
    return dl_callbacks.make_monitors(
        names, sample=sample, log_dir=os.path.join(paths["tensorboard"], "monitors"), every=every,
        summary_path=os.path.join(os.fspath(run_dir), "monitors.json"),
    )


def release_worker_dir(run_dir):
    """A non-chief worker's scratch run directory, and its empty
    `workertemp_<id>` parent, removed once training is over."""
    run_dir = pathlib.Path(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        run_dir.parent.rmdir()


def report_stop(result, run_dir):
    """Records and prints why training stopped early (a NaN or diverging
    loss, `cause` "nan" or "divergence"); returns the exit status 1. The best
    checkpoint written so far stays; nothing is exported."""
    rundir.write_json(pathlib.Path(run_dir) / "metrics.json", {
        "status": "stopped", "cause": dl_callbacks.nan_guard.stop_cause(result.stopped_reason),
        "reason": result.stopped_reason, "best_checkpoint": result.best_checkpoint,
    })
    kept = f"; the last good model is {result.best_checkpoint}" if result.best_checkpoint else ""
    print(f"dlsuite: training stopped: {result.stopped_reason}{kept}", file=sys.stderr)
    return 1


def final_model(result, model):
    """The model that validated best, loaded outside the strategy (a
    multi-worker model would need every worker for predict()); without a
    checkpoint, a plain copy of the trained one."""
    if result.best_checkpoint:
        return keras.saving.load_model(result.best_checkpoint)
    weights, copy = model.get_weights(), keras.models.clone_model(model)
    copy.set_weights(weights)
    return copy


