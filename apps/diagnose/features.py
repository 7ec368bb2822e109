"""`dlsuite diagnose features`: see what a network learned.

The pictures of Zeiler & Fergus, "Visualizing and Understanding Convolutional
Networks" (ZFNet, 2014), and of the saliency papers after it, for a CNN this
suite trained:

* the first convolution's filters (edge and colour detectors, if it learned);
* the feature maps of a few layers for one image: different features are
  detected at each layer;
* for each of the first units of a layer, the image patches of a set that
  excite it most, cropped to the unit's receptive field: small edge-like
  patches early, larger object parts later;
* a gradient saliency map (Simonyan et al. 2014) and Grad-CAM (Selvaraju et
  al. 2017) for the classifier's prediction on one image.

A `Network` comes from a classify or transfer run (`model.keras`), a `.keras`
file or a classifier export (`saved_models/NAME[/VERSION]`, rebuilt by
`vision.backbones`); every model takes raw pixels 0..255, its preprocessing
inside. This module knows nothing of argparse; `diagnose/cli.py` drives it.
"""

import dataclasses
import html
import json
import os
import pathlib
import sys

import keras
import numpy as np
import tensorflow as tf

from dlsuite.apps.core import keras_files, saved_models
from dlsuite.apps.core.errors import UsageError

DEFAULT_LAYERS = 4  # feature-map layers picked when --layer is absent
MAP_CHANNELS = 16  # channels shown per layer in feature_maps.png
MODEL_FORMS = ("a classify run directory, a .keras file, an export folder (saved_models/NAME[/VERSION]) or a "
               "registry CNN name with --weights")

_CONV = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)
_POOL = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)


def _identity(features):
    return features


@dataclasses.dataclass
class Network:
    """A CNN ready to be looked at.

    Attributes:
        features: a flat functional keras.Model from float pixels 0..255
            (batch, H, W, C) to its output; every layer looked at is in it.
        head: callable from `features`' output to class scores (batch, K), or
            None when the model is not a classifier.
        logits: True when the scores are pre-softmax logits (Grad-CAM's y^c).
        class_names: K names (indices as text when none were saved).
        source: where the model came from, for titles.
        run_dir: the classify run it belongs to (its data is the default image set), or None.
    """

    features: keras.Model
    head: object
    logits: bool
    class_names: list
    source: str
    run_dir: pathlib.Path | None = None

    @property
    def input_size(self):
        return tuple(int(d) for d in self.features.input.shape[1:3])

    @property
    def channels(self):
        return int(self.features.input.shape[-1])

    def layer_names(self):
        """The 2-D convolution and pooling layers, bottom to top: what --layer accepts."""
        return [layer.name for layer in self.features.layers if isinstance(layer, _CONV + _POOL)]

    def scores(self, pixels):
        return self.head(self.features(pixels, training=False))


# --- loading ------------------------------------------------------------------


def load_network(path, *, weights=None, input_size=None, trust_model=False):
    """A `Network` from a run directory, a `.keras` file, an export folder, or
    a registry CNN (`path` its name) with `weights` (imagenet, a weights
    file, none) at `input_size`, its pixel preprocessing inside.
    `trust_model`: an export may read or write files or print (`core.saved_models`).

    Raises:
        UsageError: a missing path, a file that is not a Keras model, a model
            without a 2-D convolution or without a fixed image input.
    """
    from dlsuite import models

    path = pathlib.Path(path)
    if not path.exists() and str(path) in models.names(kind="cnn"):
        network = _from_registry(str(path), weights=weights, input_size=input_size)
        _check_cnn(network)
        return network
    if not path.exists():
        raise UsageError(f"model {str(path)!r} does not exist; pass {MODEL_FORMS}", option="model")
    if path.is_dir() and (path / "model.keras").is_file():
        network = _from_keras(path / "model.keras", run_dir=path)
    elif path.is_file() and path.suffix == ".keras":
        network = _from_keras(path, run_dir=path.parent if (path.parent / "config.json").is_file() else None)
    elif path.is_dir():
        network = _from_export(path, trust_model=trust_model)
    else:
        raise UsageError(f"model {str(path)!r} is not {MODEL_FORMS}", option="model")
    _check_cnn(network)
    return network


