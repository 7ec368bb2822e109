"""Backbones for transfer learning: a network without its classifier top, as a
feature extractor that takes raw pixels and carries its own preprocessing.

A backbone comes from one of four sources, chosen by `weights`:

* None: a registry CNN or keras.applications model, randomly initialized;
* "imagenet": the weights Keras publishes (downloaded once into the Keras
  cache; offline, the error names the file to put there);
* a weights file (`.weights.h5` or Keras-format `.h5`) for the same backbone;
* a model this suite trained: a `.keras` file from a run directory or a
  SavedModel from `dlsuite classify train`: train on one task, transfer to
  another.

Whatever the source, `build_base` returns a `Base`: a functional model from
float32 pixels (0..255, (H, W, C)) to the last feature map, the layer the
seed's recipe keeps when it drops the fully connected top. Layer names stay
those of the architecture (`conv4_block6_out`, `block3_pool`), so intermediate
features are addressed by name.
"""

import dataclasses
import json
import os
import pathlib
import re
import warnings

import keras
import numpy as np
from keras import layers

from dlsuite import models
from dlsuite.apps.core import keras_files, saved_models
from dlsuite.apps.core.errors import UsageError
from dlsuite.models import common
from dlsuite.models.layers import ImagePreprocessing

# keras.applications models users expect, by our lower-case name:
# (class in keras.applications, ImageNet preprocessing mode, default side, smallest side).
KERAS_APPLICATIONS = {
    "convnexttiny": ("ConvNeXtTiny", "raw", 224, 32),
    "densenet121": ("DenseNet121", "torch", 224, 32),
    "efficientnetb0": ("EfficientNetB0", "raw", 224, 32),
    "efficientnetb1": ("EfficientNetB1", "raw", 240, 32),
    "efficientnetb2": ("EfficientNetB2", "raw", 260, 32),
    "efficientnetb3": ("EfficientNetB3", "raw", 300, 32),
    "inceptionv3": ("InceptionV3", "tf", 299, 75),
    "mobilenet": ("MobileNet", "tf", 224, 32),
    "mobilenetv2": ("MobileNetV2", "tf", 224, 32),
    "resnet50v2": ("ResNet50V2", "tf", 224, 32),
    "xception": ("Xception", "tf", 299, 71),
}
# Layers that begin a registry classifier's top; the feature map is their input.
_TOP_STARTS = ("flatten", "avg_pool", "max_pool")
PREPROCESSING = ("auto", "standardize", *ImagePreprocessing.MODES)
BACKBONE_LAYER = "backbone"


@dataclasses.dataclass
class Base:
    """A feature extractor: `model` maps float pixels 0..255 to a feature map.

    Attributes:
        model: functional keras.Model named "backbone", (H, W, C) -> (h, w, c).
        name: the architecture (registry or keras.applications name).
        source: where the weights came from, for the run's config.
        input_size: (height, width) the model takes.
        channels: 1 or 3.
        preprocessing: how pixels are prepared inside the model.
        architecture: what rebuilds it (registry name, knobs, statistics), or None.
    """

    model: keras.Model
    name: str
    source: str
    input_size: tuple
    channels: int
    preprocessing: str
    architecture: dict | None = None

    def weighted_layers(self):
        """The layers with weights, bottom to top."""
        return [layer for layer in self.model.layers if layer.weights]

    def feature_layers(self):
        """Names a user may pass to --layer: every layer after the input and preprocessing."""
        return [layer.name for layer in self.model.layers
                if not isinstance(layer, (layers.InputLayer, ImagePreprocessing, layers.Rescaling, layers.Normalization))]


def names():
    """Every backbone name: the registry CNNs and the keras.applications table."""
    return sorted({*models.names(kind="cnn"), *KERAS_APPLICATIONS})


def canonical_name(name):
    """"ResNet50", "resnet50", "mobilenet_v2" -> the name in `names()`; unknown names list the known ones."""
    known = names()
    squeezed = {re.sub(r"[-_]", "", known_name): known_name for known_name in known}
    key = str(name).lower()
    if key in known:
        return key
    if re.sub(r"[-_]", "", key) in squeezed:
        return squeezed[re.sub(r"[-_]", "", key)]
    raise UsageError(f"unknown backbone {name!r}; choose one of {', '.join(known)}")


