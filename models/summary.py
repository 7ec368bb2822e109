"""What a built model costs, read from its graph without running it.

For a Keras functional model (Sequential and nested models included) this
module gives, per layer and in total:

* the output shape and parameter count;
* the receptive field: how many input pixels, per spatial axis, one output
  position sees, and its "jump" (the cumulative stride: the input distance
  between two neighbouring output positions). Walking from the input,
  `rf_out = rf_in + (k_eff - 1) * jump_in` and `jump_out = jump_in * stride`,
  with the dilated kernel `k_eff = d * (k - 1) + 1`. This is the theoretical
  receptive field: it is not clipped to the image and ignores padding, which
  shifts a field but does not resize it;
* forward FLOPs per example, counted as 2 x multiply-adds of the layers with
  weight matrices: convolutions (plain, depthwise, separable, transposed),
  Dense on any rank (once per position), the recurrent layers (per time step
  `gates * (input + units) * units`, times the sequence length) and full
  Maxout units. Biases, activations, normalization, pooling, additions and
  embedding lookups are not counted, the same convention as the papers'
  numbers (ResNet-50: 3.86 GMACs, about 7.7 GFLOPs);
* training memory at the peak of a step: weights, optimizer slots, the
  weight gradients and activations backpropagation holds at its fullest
  moment, the temporaries and the framework's per-variable bookkeeping, for
  a batch size and an optimizer (checked against measured peaks within 25%
  for the CNN family, see `dlsuite diagnose memory`).

None of it needs weight values, so `shapes_only()` builds a model for
analysis without running its initializers.
"""

import contextlib
import math
import re

import keras

from dlsuite.models import compat
from dlsuite.models.layers import LocalResponseNormalization, Maxout

# Slot variables each optimizer keeps per trainable parameter: momentum and
# Nesterov keep a velocity; Adagrad and RMSprop a running square; Adam, AdamW,
# Nadam and Adamax both moments; Adadelta the squared gradients and updates;
# L-BFGS a history of m = 10 (s, y) pairs, 2 * 10 vectors.
OPTIMIZER_SLOTS = {
    "sgd": 0,
    "momentum": 1,
    "nesterov": 1,
    "adagrad": 1,
    "rmsprop": 1,
    "adadelta": 2,
    "adam": 2,
    "adamw": 2,
    "nadam": 2,
    "adamax": 2,
    "lbfgs": 20,
}
OPTIMIZERS = tuple(OPTIMIZER_SLOTS)

GLOBAL = "global"

# Layers through which the receptive field passes unchanged whatever the
# shapes say (they pad or crop the borders, or act per position).
_PASS_THROUGH = (
    keras.layers.ZeroPadding1D,
    keras.layers.ZeroPadding2D,
    keras.layers.ZeroPadding3D,
    keras.layers.Cropping1D,
    keras.layers.Cropping2D,
    keras.layers.Cropping3D,
)
_GLOBAL_POOLING = (
    keras.layers.GlobalAveragePooling1D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalAveragePooling3D,
    keras.layers.GlobalMaxPooling1D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.GlobalMaxPooling3D,
)
_POOLING = (
    keras.layers.AveragePooling1D,
    keras.layers.AveragePooling2D,
    keras.layers.AveragePooling3D,
    keras.layers.MaxPooling1D,
    keras.layers.MaxPooling2D,
    keras.layers.MaxPooling3D,
)
_TRANSPOSED_CONV = (
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
)
_SEPARABLE_CONV = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
_DEPTHWISE_CONV = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
_CONV = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)


@contextlib.contextmanager
def shapes_only():
    """Builds models inside with weights declared but never initialized.

    Everything in this module reads only the weights' shapes and dtypes;
    skipping the initializers makes VGG19 (143M parameters) build in
    milliseconds instead of seconds, holding no weight memory. A model built
    here cannot be run or trained: build it again outside to do that.

    Example:
        >>> with shapes_only():
        ...     model = keras.applications.VGG19(weights=None)
        >>> describe(model)["params"]
        143667240
    """
    start = compat.uninitialized_variable_count()
    try:
        with keras.StatelessScope(initialize_variables=False):
            yield
    finally:
        # Keras queues skipped initializations and runs them all when the next
        # top-level StatelessScope closes anywhere (Keras opens one for shape
        # inference and in training): drop ours, or some unrelated later call
        # would pay for, and hold, every weight skipped here.
        compat.drop_uninitialized_variables(start)


