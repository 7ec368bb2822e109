"""GPU check: the paths that only run on a GPU, each run once (issue 27, item 6).

No GPU had been lent to this project when this was written, so none of these
had ever run: mixed float16 in classify, lm and caption; the cuDNN LSTM/GRU
kernels against the fused CPU layers; MirroredStrategy on the GPU; `dlsuite
diagnose memory` against the allocator's own peak; ResNet-50 images/s and its
FLOP/s utilisation (MFU).

    python -m benchmarks.gpu_check                  # every check: under 8 minutes on one H100
    python -m benchmarks.gpu_check --part resnet50  # only this check (repeatable)
    python -m benchmarks --only gpu_check           # the same through the runner

Without a GPU it prints one line saying so and exits 0. `--quick` (the test
suite's pass over every benchmark) prints one line and runs nothing: the
checks take minutes of a GPU.

The checks, in this order (the ones that start their own TensorFlow first, while
this process holds no GPU memory), each within its own budget of seconds and
all within `TOTAL_SECONDS`; each prints `ok: <check>: ...` or `FAILED: <check>:
<why>` (the traceback on stderr) and the next one runs:

* classify_mixed: `dlsuite classify train --mixed-precision on` (LeNet-5 on the
  bundled digits, 3 epochs): config.json records mixed_float16 on the GPU, test
  accuracy >= 0.8, the export is written.
* lm_mixed: `dlsuite lm train --mixed-precision on`, a 2x256 char LSTM on 500k
  characters, 3 epochs: perplexity below the unigram's, then `dlsuite lm
  generate` samples from the float16 export.
* caption_mixed: `dlsuite caption train --mixed-precision on` on 800 generated
  scenes, 3 epochs: validation loss falls, BLEU is scored, the export is written.
* mirrored: `dlsuite classify train --strategy mirrored`: one replica per GPU.
* memory: `dlsuite diagnose memory resnet50` (224x224, batch 32, momentum)
  against `tf.config.experimental.get_memory_info("GPU:0")["peak"]` of the same
  model, optimizer and batch trained in another fresh process.
* cudnn_rnn: training tokens/s of the lm app's 2x512 LSTM and GRU (batch 64 x
  100) on the GPU, where Keras's cuDNN kernels run (checked: the traced step
  holds CudnnRNN ops), against the fused CPU layers in a process that sees no GPU.
* matmul: float16, bfloat16 and float32 (TF32 where TensorFlow enables it) matmul
  TFLOP/s: the practical peak the utilisation is taken against.
* resnet50: keras.applications.ResNet50(weights=None) training images/s at batch
  64, 224x224, mixed_float16 against float32, interleaved, with MFU = 3 x forward
  FLOPs x images/s over the matmul peak of the compute dtype.

Rows (memory, cudnn_rnn, matmul, resnet50) go to benchmarks/RESULTS.md with the
GPU's name, as `python -m benchmarks` writes them; run directly, this script
writes them there itself. Exit status 1 if any check failed.
"""

import contextlib
import csv
import dataclasses
import gc
import json
import math
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

from benchmarks import common

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The 8 minutes on one H100, less TensorFlow's start and writing the table.
TOTAL_SECONDS = 450
MIN_CHECK_SECONDS = 10  # a check left less than this of the total is not started
MIB = 2**20
CLI = [sys.executable, "-c", "import sys; from dlsuite.apps.cli import main; sys.exit(main())"]
CHILD_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2"}
QUICK_LINE = ("gpu_check: --quick runs no GPU check (they take minutes); run `python -m benchmarks.gpu_check` "
              "on a machine with a GPU")

MIN_DIGITS_ACCURACY = 0.8  # LeNet-5 on the digits reaches 0.90 after 2 epochs on CPU (chance: 0.1)
# Forward, then backward for the activations' and for the weights' gradients, each about a forward.
TRAINING_FLOPS_PER_FORWARD = 3
RNN = {"units": 512, "layers": 2, "embedding": 64, "batch": 64, "seq_len": 100, "vocab_size": 98}
RNN_CELLS = ("lstm", "gru")
GPU_RNN_STEPS = 20  # steps per timed repeat on the GPU (one on the CPU, where a step takes ~0.5 s)
MATMUL = {"n": 8192, "chain": 8}  # 8.8 TFLOP a call: tens of ms even at an H100's float16 rate
MATMUL_DTYPES = ("float16", "bfloat16", "float32")
RESNET = {"batch": 64, "image_size": 224, "classes": 1000, "steps_per_repeat": 20}
# The matmul dtype a policy's convolutions and matmuls compute in.
POLICY_DTYPES = {"mixed_float16": "float16", "float32": "float32"}
MEMORY = {"name": "resnet50", "input_shape": (224, 224, 3), "batch_size": 32, "optimizer": "momentum"}


