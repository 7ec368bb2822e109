"""SavedModel export for TF Serving: layout, signatures, TF-only reload, atomicity."""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from dlsuite import models
from dlsuite.apps.core import versions
from dlsuite.apps.vision import export
from dlsuite.apps.core.errors import UsageError
from dlsuite.apps.vision.export import ExportedClassifier

CLASS_NAMES = ["cat", "dog", "eel"]


def _sharpen(model, factor=3.0):
    """Scales the classifier's kernel so random weights give probabilities far
    from uniform yet not saturated, where a wrong resize or channel conversion
    moves them by far more than the 1e-5 the comparisons allow (checked below)."""
    dense = model.layers[-1]
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel * factor, bias])
    return model


def _lenet_classifier():
    """Grayscale 32x32 LeNet-5 with pixel scaling inside, as the app builds it."""
    inputs = keras.Input((32, 32, 1))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    return _sharpen(models.build("lenet5", input_tensor=x, classes=3))


def _zfnet_classifier():
    """RGB 53x53 ZFNet body (custom LocalResponseNormalization layers) + a small head."""
    inputs = keras.Input((53, 53, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    backbone = models.build("zfnet", input_tensor=x, include_top=False, pooling="avg")
    outputs = keras.layers.Dense(3, activation="softmax", name="predictions")(backbone.output)
    return _sharpen(keras.Model(inputs, outputs, name="zfnet_small"))


def _tiny_classifier():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))


BUILDERS = {"lenet5": _lenet_classifier, "zfnet": _zfnet_classifier}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Exports each classifier once for the whole module: name -> (model, folder)."""
    cache = {}

    def get(name):
        if name not in cache:
            keras.utils.set_random_seed(0)
            model = BUILDERS[name]()
            base_dir = tmp_path_factory.mktemp("saved_models")
            path = export.export_classifier(
                model, class_names=CLASS_NAMES, name=name, base_dir=base_dir
            )
            cache[name] = model, path
        return cache[name]

    return get


@pytest.fixture(params=sorted(BUILDERS))
def exported(request, exports):
    """(model, version folder) for each classifier."""
    return exports(request.param)


def _expected_pixels(model, pixels):
    """uint8/float pixels as float32 in the model's channel count."""
    pixels = tf.cast(pixels, tf.float32)
    channels = model.inputs[0].shape[-1]
    if channels == 1 and pixels.shape[-1] == 3:
        return tf.image.rgb_to_grayscale(pixels)
    if channels == 3 and pixels.shape[-1] == 1:
        return tf.tile(pixels, [1, 1, 1, 3])
    return pixels


def _expected(model, pixels):
    """The model's probabilities for pixels of any size, adapted as serving does."""
    resized = tf.image.resize(
        _expected_pixels(model, pixels), model.inputs[0].shape[1:3], method="bilinear"
    )
    return model.predict(resized, verbose=0)


def _other_channels(model):
    """Serving requests in the channel count the model does NOT take."""
    return 3 if model.inputs[0].shape[-1] == 1 else 1


def _write_image(path, pixels):
    Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(path)
    return path


def test_layout_metadata_and_next_version(exported, tmp_path):
    model, path = exported
    assert path.name == "1" and path.parent.parent.name.startswith("saved_models")
    assert (path / "saved_model.pb").is_file()
    assert (path / "variables" / "variables.index").is_file()
    assert (path / "assets" / "labels.txt").read_text().splitlines() == CLASS_NAMES
    metadata = json.loads((path / "assets" / "dlsuite.json").read_text())
    assert metadata["class_names"] == CLASS_NAMES
    assert metadata["input_size"] == list(model.inputs[0].shape[1:3])
    assert metadata["channels"] == model.inputs[0].shape[-1]
    # Only version folders: TF Serving would ignore a temp folder, but none may stay.
    assert sorted(os.listdir(path.parent)) == ["1"]
    # Each weight stored once (keras-team/keras#23553 would store it twice).
    stored = sum(
        int(np.prod(shape))
        for name, shape in tf.train.list_variables(str(path / "variables" / "variables"))
        if name != "_CHECKPOINTABLE_OBJECT_GRAPH"
    )
    assert stored == model.count_params()

    # A second export of the same name lands next to it as version 2.
    second = export.export_classifier(
        model, class_names=CLASS_NAMES, name="again", base_dir=tmp_path
    )
    third = export.export_classifier(
        model, class_names=CLASS_NAMES, name="again", base_dir=tmp_path
    )
    assert (second.name, third.name) == ("1", "2")
    assert sorted(os.listdir(tmp_path / "again")) == ["1", "2"]


