"""An image classifier around any registry backbone, with its preprocessing
inside: raw pixels in (float 0..255), class probabilities out.

Keeping scaling, normalization and augmentation in the model means the saved
model, the export and the training run all take the same raw pixels; nobody
has to "normalize it like we did".
"""

import keras
import numpy as np
from keras import layers

from dlsuite import models
from dlsuite.apps.core.choices import AUGMENTATIONS
from dlsuite.apps.core.errors import UsageError


def augmentation(kinds=AUGMENTATIONS, seed=None):
    """--augment: random flips, small rotations, zooms, shifts and contrast.

    Active in training only; at inference the layers pass images through.
    `kinds` picks among AUGMENTATIONS: a mirrored digit or letter is another
    symbol, so `--augment rotation,zoom,translation` leaves flips out.
    """
    unknown = [kind for kind in kinds if kind not in AUGMENTATIONS]
    if unknown or not kinds:
        raise UsageError(
            f"--augment takes a comma-separated list of {', '.join(AUGMENTATIONS)}, received {','.join(kinds)!r}; "
            "for example --augment rotation,zoom,translation"
        )
    makers = {
        "flip": lambda: layers.RandomFlip("horizontal", seed=seed, name="augment_flip"),
        "rotation": lambda: layers.RandomRotation(0.05, seed=seed, name="augment_rotation"),
        "zoom": lambda: layers.RandomZoom(0.1, seed=seed, name="augment_zoom"),
        "translation": lambda: layers.RandomTranslation(0.1, 0.1, seed=seed, name="augment_translation"),
        "contrast": lambda: layers.RandomContrast(0.2, seed=seed, name="augment_contrast"),
    }
    return [makers[kind]() for kind in AUGMENTATIONS if kind in kinds]


def channel_statistics(dataset, max_batches=50):
    """Per-channel mean and variance of pixels scaled to 0..1, from a sample.

    Args:
        dataset: batched (images, labels) with float pixels in 0..255.
    """
    total, total_sq, count = 0.0, 0.0, 0
    for images, _ in dataset.take(max_batches):
        pixels = np.asarray(images, dtype="float64") / 255.0
        total = total + pixels.sum(axis=(0, 1, 2))
        total_sq = total_sq + np.square(pixels).sum(axis=(0, 1, 2))
        count += pixels.shape[0] * pixels.shape[1] * pixels.shape[2]
    mean = total / count
    variance = np.maximum(total_sq / count - np.square(mean), 1e-6)
    return mean.astype("float32"), variance.astype("float32")


def build_classifier(model_name, *, classes, image_size, channels, mean, variance, augment=False, seed=None, **knobs):
    """Raw pixels -> [augmentation] -> /255 -> per-channel normalization ->
    backbone from the registry -> softmax in float32 (`probabilities`).

    Args:
        model_name: a registry name (a CNN).
        classes: number of classes.
        image_size: (height, width) the backbone sees.
        channels: 1 or 3.
        mean, variance: per-channel statistics of the training pixels / 255.
        augment: a list of AUGMENTATIONS to apply (empty or None: none).
        **knobs: the builder's knobs (activation, kernel_initializer, l1, l2,
            max_norm, dropout, batch_norm); None values take the builder's
            defaults.
    """
    pixels = keras.Input((*image_size, channels), name="pixels")
    x = pixels
    if augment:
        for layer in augmentation(augment, seed):
            x = layer(x)
    x = layers.Rescaling(1.0 / 255, name="rescale")(x)
    x = layers.Normalization(mean=mean, variance=variance, name="normalize")(x)
    knobs = {key: value for key, value in knobs.items() if value is not None}
    backbone = models.build(model_name, input_tensor=x, classes=classes, classifier_activation=None, **knobs)
    # Softmax in float32 even under mixed precision, for a stable loss.
    probabilities = layers.Activation("softmax", dtype="float32", name="probabilities")(backbone.output)
    return keras.Model(pixels, probabilities, name=model_name)
