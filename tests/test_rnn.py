"""Tests for the RNN stacks in dlsuite.models.rnn, driven by the registry."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from dlsuite.models import build, get, names  # noqa: E402
from dlsuite.models.rnn import VARIANTS, rnn_stack  # noqa: E402

# Keras 3.15 on TF 2.21 converts variables with a NumPy 2 deprecated call; not ours.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

RNN_NAMES = names(family="rnn")  # the rnn_stack variants; the biLM has its own tests
BIDIRECTIONAL = [name for name in RNN_NAMES if VARIANTS[name][0].get("bidirectional")]
UNIDIRECTIONAL = [name for name in RNN_NAMES if name not in BIDIRECTIONAL]

# Tiny on purpose: the whole file runs in seconds on a laptop CPU.
TINY = {"units": 4, "layers": 2, "embedding_dim": 3}
BATCH, TIME, VOCAB, FEATURES, CLASSES = 2, 5, 11, 3, 4


def tokens(batch=BATCH, time=TIME, vocab=VOCAB, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, time)).astype("int32")


def features(batch=BATCH, time=TIME, width=FEATURES, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, time, width)).astype("float32")


def test_registry_lists_every_variant():
    assert RNN_NAMES == sorted(
        ["lstm", "gru", "simple_rnn", "irnn", "bilstm", "bigru", "bisimple_rnn"]
    )
    for name in RNN_NAMES:
        spec = get(name)
        assert (spec.family, spec.kind, spec.default_input_shape) == ("rnn", "rnn", (None,))
        assert spec.description


@pytest.mark.parametrize("name", RNN_NAMES)
def test_default_build_is_a_token_model(name):
    model = build(name)
    assert model.name == name
    assert model.input.dtype == "int32"
    assert model.get_layer("embedding").input_dim == 10000
    if name in BIDIRECTIONAL:
        assert model.output_shape == (None, 2)
    else:
        assert model.output_shape == (None, None, 10000)


@pytest.mark.parametrize("name", RNN_NAMES)
def test_cli_style_build_with_input_shape_and_classes(name):
    token_model = build(name, input_shape=(TIME,), classes=CLASSES, **TINY)
    feature_model = build(name, input_shape=(TIME, FEATURES), classes=CLASSES, **TINY)
    assert token_model.input_shape == (None, TIME)
    assert feature_model.input_shape == (None, TIME, FEATURES)
    expected = (BATCH, CLASSES) if name in BIDIRECTIONAL else (BATCH, TIME, CLASSES)
    assert token_model(tokens()).shape == expected
    assert feature_model(features()).shape == expected


# Bidirectional next-token is rejected (test_bidirectional_next_token_is_rejected).
HEAD_CASES = [(name, "sequence") for name in RNN_NAMES] + [
    (name, "next_token") for name in UNIDIRECTIONAL
]


@pytest.mark.parametrize("name, head", HEAD_CASES)
def test_output_shape_per_head(name, head):
    model = build(name, vocab_size=VOCAB, head=head, **TINY)
    out = keras.ops.convert_to_numpy(model(tokens()))
    assert out.shape == ((BATCH, TIME, VOCAB) if head == "next_token" else (BATCH, 2))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out.sum(axis=-1), 1.0, rtol=1e-5)  # softmax


def test_any_sequence_length_when_seq_len_is_none():
    model = build("lstm", vocab_size=VOCAB, **TINY)
    assert model(tokens(time=3)).shape == (BATCH, 3, VOCAB)
    assert model(tokens(time=9)).shape == (BATCH, 9, VOCAB)


# Hand counts. Per layer, for input width i and u units:
#   LSTM       4 * (u * (i + u) + u)       (4 gates, one bias each)
#   GRU        3 * (u * (i + u) + 2 * u)   (reset_after=True: input and recurrent bias)
#   SimpleRNN  u * (i + u) + u
# Embedding V * e; Dense (i + 1) * classes; bidirectional doubles each layer and
# its output width (concat).
PARAM_COUNTS = [
    # Tokens V=11, e=3, u=4, 2 layers, next-token over 11 classes:
    # emb 33 + L1 4*(4*7+4)=128 + L2 4*(4*8+4)=144 + dense 5*11=55.
    ({"cell": "lstm", "vocab_size": 11, "embedding_dim": 3, "units": 4, "layers": 2}, 360),
    # emb 33 + L1 3*(4*7+8)=108 + L2 3*(4*8+8)=120 + dense 55.
    ({"cell": "gru", "vocab_size": 11, "embedding_dim": 3, "units": 4, "layers": 2}, 316),
    # emb 33 + L1 4*7+4=32 + L2 4*8+4=36 + dense 55.
    ({"cell": "simple_rnn", "vocab_size": 11, "embedding_dim": 3, "units": 4, "layers": 2}, 156),
    ({"cell": "simple_rnn", "irnn": True, "vocab_size": 11, "embedding_dim": 3, "units": 4,
      "layers": 2}, 156),
    # Features F=3, one layer, u=5, sequence head 2 classes:
    # L1 4*(5*8+5)=180 + dense 6*2=12.
    ({"cell": "lstm", "input_dim": 3, "units": 5, "layers": 1, "head": "sequence"}, 192),
    # Bidirectional LSTM, F=3, u=2, 2 layers, 3 classes:
    # L1 2*4*(2*5+2)=96 + L2 input 4: 2*4*(2*6+2)=112 + dense (4+1)*3=15.
    ({"cell": "lstm", "bidirectional": True, "input_dim": 3, "units": 2, "layers": 2,
      "classes": 3}, 223),
    # Bidirectional GRU, F=3, u=2, 1 layer, 2 classes: 2*3*(2*5+4)=84 + dense 5*2=10.
    ({"cell": "gru", "bidirectional": True, "input_dim": 3, "units": 2, "layers": 1}, 94),
]


@pytest.mark.parametrize("kwargs, expected", PARAM_COUNTS)
def test_exact_parameter_count(kwargs, expected):
    assert rnn_stack(**kwargs).count_params() == expected


@pytest.mark.parametrize("name", RNN_NAMES)
def test_every_weight_gets_a_finite_gradient(name):
    model = build(name, vocab_size=VOCAB, classes=CLASSES, **TINY)
    x = tokens()
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x, training=True)))
    grads = tape.gradient(loss, model.trainable_variables)
    assert len(grads) == len(model.trainable_variables) > 0
    for variable, grad in zip(model.trainable_variables, grads):
        assert grad is not None, variable.path
        assert np.all(np.isfinite(tf.convert_to_tensor(grad).numpy())), variable.path
    assert np.isfinite(float(loss))


@pytest.mark.parametrize("name", RNN_NAMES)
def test_keras_round_trip_gives_equal_outputs(name, tmp_path):
    model = build(name, vocab_size=VOCAB, dropout=0.25, l2=1e-4, **TINY)
    x = tokens()
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in model.layers]
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(x)), keras.ops.convert_to_numpy(model(x)), atol=1e-6
    )


def test_layer_names_are_stable():
    model = build("lstm", vocab_size=VOCAB, dropout=0.1, units=4, layers=3)
    assert [layer.name for layer in model.layers] == [
        "input", "embedding", "rnn_1", "dropout_1", "rnn_2", "dropout_2", "rnn_3", "dropout_3",
        "predictions",
    ]
    bi = build("bigru", input_dim=FEATURES, units=4, layers=1)
    assert [layer.name for layer in bi.layers] == ["input", "rnn_1", "predictions"]
    assert bi.get_layer("rnn_1").forward_layer.name == "forward_rnn_1"


def recurrent_layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.layers.Bidirectional):
            yield layer.forward_layer
            yield layer.backward_layer
        elif isinstance(layer, keras.layers.RNN):
            yield layer


@pytest.mark.parametrize("name", ["lstm", "bilstm"])
def test_lstm_forget_gate_bias_starts_at_one(name):
    units = 4
    model = build(name, input_dim=FEATURES, classes=CLASSES, units=units, layers=2)
    layers = list(recurrent_layers(model))
    assert len(layers) == (4 if name == "bilstm" else 2)
    for layer in layers:
        bias = layer.cell.bias.numpy()  # gates i, f, c, o
        np.testing.assert_array_equal(bias[units : 2 * units], 1.0)
        np.testing.assert_array_equal(bias[:units], 0.0)
        np.testing.assert_array_equal(bias[2 * units :], 0.0)
    plain = build(
        name, input_dim=FEATURES, classes=CLASSES, units=units, layers=1, unit_forget_bias=False
    )
    for layer in recurrent_layers(plain):
        np.testing.assert_array_equal(layer.cell.bias.numpy(), 0.0)


def test_irnn_is_relu_with_identity_recurrent_kernel():
    model = build("irnn", input_dim=FEATURES, classes=CLASSES, units=5, layers=2)
    layers = list(recurrent_layers(model))
    assert len(layers) == 2
    for layer in layers:
        assert isinstance(layer, keras.layers.SimpleRNN)
        assert layer.cell.activation is keras.activations.relu
        np.testing.assert_array_equal(
            layer.cell.recurrent_kernel.numpy(), np.eye(5)
        )
        np.testing.assert_array_equal(layer.cell.bias.numpy(), 0.0)


@pytest.mark.parametrize("name", ["lstm", "gru", "bilstm", "bigru"])
def test_defaults_keep_cudnn_usable(name):
    for layer in recurrent_layers(build(name, **TINY)):
        config = layer.get_config()
        assert config["activation"] == "tanh"
        assert config["recurrent_activation"] == "sigmoid"
        assert config["recurrent_dropout"] == 0
        assert config["unroll"] is False
        assert config["use_bias"] is True
        if isinstance(layer, keras.layers.GRU):
            assert config["reset_after"] is True


def test_logits_without_classifier_activation():
    model = build("gru", vocab_size=VOCAB, classifier_activation=None, **TINY)
    assert model.get_layer("predictions").activation is keras.activations.linear


@pytest.mark.parametrize("name", BIDIRECTIONAL)
def test_bidirectional_next_token_is_rejected(name):
    with pytest.raises(ValueError, match="head='next_token'.*bidirectional"):
        build(name, head="next_token")


BAD_ARGUMENTS = [
    ({"cell": "transformer"}, "'transformer'.*lstm, gru, simple_rnn"),
    ({"layers": 0}, "layers.*received 0"),
    ({"layers": 2.5}, "layers.*received 2.5"),
    ({"units": 0}, "units.*received 0"),
    ({"units": -3}, "units.*received -3"),
    ({"embedding_dim": 0}, "embedding_dim.*received 0"),
    ({"dropout": 1.0}, r"dropout.*\[0, 1\).*received 1.0"),
    ({"dropout": -0.1}, "dropout.*received -0.1"),
    ({"recurrent_dropout": 1.5}, "recurrent_dropout.*received 1.5"),
    ({"irnn": True, "cell": "lstm"}, "irnn=True.*cell='lstm'"),
    ({"irnn": True, "cell": "gru"}, "irnn=True.*cell='gru'"),
    ({"vocab_size": 10, "input_dim": 3}, "vocab_size=10.*input_dim=3"),
    ({"vocab_size": 0}, "vocab_size.*received 0"),
    ({"input_dim": 0}, "input_dim.*received 0"),
    ({"classes": 0}, "classes.*received 0"),
    ({"classes": True}, "classes.*received True"),
    ({"head": "tagging"}, "'tagging'.*next_token, sequence"),
    ({"head": "next_token", "bidirectional": True}, "head='next_token'.*bidirectional"),
    ({"input_dim": 3}, r"input_dim=3.*classes="),  # next-token over features needs classes
    ({"seq_len": 0}, "seq_len.*received 0"),
    ({"input_shape": (32, 32, 3)}, r"input_shape.*\(32, 32, 3\)"),
    ({"input_shape": (8,), "seq_len": 9}, r"seq_len=9.*input_shape=\(8,\)"),
    ({"input_shape": (8,), "input_dim": 3}, r"input_shape=\(8,\).*input_dim=3"),
    ({"input_shape": (8, 3), "vocab_size": 100}, r"input_shape=\(8, 3\).*vocab_size=100"),
    ({"input_shape": (8, 3), "input_dim": 4, "classes": 2}, r"input_dim=4.*\(8, 3\)"),
    ({"input_shape": (8, None)}, r"input_shape=\(8, None\)"),
    ({"kernel_initializer": "orthogonalish"}, "'orthogonalish'"),
    ({"l2": -1.0}, "l2.*received -1.0"),
    ({"classifier_activation": "softmaxx"}, "'softmaxx'"),
    ({"bidirectional": "yes"}, "bidirectional.*received 'yes'"),
]


@pytest.mark.parametrize("kwargs, message", BAD_ARGUMENTS)
def test_bad_argument_raises_before_any_layer_is_built(kwargs, message, monkeypatch):
    def no_layers_yet(*args, **kwargs):
        raise AssertionError("a layer was built before the arguments were checked")

    # The builder's first layer is its Input: failing here means the checks ran first.
    monkeypatch.setattr(keras.layers, "Input", no_layers_yet)
    with pytest.raises(ValueError, match=message):
        rnn_stack(**kwargs)