def test_next_version_counts_integer_folders_only(tmp_path):
    assert versions.next_version(tmp_path / "missing") == 1
    assert versions.next_version(tmp_path) == 1
    for folder in ("1", "7", "abc", ".tmp-9-abcd"):
        (tmp_path / folder).mkdir()
    (tmp_path / "12").write_text("a file, not a version")
    assert versions.next_version(tmp_path) == 8


# Run with TensorFlow and numpy only: what TF Serving or any other client has.
# Keras and dlsuite are made unimportable (TensorFlow tolerates that), so a
# graph that still needed a Keras or dlsuite class could not load.
TF_ONLY_CLIENT = r"""
import json, pathlib, sys
for blocked in ("keras", "tf_keras", "dlsuite"):
    sys.modules[blocked] = None  # `import keras` now raises ImportError

import numpy as np
import tensorflow as tf

def plain(outputs):
    return {
        key: [v.decode() if isinstance(v, bytes) else v for v in value.numpy().tolist()]
        for key, value in outputs.items()
    }

folder = pathlib.Path(sys.argv[1])
loaded = tf.saved_model.load(sys.argv[2])
results = {}
pixels = np.load(folder / "pixels.npy")
for name, images in [("serving_default", pixels), ("serving_float", pixels.astype("float32"))]:
    results[name] = plain(loaded.signatures[name](images=tf.constant(images)))
files = sorted(folder.glob("*.png"))
results["serving_bytes"] = plain(
    loaded.signatures["serving_bytes"](image_bytes=tf.constant([f.read_bytes() for f in files]))
)
results["foreign_modules"] = sorted(
    name for name, module in sys.modules.items()
    if module is not None and name.split(".")[0] in ("keras", "tf_keras", "dlsuite")
)
print(json.dumps(results))
"""


