"""The captioning model: a vocabulary and a recurrent decoder conditioned on image features.

The seed's formulation (Show and Tell): a CNN turns the image into a feature
vector v (its conv/pool stack, then a fully connected layer); the recurrent
state is updated from the previous word, the previous state and v, which
enters every step (h_t = f(W_xh x_t + W_hh h_{t-1} + W_ih v)); the output
layer scores the next word (y_t = W_hy h_t); the next input is the word
chosen. Here f is an LSTM or GRU cell, v also sets the initial state, and v
comes from the flattened feature map, so where things are (above, left of)
survives into v; global pooling would average it away.

With `attention=True` the decoder is Show, Attend and Tell's (Xu et al., 2015)
soft attention: the feature map's h*w locations are annotation vectors a_i;
at each step e_i = w^T tanh(W_a a_i + W_h h_{t-1}), alpha = softmax(e), the
context z_t = beta * sum_i alpha_i a_i with the gate beta = sigmoid(W_b h_{t-1}),
and the cell reads [embedding(word), z_t]; the output layer scores from
[h_t, z_t]. A learned position embedding is added to each a_i: a conv feature
map says what is at a location but barely where, and the captions name
relations. The initial state comes from the mean annotation.

`CaptionDecoder` is one Keras layer with three entry points: `call` (teacher
forcing over a whole caption, for training and scoring), and `start` plus
`step` (one word at a time, for greedy and beam search, in Python or inside a
SavedModel graph). Its config holds the vocabulary, so a saved model carries
the words it speaks.
"""

import collections
import re

import keras
import numpy as np
from keras import layers, ops

from dlsuite.apps.core.choices import CAPTION_CELLS as CELLS
from dlsuite.apps.core.choices import CAPTION_POOLING as POOLING
from dlsuite.models.errors import ArgumentError
from dlsuite.models.fused_rnn import FusedGRU, FusedLSTM
PAD, UNKNOWN, START, END = "", "[UNK]", "<start>", "<end>"
PAD_ID, UNKNOWN_ID, START_ID, END_ID = 0, 1, 2, 3
# Never emitted by decoding: padding, unknown words and the start token.
BANNED_IDS = (PAD_ID, UNKNOWN_ID, START_ID)
# What keras.layers.TextVectorization's "lower_and_strip_punctuation" removes
# (keras/src/layers/preprocessing/text_vectorization.py), for reference captions
# and the SavedModel's in-graph tokenizer.
STRIP_PUNCTUATION = r'[!"#$%&()\*\+,-\./:;<=>?@\[\\\]^_`{|}~\']'


def words(caption):
    """A caption as the vocabulary sees it: lower case, punctuation stripped, split on white space."""
    return re.sub(STRIP_PUNCTUATION, "", caption.lower()).split()


class Vocabulary:
    """Caption words <-> ids through keras.layers.TextVectorization.

    Ids 0..3 are padding, [UNK], <start> and <end>; the words follow, most
    frequent first. <start> and <end> can never come out of a user's text
    (the standardization strips '<' and '>'), so they are safe as markers.
    """

    def __init__(self, tokens):
        tokens = [str(token) for token in tokens]
        if tokens[:4] != [PAD, UNKNOWN, START, END]:
            raise ValueError(f"a caption vocabulary starts with {[PAD, UNKNOWN, START, END]}, received {tokens[:4]}")
        self.tokens = tokens

    @classmethod
    def build(cls, captions, *, max_tokens=None):
        """Adapts a TextVectorization layer to `captions` (a list of strings)."""
        import tensorflow as tf

        vectorizer = layers.TextVectorization(
            max_tokens=max_tokens - 2 if max_tokens else None, standardize="lower_and_strip_punctuation")
        vectorizer.adapt(tf.data.Dataset.from_tensor_slices(list(captions)).batch(1024))
        adapted = [str(token) for token in vectorizer.get_vocabulary()[2:]]  # after "" and [UNK]
        return cls([PAD, UNKNOWN, START, END, *adapted])

    @property
    def size(self):
        return len(self.tokens)

    def vectorizer(self, max_length):
        """A TextVectorization layer with this vocabulary: strings -> (N, max_length) ids, 0-padded."""
        return layers.TextVectorization(vocabulary=self.tokens, standardize="lower_and_strip_punctuation",
                                        output_sequence_length=max_length)

    def encode(self, captions, *, max_length):
        """Teacher-forcing pairs for `captions`.

        Returns:
            (inputs, targets, truncated): int32 (N, max_length + 1) each,
            inputs = <start> w1 .. wn, targets = w1 .. wn <end>, 0-padded; and
            how many captions had more than `max_length` words (cut).
        """
        if not captions:
            shape = (0, max_length + 1)
            return np.zeros(shape, np.int32), np.zeros(shape, np.int32), 0
        # One extra position tells a cut caption from one of exactly max_length words.
        ids = np.asarray(self.vectorizer(max_length + 1)(np.array(list(captions), dtype=object)), dtype=np.int32)
        truncated = int((ids[:, -1] != PAD_ID).sum())
        ids = ids[:, :max_length]
        lengths = (ids != PAD_ID).sum(axis=1)
        count = len(ids)
        inputs = np.zeros((count, max_length + 1), np.int32)
        targets = np.zeros((count, max_length + 1), np.int32)
        inputs[:, 0] = START_ID
        inputs[:, 1:] = ids
        targets[:, :max_length] = ids
        targets[np.arange(count), lengths] = END_ID
        # Each word after the last stays padding (0), ignored by the loss.
        inputs[np.arange(max_length + 1)[None, :] > lengths[:, None]] = PAD_ID
        return inputs, targets, truncated

    def decode(self, ids):
        """(N, T) ids -> N strings, stopping at <end> or padding."""
        captions = []
        for row in np.asarray(ids):
            pieces = []
            for token_id in row:
                if token_id in (PAD_ID, END_ID):
                    break
                pieces.append(self.tokens[token_id])
            captions.append(" ".join(pieces))
        return captions