def _from_registry(name, *, weights, input_size):
    """A registry CNN without its top, as `transfer extract` builds it: no
    classifier head, so the report has no saliency."""
    from dlsuite.apps.vision import backbones

    base = backbones.build_base(name, weights=backbones.check_weights_argument(name, weights or "none"),
                                input_size=input_size, channels=3)
    return Network(base.model, None, False, [], f"{name} ({base.source})", None)


def _check_cnn(network):
    if not any(isinstance(layer, _CONV) for layer in network.features.layers):
        raise UsageError(f"{network.source} has no 2-D convolution layer: `diagnose features` looks at CNNs "
                         f"(pass {MODEL_FORMS} of an image model)", option="model")
    shape = tuple(network.features.input.shape)
    if len(shape) != 4 or None in shape[1:] or shape[-1] not in (1, 3):
        raise UsageError(f"{network.source} takes inputs of shape {shape[1:]}; `diagnose features` needs a fixed "
                         "image input (height, width, 1 or 3)", option="model")


def _from_keras(path, *, run_dir):
    from dlsuite.apps.vision import backbones  # registers the suite's custom layers

    model = keras_files.load(path, option="model")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UsageError(f"{str(path)!r} has {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
                         "`diagnose features` takes an image model with one of each", option="model")
    saved_names = _run_class_names(run_dir)

    def names_of(classes):
        return saved_names if saved_names and len(saved_names) == classes else [str(i) for i in range(classes)]

    if any(layer.name == backbones.BACKBONE_LAYER for layer in model.layers):  # a transfer model
        inner = model.get_layer(backbones.BACKBONE_LAYER)
        features = keras.Model(inner.input, inner.output, name=backbones.BACKBONE_LAYER)
        tail = model.layers[model.layers.index(inner) + 1:]
        head, logits = _chain(tail, tuple(inner.output.shape[1:]))
        return Network(features, head, logits, names_of(int(model.output.shape[-1])), str(path), run_dir)
    last = model.layers[-1]
    if len(model.output.shape) != 2:
        return Network(model, None, False, [], str(path), run_dir)
    cut = _is_softmax(last)
    features = keras.Model(model.input, last.input, name=model.name) if cut else model
    # Scores straight out of a Dense layer without activation are logits too.
    logits = cut or getattr(getattr(last, "activation", None), "__name__", "") == "linear"
    return Network(features, _identity, logits, names_of(int(model.output.shape[-1])), str(path), run_dir)


def _is_softmax(layer):
    if isinstance(layer, keras.layers.Softmax):
        return True
    return isinstance(layer, keras.layers.Activation) and getattr(layer.activation, "__name__", "") == "softmax"


def _chain(layers, input_shape):
    """A head from a chain of layers applied to a new input; the final softmax left off.

    Returns (model from the chain's input to the scores, whether they are logits).
    """
    logits = bool(layers) and _is_softmax(layers[-1])
    inputs = keras.Input(input_shape)
    x = inputs
    for layer in layers[:-1] if logits else layers:
        x = layer(x)
    model = keras.Model(inputs, x, name="head")
    return (lambda features: model(features, training=False)), logits


