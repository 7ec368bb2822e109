"""A bidirectional language model the way ELMo builds it (Peters et al., 2018,
"Deep contextualized word representations").

Not a `Bidirectional` wrapper, which would let each position see the token it
must predict: two language models share the token embedding and the task. The
forward stack reads left to right and predicts the next token; the backward
stack reads right to left and predicts the previous one. Their top outputs,
concatenated, are the contextual embeddings `dlsuite lm embed` writes.
"""

import keras
from keras import layers

from dlsuite.models.errors import ArgumentError
from dlsuite.models.layers import ReverseSequence
from dlsuite.models.registry import ModelSpec, register
from dlsuite.models.rnn import CELLS

DIRECTIONS = ("forward", "backward")


def BiLanguageModel(
    *, vocab_size=10000, cell="lstm", layers_per_direction=2, units=512, embedding_dim=64,
    dropout=0.0, seq_len=None, input_shape=None, classes=None, name="bilm",
):
    """Builds the two-direction language model.

    Args:
        vocab_size: tokens in the vocabulary; the input is token ids.
        cell: "lstm", "gru" or "simple_rnn".
        layers_per_direction: recurrent layers in each direction.
        units: units per recurrent layer.
        embedding_dim: width of the shared token embedding.
        dropout: rate after each recurrent layer, in [0, 1).
        seq_len: fixed length, or None for any.
        input_shape: (T,), accepted so the registry's callers can pass it.
        classes: must equal vocab_size when given (it is the output width).

    Returns:
        A model from token ids (batch, time) to two logit tensors
        `[forward_predictions, backward_predictions]`, each (batch, time,
        vocab_size): position t of the first predicts token t+1, of the
        second token t-1.
    """
    if cell not in CELLS:
        raise ArgumentError(f"Unknown cell {cell!r}; choose one of {', '.join(CELLS)}.")
    for label, value in (("vocab_size", vocab_size), ("layers_per_direction", layers_per_direction),
                         ("units", units), ("embedding_dim", embedding_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ArgumentError(f"{label} must be a positive integer, received {value!r}.")
    if not 0 <= dropout < 1:
        raise ArgumentError(f"dropout must be in [0, 1), received {dropout!r}.")
    if classes is not None and classes != vocab_size:
        raise ArgumentError(f"a language model predicts its vocabulary: classes must equal vocab_size {vocab_size}, received {classes}.")
    if input_shape is not None:
        if len(tuple(input_shape)) != 1:
            raise ArgumentError(f"input_shape must be (T,) token ids, received {input_shape!r}.")
        seq_len = input_shape[0]

    tokens = keras.Input((seq_len,), dtype="int32", name="input")
    embedded = layers.Embedding(vocab_size, embedding_dim, name="embedding")(tokens)  # (batch, time, embedding)
    outputs = []
    for direction in DIRECTIONS:
        x = ReverseSequence(name="reverse_input")(embedded) if direction == "backward" else embedded
        for index in range(1, layers_per_direction + 1):
            x = CELLS[cell](units, return_sequences=True, name=f"{direction}_rnn_{index}")(x)  # (batch, time, units)
            if dropout:
                x = layers.Dropout(dropout, name=f"{direction}_dropout_{index}")(x)
        if direction == "backward":
            x = ReverseSequence(name="reverse_output")(x)  # back to left-to-right positions
        outputs.append(layers.Dense(vocab_size, name=f"{direction}_predictions")(x))  # (batch, time, vocab)
    return keras.Model(tokens, outputs, name=name)


def embedding_model(model):
    """Token ids -> the concatenated top forward and backward states,
    (batch, time, 2 * units): ELMo's contextual representation."""
    top = max(int(layer.name.rsplit("_", 1)[1]) for layer in model.layers if layer.name.startswith("forward_rnn_"))
    forward = model.get_layer(f"forward_rnn_{top}").output
    backward = model.get_layer("reverse_output").output
    return keras.Model(model.inputs, layers.Concatenate(name="contextual_embeddings")([forward, backward]))


register(ModelSpec(
    name="bilm",
    family="bilm",
    kind="rnn",
    builder=BiLanguageModel,
    default_input_shape=(None,),
    min_input_size=1,
    description="ELMo-style biLM: forward and backward LSTM LMs sharing the embedding",
))