class _Field:
    """Receptive field of one tensor: per spatial axis size and jump."""

    __slots__ = ("size", "jump")

    def __init__(self, size, jump):
        self.size = tuple(size)
        self.jump = tuple(jump)

    def grow(self, kernel, strides, dilation):
        kernel = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
        return _Field(
            [r + (k - 1) * j for r, k, j in zip(self.size, kernel, self.jump)],
            [j * s for j, s in zip(self.jump, strides)],
        )


def _spatial_rank(shape):
    """Spatial axes of a (batch, *spatial, channels) tensor."""
    return len(shape) - 2


def _input_field(tensor):
    # An image (batch, H, W, C) or a feature sequence (batch, T, F) starts at
    # one pixel / one step; token ids (batch, T) are not a spatial input.
    rank = _spatial_rank(tensor.shape)
    if rank < 1:
        return None
    return _Field([1] * rank, [1] * rank)


def _merge_fields(fields):
    """Field of a layer reading several tensors: the widest one."""
    if any(field == GLOBAL for field in fields):
        return GLOBAL
    fields = [field for field in fields if field is not None]
    if not fields or len({len(field.size) for field in fields}) != 1:
        return None
    return _Field(
        [max(sizes) for sizes in zip(*(field.size for field in fields))],
        [max(jumps) for jumps in zip(*(field.jump for field in fields))],
    )


def _tuple(value, rank):
    if isinstance(value, int):
        return (value,) * rank
    return tuple(value)


def _output_field(layer, fields, inputs, outputs):
    """Receptive field of a layer's outputs from those of its inputs."""
    # These see the whole input whatever came before: a recurrent layer reads
    # every step, global pooling and flattening every position.
    if isinstance(layer, _GLOBAL_POOLING + (keras.layers.RNN, keras.layers.Bidirectional)):
        return GLOBAL
    if len(outputs[0].shape) <= 2 and any(len(tensor.shape) > 2 for tensor in inputs):
        return GLOBAL
    field = _merge_fields(fields)
    if field is None or field == GLOBAL:
        return field
    if isinstance(layer, _TRANSPOSED_CONV):
        return None  # upsamples: the field shrinks in a way this walk does not model
    rank = len(field.size)
    if isinstance(layer, _CONV + _DEPTHWISE_CONV + _SEPARABLE_CONV):
        return field.grow(
            _tuple(layer.kernel_size, rank),
            _tuple(layer.strides, rank),
            _tuple(layer.dilation_rate, rank),
        )
    if isinstance(layer, _POOLING):
        strides = layer.strides if layer.strides is not None else layer.pool_size
        return field.grow(_tuple(layer.pool_size, rank), _tuple(strides, rank), (1,) * rank)
    if isinstance(layer, _PASS_THROUGH):
        return field
    # Anything else (BN, activations, Add, Concatenate, Dense on feature maps,
    # Dropout, ...) keeps the field if it keeps the spatial grid.
    out_shape = outputs[0].shape
    in_grid = {tuple(tensor.shape[1:-1]) for tensor in inputs}
    if in_grid == {tuple(out_shape[1:-1])}:
        return field
    return None


def _known(shape, layer_name, sequence_length):
    """Per-example shape with unknown dims resolved, or a ValueError message.

    A None time axis of a (batch, time) or (batch, time, features) tensor takes
    `sequence_length`; any other unknown dimension cannot be counted.
    """
    dims = list(shape[1:])
    if dims and dims[0] is None and len(shape) in (2, 3) and sequence_length is not None:
        dims[0] = sequence_length
    if any(dim is None for dim in dims):
        hint = (
            "pass sequence_length=<time steps>"
            if len(shape) in (2, 3) and shape[1] is None
            else "build the model with a fixed input shape"
        )
        raise ValueError(
            f"Layer {layer_name!r} has an unknown dimension in shape {tuple(shape)}; "
            f"{hint} to count FLOPs and activations."
        )
    return dims


def _rnn_macs_per_step(rnn):
    """Multiply-adds of one time step: input and recurrent kernels."""
    cells = getattr(rnn.cell, "cells", [rnn.cell])  # StackedRNNCells holds several
    return sum(
        math.prod(weight.shape)
        for cell in cells
        for weight in (getattr(cell, "kernel", None), getattr(cell, "recurrent_kernel", None))
        if weight is not None
    )


