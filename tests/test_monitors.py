"""Training monitors: they record per-layer values to TensorBoard and
monitors.json, warn on the conditions the seed names, leave training itself
untouched, and switch on from any app's `train` with --monitor."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from dlsuite.apps.core import choices
from dlsuite.apps import cli
from dlsuite.callbacks import monitors


def run(capsys, *argv):
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _data(n=128, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6, 6, 1)).astype("float32")
    y = (x.mean(axis=(1, 2, 3)) > 0).astype("int32")
    return x, y


def _model(kernel_initializer="he_normal", bias_initializer="zeros", batch_norm=True, dropout=0.0):
    inputs = keras.Input((6, 6, 1))
    x = keras.layers.Conv2D(8, 3, activation="relu", kernel_initializer=kernel_initializer,
                            bias_initializer=bias_initializer, name="conv")(inputs)
    if batch_norm:
        x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(16, activation="relu", kernel_initializer=kernel_initializer,
                           bias_initializer=bias_initializer, name="hidden")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, seed=1)(x)
    outputs = keras.layers.Dense(2, activation="softmax", name="out")(x)
    return keras.Model(inputs, outputs)


def _fit(model, callbacks, *, lr=1e-3, optimizer=keras.optimizers.Adam, epochs=1):
    x, y = _data()
    model.compile(optimizer=optimizer(lr), loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=16, epochs=epochs, callbacks=callbacks, verbose=0, shuffle=False)
    return model


def _warnings(callbacks):
    return [w for c in callbacks if isinstance(c, monitors._Monitor) for w in c.warnings]


def test_names_match_the_command_line_choices():
    assert monitors.MONITORS == choices.MONITORS
    assert monitors.parse_names("all") == monitors.MONITORS
    assert monitors.parse_names("gradients, updates,gradients") == ("gradients", "updates")
    with pytest.raises(ValueError, match="received 'weights'"):
        monitors.parse_names("weights")


def test_every_monitor_writes_per_layer_values_to_tensorboard_and_json(tmp_path, capsys):
    x, y = _data()
    callbacks = monitors.make_monitors("all", sample=(x[:32], y[:32]), log_dir=tmp_path / "tb", every=2,
                                       summary_path=tmp_path / "monitors.json")
    _fit(_model(), callbacks)
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "monitors.json").read_text())
    assert set(summary) == {"update_ratio", "gradient_norm", "dead_relu"}
    # 128 examples / 16 = 8 batches, measured every 2: 4 points per layer.
    assert set(summary["update_ratio"]["latest"]) == {"conv", "bn", "hidden", "out"}
    assert all(len(points) == 4 for points in summary["gradient_norm"]["history"].values())
    assert all(0 < v < 1 for v in summary["update_ratio"]["latest"].values())
    assert all(np.isfinite(v) and v > 0 for v in summary["gradient_norm"]["latest"].values())
    assert set(summary["dead_relu"]["latest"]) == {"conv", "hidden"}
    assert all(0 <= v <= 1 for v in summary["dead_relu"]["latest"].values())
    assert "update_ratio" in out and "conv" in out  # the end-of-training table
    tags = set()
    for event_file in (tmp_path / "tb").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(event_file)):
            tags.update(value.tag for value in event.summary.value)
    assert {"update_ratio/conv", "gradient_norm/hidden", "dead_relu/conv"} <= tags


def test_probes_leave_training_unchanged():
    # Batch norm's moving statistics and dropout's seed are put back: the
    # same seed trains to the same weights with or without the monitors.
    x, y = _data()
    keras.utils.set_random_seed(3)
    plain = _fit(_model(dropout=0.3), [])
    keras.utils.set_random_seed(3)
    watched = _fit(_model(dropout=0.3), monitors.make_monitors(("gradients", "dead-relu"), sample=(x[:32], y[:32]),
                                                               every=1))
    for a, b in zip(plain.weights, watched.weights):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lr, direction", [(1e-7, "far below"), (3.0, "far above")])
def test_update_ratio_warns_far_from_the_seeds_rule(lr, direction, capsys):
    callbacks = [monitors.UpdateRatioMonitor(every=1)]
    _fit(_model(batch_norm=False), callbacks, lr=lr, optimizer=keras.optimizers.SGD)
    warnings = _warnings(callbacks)
    assert warnings and all(direction in w for w in warnings)
    assert "monitor: update/weight ratio" in capsys.readouterr().out


def test_dead_relus_are_counted_and_warned():
    x, y = _data()
    # A bias of -100 keeps every ReLU at 0 for these inputs.
    callbacks = [monitors.DeadReluMonitor((x[:32], y[:32]), every=1)]
    _fit(_model(bias_initializer=keras.initializers.Constant(-100.0), batch_norm=False), callbacks, lr=1e-4)
    assert callbacks[0].latest() == {"conv": 1.0, "hidden": 1.0}
    assert any("100% of the units of conv are dead" in w for w in callbacks[0].warnings)


def test_vanishing_and_exploding_gradients_are_named():
    x, y = _data()
    deep = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten()] + [
        keras.layers.Dense(32, activation="sigmoid", kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
                           name=f"d{i}") for i in range(8)] + [keras.layers.Dense(2, activation="softmax")])
    vanishing = [monitors.GradientNormMonitor((x[:32], y[:32]), every=1)]
    _fit(deep, vanishing, lr=1e-4)
    assert any(w.startswith("vanishing gradients") and "d0" in w for w in vanishing[0].warnings)
    norms = vanishing[0].latest()
    assert norms["d0"] < 1e-4 * max(norms.values())

    exploding = [monitors.GradientNormMonitor((x[:32], y[:32]), every=1)]
    _fit(_model(kernel_initializer=keras.initializers.RandomNormal(stddev=30.0), batch_norm=False), exploding, lr=1e-6)
    assert any(w.startswith("exploding gradients") for w in exploding[0].warnings)


def test_classify_train_monitor_option(tmp_path, capsys):
    status, out, _ = run(capsys, "classify", "train", "--epochs", "1", "--monitor", "updates,gradients", "--no-export",
                         "--activation", "relu", "--out", str(tmp_path / "run"))
    assert status == 0
    summary = json.loads((tmp_path / "run" / "monitors.json").read_text())
    assert set(summary) == {"update_ratio", "gradient_norm"}
    assert {"conv1", "conv2", "fc1", "predictions"} <= set(summary["gradient_norm"]["latest"])
    assert list((tmp_path / "run" / "tensorboard" / "monitors").glob("events.out.tfevents.*"))
    config = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert config["monitor"] == ["updates", "gradients"]
    assert "monitor warnings:" in out


def test_lm_train_monitors_recurrent_gradients(tmp_path, capsys):
    text = tmp_path / "fox.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    status, _, _ = run(capsys, "lm", "train", "--text", str(text), "--units", "16", "--layers", "1", "--embedding", "8",
                       "--seq-len", "20", "--batch-size", "16", "--epochs", "1", "--monitor", "gradients",
                       "--no-export", "--out", str(tmp_path / "run"))
    assert status == 0
    latest = json.loads((tmp_path / "run" / "monitors.json").read_text())["gradient_norm"]["latest"]
    recurrent = [name for name in latest if name not in ("embedding", "predictions")]  # the LSTM stack
    assert recurrent and all(np.isfinite(latest[name]) and latest[name] > 0 for name in recurrent)


@pytest.mark.parametrize("value", ["weights", "", "updates,bogus"])
def test_bad_monitor_names_exit_2(value, tmp_path, capsys):
    status, _, err = run(capsys, "classify", "train", "--monitor", value, "--out", str(tmp_path / "never"))
    assert status == 2
    assert f"received {value!r}" in err.strip().splitlines()[-1]
    assert not (tmp_path / "never").exists()
