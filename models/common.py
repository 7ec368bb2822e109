"""Pieces every CNN builder shares: argument checks, the seed's knobs, input,
conv/dense blocks with stable names, the top, the model and its weights.

Every CNN builder accepts the keras.applications arguments
(`include_top, weights, input_tensor, input_shape, pooling, classes,
classifier_activation, name`) plus the seed's knobs (`activation,
kernel_initializer, l1, l2, max_norm, dropout, batch_norm`), so any app can swap
any backbone and a student can switch any knob on any architecture.
"""

import dataclasses
import os

import keras
from keras import layers

from dlsuite.models.errors import ArgumentError
from dlsuite.models.layers import BatchNormalization, Maxout

ACTIVATIONS = ("relu", "leaky_relu", "elu", "tanh", "sigmoid", "maxout")

# The seed's initialization experiment: symmetric (zeros), too small
# (vanishing), too large (exploding), Xavier/Glorot 1/n, He 2/n, LeCun.
INITIALIZERS = {
    "he_normal": lambda: keras.initializers.HeNormal(),
    "he_uniform": lambda: keras.initializers.HeUniform(),
    "glorot_uniform": lambda: keras.initializers.GlorotUniform(),
    "glorot_normal": lambda: keras.initializers.GlorotNormal(),
    "lecun_normal": lambda: keras.initializers.LecunNormal(),
    "small_normal": lambda: keras.initializers.RandomNormal(stddev=0.01),
    "large_normal": lambda: keras.initializers.RandomNormal(stddev=1.0),
    "zeros": lambda: keras.initializers.Zeros(),
}

POOLINGS = (None, "avg", "max")
MAXOUT_PIECES = 2