class CheckFailed(Exception):
    """A check ran and found something wrong, or ran out of time."""


@dataclasses.dataclass
class Run:
    """What the checks of one run share."""

    device: str  # the GPU's name
    gpus: int
    work: pathlib.Path  # scratch: run directories and exports, removed at the end
    mode: str = "full"
    deadline: float = math.inf  # time.monotonic() by which the current check must end
    matmul: dict = dataclasses.field(default_factory=dict)  # dtype -> [FLOP/s per repeat]

    def seconds_left(self):
        return max(1.0, self.deadline - time.monotonic())


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    run: object  # (Run) -> (one line, [result rows])
    budget: float  # seconds


# --- running the checks ------------------------------------------------------------------------


def utilisation(forward_flops, items_per_second, peak_flops):
    """Model FLOP/s utilisation: training FLOPs per second over the peak FLOP/s."""
    return TRAINING_FLOPS_PER_FORWARD * forward_flops * items_per_second / peak_flops


def no_gpu_line(visible_devices, built_with_cuda):
    """The one line printed where TensorFlow sees no GPU."""
    shown = "unset" if visible_devices is None else repr(visible_devices)
    return (f"gpu_check: no GPU visible to TensorFlow (CUDA_VISIBLE_DEVICES={shown}, "
            f"tf.test.is_built_with_cuda()={built_with_cuda}); nothing to check")


@contextlib.contextmanager
def _deadline(seconds):
    """Raises CheckFailed in this (the main) thread once `seconds` have passed; a TensorFlow
    call already running (a compilation) finishes first."""
    def expire(signum, frame):
        raise CheckFailed(f"over its budget of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _one_line(error):
    text = str(error).strip().splitlines()
    message = text[0] if text else ""
    return message if isinstance(error, CheckFailed) else f"{type(error).__name__}: {message}"


def run_checks(checks, run, *, total=TOTAL_SECONDS):
    """Runs `checks` in order, each within its budget and what is left of `total` seconds.

    Prints one line per check: `ok: NAME: ...` or `FAILED: NAME: why` (with the
    traceback on stderr); a failure does not stop the checks after it.

    Returns:
        (the result rows the checks reported, the names of those that failed).
    """
    start = time.monotonic()
    rows, failed = [], []
    for check in checks:
        left = total - (time.monotonic() - start)
        if left < MIN_CHECK_SECONDS:
            failed.append(check.name)
            print(f"FAILED: {check.name}: not started, the run's {total:.0f} s are spent", flush=True)
            continue
        budget = min(check.budget, left)
        began = time.monotonic()
        run.deadline = began + budget
        try:
            with _deadline(budget):
                line, produced = check.run(run)
        except Exception as error:  # the check's own failure: reported, and the next check runs
            failed.append(check.name)
            traceback.print_exc()
            print(f"FAILED: {check.name}: {_one_line(error)}", flush=True)
            continue
        rows += produced
        print(f"ok: {check.name}: {line} ({time.monotonic() - began:.0f} s)", flush=True)
    return rows, failed


# --- child processes ---------------------------------------------------------------------------


def _start(command, env=None):
    """A child process in its own session, so that ending it ends its children too."""
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, **CHILD_ENV, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(process, *, what, timeout):
    """The stdout of `process` once it exits 0; CheckFailed with the last line of its stderr otherwise."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(process)
        raise CheckFailed(f"`{what}` took over {timeout:.0f} s") from None
    except BaseException:  # the check's deadline or ^C: the child and its own children go too
        _kill(process)
        raise
    if process.returncode != 0:
        lines = [line for line in err.splitlines() if line.strip()]
        raise CheckFailed(f"`{what}` exited with status {process.returncode}: "
                          f"{lines[-1].strip() if lines else 'no message'}")
    return out


def _kill(process):
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.communicate()


def _dlsuite(run, *args):
    """Runs `dlsuite ARGS` in a fresh process; returns its stdout."""
    what = "dlsuite " + " ".join(args)
    return _finish(_start(CLI + list(args)), what=what, timeout=run.seconds_left() - 2)


def _worker(function, spec=None, env=None):
    """Starts `gpu_check.FUNCTION(spec)` in a fresh process."""
    code = f"import json, sys; from benchmarks import gpu_check; gpu_check.{function}(json.loads(sys.argv[1]))"
    return _start([sys.executable, "-c", code, json.dumps(spec or {})], env=env)


def _last_json(out, what):
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise CheckFailed(f"{what} printed no JSON line")


def _run_files(run_dir):
    """(config.json's resolved part, metrics.json) of a finished app run."""
    resolved = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))["resolved"]
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    if metrics.get("status") != "finished":
        raise CheckFailed(f"the run stopped: {metrics.get('status')}: {metrics.get('reason', metrics)}")
    if resolved["device"] != "gpu":
        raise CheckFailed(f"config.json records device {resolved['device']!r}, not the GPU")
    return resolved, metrics


