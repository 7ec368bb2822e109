"""FusedLSTM / FusedGRU (dlsuite.models.fused_rnn) give keras.layers.LSTM / GRU's numbers.

Same weights, same inputs: the outputs, the final states and the gradients of
every input and weight agree within float32 rounding, for the CPU loop and for
the paths that fall back to Keras's own (a mask; a GPU).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from dlsuite.models import build, fused_rnn  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

PAIRS = {"lstm": (keras.layers.LSTM, fused_rnn.FusedLSTM), "gru": (keras.layers.GRU, fused_rnn.FusedGRU)}


def _twin_layers(cell, *, units=6, features=5, seed=0, **kwargs):
    """A stock layer and a fused one holding the same (non-default, so every gate matters) weights."""
    stock_class, fused_class = PAIRS[cell]
    stock = stock_class(units, return_sequences=True, return_state=True, **kwargs)
    fused = fused_class(units, return_sequences=True, return_state=True, **kwargs)
    stock.build((None, None, features))
    fused.build((None, None, features))
    rng = np.random.default_rng(seed)
    weights = [w + rng.normal(scale=0.4, size=w.shape).astype("float32") for w in stock.get_weights()]
    stock.set_weights(weights)
    fused.set_weights(weights)
    return stock, fused


def _outputs_and_gradients(layer, x, mask=None):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        outputs = layer(x, mask=mask, training=True)
        # Weights every output and state differently, so each gradient path is checked.
        sequence, *states = [tf.cast(t, "float32") for t in outputs]  # bfloat16 under a mixed policy
        loss = tf.reduce_sum(sequence * tf.sin(tf.range(sequence.shape[-1], dtype="float32")))
        for index, state in enumerate(states):
            loss += tf.reduce_sum(state ** 2) * (index + 1)
    gradients = tape.gradient(loss, [x, *layer.trainable_weights])
    return [keras.ops.convert_to_numpy(t) for t in [*outputs, *gradients]]


def _assert_same(stock_values, fused_values):
    assert len(stock_values) == len(fused_values)
    for stock_value, fused_value in zip(stock_values, fused_values):
        np.testing.assert_allclose(fused_value, stock_value, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("cell", sorted(PAIRS))
@pytest.mark.parametrize("go_backwards", [False, True])
@pytest.mark.parametrize("batch, time", [(3, 7), (1, 1), (33, 4)])  # 33: two loops of 16 and 17 rows
def test_same_outputs_and_gradients_as_keras(cell, go_backwards, batch, time):
    stock, fused = _twin_layers(cell, go_backwards=go_backwards)
    x = np.random.default_rng(1).normal(size=(batch, time, 5)).astype("float32")
    _assert_same(_outputs_and_gradients(stock, x), _outputs_and_gradients(fused, x))


def test_a_batch_is_split_into_loops_only_when_each_gets_enough_rows(monkeypatch):
    monkeypatch.setattr(fused_rnn, "_cores", lambda: 2)
    monkeypatch.setattr(tf.config.threading, "get_inter_op_parallelism_threads", lambda: 0)
    assert [fused_rnn._batch_parts(tf.zeros((batch, 3, 5))) for batch in (1, 31, 32, 64, 512)] == [1, 1, 2, 2, 2]
    assert fused_rnn._batch_parts(keras.KerasTensor((None, 3, 5))) == 2  # unknown batch: split
    monkeypatch.setattr(tf.config.threading, "get_inter_op_parallelism_threads", lambda: 1)
    assert fused_rnn._batch_parts(tf.zeros((64, 3, 5))) == 1  # one inter-op thread runs the loops in turn


def test_each_loop_gets_its_share_of_the_cores_as_intra_op_threads_and_a_gpu_keeps_the_default(monkeypatch):
    shares = {}
    for cores in (1, 2, 3, 8):
        monkeypatch.setattr(fused_rnn, "_cores", lambda cores=cores: cores)
        shares[cores] = fused_rnn.intra_op_threads()
    assert shares == {1: 1, 2: 1, 3: 1, 8: 4}
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["GPU:0"] if kind == "GPU" else [])
    assert fused_rnn.intra_op_threads() is None


@pytest.mark.parametrize("cell", sorted(PAIRS))
@pytest.mark.parametrize("batch", [1, 2, 33])  # batch 1: one of the two loops gets no rows
def test_an_unknown_batch_gives_keras_numbers_for_any_size(cell, batch, monkeypatch):
    monkeypatch.setattr(tf.config.threading, "get_inter_op_parallelism_threads", lambda: 2)
    name = f"_{cell}_sequence"
    loops, sequence = [], getattr(fused_rnn, name)
    monkeypatch.setattr(fused_rnn, name, lambda *args: loops.append(1) or sequence(*args))
    stock, fused = _twin_layers(cell)
    signature = [tf.TensorSpec((None, None, 5), tf.float32)]
    results = {}
    for side, layer in (("stock", stock), ("fused", fused)):
        @tf.function(input_signature=signature)
        def run(x, layer=layer):
            with tf.GradientTape() as tape:
                tape.watch(x)
                sequence, *states = layer(x, training=True)
                loss = tf.reduce_sum(sequence * sequence) + sum(tf.reduce_sum(s) for s in states)
            return [sequence, *states, *tape.gradient(loss, [x, *layer.trainable_weights])]

        x = np.random.default_rng(8).normal(size=(batch, 4, 5)).astype("float32")
        results[side] = [t.numpy() for t in run(tf.constant(x))]
    assert len(loops) == 2  # the fused layer's batch ran as two loops
    _assert_same(results["stock"], results["fused"])


@pytest.mark.parametrize("cell", sorted(PAIRS))
def test_initial_state_gets_its_gradient(cell):
    stock, fused = _twin_layers(cell)
    x = tf.constant(np.random.default_rng(2).normal(size=(2, 4, 5)).astype("float32"))
    states = [tf.constant(np.random.default_rng(3 + i).normal(size=(2, 6)).astype("float32"))
              for i in range(2 if cell == "lstm" else 1)]
    results = []
    for layer in (stock, fused):
        with tf.GradientTape() as tape:
            tape.watch(states)
            sequence, *_ = layer(x, initial_state=states)
            loss = tf.reduce_sum(sequence ** 2)
        results.append([g.numpy() for g in tape.gradient(loss, states)])
    _assert_same(*results)


@pytest.mark.parametrize("cell", sorted(PAIRS))
def test_the_cpu_loop_runs_on_cpu_and_keras_loop_otherwise(cell, monkeypatch):
    stock, fused = _twin_layers(cell)
    x = np.random.default_rng(4).normal(size=(2, 4, 5)).astype("float32")
    calls = []
    original = PAIRS[cell][0].inner_loop

    def keras_inner_loop(self, *args, **kwargs):
        calls.append(self.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PAIRS[cell][0], "inner_loop", keras_inner_loop)
    fused(x)
    assert calls == [], "no GPU here, so the fused layer must not take Keras's loop"
    # With a GPU visible, Keras's inner_loop (cuDNN) runs, with the same numbers.
    monkeypatch.setattr(fused_rnn, "_no_gpu", lambda: False)
    _assert_same(_outputs_and_gradients(stock, x), _outputs_and_gradients(fused, x))
    assert fused.name in calls


@pytest.mark.parametrize("cell", sorted(PAIRS))
def test_a_mask_falls_back_to_keras_with_the_same_numbers(cell):
    stock, fused = _twin_layers(cell)
    x = np.random.default_rng(5).normal(size=(2, 4, 5)).astype("float32")
    mask = tf.constant([[True, True, True, False], [True, True, True, True]])
    _assert_same(_outputs_and_gradients(stock, x, mask), _outputs_and_gradients(fused, x, mask))


@pytest.mark.parametrize("cell", sorted(PAIRS))
def test_input_dropout_drops_whole_features_during_training_only(cell):
    reference, fused = _twin_layers(cell, dropout=0.5)
    x = np.ones((4, 3, 5), dtype="float32")
    inference = keras.ops.convert_to_numpy(fused(x, training=False)[0])
    np.testing.assert_allclose(inference, keras.ops.convert_to_numpy(reference(x)[0]), rtol=1e-5, atol=1e-6)
    values = _outputs_and_gradients(fused, x)
    assert all(np.isfinite(v).all() for v in values)
    assert not np.allclose(values[0], inference)


@pytest.mark.parametrize("cell", sorted(PAIRS))
def test_one_training_step_of_the_app_model_matches_a_keras_model(cell):
    """The lm app's model (FusedLSTM/GRU layers) and the same model with stock layers take the same step."""
    fused_model = build(cell, vocab_size=13, units=8, layers=2, embedding_dim=4, classifier_activation=None)
    config = fused_model.get_config()
    stock_class = PAIRS[cell][0]
    for layer in config["layers"]:
        if layer["class_name"].endswith(f"Fused{cell.upper()}"):
            layer.pop("registered_name", None)
            layer["class_name"], layer["module"] = stock_class.__name__, "keras.layers"
    stock_model = keras.Model.from_config(config)
    assert any(type(layer) is stock_class for layer in stock_model.layers)
    stock_model.set_weights(fused_model.get_weights())
    rng = np.random.default_rng(6)
    x, y = rng.integers(0, 13, (4, 9)).astype("int32"), rng.integers(0, 13, (4, 9)).astype("int32")
    for model in (stock_model, fused_model):
        model.compile(optimizer=keras.optimizers.SGD(0.5, global_clipnorm=5.0),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.train_on_batch(x, y)
    for stock_weight, fused_weight in zip(stock_model.get_weights(), fused_model.get_weights()):
        np.testing.assert_allclose(fused_weight, stock_weight, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cell", sorted(PAIRS))
def test_saves_and_loads_as_a_keras_file_in_safe_mode(cell, tmp_path):
    model = build(cell, vocab_size=11, units=4, layers=1, embedding_dim=3)
    path = tmp_path / f"{cell}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert type(loaded.get_layer("rnn_1")) is PAIRS[cell][1]
    x = np.random.default_rng(7).integers(0, 11, (2, 5)).astype("int32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)), keras.ops.convert_to_numpy(model(x)), atol=1e-6)


@pytest.mark.parametrize("cell", sorted(PAIRS))
def test_under_mixed_bfloat16_as_close_to_float32_as_the_keras_layer(cell):
    """Under mixed_bfloat16 both layers compute in bfloat16 (Keras's policy keeps only the
    weights in float32): the fused loop's outputs and gradients are as close to the float32
    answer as the stock layer's in the same policy, over 30 steps of carried state."""
    x = np.random.default_rng(5).normal(size=(4, 30, 5)).astype("float32")
    float32_layer = _twin_layers(cell)[0]
    reference = _outputs_and_gradients(float32_layer, x)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        stock, fused = _twin_layers(cell)
        for layer in (stock, fused):
            layer.set_weights(float32_layer.get_weights())
        assert fused.compute_dtype == "bfloat16"
        values = {"stock": _outputs_and_gradients(stock, x), "fused": _outputs_and_gradients(fused, x)}
    finally:
        keras.mixed_precision.set_global_policy("float32")
    for index, expected in enumerate(reference):
        scale = np.abs(expected).max()
        errors = {side: np.abs(np.asarray(v[index], dtype="float32") - expected).max() / scale
                  for side, v in values.items()}
        assert errors["stock"] < 0.05  # the test itself: bfloat16 has 8 bits of mantissa
        assert errors["fused"] <= 2 * errors["stock"] + 0.01, (index, errors)
