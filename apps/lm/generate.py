"""Text generation from a trained next-token language model, one step per token.

A next-token model (`rnn_stack` with the "next_token" head, e.g.
`dlsuite.models.build("lstm", vocab_size=V, classifier_activation=None)`)
maps ids (batch, time) to logits (batch, time, V). Generating N tokens by
re-running it over the whole prefix costs O(N^2) cell steps; `Stepper` runs
the very same layers one token at a time, carrying each recurrent layer's
state, so N tokens cost N steps:

>>> stepper = Stepper(model)
>>> state = stepper.initial_state()
>>> logits, state = stepper.step(tf.constant([7]), state)  # (1, V)

`generate` feeds a prompt through the stepper and samples from
softmax(logits / temperature), yielding each token's text as it comes.
`prefix_generate` is the naive O(N^2) loop: both draw their randomness
identically (`_sample`), so for the same seed they produce the same text.

No command samples here: `dlsuite lm generate` runs the sampling loop inside
the exported SavedModel (`apps/lm/export.py`). These Python samplers stay as
the benchmarks' baselines (#27): `benchmarks/lm_speed.py` times `generate`
against `prefix_generate` (generate_stateful_vs_prefix) and the export against
`generate` (generate_export_vs_stateful, and both against PyTorch);
`benchmarks/serving_latency.py` times the export against `generate`. The
tests check the export and both samplers against each other.

The vocabulary is duck-typed (`dlsuite.apps.lm.text.Vocabulary`): `level`
("char" or "word"), `tokens` (index 0 the padding "", 1 "[UNK]"),
`encode(text) -> int32 ids` with unknown tokens as 1, `decode(ids) -> str`.
"""

import sys

import numpy as np
import tensorflow as tf

from dlsuite.apps.core.errors import UsageError

PADDING_ID = 0
UNKNOWN_ID = 1
# Ids below this are never sampled: padding and [UNK] are not text.
FIRST_TEXT_ID = 2
# Generation with an empty prompt starts after this token when the vocabulary
# has it: a char model has seen text start after a line break far more often
# than after nothing at all.
START_TOKEN = "\n"