def _expect_policy(resolved, policy):
    if resolved["policy"] != policy:
        raise CheckFailed(f"config.json records policy {resolved['policy']!r}, not {policy!r}")


def _expect(condition, message):
    if not condition:
        raise CheckFailed(message)


# --- the app checks (each its own process) -------------------------------------------------------


def check_classify_mixed(run):
    out = run.work / "classify_mixed"
    _dlsuite(run, "classify", "train", "--mixed-precision", "on", "--epochs", "3", "--batch-size", "32",
             "--out", str(out), "--export-dir", str(run.work / "exports"))
    resolved, metrics = _run_files(out)
    _expect_policy(resolved, "mixed_float16")
    accuracy = metrics["test_accuracy"]
    _expect(accuracy >= MIN_DIGITS_ACCURACY, f"test accuracy {accuracy:.3f} < {MIN_DIGITS_ACCURACY} under mixed_float16")
    _expect(metrics["export"] and pathlib.Path(metrics["export"]).exists(), f"no export at {metrics['export']!r}")
    return (f"lenet5 on digits, {resolved['policy']}, {resolved['strategy']}: test accuracy {accuracy:.3f} after "
            f"{metrics['epochs_run']} epochs; exported"), []


def check_lm_mixed(run):
    out = run.work / "lm_mixed"
    _dlsuite(run, "lm", "train", "--mixed-precision", "on", "--max-chars", "500000", "--layers", "2", "--units", "256",
             "--epochs", "3", "--out", str(out), "--export-dir", str(run.work / "exports"))
    resolved, metrics = _run_files(out)
    _expect_policy(resolved, "mixed_float16")
    perplexity, unigram = metrics["validation_perplexity"], metrics["unigram_perplexity"]
    _expect(math.isfinite(perplexity) and perplexity < unigram,
            f"validation perplexity {perplexity:.2f} is not below the unigram's {unigram:.2f}")
    _expect(metrics["export"], "no export")
    text = _dlsuite(run, "lm", "generate", metrics["export"], "--prompt", "The ", "--length", "100", "--seed", "1")
    _expect(len(text.strip()) >= 20, f"`lm generate` on the float16 export printed {text!r}")
    return (f"2x256 char LSTM, {resolved['policy']}: validation perplexity {perplexity:.2f} (unigram {unigram:.2f}), "
            f"{metrics['bits_per_character']:.3f} bits/char; generated {text.strip()[:40]!r}..."), []


def check_caption_mixed(run):
    out = run.work / "caption_mixed"
    _dlsuite(run, "caption", "train", "--mixed-precision", "on", "--scenes-count", "800", "--epochs", "3",
             "--out", str(out), "--export-dir", str(run.work / "exports"))
    resolved, metrics = _run_files(out)
    _expect_policy(resolved, "mixed_float16")
    with open(out / "history.csv", encoding="utf-8", newline="") as file:
        losses = [float(row["val_loss"]) for row in csv.DictReader(file)]
    _expect(all(map(math.isfinite, losses)) and losses[-1] < losses[0],
            f"validation loss did not fall: {losses}")
    _expect(math.isfinite(metrics["bleu4"]), f"BLEU-4 is {metrics['bleu4']}")
    _expect(metrics["export"] and pathlib.Path(metrics["export"]).exists(), f"no export at {metrics['export']!r}")
    return (f"{resolved['encoder']} + lstm on {resolved['sizes']['train']} scenes, {resolved['policy']}: validation loss "
            f"{losses[0]:.3f} -> {losses[-1]:.3f}, test BLEU-1 {metrics['bleu1']:.3f}, BLEU-4 {metrics['bleu4']:.3f}; "
            "exported"), []


