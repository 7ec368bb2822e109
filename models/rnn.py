"""Recurrent stacks: LSTM, GRU, simple RNN and IRNN, one- or two-directional.

One builder, `rnn_stack`, makes every variant; the variants are rows of
`VARIANTS` and register under their names (`lstm`, `gru`, `simple_rnn`,
`irnn`, `bilstm`, `bigru`, `bisimple_rnn`), so
`build("lstm", input_shape=(None,), classes=10000)` gives a word-level language
model and `build("bigru", input_shape=(200,), classes=2)` a sentiment
classifier.

Layer names are the same for every cell, so apps address layers without
knowing which cell was picked: `input`, `embedding` (token inputs only),
`rnn_1` ... `rnn_N` (for bidirectional variants the `Bidirectional` wrapper
carries the name; its halves are `forward_rnn_i` and `backward_rnn_i`),
`dropout_1` ... `dropout_N` (only when dropout > 0) and `predictions`.
"""

import functools

import keras

from dlsuite.models.errors import ArgumentError
from dlsuite.models.common import Knobs
from dlsuite.models.fused_rnn import FusedGRU, FusedLSTM
from dlsuite.models.registry import ModelSpec, register

# FusedLSTM / FusedGRU are keras.layers.LSTM / GRU (same weights, config and
# numbers, cuDNN on GPU) with a faster training loop on CPU (issue 17).
CELLS = {
    "lstm": FusedLSTM,
    "gru": FusedGRU,
    "simple_rnn": keras.layers.SimpleRNN,
}
HEADS = ("next_token", "sequence")
DEFAULT_VOCAB_SIZE = 10000
# Sequence classification without `classes`: binary, as in IMDB sentiment.
DEFAULT_SEQUENCE_CLASSES = 2


