"""Export a language model as a SavedModel that answers with text, and read it back.

`export_language_model` wraps a next-token `rnn_stack` model and its
vocabulary so that TensorFlow Serving, or any TensorFlow program, gets text
from text: the tokenization, the step-by-step sampling loop and the
detokenization all run inside the graph. The signatures:

===============  ==========================================  ==============================
signature        inputs                                      outputs
===============  ==========================================  ==============================
serving_default  prompt: string (), length: int32 (),        text: string (),
 = generate      temperature: float32 (), seed: int64 ()     token_ids: int32 (length,)
generate_top_k   the same + top_k: int32 () (0: all tokens)  the same
score            text: string ()                             loss_sum: float32 (),
                                                             tokens: int32 ()
next_token       token_ids: int32 (batch, time)              logits: float32 (batch, time, V)
===============  ==========================================  ==============================

One prompt per request (a scalar): generation is a sequential loop, and a
batch of prompts of different lengths would step in lockstep for no gain at
these sizes. The prompt's tokens are fed through the cells one by one
(`tf.while_loop`), then `length` tokens are sampled from
softmax(logits / temperature), each fed back in. `text` is the continuation
only, its tokens joined by "" (char level) or " " (word level); padding (0)
and [UNK] (1) are never sampled. The same `seed` (>= 0) gives the same text:
sampling uses stateless random ops seeded by (seed, step); a negative seed
draws a fresh one per request. An empty prompt starts from "\\n" if the
vocabulary has it, else from its most common token, as
`dlsuite.apps.lm.generate.generate` does. Prompt tokens outside the vocabulary
read as [UNK], as `Vocabulary.encode` reads them.

`score` returns the summed next-token cross-entropy (nats) of a text's tokens,
each predicted from the ones before it, and how many tokens were predicted
(all but the first), so loss, perplexity and bits per character follow from
the export alone. Long texts run in chunks of `SCORE_CHUNK` tokens, the
recurrent state carried from one chunk to the next: the same figure as one
pass over the whole text, in bounded memory.

An ELMo-style biLM (`dlsuite.models.build("bilm", ...)`) exports instead
`serving_default` = `embed` (text: string () -> tokens: string (n,),
embeddings: float32 (n, 2 * units)), `score` (its forward half) and
`next_token` (-> forward_logits, backward_logits).

The export lands in `base_dir/NAME/<version>/` (the layout TF Serving polls)
through a temporary folder renamed into place, as every app's export is
(`versions.write_version_atomically`).
`assets/vocabulary.json` holds the vocabulary and `assets/dlsuite.json` the
format, kind, level, vocabulary size and the app's metadata (seq_len, cell,
validation figures ...), read by `ExportedLanguageModel.load` without
running the graph. Loading needs TensorFlow alone.

>>> path = export_language_model(model, vocabulary, name="shakespeare")
>>> served = ExportedLanguageModel.load("saved_models/shakespeare")
>>> served.generate("ROMEO:", length=200, temperature=0.8, seed=1)
"""

import collections
import json
import pathlib

import numpy as np
import tensorflow as tf

from dlsuite.apps.lm import generate as generation
from dlsuite.apps.core import exported, saved_models
from dlsuite.apps.core.errors import UsageError
from dlsuite.apps.core.versions import check_export_name, write_version_atomically
from dlsuite.apps.lm.text import Vocabulary, tf_word_tokens

METADATA_FILE = exported.METADATA_FILE
VOCABULARY_FILE = "vocabulary.json"
FORMAT = "dlsuite.language_model"
FORMAT_VERSION = 1
# What each kind of export answers; `load` checks that they are all there.
SIGNATURES = {
    "next_token": ("serving_default", "generate", "generate_top_k", "score", "next_token"),
    "bilm": ("serving_default", "embed", "score", "next_token"),
}
EXPORT = exported.ExportFormat(
    name=FORMAT, version=FORMAT_VERSION, signatures=SIGNATURES, kind_key="kind", assets=(VOCABULARY_FILE,),
    not_ours=(f"a language model exported by dlsuite (no valid assets/{METADATA_FILE} and "
              f"assets/{VOCABULARY_FILE}); export it with export_language_model."),
)
# Keys of dlsuite.json that the export writes itself; app metadata may not use them.
RESERVED_KEYS = (
    "format", "format_version", "kind", "model_name", "level", "vocabulary_size",
    "start_token_id", "signatures",
)