def check_mirrored(run):
    out = run.work / "mirrored"
    _dlsuite(run, "classify", "train", "--strategy", "mirrored", "--mixed-precision", "off", "--epochs", "3",
             "--batch-size", "32", "--out", str(out), "--no-export")
    resolved, metrics = _run_files(out)
    _expect(resolved["strategy"] == "MirroredStrategy", f"config.json records strategy {resolved['strategy']!r}")
    _expect(resolved["replicas"] == run.gpus, f"{resolved['replicas']} replicas on {run.gpus} GPUs")
    accuracy = metrics["test_accuracy"]
    _expect(accuracy >= MIN_DIGITS_ACCURACY, f"test accuracy {accuracy:.3f} < {MIN_DIGITS_ACCURACY}")
    return (f"lenet5 on digits, MirroredStrategy over {resolved['replicas']} GPU(s): test accuracy {accuracy:.3f}"), []


# --- memory: the estimate and `diagnose memory` against the allocator's peak ---------------------


def check_memory(run):
    name, shape, batch, optimizer = (MEMORY[key] for key in ("name", "input_shape", "batch_size", "optimizer"))
    command = ["diagnose", "memory", name, "--input-shape", ",".join(map(str, shape)), "--batch-size", str(batch),
               "--optimizer", optimizer, "--json"]
    # Both measure in fresh processes, side by side: each reads its own allocator's counters, and
    # with memory growth neither takes the GPU's memory from the other.
    growth = {"TF_FORCE_GPU_ALLOW_GROWTH": "true"}
    diagnose = _start(CLI + command, env=growth)
    peak_process = _worker("peak_worker", MEMORY, env=growth)
    try:
        diagnosed = _last_json(_finish(diagnose, what="dlsuite " + " ".join(command), timeout=run.seconds_left() - 2),
                               "diagnose memory --json")
        peak = _last_json(_finish(peak_process, what="peak_worker", timeout=run.seconds_left() - 2), "peak_worker")
    finally:
        for process in (diagnose, peak_process):
            if process.poll() is None:
                _kill(process)
    meter = diagnosed["measured"]["meter"]
    _expect(meter.startswith("TensorFlow allocator"), f"diagnose memory read {meter!r}, not the GPU's allocator")
    estimate = diagnosed["estimate"]["total"] / MIB
    measured = diagnosed["measured"]["total"] / MIB
    peaks = [value / MIB for value in peak["peaks"]]
    shape_text = "x".join(map(str, shape))
    row = common.report(
        f"gpu_memory_{name}_b{batch}", ours=[estimate] * len(peaks), reference=peaks, mode=run.mode, unit="MiB",
        config={**MEMORY, "jit_compile": peak["jit_compile"], "measured_steps": len(peaks)},
        device=run.device,
        estimate_mib={key: value / MIB for key, value in diagnosed["estimate"].items()},
        diagnose_measured_mib={key: value / MIB for key, value in diagnosed["measured"].items() if key != "meter"}
        | {"steps": [value / MIB for value in diagnosed["measured"]["steps"]]},
        warmup_peak_mib=peak["warmup_peak"] / MIB,
        details=(f"diagnose memory measured {measured:.0f} MiB (weights + slots + step peak, {meter}); the allocator's "
                 f"peak over a whole step {statistics.median(peaks):.0f} MiB, {peak['warmup_peak'] / MIB:.0f} MiB "
                 "including the warm-up step's compilation"),
        ours_label=f"estimate: `dlsuite models show {name} --input-shape {','.join(map(str, shape))} --batch-size "
                   f"{batch} --optimizer {optimizer}`, total (as `dlsuite diagnose memory --json` prints it)",
        reference_label=("tf.config.experimental.get_memory_info('GPU:0')['peak'] over one training step "
                         "(reset before it), after a warm-up step, in a fresh process: everything allocated at the "
                         "step's peak, the input batch included"),
    )
    return (f"{name} {shape_text} batch {batch} {optimizer}: estimate {estimate:.0f} MiB, diagnose memory measured "
            f"{measured:.0f} MiB, allocator peak {statistics.median(peaks):.0f} MiB (estimate / peak "
            f"{row['ratio']:.2f})"), [row]