def test_saved_model_serves_with_tensorflow_alone(exported, tmp_path):
    model, path = exported
    rng = np.random.default_rng(1)
    # Another size and channel count than the model's, to exercise the
    # in-graph resize and gray<->RGB conversion.
    pixels = rng.integers(0, 256, size=(4, 45, 37, _other_channels(model)), dtype=np.uint8)
    np.save(tmp_path / "pixels.npy", pixels)
    channels = model.inputs[0].shape[-1]
    pngs = [
        rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
        for height, width in [(40, 60), (53, 53), (21, 33)]
    ]
    for index, image in enumerate(pngs):
        _write_image(tmp_path / f"{index}.png", image)

    client = subprocess.run(
        [sys.executable, "-c", TF_ONLY_CLIENT, str(tmp_path), str(path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert client.returncode == 0, client.stderr[-3000:]
    results = json.loads(client.stdout.splitlines()[-1])

    assert results["foreign_modules"] == []
    expected = _expected(model, pixels)
    # The comparison can fail: nearest-neighbour resizing alone moves the
    # probabilities by orders of magnitude more than the tolerance.
    size = model.inputs[0].shape[1:3]
    nearest = model.predict(
        tf.image.resize(_expected_pixels(model, pixels), size, method="nearest"), verbose=0
    )
    assert np.abs(nearest - expected).max() > 1e-3
    for name in ("serving_default", "serving_float"):
        np.testing.assert_allclose(results[name]["probabilities"], expected, atol=1e-5)
        assert results[name]["class_index"] == expected.argmax(-1).tolist()
        assert results[name]["class_name"] == [CLASS_NAMES[i] for i in expected.argmax(-1)]
    from_files = np.concatenate([_expected(model, image[np.newaxis]) for image in pngs])
    np.testing.assert_allclose(results["serving_bytes"]["probabilities"], from_files, atol=1e-5)
    assert results["serving_bytes"]["class_name"] == [CLASS_NAMES[i] for i in from_files.argmax(-1)]


def test_saved_model_cli_lists_the_three_signatures(exports):
    _, path = exports("lenet5")  # one model is enough: the signatures are the same
    cli = pathlib.Path(sys.executable).parent / "saved_model_cli"
    command = (
        [str(cli)] if cli.exists()
        else [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
    )
    shown = subprocess.run(
        command + ["show", "--dir", str(path), "--all"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert shown.returncode == 0, shown.stderr[-3000:]
    text = shown.stdout
    for signature in ("serving_default", "serving_float", "serving_bytes"):
        assert f"signature_def['{signature}']" in text
    for fragment in ("inputs['images']", "inputs['image_bytes']", "DT_UINT8", "DT_STRING",
                     "outputs['probabilities']", "outputs['class_index']", "outputs['class_name']"):
        assert fragment in text


def test_exported_classifier_predicts_files_and_pixels(exported, tmp_path):
    model, path = exported
    channels = model.inputs[0].shape[-1]
    rng = np.random.default_rng(2)
    files = []
    for index, (height, width) in enumerate([(30, 50), (64, 64), (17, 23)]):
        image = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
        suffix = ".jpg" if index % 2 else ".png"
        files.append(_write_image(tmp_path / f"image{index}{suffix}", image))

    # The NAME folder: the highest version is picked.
    classifier = ExportedClassifier.load(path.parent)
    assert classifier.path == path
    assert classifier.class_names == CLASS_NAMES
    assert classifier.input_size == tuple(model.inputs[0].shape[1:3])
    assert classifier.channels == channels

    # JPEG is lossy: the reference decodes with TensorFlow too, as training does.
    decoded = [
        tf.io.decode_image(f.read_bytes(), channels=channels, expand_animations=False)
        for f in files
    ]
    expected = np.concatenate([_expected(model, image[np.newaxis]) for image in decoded])
    probabilities = classifier.predict_files(files, batch_size=2)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert [classifier.class_names[i] for i in probabilities.argmax(-1)] == [
        CLASS_NAMES[i] for i in expected.argmax(-1)
    ]

    pixels = rng.integers(0, 256, size=(3, 40, 40, channels), dtype=np.uint8)
    np.testing.assert_allclose(
        classifier.predict_pixels(pixels), _expected(model, pixels), atol=1e-5
    )
    np.testing.assert_allclose(
        classifier.predict_pixels(pixels.astype("float64")), _expected(model, pixels), atol=1e-5
    )
    if channels == 1:  # keras.datasets' (N, H, W) grayscale arrays
        np.testing.assert_allclose(
            classifier.predict_pixels(pixels[..., 0]), _expected(model, pixels), atol=1e-5
        )
    assert classifier.predict_files([]).shape == (0, 3)


def test_predict_files_reads_bmp_and_gif_in_the_model_channels(exported, tmp_path):
    """TensorFlow decodes BMP and GIF to 3 channels only (channels=1 raises), so
    a grayscale export goes through RGB as training does; decoding straight to
    one channel made every BMP or GIF "not a JPEG, PNG, BMP or GIF image"."""
    model, path = exported
    channels = model.inputs[0].shape[-1]
    image = np.random.default_rng(3).integers(0, 256, size=(21, 27, channels), dtype=np.uint8)
    files = [_write_image(tmp_path / f"image.{suffix}", image) for suffix in ("bmp", "gif")]
    decoded = [tf.io.decode_image(f.read_bytes(), channels=3, expand_animations=False).numpy() for f in files]
    if channels == 1:
        # Both store gray losslessly: the model sees the very pixels written.
        for pixels in decoded:
            np.testing.assert_array_equal(pixels, np.repeat(image, 3, axis=-1))
        decoded = [image, image]
    # GIF's palette changes RGB colours: the reference is what TensorFlow decodes.
    expected = np.concatenate([_expected(model, pixels[np.newaxis]) for pixels in decoded])
    probabilities = ExportedClassifier.load(path).predict_files(files)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)


def test_predict_files_names_the_bad_file(exported, tmp_path):
    _, path = exported
    classifier = ExportedClassifier.load(path)
    good = _write_image(tmp_path / "good.png", np.zeros((9, 9, 3), dtype=np.uint8))
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(UsageError, match="notes.png"):
        classifier.predict_files([good, bad])
    with pytest.raises(UsageError, match="missing.png"):
        classifier.predict_files([tmp_path / "missing.png"])
    with pytest.raises(UsageError, match=r"\(N, H, W, C\)"):
        classifier.predict_pixels(np.zeros((9, 9), dtype=np.uint8))


def _fail_in_write_out(self, filepath, **kwargs):
    # Leave something behind first, as a save interrupted midway would.
    pathlib.Path(filepath, "saved_model.pb").write_bytes(b"partial")
    raise RuntimeError("disk full")


def _fail(*args, **kwargs):
    raise RuntimeError("disk full")


@pytest.mark.parametrize(
    "target, attribute, replacement",
    [
        # ExportArchive() builds the backend's archive class; patch that one.
        (type(keras.export.ExportArchive()), "write_out", _fail_in_write_out),
        (export, "_write_metadata", _fail),  # the SavedModel is written by then
        (versions.os, "rename", _fail),  # the very last step
    ],
    ids=["saving", "metadata", "rename"],
)
def test_failed_export_leaves_nothing_behind(tmp_path, monkeypatch, target, attribute, replacement):
    model = _tiny_classifier()
    export.export_classifier(model, class_names=CLASS_NAMES, name="kept", base_dir=tmp_path)
    monkeypatch.setattr(target, attribute, replacement)

    with pytest.raises(RuntimeError, match="disk full"):
        export.export_classifier(model, class_names=CLASS_NAMES, name="kept", base_dir=tmp_path)
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_classifier(model, class_names=CLASS_NAMES, name="fresh", base_dir=tmp_path)

    assert sorted(os.listdir(tmp_path / "kept")) == ["1"]
    assert sorted(os.listdir(tmp_path)) == ["kept"]  # "fresh" never appeared


@pytest.mark.parametrize("name", ["a/b", "..", ".", "", "a b", "../up", "x\\y", None])
def test_bad_export_names_are_usage_errors(name, tmp_path):
    with pytest.raises(UsageError, match=r"Invalid export name .*e\.g\. 'mnist-lenet5'"):
        versions.check_export_name(name)
    with pytest.raises(UsageError, match="Invalid export name"):
        export.export_classifier(
            _tiny_classifier(), class_names=CLASS_NAMES, name=name, base_dir=tmp_path
        )
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["mnist-lenet5", "v1.2_final", "A"])
def test_good_export_names_pass(name):
    assert versions.check_export_name(name) == name


class _Subclassed(keras.Model):
    def call(self, inputs):
        return inputs


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"class_names": ["a", "b"]}, "3 classes but 2 class names"),
        ({"class_names": ["a", "a", "b"]}, "unique"),
        ({"class_names": ["a", "b\nc", "d"]}, "single lines"),
        ({"version": 0}, "positive integer"),
        ({"version": "2"}, "positive integer"),
        ({"model": "sequence"}, r"fixed image input \(batch, H, W, 1 or 3\)"),
        ({"model": "subclassed"}, "Only a built functional model"),
    ],
)
def test_export_argument_errors(tmp_path, changes, message):
    arguments = {
        "model": _tiny_classifier(), "class_names": CLASS_NAMES, "name": "m",
        "base_dir": tmp_path, **changes,
    }
    if arguments["model"] == "sequence":
        arguments["model"] = keras.Sequential([keras.Input((5, 4)), keras.layers.Dense(3)])
    elif arguments["model"] == "subclassed":
        arguments["model"] = _Subclassed()
    with pytest.raises(UsageError, match=message):
        export.export_classifier(arguments.pop("model"), **arguments)
    assert os.listdir(tmp_path) == []  # checked before anything is written


