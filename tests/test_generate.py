"""Stateful generation: the stepper equals the full model, sampling is seeded and
shared with the prefix baseline, a trained model continues its text, bad input is named."""

import keras
import numpy as np
import pytest

from dlsuite import models
from dlsuite.apps.lm import generate as generation
from dlsuite.apps.core.errors import UsageError
from dlsuite.apps.lm.text import Vocabulary

CHAR_TOKENS = ["", "[UNK]", "a", "b", "c", "\n", " ", "é"]


def _char_vocabulary(tokens=CHAR_TOKENS):
    return Vocabulary(level="char", tokens=list(tokens))


def _random_model(name="lstm", vocab_size=len(CHAR_TOKENS), **overrides):
    """Random weights, sharpened so that the next-token distribution is far from uniform."""
    arguments = {"vocab_size": vocab_size, "units": 16, "layers": 2, "embedding_dim": 8,
                 "classifier_activation": None, **overrides}
    model = models.build(name, **arguments)
    predictions = model.get_layer("predictions")
    kernel, bias = predictions.get_weights()
    predictions.set_weights([kernel * 4.0, bias])
    return model


def _train_abc(cell="lstm"):
    """A 2x16 char model trained on "abcabc...": its only good guess is the cycle."""
    vocabulary = _char_vocabulary(["", "[UNK]", "a", "b", "c"])
    ids = vocabulary.encode("abc" * 100)
    seq_len = 12
    count = (len(ids) - 1) // seq_len
    x = ids[: count * seq_len].reshape(count, seq_len)  # (windows, time)
    y = ids[1 : count * seq_len + 1].reshape(count, seq_len)  # x shifted by one
    model = models.build(cell, vocab_size=vocabulary.size, units=16, layers=2, embedding_dim=8,
                         classifier_activation=None)
    model.compile(keras.optimizers.Adam(0.03), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=8, epochs=20, verbose=0)
    return model, vocabulary


@pytest.fixture(scope="module")
def abc_model():
    keras.utils.set_random_seed(0)
    return _train_abc()


@pytest.mark.parametrize(
    "name, overrides",
    [("lstm", {"dropout": 0.5}), ("gru", {}), ("irnn", {}), ("simple_rnn", {"layers": 3})],
)
def test_stepper_logits_equal_the_full_model_at_every_step(name, overrides):
    model = _random_model(name, **overrides)
    stepper = generation.Stepper(model)
    ids = np.random.default_rng(0).integers(0, len(CHAR_TOKENS), size=(3, 25)).astype("int32")
    expected = model(ids, training=False).numpy()  # (batch, time, V)

    state = stepper.initial_state(batch_size=3)
    stepped = []
    for t in range(ids.shape[1]):
        logits, state = stepper.step(ids[:, t], state)  # (batch, V)
        stepped.append(logits.numpy())
    np.testing.assert_allclose(np.stack(stepped, axis=1), expected, atol=1e-4, rtol=1e-5)

    # Whole chunks, the state carried between them (the export's scoring path).
    first, state = stepper.forward(ids[:, :10], stepper.initial_state(batch_size=3))
    second, _ = stepper.forward(ids[:, 10:], state)
    np.testing.assert_allclose(np.concatenate([first, second], axis=1), expected, atol=1e-4, rtol=1e-5)
    assert not any(model.get_layer(f"rnn_{i}").return_state for i in (1, 2))


def test_stepper_reads_the_models_own_weights():
    model = _random_model("gru")
    stepper = generation.Stepper(model)
    before, _ = stepper.step(np.array([2], dtype="int32"), stepper.initial_state())
    bias = model.get_layer("predictions").bias
    bias.assign(bias.numpy() + np.arange(len(CHAR_TOKENS), dtype="float32"))
    after, _ = stepper.step(np.array([2], dtype="int32"), stepper.initial_state())
    np.testing.assert_allclose(after - before, [np.arange(len(CHAR_TOKENS))], atol=1e-5)


def test_a_softmax_head_steps_as_log_probabilities():
    model = _random_model("lstm", classifier_activation="softmax")
    stepper = generation.Stepper(model)
    ids = np.array([[2, 3, 4, 5]], dtype="int32")
    probabilities = model(ids).numpy()[0, -1]
    state = stepper.initial_state()
    for token in ids[0]:
        logits, state = stepper.step(np.array([token], dtype="int32"), state)
    np.testing.assert_allclose(keras.ops.softmax(logits[0]).numpy(), probabilities, atol=1e-6)


def _extra_layer_model():
    inputs = keras.Input((None,), dtype="int32", name="input")
    x = keras.layers.Embedding(8, 4, name="embedding")(inputs)
    x = keras.layers.LSTM(8, return_sequences=True, name="rnn_1")(x)
    x = keras.layers.LayerNormalization(name="norm")(x)
    return keras.Model(inputs, keras.layers.Dense(8, name="predictions")(x))


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: models.build("bilstm", vocab_size=8, units=4, layers=1), "unidirectional"),
        (lambda: models.build("lstm", vocab_size=8, units=4, layers=1, head="sequence"),
         "does not return its steps"),
        (_extra_layer_model, r"does not know: \['norm'\]"),
        (lambda: models.build("lstm", input_dim=3, classes=8, units=4, layers=1), "no Embedding"),
    ],
    ids=["bidirectional", "sequence-head", "extra-layer", "float-input"],
)
def test_models_that_cannot_be_stepped_are_usage_errors(build, message):
    with pytest.raises(UsageError, match=message):
        generation.Stepper(build())


