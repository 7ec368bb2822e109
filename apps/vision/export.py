"""Export an image classifier as a TensorFlow Serving SavedModel, and read it back.

The classifier is a Keras model whose input is raw pixels, float32
(batch, H, W, C) in 0..255 at a fixed size (scaling and normalization are
layers inside it), and whose output is class probabilities (batch, K).
`export_classifier` wraps it in three signatures that take what a client
actually has, so nobody has to "preprocess it like we did":

=================  ============================  ==============================
signature          input                         what it accepts
=================  ============================  ==============================
serving_default    images: uint8 (N, H, W, C)    any size, 1 to 4 channels
serving_float      images: float32 (N, H, W, C)  the same, pixels in 0..255
serving_bytes      image_bytes: string (N,)      encoded JPEG/PNG/BMP/GIF files
=================  ============================  ==============================

Each returns `probabilities` float32 (N, K), `class_index` int64 (N,) and
`class_name` string (N,). Images are resized bilinearly to the model's input
size, as `tf.image.resize` does in the training pipeline.

The export lands in `base_dir/NAME/<version>/`, the layout TensorFlow Serving
polls with `--model_base_path=base_dir/NAME`; it needs TensorFlow alone to load.
The class names travel twice: as a constant in the graph (the `class_name`
output) and as `assets/labels.txt` and `assets/dlsuite.json`, which
`ExportedClassifier.load` reads without running the graph.

>>> path = export_classifier(model, class_names=["cat", "dog"], name="pets")
>>> classifier = ExportedClassifier.load("saved_models/pets")
>>> classifier.predict_files(["kitten.jpg"])  # (1, 2) probabilities
"""

import json
import pathlib

import numpy as np
import tensorflow as tf

from dlsuite.apps.core import exported, saved_models
from dlsuite.apps.core.errors import UsageError
from dlsuite.apps.core.versions import check_export_name, write_version_atomically
from dlsuite.apps.vision import sources

# What `ExportedClassifier.load` checks to tell our exports from other SavedModels.
METADATA_FILE = exported.METADATA_FILE
LABELS_FILE = "labels.txt"
FORMAT = "dlsuite.image_classifier"
FORMAT_VERSION = 1

SIGNATURES = ("serving_default", "serving_float", "serving_bytes")
EXPORT = exported.ExportFormat(
    name=FORMAT, version=FORMAT_VERSION, signatures=SIGNATURES,
    not_ours=(f"an image classifier exported by dlsuite (no valid assets/{METADATA_FILE}); "
              "export it with export_classifier."),
)


def export_classifier(model, *, class_names, name, base_dir="saved_models", version=None, architecture=None,
                      facts=None):
    """Exports `model` to `base_dir/name/<version>/` as a serving SavedModel.

    The SavedModel is written to a hidden temporary folder inside
    `base_dir/name` (same file system, and a name TF Serving ignores because
    it is not an integer) and renamed into place, so a reader never sees a
    half-written version; on any failure the temporary folder is removed.

    Args:
        model: a built Keras model, input float32 (batch, H, W, C) raw pixels
            in 0..255 with H, W and C fixed (C 1 or 3), output probabilities
            (batch, K).
        class_names: the K class names, in the model's output order.
        name: the model's name under `base_dir`, see `check_export_name`.
        base_dir: the folder holding every exported model; created if missing.
        version: the version number; defaults to `next_version`.
        architecture: what rebuilds the backbone (registry name, knobs,
            preprocessing statistics), stored in the metadata so the export
            can seed a transfer-learning run; None: not recorded.
        facts: more JSON-ready entries for the metadata (which batch-norm
            statistics the model carries).

    Returns:
        The `pathlib.Path` of the new version folder.

    Raises:
        UsageError: bad name, class names that do not fit the model, a model
            that is not an image classifier, an existing version, or a
            `base_dir` that cannot be written.
    """
    check_export_name(name)
    input_size, channels, classes = _check_model(model)
    class_names = _check_class_names(class_names, classes)

    def write(folder):
        _write_saved_model(model, folder, class_names=class_names, input_size=input_size, channels=channels)
        _write_metadata(folder, class_names=class_names, input_size=input_size, channels=channels, model_name=model.name,
                        architecture=architecture, facts=facts)

    return write_version_atomically(pathlib.Path(base_dir) / name, version, write)


