"""Precise batch-norm statistics (`--precise-bn`): what they compute, and a run that uses them."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from dlsuite.apps import cli
from dlsuite.apps.core import precise_bn


def _two_bn_model():
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(3, 3, padding="same", name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.Dense(4, name="dense")(keras.layers.GlobalAveragePooling2D()(x))
    x = keras.layers.BatchNormalization(name="bn2")(x)
    return keras.Model(inputs, x)


def test_recomputed_statistics_are_the_mean_and_unbiased_variance_of_the_inputs():
    model = _two_bn_model()
    rng = np.random.default_rng(0)
    images = rng.normal(3.0, 2.0, size=(40, 6, 6, 2)).astype("float32")
    batches = tf.data.Dataset.from_tensor_slices((images, np.zeros(40))).batch(16)  # 16, 16, 8: a partial last batch
    assert precise_bn.recompute(model, batches) == 3

    conv = keras.Model(model.input, model.get_layer("conv").output)
    inputs = conv.predict(images, verbose=0).reshape(-1, 3)  # bn1 sees the conv output, the same in any mode
    bn1 = model.get_layer("bn1")
    np.testing.assert_allclose(bn1.moving_mean.numpy(), inputs.mean(axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bn1.moving_variance.numpy(), inputs.var(axis=0, ddof=1), rtol=1e-4)
    assert bn1.momentum == 0.99  # restored

    # bn2 sees the dense output of training-mode bn1 (update_bn's convention), batch by batch.
    pieces, dense = [], model.get_layer("dense")
    for x, _ in batches:
        maps = conv(x).numpy()
        normalized = (maps - maps.mean(axis=(0, 1, 2))) / np.sqrt(maps.var(axis=(0, 1, 2)) + bn1.epsilon)
        pieces.append(dense(normalized.mean(axis=(1, 2))).numpy())  # gamma 1, beta 0 as initialized
    dense_inputs, bn2 = np.concatenate(pieces), model.get_layer("bn2")
    np.testing.assert_allclose(bn2.moving_mean.numpy(), dense_inputs.mean(axis=0), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(bn2.moving_variance.numpy(), dense_inputs.var(axis=0, ddof=1), rtol=1e-3)


def test_frozen_and_missing_batch_norm_are_left_alone():
    model = _two_bn_model()
    model.get_layer("bn1").trainable = False
    before = model.get_layer("bn1").moving_mean.numpy().copy()
    images = np.ones((8, 6, 6, 2), "float32")
    precise_bn.recompute(model, [(images, None)])
    np.testing.assert_array_equal(model.get_layer("bn1").moving_mean.numpy(), before)
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    assert precise_bn.recompute(plain, [np.ones((4, 3), "float32")]) == 0


def test_a_lagging_moving_average_is_replaced_and_the_run_reports_both(tmp_path, capsys):
    # A high learning rate and few epochs: the moving averages (momentum 0.99) lag the final weights.
    status = cli.main(["classify", "train", "--dataset", "shapes", "--shapes-size", "32", "--shapes-count", "300",
                       "--epochs", "2", "--lr", "0.01", "--precise-bn", "--out", str(tmp_path / "run"),
                       "--export-dir", str(tmp_path / "exports")])
    out = capsys.readouterr().out
    assert status == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    report = metrics["precise_bn"]
    assert report["batches"] > 0 and report["exported"] in ("recomputed", "moving_average")
    moving, recomputed = report["validation_loss"]["moving_average"], report["validation_loss"]["recomputed"]
    chosen = min(moving, recomputed)
    assert report["validation_loss"][report["exported"]] == chosen
    assert set(report["test"]) == {"moving_average", "recomputed"}
    assert metrics["test_accuracy"] == report["test"][report["exported"]]["test_accuracy"]
    assert "precise batch norm" in out
    metadata = json.loads(next((tmp_path / "exports").glob("*/1/assets/dlsuite.json")).read_text())
    assert metadata["batch_norm_statistics"] == report["exported"]


def test_precise_bn_takes_a_positive_batch_count(capsys):
    assert cli.main(["classify", "train", "--precise-bn", "0"]) == 2
    assert "--precise-bn" in capsys.readouterr().err


@pytest.mark.parametrize("app", ["lm"])
def test_an_app_without_batch_norm_says_so(app, tmp_path, capsys):
    status = cli.main(["lm", "train", "--max-chars", "3000", "--units", "8", "--layers", "1", "--embedding", "4",
                       "--seq-len", "20", "--precise-bn", "--out", str(tmp_path / "run"), "--no-export"])
    assert status == 0
    assert "no batch normalization to recompute" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["precise_bn"] == {"batches": 0}
