"""Input pipeline: the classification app's folder pipeline against in-memory tensors.

A temporary folder gets generated images (one subfolder per class, PNG and
JPEG alternating). The app's path loads it, `datasets.load(folder)` then
`pipeline.batches(...)`, and feeds `model.fit`. The reference trains the same
model on the same decoded training images held in memory:
`Dataset.from_tensor_slices(...).batch(...).prefetch(...)`. Figures are
training images per second over full epochs; ratio = folder / memory, and the
issue's bar is >= 0.9 at 64x64 and at 224x224.

The folder pipeline's first epoch decodes every file and fills its cache;
later epochs read the cache. Each repeat therefore builds a fresh folder
pipeline and times its first epoch (`pipeline_<size>_first_epoch`) and its
second (`pipeline_<size>_steady`), then one in-memory epoch, which both
ratios divide by. Files come from the page cache after the first read: "cold"
means not yet decoded, not "on disk".

An epoch is timed from the `fit` call to the end of its last training step.
What comes after, the shutdown of the epoch's tf.data iterator, is left out
and reported apart (`epoch_end_stall_seconds`): with autotuning on, TF 2.21
often holds that shutdown until its autotuning thread next wakes, and that
thread sleeps in doubling periods (wake-ups 2.55, 5.11, 10.23, 20.47 s ...
after the iterator starts), so an epoch's wall time jumps to the next of
these marks. That stall hits any AUTOTUNE pipeline, the in-memory one
too, at random; inside the ratios it would only add noise.

A secondary figure, `decode_<size>`, is decoding alone: tf.data's parallel
decode (the ops `datasets.load` maps over the files) against a PIL loop.

    python -m benchmarks.input_pipeline [--quick]
"""

import dataclasses
import gc
import os
import statistics
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from benchmarks import common
from dlsuite.apps.vision import classifier, datasets, pipeline, shapes

BAR = 0.9
CLASSES = 4
# Validation and test each take this share; the benchmark trains on the rest.
HELD_OUT_FRACTION = 0.1
# Gaussian noise on the generated shapes: flat shapes compress far better than
# photos do, which would make decoding look cheaper than it is.
NOISE_STDDEV = 8.0
JPEG_QUALITY = 90
# Decoded images per batch pulled from tf.data: few Python calls per pass.
DECODE_BATCH = 16
LEARNING_RATE = 0.01
MOMENTUM = 0.9


@dataclasses.dataclass(frozen=True)
class Setting:
    image_size: int  # the files' size and the model's, so the pipeline decodes but does not resize
    train_images: int  # a multiple of batch_size: every batch is full
    batch_size: int
    model: str
    warmup_repeats: int = 1  # traces the training step for both pipelines
    repeats: int = common.MIN_REPEATS


# On 2 CPU cores resnet18 trains about 65 images/s at 64x64 and 7 at 224x224.
FULL = (
    Setting(image_size=64, train_images=256, batch_size=32, model="resnet18", repeats=7),
    Setting(image_size=224, train_images=64, batch_size=32, model="resnet18"),
)
# No warm-up: --quick checks that the rows come out, and its first timed epochs may trace the step.
QUICK = (Setting(image_size=64, train_images=64, batch_size=16, model="lenet5", warmup_repeats=0),)


def write_folder(root, *, size, count, seed=0):
    """Writes `count` generated shape images into `root/<class>/`, PNG and JPEG alternating.

    Returns:
        The file paths, in the order written.
    """
    images, labels, class_names = shapes.generate(classes=CLASSES, size=size, count=count, seed=seed)
    noise = np.random.default_rng(seed).normal(0.0, NOISE_STDDEV, images.shape)
    images = np.clip(images + noise, 0, 255).astype(np.uint8)
    for name in class_names:
        os.makedirs(os.path.join(root, name), exist_ok=True)
    paths = []
    for index, (image, label) in enumerate(zip(images, labels)):
        if index % 2:
            path, options = os.path.join(root, class_names[label], f"{index:05d}.jpg"), {"quality": JPEG_QUALITY}
        else:
            path, options = os.path.join(root, class_names[label], f"{index:05d}.png"), {}
        Image.fromarray(image).save(path, **options)
        paths.append(path)
    return paths


def _decode_file(path):
    # The ops datasets.load maps over a folder's files (RGB images).
    return tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)


