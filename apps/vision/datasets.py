"""Image-classification datasets: one loader per source, one `ImageDataset` out.

`load(spec)` reads a dataset named by the user:

* a built-in name (`names()`): "digits", the handwritten digits bundled with
  scikit-learn, or "shapes", generated images of geometric shapes;
* "tfds:NAME[/CONFIG]", any TensorFlow Datasets image-classification set;
* the path of a folder with one subfolder of images per class.

Every source gives the same thing: unbatched `(image, label)` datasets for
train, validation and test, with uint8 images of raw pixels and int32 labels.
Resizing, channel matching and batching are `pipeline.batches`' job.
"""

import contextlib
import dataclasses
import gc
import os
import sys
import time

import numpy as np
import tensorflow as tf

from dlsuite.apps.core import tfds_sets
from dlsuite.apps.core.errors import UsageError
from dlsuite.apps.vision import file_checks, manifest, shapes, sources

TFDS_PREFIX = "tfds:"

# What the user may pass besides a built-in name, for the help and the errors.
OTHER_FORMS = (
    "tfds:NAME[/CONFIG] for a TensorFlow Datasets image-classification set (e.g. tfds:mnist)",
    "the path of a folder with one subfolder of images per class",
)


@dataclasses.dataclass
class ImageDataset:
    """An image-classification dataset split three ways.

    Attributes:
        name: "digits", "shapes", "tfds:NAME", a packed folder or the folder path.
        class_names: label i is `class_names[i]`.
        sources: {"train", "validation", "test": `sources.Source`}: what
            `pipeline` reads, without holding decoded images.
        channels: 1 (grayscale) or 3 (RGB).
        image_shape: native (H, W, C) when every image shares it, else None.
        skipped: [(path, reason)] image files left out because they cannot be decoded.
        check_line: what checking the files found and where it was kept, or "".
    """

    name: str
    class_names: list
    sources: dict
    channels: int
    image_shape: tuple | None
    skipped: list = dataclasses.field(default_factory=list)
    check_line: str = ""

    @property
    def sizes(self):
        """{"train": n, "validation": n, "test": n}."""
        return {key: source.count for key, source in self.sources.items()}

    # Each split as unbatched (uint8 (H, W, C) raw pixels, int32 label), in index order.
    train = property(lambda self: self.sources["train"].dataset())
    validation = property(lambda self: self.sources["validation"].dataset())
    test = property(lambda self: self.sources["test"].dataset())

    def with_source(self, key, source):
        """A copy whose split `key` is `source`."""
        return dataclasses.replace(self, sources={**self.sources, key: source})

    def read_failures(self):
        """Files that failed to decode when a pipeline read them, sorted."""
        return sorted({path for source in self.sources.values() for path in getattr(source, "failures", ())})


def names():
    """Returns the built-in dataset names, the ones that need no path or download."""
    return sorted(_BUILTINS)


def describe(name):
    """Returns the one-line description of the built-in dataset `name`."""
    return _BUILTINS[name][1]