class Stepper:
    """Runs a trained next-token model one token at a time, carrying its state.

    The model must be a unidirectional `rnn_stack` with the "next_token" head:
    layers `input`, `embedding`, `rnn_1` ... `rnn_N` (LSTM, GRU or SimpleRNN),
    optional `dropout_i` and `predictions`. Each step calls the layers' own
    cells, `layer.cell(x, states)`, so the stepper reads the SAME weight
    objects as the model (no copy: training it further changes what the
    stepper computes). Dropout is off, as at inference.

    Logits are float32. A model whose `predictions` layer has a softmax gives
    log-probabilities instead, which are logits of the same distribution.

    Attributes:
        model: the wrapped Keras model.
        vocab_size: V, the number of output classes.
    """

    def __init__(self, model):
        import keras  # here, not at the top: lm_export's readers need TensorFlow alone

        self.model = model
        self._embedding, self._recurrent, self._predictions = _check_language_model(model)
        self.vocab_size = int(self._predictions.units)
        self._softmax_head = self._predictions.activation is keras.activations.softmax
        # One trace serves every batch size: the signature leaves it open.
        state_signature = [
            [tf.TensorSpec((None, size), layer.cell.compute_dtype) for size in _state_sizes(layer)]
            for layer in self._recurrent
        ]
        self._compiled_step = tf.function(
            self.raw_step,
            input_signature=[tf.TensorSpec((None,), tf.int32), state_signature],
            reduce_retracing=True,
        )

    def initial_state(self, batch_size=1):
        """Returns the all-zero state: one list of (batch, units) tensors per layer.

        LSTM layers carry [h, c], GRU and SimpleRNN layers [h], as Keras' own
        layers start every sequence.
        """
        return [
            [
                tf.zeros((batch_size, size), dtype=layer.cell.compute_dtype)
                for size in _state_sizes(layer)
            ]
            for layer in self._recurrent
        ]

    def step(self, token_ids, state):
        """Advances the model by one token.

        Args:
            token_ids: int (batch,) ids of the current tokens.
            state: the state from `initial_state` or the previous `step`.

        Returns:
            (logits, new_state): float32 (batch, V) scores for the NEXT token,
            and the state after reading `token_ids`.
        """
        return self._compiled_step(tf.cast(token_ids, tf.int32), state)

    def raw_step(self, token_ids, state):
        """`step` uncompiled, for tracing inside another graph (the SavedModel export)."""
        x = self._embedding(token_ids)  # (batch, embedding_dim)
        new_state = []
        for layer, layer_state in zip(self._recurrent, state):
            x, cell_state = layer.cell(x, list(layer_state), training=False)  # (batch, units)
            new_state.append(list(cell_state))
        return self._logits(x), new_state  # (batch, V)

    def forward(self, token_ids, state):
        """Runs whole sequences through the layers, starting from `state`.

        The same computation as the model, but resumable: scoring a long text
        in chunks carries the state from one chunk to the next. Each layer
        runs its own sequence kernel (cuDNN on GPU for LSTM and GRU).

        Args:
            token_ids: int (batch, time) ids, time >= 1.
            state: as for `step`.

        Returns:
            (logits, new_state): float32 (batch, time, V) and the state after
            the last token.
        """
        x = self._embedding(tf.cast(token_ids, tf.int32))  # (batch, time, embedding_dim)
        new_state = []
        for layer, layer_state in zip(self._recurrent, state):
            # The stack's layers do not return their final state; asking for it
            # for this one call keeps the layer (and its fused kernel) as is.
            returned_state, layer.return_state = layer.return_state, True
            try:
                x, *cell_state = layer(x, initial_state=list(layer_state), training=False)
            finally:
                layer.return_state = returned_state
            new_state.append(cell_state)  # x: (batch, time, units)
        return self._logits(x), new_state  # (batch, time, V)

    def _logits(self, x):
        """(..., units) -> float32 (..., V) logits of the next token."""
        return self.outputs_to_logits(self._predictions(x))

    def outputs_to_logits(self, outputs):
        """The model's outputs (..., V) as float32 logits."""
        outputs = tf.cast(outputs, tf.float32)
        if self._softmax_head:
            # log p differs from the logits by a constant per row: same softmax.
            return tf.math.log(tf.maximum(outputs, np.finfo(np.float32).tiny))
        return outputs


def _state_sizes(layer):
    """The cell's state widths, e.g. [units, units] for an LSTM."""
    size = layer.cell.state_size
    return [int(s) for s in size] if isinstance(size, (list, tuple)) else [int(size)]


def _check_language_model(model):
    """Returns (embedding, [rnn_1..rnn_N], predictions) or raises UsageError."""
    import keras

    recurrent_types = (keras.layers.LSTM, keras.layers.GRU, keras.layers.SimpleRNN)
    layers = {layer.name: layer for layer in getattr(model, "layers", [])}
    recurrent = []
    while f"rnn_{len(recurrent) + 1}" in layers:
        recurrent.append(layers[f"rnn_{len(recurrent) + 1}"])
    known = {"input", "embedding", "predictions"}
    known |= {f"rnn_{i}" for i in range(1, len(recurrent) + 1)}
    known |= {f"dropout_{i}" for i in range(1, len(recurrent) + 1)}
    unknown = sorted(set(layers) - known)
    embedding, predictions = layers.get("embedding"), layers.get("predictions")
    problem = None
    if not isinstance(embedding, keras.layers.Embedding):
        problem = "it has no Embedding layer named 'embedding' (token-id input)"
    elif not recurrent:
        problem = "it has no recurrent layer named 'rnn_1'"
    elif unknown:
        # A layer the stepper would skip would make it compute something else.
        problem = f"it has layers a step-by-step run does not know: {unknown}"
    elif not isinstance(predictions, keras.layers.Dense):
        problem = "it has no Dense layer named 'predictions'"
    else:
        for layer in recurrent:
            if not isinstance(layer, recurrent_types):
                problem = (
                    f"{layer.name} is a {type(layer).__name__}, not a unidirectional "
                    "LSTM, GRU or SimpleRNN (a bidirectional layer reads the future)"
                )
                break
            if layer.go_backwards or not layer.return_sequences:
                problem = f"{layer.name} does not return its steps in order"
                break
    outputs = getattr(model, "outputs", None) or []
    if problem is None and (len(outputs) != 1 or len(outputs[0].shape) != 3):
        shapes = [tuple(output.shape) for output in outputs]
        problem = f"its outputs {shapes} are not one (batch, time, V) tensor"
    if problem:
        raise UsageError(
            f"Cannot generate text with {model.name!r}: {problem}. Use a next-token "
            "rnn_stack, e.g. dlsuite.models.build('lstm', vocab_size=V)."
        )
    return embedding, recurrent, predictions