# Tokens per chunk when scoring: logits (chunk, V) stay small even for a
# word vocabulary, and each chunk still runs the layers' fused kernels.
SCORE_CHUNK = 512
_SEPARATORS = {"char": "", "word": " "}


def export_language_model(
    model, vocabulary, *, name, base_dir="saved_models", version=None, metadata=None
):
    """Exports a language model and its vocabulary as a text-in, text-out SavedModel.

    Args:
        model: a trained next-token `rnn_stack` (see `generate.Stepper`),
            logits or softmax over the vocabulary at every step; or an
            ELMo-style biLM (`dlsuite.models.build("bilm", ...)`), exported
            to embed and score rather than generate.
        vocabulary: its `dlsuite.apps.lm.text.Vocabulary`.
        name: the model's folder under `base_dir`, see `versions.check_export_name`.
        base_dir: the folder holding every exported model; created if missing.
        version: the version number; defaults to the next free one.
        metadata: a JSON-serializable dict the app stores in dlsuite.json,
            e.g. {"cell": "lstm", "seq_len": 100, "validation_perplexity": 3.2}.

    Returns:
        The `pathlib.Path` of the new version folder.

    Raises:
        UsageError: a bad name, version or metadata, a model that is neither
            kind, a vocabulary that does not fit it, an existing version, or
            a `base_dir` that cannot be written.
    """
    check_export_name(name)
    kind = "bilm" if _is_bilm(model) else "next_token"
    if kind == "bilm":
        vocab_size = _check_bilm(model)
    else:
        stepper = generation.Stepper(model)
        vocab_size = stepper.vocab_size
    tokens = _check_vocabulary(vocabulary, vocab_size)
    metadata = _check_metadata(metadata)
    description = {
        **metadata,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "model_name": model.name,
        "level": vocabulary.level,
        "vocabulary_size": len(tokens),
        "start_token_id": generation.start_token_id(vocabulary),
        "signatures": list(SIGNATURES[kind]),
    }
    vocabulary_json = json.dumps(vocabulary.to_json(), ensure_ascii=False)

    def write(folder):
        if kind == "bilm":
            _write_bilm_saved_model(model, tokens, level=vocabulary.level, path=folder)
        else:
            _write_saved_model(
                stepper, tokens, level=vocabulary.level,
                start_id=description["start_token_id"], path=folder,
            )
        _write_assets(folder, description=description, vocabulary_json=vocabulary_json)

    return write_version_atomically(pathlib.Path(base_dir) / name, version, write)


def _is_bilm(model):
    names = {layer.name for layer in getattr(model, "layers", [])}
    return {"forward_rnn_1", "backward_rnn_1"} <= names


def _check_bilm(model):
    """Returns V of a `dlsuite.models.bilm` model, or raises UsageError."""
    outputs = getattr(model, "outputs", None) or []
    names = {layer.name for layer in model.layers}
    shapes = [tuple(output.shape) for output in outputs]
    if (
        len(outputs) != 2
        or any(len(shape) != 3 or shape[-1] is None for shape in shapes)
        or shapes[0][-1] != shapes[1][-1]
        or not {"embedding", "reverse_output"} <= names
    ):
        raise UsageError(
            f"Cannot export {model.name!r} as a biLM: expected dlsuite.models.build('bilm', ...), "
            f"token ids in, forward and backward logits (batch, time, V) out; it returns {shapes}."
        )
    return int(shapes[0][-1])