def _check_positive_int(name, value, *, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = " or None" if allow_none else ""
        raise ArgumentError(f"{name} must be a positive integer{extra}, received {value!r}.")


def _check_rate(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ArgumentError(f"{name} must be a number in [0, 1), received {value!r}.")


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise ArgumentError(f"{name} must be True or False, received {value!r}.")


def _resolve_inputs(*, vocab_size, input_dim, seq_len, input_shape):
    """Reconciles `input_shape` with `vocab_size`, `input_dim` and `seq_len`.

    Returns (vocab_size, input_dim, seq_len) with exactly one of the first two
    set. `input_shape` is (T,) for token ids or (T, F) for float features.
    """
    _check_positive_int("vocab_size", vocab_size, allow_none=True)
    _check_positive_int("input_dim", input_dim, allow_none=True)
    _check_positive_int("seq_len", seq_len, allow_none=True)
    if vocab_size is not None and input_dim is not None:
        raise ArgumentError(
            f"Pass vocab_size (token ids) or input_dim (float features), not both; "
            f"received vocab_size={vocab_size!r} and input_dim={input_dim!r}."
        )
    if input_shape is not None:
        try:
            shape = tuple(None if dim is None else int(dim) for dim in input_shape)
        except (TypeError, ValueError):
            shape = ()
        if len(shape) not in (1, 2) or any(dim is not None and dim < 1 for dim in shape):
            raise ArgumentError(
                f"input_shape must be (time,) for token ids or (time, features) for "
                f"float features, received {input_shape!r}."
            )
        if shape[0] is not None:
            if seq_len is not None and seq_len != shape[0]:
                raise ArgumentError(
                    f"seq_len={seq_len!r} conflicts with input_shape={input_shape!r}; "
                    "pass one of them or make them agree."
                )
            seq_len = shape[0]
        if len(shape) == 1 and input_dim is not None:
            raise ArgumentError(
                f"input_shape={input_shape!r} means token ids but input_dim={input_dim!r} "
                "means float features; pass input_shape=(time, input_dim) for features."
            )
        if len(shape) == 2:
            if vocab_size is not None:
                raise ArgumentError(
                    f"input_shape={input_shape!r} means float features but "
                    f"vocab_size={vocab_size!r} means token ids; pass input_shape=(time,)."
                )
            if shape[1] is None:
                raise ArgumentError(
                    f"input_shape={input_shape!r} needs a fixed feature count, "
                    "e.g. (None, 8)."
                )
            if input_dim is not None and input_dim != shape[1]:
                raise ArgumentError(
                    f"input_dim={input_dim!r} conflicts with input_shape={input_shape!r}; "
                    "pass one of them or make them agree."
                )
            input_dim = shape[1]
    if vocab_size is None and input_dim is None:
        vocab_size = DEFAULT_VOCAB_SIZE
    return vocab_size, input_dim, seq_len


def rnn_stack(
    *,
    cell="lstm",
    bidirectional=False,
    layers=2,
    units=256,
    vocab_size=None,
    input_dim=None,
    embedding_dim=64,
    seq_len=None,
    head=None,
    classes=None,
    classifier_activation="softmax",
    dropout=0.0,
    recurrent_dropout=0.0,
    irnn=False,
    unit_forget_bias=True,
    kernel_initializer=None,
    l1=0.0,
    l2=0.0,
    input_shape=None,
    name=None,
):
    """Builds a stack of recurrent layers with a per-step or a sequence head.

    Cells: LSTM (Hochreiter & Schmidhuber, 1997), GRU (Cho et al., 2014), the
    simple (Elman) RNN, and IRNN (Le, Jaitly & Hinton, 2015, "A Simple Way to
    Initialize Recurrent Networks of Rectified Linear Units"): a simple RNN
    with ReLU activation and an identity-initialized recurrent kernel.
    Bidirectional stacks (Schuster & Paliwal, 1997) concatenate a forward and
    a backward pass at every layer. Dropout sits between layers, on the
    non-recurrent connections (Zaremba et al., 2014).

    The defaults keep TensorFlow's fused cuDNN kernel usable on GPU for LSTM
    and GRU: activation tanh, recurrent_activation sigmoid, recurrent_dropout
    0, unroll False, use_bias True and (GRU) reset_after True. SimpleRNN and
    IRNN have no cuDNN kernel and always run the generic loop.

    Args:
        cell: "lstm", "gru" or "simple_rnn".
        bidirectional: wrap every layer in `keras.layers.Bidirectional`.
        layers: number of stacked recurrent layers, >= 1.
        units: units per recurrent layer (per direction when bidirectional).
        vocab_size: token-id input; an Embedding of `embedding_dim` maps ids in
            [0, vocab_size) to vectors. The default when neither vocab_size nor
            input_dim is given is 10000.
        input_dim: float-feature input of this many features per step.
        embedding_dim: width of the token embedding.
        seq_len: fixed sequence length, or None for any length.
        head: "next_token" (a Dense over `classes` at every time step, output
            (batch, time, classes)) or "sequence" (the last state, then
            Dense(classes), output (batch, classes)). None picks "next_token"
            for unidirectional and "sequence" for bidirectional stacks.
        classes: output classes; defaults to vocab_size for "next_token" with
            token inputs and to 2 for "sequence".
        classifier_activation: activation of `predictions`; None gives logits.
        dropout: rate of the Dropout after each recurrent layer, in [0, 1).
        recurrent_dropout: dropout on the recurrent state inside each cell, in
            [0, 1). Any value > 0 disables the cuDNN kernel (much slower on GPU).
        irnn: identity recurrent initializer and ReLU (simple_rnn only).
        unit_forget_bias: LSTM forget-gate bias initialized to 1 (Jozefowicz
            et al., 2015); ignored by GRU and simple RNN.
        kernel_initializer: input-kernel initializer name from
            `dlsuite.models.common.INITIALIZERS`, or None for Glorot uniform.
        l1, l2: penalties on every input kernel and the classifier kernel.
        input_shape: (time,) for token ids or (time, features) for float
            features; reconciled with seq_len, vocab_size and input_dim.
        name: model name; defaults to the variant name, e.g. "bilstm".

    Returns:
        A `keras.Model` taking int token ids (batch, time) or floats
        (batch, time, features).

    Raises:
        ValueError: for any invalid argument, before a layer is built.
    """
    knobs, vocab_size, input_dim, seq_len, head, classes, name = _check_arguments(
        cell=cell, bidirectional=bidirectional, layers=layers, units=units, vocab_size=vocab_size,
        input_dim=input_dim, embedding_dim=embedding_dim, seq_len=seq_len, head=head, classes=classes,
        classifier_activation=classifier_activation, dropout=dropout, recurrent_dropout=recurrent_dropout,
        irnn=irnn, unit_forget_bias=unit_forget_bias, kernel_initializer=kernel_initializer, l1=l1, l2=l2,
        input_shape=input_shape, name=name,
    )
    cell_kwargs = _cell_kwargs(
        cell, units=units, recurrent_dropout=recurrent_dropout, unit_forget_bias=unit_forget_bias,
        irnn=irnn, knobs=knobs,
    )
    inputs, x = _input_layers(vocab_size=vocab_size, input_dim=input_dim, seq_len=seq_len, embedding_dim=embedding_dim)
    x = _stack_layers(
        x, cell, bidirectional=bidirectional, layers=layers, head=head, dropout=dropout, cell_kwargs=cell_kwargs
    )
    outputs = _predictions(x, classes, classifier_activation=classifier_activation, knobs=knobs)
    return keras.Model(inputs, outputs, name=name)


def _check_arguments(
    *, cell, bidirectional, layers, units, vocab_size, input_dim, embedding_dim, seq_len, head, classes,
    classifier_activation, dropout, recurrent_dropout, irnn, unit_forget_bias, kernel_initializer, l1, l2,
    input_shape, name,
):
    """Step 1: checks every argument; returns (knobs, vocab_size, input_dim, seq_len, head, classes, name)."""
    if cell not in CELLS:
        raise ArgumentError(f"Unknown cell {cell!r}; choose one of {', '.join(CELLS)}.")
    _check_bool("bidirectional", bidirectional)
    _check_bool("irnn", irnn)
    _check_bool("unit_forget_bias", unit_forget_bias)
    _check_positive_int("layers", layers)
    _check_positive_int("units", units)
    _check_positive_int("embedding_dim", embedding_dim)
    _check_rate("dropout", dropout)
    _check_rate("recurrent_dropout", recurrent_dropout)
    if irnn and cell != "simple_rnn":
        raise ArgumentError(
            f"irnn=True needs cell='simple_rnn', received cell={cell!r}; "
            "use cell='simple_rnn' or irnn=False."
        )
    # Knobs checks kernel_initializer, l1 and l2 exactly as for the CNNs.
    knobs = Knobs(activation="tanh", kernel_initializer=kernel_initializer, l1=l1, l2=l2)
    vocab_size, input_dim, seq_len = _resolve_inputs(
        vocab_size=vocab_size, input_dim=input_dim, seq_len=seq_len, input_shape=input_shape
    )
    head = _resolve_head(head, bidirectional=bidirectional)
    classes = _resolve_classes(classes, head=head, vocab_size=vocab_size, input_dim=input_dim)
    _check_classifier_activation(classifier_activation)
    name = _resolve_name(name, cell=cell, bidirectional=bidirectional, irnn=irnn)
    return knobs, vocab_size, input_dim, seq_len, head, classes, name


def _resolve_head(head, *, bidirectional):
    """Step 1a: the head, defaulted by direction and checked against it."""
    if head is None:
        head = "sequence" if bidirectional else "next_token"
    if head not in HEADS:
        raise ArgumentError(f"Unknown head {head!r}; choose one of {', '.join(HEADS)}.")
    if bidirectional and head == "next_token":
        raise ArgumentError(
            "head='next_token' cannot be used with bidirectional=True: the backward "
            "pass reads the very token it must predict. Use head='sequence', or the "
            "language-model app's ELMo-style separate forward and backward models."
        )
    return head


def _resolve_classes(classes, *, head, vocab_size, input_dim):
    """Step 1b: the number of output classes, defaulted by head and input kind."""
    if classes is None:
        if head == "sequence":
            classes = DEFAULT_SEQUENCE_CLASSES
        elif vocab_size is not None:
            classes = vocab_size
        else:
            raise ArgumentError(
                f"head='next_token' with float features (input_dim={input_dim!r}) "
                "needs classes=<number of output classes per step>."
            )
    _check_positive_int("classes", classes)
    return classes


def _check_classifier_activation(classifier_activation):
    """Step 1c: checks that Keras knows the classifier activation."""
    if classifier_activation is not None:
        try:
            keras.activations.get(classifier_activation)
        except (ValueError, TypeError):
            raise ArgumentError(
                f"Unknown classifier_activation {classifier_activation!r}; pass a "
                "Keras activation name such as 'softmax', or None for logits."
            ) from None


def _resolve_name(name, *, cell, bidirectional, irnn):
    """Step 1d: the model name, defaulted to the variant name."""
    if name is None:
        name = ("bi" if bidirectional else "") + ("irnn" if irnn else cell)
    if not isinstance(name, str) or not name:
        raise ArgumentError(f"name must be a non-empty string or None, received {name!r}.")
    return name


def _cell_kwargs(cell, *, units, recurrent_dropout, unit_forget_bias, irnn, knobs):
    """Step 2: the keyword arguments every recurrent layer of the stack gets."""
    # Left at the Keras defaults (tanh, sigmoid, unroll=False, use_bias=True,
    # reset_after=True) so TensorFlow picks the cuDNN kernel on GPU;
    # recurrent_dropout > 0 is the one allowed switch that turns it off.
    cell_kwargs = {
        "units": units,
        "recurrent_dropout": recurrent_dropout,
        "kernel_initializer": knobs.initializer(),
        "kernel_regularizer": knobs.regularizer(),
    }
    if cell == "lstm":
        cell_kwargs["unit_forget_bias"] = unit_forget_bias
    if irnn:
        cell_kwargs["activation"] = "relu"
        cell_kwargs["recurrent_initializer"] = keras.initializers.Identity(gain=1.0)
    return cell_kwargs


def _input_layers(*, vocab_size, input_dim, seq_len, embedding_dim):
    """Step 3: the input, and its embedding for token ids; returns (inputs, x)."""
    if vocab_size is not None:
        inputs = keras.layers.Input(shape=(seq_len,), dtype="int32", name="input")  # (batch, time)
        x = keras.layers.Embedding(vocab_size, embedding_dim, name="embedding")(inputs)
        # (batch, time, embedding_dim)
    else:
        # (batch, time, features)
        inputs = keras.layers.Input(shape=(seq_len, input_dim), name="input")
        x = inputs
    return inputs, x


def _stack_layers(x, cell, *, bidirectional, layers, head, dropout, cell_kwargs):
    """Step 4: the recurrent layers, each followed by its dropout, applied to `x`."""
    for index in range(1, layers + 1):
        # Every layer but a sequence head's last one passes on all time steps.
        return_sequences = head == "next_token" or index < layers
        recurrent = CELLS[cell](
            return_sequences=return_sequences, name=f"rnn_{index}", **cell_kwargs
        )
        if bidirectional:
            recurrent = keras.layers.Bidirectional(recurrent, name=f"rnn_{index}")
        x = recurrent(x)  # (batch, time, units * directions), or (batch, units * directions)
        if dropout:
            x = keras.layers.Dropout(dropout, name=f"dropout_{index}")(x)
    return x


def _predictions(x, classes, *, classifier_activation, knobs):
    """Step 5: the classifier head on top of the stack."""
    return keras.layers.Dense(
        classes,
        activation=classifier_activation,
        kernel_regularizer=knobs.regularizer(),
        name="predictions",
    )(x)  # (batch, time, classes) for next_token, (batch, classes) for sequence


# The registered variants: name -> (fixed builder arguments, description).
VARIANTS = {
    "lstm": ({"cell": "lstm"}, "LSTM stack (Hochreiter & Schmidhuber, 1997); next-token head."),
    "gru": ({"cell": "gru"}, "GRU stack (Cho et al., 2014); next-token head."),
    "simple_rnn": ({"cell": "simple_rnn"}, "Simple (Elman) RNN stack; next-token head."),
    "irnn": (
        {"cell": "simple_rnn", "irnn": True},
        "IRNN: ReLU simple RNN, identity recurrent init (Le et al., 2015).",
    ),
    "bilstm": (
        {"cell": "lstm", "bidirectional": True},
        "Bidirectional LSTM stack; sequence-classification head.",
    ),
    "bigru": (
        {"cell": "gru", "bidirectional": True},
        "Bidirectional GRU stack; sequence-classification head.",
    ),
    "bisimple_rnn": (
        {"cell": "simple_rnn", "bidirectional": True},
        "Bidirectional simple RNN stack; sequence-classification head.",
    ),
}



def _register_variants():
    for variant, (fixed, description) in VARIANTS.items():
        register(
            ModelSpec(
                name=variant,
                family="rnn",
                kind="rnn",
                builder=functools.partial(rnn_stack, **fixed),
                default_input_shape=(None,),
                min_input_size=1,
                description=description,
            )
        )


_register_variants()