def start_token_id(vocabulary):
    """The id an empty prompt starts from: "\\n" if known, else id 2.

    Vocabularies list tokens most frequent first (as TextVectorization does),
    so id 2 is the most common token when there is no line break.
    """
    tokens = list(vocabulary.tokens)
    return tokens.index(START_TOKEN) if START_TOKEN in tokens[FIRST_TEXT_ID:] else FIRST_TEXT_ID


def check_sampling(*, length, temperature, top_k=None):
    """Raises UsageError for a length, temperature or top_k out of range."""
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length <= 0:
        raise UsageError(f"length must be a positive number of tokens, received {length!r}.")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float, np.number))
        or not np.isfinite(temperature)
        or temperature <= 0
    ):
        raise UsageError(
            f"temperature must be a number > 0 (1 samples the model's own "
            f"distribution, lower is more conservative), received {temperature!r}."
        )
    if top_k is not None and (
        isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1
    ):
        raise UsageError(f"top_k must be a positive integer or None, received {top_k!r}.")


def encode_prompt(vocabulary, prompt):
    """Returns the prompt's ids (n,), warning on stderr about unknown tokens.

    An empty prompt gives [start_token_id(vocabulary)].
    """
    if not isinstance(prompt, str):
        raise UsageError(f"prompt must be a string, received {prompt!r}.")
    ids = np.asarray(vocabulary.encode(prompt), dtype=np.int32).reshape(-1)  # (n,)
    unknown = int(np.sum(ids == UNKNOWN_ID))
    if unknown:
        noun = "character" if vocabulary.level == "char" else "word"
        verb = "is" if unknown == 1 else "are"
        they = "it reads" if unknown == 1 else "they read"
        print(
            f"warning: {unknown} prompt {noun}{'' if unknown == 1 else 's'} {verb} not "
            f"in the vocabulary; {they} as [UNK]",
            file=sys.stderr,
        )
    if ids.size == 0:
        ids = np.array([start_token_id(vocabulary)], dtype=np.int32)
    return ids


def check_vocabulary(model_vocab_size, vocabulary):
    """Raises UsageError unless the vocabulary has the model's V tokens, some of them text."""
    size = len(vocabulary.tokens)
    if size != model_vocab_size:
        raise UsageError(
            f"The model predicts {model_vocab_size} tokens but the vocabulary has {size}; "
            "use the vocabulary the model was trained with."
        )
    if size <= FIRST_TEXT_ID:
        raise UsageError("The vocabulary has no tokens besides padding and [UNK].")


def _sample(logits, *, temperature, top_k, rng):
    """Draws one id from softmax(logits / temperature), top_k-restricted.

    Gumbel-max: argmax(scores + Gumbel noise) is an exact sample of
    softmax(scores). Each call draws exactly V noise values whatever the
    logits, so two loops that see nearly equal logits (stateful and prefix)
    consume the generator identically and pick the same tokens.

    Args:
        logits: float (V,) scores of the next token.
        temperature: > 0.
        top_k: keep only the k highest-scoring tokens, or None for all.
        rng: a `numpy.random.Generator`.
    """
    scores = np.asarray(logits, dtype=np.float64) / temperature  # (V,)
    scores[:FIRST_TEXT_ID] = -np.inf  # never padding or [UNK]
    allowed = scores.size - FIRST_TEXT_ID
    if top_k is not None and top_k < allowed:
        kth = np.partition(scores, -top_k)[-top_k]
        scores[scores < kth] = -np.inf
    noise = rng.gumbel(size=scores.shape)  # (V,)
    return int(np.argmax(scores + noise))


def _token_text(vocabulary, token_id):
    """What one generated token adds to the text: "c" for char, " word" for word."""
    text = vocabulary.decode(np.array([token_id], dtype=np.int32))
    return text if vocabulary.level == "char" else " " + text


