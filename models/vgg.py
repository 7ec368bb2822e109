"""VGG (Simonyan & Zisserman, 2014): stacks of 3x3 convolutions.

Three stacked 3x3 convolutions see as far as one 7x7 (the seed) with fewer
parameters and more non-linearity. Five blocks of 64-128-256-512-512 filters,
each closed by a 2x2 max pool, then FC 4096 - FC 4096 - classifier. Layer
names and order match keras.applications.VGG16/VGG19, so their ImageNet
weights load as they are.
"""

import functools

from keras import layers

from dlsuite.models import common
from dlsuite.models.registry import ModelSpec, register

BLOCK_FILTERS = (64, 128, 256, 512, 512)

# Convolutions per block: configurations A, B, D and E of the paper.
VGG_DEPTHS = {
    "vgg11": (1, 1, 2, 2, 2),
    "vgg13": (2, 2, 2, 2, 2),
    "vgg16": (2, 2, 3, 3, 3),
    "vgg19": (2, 2, 4, 4, 4),
}

MIN_SIZE = 32  # five 2x2 pools


def VGG(
    variant,
    include_top=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=1000,
    classifier_activation="softmax",
    name="vgg16",
    activation="relu",
    kernel_initializer=None,
    l1=0.0,
    l2=0.0,
    max_norm=None,
    dropout=0.5,
    batch_norm=False,
):
    """Builds the VGG `variant` (a key of VGG_DEPTHS: vgg11, vgg13, vgg16, vgg19).

    Expects RGB images, 224x224 by default, at least 32x32. `dropout` applies
    after fc1 and fc2 as in the paper (Dropout layers hold no weights, so Keras
    weights still load).
    """
    knobs = common.Knobs(
        activation=activation, kernel_initializer=kernel_initializer,
        l1=l1, l2=l2, max_norm=max_norm, dropout=dropout, batch_norm=batch_norm,
    )
    input_shape = common.check_arguments(
        model_name=name, include_top=include_top, weights=weights,
        input_tensor=input_tensor, input_shape=input_shape, pooling=pooling,
        classes=classes, default_shape=(224, 224, 3), min_size=MIN_SIZE,
        imagenet=variant in common.IMAGENET_WEIGHTS,
    )
    img_input, inputs = common.make_input(input_tensor, input_shape)

    x = img_input
    for block, (filters, convs) in enumerate(zip(BLOCK_FILTERS, VGG_DEPTHS[variant]), start=1):
        for conv in range(1, convs + 1):
            x = common.conv_block(
                x, filters, 3, padding="same", knobs=knobs, name=f"block{block}_conv{conv}"
            )
        x = layers.MaxPooling2D(2, strides=2, name=f"block{block}_pool")(x)

    return common.finish_model(
        x, inputs, name=name, include_top=include_top, weights=weights, pooling=pooling,
        classes=classes, classifier_activation=classifier_activation, knobs=knobs,
        architecture=variant, fc={"fc1": 4096, "fc2": 4096},
    )


for _name, _depths in VGG_DEPTHS.items():
    register(ModelSpec(
        name=_name,
        family="vgg",
        kind="cnn",
        builder=functools.partial(VGG, _name, name=_name),
        default_input_shape=(224, 224, 3),
        min_input_size=MIN_SIZE,
        description=f"VGG, {sum(_depths)} conv (3x3, 64-128-256-512-512) + 3 FC",
    ))