def load(spec, *, seed=0, validation_fraction=0.15, test_fraction=0.15, strict=False,
         shapes_classes=4, shapes_size=64, shapes_count=1200, data_dir=None, validation_data=None, test_data=None):
    """Loads the dataset `spec` and splits it into train, validation and test.

    Args:
        spec: a built-in name (`names()`), "tfds:NAME[/CONFIG]" or a folder path.
        seed: seeds the split (and the shapes generator); the same seed gives
            the same split.
        validation_fraction: share of the images held out for validation
            (of the train split, for a TFDS set without a "validation" split).
        test_fraction: share held out for test (when the source has no test split).
        strict: for a folder, raise on the first image that cannot be decoded
            instead of skipping it.
        shapes_classes: "shapes" only, number of shape classes.
        shapes_size: "shapes" only, image side in pixels.
        shapes_count: "shapes" only, number of images in total.
        data_dir: TFDS only, where TensorFlow Datasets keeps its files.
        validation_data, test_data: folders (one subfolder per class, the
            classes of `spec`) used whole as that split; no fraction of
            `spec` is then split off for it.

    Returns:
        An `ImageDataset`.

    Raises:
        UsageError: an unknown name, a missing or malformed folder, fractions
            out of range, or too few images for a non-empty split.
    """
    given = {key: folder for key, folder in (("validation", validation_data), ("test", test_data)) if folder}
    if given:  # the given splits take nothing from `spec`
        data = load(spec, seed=seed, strict=strict, shapes_classes=shapes_classes, shapes_size=shapes_size,
                    shapes_count=shapes_count, data_dir=data_dir,
                    validation_fraction=_HELD_OUT if "validation" in given else validation_fraction,
                    test_fraction=_HELD_OUT if "test" in given else test_fraction)
        return _with_given_splits(data, given, strict=strict)
    spec = os.fspath(spec)
    _check_fractions(validation_fraction, test_fraction)
    fractions = {"validation_fraction": validation_fraction, "test_fraction": test_fraction}
    if spec in _BUILTINS:
        loader = _BUILTINS[spec][0]
        if spec == "shapes":
            return loader(seed=seed, classes=shapes_classes, size=shapes_size,
                          count=shapes_count, **fractions)
        return loader(seed=seed, **fractions)
    if spec.startswith(TFDS_PREFIX):
        return _load_tfds(spec[len(TFDS_PREFIX):], data_dir=data_dir, **fractions)
    path = os.path.expanduser(spec)
    from dlsuite.apps.vision import shards

    if shards.is_packed(path):
        return _load_packed(spec, path, seed=seed, **fractions)
    if os.path.isdir(path):
        return _load_folder(spec, path, seed=seed, strict=strict, **fractions)
    if os.path.exists(path):
        raise UsageError(
            f"Dataset path {spec!r} is a file: give a folder with one subfolder of images per class."
        )
    if os.sep in spec or "/" in spec or spec.startswith((".", "~")):
        raise UsageError(f"Dataset folder {spec!r} does not exist: check the path.")
    raise UsageError(
        f"Unknown dataset {spec!r}. Built-in: {', '.join(names())}; or "
        + "; or ".join(OTHER_FORMS) + "."
    )


# The fraction of a split that a given folder replaces: none of `spec` goes
# to it (the split is left empty, then `_with_given_splits` fills it).
_HELD_OUT = 1e-12


def _with_given_splits(data, given, *, strict):
    """`data` with each split of `given` ({"validation"/"test": folder}) read from its folder, whole."""
    skipped, replaced = list(data.skipped), data
    for key, folder in given.items():
        folder_data = whole_folder(folder, strict=strict, channels=data.channels)
        class_names = folder_data.class_names
        if class_names != list(data.class_names):
            missing = sorted(set(data.class_names) - set(class_names))
            extra = sorted(set(class_names) - set(data.class_names))
            raise UsageError(
                f"{key} folder {os.fspath(folder)!r} has other classes than {data.name!r}"
                + (f" (missing {missing[:5]})" if missing else "") + (f" (not in training: {extra[:5]})" if extra else "")
                + "; give it one subfolder per training class", option=f"{key}_data")
        replaced = replaced.with_source(key, folder_data.sources["test"])
        skipped += folder_data.skipped
    return dataclasses.replace(replaced, skipped=skipped)


def load_configured(config):
    """The dataset an image app's config names (`config.dataset` and the
    fields of `train_args.ImageSplitConfig`); files left out as unreadable
    are reported on stderr. The cache options are checked first."""
    from dlsuite.apps.vision import image_cache

    image_cache.check_options(getattr(config, "cache", "auto"), getattr(config, "cache_dir", None))
    if getattr(config, "data_service", None):
        from dlsuite.apps.core import data_service

        data_service.check_reachable(config.data_service)
    data = load(config.dataset, seed=config.seed, validation_fraction=config.validation_fraction,
                test_fraction=config.test_fraction, strict=config.strict, shapes_classes=config.shapes_classes,
                shapes_size=config.shapes_size, shapes_count=config.shapes_count, data_dir=config.data_dir,
                validation_data=config.validation_data, test_data=config.test_data)
    for path, reason in data.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if data.check_line:
        print(data.check_line, flush=True)
    return data


