"""Layers the classic architectures need and Keras does not ship.

All are registered as serializable under the "dlsuite" package, so a model
that uses them saves to `.keras` and loads back with `safe_mode=True` and no
`custom_objects` once `dlsuite.models` is imported.
"""

import keras
from keras import ops

from dlsuite.models.errors import ArgumentError


@keras.saving.register_keras_serializable(package="dlsuite")
class LocalResponseNormalization(keras.layers.Layer):
    """Local Response Normalization across channels (AlexNet, section 3.3).

    b[c] = a[c] / (k + alpha / n * sum(a[c']^2 for c' within n/2 of c)) ** beta

    The paper's constants are the defaults: depth_radius 2 (n = 5), k = 2,
    alpha = 1e-4, beta = 0.75. Alpha is divided by the window size n as in the
    paper and Caffe (TensorFlow's `tf.nn.local_response_normalization` does not
    divide, so its alpha is ours / n).
    """

    def __init__(self, depth_radius=2, bias=2.0, alpha=1e-4, beta=0.75, **kwargs):
        super().__init__(**kwargs)
        if int(depth_radius) < 0:
            raise ArgumentError(f"depth_radius must be >= 0, received {depth_radius}.")
        self.depth_radius = int(depth_radius)
        self.bias = float(bias)
        self.alpha = float(alpha)
        self.beta = float(beta)

    def call(self, inputs):
        window = 2 * self.depth_radius + 1
        squared = ops.square(inputs)
        # Sum of squares over neighbouring channels: pad the channel axis and
        # take a sliding window sum, which works on any backend and rank.
        channels = inputs.shape[-1]
        padded = ops.pad(
            squared,
            [[0, 0]] * (len(inputs.shape) - 1) + [[self.depth_radius, self.depth_radius]],
        )
        window_sum = sum(
            padded[..., offset : offset + channels] for offset in range(window)
        )
        scale = ops.power(self.bias + self.alpha / window * window_sum, self.beta)
        return inputs / scale

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "depth_radius": self.depth_radius,
            "bias": self.bias,
            "alpha": self.alpha,
            "beta": self.beta,
        }


