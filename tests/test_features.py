"""`dlsuite diagnose features`: a hand-set vertical-edge filter finds vertical
edges and is drawn as itself, saliency and Grad-CAM stay on the only quadrant
a classifier sees, a real classify run gets every picture and an index, and
bad input is one line with nothing written."""

import keras
import numpy as np
import pytest
from keras import layers
from PIL import Image

from dlsuite.apps import cli
from dlsuite.apps.diagnose import features


def run(capsys, *argv):
    status = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# A vertical-edge detector: dark on the left, bright on the right.
EDGE_KERNEL = np.array([[-1.0, 0.0, 1.0]] * 3)


def _edge_model(path):
    """conv1 -> relu -> pool1 -> conv2 -> GAP -> softmax, conv1's filter 0 the edge detector, the others zero."""
    pixels = keras.Input((16, 16, 3), name="pixels")
    x = layers.Conv2D(4, 3, padding="same", name="conv1")(pixels)
    x = layers.ReLU(name="relu1")(x)
    x = layers.MaxPooling2D(name="pool1")(x)
    x = layers.Conv2D(4, 3, padding="same", activation="relu", name="conv2")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = layers.Dense(2, name="predictions")(x)
    model = keras.Model(pixels, layers.Activation("softmax", name="probabilities")(x), name="edges")
    kernel = np.zeros((3, 3, 3, 4), dtype="float32")
    kernel[..., 0] = EDGE_KERNEL[:, :, None]
    model.get_layer("conv1").set_weights([kernel, np.zeros(4, dtype="float32")])
    model.save(path)
    return path