def _check_vocabulary(vocabulary, vocab_size):
    """Returns the token list after checking it fits the model and the tables."""
    level = getattr(vocabulary, "level", None)
    if level not in _SEPARATORS:
        raise UsageError(f"Vocabulary level must be 'char' or 'word', received {level!r}.")
    tokens = [str(token) for token in vocabulary.tokens]
    generation.check_vocabulary(vocab_size, vocabulary)
    # The in-graph lookup table maps each token to one id.
    counts = collections.Counter(tokens)
    duplicates = sorted(token for token, count in counts.items() if count > 1)
    if duplicates:
        raise UsageError(f"The vocabulary lists these tokens more than once: {duplicates[:10]}.")
    return tokens


def _check_metadata(metadata):
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise UsageError(f"metadata must be a dict, received {type(metadata).__name__}.")
    taken = sorted(set(metadata) & set(RESERVED_KEYS))
    if taken:
        raise UsageError(f"metadata may not set {taken}: the export writes those itself.")
    try:
        return json.loads(json.dumps(metadata))
    except (TypeError, ValueError) as error:
        raise UsageError(f"metadata must be JSON-serializable: {error}.") from None


def _write_assets(path, *, description, vocabulary_json):
    assets = pathlib.Path(path) / "assets"
    assets.mkdir(exist_ok=True)
    (assets / VOCABULARY_FILE).write_text(vocabulary_json + "\n", encoding="utf-8")
    (assets / METADATA_FILE).write_text(
        json.dumps(description, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def _lookup_table(tokens):
    """A token -> id table; anything else reads as [UNK] (1), as vocabulary.encode does."""
    return tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(tokens[generation.FIRST_TEXT_ID:]),
            tf.range(generation.FIRST_TEXT_ID, len(tokens), dtype=tf.int32),
        ),
        default_value=generation.UNKNOWN_ID,
    )


def _split(text, level):
    """string () -> string (n,): the text's tokens as `Vocabulary.encode` splits them."""
    if level == "char":
        return tf.strings.unicode_split(text, "UTF-8")  # (n,) code points
    # The vocabulary's own rules in tf.strings ops; one row for one text.
    return tf_word_tokens(tf.reshape(text, [1])).values  # (n,)


def _cross_entropy_sum(targets, logits):
    """int (n,) targets, float (n, V) logits -> the summed loss in nats."""
    return tf.reduce_sum(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)
    )


def _scalar(dtype, name):
    return tf.TensorSpec((), dtype, name=name)


def _write_saved_model(stepper, tokens, *, level, start_id, path):
    """Traces the generation, scoring and raw-model signatures and saves them."""
    import keras  # Only exporting needs Keras; loading needs TensorFlow alone.

    table = _lookup_table(tokens)
    sample = _sample_fn(stepper, tokens, table, level=level, start_id=start_id)

    def generate(prompt, length, temperature, seed):
        return sample(prompt, length, temperature, seed, tf.constant(0))

    score = _score_fn(stepper, table, level=level)

    def next_token(token_ids):
        outputs = stepper.model(token_ids, training=False)  # (batch, time, V)
        return {"logits": stepper.outputs_to_logits(outputs)}

    generate_inputs = [
        _scalar(tf.string, "prompt"), _scalar(tf.int32, "length"),
        _scalar(tf.float32, "temperature"), _scalar(tf.int64, "seed"),
    ]
    # No `archive.track(model)`: see vision/export.py (keras-team/keras#23553,
    # every weight would be stored twice). The table is not a variable, so it
    # is tracked by hand.
    archive = keras.export.ExportArchive()
    archive.track(table)
    # The first endpoint is also served as serving_default.
    archive.add_endpoint("generate", generate, input_signature=generate_inputs)
    archive.add_endpoint(
        "generate_top_k", sample, input_signature=generate_inputs + [_scalar(tf.int32, "top_k")]
    )
    archive.add_endpoint("score", score, input_signature=[_scalar(tf.string, "text")])
    archive.add_endpoint(
        "next_token", next_token,
        input_signature=[tf.TensorSpec((None, None), tf.int32, name="token_ids")],
    )
    archive.write_out(str(path), verbose=False)