def is_model_file(weights):
    """True when `weights` names a model this suite trained (.keras or a SavedModel folder)."""
    if weights is None or weights == "imagenet":
        return False
    path = pathlib.Path(weights)
    return path.suffix == ".keras" or path.is_dir()


def default_size(name):
    """The side a backbone was designed for (224 for most, 299 for Inception)."""
    if name in KERAS_APPLICATIONS:
        return KERAS_APPLICATIONS[name][2]
    return models.get(name).default_input_shape[0]


def min_size(name):
    if name in KERAS_APPLICATIONS:
        return KERAS_APPLICATIONS[name][3]
    return models.get(name).min_input_size


def has_imagenet(name):
    return name in KERAS_APPLICATIONS or name in common.IMAGENET_WEIGHTS


def check_weights(name, weights):
    """Checks --weights before any data is read; returns it normalized (None, "imagenet" or a path)."""
    if weights is None or str(weights).lower() in ("none", "random", ""):
        return None
    if weights == "imagenet":
        if not has_imagenet(name):
            with_weights = sorted({*KERAS_APPLICATIONS, *common.IMAGENET_WEIGHTS})
            raise UsageError(
                f"no ImageNet weights are published for {name}; pass --weights none, a weights file, "
                f"or a model trained with dlsuite, or pick one of {', '.join(with_weights)}"
            )
        return weights
    if not os.path.exists(weights):
        raise UsageError(
            f"--weights {weights!r} does not exist; pass imagenet, none, a .weights.h5/.h5 file, "
            "a .keras model or a SavedModel folder (saved_models/NAME)"
        )
    import h5py

    if not str(weights).endswith(".h5") or not h5py.is_hdf5(weights):
        raise UsageError(
            f"--weights {weights!r} is not a weights file (Keras writes .weights.h5 or .h5, HDF5 inside); pass one, "
            "imagenet, none, a .keras model or a SavedModel folder (saved_models/NAME)"
        )

    def read(_, item):  # every array, so that a truncated file fails here rather than in training
        if isinstance(item, h5py.Dataset):
            item[()]

    try:
        with h5py.File(weights, "r") as file:
            file.visititems(read)
    except (OSError, KeyError, ValueError) as error:  # h5py's errors for truncated or damaged files
        raise UsageError(f"--weights {weights!r} is damaged ({' '.join(str(error).split())[:160]}); save or "
                         "download the weights file again") from None
    return str(weights)


def check_weights_argument(backbone, weights, *, trust_model=False):
    """Checks --backbone and --weights together; returns --weights normalized.

    A model file is checked whole without TensorFlow running anything (no
    strategy exists yet), so that a search fails before its first trial: a
    `.keras` archive's members and config, a SavedModel's graph and every
    variable of its checkpoint.

    Args:
        trust_model: a SavedModel that reads or writes files or prints is accepted.
    """
    if is_model_file(weights):
        if pathlib.Path(weights).suffix == ".keras":
            keras_files.check(weights)
        else:
            version_dir, _ = _export_architecture(weights)
            saved_models.check(version_dir, trust_model=trust_model, signatures=("serving_default",))
            saved_models.check_variables(version_dir)
        return str(weights)
    if backbone is None:
        raise UsageError("--backbone is needed unless --weights is a model this suite trained; "
                         "e.g. --backbone resnet50 --weights imagenet")
    return check_weights(canonical_name(backbone), weights)


