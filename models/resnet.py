"""ResNet (He et al., 2015, "Deep Residual Learning for Image Recognition").

Layers fit a residual F(x) and add it to a shortcut, so gradients flow back
through the identity without vanishing. ResNet-18/34 stack basic blocks (two
3x3 convolutions); ResNet-50/101/152 stack bottleneck blocks (1x1 reduce,
3x3, 1x1 expand by 4), the 1x1 layers keeping depth in check as in GoogLeNet.
Layer names, order and conventions (conv biases, batch-norm epsilon 1.001e-5,
stride on the first 1x1 of a bottleneck) match keras.applications.ResNet50/
101/152, so their ImageNet weights load as they are.
"""

import dataclasses
import functools

from keras import layers

from dlsuite.models import common
from dlsuite.models.registry import ModelSpec, register

BN_EPSILON = 1.001e-5
STAGE_FILTERS = (64, 128, 256, 512)
MIN_SIZE = 32  # total stride 32


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    block: str  # "basic" or "bottleneck"
    blocks_per_stage: tuple  # stages conv2..conv5


RESNET_CONFIGS = {
    "resnet18": ResNetConfig("basic", (2, 2, 2, 2)),
    "resnet34": ResNetConfig("basic", (3, 4, 6, 3)),
    "resnet50": ResNetConfig("bottleneck", (3, 4, 6, 3)),
    "resnet101": ResNetConfig("bottleneck", (3, 4, 23, 3)),
    "resnet152": ResNetConfig("bottleneck", (3, 8, 36, 3)),
}

EXPANSION = {"basic": 1, "bottleneck": 4}


def _conv(x, filters, kernel, *, knobs, name, strides=1, padding="valid", activate=True):
    """`{name}_conv`, `{name}_bn`, `{name}_<activation>` as Keras names them."""
    return common.conv_block(
        x, filters, kernel, strides=strides, padding=padding, knobs=knobs,
        name=f"{name}_conv", bn_name=f"{name}_bn", act_name=f"{name}_{knobs.activation}",
        activate=activate, bn_epsilon=BN_EPSILON,
    )


def _merge(shortcut, residual, *, knobs, name):
    """Adds the residual to the shortcut and activates the sum (`{name}_out`).

    With maxout the sum's width is fixed by the shortcut, so a full maxout
    unit (with its own weights) keeps it.
    """
    x = layers.Add(name=f"{name}_add")([shortcut, residual])
    units = x.shape[-1] if knobs.activation == "maxout" else None
    return knobs.activation_layer(x, name=f"{name}_out", units=units)


def basic_block(x, filters, *, stride, knobs, name):
    """Two 3x3 convolutions; a 1x1 projection shortcut when the shape changes."""
    if stride != 1 or x.shape[-1] != filters:
        shortcut = _conv(x, filters, 1, strides=stride, knobs=knobs, name=f"{name}_0", activate=False)
    else:
        shortcut = x
    residual = layers.ZeroPadding2D(1, name=f"{name}_1_pad")(x) if stride != 1 else x
    residual = _conv(
        residual, filters, 3, strides=stride, padding="valid" if stride != 1 else "same",
        knobs=knobs, name=f"{name}_1",
    )
    residual = _conv(residual, filters, 3, padding="same", knobs=knobs, name=f"{name}_2", activate=False)
    return _merge(shortcut, residual, knobs=knobs, name=name)


def bottleneck_block(x, filters, *, stride, knobs, name):
    """1x1 reduce (carrying the stride, as Keras does), 3x3, 1x1 expand by 4."""
    if stride != 1 or x.shape[-1] != 4 * filters:
        shortcut = _conv(x, 4 * filters, 1, strides=stride, knobs=knobs, name=f"{name}_0", activate=False)
    else:
        shortcut = x
    residual = _conv(x, filters, 1, strides=stride, knobs=knobs, name=f"{name}_1")
    residual = _conv(residual, filters, 3, padding="same", knobs=knobs, name=f"{name}_2")
    residual = _conv(residual, 4 * filters, 1, knobs=knobs, name=f"{name}_3", activate=False)
    return _merge(shortcut, residual, knobs=knobs, name=name)


BLOCKS = {"basic": basic_block, "bottleneck": bottleneck_block}


def ResNet(
    variant,
    include_top=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=1000,
    classifier_activation="softmax",
    name="resnet50",
    activation="relu",
    kernel_initializer=None,
    l1=0.0,
    l2=0.0,
    max_norm=None,
    dropout=0.0,
    batch_norm=True,
):
    """Builds the ResNet `variant` (a key of RESNET_CONFIGS).

    Expects RGB images, 224x224 by default, at least 32x32. Stages are named
    conv2..conv5 and blocks `conv4_block6_out`, as in Keras, so feature
    extractors can tap any block. `dropout` applies before the classifier.
    """
    config = RESNET_CONFIGS[variant]
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

    x = layers.ZeroPadding2D(3, name="conv1_pad")(img_input)
    x = _conv(x, 64, 7, strides=2, knobs=knobs, name="conv1")
    x = layers.ZeroPadding2D(1, name="pool1_pad")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)

    block = BLOCKS[config.block]
    for stage, (filters, blocks) in enumerate(zip(STAGE_FILTERS, config.blocks_per_stage), start=2):
        for index in range(1, blocks + 1):
            stride = 2 if index == 1 and stage > 2 else 1
            x = block(x, filters, stride=stride, knobs=knobs, name=f"conv{stage}_block{index}")

    return common.finish_model(
        x, inputs, name=name, include_top=include_top, weights=weights, pooling=pooling,
        classes=classes, classifier_activation=classifier_activation, knobs=knobs,
        architecture=variant, fc=None,  # all-convolutional: avg_pool, dropout, predictions
    )


for _name, _config in RESNET_CONFIGS.items():
    register(ModelSpec(
        name=_name,
        family="resnet",
        kind="cnn",
        builder=functools.partial(ResNet, _name, name=_name),
        default_input_shape=(224, 224, 3),
        min_input_size=MIN_SIZE,
        description=f"ResNet, {_config.block} blocks {'-'.join(map(str, _config.blocks_per_stage))}",
    ))
