"""bfloat16 on a CPU that computes it natively (issue 28): training and serving
in float32 and in `mixed_bfloat16`, side by side in one run, against Keras in
float32 and PyTorch 2.13 in float32 and under `torch.autocast("cpu",
dtype=torch.bfloat16)` (channels_last for the CNNs).

Parts (`--part`, default all):

* `cnn`: training images/s of the registry's ResNet-50 and VGG-16
  (`model.train_on_batch`, SGD with momentum, synthetic tensors, as
  train_throughput) in both policies, against keras.applications in float32
  and PyTorch. Rows `train_{model}_bf16_vs_keras_f32` (bar 1.4 for
  ResNet-50), `train_{model}_bf16_vs_torch` (against PyTorch's faster side,
  bar 1.0 for ResNet-50) and `train_{model}_bf16_vs_f32`. Each row gives
  each side's model FLOP/s utilisation (MFU) against the bfloat16 matmul peak
  measured in the same run.
* `rnn`: training tokens/s of the lm app's 2x512 LSTM and GRU (FusedLSTM,
  FusedGRU; batch 64 x 100, as lm_speed) in both policies, against PyTorch's
  nn.LSTM / nn.GRU in float32 and under autocast. Rows
  `train_{cell}_2x512_bf16_vs_f32` (bar 1.2 for the LSTM: "1.2x today's
  figure") and `train_{cell}_2x512_bf16_vs_torch_autocast` (bar 1.0). Runs
  in a process of its own with TensorFlow's threads as `dlsuite lm` sets them.
* `serving`: the classify app's ResNet-50 export (224 px, 1000 classes),
  `serving_default` called with a uint8 batch of 1 and of 32, its graph in
  float32 and in bfloat16 (the same weights), against PyTorch's inference in
  float32 and under autocast. Rows `serve_resnet50_b{N}_bf16_vs_f32` and
  `serve_resnet50_b{N}_bf16_vs_torch`, with how far the bfloat16 graph's
  probabilities are from the float32 graph's.

On a CPU without native bfloat16 the bfloat16 sides are emulated and slow:
the figures then say nothing about this issue, and the run says so first.

    python -m benchmarks.bfloat16 [--quick] [--part cnn|rnn|serving]
"""

import contextlib
import functools
import statistics
import subprocess
import sys
import tempfile

import numpy as np

from benchmarks import common, torch_reference

LEARNING_RATE = 0.01
MOMENTUM = 0.9
TRAINING_FLOPS_PER_FORWARD = 3  # forward, then the activations' and the weights' gradients
BF16 = "mixed_bfloat16"

# Full sizes: ImageNet's for the CNNs, lm_speed's for the recurrent models. A ResNet-50 step takes
# about 3 s in float32 on 2 cores, a VGG-16 step about 9 s.
CNN = {"image_size": 224, "batch": 32, "classes": 1000, "warmup": 1, "repeats": 5}
QUICK_CNN = {"image_size": 32, "batch": 2, "classes": 10, "warmup": 1, "repeats": 5}
CNN_MODELS = ("resnet50", "vgg16")
QUICK_CNN_MODELS = ("vgg16",)
CNN_BARS = {"resnet50": {"keras_f32": 1.4, "torch": 1.0}}
RNN = {"units": 512, "batch": 64, "seq_len": 100, "warmup": 1, "repeats": 7}
QUICK_RNN = {"units": 32, "batch": 8, "seq_len": 20, "warmup": 1, "repeats": 5}
RNN_BARS = {"lstm": {"f32": 1.2, "torch": 1.0}, "gru": {"torch": 1.0}}
SERVING = {"model": "resnet50", "batches": {1: 4, 32: 1}, "repeats": 5}  # batch size -> calls per repeat
QUICK_SERVING = {"model": "lenet5", "batches": {1: 1, 4: 1}, "repeats": 5}
MATMUL_SIZE = {"full": 2048, "quick": 256}


def _native_bfloat16():
    from dlsuite.apps.core import cpu_features

    return cpu_features.bfloat16().native


@contextlib.contextmanager
def _built_under(policy):
    """Keras's global dtype policy `policy` inside the block, the previous one after: a model
    built inside keeps `policy`."""
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _compiled_cnn(build):
    import keras

    model = build()
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=LEARNING_RATE, momentum=MOMENTUM),
                  loss=keras.losses.SparseCategoricalCrossentropy())
    return model


def _utilisation(forward_flops, rate, peak):
    return TRAINING_FLOPS_PER_FORWARD * forward_flops * rate / peak


