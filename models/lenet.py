"""LeNet-5 (LeCun et al., 1998, "Gradient-based learning applied to document
recognition") and the Caffe variant the seed's filter table lists (20, 50).

CONV-SUBSAMPLING-CONV-SUBSAMPLING-FC-FC: C1 and C3 convolutions, S2 and S4
average-pool subsampling, C5 as a 5x5 convolution, F6 and the output layer.
The paper squashes with tanh; the Caffe variant uses max pooling and ReLU.
"""

import dataclasses
import functools

from keras import layers

from dlsuite.models import common
from dlsuite.models.registry import ModelSpec, register


@dataclasses.dataclass(frozen=True)
class LeNetConfig:
    conv_filters: tuple  # C1, C3 (and C5 when c5_filters is set)
    c5_filters: int | None  # C5 as a 5x5 convolution, or None for flatten
    dense_units: tuple  # hidden fully connected layers (F6)
    pool: str  # "avg" (subsampling) or "max"
    activation: str
    input_shape: tuple
    min_size: int


LENET_CONFIGS = {
    # 61,706 parameters at 32x32x1, 10 classes (pinned in the tests).
    "lenet5": LeNetConfig((6, 16), 120, (84,), "avg", "tanh", (32, 32, 1), 32),
    # Caffe's LeNet on 28x28 MNIST: conv 20, conv 50, ip1 500, ip2 10.
    "lenet5_caffe": LeNetConfig((20, 50), None, (500,), "max", "relu", (28, 28, 1), 16),
}


def LeNet(
    variant,
    include_top=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=10,
    classifier_activation="softmax",
    name="lenet5",
    activation=None,
    kernel_initializer=None,
    l1=0.0,
    l2=0.0,
    max_norm=None,
    dropout=0.0,
    batch_norm=False,
):
    """Builds the LeNet `variant` (a key of LENET_CONFIGS).

    Expects images of at least the variant's `min_size` a side; grayscale by
    default (any channel count works). `activation=None` takes the paper's.
    """
    config = LENET_CONFIGS[variant]
    knobs = common.Knobs(
        activation=activation or config.activation,
        kernel_initializer=kernel_initializer,
        l1=l1, l2=l2, max_norm=max_norm, dropout=dropout, batch_norm=batch_norm,
    )
    input_shape = common.check_arguments(
        model_name=name, include_top=include_top, weights=weights,
        input_tensor=input_tensor, input_shape=input_shape, pooling=pooling,
        classes=classes, default_shape=config.input_shape, min_size=config.min_size,
    )
    img_input, inputs = common.make_input(input_tensor, input_shape)
    pool_layer = layers.AveragePooling2D if config.pool == "avg" else layers.MaxPooling2D

    x = img_input
    for index, filters in enumerate(config.conv_filters, start=1):
        x = common.conv_block(x, filters, 5, knobs=knobs, name=f"conv{index}")
        x = pool_layer(2, strides=2, name=f"pool{index}")(x)
    if config.c5_filters:
        x = common.conv_block(x, config.c5_filters, 5, knobs=knobs, name="conv3")

    return common.finish_model(
        x, inputs, name=name, include_top=include_top, weights=weights, pooling=pooling,
        classes=classes, classifier_activation=classifier_activation, knobs=knobs,
        architecture=variant,
        fc={f"fc{index}": units for index, units in enumerate(config.dense_units, start=1)},
    )


for _name, _config in LENET_CONFIGS.items():
    register(ModelSpec(
        name=_name,
        family="lenet",
        kind="cnn",
        builder=functools.partial(LeNet, _name, name=_name),
        default_input_shape=_config.input_shape,
        min_input_size=_config.min_size,
        description=f"LeNet, conv filters {'-'.join(map(str, _config.conv_filters))}",
    ))