def _run_class_names(run_dir):
    """The class names a run saved in config.json ("resolved"), or None."""
    if run_dir is None:
        return None
    try:
        saved = json.loads((pathlib.Path(run_dir) / "config.json").read_text(encoding="utf-8"))
        return [str(name) for name in saved["resolved"]["class_names"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _from_export(path, *, trust_model=False):
    """A classify export: the backbone from `backbones.build_base`, the head rebuilt from the registry."""
    from dlsuite import models
    from dlsuite.apps.core import versions
    from dlsuite.apps.vision import backbones, export

    version_dir = versions.resolve_version_dir(path)
    base = backbones.build_base(None, weights=str(version_dir), trust_model=trust_model)
    metadata = json.loads((version_dir / "assets" / export.METADATA_FILE).read_text(encoding="utf-8"))
    class_names = [str(name) for name in metadata["class_names"]]
    architecture = base.architecture
    knobs = {key: value for key, value in architecture.get("knobs", {}).items() if value is not None}
    full = models.build(architecture["backbone"], include_top=True, classes=len(class_names), classifier_activation=None,
                        input_shape=(*base.input_size, base.channels), **knobs)
    names = [layer.name for layer in full.layers]
    tail = full.layers[names.index(base.model.layers[-1].name) + 1:]
    head, _ = _chain(tail, tuple(base.model.output.shape[1:]))
    # Kept alive: the signature only holds weak references.
    loaded = saved_models.load(version_dir, trust_model=trust_model, signatures=("serving_default",))
    saved = {variable.name.rsplit(":", 1)[0]: variable for variable in loaded.signatures["serving_default"].variables}
    for layer in tail:
        for weight in layer.weights:
            if weight.path not in saved or tuple(saved[weight.path].shape) != tuple(weight.shape):
                raise UsageError(f"the export {str(version_dir)!r} has no weights of shape {tuple(weight.shape)} for "
                                 f"{weight.path}; pass the run directory instead", option="model")
            weight.assign(saved[weight.path].numpy())
    return Network(base.model, head, True, class_names, str(version_dir))


# --- images -------------------------------------------------------------------


@dataclasses.dataclass
class Images:
    """Images at the model's size: float32 (N, H, W, C), raw pixels 0..255."""

    pixels: np.ndarray
    source: str


def load_images(network, *, folder=None, max_images=500, image=None):
    """The image set: `folder` (images, or class subfolders of images), else
    the test split of the network's classify run, else `image` alone; at most
    `max_images`.

    Raises:
        UsageError: no folder and no run data, an empty or unreadable folder.
    """
    if folder is not None:
        paths = _image_files(pathlib.Path(folder))
        pixels = decode_files(paths[:max_images], network.input_size, network.channels)
        return Images(pixels, f"{len(pixels)} images from {folder}")
    if network.run_dir is None and image is not None:
        return Images(np.asarray(image, dtype="float32")[None], "the one image given")
    if network.run_dir is None:
        raise UsageError(f"images: none given, and {network.source} is not in a classify run directory to take its "
                         "test images from; pass a folder of images (or of class subfolders of images)", option="images")
    from dlsuite.apps import table
    from dlsuite.apps.core import train_args
    from dlsuite.apps.vision import datasets, pipeline

    config_class = table.get("classify").task_class().config_class
    data = datasets.load_configured(train_args.saved_config(config_class, network.run_dir))
    test = data.sources["test"]
    batches = pipeline.batches(test.subset(range(min(max_images, test.count))), image_size=network.input_size,
                               channels=network.channels, batch_size=64, training=False, cache=None)
    pixels = np.concatenate([np.asarray(images, dtype="float32") for images, _ in batches])
    return Images(pixels, f"{len(pixels)} test images of {data.name}")


def _image_files(folder):
    """Readable image files in `folder` and its class subfolders, sorted; unreadable ones reported on stderr."""
    from dlsuite.apps.vision import file_checks

    if not folder.is_dir():
        raise UsageError(f"images {str(folder)!r} is not a folder; pass a folder of images", option="images")
    paths = sorted(str(p) for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in file_checks.IMAGE_EXTENSIONS)
    class_names, files = file_checks.list_class_files(folder)
    paths += [path for name in class_names for path in files[name]]
    if not paths:
        raise UsageError(f"images folder {str(folder)!r} holds no {'/'.join(file_checks.IMAGE_EXTENSIONS)} files, "
                         "directly or in class subfolders; put images there", option="images")
    checks = file_checks.check_images(paths, strict=False)
    for check in checks:
        if check.reason:
            print(f"skipped {check.path}: {check.reason}", file=sys.stderr)
    good = [check.path for check in checks if check.reason is None]
    if not good:
        raise UsageError(f"images folder {str(folder)!r}: none of its {len(paths)} image files can be read",
                         option="images")
    return good


def load_image(network, path):
    """One image file at the model's size, float32 (H, W, C) 0..255."""
    from dlsuite.apps.vision import file_checks

    if not os.path.isfile(path):
        raise UsageError(f"image {str(path)!r} does not exist; pass an image file", option="image")
    reason = file_checks.check_images([str(path)], strict=False)[0].reason
    if reason:
        raise UsageError(f"image {str(path)!r} cannot be read: {reason}", option="image")
    return decode_files([str(path)], network.input_size, network.channels)[0]


def decode_files(paths, size, channels):
    """Decodes and resizes as training does (`pipeline.batches`: bilinear, channels matched)."""
    from dlsuite.apps.vision import datasets, pipeline

    batches = pipeline.batches(datasets.file_source(list(paths), channels=3), image_size=size, channels=channels,
                               batch_size=64, training=False, cache=None)
    return np.concatenate([np.asarray(images, dtype="float32") for images, _ in batches])


# --- layers and receptive fields ----------------------------------------------


def choose_layers(network, requested=None):
    """--layer names checked against the conv/pool layers, or DEFAULT_LAYERS of them
    spread from the first to the last (1x1 maps left out: nothing to see there)."""
    valid = network.layer_names()
    if requested:
        unknown = [name for name in requested if name not in valid]
        if unknown:
            raise UsageError(f"layer {unknown[0]!r} is not a conv/pool layer of {network.source}; "
                             f"choose from {', '.join(valid)}", option="layer")
        return list(dict.fromkeys(requested))
    spatial = [name for name in valid if np.prod(network.features.get_layer(name).output.shape[1:3]) > 1] or valid
    picks = np.linspace(0, len(spatial) - 1, min(DEFAULT_LAYERS, len(spatial))).round().astype(int)
    return [spatial[i] for i in dict.fromkeys(picks.tolist())]


@dataclasses.dataclass(frozen=True)
class Field:
    """Where an output position of a layer looks in the input, per axis (rows, columns).

    `size` and `jump` (the product of the strides) come from
    `models.summary.layer_table`. `offset` is where position 0's window
    starts: the padding is approximated by centring the grid of windows on
    the image, `offset = -max(0, (n_out - 1) * jump + size - n_in) // 2`.
    That is exact for 'valid' padding (offset 0) and for one 'same' layer;
    through a stack of 'same' layers it can be a pixel or two off, since
    TensorFlow pads more on the bottom/right.
    """

    size: tuple
    jump: tuple
    offset: tuple

    def window(self, i, j, image_shape):
        """(top, bottom, left, right) of position (i, j)'s field, clipped to the image."""
        top, left = self.offset[0] + i * self.jump[0], self.offset[1] + j * self.jump[1]
        return (max(0, top), min(image_shape[0], top + self.size[0]),
                max(0, left), min(image_shape[1], left + self.size[1]))


def receptive_fields(model, names):
    """{layer name: Field} for the layers `names` of a flat functional model."""
    from dlsuite.models import summary

    table = {row["name"]: row for row in summary.layer_table(model)}
    image = tuple(int(d) for d in model.input.shape[1:3])
    fields = {}
    for name in names:
        row = table[name]
        grid = row["output_shape"][:2]
        offset = tuple(-(max(0, (n - 1) * j + s - n_in) // 2)
                       for n, j, s, n_in in zip(grid, row["jump"], row["receptive_field"], image))
        fields[name] = Field(tuple(row["receptive_field"]), tuple(row["jump"]), offset)
    return fields


# --- what the pictures show ---------------------------------------------------


def first_conv(network):
    """The first Conv2D layer (its kernel is what filters.png shows), or None."""
    return next((layer for layer in network.features.layers if isinstance(layer, keras.layers.Conv2D)), None)


def filter_grid(kernel):
    """Kernels (kh, kw, C_in, C_out) -> cells (C_out, kh, kw, 3 or 1), each scaled to 0..1.

    RGB when there are 3 input channels, else the mean over the input
    channels in gray; a constant filter is all zeros.
    """
    kernel = np.asarray(kernel, dtype="float64")
    cells = kernel if kernel.shape[2] == 3 else kernel.mean(axis=2, keepdims=True)
    cells = np.moveaxis(cells, -1, 0)  # (C_out, kh, kw, 3 or 1)
    low = cells.min(axis=(1, 2, 3), keepdims=True)
    span = cells.max(axis=(1, 2, 3), keepdims=True) - low
    return np.where(span > 0, (cells - low) / np.where(span > 0, span, 1), 0.0)


def activations(model, pixels, names, batch_size=32):
    """{layer name: float32 array (N, h, w, C)} for `pixels` (N, H, W, C)."""
    probe = keras.Model(model.input, [model.get_layer(name).output for name in names])
    outputs = [[] for _ in names]
    for start in range(0, len(pixels), batch_size):
        values = probe(pixels[start:start + batch_size], training=False)
        values = values if isinstance(values, (list, tuple)) else [values]
        for store, value in zip(outputs, values):
            store.append(np.asarray(value, dtype="float32"))
    return {name: np.concatenate(store) for name, store in zip(names, outputs)}


@dataclasses.dataclass
class UnitPatches:
    """The image patches that excite one unit (channel) most, strongest first.

    Attributes:
        unit: the channel index.
        values: its maximum activation in each chosen image.
        images: the index of each image in the set.
        windows: (top, bottom, left, right) of each patch in input pixels.
        patches: float32 (h, w, C) pixels 0..255 of each patch (clipped to the image).
    """

    unit: int
    values: list
    images: list
    windows: list
    patches: list


def top_patches(model, pixels, names, *, units=8, top_k=6, batch_size=32):
    """{layer: [UnitPatches for its first `units` channels]} over the image set `pixels`.

    As in ZFNet, each unit's strongest activations come from different
    images: per image the maximum over positions, then the `top_k` images
    with the highest maximum, each cropped to the field of that position.
    """
    fields = receptive_fields(model, names)
    probe = keras.Model(model.input, [model.get_layer(name).output for name in names])
    best = {name: ([], []) for name in names}  # per batch: max (B, U), flat argmax (B, U)
    for start in range(0, len(pixels), batch_size):
        values = probe(pixels[start:start + batch_size], training=False)
        for name, value in zip(names, values if isinstance(values, (list, tuple)) else [values]):
            value = np.asarray(value, dtype="float32")[..., :units]
            flat = value.reshape(len(value), -1, value.shape[-1])  # (B, h*w, U)
            best[name][0].append(flat.max(axis=1))
            best[name][1].append(flat.argmax(axis=1))
    result = {}
    for name in names:
        maxima, positions = (np.concatenate(part) for part in best[name])
        width = model.get_layer(name).output.shape[2]
        result[name] = [_unit_patches(unit, maxima[:, unit], positions[:, unit], width, fields[name], pixels, top_k)
                        for unit in range(maxima.shape[1])]
    return result


def _unit_patches(unit, maxima, positions, width, field, pixels, top_k):
    order = np.argsort(-maxima, kind="stable")[:top_k]
    found = UnitPatches(unit, [], [], [], [])
    for index in order:
        i, j = divmod(int(positions[index]), int(width))
        top, bottom, left, right = field.window(i, j, pixels.shape[1:3])
        found.values.append(float(maxima[index]))
        found.images.append(int(index))
        found.windows.append((top, bottom, left, right))
        found.patches.append(pixels[index, top:bottom, left:right])
    return found


def last_feature_map(network):
    """The layer Grad-CAM looks at: the last one after the first convolution
    whose output is a feature map larger than 1x1 (a block's output, not its
    1x1 end as in LeNet-5's C5)."""
    layers = network.features.layers
    start = next(i for i, layer in enumerate(layers) if isinstance(layer, _CONV))
    maps = [layer.name for layer in layers[start:]
            if len(layer.output.shape) == 4 and np.prod(layer.output.shape[1:3]) > 1]
    return maps[-1] if maps else layers[start].name


def _normalized(heat):
    heat = np.asarray(heat, dtype="float32")
    peak = heat.max()
    return heat / peak if peak > 0 else heat


def predict(network, image):
    """(class index, probability) of the classifier's prediction on `image` (H, W, C)."""
    scores = np.asarray(network.scores(image[None]), dtype="float32")[0]
    probabilities = np.asarray(tf.nn.softmax(scores)) if network.logits else scores
    index = int(np.argmax(scores))
    return index, float(probabilities[index])


def gradient_saliency(network, image, class_index):
    """|d score_c / d pixel|, the maximum over channels, scaled to 0..1 (H, W) (Simonyan et al. 2014)."""
    pixels = tf.constant(image[None], dtype=tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(pixels)
        score = network.scores(pixels)[0, class_index]
    gradient = tape.gradient(score, pixels)[0]
    return _normalized(np.abs(np.asarray(gradient)).max(axis=-1))


def grad_cam(network, image, class_index, layer=None):
    """Grad-CAM (Selvaraju et al. 2017) on `layer` (default `last_feature_map`): (H, W) in 0..1.

    The weight of channel k is the global average of d y^c / d A_k; the map
    relu(sum_k w_k A_k) is resized bilinearly to the input (its grid spans
    the image, up to the padding `Field` describes).
    """
    layer = layer or last_feature_map(network)
    probe = keras.Model(network.features.input, [network.features.get_layer(layer).output, network.features.output])
    with tf.GradientTape() as tape:
        maps, features = probe(tf.constant(image[None], dtype=tf.float32), training=False)
        score = network.head(features)[0, class_index]
    gradients = tape.gradient(score, maps)  # (1, h, w, K)
    weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * maps, axis=-1))[0]  # (h, w)
    cam = tf.image.resize(cam[..., None], network.input_size, method="bilinear")[..., 0]
    return _normalized(cam)


# --- pictures -----------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _show(axis, picture, *, scale=255.0, **kwargs):
    """Pixels (h, w, 1 or 3) in 0..scale, gray or RGB; no ticks."""
    picture = np.clip(np.asarray(picture, dtype="float32") / scale, 0, 1)
    if picture.shape[-1] == 1:
        axis.imshow(picture[..., 0], cmap="gray", vmin=0, vmax=1, **kwargs)
    else:
        axis.imshow(picture, **kwargs)
    axis.set_xticks([])
    axis.set_yticks([])


def _grid(plt, rows, cols, *, cell=1.1, title=None):
    figure, axes = plt.subplots(rows, cols, figsize=(max(4, cols * cell), max(2, rows * cell + 0.6)), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    if title:
        figure.suptitle(title, fontsize=10)
    return figure, axes


def plot_filters(cells, path, *, title):
    """filters.png: one cell per filter of the first convolution (`filter_grid`)."""
    from dlsuite.apps.core import rundir

    plt = _pyplot()
    cols = int(np.ceil(np.sqrt(len(cells))))
    figure, axes = _grid(plt, int(np.ceil(len(cells) / cols)), cols, title=title)
    for index, (axis, cell) in enumerate(zip(axes.ravel(), cells)):
        axis.axis("on")
        _show(axis, cell, scale=1.0, interpolation="nearest")
        axis.set_title(str(index), fontsize=7)
    rundir.save_figure(figure, path)


def plot_feature_maps(image, maps, path, *, title):
    """feature_maps.png: the image, then one row per layer of its first MAP_CHANNELS channels."""
    from dlsuite.apps.core import rundir

    plt = _pyplot()
    figure, axes = _grid(plt, 1 + len(maps), MAP_CHANNELS, cell=0.9, title=title)
    axes[0, 0].axis("on")
    _show(axes[0, 0], image)
    axes[0, 0].set_title("input", fontsize=7)
    for row, (name, values) in enumerate(maps.items(), start=1):
        for channel in range(min(MAP_CHANNELS, values.shape[-1])):
            axis = axes[row, channel]
            axis.axis("on")
            axis.imshow(values[..., channel], cmap="viridis", interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
        axes[row, 0].set_ylabel(f"{name}\n{'x'.join(map(str, values.shape))}", fontsize=6)
    rundir.save_figure(figure, path)


def plot_top_patches(units, path, *, title):
    """top_patches_<layer>.png: a row per unit, its strongest patches left to right."""
    from dlsuite.apps.core import rundir

    plt = _pyplot()
    cols = max(1, max(len(unit.patches) for unit in units))
    figure, axes = _grid(plt, len(units), cols, cell=1.0, title=title)
    for row, unit in enumerate(units):
        for col, (patch, value) in enumerate(zip(unit.patches, unit.values)):
            axis = axes[row, col]
            axis.axis("on")
            _show(axis, patch, interpolation="nearest")
            axis.set_title(f"{value:.3g}", fontsize=6)
        axes[row, 0].set_ylabel(f"unit {unit.unit}", fontsize=7)
    rundir.save_figure(figure, path)


def plot_saliency(image, saliency, cam, path, *, title, cam_layer):
    """saliency.png: the image, the gradient saliency over it, Grad-CAM over it."""
    from dlsuite.apps.core import rundir

    plt = _pyplot()
    figure, axes = _grid(plt, 1, 3, cell=3.0, title=title)
    panels = ((None, "image", None), (saliency, "gradient saliency |d score / d pixel|", "hot"),
              (cam, f"Grad-CAM on {cam_layer}", "jet"))
    for axis, (heat, label, colours) in zip(axes[0], panels):
        axis.axis("on")
        _show(axis, image)
        if heat is not None:
            axis.imshow(heat, cmap=colours, alpha=0.5, vmin=0, vmax=1)
        axis.set_title(label, fontsize=8)
    rundir.save_figure(figure, path)


def write_index(path, *, title, facts, sections):
    """index.html: the pictures with a line each; relative links, no external assets.

    Args:
        facts: lines shown under the title (model, images, layers).
        sections: (heading, file name, caption) per picture.
    """
    escape = html.escape
    parts = [f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}img{max-width:100%}</style>",
             f"</head><body>\n<h1>{escape(title)}</h1>\n<ul>"]
    parts += [f"<li>{escape(fact)}</li>" for fact in facts]
    parts.append("</ul>")
    for heading, name, caption in sections:
        parts.append(f"<h2>{escape(heading)}</h2>\n<p>{escape(caption)}</p>\n"
                     f"<img src=\"{escape(name)}\" alt=\"{escape(heading)}\">")
    parts.append("</body></html>\n")
    path = pathlib.Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("\n".join(parts), encoding="utf-8")
    os.replace(temporary, path)


# --- the whole report -----------------------------------------------------------


def write_report(network, images, image, *, layers, units, top_k, out, image_label="the first image of the set"):
    """Every picture into `out`, and index.html; returns the index's path.

    Args:
        images: the `Images` searched for top patches.
        image: float32 (H, W, C) pixels for the feature maps and the saliency.
        layers: conv/pool layer names (`choose_layers`).
        units, top_k: channels per layer and patches per channel.
        image_label: what `image` is, for the index.
    """
    out = pathlib.Path(out)
    sections = []
    conv = first_conv(network)
    if conv is not None:
        cells = filter_grid(conv.kernel)
        plot_filters(cells, out / "filters.png", title=f"{conv.name}: {len(cells)} filters "
                                                       f"{conv.kernel.shape[0]}x{conv.kernel.shape[1]}")
        sections.append((f"Filters of {conv.name}", "filters.png",
                         "Each kernel scaled to 0..1 on its own (RGB for 3 input channels, else the mean over "
                         "them in gray): trained first layers show oriented edges and colour blobs."))
    maps = {name: values[0] for name, values in activations(network.features, image[None], layers).items()}
    plot_feature_maps(image, maps, out / "feature_maps.png", title="activations for one image")
    sections.append(("Feature maps", "feature_maps.png",
                     f"The first {MAP_CHANNELS} channels of each layer for one image: each layer detects "
                     "other features, simple at the bottom, more abstract at the top."))
    fields = receptive_fields(network.features, layers)
    for name, found in top_patches(network.features, images.pixels, layers, units=units, top_k=top_k).items():
        field = fields[name]
        file_name = f"top_patches_{_safe(name)}.png"
        plot_top_patches(found, out / file_name, title=f"{name}: receptive field {field.size[0]}x{field.size[1]} px, "
                                                        f"stride {field.jump[0]}")
        sections.append((f"Top patches of {name}", file_name,
                         f"For each of the first {len(found)} units, the {top_k} patches of {images.source} that "
                         "excite it most (one per image, the value above each), cropped to its receptive field."))
    if network.head is not None:
        sections.append(_saliency_section(network, image, out))
    write_index(out / "index.html", title="What the network learned",
                facts=[f"model: {network.source}", f"images: {images.source}", f"layers: {', '.join(layers)}",
                       f"feature maps and saliency: {image_label}"],
                sections=sections)
    return out / "index.html"


def _saliency_section(network, image, out):
    index, probability = predict(network, image)
    cam_layer = last_feature_map(network)
    saliency = gradient_saliency(network, image, index)
    cam = grad_cam(network, image, index, cam_layer)
    name = network.class_names[index] if index < len(network.class_names) else str(index)
    plot_saliency(image, saliency, cam, out / "saliency.png", cam_layer=cam_layer,
                  title=f"predicted {name} (p={probability:.2f})")
    return ("Saliency", "saliency.png",
            f"Where the prediction {name!r} comes from: the gradient of its score with respect to the pixels, "
            f"and Grad-CAM on {cam_layer} (the gradient-weighted sum of its channels).")


def _safe(name):
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