def _faster(rates, *sides):
    """The side among `sides` with the higher median rate."""
    return max(sides, key=lambda side: statistics.median(rates[side]))


def cnn_training(name, setting, *, mode, peaks):
    """Trains registry `name` in float32 and bfloat16, keras.applications in float32 and
    PyTorch in both, interleaved; reports the three rows."""
    import keras
    import tensorflow as tf

    from dlsuite import models
    from dlsuite.models import summary

    size, batch, classes = setting["image_size"], setting["batch"], setting["classes"]
    shape = (size, size, 3)
    reference_builder = {"resnet50": keras.applications.ResNet50, "vgg16": keras.applications.VGG16}[name]
    keras.utils.set_random_seed(0)
    sides = {}
    with _built_under("float32"):
        sides["ours_f32"] = _compiled_cnn(lambda: models.build(name, input_shape=shape, classes=classes, weights=None))
        sides["keras_f32"] = _compiled_cnn(lambda: reference_builder(weights=None, input_shape=shape, classes=classes))
    with _built_under(BF16):
        sides["ours_bf16"] = _compiled_cnn(lambda: models.build(name, input_shape=shape, classes=classes, weights=None))
    if mode == "quick":
        common.build_optimizers(*sides.values())
    images = tf.random.stateless_uniform((batch, *shape), seed=(0, 1))
    labels = tf.random.stateless_uniform((batch,), seed=(0, 2), maxval=classes, dtype=tf.int32)

    def step(model):
        def run():
            model.train_on_batch(images, labels)  # returns the loss as a number: the step is done
            return batch
        return run

    runs = {side: step(model) for side, model in sides.items()}
    rates, torch_info = _interleaved_with_torch(runs, setting, "train_cnn", model=name, image_size=size, batch=batch,
                                                classes=classes)
    peaks["bfloat16"] += common.matmul_rates(n=MATMUL_SIZE[mode], dtype="bfloat16")
    peak = max(peaks["bfloat16"])
    flops = summary.flops(sides["ours_f32"])
    utilisation = {side: _utilisation(flops, statistics.median(samples), peak) for side, samples in rates.items()}
    config = {**setting, "model": name, "step": "train_on_batch / SGD(0.01, momentum 0.9), synthetic tensors",
              "matmul_peak": "bfloat16, best in the run"}
    fields = {"utilisation": utilisation, "bfloat16_matmul_peak_gflops": peak / 1e9,
              "forward_gflops_per_image": flops / 1e9,
              "medians": {side: statistics.median(samples) for side, samples in rates.items()}}
    mfu = ", ".join(f"{side} {share:.0%}" for side, share in utilisation.items())
    details = f"MFU against a {peak / 1e9:.0f} GFLOP/s bfloat16 matmul: {mfu}"
    ours_label = f"dlsuite models.build({name!r}) under mixed_bfloat16"
    bars = CNN_BARS.get(name, {})
    common.report(f"train_{name}_bf16_vs_keras_f32", ours=rates["ours_bf16"], reference=rates["keras_f32"],
                  mode=mode, bar=bars.get("keras_f32"), config=config, ours_label=ours_label,
                  reference_label=f"keras.applications.{reference_builder.__name__}(weights=None) in float32",
                  details=details, **fields)
    common.report(f"train_{name}_bf16_vs_f32", ours=rates["ours_bf16"], reference=rates["ours_f32"], mode=mode,
                  config=config, ours_label=ours_label, reference_label="the same model built in float32",
                  details=details, **fields)
    if torch_info is not None:
        torch_side = _faster(rates, "torch_float32", "torch_bfloat16")
        common.report(f"train_{name}_bf16_vs_torch", ours=rates["ours_bf16"], reference=rates[torch_side],
                      mode=mode, bar=bars.get("torch"), config={**config, **torch_info}, ours_label=ours_label,
                      reference_label=(f"PyTorch {name} (own process, channels_last), the faster of float32 and "
                                       f"autocast bfloat16: {torch_side.removeprefix('torch_')}"),
                      details=details, **fields)
    del sides
    keras.backend.clear_session()