def peak_worker(spec):
    """In a fresh process: the allocator's peak over training steps of registry model `spec["name"]`.

    Builds and compiles the model as `diagnose memory` does, runs one warm-up
    step, then resets the peak before each of `common.MIN_REPEATS` steps and
    reads it after; prints one JSON line.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    from dlsuite import models
    from dlsuite.apps.core import optim

    keras.utils.set_random_seed(0)
    shape, batch = tuple(spec["input_shape"]), spec["batch_size"]
    model = models.get(spec["name"]).builder(input_shape=shape)
    classes = model.output_shape[-1]
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 1, (batch, *shape)).astype("float32"))
    labels = tf.constant(rng.integers(0, classes, batch).astype("int32"))
    model.compile(
        optimizer=optim.make_optimizer(optim.OptimizerConfig(optimizer=spec["optimizer"]), steps_per_epoch=1, epochs=1),
        loss=keras.losses.SparseCategoricalCrossentropy(),
    )
    model.train_on_batch(images, labels)
    warmup_peak = tf.config.experimental.get_memory_info("GPU:0")["peak"]
    peaks = []
    for _ in range(common.MIN_REPEATS):
        tf.config.experimental.reset_memory_stats("GPU:0")
        model.train_on_batch(images, labels)
        peaks.append(tf.config.experimental.get_memory_info("GPU:0")["peak"])
    print(json.dumps({"peaks": peaks, "warmup_peak": warmup_peak, "jit_compile": bool(model.jit_compile)}), flush=True)


# --- cuDNN recurrent kernels against the fused CPU layers ---------------------------------------


def _rnn_model(cell):
    """The lm app's model (FusedLSTM / FusedGRU layers), compiled as `lm_speed` compiles it."""
    import keras

    from dlsuite import models

    model = models.build(cell, vocab_size=RNN["vocab_size"], units=RNN["units"], layers=RNN["layers"],
                         embedding_dim=RNN["embedding"], classifier_activation=None)
    model.compile(optimizer=keras.optimizers.Adam(0.003, global_clipnorm=5.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _rnn_trainer(model, *, steps):
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (RNN["batch"], RNN["seq_len"])
    x = rng.integers(2, RNN["vocab_size"], shape).astype("int32")
    y = rng.integers(2, RNN["vocab_size"], shape).astype("int32")

    def run():
        for _ in range(steps):
            loss = model.train_on_batch(x, y)
        float(np.asarray(loss))
        return steps * x.size

    return run


def _cudnn_ops(model):
    """The CudnnRNN op types in `model`'s traced training-mode forward pass: none means Keras
    took its generic loop instead of the cuDNN kernel."""
    import tensorflow as tf

    @tf.function
    def forward(x):
        return model(x, training=True)

    graph = forward.get_concrete_function(tf.TensorSpec((RNN["batch"], RNN["seq_len"]), tf.int32)).graph
    types = {op.type for op in graph.get_operations()}
    types |= {node.op for function in graph.as_graph_def().library.function for node in function.node_def}
    return sorted(kind for kind in types if kind.startswith("CudnnRNN"))


def cpu_rnn_worker(spec):
    """In a process that sees no GPU: training tokens/s of the fused CPU layers, one step a repeat."""
    from dlsuite.apps.core import engine
    from dlsuite.apps.lm.task import LanguageModelTask

    # As `dlsuite lm` sets TensorFlow up on this machine's cores, before its first op.
    engine.set_intra_op_threads(LanguageModelTask.intra_op_threads())
    import tensorflow as tf

    if tf.config.list_logical_devices("GPU"):
        raise SystemExit("cpu_rnn_worker: a GPU is visible; run it with CUDA_VISIBLE_DEVICES=''")
    rates = {cell: common.interleaved({cell: _rnn_trainer(_rnn_model(cell), steps=1)}, warmup=1,
                                      repeats=common.MIN_REPEATS)[cell] for cell in spec["cells"]}
    print(json.dumps({"rates": rates, "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
                      **common.machine()}), flush=True)


def check_cudnn_rnn(run):
    import keras

    cpu = _last_json(_finish(_worker("cpu_rnn_worker", {"cells": RNN_CELLS}, env={"CUDA_VISIBLE_DEVICES": ""}),
                             what="cpu_rnn_worker", timeout=run.seconds_left() - 2), "cpu_rnn_worker")
    shape = f"{RNN['layers']}x{RNN['units']}"
    config = {**RNN, "gpu_steps_per_repeat": GPU_RNN_STEPS, "cpu_steps_per_repeat": 1,
              "optimizer": "Adam(0.003, global_clipnorm=5)", "policy": "float32",
              "sides": "one after the other, in two processes (not interleaved)"}
    rows, parts = [], []
    for cell in RNN_CELLS:
        model = _rnn_model(cell)
        kernels = _cudnn_ops(model)
        _expect(kernels, f"{cell}: the traced forward pass holds no CudnnRNN op: Keras ran its generic loop on the GPU")
        gpu = common.interleaved({"gpu": _rnn_trainer(model, steps=GPU_RNN_STEPS)}, warmup=1,
                                 repeats=common.MIN_REPEATS)["gpu"]
        row = common.report(
            f"gpu_cudnn_{cell}_{shape}_vs_fused_cpu", ours=gpu, reference=cpu["rates"][cell], mode=run.mode,
            unit="tokens/s", config=config, device=run.device, cudnn_ops=kernels,
            cpu_side={key: cpu[key] for key in ("cores", "cpu", "intra_op_threads")},  # "cpu" is the machine's
            ours_label=f"the lm app's model (models.build({cell!r}), {shape}, embedding 64) on {run.device}: "
                       "Keras's cuDNN kernel, train_on_batch",
            reference_label=(f"the same model in a process that sees no GPU, on {cpu['cores']} CPU cores: the fused "
                             f"CPU loop (FusedLSTM/FusedGRU), intra-op threads {cpu['intra_op_threads']} as `dlsuite "
                             "lm` sets them"),
            details=f"cuDNN ops {', '.join(kernels)}; CPU {cpu['cpu']}",
        )
        rows.append(row)
        parts.append(f"{cell} {row['ours']:,.0f} vs {row['reference']:,.0f} tokens/s ({row['ratio']:.1f}x)")
        del model
        keras.backend.clear_session()
        gc.collect()
    return f"{shape}, batch {RNN['batch']} x {RNN['seq_len']}, cuDNN against the fused CPU layers: " + "; ".join(parts), rows


# --- matmul peak and ResNet-50 ----------------------------------------------------------------------


def _matmul_peaks(run):
    """{dtype: the best matmul FLOP/s}, measured once per run."""
    for dtype in MATMUL_DTYPES:
        if dtype not in run.matmul:
            run.matmul[dtype] = common.matmul_rates(**MATMUL, dtype=dtype)
    return {dtype: max(samples) for dtype, samples in run.matmul.items()}


def check_matmul(run):
    import tensorflow as tf

    peaks = _matmul_peaks(run)
    tf32 = tf.config.experimental.tensor_float_32_execution_enabled()
    tflops = {dtype: [rate / 1e12 for rate in samples] for dtype, samples in run.matmul.items()}
    n, chain = MATMUL["n"], MATMUL["chain"]
    row = common.report(
        "gpu_matmul_float16_vs_float32", ours=tflops["float16"], reference=tflops["float32"], mode=run.mode,
        unit="TFLOP/s", config={**MATMUL, "tensor_float_32": tf32}, device=run.device,
        peak_tflops={dtype: peak / 1e12 for dtype, peak in peaks.items()},
        bfloat16_samples=tflops["bfloat16"],
        details="best: " + ", ".join(f"{dtype} {peak / 1e12:.0f}" for dtype, peak in peaks.items())
        + f" TFLOP/s (float32 {'with' if tf32 else 'without'} TF32)",
        ours_label=f"float16: {chain} dependent ({n}, {n}) matmuls in one tf.function",
        reference_label=f"the same in float32 ({'TF32 tensor cores, TensorFlow default' if tf32 else 'no TF32'})",
    )
    return "best " + ", ".join(f"{dtype} {peak / 1e12:.0f}" for dtype, peak in peaks.items()) + " TFLOP/s", [row]


def check_resnet50(run):
    import keras
    import tensorflow as tf

    from dlsuite.models import summary

    peaks = _matmul_peaks(run)
    size, batch, classes, steps = (RESNET[key] for key in ("image_size", "batch", "classes", "steps_per_repeat"))
    images = tf.random.stateless_uniform((batch, size, size, 3), seed=(0, 1))
    labels = tf.random.stateless_uniform((batch,), seed=(0, 2), maxval=classes, dtype=tf.int32)
    models = {}
    for policy in POLICY_DTYPES:
        keras.mixed_precision.set_global_policy(policy)  # read when the layers are built
        try:
            keras.utils.set_random_seed(0)
            model = keras.applications.ResNet50(weights=None, input_shape=(size, size, 3), classes=classes)
        finally:
            keras.mixed_precision.set_global_policy("float32")
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9),
                      loss=keras.losses.SparseCategoricalCrossentropy())
        models[policy] = model

    def trainer(model):
        def train():
            for _ in range(steps):
                model.train_on_batch(images, labels)  # returns the loss as a number: the step is done
            return steps * batch
        return train

    rates = common.interleaved({policy: trainer(model) for policy, model in models.items()}, warmup=1,
                               repeats=common.MIN_REPEATS)
    forward = summary.flops(models["float32"])
    mfu = {policy: utilisation(forward, statistics.median(rates[policy]), peaks[dtype])
           for policy, dtype in POLICY_DTYPES.items()}
    row = common.report(
        f"gpu_resnet50_b{batch}_mixed_vs_float32", ours=rates["mixed_float16"], reference=rates["float32"],
        mode=run.mode, config={**RESNET, "optimizer": "SGD(0.01, momentum=0.9)",
                               "step": "model.train_on_batch on synthetic tensors in GPU memory",
                               "jit_compile": {policy: model.jit_compile for policy, model in models.items()}},
        device=run.device, forward_gflops_per_image=forward / 1e9,
        matmul_peak_tflops={dtype: peaks[dtype] / 1e12 for dtype in POLICY_DTYPES.values()},
        utilisation=mfu,
        details=(f"MFU: mixed_float16 {mfu['mixed_float16']:.0%} of the float16 matmul's "
                 f"{peaks['float16'] / 1e12:.0f} TFLOP/s, float32 {mfu['float32']:.0%} of the float32 matmul's "
                 f"{peaks['float32'] / 1e12:.0f}; {TRAINING_FLOPS_PER_FORWARD} x {forward / 1e9:.1f} GFLOPs an image"),
        ours_label="keras.applications.ResNet50(weights=None) built under mixed_float16 (LossScaleOptimizer)",
        reference_label="the same built under float32",
    )
    del models
    keras.backend.clear_session()
    gc.collect()
    return (f"batch {batch}, {size}x{size}: mixed_float16 {row['ours']:,.0f} images/s (MFU {mfu['mixed_float16']:.0%}), "
            f"float32 {row['reference']:,.0f} images/s (MFU {mfu['float32']:.0%})"), [row]


