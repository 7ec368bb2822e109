"""Serving latency: the exported SavedModel against `model.predict`, and the
`classify predict` path against the Keras way of doing the same.

    python -m benchmarks.serving_latency            # ResNet-50 (224px, 1000 classes) and LeNet-5, batch 1 and 32
    python -m benchmarks.serving_latency --quick    # LeNet-5 only, batch 1 and 4, no command-line row

Both models are the classify app's classifiers (`apps.vision.classifier.build_classifier`:
raw pixels in, normalization, registry backbone with untrained weights,
softmax out), exported by `apps.vision.export.export_classifier`. Results:

* `serving_{model}_b{N}`: the export's `serving_default` signature, loaded
  with `tf.saved_model.load` and called with a uint8 batch, as TensorFlow
  Serving calls it, against `model.predict` on the same batch (float32) in
  the same process. Bar: >= 1.5 at batch 1.
* `predict_files_{model}_b{N}`: what `dlsuite classify predict` runs per
  batch of files, `ExportedClassifier.predict_files` (file bytes decoded and
  resized inside the graph), against PIL decoding + `model.predict`. Bar:
  >= 1.5 at batch 1, the same advantage as the bare signature.
* `classify_predict_cli_{model}`: the whole `dlsuite classify predict EXPORT
  IMAGE` command against a Python script that loads the `.keras` file and
  calls `predict` on the decoded image; both one fresh process, so both
  include Python's and TensorFlow's start-up (timed alone as `python -c
  "import tensorflow"` in the same repeats and reported in the details).
* `serving_lm_generate_2x{units}`: the language-model export's in-graph
  sampling loop (`ExportedLanguageModel.generate`, what `dlsuite lm generate`
  runs) against `apps.lm.generate.generate` stepping the Keras model from Python.
"""

import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

import numpy as np

from benchmarks import common
from benchmarks.lm_speed import QUICK_TOKENS

# (registry name, image size, channels, classes) of each benchmarked classifier.
MODELS = {
    "resnet50": (224, 3, 1000),
    "lenet5": (32, 1, 10),
}
# Calls per timed repeat, so that one repeat lasts long enough to time well
# (LeNet-5 answers in about a millisecond, ResNet-50 at batch 32 in seconds).
CALLS = {"resnet50": {1: 4, 32: 1}, "lenet5": {1: 20, 32: 10}}
QUICK_CALLS = {1: 1, 4: 1}

# The Keras way of answering `classify predict` without the export: load the
# model file, decode the image with PIL, predict. Given the .keras and image paths.
KERAS_SCRIPT = """
import sys
import keras
import dlsuite.models  # registers the registry's layers (its batch norm), as loading any .keras of ours needs
import numpy as np
from PIL import Image
model = keras.saving.load_model(sys.argv[1])
channels = model.inputs[0].shape[-1]
image = Image.open(sys.argv[2]).convert("L" if channels == 1 else "RGB")
pixels = np.asarray(image, dtype="float32").reshape(1, image.height, image.width, channels)
probabilities = model.predict(pixels, verbose=0)[0]
print(sys.argv[2] + ": class " + str(int(probabilities.argmax())))
"""


def _classifier(name):
    from dlsuite.apps.vision import classifier

    size, channels, classes = MODELS[name]
    # ImageNet's channel statistics; any plausible values serve, the weights are untrained.
    mean, variance = ([0.485, 0.456, 0.406], [0.052, 0.050, 0.051]) if channels == 3 else ([0.45], [0.05])
    return classifier.build_classifier(name, classes=classes, image_size=(size, size), channels=channels,
                                       mean=mean, variance=variance)