@keras.saving.register_keras_serializable(package="dlsuite")
class CaptionDecoder(layers.Layer):
    """Image features + caption prefix -> next-word logits (see the module docstring).

    Args:
        vocabulary: the token list of a `Vocabulary`.
        units: recurrent units.
        embedding: word (and, without attention, image) embedding width.
        cell: "lstm" or "gru".
        attention: soft attention over the feature map's locations.
        attention_units: width of the attention MLP (default `units`).
        pooling: without attention, how the feature map becomes v: "flatten"
            (keeps positions) or "avg"/"max".
        dropout: on v (or the annotations) and before the output layer.
        image_blind: an ablation: the features are zeroed, so the decoder is a
            language model of captions that never sees the image.
        feature_mean, feature_variance: per-channel statistics of the
            training features (`feature_statistics`); the decoder standardizes
            its input with them, so frozen random features, whose channels
            carry large offsets shared by every image, train as fast as any.

    Call arguments:
        features: (B, h, w, c) feature map (or (B, c) vectors).
        tokens: int (B, T) <start> w1 .. ; returns logits (B, T, V) float32.
    """

    def __init__(self, vocabulary, *, units=256, embedding=128, cell="lstm", attention=False, attention_units=None,
                 pooling="flatten", dropout=0.0, image_blind=False, feature_mean=None, feature_variance=None,
                 **kwargs):
        super().__init__(**kwargs)
        if cell not in CELLS:
            raise ArgumentError(f"decoder must be one of {', '.join(CELLS)}, received {cell!r}", argument="decoder")
        if pooling not in POOLING:
            raise ArgumentError(f"pooling must be one of {', '.join(POOLING)}, received {pooling!r}", argument="pooling")
        if not 0 <= dropout < 1:
            raise ArgumentError(f"dropout must be in [0, 1), received {dropout!r}", argument="dropout")
        self.vocabulary = [str(token) for token in vocabulary]
        self.units, self.embedding_dim, self.cell_type = int(units), int(embedding), cell
        self.attention, self.attention_units = bool(attention), int(attention_units or units)
        self.pooling, self.dropout_rate, self.image_blind = pooling, float(dropout), bool(image_blind)
        self.feature_mean = None if feature_mean is None else [float(v) for v in np.ravel(feature_mean)]
        self.feature_variance = None if feature_variance is None else [float(v) for v in np.ravel(feature_variance)]
        vocab_size = len(self.vocabulary)

        self.standardize = None
        if self.feature_mean is not None:
            self.standardize = layers.Normalization(axis=-1, mean=self.feature_mean, variance=self.feature_variance,
                                                    name="standardize")
        self.token_embedding = layers.Embedding(vocab_size, self.embedding_dim, name="token_embedding")
        if self.attention:
            self.annotation = layers.Dense(self.units, name="annotation")
            self.attention_keys = layers.Dense(self.attention_units, use_bias=False, name="attention_keys")
            self.attention_query = layers.Dense(self.attention_units, name="attention_query")
            self.attention_score = layers.Dense(1, name="attention_score")
            self.attention_gate = layers.Dense(self.units, activation="sigmoid", name="attention_gate")
        else:
            self.image_embedding = layers.Dense(self.embedding_dim, activation="relu", name="image_embedding")
        self.initial_h = layers.Dense(self.units, activation="tanh", name="initial_h")
        self.initial_c = layers.Dense(self.units, activation="tanh", name="initial_c") if cell == "lstm" else None
        # The sequence layer trains the plain decoder in one pass; its cell steps it word by word.
        # The fused layers are Keras's (same cell, weights and files) with the lm app's CPU loop,
        # which under mixed_bfloat16 keeps the recurrent state in float32 (Keras's keeps it in
        # bfloat16): validation loss over 4 seeds, `caption train --scenes-count 600 --epochs 8`,
        # float32 0.869, bfloat16 with Keras's layer 0.899, with these 0.887 (docs/scaling.md).
        recurrent = FusedLSTM if cell == "lstm" else FusedGRU
        self.recurrent = recurrent(self.units, return_sequences=True, return_state=True, name=cell)
        self.feature_dropout = layers.Dropout(self.dropout_rate, name="feature_dropout")
        self.output_dropout = layers.Dropout(self.dropout_rate, name="output_dropout")
        self.logits = layers.Dense(vocab_size, dtype="float32", name="logits")

    # -- building ------------------------------------------------------------------------

    def build(self, features_shape, tokens_shape=None):
        features_shape = tuple(features_shape)
        if len(features_shape) == 2:
            locations, channels = 1, features_shape[-1]
        else:
            locations, channels = int(np.prod(features_shape[1:-1])), features_shape[-1]
        self.locations, self.channels = locations, int(channels)
        if self.standardize is not None:
            self.standardize.build(features_shape)
        cell_input = self.embedding_dim + (self.units if self.attention else self.embedding_dim)
        self.token_embedding.build((None,))
        if self.attention:
            self.annotation.build((None, locations, channels))
            self.position = self.add_weight(shape=(locations, self.units), initializer="zeros", name="position")
            self.attention_keys.build((None, locations, self.units))
            self.attention_query.build((None, self.units))
            self.attention_score.build((None, locations, self.attention_units))
            self.attention_gate.build((None, self.units))
            summary, output_width = self.units, 2 * self.units
        else:
            flat = locations * channels if self.pooling == "flatten" else channels
            self.image_embedding.build((None, flat))
            summary, output_width = self.embedding_dim, self.units
        self.initial_h.build((None, summary))
        if self.initial_c is not None:
            self.initial_c.build((None, summary))
        self.recurrent.build((None, None, cell_input))
        self.logits.build((None, output_width))
        self.built = True

    def get_config(self):
        return {**super().get_config(), "vocabulary": self.vocabulary, "units": self.units,
                "embedding": self.embedding_dim, "cell": self.cell_type, "attention": self.attention,
                "attention_units": self.attention_units, "pooling": self.pooling, "dropout": self.dropout_rate,
                "image_blind": self.image_blind, "feature_mean": self.feature_mean,
                "feature_variance": self.feature_variance}

    def compute_output_spec(self, features, tokens, training=None):
        # Logits are float32 under any policy; `tf.scan` cannot run on symbolic inputs.
        return keras.KerasTensor((*tokens.shape, len(self.vocabulary)), dtype="float32")

    # -- one word at a time --------------------------------------------------------------

    def start(self, features, training=False):
        """Features -> (context, states): what every step reads, and the initial recurrent state."""
        features = ops.cast(features, self.compute_dtype)
        if self.standardize is not None:
            features = self.standardize(features)
        if self.image_blind:
            features = ops.zeros_like(features)
        batch = ops.shape(features)[0]
        if self.attention:
            annotations = ops.reshape(features, (batch, self.locations, self.channels))
            # `start` also runs outside __call__ (decoding), where Keras does not autocast variables.
            position = ops.cast(self.position, annotations.dtype)
            annotations = self.annotation(self.feature_dropout(annotations, training=training)) + position
            context = {"annotations": annotations, "keys": self.attention_keys(annotations)}
            summary = ops.mean(annotations, axis=1)  # (B, units)
        else:
            if self.pooling == "flatten":
                vector = ops.reshape(features, (batch, self.locations * self.channels))
            elif len(features.shape) == 2:
                vector = features
            else:
                reduce = ops.mean if self.pooling == "avg" else ops.max
                vector = reduce(features, axis=tuple(range(1, len(features.shape) - 1)))
            image = self.image_embedding(self.feature_dropout(vector, training=training))  # v: (B, embedding)
            context = {"image": image}
            summary = image
        states = [self.initial_h(summary)]
        if self.initial_c is not None:
            states.append(self.initial_c(summary))
        return context, states

    def _attend(self, context, hidden):
        """Soft attention: the gated context vector z_t (B, units) for the state h_{t-1}."""
        query = self.attention_query(hidden)[:, None, :]  # (B, 1, A)
        energies = self.attention_score(ops.tanh(context["keys"] + query))  # (B, L, 1)
        weights = ops.softmax(energies, axis=1)
        attended = ops.sum(weights * context["annotations"], axis=1)  # (B, units)
        return self.attention_gate(hidden) * attended

    def step(self, tokens, states, context, training=False):
        """One word: int (B,) previous tokens -> (logits float32 (B, V), next states)."""
        embedded = self.token_embedding(tokens)  # (B, embedding)
        if self.attention:
            attended = self._attend(context, states[0])
            cell_input = ops.concatenate([embedded, attended], axis=-1)
        else:
            cell_input = ops.concatenate([embedded, context["image"]], axis=-1)
        output, states = self.recurrent.cell(cell_input, list(states), training=training)
        states = list(states) if isinstance(states, (list, tuple)) else [states]
        if self.attention:
            output = ops.concatenate([output, attended], axis=-1)
        return self.logits(self.output_dropout(output, training=training)), states

    # -- a whole caption (teacher forcing) ------------------------------------------------

    def call(self, features, tokens, training=None):
        context, states = self.start(features, training=training)
        if self.attention:
            # Each step's attention needs the previous state: step through the
            # caption, as a loop in the graph (traced once, not T times).
            # (keras.ops.scan wants outputs shaped like the carry; tf.scan does not.)
            import tensorflow as tf

            def one_word(carry, token):
                step_logits, states = self.step(token, carry[0], context, training=training)
                return states, step_logits

            first = (states, tf.zeros([tf.shape(tokens)[0], len(self.vocabulary)], tf.float32))
            _, logits = tf.scan(one_word, tf.transpose(tokens), initializer=first)  # (T, B, V)
            return tf.transpose(logits, (1, 0, 2))
        embedded = self.token_embedding(tokens)  # (B, T, embedding)
        image = ops.repeat(context["image"][:, None, :], ops.shape(tokens)[1], axis=1)
        outputs = self.recurrent(ops.concatenate([embedded, image], axis=-1), initial_state=states,
                                 training=training)[0]  # (B, T, units)
        return self.logits(self.output_dropout(outputs, training=training))