def _check_fractions(validation_fraction, test_fraction):
    for label, value in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if value == _HELD_OUT:
            continue
        if not 0.0 < value < 1.0:
            raise UsageError(
                f"{label}={value!r} is out of range: choose a value between 0 and 1, e.g. 0.15."
            )
    if validation_fraction + test_fraction >= 1.0:
        raise UsageError(
            f"validation_fraction + test_fraction = {validation_fraction + test_fraction:g} leaves no "
            "training images: keep their sum below 1, e.g. 0.15 each."
        )


def _apportion(class_sizes, fraction):
    """Per-class counts that sum to round(total * fraction), each within 1 of its share.

    Rounding each class on its own would drift from the fraction when there
    are many small classes; largest remainders keep the total right.
    """
    shares = class_sizes * fraction
    counts = np.floor(shares).astype(int)
    missing = int(round(class_sizes.sum() * fraction)) - counts.sum()
    # Stable sort: ties go to the earlier class, so the result is deterministic.
    order = np.argsort(-(shares - counts), kind="stable")
    counts[order[:missing]] += 1
    return counts


def _stratified_split(labels, *, seed, validation_fraction, test_fraction, name):
    """Splits indices of `labels` three ways, in the same proportions per class.

    Returns:
        {"train": indices, "validation": indices, "test": indices}; train is in
        shuffled order so that `take(n)` sees every class.

    Raises:
        UsageError: a split would hold no image.
    """
    rng = np.random.default_rng(seed)
    classes, class_sizes = np.unique(labels, return_counts=True)
    test_counts = _apportion(class_sizes, test_fraction)
    validation_counts = _apportion(class_sizes, validation_fraction)
    parts = {"train": [], "validation": [], "test": []}
    # Classes in sorted order and one generator: the split depends on the seed only.
    for label, n_test, n_validation in zip(classes, test_counts, validation_counts):
        members = rng.permutation(np.flatnonzero(labels == label))
        parts["test"].append(members[:n_test])
        parts["validation"].append(members[n_test:n_test + n_validation])
        parts["train"].append(members[n_test + n_validation:])
    split = {key: np.sort(np.concatenate(value)) for key, value in parts.items()}
    split["train"] = rng.permutation(split["train"])
    for key, indices in split.items():
        held_out = {"validation": validation_fraction, "test": test_fraction}.get(key) == _HELD_OUT
        if len(indices) == 0 and not held_out:
            fix = "lower" if key == "train" else "raise"
            raise UsageError(
                f"Dataset {name!r} has too few images ({len(labels)}) for a non-empty {key} split with "
                f"validation_fraction={validation_fraction:g}, test_fraction={test_fraction:g}: "
                f"add images or {fix} the fractions."
            )
    return split


def _from_arrays(name, images, labels, class_names, *, seed, validation_fraction, test_fraction):
    """An `ImageDataset` from in-memory uint8 images (N, H, W, C) and labels (N,)."""
    split = _stratified_split(labels, seed=seed, validation_fraction=validation_fraction,
                              test_fraction=test_fraction, name=name)
    channels, shape = int(images.shape[-1]), tuple(int(d) for d in images.shape[1:])
    return ImageDataset(
        name=name,
        class_names=list(class_names),
        sources={key: sources.ArraySource(count=len(indices), labels=labels[indices].astype(np.int32), channels=channels,
                                          image_shape=shape, identity=f"{name}:{seed}:{key}", images=images[indices])
                 for key, indices in split.items()},
        channels=channels,
        image_shape=shape,
    )