def rnn_training(cell, setting, *, mode):
    """Trains the lm app's 2-layer model in float32 and bfloat16 and PyTorch's in both, interleaved."""
    import keras

    from benchmarks.lm_speed import VOCAB_CHARS, _app_model

    units, batch, seq_len = setting["units"], setting["batch"], setting["seq_len"]
    vocab_size = len(VOCAB_CHARS) + 2
    rng = np.random.default_rng(0)
    x = rng.integers(2, vocab_size, (batch, seq_len)).astype("int32")
    y = rng.integers(2, vocab_size, (batch, seq_len)).astype("int32")
    sides = {}
    for side, policy in (("ours_f32", "float32"), ("ours_bf16", BF16)):
        with _built_under(policy):
            keras.utils.set_random_seed(0)
            model = _app_model(cell, units=units, vocab_size=vocab_size)
        model.compile(optimizer=keras.optimizers.Adam(0.003, global_clipnorm=5.0),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        sides[side] = model
    if mode == "quick":
        common.build_optimizers(*sides.values())
    losses = {side: [] for side in sides}

    def step(side, model):
        def run():
            losses[side].append(float(model.train_on_batch(x, y)))
            return batch * seq_len
        return run

    runs = {side: step(side, model) for side, model in sides.items()}
    rates, torch_info = _interleaved_with_torch(runs, setting, "train", cell=cell, units=units, layers=2,
                                                vocab_size=vocab_size, tokens=x.tolist(), targets=y.tolist())
    shape = f"2x{units}"
    config = {**setting, "cell": cell, "optimizer": "Adam(0.003, global_clipnorm=5)",
              "step": "train_on_batch on one fixed batch"}
    # Both models start from the same weights and train on the same batch: their losses,
    # step by step, show what bfloat16 does to the numbers.
    fields = {"losses": losses, "medians": {side: statistics.median(samples) for side, samples in rates.items()}}
    details = (f"loss after {len(losses['ours_f32'])} steps on one batch: float32 {losses['ours_f32'][-1]:.4f}, "
               f"bfloat16 {losses['ours_bf16'][-1]:.4f}")
    ours_label = f"the lm app's {shape} {cell.upper()} (Fused{cell.upper()}) under mixed_bfloat16"
    bars = RNN_BARS[cell]
    common.report(f"train_{cell}_{shape}_bf16_vs_f32", ours=rates["ours_bf16"], reference=rates["ours_f32"],
                  mode=mode, unit="tokens/s", bar=bars.get("f32"), config=config, ours_label=ours_label,
                  reference_label="the same model in float32 (today's default on this CPU)", details=details,
                  **fields)
    if torch_info is not None:
        common.report(f"train_{cell}_{shape}_bf16_vs_torch_autocast", ours=rates["ours_bf16"],
                      reference=rates["torch_bfloat16"], mode=mode, unit="tokens/s", bar=bars.get("torch"),
                      config={**config, **torch_info}, ours_label=ours_label,
                      reference_label=f"PyTorch nn.{cell.upper()} (own process) under torch.autocast bfloat16",
                      torch_float32=statistics.median(rates["torch_float32"]), details=details, **fields)


def serving(setting, *, mode, folder):
    """The classify export's serving_default with its graph in float32 and in bfloat16, and PyTorch."""
    import keras
    import tensorflow as tf

    from benchmarks.serving_latency import MODELS, _classifier
    from dlsuite.apps.vision import export

    name = setting["model"]
    size, channels, classes = MODELS[name]
    class_names = [f"class_{i}" for i in range(classes)]
    model = _classifier(name)
    with _built_under(BF16):
        bf16_model = _classifier(name)
    bf16_model.set_weights(model.get_weights())
    signatures = {}
    for side, built in (("f32", model), ("bf16", bf16_model)):
        path = export.export_classifier(built, class_names=class_names, name=f"{name}_{side}", base_dir=folder)
        signatures[side] = tf.saved_model.load(str(path)).signatures["serving_default"]
    worker = torch_reference.TorchWorker.start(who="bfloat16") if channels == 3 else None
    config = {"model": name, "image_size": size, "classes": classes, "weights": "untrained (random init)",
              "repeats": setting["repeats"], "call": "signatures['serving_default'](images=uint8 batch)"}
    try:
        for batch, calls in setting["batches"].items():
            pixels = tf.constant(np.random.default_rng(batch).integers(0, 256, (batch, size, size, channels),
                                                                        dtype=np.uint8))
            answers = {side: signature(images=pixels)["probabilities"].numpy() for side, signature in signatures.items()}
            difference = float(np.abs(answers["bf16"] - answers["f32"]).max())
            same_top1 = float(np.mean(answers["bf16"].argmax(-1) == answers["f32"].argmax(-1)))

            def call(signature):
                def run():
                    for _ in range(calls):
                        signature(images=pixels)["probabilities"].numpy()
                    return calls * batch
                return run

            runs = {side: call(signature) for side, signature in signatures.items()}
            if worker is not None:
                worker.setup("predict_cnn", model=name, image_size=size, batch=batch, classes=classes)
                for precision in ("float32", "bfloat16"):
                    runs[f"torch_{precision}"] = functools.partial(worker.run, calls=calls, precision=precision)
            rates = common.interleaved(runs, warmup=1, repeats=setting["repeats"])
            row_config = {**config, "batch": batch, "calls_per_repeat": calls}
            latency = {side: 1000 * batch / statistics.median(samples) for side, samples in rates.items()}
            fields = {"latency_ms": latency, "max_abs_difference": difference, "same_top1": same_top1}
            details = (f"batch {batch}: " + ", ".join(f"{side} {ms:.1f} ms" for side, ms in latency.items())
                       + f"; bfloat16 graph's probabilities within {difference:.2g} of float32's, "
                         f"top-1 the same for {same_top1:.0%} (untrained weights, so this says little: "
                         f"docs/scaling.md has a trained model's accuracy both ways)")
            ours_label = f"the classify export of {name}, its graph in bfloat16 (built under mixed_bfloat16)"
            common.report(f"serve_{name}_b{batch}_bf16_vs_f32", ours=rates["bf16"], reference=rates["f32"],
                          mode=mode, config=row_config, ours_label=ours_label,
                          reference_label="the same export in float32 (the default)", details=details, **fields)
            if worker is not None:
                torch_side = _faster(rates, "torch_float32", "torch_bfloat16")
                common.report(f"serve_{name}_b{batch}_bf16_vs_torch", ours=rates["bf16"], reference=rates[torch_side],
                              mode=mode, config={**row_config, **worker.info}, ours_label=ours_label,
                              reference_label=(f"PyTorch {name} inference (own process, channels_last, "
                                               f"inference_mode), the faster: {torch_side.removeprefix('torch_')}"),
                              details=details, **fields)
    finally:
        if worker is not None:
            worker.close()
    keras.backend.clear_session()


def _interleaved_with_torch(runs, setting, task, **setup):
    """`runs` interleaved with, where PyTorch is installed, its model for `task` in float32 and
    under autocast (one worker process, one model); returns (rates, the worker's info or None)."""
    worker = torch_reference.TorchWorker.start(who="bfloat16")
    if worker is None:
        return common.interleaved(runs, warmup=setting["warmup"], repeats=setting["repeats"]), None
    try:
        worker.setup(task, **setup)
        for precision in ("float32", "bfloat16"):
            runs[f"torch_{precision}"] = functools.partial(worker.run, steps=1, precision=precision)
        return common.interleaved(runs, warmup=setting["warmup"], repeats=setting["repeats"]), worker.info
    finally:
        worker.close()


def _rnn_in_own_process():
    """The rnn part in a child process: the lm app sets TensorFlow's intra-op threads before
    TensorFlow starts, and the CNNs want TensorFlow's default. Its result lines are echoed here."""
    command = [sys.executable, "-m", "benchmarks.bfloat16", "--part", "rnn"]
    child = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    sys.stdout.write(child.stdout)
    sys.stdout.flush()


def main(argv=None):
    args = common.parse_args(__doc__.splitlines()[0], argv, parts=("cnn", "rnn", "serving"))
    mode = "quick" if args.quick else "full"
    if not _native_bfloat16():
        print("bfloat16: this CPU does not compute bfloat16 natively (no avx512_bf16 or amx_bf16 flag); "
              "the bfloat16 sides are emulated and their figures say nothing about issue 28.",
              file=sys.stderr, flush=True)
    if args.part == ["rnn"]:
        from dlsuite.apps.core import engine
        from dlsuite.apps.lm.task import LanguageModelTask

        engine.set_intra_op_threads(LanguageModelTask.intra_op_threads())
        for cell in ("lstm", "gru"):
            rnn_training(cell, QUICK_RNN if args.quick else RNN, mode=mode)
        return
    if "rnn" in args.part:
        if args.quick:  # it only checks that the rows come out: threads do not matter
            for cell in ("lstm", "gru"):
                rnn_training(cell, QUICK_RNN, mode=mode)
        else:
            _rnn_in_own_process()
    peaks = {"bfloat16": common.matmul_rates(n=MATMUL_SIZE[mode], dtype="bfloat16")}
    if "cnn" in args.part:
        for name in QUICK_CNN_MODELS if args.quick else CNN_MODELS:
            cnn_training(name, QUICK_CNN if args.quick else CNN, mode=mode, peaks=peaks)
    if "serving" in args.part:
        with tempfile.TemporaryDirectory() as folder:
            serving(QUICK_SERVING if args.quick else SERVING, mode=mode, folder=folder)


if __name__ == "__main__":
    main()