def _step(stepper, token_id, state):
    """One generation step: int32 () token -> logits (1, V) and the next state."""
    return stepper.raw_step(tf.reshape(token_id, [1]), state)


def _sample_fn(stepper, tokens, table, *, level, start_id):
    """Step 1: `sample(prompt, length, temperature, seed, top_k)`, the in-graph generation."""
    vocab_size = len(tokens)
    token_strings = tf.constant(tokens)  # id -> token, for detokenizing
    # Padding and [UNK] get -inf so that they are never sampled.
    text_mask = tf.constant(
        [-np.inf] * generation.FIRST_TEXT_ID + [0.0] * (vocab_size - generation.FIRST_TEXT_ID),
        dtype=tf.float32,
    )  # (V,)

    def sample(prompt, length, temperature, seed, top_k):
        tf.debugging.assert_positive(length, message="length must be > 0 tokens")
        tf.debugging.assert_positive(temperature, message="temperature must be > 0")
        ids = table.lookup(_split(prompt, level))  # (n,)
        ids = tf.cond(
            tf.size(ids) > 0, lambda: ids, lambda: tf.constant([start_id], tf.int32)
        )
        seed = tf.where(
            seed < 0, tf.random.uniform([], 0, tf.int64.max, dtype=tf.int64), seed
        )
        logits, state = _feed_prompt(stepper, ids, vocab_size)
        # k = V keeps every token: the k-th best score is then -inf.
        k = tf.where(top_k > 0, tf.minimum(top_k, vocab_size), vocab_size)
        token_ids = _draw_tokens(
            stepper, logits, state, length=length, temperature=temperature, seed=seed, k=k, text_mask=text_mask
        )  # (length,)
        text = tf.strings.reduce_join(
            tf.gather(token_strings, token_ids), separator=_SEPARATORS[level]
        )
        return {"text": text, "token_ids": token_ids}

    return sample


def _feed_prompt(stepper, ids, vocab_size):
    """Step 1a: runs the prompt through the cells; returns the last logits and state."""
    # Token by token: only the final logits and state matter.
    def feed(i, logits, state):
        logits, state = _step(stepper, ids[i], state)
        return i + 1, logits, state

    _, logits, state = tf.while_loop(
        lambda i, logits, state: i < tf.size(ids),
        feed,
        (tf.constant(0), tf.zeros((1, vocab_size)), stepper.initial_state(1)),
    )
    return logits, state


def _draw_tokens(stepper, logits, state, *, length, temperature, seed, k, text_mask):
    """Step 1b: samples `length` tokens, each fed back in; returns their ids (length,)."""
    def draw(j, logits, state, sampled):
        scores = logits[0] / temperature + text_mask  # (V,)
        kth_best = tf.math.top_k(scores, k=k, sorted=True).values[-1]
        scores = tf.where(scores < kth_best, -np.inf, scores)
        token_id = tf.random.stateless_categorical(
            scores[tf.newaxis], 1, seed=tf.stack([seed, tf.cast(j, tf.int64)]),
            dtype=tf.int32,
        )[0, 0]
        logits, state = _step(stepper, token_id, state)
        return j + 1, logits, state, sampled.write(j, token_id)

    _, _, _, sampled = tf.while_loop(
        lambda j, logits, state, sampled: j < length,
        draw,
        (tf.constant(0), logits, state, tf.TensorArray(tf.int32, size=length)),
    )
    return sampled.stack()


def _score_fn(stepper, table, *, level):
    """Step 2: `score(text)`, the summed next-token cross-entropy, chunk by chunk."""
    def score(text):
        ids = table.lookup(_split(text, level))  # (n,)
        inputs, targets = ids[:-1], ids[1:]  # (n - 1,) each; empty if n < 2
        count = tf.size(targets)

        def chunk(c, loss_sum, state):
            start = c * SCORE_CHUNK
            logits, state = stepper.forward(
                inputs[tf.newaxis, start : start + SCORE_CHUNK], state
            )  # (1, chunk, V)
            loss = _cross_entropy_sum(targets[start : start + SCORE_CHUNK], logits[0])
            return c + 1, loss_sum + loss, state

        _, loss_sum, _ = tf.while_loop(
            lambda c, loss_sum, state: c * SCORE_CHUNK < count,
            chunk,
            (tf.constant(0), tf.constant(0.0), stepper.initial_state(1)),
        )
        return {"loss_sum": loss_sum, "tokens": count}

    return score