def build_base(name, *, weights=None, input_size=None, channels=3, statistics=None, preprocessing="auto", batch_norm=None,
               trust_model=False):
    """Builds the feature extractor for backbone `name` with `weights`.

    Args:
        name: a name in `names()` (any case), or None when `weights` is a
            model this suite trained (its architecture is used).
        weights: None, "imagenet", a weights file, a `.keras` model or a
            SavedModel folder (see the module docstring).
        input_size: (height, width); None: the source model's size, else the
            backbone's default.
        channels: 1 or 3 (keras.applications and ImageNet weights need 3).
        statistics: (mean, variance) per channel of training pixels / 255,
            for "standardize" preprocessing; None: pixels are only scaled.
        preprocessing: "auto" (the weights' own: caffe for Keras' ResNet/VGG
            ImageNet weights, the keras.applications mode for those models,
            otherwise standardize), or a mode in PREPROCESSING.
        batch_norm: for a registry CNN built here (weights None or a file):
            batch normalization after each conv; None: on for random weights
            (as `dlsuite classify` trains), the paper's network for a file.
        trust_model: load a SavedModel `weights` even if it reads or writes
            files or prints (see `core.saved_models`).

    Raises:
        UsageError: unknown names, sizes below the minimum, weights that do not
            fit, ImageNet weights that cannot be fetched.
    """
    if preprocessing not in PREPROCESSING:
        raise UsageError(f"--preprocess must be one of {', '.join(PREPROCESSING)}, received {preprocessing!r}")
    if is_model_file(weights):
        return _base_from_trained_model(weights, input_size=input_size, expected_name=name, trust_model=trust_model)
    name = canonical_name(name)
    weights = check_weights(name, weights)
    if name in KERAS_APPLICATIONS:
        channels = 3
    size = tuple(input_size) if input_size else (default_size(name),) * 2
    if min(size) < min_size(name):
        raise UsageError(
            f"--input-size {size[0]},{size[1]} is too small for {name}, which needs at least "
            f"{min_size(name)}x{min_size(name)}; pass a larger --input-size"
        )
    if weights == "imagenet" and channels != 3:
        channels = 3  # ImageNet filters are RGB; the pipeline tiles gray images.
    if preprocessing == "auto":
        preprocessing = _auto_preprocessing(name, weights)

    pixels = keras.Input((*size, channels), name="pixels")
    x = _preprocess(pixels, preprocessing, channels=channels, statistics=statistics)
    if name in KERAS_APPLICATIONS:
        features = _keras_application(name, x, weights=weights)
    else:
        knobs = {}
        if weights != "imagenet":
            knobs["batch_norm"] = batch_norm if batch_norm is not None else weights is None
        try:
            features = models.build(name, include_top=False, input_tensor=x,
                                    weights="imagenet" if weights == "imagenet" else None, **knobs).output
        except RuntimeError as error:  # ImageNet weights neither cached nor downloadable
            raise UsageError(" ".join(str(error).split())) from None
    model = keras.Model(pixels, features, name=BACKBONE_LAYER)
    if weights not in (None, "imagenet"):
        load_weights_file(model, weights, backbone=name)
    architecture = None
    if name not in KERAS_APPLICATIONS:
        architecture = {"backbone": name, "knobs": knobs, "preprocessing": preprocessing,
                        "statistics": _statistics_json(statistics) if preprocessing == "standardize" else None}
    return Base(model=model, name=name, source=str(weights or "none"), input_size=size, channels=channels,
                preprocessing=preprocessing, architecture=architecture)


def _auto_preprocessing(name, weights):
    if name in KERAS_APPLICATIONS:
        return KERAS_APPLICATIONS[name][1]
    if weights is not None and name in common.IMAGENET_WEIGHTS:
        # Keras' ResNet and VGG weights were trained on caffe-style input.
        return "caffe"
    return "standardize"


def _statistics_json(statistics):
    if statistics is None:
        return None
    mean, variance = statistics
    return {"mean": [float(v) for v in np.ravel(mean)], "variance": [float(v) for v in np.ravel(variance)]}


def _preprocess(pixels, mode, *, channels, statistics):
    if mode == "standardize":
        x = layers.Rescaling(1.0 / 255, name="rescale")(pixels)
        if statistics is None:
            return x
        mean, variance = statistics
        return layers.Normalization(mean=np.ravel(mean)[:channels], variance=np.ravel(variance)[:channels],
                                    name="normalize")(x)
    if mode != "raw" and channels != 3:
        raise UsageError(f"--preprocess {mode} needs RGB input; these images have {channels} channel(s)")
    return ImagePreprocessing(mode, name="imagenet_preprocess")(pixels)