def _layer_macs(layer, in_shapes, out_shapes):
    """Multiply-adds per example of one call; shapes exclude the batch axis."""
    if isinstance(layer, keras.layers.TimeDistributed):
        steps = in_shapes[0][0]
        inner = _layer_macs(
            layer.layer, [shape[1:] for shape in in_shapes], [shape[1:] for shape in out_shapes]
        )
        return steps * inner
    if isinstance(layer, keras.layers.Bidirectional):
        steps = in_shapes[0][0]
        return steps * (
            _rnn_macs_per_step(layer.forward_layer) + _rnn_macs_per_step(layer.backward_layer)
        )
    if isinstance(layer, keras.layers.RNN):
        return in_shapes[0][0] * _rnn_macs_per_step(layer)
    if isinstance(layer, keras.layers.Dense):
        positions = math.prod(in_shapes[0][:-1])
        return positions * in_shapes[0][-1] * layer.units
    if isinstance(layer, keras.layers.EinsumDense):
        # Each output element is a dot product over the contracted axes.
        return math.prod(out_shapes[0]) * (
            math.prod(layer.kernel.shape) // math.prod(_kernel_output_dims(layer))
        )
    if isinstance(layer, Maxout):
        if layer.units is None:
            return 0
        positions = math.prod(in_shapes[0][:-1])
        return positions * in_shapes[0][-1] * layer.units * layer.pieces
    if isinstance(layer, _TRANSPOSED_CONV):
        # Every input position scatters a kernel-sized patch to every filter.
        return math.prod(in_shapes[0][:-1]) * math.prod(layer.kernel.shape)
    if isinstance(layer, _SEPARABLE_CONV):
        positions = math.prod(out_shapes[0][:-1])
        return positions * (
            math.prod(layer.depthwise_kernel.shape) + math.prod(layer.pointwise_kernel.shape)
        )
    if isinstance(layer, _DEPTHWISE_CONV):
        return math.prod(out_shapes[0][:-1]) * math.prod(layer.kernel.shape)
    if isinstance(layer, _CONV):
        # kernel is (*k, in_channels / groups, filters): one multiply-add per
        # kernel entry at every output position.
        return math.prod(out_shapes[0][:-1]) * math.prod(layer.kernel.shape)
    return 0


def _kernel_output_dims(layer):
    """Kernel dims of an EinsumDense that index output (not contracted) axes."""
    equation = layer.equation.replace(" ", "")
    inputs, output = equation.split("->")
    _, kernel = inputs.split(",")
    return [dim for axis, dim in zip(kernel, layer.kernel.shape) if axis in output]