def build_training_model(decoder, *, feature_shape, caption_length, encoder=None, name="captioner"):
    """The model `fit` trains: (features or pixels, <start> w1 ..) -> next-word logits.

    Args:
        decoder: a `CaptionDecoder`.
        feature_shape: the encoder's output shape without the batch, e.g. (4, 4, 512).
        caption_length: T, words + 1.
        encoder: None to train on cached features; else the backbone model
            (pixels -> feature map), trained end to end, whose input the model takes.
    """
    tokens = keras.Input((caption_length,), dtype="int32", name="tokens")
    if encoder is None:
        inputs = keras.Input(tuple(feature_shape), name="features")
        features = inputs
    else:
        inputs = keras.Input(tuple(encoder.input.shape[1:]), name="pixels")
        features = encoder(inputs)
    return keras.Model([inputs, tokens], decoder(features, tokens), name=name)


def build_captioner(encoder, decoder, *, caption_length, name="captioner"):
    """Pixels (0..255) and <start> w1 .. -> logits: the whole model, saved as model.keras."""
    return build_training_model(decoder, feature_shape=None, caption_length=caption_length, encoder=encoder, name=name)


def feature_statistics(features, max_images=2000):
    """Per-channel mean and variance of (N, ..., c) features, over images and locations (a sample of N)."""
    sample = np.asarray(features[:max_images], dtype=np.float64)
    channels = sample.reshape(-1, sample.shape[-1])
    return channels.mean(axis=0).astype("float32"), np.maximum(channels.var(axis=0), 1e-6).astype("float32")


def caption_loss():
    """Mean cross-entropy per real word (padding, id 0, ignored)."""
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=PAD_ID)


def word_counts(captions):
    """Counter of words over a list of captions (for the summary line)."""
    return collections.Counter(word for caption in captions for word in words(caption))
