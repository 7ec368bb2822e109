"""Dataset loaders: built-ins, image folders, TFDS (mocked), and every bad input."""

import collections
import hashlib
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from dlsuite.apps.vision import datasets, shapes
from dlsuite.apps.core.errors import UsageError

SPLITS = ("train", "validation", "test")


def _elements(dataset):
    return [(image.numpy(), int(label)) for image, label in dataset]


def _hashes(dataset):
    return [hashlib.sha1(image.tobytes()).hexdigest() + f":{label}" for image, label in _elements(dataset)]


def _split_hashes(data):
    return {key: _hashes(getattr(data, key)) for key in SPLITS}


# --- built-ins ----------------------------------------------------------------


def test_names_lists_the_builtins():
    assert datasets.names() == ["digits", "shapes"]
    assert all(datasets.describe(name) for name in datasets.names())


def test_digits_are_sklearns_1797_images_split_three_ways():
    from sklearn.datasets import load_digits

    data = datasets.load("digits")
    assert data.name == "digits"
    assert data.class_names == [str(d) for d in range(10)]
    assert sum(data.sizes.values()) == 1797
    assert data.sizes == {"train": 1257, "validation": 270, "test": 270}
    assert (data.channels, data.image_shape, data.skipped) == (1, (8, 8, 1), [])
    assert data.train.element_spec == (
        tf.TensorSpec((8, 8, 1), tf.uint8), tf.TensorSpec((), tf.int32))

    # Together the splits hold every image exactly once (duplicates included).
    split = _split_hashes(data)
    digits = load_digits()
    scaled = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    expected = [hashlib.sha1(x.tobytes()).hexdigest() + f":{y}" for x, y in zip(scaled, digits.target)]
    assert collections.Counter(sum(split.values(), [])) == collections.Counter(expected)
    assert max(image.max() for image, _ in _elements(data.test)) == 255


def test_digits_split_is_stratified():
    data = datasets.load("digits", validation_fraction=0.2, test_fraction=0.1)
    for key, fraction in (("validation", 0.2), ("test", 0.1)):
        counts = np.bincount([label for _, label in _elements(getattr(data, key))], minlength=10)
        # Each of the ~180 images per class contributes its own share.
        assert np.all(np.abs(counts - 180 * fraction) <= 2), (key, counts)


def test_split_depends_on_the_seed_only():
    first = _split_hashes(datasets.load("digits", seed=3))
    assert _split_hashes(datasets.load("digits", seed=3)) == first
    other = _split_hashes(datasets.load("digits", seed=4))
    assert set(other["test"]) != set(first["test"])


def test_shapes_are_deterministic_balanced_and_disjoint_across_splits():
    data = datasets.load("shapes", shapes_classes=5, shapes_size=32, shapes_count=203, seed=1)
    assert data.class_names == ["circle", "square", "triangle", "star", "cross"]
    assert (data.channels, data.image_shape) == (3, (32, 32, 3))
    assert sum(data.sizes.values()) == 203
    labels = [label for key in SPLITS for _, label in _elements(getattr(data, key))]
    assert sorted(collections.Counter(labels).values()) == [40, 40, 41, 41, 41]

    split = _split_hashes(data)
    assert sum(len(set(hashes)) for hashes in split.values()) == 203  # noise makes every image unique
    assert not set(split["train"]) & set(split["validation"])
    assert not set(split["train"]) & set(split["test"])
    assert not set(split["validation"]) & set(split["test"])

    again = datasets.load("shapes", shapes_classes=5, shapes_size=32, shapes_count=203, seed=1)
    assert _split_hashes(again) == split
    images, _, _ = shapes.generate(classes=5, size=32, count=203, seed=2)
    assert not np.array_equal(images, shapes.generate(classes=5, size=32, count=203, seed=1)[0])


def test_shapes_generate_1200_balanced_images():
    # Not timed (tests do not time: under a loaded CI this failed at 2 s).
    images, labels, names = shapes.generate(classes=len(shapes.SHAPES), size=64, count=1200, seed=0)
    assert images.shape == (1200, 64, 64, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [150] * 8 and names == list(shapes.SHAPES)
    # Colour varies per image, so neither mean brightness nor hue names the class.
    assert images.std() > 40


# --- folders ------------------------------------------------------------------


def _save(path, array, format_):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format_)
    return path


def _make_folder(root, *, colour=True, per_class=8):
    """Two classes of PNG/JPEG/BMP/GIF images of mixed sizes; one colour image if `colour`."""
    rng = np.random.default_rng(0)
    formats = [("PNG", ".png"), ("JPEG", ".JPG"), ("BMP", ".bmp"), ("GIF", ".gif")]
    for name in ("cat", "dog"):
        for i in range(per_class):
            format_, ext = formats[i % 4]
            gray = rng.integers(0, 256, size=(9 + i, 13 + i), dtype=np.uint8)
            _save(root / name / f"{i}{ext}", gray, format_)
    if colour:
        _save(root / "dog" / "colour.png", rng.integers(0, 256, size=(10, 7, 3), dtype=np.uint8), "PNG")
    (root / "cat" / "notes.txt").write_text("not an image, ignored silently")
    return root


