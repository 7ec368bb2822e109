"""GoogLeNet, Inception v1 (Szegedy et al., 2014, "Going deeper with convolutions").

An inception module runs 1x1, 3x3 and 5x5 convolutions and a 3x3 max pool side
by side and concatenates them; the 1x1 "reduce" convolutions before the 3x3 and
5x5 branches (and after the pool) cut the depth, and with it the operations,
that concatenation would otherwise blow up (the seed). Nine modules, widths
from the paper's Table 1, LRN after the stem as in its Figure 3, global average
pooling, dropout 0.4. The two auxiliary classifiers (after 4a and 4d) exist
only for training: `aux_classifiers=True` adds them as extra outputs, and
`inference_model()` keeps the main output alone.
"""

import functools

import keras
from keras import layers

from dlsuite.models.errors import ArgumentError
from dlsuite.models import common
from dlsuite.models.layers import LocalResponseNormalization
from dlsuite.models.registry import ModelSpec, register

# name: (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool projection), Table 1.
INCEPTION_WIDTHS = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}
POOL_BEFORE = ("4a", "5a")  # 3x3/2 max pools between the stages
AUX_AFTER = {"4a": "aux1", "4d": "aux2"}
MIN_SIZE = 32
AUX_LOSS_WEIGHT = 0.3  # the paper's discount for the auxiliary losses


def inception_module(x, widths, *, knobs, name):
    """The four parallel branches, concatenated along channels (`{name}_out`)."""
    conv1, reduce3, conv3, reduce5, conv5, pool_proj = widths
    branch1 = common.conv_block(x, conv1, 1, knobs=knobs, name=f"{name}_1x1")
    branch3 = common.conv_block(x, reduce3, 1, knobs=knobs, name=f"{name}_3x3_reduce")
    branch3 = common.conv_block(branch3, conv3, 3, padding="same", knobs=knobs, name=f"{name}_3x3")
    branch5 = common.conv_block(x, reduce5, 1, knobs=knobs, name=f"{name}_5x5_reduce")
    branch5 = common.conv_block(branch5, conv5, 5, padding="same", knobs=knobs, name=f"{name}_5x5")
    branch_pool = layers.MaxPooling2D(3, strides=1, padding="same", name=f"{name}_pool")(x)
    branch_pool = common.conv_block(branch_pool, pool_proj, 1, knobs=knobs, name=f"{name}_pool_proj")
    return layers.Concatenate(name=f"{name}_out")([branch1, branch3, branch5, branch_pool])


def auxiliary_classifier(x, *, classes, classifier_activation, knobs, name):
    """5x5/3 average pool, 1x1 conv 128, FC 1024, dropout 0.7, classifier."""
    pool_size = min(5, x.shape[1], x.shape[2])
    x = layers.AveragePooling2D(pool_size, strides=3, name=f"{name}_pool")(x)
    x = common.conv_block(x, 128, 1, knobs=knobs, name=f"{name}_conv")
    x = layers.Flatten(name=f"{name}_flatten")(x)
    x = common.dense_block(x, 1024, knobs=knobs, name=f"{name}_fc", dropout=0.7)
    return common.classifier(
        x, classes=classes, classifier_activation=classifier_activation, knobs=knobs,
        name=f"{name}_predictions",
    )


def GoogLeNet(
    include_top=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=1000,
    classifier_activation="softmax",
    name="googlenet",
    activation="relu",
    kernel_initializer=None,
    l1=0.0,
    l2=0.0,
    max_norm=None,
    dropout=0.4,
    batch_norm=False,
    aux_classifiers=False,
):
    """Builds GoogLeNet (Inception v1).

    Expects RGB images, 224x224 by default, at least 32x32. With
    `aux_classifiers=True` (and include_top) the model has three outputs,
    `[predictions, aux1_predictions, aux2_predictions]`; train them with
    `aux_loss_weights()` and serve `inference_model(model)`.
    """
    knobs = common.Knobs(
        activation=activation, kernel_initializer=kernel_initializer,
        l1=l1, l2=l2, max_norm=max_norm, dropout=dropout, batch_norm=batch_norm,
    )
    input_shape = common.check_arguments(
        model_name=name, include_top=include_top, weights=weights,
        input_tensor=input_tensor, input_shape=input_shape, pooling=pooling,
        classes=classes, default_shape=(224, 224, 3), min_size=MIN_SIZE,
    )
    if not isinstance(aux_classifiers, bool):
        raise ArgumentError(f"aux_classifiers must be True or False, received {aux_classifiers!r}.")
    img_input, inputs = common.make_input(input_tensor, input_shape)

    x = common.conv_block(img_input, 64, 7, strides=2, padding="same", knobs=knobs, name="conv1")
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="pool1")(x)
    x = LocalResponseNormalization(name="norm1")(x)
    x = common.conv_block(x, 64, 1, knobs=knobs, name="conv2_reduce")
    x = common.conv_block(x, 192, 3, padding="same", knobs=knobs, name="conv2")
    x = LocalResponseNormalization(name="norm2")(x)
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="pool2")(x)

    aux_outputs = []
    for module, widths in INCEPTION_WIDTHS.items():
        if module in POOL_BEFORE:
            x = layers.MaxPooling2D(3, strides=2, padding="same", name=f"pool{module[0]}")(x)
        x = inception_module(x, widths, knobs=knobs, name=f"inception_{module}")
        if include_top and aux_classifiers and module in AUX_AFTER:
            aux_outputs.append(auxiliary_classifier(
                x, classes=classes, classifier_activation=classifier_activation,
                knobs=knobs, name=AUX_AFTER[module],
            ))

    return common.finish_model(
        x, inputs, name=name, include_top=include_top, weights=weights, pooling=pooling,
        classes=classes, classifier_activation=classifier_activation, knobs=knobs,
        architecture="googlenet", fc=None,  # all-convolutional: avg_pool, dropout, predictions
        aux_outputs=aux_outputs,
    )


def aux_loss_weights(model):
    """Loss weights for `model.compile`: 1 for the main output, 0.3 for each aux."""
    return [1.0] + [AUX_LOSS_WEIGHT] * (len(model.outputs) - 1)


def inference_model(model):
    """The same network with only its main output (auxiliary heads dropped)."""
    if len(model.outputs) == 1:
        return model
    return keras.Model(model.inputs, model.outputs[0], name=model.name)


register(ModelSpec(
    name="googlenet",
    family="googlenet",
    kind="cnn",
    builder=functools.partial(GoogLeNet, name="googlenet"),
    default_input_shape=(224, 224, 3),
    min_input_size=MIN_SIZE,
    description="GoogLeNet (Inception v1): 9 inception modules with 1x1 reductions",
))