def generate(model, vocabulary, *, prompt="", length=500, temperature=0.8, top_k=None, seed=None):
    """Generates text after `prompt`, one model step per token (O(length)).

    The Python baseline the benchmarks time the export's in-graph loop
    against (`benchmarks/lm_speed.py`, `benchmarks/serving_latency.py`);
    `dlsuite lm generate` does not call it.

    The prompt's tokens are fed through the model's cells one by one; an
    empty prompt starts from "\\n" when the vocabulary has it, else from the
    most common token (id 2), neither of which is yielded. Then `length`
    tokens are sampled from softmax(logits / temperature), restricted to the
    `top_k` most likely ones if given, never padding (0) or [UNK] (1), each
    sampled token fed back in.

    Prompt characters (or words) outside the vocabulary read as [UNK]; a
    warning with their count goes to stderr.

    Args:
        model: a next-token `rnn_stack` model, see `Stepper`.
        vocabulary: the model's vocabulary (`dlsuite.apps.lm.text.Vocabulary`).
        prompt: the text to continue.
        length: number of tokens to generate, > 0.
        temperature: > 0; below 1 sharpens the distribution, above 1 flattens it.
        top_k: sample among the k most likely tokens only; 1 is greedy.
        seed: seeds numpy's generator; the same seed gives the same text.

    Returns:
        An iterator of each new token's text: the character at char level,
        " " + the word at word level, so "".join(...) appends to the prompt.

    Raises:
        UsageError: length or temperature <= 0, a bad top_k, a model that is
            not a next-token RNN stack, or a vocabulary that does not fit it.
    """
    check_sampling(length=length, temperature=temperature, top_k=top_k)
    stepper = Stepper(model)
    check_vocabulary(stepper.vocab_size, vocabulary)
    ids = encode_prompt(vocabulary, prompt)  # (n,)
    return _generate_stateful(
        stepper, vocabulary, ids, length=length, temperature=temperature, top_k=top_k, seed=seed
    )


def _generate_stateful(stepper, vocabulary, ids, *, length, temperature, top_k, seed):
    rng = np.random.default_rng(seed)
    state = stepper.initial_state(batch_size=1)
    for token_id in ids:  # the prompt: only the state matters
        logits, state = stepper.step(tf.constant([token_id], dtype=tf.int32), state)
    for _ in range(length):
        token_id = _sample(logits.numpy()[0], temperature=temperature, top_k=top_k, rng=rng)
        yield _token_text(vocabulary, token_id)
        logits, state = stepper.step(tf.constant([token_id], dtype=tf.int32), state)  # (1, V)


def prefix_generate(
    model, vocabulary, *, prompt="", length=500, temperature=0.8, top_k=None, seed=None
):
    """The naive baseline of `generate`: re-runs the whole prefix for every token.

    Token t costs t cell steps, O(length^2) in all. Same arguments, same
    checks and the same random draws as `generate`, so for the same seed the
    two yield the same text. Kept as the baseline `benchmarks/lm_speed.py`
    times `generate` against (generate_stateful_vs_prefix), and for the
    equality tests (tests/test_generate.py).
    """
    check_sampling(length=length, temperature=temperature, top_k=top_k)
    stepper = Stepper(model)  # for its checks and its logits conversion
    check_vocabulary(stepper.vocab_size, vocabulary)
    ids = encode_prompt(vocabulary, prompt)
    return _generate_prefix(
        stepper, vocabulary, ids, length=length, temperature=temperature, top_k=top_k, seed=seed
    )


def _generate_prefix(stepper, vocabulary, ids, *, length, temperature, top_k, seed):
    rng = np.random.default_rng(seed)

    # Compiled once for any length, so the baseline pays for the O(N^2)
    # steps and not for retracing.
    @tf.function(input_signature=[tf.TensorSpec((1, None), tf.int32)])
    def last_logits(prefix):
        outputs = stepper.model(prefix, training=False)  # (1, time, V)
        return stepper.outputs_to_logits(outputs[:, -1])  # (1, V)

    prefix = list(int(i) for i in ids)
    for _ in range(length):
        logits = last_logits(tf.constant([prefix], dtype=tf.int32))
        token_id = _sample(logits.numpy()[0], temperature=temperature, top_k=top_k, rng=rng)
        yield _token_text(vocabulary, token_id)
        prefix.append(token_id)
