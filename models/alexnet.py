"""AlexNet (Krizhevsky et al., 2012) and ZFNet (Zeiler & Fergus, 2013).

Both are five convolutions (96-256-384-384-256, the seed's table) with max
pooling and Local Response Normalization after the first two, then
FC 4096 - FC 4096 - classifier with dropout 0.5. ZFNet is AlexNet with a
smaller, denser first layer (7x7 stride 2 instead of 11x11 stride 4) and a
stride-2 second layer, after the visualizations in its paper. AlexNet is the
ungrouped single-tower version (the paper split it over two GPUs).
"""

import dataclasses
import functools

from keras import layers

from dlsuite.models import common
from dlsuite.models.layers import LocalResponseNormalization
from dlsuite.models.registry import ModelSpec, register


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    filters: int
    kernel: int
    stride: int = 1
    padding: str = "same"
    pad: int = 0  # explicit zero padding before a "valid" conv
    pool: str | None = None  # "valid" or "same" 3x3/2 max pool after it
    lrn: bool = False  # LRN after the activation, before the pool (the paper)


@dataclasses.dataclass(frozen=True)
class AlexNetConfig:
    convs: tuple
    dense_units: tuple
    input_shape: tuple
    min_size: int


ALEXNET_CONFIGS = {
    # 227x227: 55 -> 27 -> 13 -> 6; 62,378,344 parameters at 1000 classes.
    "alexnet": AlexNetConfig(
        convs=(
            ConvSpec(96, 11, stride=4, padding="valid", pool="valid", lrn=True),
            ConvSpec(256, 5, pool="valid", lrn=True),
            ConvSpec(384, 3),
            ConvSpec(384, 3),
            ConvSpec(256, 3, pool="valid"),
        ),
        dense_units=(4096, 4096),
        input_shape=(227, 227, 3),
        min_size=67,
    ),
    # 224x224: 110 -> 55 -> 26 -> 13 -> 6, the sizes in the paper's figure 3.
    "zfnet": AlexNetConfig(
        convs=(
            ConvSpec(96, 7, stride=2, padding="valid", pad=1, pool="same", lrn=True),
            ConvSpec(256, 5, stride=2, padding="valid", pool="same", lrn=True),
            ConvSpec(384, 3),
            ConvSpec(384, 3),
            ConvSpec(256, 3, pool="valid"),
        ),
        dense_units=(4096, 4096),
        input_shape=(224, 224, 3),
        min_size=53,
    ),
}


def AlexNet(
    variant,
    include_top=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=1000,
    classifier_activation="softmax",
    name="alexnet",
    activation="relu",
    kernel_initializer=None,
    l1=0.0,
    l2=0.0,
    max_norm=None,
    dropout=0.5,
    batch_norm=False,
):
    """Builds the `variant` "alexnet" or "zfnet" (keys of ALEXNET_CONFIGS).

    Expects RGB images of the variant's input_shape by default; any size from
    its min_size up works. `dropout` applies after FC6 and FC7.
    """
    config = ALEXNET_CONFIGS[variant]
    knobs = common.Knobs(
        activation=activation, kernel_initializer=kernel_initializer,
        l1=l1, l2=l2, max_norm=max_norm, dropout=dropout, batch_norm=batch_norm,
    )
    input_shape = common.check_arguments(
        model_name=name, include_top=include_top, weights=weights,
        input_tensor=input_tensor, input_shape=input_shape, pooling=pooling,
        classes=classes, default_shape=config.input_shape, min_size=config.min_size,
    )
    img_input, inputs = common.make_input(input_tensor, input_shape)

    x = img_input
    for index, spec in enumerate(config.convs, start=1):
        if spec.pad:
            x = layers.ZeroPadding2D(spec.pad, name=f"conv{index}_pad")(x)
        x = common.conv_block(
            x, spec.filters, spec.kernel, strides=spec.stride, padding=spec.padding,
            knobs=knobs, name=f"conv{index}",
        )
        if spec.lrn:
            x = LocalResponseNormalization(name=f"norm{index}")(x)
        if spec.pool:
            x = layers.MaxPooling2D(3, strides=2, padding=spec.pool, name=f"pool{index}")(x)

    return common.finish_model(
        x, inputs, name=name, include_top=include_top, weights=weights, pooling=pooling,
        classes=classes, classifier_activation=classifier_activation, knobs=knobs,
        architecture=variant,
        fc={f"fc{index}": units for index, units in enumerate(config.dense_units, start=6)},
    )


for _name, _config in ALEXNET_CONFIGS.items():
    register(ModelSpec(
        name=_name,
        family="alexnet",
        kind="cnn",
        builder=functools.partial(AlexNet, _name, name=_name),
        default_input_shape=_config.input_shape,
        min_input_size=_config.min_size,
        description=f"{'AlexNet' if _name == 'alexnet' else 'ZFNet'}: 5 conv (96-256-384-384-256, LRN) + 3 FC",
    ))