def _write_bilm_saved_model(model, tokens, *, level, path):
    """Traces the biLM's embed, score and raw-model signatures and saves them."""
    import keras

    from dlsuite.models.bilm import embedding_model

    table = _lookup_table(tokens)
    embedder = embedding_model(model)  # the same layers, (batch, time, 2 * units)
    width = int(embedder.outputs[0].shape[-1])

    def embed(text):
        pieces = _split(text, level)  # (n,)
        ids = table.lookup(pieces)
        # A recurrent layer cannot run over zero steps.
        embeddings = tf.cond(
            tf.size(ids) > 0,
            lambda: tf.cast(embedder(ids[tf.newaxis], training=False)[0], tf.float32),
            lambda: tf.zeros((0, width)),
        )  # (n, 2 * units)
        return {"tokens": pieces, "embeddings": embeddings}

    def score(text):
        # Forward direction only: position t of its output has seen tokens
        # 0..t, so one pass over the text predicts every next token.
        ids = table.lookup(_split(text, level))  # (n,)
        count = tf.maximum(tf.size(ids) - 1, 0)
        loss_sum = tf.cond(
            count > 0,
            lambda: _cross_entropy_sum(
                ids[1:], tf.cast(model(ids[tf.newaxis, :-1], training=False)[0][0], tf.float32)
            ),
            lambda: tf.constant(0.0),
        )
        return {"loss_sum": loss_sum, "tokens": count}

    def next_token(token_ids):
        forward, backward = model(token_ids, training=False)  # (batch, time, V) each
        return {
            "forward_logits": tf.cast(forward, tf.float32),
            "backward_logits": tf.cast(backward, tf.float32),
        }

    archive = keras.export.ExportArchive()
    archive.track(table)
    archive.add_endpoint("embed", embed, input_signature=[_scalar(tf.string, "text")])
    archive.add_endpoint("score", score, input_signature=[_scalar(tf.string, "text")])
    archive.add_endpoint(
        "next_token", next_token,
        input_signature=[tf.TensorSpec((None, None), tf.int32, name="token_ids")],
    )
    archive.write_out(str(path), verbose=False)