def _write_images(folder, count, *, size, channels, seed=0):
    """`count` random PNG files of the model's size; returns their paths."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        pixels = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
        path = pathlib.Path(folder) / f"image_{index:03d}.png"
        Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(path)
        paths.append(path)
    return paths


def _decode_with_pil(paths, channels):
    from PIL import Image

    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype="float32"))
    batch = np.stack(images)
    return batch[..., np.newaxis] if channels == 1 else batch


def _repeat(fn, calls, batch):
    """fn run `calls` times; returns images processed, as `common.interleaved` wants."""
    def run():
        for _ in range(calls):
            fn()
        return calls * batch
    return run


def _milliseconds(rates, batch):
    """Median milliseconds per call from images/s rates."""
    return 1000 * batch / statistics.median(rates)


def classifier_latency(name, *, calls, repeats, mode, folder):
    """The serving_ and predict_files_ rows of one model, one pair per batch size.

    Args:
        calls: {batch size: calls per timed repeat}.
    """
    import tensorflow as tf

    from dlsuite.apps.vision import export

    size, channels, classes = MODELS[name]
    model = _classifier(name)
    path = export.export_classifier(model, class_names=[f"class_{i}" for i in range(classes)],
                                    name=name, base_dir=folder)
    # TensorFlow alone, as a serving process loads it: no Keras objects involved.
    signature = tf.saved_model.load(str(path)).signatures["serving_default"]
    served = export.ExportedClassifier.load(path)
    files = _write_images(pathlib.Path(folder) / f"{name}_images", max(calls), size=size, channels=channels)
    config = {"model": name, "image_size": size, "channels": channels, "classes": classes,
              "weights": "untrained (random init)", "repeats": repeats, "warmup_repeats": 1}

    for batch, n in calls.items():
        pixels = np.random.default_rng(batch).integers(0, 256, (batch, size, size, channels), dtype=np.uint8)
        floats = pixels.astype("float32")
        paths = files[:batch]

        # The same answers both ways, or the comparison means nothing.
        difference = float(np.abs(
            signature(images=tf.constant(pixels))["probabilities"].numpy() - model.predict(floats, verbose=0)).max())
        if difference > 1e-4:
            raise AssertionError(f"{name}: the export and model.predict differ by {difference}")

        rates = common.interleaved({
            "signature": _repeat(lambda: signature(images=tf.constant(pixels))["probabilities"].numpy(), n, batch),
            "predict": _repeat(lambda: model.predict(floats, verbose=0), n, batch),
            "predict_files": _repeat(lambda: served.predict_files(paths, batch_size=batch), n, batch),
            "keras_files": _repeat(lambda: model.predict(_decode_with_pil(paths, channels), verbose=0), n, batch),
        }, warmup=1, repeats=repeats)
        row_config = {**config, "batch": batch, "calls_per_repeat": n}
        bar = 1.5 if batch == 1 else None
        signature_ms, predict_ms = _milliseconds(rates["signature"], batch), _milliseconds(rates["predict"], batch)
        common.report(
            f"serving_{name}_b{batch}", ours=rates["signature"], reference=rates["predict"], mode=mode,
            bar=bar, config=row_config, max_abs_difference=difference,
            latency_ms={"ours": signature_ms, "reference": predict_ms},
            details=f"{name} {size}x{size}x{channels}, batch {batch}: {signature_ms:.1f} ms per call against "
                    f"{predict_ms:.1f} ms; same probabilities (max difference {difference:.1g})",
            ours_label="tf.saved_model.load(export).signatures['serving_default'](images=uint8 batch)",
            reference_label="model.predict(float32 batch, verbose=0) on the Keras model in the same process",
        )
        files_ms, keras_ms = _milliseconds(rates["predict_files"], batch), _milliseconds(rates["keras_files"], batch)
        common.report(
            f"predict_files_{name}_b{batch}", ours=rates["predict_files"], reference=rates["keras_files"],
            mode=mode, bar=bar, config={**row_config, "files": "PNG, the model's size"},
            latency_ms={"ours": files_ms, "reference": keras_ms, "bare_signature": signature_ms},
            details=f"{batch} PNG file(s): {files_ms:.1f} ms per call against {keras_ms:.1f} ms; in the same "
                    f"repeats the bare signature on the decoded pixels took {signature_ms:.1f} ms",
            ours_label="ExportedClassifier.predict_files(paths): what `dlsuite classify predict` runs "
                       "(file bytes -> serving_bytes signature)",
            reference_label="PIL decode of each file + np.stack + model.predict(verbose=0)",
        )
    return model, path, files[0]


def command_line(name, *, model, export_path, image, repeats, mode, folder):
    """`dlsuite classify predict` as a user runs it, against the Keras script."""
    keras_file = pathlib.Path(folder) / f"{name}.keras"
    model.save(keras_file)
    dlsuite = pathlib.Path(sys.executable).with_name("dlsuite")
    ours = [str(dlsuite)] if dlsuite.exists() else [sys.executable, "-m", "dlsuite.apps.cli"]
    commands = {
        "dlsuite": ours + ["classify", "predict", str(export_path), str(image)],
        "keras": [sys.executable, "-c", KERAS_SCRIPT, str(keras_file), str(image)],
        "import_tensorflow": [sys.executable, "-c", "import tensorflow"],
        "load_export": [sys.executable, "-c", "import sys, tensorflow as tf; tf.saved_model.load(sys.argv[1])",
                        str(export_path)],
    }
    env = dict(os.environ)
    # The level `dlsuite` sets for itself; the same for the other commands.
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    def run(command):
        def once():
            done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=folder)
            if done.returncode != 0:
                raise RuntimeError(f"{command[:3]} failed ({done.returncode}): {done.stderr[-2000:]}")
            return 1
        return once

    rates = common.interleaved({label: run(command) for label, command in commands.items()},
                               warmup=1, repeats=repeats)
    seconds = {label: 1 / statistics.median(samples) for label, samples in rates.items()}
    # Other work only ever slows a run down: the fastest run of each command is
    # the least disturbed, and only those four add up on a shared machine.
    fastest = {label: 1 / max(samples) for label, samples in rates.items()}
    common.report(
        f"classify_predict_cli_{name}", ours=rates["dlsuite"], reference=rates["keras"], mode=mode,
        unit="runs/s", config={"model": name, "images": 1, "repeats": repeats, "warmup_repeats": 1},
        seconds=seconds, fastest_seconds=fastest,
        details=f"one {name} image, a fresh process each; fastest of {repeats} runs: dlsuite "
                f"{fastest['dlsuite']:.2f} s, Keras script {fastest['keras']:.2f} s, `import tensorflow` "
                f"alone {fastest['import_tensorflow']:.2f} s, import + tf.saved_model.load "
                f"{fastest['load_export']:.2f} s",
        ours_label="`dlsuite classify predict EXPORT image.png` (import, tf.saved_model.load, one call)",
        reference_label="`python -c` script: keras.saving.load_model(.keras) + PIL decode + model.predict",
    )


def generation(*, units, length, repeats, mode, folder):
    from benchmarks.lm_speed import _app_model, _vocabulary
    from dlsuite.apps.lm import export as lm_export, generate

    vocabulary = _vocabulary()
    model = _app_model("lstm", units=units, vocab_size=vocabulary.size)
    served = lm_export.ExportedLanguageModel.load(
        lm_export.export_language_model(model, vocabulary, name="lm", base_dir=folder))
    rates = common.interleaved({
        "export": lambda: len(served.generate("a", length, 0.8, seed=1)) and length,
        "stateful": lambda: sum(1 for _ in generate.generate(
            model, vocabulary, prompt="a", length=length, temperature=0.8, seed=1)),
    }, warmup=1, repeats=repeats)
    common.report(
        f"serving_lm_generate_2x{units}", ours=rates["export"], reference=rates["stateful"], mode=mode,
        unit="tokens/s",
        details=f"{length} tokens after a one-character prompt: {length / statistics.median(rates['export']):.2f} s "
                f"against {length / statistics.median(rates['stateful']):.2f} s",
        config={"model": f"2x{units} char LSTM (random weights)", "vocabulary": vocabulary.size,
                "tokens": length, "repeats": repeats, "warmup_repeats": 1},
        ours_label="ExportedLanguageModel.generate (what `dlsuite lm generate` runs): the sampling loop "
                   "inside the SavedModel graph",
        reference_label="apps.lm.generate.generate: Python loop, one compiled stateful step per token",
    )


def main(argv=None):
    args = common.parse_args(__doc__, argv)
    mode = "quick" if args.quick else "full"
    repeats = common.MIN_REPEATS if args.quick else 7
    with tempfile.TemporaryDirectory() as folder:
        if args.quick:
            classifier_latency("lenet5", calls=QUICK_CALLS, repeats=repeats, mode=mode, folder=folder)
            generation(units=32, length=QUICK_TOKENS, repeats=repeats, mode=mode, folder=folder)
            return
        exports = {}
        for name in ("lenet5", "resnet50"):
            exports[name] = classifier_latency(name, calls=CALLS[name], repeats=repeats, mode=mode, folder=folder)
        generation(units=512, length=500, repeats=repeats, mode=mode, folder=folder)
        for name, (model, path, image) in exports.items():
            command_line(name, model=model, export_path=path, image=image, repeats=common.MIN_REPEATS,
                         mode=mode, folder=folder)


if __name__ == "__main__":
    main()
