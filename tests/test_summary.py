"""Receptive fields, FLOPs and memory of hand-built models, checked by hand."""

import keras
import pytest
from keras import layers

from dlsuite.models import summary


def _model(input_shape, *stack):
    inputs = keras.Input(input_shape)
    x = inputs
    for layer in stack:
        x = layer(x)
    return keras.Model(inputs, x)


def _last(model, key):
    return summary.layer_table(model)[-1][key]


def test_three_3x3_convs_see_7x7():
    # The seed's claim: three stacked 3x3 convolutions see as much as one 7x7.
    model = _model((32, 32, 3), *(layers.Conv2D(4, 3) for _ in range(3)))
    table = summary.layer_table(model)
    assert [row["receptive_field"] for row in table] == [(1, 1), (3, 3), (5, 5), (7, 7)]
    assert table[-1]["jump"] == (1, 1)


# (layers, receptive field, jump), each worked out with
# rf_out = rf_in + (k_eff - 1) * jump_in and jump_out = jump_in * stride.
FIELD_CASES = {
    # 3, then pool: 3 + 1*1 = 4 (jump 2), then 4 + 2*2 = 8.
    "conv_pool_conv": (
        [layers.Conv2D(2, 3), layers.MaxPooling2D(2), layers.Conv2D(2, 3)], (8, 8), (2, 2)
    ),
    # ResNet stem: 7 (jump 2), then 7 + 2*2 = 11 (jump 4).
    "resnet_stem": (
        [layers.ZeroPadding2D(3), layers.Conv2D(2, 7, strides=2),
         layers.ZeroPadding2D(1), layers.MaxPooling2D(3, strides=2)],
        (11, 11), (4, 4),
    ),
    # Dilation 2: k_eff 5; then dilation 4: k_eff 9, 5 + 8 = 13.
    "dilated": (
        [layers.Conv2D(2, 3, dilation_rate=2), layers.Conv2D(2, 3, dilation_rate=4)],
        (13, 13), (1, 1),
    ),
    # Strided conv then conv: 3 (jump 2), then 3 + 2*2 = 7; BN and ReLU inherit.
    "strided_bn_relu": (
        [layers.Conv2D(2, 3, strides=2, padding="same"), layers.BatchNormalization(),
         layers.ReLU(), layers.Conv2D(2, 3)],
        (7, 7), (2, 2),
    ),
    # Average pooling without explicit strides strides by its size: 2, then 2 + 1*2 = 4.
    "avg_pool_twice": (
        [layers.AveragePooling2D(2), layers.AveragePooling2D(2)], (4, 4), (4, 4)
    ),
    "non_square": ([layers.Conv2D(2, (1, 7)), layers.Conv2D(2, (3, 1))], (3, 7), (1, 1)),
    "depthwise_separable": (
        [layers.DepthwiseConv2D(3), layers.SeparableConv2D(2, 5, strides=2)], (7, 7), (2, 2)
    ),
}


@pytest.mark.parametrize("case", FIELD_CASES)
def test_receptive_field_by_hand(case):
    stack, field, jump = FIELD_CASES[case]
    model = _model((64, 64, 3), *stack)
    assert _last(model, "receptive_field") == field
    assert _last(model, "jump") == jump


def test_merge_takes_the_widest_input():
    inputs = keras.Input((32, 32, 3))
    narrow = layers.Conv2D(4, 1, name="narrow")(inputs)
    wide = layers.Conv2D(4, 3, name="wide_a")(inputs)
    wide = layers.Conv2D(4, 3, padding="same", name="wide_b")(wide)
    wide = layers.ZeroPadding2D(1)(wide)
    merged = layers.Concatenate(name="concat")([narrow, wide])
    added = layers.Add(name="add")([merged, merged])
    table = {row["name"]: row for row in summary.layer_table(keras.Model(inputs, added))}
    assert table["narrow"]["receptive_field"] == (1, 1)
    assert table["concat"]["receptive_field"] == (5, 5)
    assert table["add"]["receptive_field"] == (5, 5)


def test_whole_input_after_flatten_global_pooling_and_rnn():
    model = _model((16, 16, 3), layers.Conv2D(2, 3), layers.GlobalAveragePooling2D(),
                   layers.Dense(3))
    table = summary.layer_table(model)
    assert [row["receptive_field"] for row in table[-2:]] == ["global", "global"]
    assert table[-1]["jump"] is None
    model = _model((16, 16, 3), layers.Flatten(), layers.Dense(3))
    assert _last(model, "receptive_field") == "global"
    tokens = _model((10,), layers.Embedding(50, 4), layers.LSTM(3))
    assert [row["receptive_field"] for row in summary.layer_table(tokens)] == [
        None, None, "global"
    ]