def _load_digits(*, seed, validation_fraction, test_fraction):
    """The 1,797 8x8 handwritten digits bundled with scikit-learn (UCI optdigits)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel counts run 0..16; stretch them to the 0..255 of every other source.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return _from_arrays("digits", images, digits.target, [str(d) for d in range(10)], seed=seed,
                        validation_fraction=validation_fraction, test_fraction=test_fraction)


def _load_shapes(*, seed, classes, size, count, validation_fraction, test_fraction):
    """Generated geometric shapes (see `shapes.generate`)."""
    images, labels, class_names = shapes.generate(classes=classes, size=size, count=count, seed=seed)
    return _from_arrays("shapes", images, labels, class_names, seed=seed,
                        validation_fraction=validation_fraction, test_fraction=test_fraction)


# name -> (loader, description); a new built-in is one row.
_BUILTINS = {
    "digits": (_load_digits,
               "1,797 handwritten digits 8x8, 10 classes, grayscale (bundled with scikit-learn)"),
    "shapes": (_load_shapes, "generated geometric shapes, RGB, 2 to 8 classes (--shapes-* options)"),
}


# --- folder of class subfolders -------------------------------------------------


def _read_folder(spec, root, *, strict):
    """The classes and readable images of a folder with one subfolder per class.

    Returns:
        (class names, image paths, their labels, (channels, native shape or
        None), the checks, the line that says what the check found).
    """
    if not os.path.isdir(root):
        raise UsageError(f"Dataset folder {spec!r} does not exist: check the path.")
    with _no_collection_pauses():
        class_names, files = file_checks.list_class_files(root)
        return _read_listing(spec, root, class_names, files, strict=strict)


@contextlib.contextmanager
def _no_collection_pauses():
    """Holds off Python's cycle collector: listing and checking a folder makes
    a few small objects per file and no cycles, and the collector's passes
    over them were a third of the time of a second run at 50,000 files."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _read_listing(spec, root, class_names, files, *, strict):
    if not class_names:
        problem = "is empty" if not os.listdir(root) else "has no class subfolders"
        raise UsageError(
            f"Dataset folder {spec!r} {problem}: put one subfolder of images per class in it."
        )
    if len(class_names) < 2:
        raise UsageError(
            f"Dataset folder {spec!r} has one class subfolder ({class_names[0]!r}); it needs at least 2 "
            "class subfolders."
        )

    paths = [path for name in class_names for path in files[name]]
    labels = np.array([i for i, name in enumerate(class_names) for _ in files[name]], dtype=np.int32)
    manifest_path = manifest.path_for(root)
    started = time.monotonic()
    checks = file_checks.check_images(paths, strict=strict, manifest_path=manifest_path)
    line = (f"checked {len(paths):,} files of {spec} in {time.monotonic() - started:.1f} s "
            f"({checks.reused:,} unchanged since the last check; manifest {manifest_path})")
    good = np.array([check.reason is None for check in checks], dtype=bool)
    for i, name in enumerate(class_names):
        if not good[labels == i].any():
            unreadable = int((labels == i).sum())
            found = f"{unreadable} unreadable" if unreadable else f"no {'/'.join(file_checks.IMAGE_EXTENSIONS)} files"
            raise UsageError(
                f"Class folder {os.path.join(spec, name)!r} has no readable image ({found}): "
                "add images or remove the folder."
            )

    kept = [check for check in checks if check.reason is None]
    channels = 3 if any(check.colour for check in kept) else 1
    native = {check.shape[:2] for check in kept}
    image_shape = (*native.pop(), channels) if len(native) == 1 else None

    return (class_names, np.array([check.path for check in kept]), labels[good], (channels, image_shape), checks,
            line)


def file_source(paths, labels=None, *, channels, image_shape=None, key="files"):
    """A `sources.FileSource` of `paths` (checked files; `labels` default 0), decoded to `channels`."""
    labels = np.zeros(len(paths), np.int32) if labels is None else labels
    return sources.FileSource(count=len(paths), labels=np.asarray(labels, dtype=np.int32), channels=channels,
                              image_shape=image_shape, identity=f"files:{key}", paths=np.asarray(paths))