def _dtype_bytes(dtype):
    """Bytes of one element of `dtype` ("float32" -> 4, "bfloat16" -> 2)."""
    name = keras.backend.standardize_dtype(dtype)
    if name == "bool":
        return 1
    bits = re.search(r"\d+", name)
    if bits is None:
        raise ValueError(f"Cannot size dtype {name!r}.")
    return max(1, int(bits.group()) // 8)


def _walk(model, fields, prefix, sequence_length, rows, seen_layers, aliases):
    """Visits `model`'s nodes from the input; returns the output tensors' fields.

    `fields` maps id(input tensor) -> field for the model's inputs; rows are
    appended in execution order. Nested models are walked in place, their
    layers named `outer/inner`. `aliases` maps id(tensor) -> id(tensor) for
    tensors that are another's buffer under a new name (a nested model's
    inputs and outputs, Flatten and Reshape outputs), for the memory count.
    """
    if isinstance(model, keras.Sequential):
        if getattr(model, "_functional", None) is None:
            raise ValueError(
                f"Sequential model {model.name!r} has no input shape yet; "
                "start it with keras.Input(shape=...)."
            )
        model = model._functional
    nodes_by_depth = model._nodes_by_depth
    for depth in sorted(nodes_by_depth, reverse=True):
        for node in nodes_by_depth[depth]:
            layer = node.operation
            if node.is_input:
                for tensor in node.outputs:
                    fields.setdefault(id(tensor), _input_field(tensor))
                if not prefix:  # a nested model's input is its caller's tensor
                    rows.append(_row(layer, [], node.outputs, fields, prefix, 0, seen_layers,
                                     sequence_length))
                continue
            inputs = node.input_tensors
            if isinstance(layer, keras.Model):
                inner_inputs = layer._functional.inputs if isinstance(
                    layer, keras.Sequential) else layer.inputs
                inner_fields = {
                    id(inner): fields.get(id(outer)) for inner, outer in zip(inner_inputs, inputs)
                }
                aliases.update({id(inner): id(outer) for inner, outer in zip(inner_inputs, inputs)})
                inner_outputs = _walk(layer, inner_fields, f"{prefix}{layer.name}/",
                                      sequence_length, rows, seen_layers, aliases)
                functional = layer._functional if isinstance(layer, keras.Sequential) else layer
                for tensor, inner, field in zip(node.outputs, functional.outputs, inner_outputs):
                    fields[id(tensor)] = field
                    aliases[id(tensor)] = id(inner)
                continue
            if isinstance(layer, _VIEWS):
                aliases[id(node.outputs[0])] = id(inputs[0])
            field = _output_field(layer, [fields.get(id(t)) for t in inputs], inputs, node.outputs)
            for tensor in node.outputs:
                fields[id(tensor)] = field
            try:
                macs = _layer_macs(
                    layer,
                    [_known(t.shape, layer.name, sequence_length) for t in inputs],
                    [_known(t.shape, layer.name, sequence_length) for t in node.outputs],
                )
                error = None
            except ValueError as unknown:
                macs, error = None, str(unknown)
            rows.append(_row(layer, inputs, node.outputs, fields, prefix, macs, seen_layers,
                             sequence_length, error))
    return [fields.get(id(tensor)) for tensor in model.outputs]


def _row(layer, inputs, outputs, fields, prefix, macs, seen_layers, sequence_length,
         error=None):
    field = fields.get(id(outputs[0]))
    shapes = [tuple(tensor.shape[1:]) for tensor in outputs]
    # A shared layer's weights are counted at its first call only.
    first_call = id(layer) not in seen_layers
    params = layer.count_params() if first_call else 0
    seen_layers.add(id(layer))

    def sized(tensors):
        return [(id(tensor), math.prod(_known(tensor.shape, layer.name, sequence_length))
                 * _dtype_bytes(tensor.dtype)) for tensor in tensors]

    try:
        inputs_sized, outputs_sized = sized(inputs), sized(outputs)
        elements = sum(size for _, size in outputs_sized)
    except ValueError as unknown:
        inputs_sized, outputs_sized = [], []
        elements, error = None, error or str(unknown)
    return {
        "name": prefix + layer.name,
        "class": type(layer).__name__,
        "output_shape": shapes[0] if len(shapes) == 1 else shapes,
        "params": params,
        "receptive_field": field if field in (None, GLOBAL) else field.size,
        "jump": None if field in (None, GLOBAL) else field.jump,
        "flops": None if macs is None else 2 * macs,
        "activation_bytes": elements,
        "_error": error,
        # For the memory walk: the layer, its tensors as (id, bytes per
        # example) and the bytes of each weight it trains (first call only).
        "_layer": layer,
        "_inputs": inputs_sized,
        "_outputs": outputs_sized,
        "_trainable": [_weight_bytes([w]) for w in layer.trainable_weights] if first_call else [],
    }


def _rows(model, sequence_length=None, aliases=None):
    rows = []
    _walk(model, {}, "", sequence_length, rows, set(), aliases if aliases is not None else {})
    return rows


def layer_table(model, sequence_length=None):
    """Per-layer analysis of a built functional (or Sequential) model.

    Args:
        model: a built `keras.Model` with known input shapes.
        sequence_length: time steps to assume where a sequence model's time
            axis is None; only used for `flops` and `activation_bytes`.

    Returns:
        A list of dicts in execution order, one per layer call, including the
        input layer:
        `name`, `class`, `output_shape` (without batch; a list of shapes for
        several outputs), `params` (a shared layer's at its first call),
        `receptive_field` (input pixels seen per spatial axis, a tuple; "global"
        once the whole input is seen, after Flatten, global pooling or a
        recurrent layer; None where it does not apply, such as token ids or
        upsampling), `jump` (cumulative stride per spatial axis, or None),
        `flops` (forward FLOPs per example, None if a dimension is unknown) and
        `activation_bytes` (bytes of this layer's output for one example).
    """
    return [
        {key: value for key, value in row.items() if not key.startswith("_")}
        for row in _rows(model, sequence_length)
    ]


def _raise_unknown(rows):
    for row in rows:
        if row["_error"]:
            raise ValueError(row["_error"])


def flops(model, sequence_length=None):
    """Forward FLOPs of one example: 2 x multiply-adds.

    Counted: Conv1D/2D/3D, depthwise, separable and transposed convolutions,
    Dense on any rank (times the positions it is applied at), EinsumDense,
    LSTM/GRU/SimpleRNN (bidirectional: both directions) as
    `gates * (input + units) * units` per step times the steps, and Maxout
    units with weights. Not counted: biases, activations, normalization,
    pooling, merges, embedding lookups, and layers not listed here (such as
    MultiHeadAttention, whose projections are inside one layer).

    Args:
        model: a built `keras.Model`.
        sequence_length: time steps to assume where the time axis is None.

    Raises:
        ValueError: when a dimension the count needs is unknown (a None time
            axis without `sequence_length`, or a None image size).
    """
    rows = _rows(model, sequence_length)
    _raise_unknown(rows)
    return sum(row["flops"] or 0 for row in rows)


def _params(weights):
    return sum(math.prod(weight.shape) for weight in weights)


def _weight_bytes(weights):
    return sum(math.prod(weight.shape) * _dtype_bytes(weight.dtype) for weight in weights)


def _check_memory_arguments(batch_size, optimizer):
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, received {batch_size!r}.")
    if optimizer not in OPTIMIZER_SLOTS:
        raise ValueError(
            f"Unknown optimizer {optimizer!r}; known optimizers: {', '.join(OPTIMIZERS)}."
        )


# What backprop keeps of each layer, as TensorFlow's gradient functions need
# it: a convolution or Dense layer its input (for the kernel gradient), ReLU,
# tanh, sigmoid and softmax their output, batch norm its input, max pooling
# both. Outputs that nothing needs (a batch norm feeding a ReLU, a residual
# sum, a padding's source) are freed during the forward pass.
_KEEPS_NOTHING = (
    keras.layers.InputLayer, keras.layers.Add, keras.layers.Subtract, keras.layers.Average,
    keras.layers.Concatenate, keras.layers.Flatten, keras.layers.Reshape, keras.layers.Permute,
    keras.layers.RepeatVector, keras.layers.Rescaling, keras.layers.Normalization,
    keras.layers.Identity, keras.layers.UpSampling1D, keras.layers.UpSampling2D, keras.layers.UpSampling3D,
    *_GLOBAL_POOLING, *_PASS_THROUGH,
    keras.layers.AveragePooling1D, keras.layers.AveragePooling2D, keras.layers.AveragePooling3D,
)
# Layers whose output is a view of their input's buffer, not a new one.
_VIEWS = (keras.layers.Flatten, keras.layers.Reshape)
_KEEPS_INPUT = (
    *_CONV, *_DEPTHWISE_CONV, *_SEPARABLE_CONV, *_TRANSPOSED_CONV, keras.layers.Dense,
    keras.layers.EinsumDense, keras.layers.BatchNormalization, keras.layers.LayerNormalization,
    keras.layers.GroupNormalization, keras.layers.Embedding, keras.layers.Multiply, keras.layers.Dot,
)
# Activations whose gradient TensorFlow computes from the output, and those
# it computes from the input.
_FROM_OUTPUT = frozenset({"relu", "elu", "selu", "tanh", "sigmoid", "softmax", "log_softmax", "exponential"})
_FROM_INPUT = frozenset({"leaky_relu", "relu6", "gelu", "silu", "swish", "softplus", "softsign", "mish",
                         "hard_sigmoid", "hard_silu", "hard_swish"})

# Temporaries of the update: plain SGD subtracts the scaled gradient in
# place; the others compute their new slots and step through about one
# temporary the size of the variable, and two updates run at once
# (measured: VGG-11's and AlexNet's 64 MB and 16 MB fc layers add about
# 80 MB to a step's peak with Adam or momentum, nothing with SGD).
_UPDATE_TEMPORARIES = {name: (0 if name in ("sgd", "lbfgs") else 1) for name in OPTIMIZER_SLOTS}
_CONCURRENT_UPDATES = 2

# Weight gradients alive at once. With SGD, AdaGrad and Adam, TensorFlow
# 2.21 runs each variable's update soon after its gradient is ready, so they
# do not pile up: those of the last 3 layers with kernels were alive together
# at the peaks measured (ResNet-18/34/50 at batch 1-32, VGG-11/13/16, AlexNet,
# GoogLeNet, LeNet-5). With momentum, Nesterov and RMSprop the executor
# measurably runs the updates after backprop instead: every gradient, and
# the activations they are computed from, are alive at the peak (ResNet-18
# at batch 1: 67-72 MB against 29-38 MB with SGD, AdaGrad or Adam). L-BFGS
# flattens all gradients at once.
GRADIENT_WINDOW = 3
_ALL_GRADIENTS_AT_ONCE = frozenset({"momentum", "nesterov", "rmsprop", "lbfgs"})
_NORMALIZATION = (keras.layers.BatchNormalization, keras.layers.LayerNormalization,
                  keras.layers.GroupNormalization)

# Process memory a Keras variable costs on TensorFlow beyond its values
# (Python objects, resource handle, eager kernels): measured 40-48 KiB per
# variable for weights and for optimizer slots alike (TensorFlow 2.21,
# Keras 3.15, CPU). It dominates below a few MB of weights (LeNet-5).
FRAMEWORK_BYTES_PER_VARIABLE = 44 * 1024


def _activation_name(function):
    name = getattr(function, "__name__", None) or str(function)
    return name.lower()


def _backprop_needs(layer):
    """(keeps its inputs, keeps its outputs, extra kept buffers in outputs' size)."""
    if isinstance(layer, keras.layers.Dropout):
        return False, False, (1 if layer.rate > 0 else 0)  # the mask
    if isinstance(layer, _KEEPS_NOTHING):
        return False, False, 0
    if isinstance(layer, (keras.layers.Activation, keras.layers.ReLU, keras.layers.LeakyReLU,
                          keras.layers.ELU, keras.layers.Softmax)):
        if isinstance(layer, keras.layers.Activation):
            name = _activation_name(layer.activation)
        else:
            name = {"ReLU": "relu", "LeakyReLU": "leaky_relu", "ELU": "elu", "Softmax": "softmax"}[
                type(layer).__name__]
        if name == "linear":
            return False, False, 0
        return name in _FROM_INPUT, name not in _FROM_INPUT, 0
    if isinstance(layer, _KEEPS_INPUT):
        name = _activation_name(getattr(layer, "activation", None) or "linear")
        if name in _FROM_OUTPUT:
            return True, True, 0
        return True, False, (1 if name in _FROM_INPUT else 0)  # the pre-activation
    if isinstance(layer, _POOLING):  # max pooling; average pooling keeps nothing (above)
        return True, True, 0
    if isinstance(layer, LocalResponseNormalization):
        # Built from primitive ops: keeps the input, the output and the
        # window sum and scale (each input-sized) for their gradients.
        return True, True, 2
    return True, True, 0  # anything else (Maxout, recurrent layers): both, to be safe


def _step_peak(model, rows, aliases, batch_size, optimizer):
    """Walks backprop from the loss down to the first layer and returns the
    bytes at the fullest moment: the activations still needed, the gradients
    flowing through the layer at hand, the weight gradients of the last
    GRADIENT_WINDOW layers with kernels and the update temporaries of the
    largest of them; for the optimizers of _ALL_GRADIENTS_AT_ONCE, every
    activation and every gradient. Returns {"activations", "gradients",
    "workspace"}.
    """

    def buffer(tensor_id):
        while tensor_id in aliases:
            tensor_id = aliases[tensor_id]
        return tensor_id

    size, last_use, extra, carries_gradient = {}, {}, [], set()
    positions = len(rows)  # rows 0..n-1, then the loss at n
    for index, row in enumerate(rows):
        inputs = [(buffer(t), b) for t, b in row["_inputs"]]
        outputs = [(buffer(t), b) for t, b in row["_outputs"]]
        size.update(inputs + outputs)
        keeps_inputs, keeps_outputs, extras = _backprop_needs(row["_layer"])
        kept = (inputs if keeps_inputs else []) + (outputs if keeps_outputs else [])
        for tensor, _ in kept:
            # Backprop runs from the last layer to the first: a buffer lives
            # until the earliest layer that needs it has been passed.
            last_use[tensor] = min(last_use.get(tensor, positions), index)
        if extras:
            extra.append((index, extras * sum(b for _, b in outputs)))
        if row["_trainable"] or any(t in carries_gradient for t, _ in inputs):
            carries_gradient.update(t for t, _ in outputs if t not in dict(inputs))
    functional = model._functional if isinstance(model, keras.Sequential) else model
    for tensor in functional.outputs:  # the loss needs the predictions
        last_use.setdefault(buffer(id(tensor)), positions)

    # live[i]: bytes per example still held while backprop is at position i.
    live = [0] * (positions + 1)
    for tensor, index in last_use.items():
        live[index] += size[tensor]
    for index, extra_bytes in extra:
        live[index] += extra_bytes
    for index in range(1, positions + 1):
        live[index] += live[index - 1]

    def flowing(row):
        """Bytes per example of the gradients into and out of `row`."""
        return sum(dict((buffer(t), b) for t, b in row["_inputs"] + row["_outputs"]
                        if buffer(t) in carries_gradient).values())

    def temporaries(weights):
        largest = sorted(weights, reverse=True)[:_CONCURRENT_UPDATES]
        return _UPDATE_TEMPORARIES[optimizer] * sum(largest)

    if optimizer in _ALL_GRADIENTS_AT_ONCE:
        weights = [size for row in rows for size in row["_trainable"]]
        return {
            "activations": batch_size * live[positions],
            "gradients": sum(weights),
            "workspace": batch_size * max((flowing(row) for row in rows), default=0) + temporaries(weights),
        }
    best = {"activations": batch_size * live[positions], "gradients": 0, "workspace": 0}
    window = []  # weight bytes of the layers backprop passed last, newest first
    for index in range(positions - 1, -1, -1):
        row = rows[index]
        if row["_trainable"]:
            window.insert(0, (row["_trainable"], isinstance(row["_layer"], _NORMALIZATION)))
            # Keep the last GRADIENT_WINDOW layers with kernels (and the small
            # normalization layers between them).
            majors = 0
            for keep, (_, minor) in enumerate(window):
                majors += not minor
                if majors == GRADIENT_WINDOW:
                    del window[keep + 1:]
                    break
        weights = [size for sizes, _ in window for size in sizes]
        candidate = {
            "activations": batch_size * live[index],
            "gradients": sum(weights),
            "workspace": batch_size * flowing(row) + temporaries(weights),
        }
        if sum(candidate.values()) > sum(best.values()):
            best = candidate
    return best


def _memory(model, rows, aliases, batch_size, optimizer):
    trainable_bytes = _weight_bytes(model.trainable_weights)
    peak = _step_peak(model, rows, aliases, batch_size, optimizer)
    slots = OPTIMIZER_SLOTS[optimizer]
    # Every weight and slot is a variable, plus the optimizer's step counter
    # and learning rate.
    variables = len(model.weights) + slots * len(model.trainable_weights) + 2
    memory = {
        "weights": _weight_bytes(model.weights),
        "gradients": peak["gradients"],
        "optimizer": slots * trainable_bytes,
        "activations": peak["activations"],
        "workspace": peak["workspace"],
        "framework": FRAMEWORK_BYTES_PER_VARIABLE * variables,
    }
    memory["total"] = sum(memory.values())
    return memory


def layer_memory(model, batch_size=32, optimizer="adam", sequence_length=None):
    """The parts of `memory` that add up layer by layer, per layer call.

    For splitting a model across devices (`models.parallel`): a device that
    holds a run of layers holds their weights, optimizer slots, framework
    bookkeeping and the activations backprop keeps of them, each activation
    counted at the layer that makes it (the kept buffers of `memory`'s
    walk, `batch_size` examples). The peak-only parts (gradients and
    workspace at the fullest moment) are left to `memory` of the part.

    Returns:
        A list of bytes, one per row of `layer_table(model)`.
    """
    _check_memory_arguments(batch_size, optimizer)
    aliases = {}
    rows = _rows(model, sequence_length, aliases)
    _raise_unknown(rows)

    def buffer(tensor_id):
        while tensor_id in aliases:
            tensor_id = aliases[tensor_id]
        return tensor_id

    slots = OPTIMIZER_SLOTS[optimizer]
    maker, kept, costs = {}, {}, []
    for index, row in enumerate(rows):
        inputs = [(buffer(t), b) for t, b in row["_inputs"]]
        outputs = [(buffer(t), b) for t, b in row["_outputs"]]
        for tensor, _ in outputs:
            maker.setdefault(tensor, index)
        keeps_inputs, keeps_outputs, extras = _backprop_needs(row["_layer"])
        for tensor, size in (inputs if keeps_inputs else []) + (outputs if keeps_outputs else []):
            kept[tensor] = size
        layer = row["_layer"]
        weights = layer.weights if row["params"] else []
        trainable = sum(row["_trainable"])
        variables = len(weights) + slots * len(row["_trainable"])
        costs.append(_weight_bytes(weights) + slots * trainable + FRAMEWORK_BYTES_PER_VARIABLE * variables
                     + batch_size * extras * sum(b for _, b in outputs))
    for tensor, size in kept.items():
        costs[maker.get(tensor, 0)] += batch_size * size
    return costs


def memory(model, batch_size=32, optimizer="adam", sequence_length=None):
    """Bytes a training step holds: the seed's "memory concerns".

    Args:
        model: a built `keras.Model`.
        batch_size: examples per step, >= 1.
        optimizer: one of OPTIMIZERS; sets the slots kept per trainable
            parameter (sgd 0, momentum 1, adam 2, lbfgs 2 x 10 history pairs).
        sequence_length: time steps to assume where the time axis is None.

    The estimate follows TensorFlow's backprop from the loss down to the
    first layer and reports the fullest moment: the activations still
    needed there (each layer keeps what its gradient needs: a convolution
    its input, a ReLU its output, batch norm its input; a residual sum or a
    batch norm feeding a ReLU keeps nothing), the weight gradients of the
    last few layers passed (each update runs as soon as its gradient is
    ready), the gradients flowing between layers and the update's
    temporaries. `dlsuite diagnose memory` measures the real peak beside it.

    Returns:
        A dict of bytes: `weights` (every parameter, at its dtype's size),
        `gradients` (weight gradients alive at the peak), `optimizer` (slots x
        trainable parameters), `activations` (batch_size x the layer outputs
        backprop still needs at the peak), `workspace` (gradients flowing
        between layers and update temporaries at the peak), `framework`
        (FRAMEWORK_BYTES_PER_VARIABLE per weight and slot variable) and
        `total`, their sum: the peak of a training step.

    Raises:
        ValueError: for an unknown optimizer, batch_size < 1 or an unknown
            dimension.
    """
    _check_memory_arguments(batch_size, optimizer)
    aliases = {}
    rows = _rows(model, sequence_length, aliases)
    _raise_unknown(rows)
    return _memory(model, rows, aliases, batch_size, optimizer)


def _shapes(tensors):
    shapes = [tuple(tensor.shape[1:]) for tensor in tensors]
    return shapes[0] if len(shapes) == 1 else shapes


def describe(model, batch_size=32, optimizer="adam", sequence_length=None):
    """Everything above in one dict, ready for a table or `json.dumps`.

    Returns:
        A dict with `name`, `params`, `trainable_params`,
        `non_trainable_params`, `flops`, `input_shape` and `output_shape`
        (without batch), `batch_size`, `optimizer`, `memory` (see `memory`)
        and `layers` (see `layer_table`).

    Raises:
        ValueError: as `flops` and `memory` do.
    """
    _check_memory_arguments(batch_size, optimizer)
    aliases = {}
    rows = _rows(model, sequence_length, aliases)
    _raise_unknown(rows)
    trainable = _params(model.trainable_weights)
    params = _params(model.weights)
    functional = model._functional if isinstance(model, keras.Sequential) else model
    return {
        "name": model.name,
        "params": params,
        "trainable_params": trainable,
        "non_trainable_params": params - trainable,
        "flops": sum(row["flops"] or 0 for row in rows),
        "input_shape": _shapes(functional.inputs),
        "output_shape": _shapes(functional.outputs),
        "batch_size": batch_size,
        "optimizer": optimizer,
        "memory": _memory(model, rows, aliases, batch_size, optimizer),
        "layers": [
            {key: value for key, value in row.items() if not key.startswith("_")}
            for row in rows
        ],
    }