def _add_bad_files(root):
    (root / "cat" / "corrupt.jpg").write_bytes(np.random.default_rng(1).bytes(300))
    rng = np.random.default_rng(2)
    for name, format_ in (("truncated.png", "PNG"), ("truncated.jpeg", "JPEG")):
        _save(root / "dog" / name, rng.integers(0, 256, (30, 30, 3), np.uint8), format_)
        data = (root / "dog" / name).read_bytes()
        (root / "dog" / name).write_bytes(data[: len(data) // 2])
    (root / "dog" / "header.gif").write_bytes(b"GIF89a\x01")
    return {
        str(root / "cat" / "corrupt.jpg"): "not an image",
        str(root / "dog" / "truncated.png"): "truncated PNG",
        str(root / "dog" / "truncated.jpeg"): "truncated JPEG",
        str(root / "dog" / "header.gif"): "damaged GIF header",
    }


def test_folder_skips_exactly_the_bad_images_with_reasons(tmp_path):
    root = _make_folder(tmp_path / "pets")
    bad = _add_bad_files(root)
    data = datasets.load(str(root), validation_fraction=0.2, test_fraction=0.2)
    assert data.name == str(root)
    assert data.class_names == ["cat", "dog"]
    assert dict(data.skipped) == bad
    assert sum(data.sizes.values()) == 17  # 16 gray + 1 colour; .txt and bad files left out
    assert data.sizes == {"train": 11, "validation": 3, "test": 3}  # round(17 * 0.2) = 3
    assert (data.channels, data.image_shape) == (3, None)

    images = [image for key in SPLITS for image, _ in _elements(getattr(data, key))]
    assert len(images) == 17
    assert all(image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3 for image in images)
    # Gray images come out as three equal channels.
    assert sum(np.array_equal(image[..., 0], image[..., 2]) for image in images) == 16


def test_folder_strict_raises_naming_the_first_bad_file(tmp_path):
    root = _make_folder(tmp_path / "pets")
    _add_bad_files(root)
    with pytest.raises(UsageError, match=r"corrupt\.jpg.*not an image"):
        datasets.load(str(root), strict=True)


def test_grayscale_folder_decodes_every_format_pixel_exact(tmp_path):
    root = _make_folder(tmp_path / "gray", colour=False, per_class=4)
    data = datasets.load(str(root), validation_fraction=0.25, test_fraction=0.25)
    assert (data.channels, data.image_shape, data.skipped) == (1, None, [])

    decoded = {}
    for key in SPLITS:
        for image, label in _elements(getattr(data, key)):
            decoded[(label, image.shape[:2])] = image[..., 0]
    assert len(decoded) == 8
    for label, name in enumerate(data.class_names):
        for path in sorted((root / name).iterdir()):
            if path.suffix == ".txt":
                continue
            expected = np.asarray(Image.open(path).convert("L"))
            actual = decoded[(label, expected.shape)]
            if path.suffix == ".JPG":  # TensorFlow's fast integer IDCT differs from PIL's by a few levels
                assert np.abs(actual.astype(int) - expected).max() <= 3, path
            else:
                np.testing.assert_array_equal(actual, expected, err_msg=str(path))


def test_folder_of_one_size_reports_its_native_shape_and_split_is_disjoint(tmp_path):
    rng = np.random.default_rng(2)
    for name in ("a", "b", "c"):
        for i in range(10):
            _save(tmp_path / "abc" / name / f"{i}.png", rng.integers(0, 256, (12, 10), np.uint8), "PNG")
    data = datasets.load(str(tmp_path / "abc"), seed=5, validation_fraction=0.2, test_fraction=0.2)
    assert (data.channels, data.image_shape) == (1, (12, 10, 1))
    assert data.train.element_spec[0].shape == (12, 10, 1)
    split = _split_hashes(data)
    assert {key: len(hashes) for key, hashes in split.items()} == {"train": 18, "validation": 6, "test": 6}
    assert len(set(sum(split.values(), []))) == 30
    for key in ("validation", "test"):  # stratified: 2 of each class
        assert sorted(h.split(":")[1] for h in split[key]) == ["0", "0", "1", "1", "2", "2"]


def test_bmp_variants_tensorflow_misreads_are_skipped(tmp_path):
    root = _make_folder(tmp_path / "pets", colour=False, per_class=4)
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 2, (8, 8), np.uint8) * 255).convert("1").save(root / "cat" / "bits.bmp")
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).convert("P").save(root / "cat" / "palette.bmp")
    data = datasets.load(str(root), validation_fraction=0.25, test_fraction=0.25)
    reasons = dict(data.skipped)
    assert "1-bit BMP" in reasons[str(root / "cat" / "bits.bmp")]
    assert "colour-palette BMP" in reasons[str(root / "cat" / "palette.bmp")]


# --- TensorFlow Datasets (mocked, offline) -------------------------------------