def _keras_application(name, x, *, weights):
    class_name = KERAS_APPLICATIONS[name][0]
    constructor = getattr(keras.applications, class_name)
    # EfficientNet and ConvNeXt rescale and normalize inside ("raw" mode).
    try:
        with warnings.catch_warnings():
            # At sizes other than 224 Keras warns that it loads the 224 weights: the filters are the same.
            warnings.simplefilter("ignore", UserWarning)
            return constructor(include_top=False, input_tensor=x, weights=weights if weights == "imagenet" else None).output
    except Exception as error:  # get_file raises a bare Exception when it cannot fetch
        url = re.search(r"https?://\S+?\.h5", str(error))
        if weights != "imagenet" or not url:
            raise
        raise UsageError(
            f"cannot download the ImageNet weights of {class_name} ({url.group(0)}); on a machine with internet "
            f"download that file and put it in $KERAS_HOME/models/ (default ~/.keras/models/), then run again"
        ) from None


def load_weights_file(model, path, *, backbone):
    """Loads a `.weights.h5` / `.h5` file into `model`, naming the first layer that does not fit."""
    try:
        with warnings.catch_warnings():
            # Keras warns per skipped container before raising the error we rephrase.
            warnings.simplefilter("ignore", UserWarning)
            model.load_weights(path)
    except ValueError as error:
        raise UsageError(f"weights file {path!r} does not fit backbone {backbone}: {_mismatch(str(error))}") from None
    except OSError as error:
        raise UsageError(f"cannot read weights file {path!r} ({error}); pass a .weights.h5 or .h5 file") from None


def _mismatch(message):
    """Keras' multi-line load error -> the layer and the two shapes, one line."""
    layer = re.search(r"name=([\w/.-]+)", message) or re.search(r"named \"?([\w/.-]+)", message)
    shapes = re.search(r"variable\.shape=(\([^)]*\)), Received: value\.shape=(\([^)]*\))", message)
    legacy = re.search(r"expects shape (\([^)]*\))\. Received saved weight with shape (\([^)]*\))", message)
    found = shapes or legacy
    if layer and found:
        return (f"layer {layer.group(1)} has weights of shape {found.group(1)} but the file holds {found.group(2)}; "
                "pass weights saved from the same backbone, input channels and knobs")
    return " ".join(message.split())[:300]


# --- models this suite trained -------------------------------------------------


def _base_from_trained_model(path, *, input_size, expected_name, trust_model=False):
    path = pathlib.Path(path)
    if path.suffix == ".keras":
        base = _base_from_keras_file(path)
    else:
        base = _base_from_export(path, trust_model=trust_model)
    if expected_name is not None and canonical_name(expected_name) != base.name:
        raise UsageError(
            f"--backbone {expected_name} does not match the model in {str(path)!r}, which is a {base.name}; "
            f"pass --backbone {base.name} or leave --backbone out"
        )
    if input_size and tuple(input_size) != base.input_size:
        base = _resized(base, tuple(input_size))
    return base


def _base_from_keras_file(path):
    model = keras_files.load(path)
    if any(layer.name == BACKBONE_LAYER for layer in model.layers):  # a transfer model: reuse its base
        inner = model.get_layer(BACKBONE_LAYER)
        feature_model = keras.Model(inner.input, inner.output, name=BACKBONE_LAYER)
        name = _architecture_name(model.name)
    else:
        top = next((layer for layer in model.layers if layer.name in _TOP_STARTS), None)
        if top is None:
            raise UsageError(
                f"{str(path)!r} has no classifier top to cut ({', '.join(_TOP_STARTS)}); pass a model trained by "
                "dlsuite classify or dlsuite transfer"
            )
        feature_model = keras.Model(model.input, top.input, name=BACKBONE_LAYER)
        name = _architecture_name(model.name)
    shape = feature_model.input.shape
    preprocessing = "caffe" if any(isinstance(layer, ImagePreprocessing) for layer in feature_model.layers) else "standardize"
    return Base(model=feature_model, name=name, source=str(path), input_size=tuple(shape[1:3]),
                channels=int(shape[-1]), preprocessing=preprocessing)