def test_nested_model_is_walked_in_place():
    base = keras.Sequential(
        [keras.Input((32, 32, 3)), layers.Conv2D(2, 3, name="c1"), layers.Conv2D(2, 3, name="c2")],
        name="base",
    )
    inputs = keras.Input((32, 32, 3))
    outputs = layers.Conv2D(2, 3, name="head")(base(inputs))
    table = summary.layer_table(keras.Model(inputs, outputs))
    assert [row["name"] for row in table[1:]] == ["base/c1", "base/c2", "head"]
    assert table[-1]["receptive_field"] == (7, 7)
    # c1: 3*3*3*2 + 2, c2 and head: 3*3*2*2 + 2 each; the nested model once.
    assert [row["params"] for row in table[1:]] == [56, 38, 38]


def lenet5():
    """LeNet-5 as in the paper: C1, S2, C3, S4, C5 (a 5x5 conv), F6, output."""
    return _model(
        (32, 32, 1),
        layers.Conv2D(6, 5, activation="tanh"), layers.AveragePooling2D(2),
        layers.Conv2D(16, 5, activation="tanh"), layers.AveragePooling2D(2),
        layers.Conv2D(120, 5, activation="tanh"), layers.Flatten(),
        layers.Dense(84, activation="tanh"), layers.Dense(10, activation="softmax"),
    )


def test_lenet5_flops_exact():
    macs = {
        "C1": 28 * 28 * 6 * (5 * 5 * 1),   # 117,600
        "C3": 10 * 10 * 16 * (5 * 5 * 6),  # 240,000
        "C5": 1 * 1 * 120 * (5 * 5 * 16),  # 48,000
        "F6": 120 * 84,                    # 10,080
        "output": 84 * 10,                 # 840
    }
    model = lenet5()
    assert model.count_params() == 61706
    assert summary.flops(model) == 2 * sum(macs.values()) == 833040
    per_layer = [row["flops"] for row in summary.layer_table(model) if row["flops"]]
    assert per_layer == [2 * value for value in macs.values()]


# (layers after a (10, 8) input, FLOPs): recurrent layers cost
# gates * (input + units) * units per step, times 10 steps.
SEQUENCE_CASES = {
    "lstm": ([layers.LSTM(16)], 2 * 10 * 4 * (8 + 16) * 16),
    "gru": ([layers.GRU(16)], 2 * 10 * 3 * (8 + 16) * 16),
    "simple_rnn": ([layers.SimpleRNN(16)], 2 * 10 * 1 * (8 + 16) * 16),
    "bilstm": ([layers.Bidirectional(layers.LSTM(16))], 2 * 2 * 10 * 4 * (8 + 16) * 16),
    # Dense on (time, features) runs once per step.
    "dense_per_step": ([layers.Dense(4)], 2 * 10 * 8 * 4),
    "time_distributed": ([layers.TimeDistributed(layers.Dense(4))], 2 * 10 * 8 * 4),
    "conv1d": ([layers.Conv1D(5, 3)], 2 * 8 * 5 * 3 * 8),
    "einsum_dense": ([layers.EinsumDense("abc,cd->abd", output_shape=(10, 4))], 2 * 10 * 8 * 4),
}


@pytest.mark.parametrize("case", SEQUENCE_CASES)
def test_sequence_flops(case):
    stack, expected = SEQUENCE_CASES[case]
    assert summary.flops(_model((10, 8), *stack)) == expected


def test_embedding_is_free_and_unknown_length_needs_sequence_length():
    model = _model((None,), layers.Embedding(100, 8), layers.GRU(16, return_sequences=True),
                   layers.Dense(100))
    with pytest.raises(ValueError, match="sequence_length"):
        summary.flops(model)
    with pytest.raises(ValueError, match="sequence_length"):
        summary.memory(model)
    assert summary.flops(model, sequence_length=10) == 2 * 10 * (3 * (8 + 16) * 16 + 16 * 100)
    # The table still works, leaving the count open.
    assert summary.layer_table(model)[-1]["flops"] is None