# Own-process checks first: until cudnn_rnn, this process holds no GPU memory.
CHECKS = (
    Check("classify_mixed", check_classify_mixed, budget=75),
    Check("lm_mixed", check_lm_mixed, budget=90),
    Check("caption_mixed", check_caption_mixed, budget=90),
    Check("mirrored", check_mirrored, budget=60),
    Check("memory", check_memory, budget=120),
    Check("cudnn_rnn", check_cudnn_rnn, budget=90),
    Check("matmul", check_matmul, budget=30),
    Check("resnet50", check_resnet50, budget=150),
)


def main(argv=None):
    args = common.parse_args(__doc__.splitlines()[0], argv, parts=tuple(check.name for check in CHECKS))
    if args.quick:
        print(QUICK_LINE, flush=True)
        return 0
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        print(no_gpu_line(os.environ.get("CUDA_VISIBLE_DEVICES"), tf.test.is_built_with_cuda()), flush=True)
        return 0
    for gpu in gpus:  # this process takes only what it uses: the checks' own processes need the rest
        tf.config.experimental.set_memory_growth(gpu, True)
    device = tf.config.experimental.get_device_details(gpus[0]).get("device_name", gpus[0].name)
    print(f"gpu_check: {len(gpus)} x {device}; checks: {', '.join(args.part)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as work:
        run = Run(device=device, gpus=len(gpus), work=pathlib.Path(work))
        rows, failed = run_checks([check for check in CHECKS if check.name in args.part], run)
    from benchmarks import __main__ as runner

    if rows and runner.RUNNER_ENV not in os.environ:  # run alone: write the table (the runner writes its own)
        complete = not failed and len(args.part) == len(CHECKS)
        runner.write_results(rows, completed={("gpu_check", run.mode)} if complete else ())
    if failed:
        print(f"gpu_check: {len(failed)} of {len(args.part)} checks failed: {', '.join(failed)}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