def _architecture_name(model_name):
    """The backbone a trained model was built from: classify and transfer name their models after it."""
    try:
        return canonical_name(model_name)
    except UsageError:
        return model_name


def _resized(base, input_size):
    """The same feature extractor for another input size (its layers are convolutional)."""
    if base.name in names() and min(input_size) < min_size(base.name):
        raise UsageError(f"--input-size {input_size[0]},{input_size[1]} is too small for {base.name}, which needs "
                         f"at least {min_size(base.name)}x{min_size(base.name)}")
    config = base.model.get_config()
    for layer in config["layers"]:
        if layer["class_name"] == "InputLayer":
            layer["config"]["batch_shape"] = [None, *input_size, base.channels]
    try:
        model = keras.Model.from_config(config)
        model.set_weights(base.model.get_weights())
    except ValueError as error:
        raise UsageError(
            f"{base.name} from {base.source!r} cannot take --input-size {input_size[0]},{input_size[1]} "
            f"({' '.join(str(error).split())[:200]}); leave --input-size out to use {base.input_size[0]},{base.input_size[1]}"
        ) from None
    return dataclasses.replace(base, model=model, input_size=input_size)


def _export_architecture(path):
    """(version folder, assets/dlsuite.json) of a classify export that records its registry backbone."""
    from dlsuite.apps.core import versions
    from dlsuite.apps.vision import export

    version_dir = versions.resolve_version_dir(path)
    metadata_path = pathlib.Path(version_dir) / "assets" / export.METADATA_FILE
    try:
        metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        metadata = None
    if not isinstance(metadata, dict) or not {"channels", "input_size"} <= set(metadata):
        raise UsageError(f"{str(path)!r} is not a dlsuite export (no readable assets/{export.METADATA_FILE}); pass "
                         "a classify export (saved_models/NAME) or a run's model.keras")
    architecture = metadata.get("architecture")
    if not isinstance(architecture, dict) or architecture.get("backbone") not in models.names(kind="cnn"):
        raise UsageError(
            f"the export {str(version_dir)!r} does not record a registry backbone to rebuild; pass the run "
            "directory's model.keras instead (runs/.../model.keras)"
        )
    return version_dir, metadata


def _base_from_export(path, *, trust_model=False):
    """A classify export: rebuild its backbone from the metadata, fill it from the SavedModel's variables."""
    version_dir, metadata = _export_architecture(path)
    architecture = metadata["architecture"]
    loaded = saved_models.load(version_dir, trust_model=trust_model, signatures=("serving_default",))
    statistics = architecture.get("statistics")
    channels = int(metadata["channels"])
    size = tuple(metadata["input_size"])
    pixels = keras.Input((*size, channels), name="pixels")
    x = _preprocess(pixels, architecture.get("preprocessing", "standardize"), channels=channels,
                    statistics=(statistics["mean"], statistics["variance"]) if statistics else None)
    knobs = {key: value for key, value in architecture.get("knobs", {}).items() if value is not None}
    features = models.build(architecture["backbone"], include_top=False, input_tensor=x, **knobs).output
    model = keras.Model(pixels, features, name=BACKBONE_LAYER)

    saved = {variable.name.rsplit(":", 1)[0]: variable for variable in loaded.signatures["serving_default"].variables}
    for weight in model.weights:
        value = saved.get(weight.path)
        if value is None:
            raise UsageError(f"the export {str(version_dir)!r} has no weights for layer {weight.path.split('/')[0]} "
                             f"of {architecture['backbone']}; it was built with other knobs")
        if tuple(value.shape) != tuple(weight.shape):
            raise UsageError(
                f"layer {weight.path.split('/')[0]} of {architecture['backbone']} has weights of shape "
                f"{tuple(weight.shape)} but the export holds {tuple(value.shape)}"
            )
        weight.assign(value.numpy())
    return Base(model=model, name=architecture["backbone"], source=str(version_dir), input_size=size,
                channels=channels, preprocessing=architecture.get("preprocessing", "standardize"),
                architecture=architecture)