def whole_folder(spec, *, strict=False, channels=None):
    """Every readable image of a folder with one subfolder per class, as the
    test split of an `ImageDataset` (train and validation empty): what
    `classify evaluate` scores on a folder the model was not trained on.
    `channels` decodes to that count instead of the folder's own."""
    class_names, paths, labels, (found, image_shape), checks, line = _read_folder(
        os.fspath(spec), os.path.expanduser(spec), strict=strict)
    channels = channels or found
    image_shape = image_shape and (*image_shape[:2], channels)
    source = file_source(paths, labels, channels=channels, image_shape=image_shape, key="test")
    return ImageDataset(
        name=os.fspath(spec), class_names=class_names,
        sources={"train": source.subset([]), "validation": source.subset([]), "test": source},
        channels=channels, image_shape=image_shape, skipped=[(c.path, c.reason) for c in checks if c.reason],
        check_line=line)


def _load_folder(spec, root, *, seed, strict, validation_fraction, test_fraction):
    """A folder with one subfolder per class; images are decoded by tf.data when read."""
    class_names, paths, labels, (channels, image_shape), checks, line = _read_folder(spec, root, strict=strict)
    split = _stratified_split(labels, seed=seed, validation_fraction=validation_fraction,
                              test_fraction=test_fraction, name=spec)
    return ImageDataset(
        name=spec,
        class_names=class_names,
        sources={key: file_source(paths[indices], labels[indices], channels=channels, image_shape=image_shape, key=key)
                 for key, indices in split.items()},
        channels=channels,
        image_shape=image_shape,
        skipped=[(check.path, check.reason) for check in checks if check.reason],
        check_line=line,
    )