def test_generation_is_reproducible_per_seed_and_seeds_differ():
    model, vocabulary = _random_model(), _char_vocabulary()
    first = list(generation.generate(model, vocabulary, prompt="ab", length=40, temperature=1.0, seed=1))
    again = list(generation.generate(model, vocabulary, prompt="ab", length=40, temperature=1.0, seed=1))
    other = list(generation.generate(model, vocabulary, prompt="ab", length=40, temperature=1.0, seed=2))
    assert first == again and first != other
    assert len(first) == 40 and set(first) <= set(CHAR_TOKENS[2:])  # never "" or "[UNK]"


def test_prefix_baseline_draws_the_same_tokens():
    model, vocabulary = _random_model("gru"), _char_vocabulary()
    for options in ({"temperature": 1.0, "seed": 5}, {"temperature": 0.7, "top_k": 3, "seed": 6}):
        stateful = list(generation.generate(model, vocabulary, prompt="c é", length=30, **options))
        prefix = list(generation.prefix_generate(model, vocabulary, prompt="c é", length=30, **options))
        assert stateful == prefix


def test_top_k_one_is_greedy():
    model, vocabulary = _random_model(), _char_vocabulary()
    stepper = generation.Stepper(model)
    state, expected = stepper.initial_state(), []
    for token in vocabulary.encode("ba"):
        logits, state = stepper.step(np.array([token], dtype="int32"), state)
    for _ in range(15):
        token = int(np.argmax(logits[0, 2:])) + 2  # the best text token
        expected.append(vocabulary.tokens[token])
        logits, state = stepper.step(np.array([token], dtype="int32"), state)
    for seed in (0, 1):
        greedy = generation.generate(model, vocabulary, prompt="ba", length=15, top_k=1, seed=seed)
        assert list(greedy) == expected


def test_padding_and_unknown_are_never_sampled():
    model, vocabulary = _random_model(), _char_vocabulary()
    bias = model.get_layer("predictions").bias
    bias.assign(np.array([50.0, 50.0] + [0.0] * (len(CHAR_TOKENS) - 2), dtype="float32"))
    pieces = list(generation.generate(model, vocabulary, length=50, temperature=5.0, seed=0))
    assert len(pieces) == 50 and set(pieces) <= set(CHAR_TOKENS[2:])


def test_a_model_trained_on_abc_continues_the_cycle(abc_model):
    model, vocabulary = abc_model
    assert "".join(generation.generate(model, vocabulary, prompt="a", length=30, top_k=1)) == "bc" + "abc" * 9 + "a"
    assert "".join(generation.generate(model, vocabulary, prompt="ab", length=12, temperature=0.3, seed=4)) == (
        "cabcabcabcab"
    )


def test_an_empty_prompt_starts_after_a_line_break_or_the_most_common_token():
    model, vocabulary = _random_model(), _char_vocabulary()
    options = {"length": 20, "temperature": 1.0, "seed": 3}
    assert list(generation.generate(model, vocabulary, prompt="", **options)) == list(
        generation.generate(model, vocabulary, prompt="\n", **options)
    )
    no_newline = _char_vocabulary(["", "[UNK]", "b", "a", "c", "x", " ", "é"])
    assert generation.start_token_id(no_newline) == 2
    assert list(generation.generate(model, no_newline, prompt="", **options)) == list(
        generation.generate(model, no_newline, prompt="b", **options)
    )


def test_word_level_pieces_carry_their_space():
    vocabulary = Vocabulary(level="word", tokens=["", "[UNK]", "the", "cat", "sat"])
    model = _random_model("gru", vocab_size=vocabulary.size)
    pieces = list(generation.generate(model, vocabulary, prompt="The cat", length=5, seed=0))
    assert len(pieces) == 5 and all(p in (" the", " cat", " sat") for p in pieces)


def test_unknown_prompt_characters_warn_and_read_as_unknown(capsys):
    model, vocabulary = _random_model(), _char_vocabulary()
    options = {"length": 10, "temperature": 1.0, "seed": 0}
    with_unknown = list(generation.generate(model, vocabulary, prompt="aXYZb", **options))
    warning = capsys.readouterr().err
    assert "warning: 3 prompt characters are not in the vocabulary; they read as [UNK]" in warning
    # Every unknown character is the same id 1, [UNK].
    assert with_unknown == list(generation.generate(model, vocabulary, prompt="aQRSb", **options))
    generation.generate(model, vocabulary, prompt="aQ", **options)
    assert "1 prompt character is not in the vocabulary; it reads as [UNK]" in capsys.readouterr().err


@pytest.mark.parametrize(
    "options, message",
    [
        ({"temperature": 0}, "temperature must be a number > 0.*received 0"),
        ({"temperature": -0.5}, r"received -0\.5"),
        ({"temperature": float("nan")}, "received nan"),
        ({"length": 0}, "length must be a positive number of tokens, received 0"),
        ({"length": -3}, "received -3"),
        ({"length": 2.5}, "received 2.5"),
        ({"top_k": 0}, "top_k must be a positive integer or None, received 0"),
        ({"prompt": None}, "prompt must be a string"),
    ],
)
@pytest.mark.parametrize("function", [generation.generate, generation.prefix_generate])
def test_bad_sampling_options_are_usage_errors_at_call_time(function, options, message):
    model, vocabulary = _random_model(), _char_vocabulary()
    with pytest.raises(UsageError, match=message):
        function(model, vocabulary, **options)  # raised before iterating


def test_a_vocabulary_of_another_size_is_a_usage_error():
    model = _random_model(vocab_size=9)
    with pytest.raises(UsageError, match="predicts 9 tokens but the vocabulary has 8"):
        generation.generate(model, _char_vocabulary())