def test_depthwise_and_separable_flops():
    model = _model((8, 8, 4), layers.DepthwiseConv2D(3, padding="same"))
    assert summary.flops(model) == 2 * 8 * 8 * 4 * 9
    model = _model((8, 8, 4), layers.SeparableConv2D(6, 3, padding="same"))
    assert summary.flops(model) == 2 * 8 * 8 * (4 * 9 + 4 * 6)


@pytest.mark.parametrize(
    "application, flops",
    [("ResNet50", 7.72e9), ("VGG16", 3.09e10)],
)
def test_flops_match_published_numbers(application, flops):
    # Shapes only keeps VGG16's 138M initializations out of the test time.
    with summary.shapes_only():
        model = getattr(keras.applications, application)(weights=None)
    assert summary.flops(model) == pytest.approx(flops, rel=0.01)


def test_shapes_only_leaves_nothing_to_initialize_later():
    with summary.shapes_only():
        big = _model((64,), layers.Dense(4096), layers.Dense(4096))
    assert summary.describe(big)["params"] == 64 * 4096 + 4096 + 4096 * 4096 + 4096
    # Keras initializes every queued variable when a StatelessScope closes;
    # shapes_only must have taken `big`'s off the queue.
    with keras.StatelessScope():
        pass
    assert [variable._value for variable in big.weights] == [None] * 4


def tiny_dense():
    return _model((4,), layers.Dense(3))  # 4 * 3 + 3 = 15 parameters


@pytest.mark.parametrize("optimizer, slots", [("sgd", 0), ("momentum", 1), ("adam", 2)])
def test_memory_exact_for_tiny_dense(optimizer, slots):
    # The estimate is the peak of a step, checked against measured peaks by
    # `dlsuite diagnose memory`: here while backprop is at the Dense layer.
    memory = summary.memory(tiny_dense(), batch_size=8, optimizer=optimizer)
    expected = {
        "weights": 15 * 4,
        "gradients": 15 * 4,
        "optimizer": slots * 15 * 4,
        # Dense keeps its input (4 floats) for the kernel gradient; the
        # output (3) is freed once the loss has its gradient, except with
        # momentum, whose updates run after backprop (summary's
        # _ALL_GRADIENTS_AT_ONCE): then the peak holds both.
        "activations": 8 * (4 + 3) * 4 if optimizer == "momentum" else 8 * 4 * 4,
        # The output gradient (3 floats per example) and, except for plain
        # SGD, one update temporary the size of each of the two largest
        # variables: the kernel (12) and the bias (3).
        "workspace": 8 * 3 * 4 + (0 if optimizer == "sgd" else (12 + 3) * 4),
        # Kernel, bias, their slots, the step counter and learning rate.
        "framework": summary.FRAMEWORK_BYTES_PER_VARIABLE * (2 + 2 * slots + 2),
    }
    expected["total"] = sum(expected.values())
    assert memory == expected


def test_memory_counts_only_trainable_for_gradients_and_slots():
    model = _model((4,), layers.Dense(3), layers.BatchNormalization())
    memory = summary.memory(model, batch_size=1, optimizer="adam")
    # BN: gamma, beta trainable; moving mean and variance not.
    assert memory["weights"] == (15 + 4 * 3) * 4
    assert memory["gradients"] == (15 + 2 * 3) * 4
    assert memory["optimizer"] == 2 * memory["gradients"]


def test_memory_rejects_bad_arguments():
    with pytest.raises(ValueError, match="adam"):
        summary.memory(tiny_dense(), optimizer="adamm")
    with pytest.raises(ValueError, match="batch_size"):
        summary.memory(tiny_dense(), batch_size=0)
    assert "lbfgs" in summary.OPTIMIZERS and "sgd" in summary.OPTIMIZERS


def test_describe_keys_and_totals():
    model = lenet5()
    info = summary.describe(model, batch_size=4, optimizer="sgd")
    for key in ("name", "params", "trainable_params", "non_trainable_params", "flops",
                "input_shape", "output_shape", "memory", "layers"):
        assert key in info
    assert set(info["memory"]) == {"weights", "optimizer", "activations", "gradients", "workspace",
                                   "framework", "total"}
    assert info["params"] == info["trainable_params"] == 61706
    assert info["non_trainable_params"] == 0
    assert info["flops"] == 833040
    assert info["input_shape"] == (32, 32, 1)
    assert info["output_shape"] == (10,)
    assert info["memory"]["optimizer"] == 0
    assert info["memory"] == summary.memory(model, batch_size=4, optimizer="sgd")
    assert len(info["layers"]) == len(model.layers)