def _load_packed(spec, root, *, seed, validation_fraction, test_fraction):
    """A folder `dlsuite data pack` wrote: TFRecord shards read in sequence,
    split by index with the labels its labels.npy holds."""
    from dlsuite.apps.vision import shards

    info = shards.read_info(root)
    split = _stratified_split(info.labels, seed=seed, validation_fraction=validation_fraction,
                              test_fraction=test_fraction, name=spec)
    record_bytes = max(1, sum(os.path.getsize(f) for f in info.files if os.path.exists(f)) // max(1, info.count))

    def make_source(key, indices, files=tuple(range(len(info.files)))):
        # A record's position is its index's place in the split, as a folder's
        # split orders its files: cached epochs of the pack equal the folder's.
        position_of = np.full(info.count, -1, dtype=np.int64)
        position_of[indices] = np.arange(len(indices))
        positions = tf.constant(position_of)
        paths = [info.files[k] for k in files]

        def records():
            def kept(index, data, label):
                return tf.gather(positions, index) >= 0

            def record(index, data, label):
                return data, label, tf.gather(positions, index)

            return shards.records(paths).filter(kept).map(record)

        def worker_share(worker, workers):
            # Image i is in file i % shards (`shards.pack`): worker w reads files w, w + W, ...
            if len(files) != len(info.files) or len(info.files) < workers:
                return None
            mine = tuple(range(worker, len(info.files), workers))
            return make_source(key, indices[np.isin(indices % len(info.files), mine)], mine)

        return sources.RecordSource(count=len(indices), labels=info.labels[indices], channels=info.channels,
                                    image_shape=info.image_shape, identity=f"packed:{os.path.abspath(root)}:{key}:"
                                    f"{os.path.getmtime(os.path.join(root, shards.INFO_FILE))}:{seed}:"
                                    f"{validation_fraction}:{test_fraction}" + ("" if len(files) == len(info.files) else f":{files}"),
                                    make_records=records, record_bytes=record_bytes, worker_share=worker_share,
                                    files=tuple(paths))

    return ImageDataset(
        name=spec, class_names=list(info.class_names),
        sources={key: make_source(key, indices) for key, indices in split.items()},
        channels=info.channels, image_shape=info.image_shape, skipped=list(info.skipped))


# --- TensorFlow Datasets --------------------------------------------------------


def _tfds_splits(name, splits, *, validation_fraction, test_fraction):
    """Picks the train/validation/test split strings, carving missing ones from train.

    Carved splits are contiguous slices of "train" in its stored order, which
    TFDS fixed when it prepared the data, so they are the same on every run
    (and for every seed; TFDS slicing is not stratified).
    """
    if "train" not in splits:
        raise UsageError(f"tfds:{name} has no 'train' split (splits: {', '.join(sorted(splits))}).")
    n = splits["train"].num_examples
    n_validation = 0 if "validation" in splits else int(round(n * validation_fraction))
    n_test = 0 if "test" in splits else int(round(n * test_fraction))
    n_train = n - n_validation - n_test
    n_kept = n_train + n_validation
    chosen = {
        "train": f"train[:{n_train}]" if n_train < n else "train",
        "validation": "validation" if "validation" in splits else f"train[{n_train}:{n_kept}]",
        "test": "test" if "test" in splits else f"train[{n_kept}:]",
    }
    for key, split in chosen.items():
        held_out = {"validation": validation_fraction, "test": test_fraction}.get(key) == _HELD_OUT
        if splits[split].num_examples == 0 and not held_out:
            fix = "lower" if key == "train" else "raise"
            raise UsageError(
                f"tfds:{name} has too few examples ({n} in train) for a non-empty {key} split "
                f"({split!r}): {fix} validation_fraction/test_fraction."
            )
    return chosen


def _load_tfds(name, *, data_dir, validation_fraction, test_fraction):
    """A TensorFlow Datasets image-classification set; downloads it if needed."""
    import tensorflow_datasets as tfds

    builder = tfds_sets.builder(name, data_dir=data_dir, kind="image-classification sets")
    features = builder.info.features
    keys = list(features.keys()) if isinstance(features, tfds.features.FeaturesDict) else []
    if not (
        "image" in keys and isinstance(features["image"], tfds.features.Image)
        and "label" in keys and isinstance(features["label"], tfds.features.ClassLabel)
    ):
        raise UsageError(
            f"tfds:{name} is not an image-classification set: it needs an 'image' and a class 'label' "
            f"feature (it has: {', '.join(keys) or type(features).__name__})."
        )
    height, width, channels = features["image"].shape
    if channels not in (1, 3):
        raise UsageError(
            f"tfds:{name} has {channels}-channel images; only 1 (grayscale) or 3 (RGB) are supported."
        )

    try:
        builder.download_and_prepare()
    except OSError as error:
        raise UsageError(
            f"Could not download or prepare tfds:{name}: {error} (check the network, or pass the "
            "data_dir that already holds it)."
        ) from None
    chosen = _tfds_splits(name, builder.info.splits, validation_fraction=validation_fraction,
                          test_fraction=test_fraction)
    supervised = tuple(builder.info.supervised_keys or ()) == ("image", "label")
    known = None not in (height, width)
    image_shape = (height, width, channels) if known else None
    # Encoded images (SkipDecoding): an epoch shuffles them and decodes after.
    loaded, info = tfds.load(
        name, split=list(chosen.values()), data_dir=data_dir, with_info=True,
        as_supervised=supervised, shuffle_files=False, download=False,
        decoders={"image": tfds.decode.SkipDecoding()},
    )
    total = sum(split.num_examples for split in info.splits.values()) or 1
    record_bytes = max(1, int((info.dataset_size or 0) / total)) or 100_000

    def make_records(dataset):
        def record(position, element):
            image, label = element if supervised else (element[0]["image"], element[0]["label"])
            return image, tf.cast(label, tf.int32), position

        return lambda: dataset.enumerate().map(record, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    return ImageDataset(
        name=f"{TFDS_PREFIX}{name}",
        class_names=list(features["label"].names),
        sources={key: sources.RecordSource(
            count=info.splits[split].num_examples, labels=None, channels=channels, image_shape=image_shape,
            identity=f"tfds:{name}:{split}:{info.version}", make_records=make_records(ds), record_bytes=record_bytes)
            for (key, split), ds in zip(chosen.items(), loaded)},
        channels=channels,
        image_shape=image_shape,
    )