def test_an_existing_version_is_never_overwritten(tmp_path):
    model = _tiny_classifier()
    export.export_classifier(
        model, class_names=CLASS_NAMES, name="m", base_dir=tmp_path, version=5
    )
    with pytest.raises(UsageError, match=r"already exists.*next one \(6\)"):
        export.export_classifier(
            model, class_names=CLASS_NAMES, name="m", base_dir=tmp_path, version=5
        )
    assert sorted(os.listdir(tmp_path / "m")) == ["5"]


def test_unwritable_base_dir_is_a_usage_error_naming_it(tmp_path):
    occupied = tmp_path / "a-file"
    occupied.write_text("not a folder")
    with pytest.raises(UsageError, match="Cannot write exports to .*a-file"):
        export.export_classifier(
            _tiny_classifier(), class_names=CLASS_NAMES, name="m", base_dir=occupied
        )
    if os.geteuid() != 0:  # root writes anywhere, whatever the mode says
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(UsageError, match="Cannot write exports to .*locked"):
            export.export_classifier(
                _tiny_classifier(), class_names=CLASS_NAMES, name="m", base_dir=locked
            )


def test_load_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        ExportedClassifier.load(tmp_path / "nothing")
    (tmp_path / "empty" / "1").mkdir(parents=True)
    with pytest.raises(UsageError, match="No exported model"):
        ExportedClassifier.load(tmp_path / "empty")
    # A SavedModel, but not one of ours: no dlsuite.json beside it.
    module = tf.Module()
    module.double = tf.function(lambda x: 2 * x, input_signature=[tf.TensorSpec((None,))])
    tf.saved_model.save(module, str(tmp_path / "foreign" / "1"))
    with pytest.raises(UsageError, match="not an image classifier exported by dlsuite"):
        ExportedClassifier.load(tmp_path / "foreign")