def _check_model(model):
    """Returns ((H, W), C, K) of an image classifier, or raises UsageError."""
    # Subclassed models have no symbolic inputs/outputs to read the shapes from.
    inputs = getattr(model, "inputs", None) or []
    outputs = getattr(model, "outputs", None) or []
    if len(inputs) != 1 or len(outputs) != 1:
        raise UsageError(
            f"Only a built functional model with one image input and one output can be "
            f"exported; {model.name!r} has {len(inputs)} inputs and {len(outputs)} outputs."
        )
    input_shape = tuple(inputs[0].shape)
    output_shape = tuple(outputs[0].shape)
    if len(input_shape) != 4 or None in input_shape[1:] or input_shape[3] not in (1, 3):
        raise UsageError(
            f"Exported classifiers need a fixed image input (batch, H, W, 1 or 3); "
            f"{model.name!r} takes {input_shape}."
        )
    if len(output_shape) != 2 or output_shape[1] is None:
        raise UsageError(
            f"Exported classifiers need a (batch, classes) output; "
            f"{model.name!r} returns {output_shape}."
        )
    return (int(input_shape[1]), int(input_shape[2])), int(input_shape[3]), int(output_shape[1])


def _check_class_names(class_names, classes):
    class_names = [str(class_name) for class_name in class_names]
    if len(class_names) != classes:
        raise UsageError(
            f"The model predicts {classes} classes but {len(class_names)} class "
            f"names were given: {class_names}."
        )
    if len(set(class_names)) != len(class_names):
        raise UsageError(f"Class names must be unique, received {class_names}.")
    if any(not name.strip() or "\n" in name or "\r" in name for name in class_names):
        # labels.txt holds one name a line.
        raise UsageError(f"Class names must be non-empty single lines, received {class_names}.")
    return class_names


def _write_saved_model(model, path, *, class_names, input_size, channels):
    """Traces the three serving signatures around `model` and saves them to `path`."""
    # Keras' own exporter traces custom layers into plain TF ops and tracks
    # exactly the variables the endpoints use.
    import keras  # Only exporting needs Keras; loading needs TensorFlow alone.

    height, width = input_size
    names = tf.constant(class_names)

    def classify(pixels):
        """float32 (N, h, w, any channels) pixels in 0..255 -> the outputs."""
        pixels = _to_channels(pixels, channels)
        return predict(tf.image.resize(pixels, input_size, method="bilinear"))

    # One traced function that the three endpoints call: the model is traced once, not once per
    # endpoint (a ResNet-18 export took 3.5 s of CPU with three traces).
    @tf.function(input_signature=[tf.TensorSpec((None, height, width, channels), tf.float32)])
    def predict(pixels):
        """float32 (N, H, W, C) pixels at the model's size -> the outputs."""
        probabilities = tf.cast(model(pixels, training=False), tf.float32)
        class_index = tf.argmax(probabilities, axis=-1)
        return {
            "probabilities": probabilities,
            "class_index": class_index,
            "class_name": tf.gather(names, class_index),
        }

    def serving_default(images):
        return classify(tf.cast(images, tf.float32))

    def serving_float(images):
        return classify(images)

    def serving_bytes(image_bytes):
        return predict(decode_images(image_bytes, input_size, channels))

    any_images = (None, None, None, None)
    # No `archive.track(model)`: on the TensorFlow backend it stores every
    # weight a second time, as the Keras wrapper next to the tf.Variable the
    # endpoints capture (keras-team/keras#23553), doubling the files and the
    # serving memory. The endpoints' own variables are all the graph needs.
    archive = keras.export.ExportArchive()
    archive.add_endpoint(
        "serving_default", serving_default,
        input_signature=[tf.TensorSpec(any_images, tf.uint8, name="images")],
    )
    archive.add_endpoint(
        "serving_float", serving_float,
        input_signature=[tf.TensorSpec(any_images, tf.float32, name="images")],
    )
    archive.add_endpoint(
        "serving_bytes", serving_bytes,
        input_signature=[tf.TensorSpec((None,), tf.string, name="image_bytes")],
    )
    archive.write_out(str(path), verbose=False)


def decode_images(image_bytes, input_size, channels):
    """Encoded images -> pixels, inside an export's serving graph.

    Each file is decoded as the training pipeline decodes it
    (`sources.decode_file`: through RGB, since TensorFlow decodes BMP and GIF
    to 3 channels only, then gray for a 1-channel model) and resized
    bilinearly on its own, since files differ in size. `decode_file` only
    builds ops while the signature is traced; the SavedModel needs no dlsuite.

    Args:
        image_bytes: string (N,), JPEG, PNG, BMP or GIF (first frame) files.
        input_size: the model's (height, width).
        channels: the model's channel count, 1 or 3.

    Returns:
        float32 (N, height, width, channels), pixels in 0..255.
    """
    decode = sources.decode_file(channels)
    height, width = input_size

    def decode_resized(data):
        return tf.image.resize(tf.cast(decode(data), tf.float32), (height, width), method="bilinear")

    return tf.map_fn(decode_resized, image_bytes,
                     fn_output_signature=tf.TensorSpec((height, width, channels), tf.float32))