@keras.saving.register_keras_serializable(package="dlsuite")
class Maxout(keras.layers.Layer):
    """Maxout (Goodfellow et al., 2013): the maximum over groups of features.

    Without `units`, the layer has no weights: it splits the last axis into
    groups of `pieces` adjacent features and keeps each group's maximum, so the
    layer before it should produce `pieces` times the features wanted (the
    builders do this when `activation="maxout"`).

    With `units`, it is a full maxout unit: an affine map to `units * pieces`
    features followed by the same maximum, so it can follow any tensor (used
    after residual additions, whose width is fixed).
    """

    def __init__(self, pieces=2, units=None, kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        if int(pieces) < 2:
            raise ArgumentError(f"Maxout needs pieces >= 2, received {pieces}.")
        if units is not None and int(units) < 1:
            raise ArgumentError(f"Maxout units must be >= 1, received {units}.")
        self.pieces = int(pieces)
        self.units = None if units is None else int(units)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        features = input_shape[-1]
        if self.units is None:
            if features is None or features % self.pieces:
                raise ArgumentError(
                    f"Maxout with pieces={self.pieces} needs a feature count "
                    f"divisible by {self.pieces}, received {features}."
                )
        else:
            self.kernel = self.add_weight(
                name="kernel",
                shape=(features, self.units * self.pieces),
                initializer=self.kernel_initializer,
            )
            self.bias = self.add_weight(
                name="bias", shape=(self.units * self.pieces,), initializer="zeros"
            )

    def call(self, inputs):
        if self.units is not None:
            inputs = ops.matmul(inputs, self.kernel) + self.bias
        features = inputs.shape[-1]
        grouped = ops.reshape(
            inputs,
            tuple(ops.shape(inputs)[:-1]) + (features // self.pieces, self.pieces),
        )
        return ops.max(grouped, axis=-1)

    def compute_output_shape(self, input_shape):
        features = self.units if self.units is not None else input_shape[-1] // self.pieces
        return tuple(input_shape[:-1]) + (features,)

    def get_config(self):
        return {
            **super().get_config(),
            "pieces": self.pieces,
            "units": self.units,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        }


@keras.saving.register_keras_serializable(package="dlsuite")
class ReverseSequence(keras.layers.Layer):
    """Reverses the time axis (axis 1) of a (batch, time, ...) tensor.

    The backward half of a bidirectional language model reads the sequence
    right to left: reverse, run a forward recurrent stack, reverse back, so
    position t of the result has seen tokens t..T only.
    """

    def call(self, inputs):
        return ops.flip(inputs, axis=1)

    def compute_output_shape(self, input_shape):
        return input_shape


# Per-channel constants of the ImageNet preprocessing modes, as
# keras.applications.imagenet_utils applies them.
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


@keras.saving.register_keras_serializable(package="dlsuite")
class ImagePreprocessing(keras.layers.Layer):
    """Raw RGB pixels (0..255) -> what a pretrained network was trained on.

    The modes of `keras.applications.imagenet_utils.preprocess_input`, as a
    layer so the preprocessing travels inside a saved or exported model:

    * "caffe" (VGG, ResNet): RGB -> BGR, minus the ImageNet mean pixel;
    * "tf" (MobileNet, Inception, Xception, ResNetV2): scaled to -1..1;
    * "torch" (DenseNet): scaled to 0..1, then ImageNet mean and std;
    * "raw": unchanged (EfficientNet and ConvNeXt preprocess inside).
    """

    MODES = ("caffe", "tf", "torch", "raw")

    def __init__(self, mode, **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ArgumentError(f"mode must be one of {', '.join(self.MODES)}, received {mode!r}.")
        self.mode = mode

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            return (x / 255.0 - ops.convert_to_tensor(_TORCH_MEAN, x.dtype)) / ops.convert_to_tensor(_TORCH_STD, x.dtype)
        if self.mode == "caffe":
            return ops.flip(x, axis=-1) - ops.convert_to_tensor(_CAFFE_BGR_MEAN, x.dtype)
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


# cuDNN's smallest epsilon; TensorFlow's fused op raises a smaller one to it.
_FUSED_MIN_EPSILON = 1.001e-5


@keras.saving.register_keras_serializable(package="dlsuite")
class BatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` computed by TensorFlow's fused kernel.

    The same class name as Keras's on purpose: Keras names a layer's entry in a
    `.weights.h5` file after its class, so weights files pass both ways
    between our models and keras.applications (and older runs of ours).

    Same arguments, weights and numbers (up to rounding) as the Keras layer,
    which computes the moments and the normalization as separate element-wise
    ops, in float32 even under a mixed policy: two casts and several passes
    over every activation. `FusedBatchNormV3` (oneDNN on CPU, cuDNN on GPU)
    normalizes a bfloat16 or float16 input in one pass, keeping the
    statistics, scale and offset in float32. The registry's ResNet-50 training
    step at 160 px, batch 32, on a 2-core AMD EPYC with AVX512-BF16
    (2026-12-08, Keras's layer then this one, each run beside
    keras.applications.ResNet50): 15.6 -> 25.3 images/s in mixed_bfloat16,
    10.7 -> 14.0 in float32 (docs/scaling.md).

    The moving statistics follow Keras's rule, the biased batch variance
    included (the fused op reports the unbiased one), so precise BN
    (`apps/core/precise_bn.py`) and checkpoints read them as before. Where the
    kernel does not apply (not the TensorFlow backend, a rank other than 4,
    channels not last, a mask, renorm, synchronized statistics, float64, an
    epsilon below cuDNN's minimum) the Keras computation runs.
    """

    def _fused_applies(self, inputs, mask):
        return (
            keras.backend.backend() == "tensorflow"
            and len(inputs.shape) == 4
            and self.axis in (-1, 3)
            and mask is None
            and not self.renorm
            and not self.synchronized
            and self.compute_dtype in ("float32", "bfloat16", "float16")
            and self.epsilon >= _FUSED_MIN_EPSILON
        )

    def call(self, inputs, training=None, mask=None):
        if not self._fused_applies(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        x = tf.cast(inputs, self.compute_dtype)
        channels = x.shape[-1]
        scale = tf.cast(self.gamma, "float32") if self.scale else tf.ones([channels])
        offset = tf.cast(self.beta, "float32") if self.center else tf.zeros([channels])
        if training and self.trainable:
            y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                x, scale, offset, epsilon=self.epsilon, is_training=True)
            count = tf.cast(tf.size(x) // channels, "float32")
            variance = variance * ((count - 1.0) / count)  # unbiased -> biased, as Keras keeps it
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
            return y
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(
            x, scale, offset, mean=self.moving_mean, variance=self.moving_variance,
            epsilon=self.epsilon, is_training=False)
        return y