def decode_rates(paths, *, repeats):
    """Decoding alone, in images/s: tf.data's parallel map against a PIL loop."""

    def pil_loop():
        for path in paths:
            with Image.open(path) as image:
                np.asarray(image.convert("RGB"))
        return len(paths)

    decoded = tf.data.Dataset.from_tensor_slices(paths).map(
        _decode_file, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(DECODE_BATCH)

    def tf_data():
        # Timed to the last batch: the iterator's shutdown is left out (see the module doc).
        start = time.perf_counter()
        for _ in decoded:
            done = time.perf_counter()
        return len(paths), done - start

    return common.interleaved({"tf_data": tf_data, "pil": pil_loop}, warmup=1, repeats=repeats)


class _LastStep(keras.callbacks.Callback):
    """Records when the latest training step ended (its loss read back)."""

    time = None

    def on_train_batch_end(self, batch, logs=None):
        self.time = time.perf_counter()


def _load(folder):
    return datasets.load(folder, validation_fraction=HELD_OUT_FRACTION, test_fraction=HELD_OUT_FRACTION)


def _train_in_memory(dataset, *, count, batch_size):
    """The training split's `count` decoded images as in-memory tensors, batched."""
    images, labels = next(iter(dataset.batch(count)))
    memory = tf.data.Dataset.from_tensor_slices((tf.cast(images, tf.float32), labels))
    return memory.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def measure(setting, *, mode, folder):
    """Writes the folder, then times training from it and from memory; reports three results."""
    size = setting.image_size
    count = round(setting.train_images / (1 - 2 * HELD_OUT_FRACTION))
    paths = write_folder(folder, size=size, count=count)

    load_rates = common.interleaved({"load": lambda: _load(folder).sizes["train"]}, warmup=0,
                                    repeats=setting.repeats)["load"]
    data = _load(folder)
    if data.sizes["train"] != setting.train_images:
        raise RuntimeError(f"Expected {setting.train_images} training images, the split gave {data.sizes}.")
    memory = _train_in_memory(data.train, count=setting.train_images, batch_size=setting.batch_size)

    keras.utils.set_random_seed(0)
    mean, variance = classifier.channel_statistics(memory)
    model = classifier.build_classifier(
        setting.model, classes=len(data.class_names), image_size=(size, size), channels=data.channels,
        mean=mean, variance=variance,
    )
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=LEARNING_RATE, momentum=MOMENTUM),
        loss=keras.losses.SparseCategoricalCrossentropy(),
    )
    if mode == "quick":
        common.build_optimizers(model)

    last_step = _LastStep()
    stalls = {"folder_first": [], "folder_steady": [], "memory": []}

    def epoch(dataset, label):
        start = time.perf_counter()
        model.fit(dataset, epochs=1, shuffle=False, verbose=0, callbacks=[last_step])  # the pipeline shuffles
        stalls[label].append(time.perf_counter() - last_step.time)
        return setting.train_images, last_step.time - start

    folder_batches = {}

    def folder_first_epoch():
        # A new pipeline has a new, empty cache.
        folder_batches["current"] = pipeline.batches(
            data.train, image_size=(size, size), channels=data.channels,
            batch_size=setting.batch_size, training=True, seed=0,
        )
        return epoch(folder_batches["current"], "folder_first")

    rates = common.interleaved(
        {
            "folder_first": folder_first_epoch,
            "folder_steady": lambda: epoch(folder_batches["current"], "folder_steady"),
            "memory": lambda: epoch(memory, "memory"),
        },
        warmup=setting.warmup_repeats,
        repeats=setting.repeats,
    )
    stall = {label: {"median": statistics.median(values), "max": max(values)}
             for label, values in stalls.items()}

    load_speed = statistics.median(load_rates)
    config = {
        **dataclasses.asdict(setting),
        "files": count,
        "formats": f"PNG and JPEG (quality {JPEG_QUALITY}) alternating, {size}x{size} RGB",
        "classes": CLASSES,
        "optimizer": f"SGD(learning_rate={LEARNING_RATE}, momentum={MOMENTUM})",
        "step": "model.fit, one epoch per repeat, timed to the end of its last step",
    }
    ours_label = "datasets.load(folder) + pipeline.batches(training=True) -> model.fit"
    reference_label = "Dataset.from_tensor_slices(decoded float32 images).batch().prefetch() -> model.fit"
    common.report(
        f"pipeline_{size}_first_epoch", ours=rates["folder_first"], reference=rates["memory"],
        mode=mode, bar=BAR, config=config, ours_label=ours_label + ", first epoch (decodes, fills cache)",
        reference_label=reference_label,
        load_images_per_second=load_speed,
        epoch_end_stall_seconds=stall,
        details=(
            f"{setting.model} {size}x{size}: first epoch decodes every file; before it, datasets.load "
            f"checks every file with PIL at {load_speed:.0f} images/s (not in the ratio)"
        ),
    )
    common.report(
        f"pipeline_{size}_steady", ours=rates["folder_steady"], reference=rates["memory"],
        mode=mode, bar=BAR, config=config, ours_label=ours_label + ", second epoch (reads its cache)",
        reference_label=reference_label,
        epoch_end_stall_seconds=stall,
        details=(
            f"{setting.model} {size}x{size}: cached epochs; the folder side also shuffles. Left out: "
            f"iterator shutdown after the last step, up to {max(v['max'] for v in stall.values()):.1f} s"
        ),
    )

    decode = decode_rates(paths, repeats=setting.repeats)
    common.report(
        f"decode_{size}", ours=decode["tf_data"], reference=decode["pil"], mode=mode,
        config={"files": count, "formats": config["formats"]},
        ours_label="tf.data map(read_file + decode_image, num_parallel_calls=AUTOTUNE)",
        reference_label="PIL loop: Image.open + convert('RGB') + np.asarray, one file at a time",
        details=f"decoding alone, {count} files of {size}x{size}, no training",
    )


def main(argv=None):
    args = common.parse_args(__doc__.splitlines()[0], argv)
    mode = "quick" if args.quick else "full"
    for setting in QUICK if args.quick else FULL:
        with tempfile.TemporaryDirectory(prefix=f"dlsuite-bench-{setting.image_size}-") as folder:
            measure(setting, mode=mode, folder=folder)
        # The model and the cached images are garbage now; free them before the next size.
        keras.backend.clear_session()
        gc.collect()


if __name__ == "__main__":
    main()