def _rectangles(count=12, size=16, seed=0):
    """Bright rectangles (random grey level) on black: vertical and horizontal edges alike."""
    rng = np.random.default_rng(seed)
    images = np.zeros((count, size, size, 3), dtype="float32")
    for image in images:
        top, left = rng.integers(1, size // 2, size=2)
        bottom, right = top + rng.integers(4, size // 2), left + rng.integers(4, size // 2)
        image[top:bottom, left:right] = rng.uniform(100, 255)
    return images


def _image_folder(folder, images):
    for index, image in enumerate(images):
        (folder / f"class{index % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.astype("uint8")).save(folder / f"class{index % 2}" / f"{index}.png")
    return folder


def test_an_edge_filter_finds_vertical_edges_and_is_drawn_as_itself(tmp_path):
    network = features.load_network(_edge_model(tmp_path / "edges.keras"))
    assert network.layer_names() == ["conv1", "pool1", "conv2"]
    found = features.top_patches(network.features, _rectangles(), ["conv1"], units=1, top_k=6)["conv1"][0]
    assert len(found.patches) == 6 and found.values[0] > 0
    for patch, window in zip(found.patches, found.windows):
        # Its 3x3 receptive field, clipped where it passes the image's edge.
        assert patch.shape[:2] == (window[1] - window[0], window[3] - window[2]) and max(patch.shape[:2]) == 3
        gray = patch.mean(axis=-1)
        across, down = np.square(np.diff(gray, axis=1)).sum(), np.square(np.diff(gray, axis=0)).sum()
        assert across > down  # a vertical edge: the pixels change left to right, not top to bottom

    cells = features.filter_grid(network.features.get_layer("conv1").kernel)
    assert cells.shape == (4, 3, 3, 3)
    expected = (EDGE_KERNEL - EDGE_KERNEL.min()) / (EDGE_KERNEL.max() - EDGE_KERNEL.min())
    np.testing.assert_allclose(cells[0], np.repeat(expected[:, :, None], 3, axis=2), atol=1e-6)
    assert not cells[1:].any()  # a constant filter is drawn black


def test_fields_map_positions_to_input_windows(tmp_path):
    network = features.load_network(_edge_model(tmp_path / "edges.keras"))
    fields = features.receptive_fields(network.features, ["conv1", "pool1", "conv2"])
    assert fields["conv1"] == features.Field(size=(3, 3), jump=(1, 1), offset=(-1, -1))  # 'same': centred on (i, j)
    assert (fields["conv2"].size, fields["conv2"].jump) == ((8, 8), (2, 2))
    assert fields["conv1"].window(0, 15, (16, 16)) == (0, 2, 14, 16)  # clipped to the image


def _quadrant_classifier(path, size=32):
    """Sees only the top-left quadrant: crop it, pad back with zeros, conv, GAP, Dense."""
    pixels = keras.Input((size, size, 3), name="pixels")
    half = size // 2
    x = layers.Cropping2D(((0, half), (0, half)), name="crop")(pixels)
    x = layers.ZeroPadding2D(((0, half), (0, half)), name="pad")(x)
    x = layers.Conv2D(8, 3, padding="same", use_bias=False, activation="relu", name="conv")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = layers.Dense(3, name="predictions")(x)
    model = keras.Model(pixels, layers.Activation("softmax", name="probabilities")(x), name="quadrant")
    # Class 0 rises with every channel, so it is the prediction and its Grad-CAM weights are positive.
    kernel = np.concatenate([np.ones((8, 1)), -np.ones((8, 2))], axis=1).astype("float32")
    model.get_layer("predictions").set_weights([kernel, np.zeros(3, dtype="float32")])
    model.save(path)
    return path


def test_saliency_and_grad_cam_stay_on_the_quadrant_the_classifier_sees(tmp_path):
    network = features.load_network(_quadrant_classifier(tmp_path / "quadrant.keras"))
    assert network.logits and network.class_names == ["0", "1", "2"]
    image = np.random.default_rng(0).uniform(0, 255, size=(32, 32, 3)).astype("float32")
    index, probability = features.predict(network, image)
    assert index == 0 and 1 / 3 < probability <= 1
    assert features.last_feature_map(network) == "conv"
    for heat in (features.gradient_saliency(network, image, index), features.grad_cam(network, image, index)):
        assert heat.shape == (32, 32) and heat.max() == pytest.approx(1.0)
        assert heat[:16, :16].sum() / heat.sum() > 0.9


def test_a_classify_run_gets_every_picture_and_an_index(tmp_path, capsys):
    run_dir, out = tmp_path / "run", tmp_path / "features"
    status, _, err = run(capsys, "classify", "train", "--dataset", "shapes", "--shapes-size", 32, "--shapes-count", 200,
                         "--epochs", 2, "--no-export", "--out", run_dir)
    assert status == 0, err
    status, output, err = run(capsys, "diagnose", "features", run_dir, "--out", out, "--units", 4, "--top-k", 3)
    assert status == 0, err
    assert output.strip().splitlines()[-1] == str(out / "index.html")
    patches = sorted(path.name for path in out.glob("top_patches_*.png"))
    assert patches == ["top_patches_conv1.png", "top_patches_conv2.png", "top_patches_pool1.png", "top_patches_pool2.png"]
    page = (out / "index.html").read_text(encoding="utf-8")
    for name in ["filters.png", "feature_maps.png", "saliency.png", *patches]:
        assert (out / name).stat().st_size > 1000
        assert f'src="{name}"' in page
    assert "http" not in page  # no external assets


def test_a_keras_file_with_an_image_folder(tmp_path, capsys):
    model = _edge_model(tmp_path / "edges.keras")
    folder = _image_folder(tmp_path / "images", _rectangles(count=6))
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    status, output, err = run(capsys, "diagnose", "features", model, "--images", folder, "--layer", "conv1",
                              "--image", folder / "class0" / "0.png", "--out", out)
    assert status == 0, err
    assert "6 images from" in output and "layers conv1;" in output
    assert sorted(path.name for path in out.iterdir()) == [
        "feature_maps.png", "filters.png", "index.html", "saliency.png", "top_patches_conv1.png"]


def test_a_registry_model_with_weights_shows_its_features_without_saliency(tmp_path, capsys):
    folder = _image_folder(tmp_path / "images", _rectangles(count=4, size=32))
    out = tmp_path / "out"
    status, output, err = run(capsys, "diagnose", "features", "lenet5", "--weights", "none", "--images", folder,
                              "--input-size", "32", "--out", out)
    assert status == 0, err
    assert output.startswith("lenet5 (random)") or "lenet5" in output.splitlines()[0]
    names = sorted(path.name for path in out.iterdir())
    assert "filters.png" in names and "index.html" in names and "saliency.png" not in names
    assert any(name.startswith("top_patches_") for name in names)


def test_an_export_is_rebuilt_with_its_head(tmp_path):
    from dlsuite.apps.vision import classifier, export

    mean, variance = np.full(3, 0.5, "float32"), np.full(3, 0.1, "float32")
    model = classifier.build_classifier("lenet5", classes=3, image_size=(32, 32), channels=3, mean=mean,
                                        variance=variance, batch_norm=True)
    architecture = {"backbone": "lenet5", "knobs": {"batch_norm": True}, "preprocessing": "standardize",
                    "statistics": {"mean": mean.tolist(), "variance": variance.tolist()}}
    folder = export.export_classifier(model, class_names=["a", "b", "c"], name="tiny", base_dir=tmp_path,
                                      architecture=architecture)
    network = features.load_network(folder.parent)
    assert network.class_names == ["a", "b", "c"] and network.layer_names()[0] == "conv1"
    pixels = np.random.default_rng(0).uniform(0, 255, size=(2, 32, 32, 3)).astype("float32")
    probabilities = keras.ops.softmax(network.scores(pixels))
    np.testing.assert_allclose(probabilities, model(pixels), atol=1e-5)
    assert features.grad_cam(network, pixels[0], 0).shape == (32, 32)


def _lm_model(path):
    tokens = keras.Input((12,), dtype="int32", name="tokens")
    x = layers.Embedding(50, 8)(tokens)
    x = layers.LSTM(8)(x)
    keras.Model(tokens, layers.Dense(50, activation="softmax")(x)).save(path)
    return path


@pytest.mark.parametrize("case, expected", [
    ("lm", "has no 2-D convolution layer"),
    ("layer", "--layer 'conv9' is not a conv/pool layer of"),
    ("empty", "--images folder"),
    ("missing", "does not exist"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case, expected):
    model = _lm_model(tmp_path / "lm.keras") if case == "lm" else _edge_model(tmp_path / "edges.keras")
    images = _image_folder(tmp_path / "images", _rectangles(count=2))
    extra = []
    if case == "layer":
        extra = ["--layer", "conv1", "--layer", "conv9"]
    elif case == "empty":
        images = tmp_path / "empty"
        (images / "cats").mkdir(parents=True)
    elif case == "missing":
        model = tmp_path / "nothing" / "model.keras"
    out = tmp_path / "out"
    status, output, err = run(capsys, "diagnose", "features", model, "--images", images, "--out", out, *extra)
    assert status == 2 and output == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dlsuite: error: ") and expected in lines[0], err
    if case == "layer":
        assert lines[0].endswith("choose from conv1, pool1, conv2")
    assert not out.exists()