def _write_tfds_metadata(data_dir, name, split_sizes):
    """Writes the dataset_info.json that `mock_data` reads for split names and sizes."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=str(data_dir))
    os.makedirs(builder.data_dir, exist_ok=True)
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(
            name=split, shard_lengths=[size], num_bytes=0,
            filename_template=tfds.core.ShardedFileTemplate(
                data_dir=builder.data_dir, dataset_name=name, split=split, filetype_suffix="tfrecord"),
        )
        for split, size in split_sizes.items()
    ]))
    builder.info.write_to_directory(builder.data_dir)


@pytest.mark.parametrize(
    "split_sizes, expected_sizes",
    [
        # mnist's real splits: validation carved from train.
        ({"train": 1000, "test": 200}, {"train": 850, "validation": 150, "test": 200}),
        # Train only: validation and test both carved.
        ({"train": 1000}, {"train": 700, "validation": 150, "test": 150}),
    ],
)
def test_tfds_mnist_with_mock_data(tmp_path, split_sizes, expected_sizes):
    import tensorflow_datasets as tfds

    _write_tfds_metadata(tmp_path, "mnist", split_sizes)
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_FILES,
                                data_dir=str(tmp_path)):
        data = datasets.load("tfds:mnist", data_dir=str(tmp_path))
        assert data.name == "tfds:mnist"
        assert data.class_names == [str(d) for d in range(10)]
        assert (data.channels, data.image_shape) == (1, (28, 28, 1))
        assert data.sizes == expected_sizes
        for key in SPLITS:
            elements = _elements(getattr(data, key))
            assert len(elements) == 6  # mock_data yields num_examples per split
            for image, label in elements:
                assert image.shape == (28, 28, 1) and image.dtype == np.uint8
                assert 0 <= label < 10


# --- bad input ------------------------------------------------------------------


def _empty(root):
    root.mkdir()


def _files_only(root):
    _save(root / "x.png", np.zeros((4, 4), np.uint8), "PNG")


def _one_class(root):
    _save(root / "only" / "x.png", np.zeros((4, 4), np.uint8), "PNG")


def _class_without_images(root):
    _save(root / "a" / "x.png", np.zeros((4, 4), np.uint8), "PNG")
    (root / "b").mkdir()
    (root / "b" / "readme.txt").write_text("no images")


def _class_with_only_bad_images(root):
    _save(root / "a" / "x.png", np.zeros((4, 4), np.uint8), "PNG")
    (root / "b").mkdir()
    (root / "b" / "bad.png").write_bytes(b"garbage")


def _too_few(root):
    for name in ("a", "b"):
        _save(root / name / "0.png", np.zeros((4, 4), np.uint8), "PNG")


@pytest.mark.parametrize(
    "make, kwargs, message",
    [
        (_empty, {}, r"is empty"),
        (_files_only, {}, r"has no class subfolders"),
        (_one_class, {}, r"one class subfolder \('only'\).*needs at least 2 class subfolders"),
        (_class_without_images, {}, r"b' has no readable image \(no \.png/"),
        (_class_with_only_bad_images, {}, r"b' has no readable image \(1 unreadable\)"),
        (_too_few, {}, r"too few images \(2\) for a non-empty validation split"),
    ],
)
def test_bad_folders_raise(tmp_path, make, kwargs, message):
    root = tmp_path / "data"
    make(root)
    with pytest.raises(UsageError, match=message):
        datasets.load(str(root), **kwargs)


@pytest.mark.parametrize(
    "spec, kwargs, message",
    [
        ("mnist", {}, r"Unknown dataset 'mnist'\. Built-in: digits, shapes; or tfds:NAME"),
        ("./no/such/folder", {}, r"'\./no/such/folder' does not exist"),
        ("digits", {"validation_fraction": 0.0}, r"validation_fraction=0\.0 is out of range"),
        ("digits", {"test_fraction": 1.5}, r"test_fraction=1\.5 is out of range"),
        ("digits", {"validation_fraction": 0.5, "test_fraction": 0.5}, r"sum below 1"),
        ("shapes", {"shapes_classes": 9}, r"shapes_classes=9 is out of range: choose 2 to 8"),
        ("shapes", {"shapes_classes": 1}, r"shapes_classes=1 is out of range"),
        ("shapes", {"shapes_size": 8}, r"shapes_size=8 is out of range"),
        ("shapes", {"shapes_classes": 2, "shapes_count": 3},
         r"too few images \(3\) for a non-empty validation split"),
        ("tfds:no_such_dataset_xyz", {}, r"Unknown TensorFlow Datasets name 'no_such_dataset_xyz'"),
        ("tfds:imdb_reviews", {},
         r"tfds:imdb_reviews is not an image-classification set.*\(it has: text, label\)"),
    ],
)
def test_bad_specs_raise(tmp_path, spec, kwargs, message):
    with pytest.raises(UsageError, match=message):
        datasets.load(spec, data_dir=str(tmp_path), **kwargs)


def test_a_file_is_not_a_dataset_folder(tmp_path):
    path = _save(tmp_path / "x.png", np.zeros((4, 4), np.uint8), "PNG")
    with pytest.raises(UsageError, match=r"is a file: give a folder"):
        datasets.load(str(path))