@dataclasses.dataclass(frozen=True)
class Knobs:
    """The seed's switches, applied the same way by every builder.

    Attributes:
        activation: one of ACTIVATIONS.
        kernel_initializer: one of INITIALIZERS; None picks He for the ReLU
            family and maxout, Glorot for tanh and sigmoid (the seed's advice).
        l1, l2: weight penalties on every conv and dense kernel; both > 0 is
            the elastic net.
        max_norm: cap on the norm of each unit's incoming weights, or None.
        dropout: rate after each hidden dense layer (and before the classifier
            of all-convolutional families).
        batch_norm: BatchNormalization between each conv/dense and its
            activation; inference uses the moving statistics.
    """

    activation: str = "relu"
    kernel_initializer: str | None = None
    l1: float = 0.0
    l2: float = 0.0
    max_norm: float | None = None
    dropout: float = 0.0
    batch_norm: bool = False

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ArgumentError(
                f"Unknown activation {self.activation!r}; "
                f"choose one of {', '.join(ACTIVATIONS)}."
            )
        if self.kernel_initializer is not None and self.kernel_initializer not in INITIALIZERS:
            raise ArgumentError(
                f"Unknown kernel_initializer {self.kernel_initializer!r}; "
                f"choose one of {', '.join(INITIALIZERS)}."
            )
        for field in ("l1", "l2"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or value < 0:
                raise ArgumentError(f"{field} must be a number >= 0, received {value!r}.", argument=field)
        if self.max_norm is not None and (
            not isinstance(self.max_norm, (int, float)) or self.max_norm <= 0
        ):
            raise ArgumentError(f"max_norm must be > 0 or None, received {self.max_norm!r}.", argument="max_norm")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ArgumentError(f"dropout must be in [0, 1), received {self.dropout!r}.", argument="dropout")

    @property
    def pieces(self):
        return MAXOUT_PIECES if self.activation == "maxout" else 1

    def initializer(self):
        name = self.kernel_initializer
        if name is None:
            name = "glorot_uniform" if self.activation in ("tanh", "sigmoid") else "he_normal"
        return INITIALIZERS[name]()

    def regularizer(self):
        if self.l1 == 0 and self.l2 == 0:
            return None
        return keras.regularizers.L1L2(l1=self.l1, l2=self.l2)

    def constraint(self, axis):
        if self.max_norm is None:
            return None
        return keras.constraints.MaxNorm(max_value=self.max_norm, axis=axis)

    def fused_activation(self):
        """The activation to fuse into a Conv2D/Dense, or None if it needs a layer.

        Fusing (as keras.applications VGG does) keeps the graph identical to
        Keras's and lets TensorFlow use its fused conv+bias+relu kernels.
        """
        if self.batch_norm or self.activation == "maxout":
            return None
        return self.activation

    def activation_layer(self, x, name, units=None):
        """Applies the activation as its own layer named `name`.

        `units` requests a full maxout unit (its own weights) for tensors whose
        width cannot be widened, such as the sum of a residual block.
        """
        if self.activation == "maxout":
            return Maxout(
                pieces=MAXOUT_PIECES,
                units=units,
                kernel_initializer=self.initializer(),
                name=name,
            )(x)
        return layers.Activation(self.activation, name=name)(x)


def conv_block(
    x, filters, kernel_size, *, knobs, name, strides=1, padding="valid",
    use_bias=True, bn_name=None, act_name=None, activate=True, bn_epsilon=1e-3,
):
    """Conv2D, then BatchNormalization if asked, then the activation.

    Layer names: the conv is `name`; the norm `bn_name` (default `name_bn`);
    the activation `act_name` (default `name_<activation>`). Without batch
    norm a plain activation is fused into the conv, as in keras.applications.
    With maxout the conv makes `pieces` times the filters and Maxout reduces
    them back to `filters`.
    """
    fused = knobs.fused_activation() if activate else None
    x = layers.Conv2D(
        filters * (knobs.pieces if activate else 1),
        kernel_size,
        strides=strides,
        padding=padding,
        use_bias=use_bias,
        activation=fused,
        kernel_initializer=knobs.initializer(),
        kernel_regularizer=knobs.regularizer(),
        kernel_constraint=knobs.constraint(axis=[0, 1, 2]),
        name=name,
    )(x)
    if knobs.batch_norm:
        # Ours (the fused kernel) after a conv; Keras's after a Dense (2-D, where it gains nothing).
        x = BatchNormalization(epsilon=bn_epsilon, name=bn_name or f"{name}_bn")(x)
    if activate and fused is None:
        x = knobs.activation_layer(x, name=act_name or f"{name}_{knobs.activation}")
    return x


def dense_block(x, units, *, knobs, name, dropout=0.0):
    """Hidden Dense layer with the knobs, then Dropout (`name_dropout`)."""
    fused = knobs.fused_activation()
    x = layers.Dense(
        units * knobs.pieces,
        activation=fused,
        kernel_initializer=knobs.initializer(),
        kernel_regularizer=knobs.regularizer(),
        kernel_constraint=knobs.constraint(axis=0),
        name=name,
    )(x)
    if knobs.batch_norm:
        x = layers.BatchNormalization(name=f"{name}_bn")(x)
    if fused is None:
        x = knobs.activation_layer(x, name=f"{name}_{knobs.activation}")
    if dropout:
        x = layers.Dropout(dropout, name=f"{name}_dropout")(x)
    return x


def classifier(x, *, classes, classifier_activation, knobs, name="predictions"):
    """The final Dense layer (`predictions`), as in keras.applications."""
    return layers.Dense(
        classes,
        activation=classifier_activation,
        kernel_regularizer=knobs.regularizer(),
        kernel_constraint=knobs.constraint(axis=0),
        name=name,
    )(x)


def global_pool(x, pooling):
    """Feature-extractor pooling when include_top is False."""
    if pooling == "avg":
        return layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if pooling == "max":
        return layers.GlobalMaxPooling2D(name="max_pool")(x)
    return x


def top(x, *, include_top, pooling, classes, classifier_activation, knobs, fc=None):
    """The end of every CNN: the classifier with include_top, else the features.

    With include_top, `fc` names the family's classifier:
    - a dict of hidden layer names to units (LeNet, AlexNet, VGG): `flatten`,
      then a `dense_block` each, with Dropout(knobs.dropout) after each;
    - None, the all-convolutional top (GoogLeNet, ResNet): `avg_pool` (global
      average pooling), then `dropout` when knobs.dropout is set;
    then `predictions`. Without include_top, `pooling` (None, "avg" or "max")
    as in keras.applications.
    """
    if not include_top:
        return global_pool(x, pooling)
    if fc is None:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        if knobs.dropout:
            x = layers.Dropout(knobs.dropout, name="dropout")(x)
    else:
        x = layers.Flatten(name="flatten")(x)
        for layer_name, units in fc.items():
            x = dense_block(x, units, knobs=knobs, name=layer_name, dropout=knobs.dropout)
    return classifier(x, classes=classes, classifier_activation=classifier_activation, knobs=knobs)


def finish_model(
    x, inputs, *, name, include_top, weights, pooling, classes, classifier_activation, knobs,
    architecture, fc=None, aux_outputs=(),
):
    """Adds the `top` to the features `x`, makes the model and loads `weights`.

    The tail every CNN builder shares, as keras.applications writes it at the
    end of each family: the top, `keras.Model(inputs, outputs, name=name)`,
    then `load_weights` with the weights of `architecture`. `aux_outputs`
    (GoogLeNet's auxiliary classifiers) follow the main output, which makes
    the model's outputs a list.
    """
    x = top(
        x, include_top=include_top, pooling=pooling, classes=classes,
        classifier_activation=classifier_activation, knobs=knobs, fc=fc,
    )
    outputs = [x, *aux_outputs] if aux_outputs else x
    model = keras.Model(inputs, outputs, name=name)
    return load_weights(model, weights, architecture=architecture, include_top=include_top)


def check_arguments(
    *, model_name, include_top, weights, input_tensor, input_shape, pooling,
    classes, default_shape, min_size, imagenet=False,
):
    """Checks the keras.applications arguments before any layer is built.

    Returns the input shape to use, (height, width, channels). Each error names
    the received value and says what to pass instead.
    """
    if not isinstance(include_top, bool):
        raise ArgumentError(f"include_top must be True or False, received {include_top!r}.")
    if pooling not in POOLINGS:
        raise ArgumentError(f"pooling must be None, 'avg' or 'max', received {pooling!r}.")
    if include_top and (isinstance(classes, bool) or not isinstance(classes, int) or classes < 1):
        raise ArgumentError(f"classes must be a positive integer, received {classes!r}.")
    if weights == "imagenet":
        if not imagenet:
            raise ArgumentError(
                f"No ImageNet weights are published for {model_name}; "
                "use weights=None or the path of a weights file."
            )
        if include_top and classes != 1000:
            raise ArgumentError(
                "weights='imagenet' with include_top=True needs classes=1000, "
                f"received classes={classes}; use include_top=False for other classes."
            )
    elif weights is not None and not os.path.exists(str(weights)):
        raise ArgumentError(
            f"weights must be None, 'imagenet' or an existing weights file, "
            f"received {weights!r}."
        )

    if input_shape is None and input_tensor is not None:
        input_shape = tuple(input_tensor.shape[1:])
    if input_shape is None:
        input_shape = default_shape
    try:
        input_shape = tuple(None if dim is None else int(dim) for dim in input_shape)
    except (TypeError, ValueError):
        raise ArgumentError(
            f"input_shape must be (height, width, channels), received {input_shape!r}."
        ) from None
    if len(input_shape) != 3 or input_shape[2] is None or input_shape[2] < 1:
        raise ArgumentError(
            f"input_shape must be (height, width, channels) with channels >= 1, "
            f"received {input_shape!r}."
        )
    if weights == "imagenet" and input_shape[2] != 3:
        raise ArgumentError(
            f"ImageNet weights need 3 input channels, received input_shape={input_shape}."
        )
    for size in input_shape[:2]:
        if size is None:
            if include_top:
                raise ArgumentError(
                    f"{model_name} needs a fixed height and width when include_top=True, "
                    f"received input_shape={input_shape}."
                )
        elif size < min_size:
            raise ArgumentError(
                f"{model_name} needs inputs of at least {min_size}x{min_size}, "
                f"received input_shape={input_shape}; resize the images or pick a "
                "model for small inputs such as lenet5."
            )
    return input_shape


def make_input(input_tensor, input_shape):
    """Returns (tensor to build on, model inputs), as keras.applications does."""
    if input_tensor is None:
        tensor = layers.Input(shape=input_shape, name="input")
        return tensor, tensor
    if not keras.backend.is_keras_tensor(input_tensor):
        tensor = layers.Input(tensor=input_tensor, shape=input_shape)
        return tensor, tensor
    return input_tensor, keras.utils.get_source_inputs(input_tensor)


# ImageNet weights Keras publishes, by architecture: file names and hashes as in
# keras.applications, so a file already in the Keras cache is found and reused.
_KERAS_WEIGHTS = "https://storage.googleapis.com/tensorflow/keras-applications/"
IMAGENET_WEIGHTS = {
    "vgg16": ("vgg16/vgg16_weights_tf_dim_ordering_tf_kernels.h5",
              "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "vgg19": ("vgg19/vgg19_weights_tf_dim_ordering_tf_kernels.h5",
              "vgg19/vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "resnet50": ("resnet/resnet50_weights_tf_dim_ordering_tf_kernels.h5",
                 "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "resnet101": ("resnet/resnet101_weights_tf_dim_ordering_tf_kernels.h5",
                  "resnet/resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "resnet152": ("resnet/resnet152_weights_tf_dim_ordering_tf_kernels.h5",
                  "resnet/resnet152_weights_tf_dim_ordering_tf_kernels_notop.h5"),
}


def load_weights(model, weights, *, architecture, include_top):
    """Loads `weights` (None, "imagenet" or a file path) into `model`.

    "imagenet" uses the file Keras publishes for `architecture`: taken from the
    Keras cache (`$KERAS_HOME/models`, default `~/.keras/models`) when present,
    downloaded otherwise. Offline, the error names the file and where to put it.
    """
    if weights is None:
        return model
    if weights == "imagenet":
        remote = IMAGENET_WEIGHTS[architecture][0 if include_top else 1]
        file_name = os.path.basename(remote)
        try:
            path = keras.utils.get_file(file_name, _KERAS_WEIGHTS + remote, cache_subdir="models")
        except Exception as error:  # get_file raises a bare Exception on fetch failure
            raise RuntimeError(
                f"Could not get ImageNet weights {file_name} ({error}). On a machine "
                f"with internet, download {_KERAS_WEIGHTS + remote} and put it in "
                "$KERAS_HOME/models/ (default ~/.keras/models/), then run again."
            ) from None
        weights = path
    model.load_weights(weights)
    return model