def first_undecodable(paths, contents):
    """Names the file in a batch that failed to decode, for the error a caller raises."""
    for path, data in zip(paths, contents):
        try:
            tf.io.decode_image(data, expand_animations=False)
        except tf.errors.InvalidArgumentError:
            return str(path)
    return "one of " + ", ".join(str(path) for path in paths)


def _to_channels(images, channels):
    """Adapts float (N, h, w, any of 1..4) images to `channels` (1 or 3).

    The channel count of a serving request is only known at run time, hence
    tf.cond rather than Python branches.
    """
    have = tf.shape(images)[-1]
    # An alpha channel (gray+alpha or RGBA) carries no colour; drop it.
    color = tf.cond(have >= 3, lambda: images[..., :3], lambda: images[..., :1])
    if channels == 3:
        # Gray -> RGB by repeating the one channel; RGB stays as it is.
        return tf.broadcast_to(color, tf.concat([tf.shape(color)[:-1], [3]], axis=0))
    return tf.cond(
        tf.shape(color)[-1] == 3,
        lambda: tf.image.rgb_to_grayscale(color),
        lambda: color,
    )


def _write_metadata(path, *, class_names, input_size, channels, model_name, architecture=None, facts=None):
    """Writes assets/labels.txt and assets/dlsuite.json next to the graph."""
    assets = pathlib.Path(path) / "assets"
    assets.mkdir(exist_ok=True)
    (assets / LABELS_FILE).write_text("".join(f"{n}\n" for n in class_names), encoding="utf-8")
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_name": model_name,
        "class_names": class_names,
        "input_size": list(input_size),
        "channels": channels,
        "signatures": list(SIGNATURES),
    }
    if architecture is not None:
        metadata["architecture"] = architecture
    metadata.update(facts or {})
    (assets / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")


class ExportedClassifier:
    """A classifier exported by `export_classifier`, loaded with TensorFlow alone.

    Attributes:
        path: the version folder it was loaded from.
        class_names: the class names, in output order.
        input_size: the model's (height, width).
        channels: the model's channel count, 1 or 3.
    """

    def __init__(self, path, saved_model, metadata):
        self.path = path
        # The loaded object owns the variables; the signatures need it alive.
        self._saved_model = saved_model
        self._signatures = saved_model.signatures
        self.metadata = metadata
        self.class_names = list(metadata["class_names"])
        self.input_size = tuple(metadata["input_size"])
        self.channels = int(metadata["channels"])

    @classmethod
    def load(cls, path, *, trust_model=False):
        """Loads a version folder, or the NAME folder's highest version.

        Args:
            trust_model: run it even if it reads or writes files or prints
                (see `core.saved_models`).

        Raises:
            UsageError: nothing there, a SavedModel `export_classifier` did
                not write, or one that is damaged or untrusted.
        """
        found = exported.read(path, EXPORT)
        saved_model = saved_models.load(found.path, trust_model=trust_model, signatures=found.signatures)
        return cls(found.path, saved_model, found.metadata)

    def predict_pixels(self, images):
        """Returns the probabilities (N, K) for a batch of images of any size.

        Args:
            images: uint8 or float (0..255) array, (N, H, W, C) with C 1 to 4,
                or (N, H, W) grayscale as keras.datasets ships MNIST.
        """
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., np.newaxis]
        if images.ndim != 4:
            raise UsageError(
                f"Expected a batch of images (N, H, W, C) or (N, H, W), "
                f"received an array of shape {images.shape}."
            )
        if images.dtype == np.uint8:
            outputs = self._signatures["serving_default"](images=tf.constant(images))
        else:
            outputs = self._signatures["serving_float"](
                images=tf.constant(images, dtype=tf.float32)
            )
        return outputs["probabilities"].numpy()

    def predict_files(self, paths, batch_size=32):
        """Returns the probabilities (N, K) for encoded image files.

        The files are decoded inside the SavedModel (`serving_bytes`), exactly
        as a serving client's would be.

        Raises:
            UsageError: a file is missing or is not a JPEG/PNG/BMP/GIF image.
        """
        paths = [pathlib.Path(path) for path in paths]
        if batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, received {batch_size}.")
        batches = [
            self._predict_encoded(paths[start : start + batch_size])
            for start in range(0, len(paths), batch_size)
        ]
        if not batches:
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        return np.concatenate(batches)

    def _predict_encoded(self, paths):
        contents = []
        for path in paths:
            try:
                contents.append(path.read_bytes())
            except OSError as error:
                raise UsageError(f"Cannot read image {path}: {error.strerror or error}.") from None
        try:
            outputs = self._signatures["serving_bytes"](image_bytes=tf.constant(contents))
        except tf.errors.InvalidArgumentError:
            raise UsageError(
                f"Cannot decode {first_undecodable(paths, contents)}: "
                "expected a JPEG, PNG, BMP or GIF image."
            ) from None
        return outputs["probabilities"].numpy()