class ExportedLanguageModel:
    """A language model exported by `export_language_model`, loaded with TensorFlow alone.

    Attributes:
        path: the version folder it was loaded from.
        vocabulary: the `dlsuite.apps.lm.text.Vocabulary` it was trained with.
        level: "char" or "word".
        kind: "next_token" (generates and scores) or "bilm" (embeds and scores).
        metadata: the whole of assets/dlsuite.json, the app's keys included.
    """

    def __init__(self, path, saved_model, metadata, vocabulary):
        self.path = path
        # The loaded object owns the variables; the signatures need it alive.
        self._saved_model = saved_model
        self._signatures = saved_model.signatures
        self.metadata = metadata
        self.level = metadata["level"]
        self.kind = metadata.get("kind", "next_token")
        self.vocabulary = vocabulary

    @classmethod
    def load(cls, path, *, trust_model=False):
        """Loads a version folder, or the NAME folder's highest version.

        Args:
            trust_model: run it even if it reads or writes files or prints
                (see `core.saved_models`).

        Raises:
            UsageError: nothing there, a SavedModel `export_language_model`
                did not write, or one that is damaged or untrusted.
        """
        found = exported.read(path, EXPORT)
        vocabulary = Vocabulary.from_json(found.assets[VOCABULARY_FILE])
        saved_model = saved_models.load(found.path, trust_model=trust_model, signatures=found.signatures)
        return cls(found.path, saved_model, found.metadata, vocabulary)

    @property
    def can_embed(self):
        """Whether `embed` works: biLM exports only."""
        return self.kind == "bilm"

    def generate(self, prompt="", length=500, temperature=0.8, seed=None, top_k=None):
        """Returns `length` generated tokens after `prompt`, as the signature joins them.

        Args:
            prompt: the text to continue; unknown characters/words read as [UNK].
            length: tokens to generate, > 0.
            temperature: > 0.
            seed: the same seed (>= 0) gives the same text; None draws a fresh one.
            top_k: sample among the k most likely tokens only; None for all.

        Returns:
            The continuation, without the prompt: tokens joined by "" (char)
            or " " (word).

        Raises:
            UsageError: a bad argument, or a biLM export (it cannot generate).
        """
        outputs = self._sample(prompt, length, temperature, seed, top_k)
        return outputs["text"].numpy().decode("utf-8")

    def stream(self, prompt="", *, length=500, temperature=0.8, top_k=None, seed=None):
        """Like `generate`, one piece per token: "c" at char level, " word" at word level.

        `prompt + "".join(pieces)` is the whole text. The graph samples all
        tokens in one call, so the pieces arrive together; for token-by-token
        latency, `dlsuite.apps.lm.generate.generate` steps a Keras model.
        """
        token_ids = self._sample(prompt, length, temperature, seed, top_k)["token_ids"].numpy()
        tokens = self.vocabulary.tokens
        prefix = "" if self.level == "char" else " "
        return (prefix + tokens[token_id] for token_id in token_ids)

    def _sample(self, prompt, length, temperature, seed, top_k):
        if self.kind != "next_token":
            raise UsageError(
                f"{self.path} is a biLM export: it embeds and scores text but cannot generate; "
                "generate with a one-direction model (--cell lstm, gru or rnn)."
            )
        generation.check_sampling(length=length, temperature=temperature, top_k=top_k)
        if not isinstance(prompt, str):
            raise UsageError(f"prompt must be a string, received {prompt!r}.")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise UsageError(f"seed must be an integer or None, received {seed!r}.")
        inputs = {
            "prompt": tf.constant(prompt),
            "length": tf.constant(int(length), tf.int32),
            "temperature": tf.constant(float(temperature), tf.float32),
            "seed": tf.constant(-1 if seed is None else int(seed), tf.int64),
        }
        if top_k is None:
            return self._signatures["generate"](**inputs)
        top_k = tf.constant(int(top_k), tf.int32)
        return self._signatures["generate_top_k"](**inputs, top_k=top_k)

    def score(self, text):
        """Returns (loss_sum, tokens): summed next-token cross-entropy in nats.

        `tokens` is how many tokens were predicted, all but the first; the
        mean loss is loss_sum / tokens, the perplexity exp of it. A biLM
        scores with its forward half.
        """
        outputs = self._signatures["score"](text=tf.constant(text))
        return float(outputs["loss_sum"]), int(outputs["tokens"])

    def embed(self, text):
        """Returns (tokens, embeddings) of a biLM export: the text's n tokens
        as written (list of str) and float32 (n, 2 * units) contextual embeddings.

        Raises:
            UsageError: a one-direction export, which has no backward half.
        """
        if not self.can_embed:
            raise UsageError(
                f"{self.path} is a one-direction language model; embeddings come "
                "from a biLM export."
            )
        outputs = self._signatures["embed"](text=tf.constant(text))
        tokens = [token.decode("utf-8") for token in outputs["tokens"].numpy().tolist()]
        return tokens, outputs["embeddings"].numpy()

    def next_token_logits(self, token_ids):
        """The raw model: int (batch, time) ids -> float32 (batch, time, V) logits
        (the forward direction's, for a biLM)."""
        token_ids = tf.constant(np.asarray(token_ids, dtype=np.int32))
        outputs = self._signatures["next_token"](token_ids=token_ids)
        return outputs["logits" if self.kind == "next_token" else "forward_logits"].numpy()
