"""The custom callbacks and the optimizer/schedule factory."""

import math

import keras
import numpy as np
import pytest

from dlsuite.apps.core import optim
from dlsuite.callbacks import BestCheckpoint, LearningRateLogger, NaNGuard, StepDecay


def tiny_model():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    return model


DATA = (np.random.default_rng(0).normal(size=(32, 4)).astype("float32"), np.arange(32) % 3)


def test_step_decay_drops_by_the_factor_every_period():
    decay = StepDecay(0.1, drop=0.5, every=3, min_lr=0.02)
    assert [decay.rate(epoch) for epoch in range(8)] == pytest.approx([0.1] * 3 + [0.05] * 3 + [0.025, 0.025])
    assert decay.rate(100) == 0.02  # floor
    model = tiny_model()
    history = model.fit(*DATA, epochs=7, verbose=0, callbacks=[StepDecay(0.1, 0.5, 3), LearningRateLogger()])
    np.testing.assert_allclose(history.history["learning_rate"], [0.1] * 3 + [0.05] * 3 + [0.025], rtol=1e-6)


def test_lr_logger_gives_a_step_schedule_the_rate_of_the_epoch_first_step():
    """Also for a fit that starts mid-epoch (a resumed run's rest of the epoch)."""
    schedule = keras.optimizers.schedules.CosineDecay(0.1, decay_steps=40)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(schedule), "mse")
    model.optimizer.build(model.trainable_variables)
    model.optimizer.iterations.assign(13)  # as if 3 of epoch 1's 10 steps were done
    logger = LearningRateLogger(steps_per_epoch=10)
    logger.set_model(model)
    logger.on_epoch_begin(1)
    logs = {}
    logger.on_epoch_end(1, logs)
    assert logs["learning_rate"] == pytest.approx(float(schedule(10)))
    assert logs["learning_rate"] != pytest.approx(float(schedule(13)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"initial_lr": 0}, "initial_lr must be > 0, received 0"),
        ({"initial_lr": 0.1, "drop": 1.5}, r"drop must be in \(0, 1\], received 1.5"),
        ({"initial_lr": 0.1, "every": 0}, "every must be an integer >= 1"),
    ],
)
def test_step_decay_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StepDecay(**kwargs)


def test_nan_guard_stops_at_the_first_non_finite_batch():
    model = tiny_model()
    guard = NaNGuard()
    x, y = DATA
    x = x.copy()
    x[20:] = np.nan  # batches of 8: the third batch is the first with NaN
    model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0, callbacks=[guard])
    assert guard.message.startswith("the loss became nan at epoch 1, batch 3")
    assert "learning rate is probably too high" in guard.message


def test_best_checkpoint_keeps_the_best_and_ignores_nan(tmp_path):
    model = tiny_model()
    checkpoint = BestCheckpoint(tmp_path / "best.keras", monitor="val_loss")
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0, {"val_loss": 1.0})
    saved = (tmp_path / "best.keras").stat().st_mtime_ns
    for epoch, value in ((1, 2.0), (2, math.nan), (3, math.inf)):
        checkpoint.on_epoch_end(epoch, {"val_loss": value})
    assert checkpoint.best == 1.0 and checkpoint.best_epoch == 0
    assert (tmp_path / "best.keras").stat().st_mtime_ns == saved
    checkpoint.on_epoch_end(4, {"val_loss": 0.5})
    assert checkpoint.best_epoch == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.keras"]  # no temporary left


@pytest.mark.parametrize("name", [o for o in optim.OPTIMIZERS if o != "lbfgs"])
def test_each_optimizer_with_its_hyperparameters(name):
    config = optim.OptimizerConfig(optimizer=name, lr=0.05, momentum=0.8, weight_decay=1e-4, clip_norm=2.0)
    optimizer = optim.make_optimizer(config, steps_per_epoch=10, epochs=3)
    assert float(optimizer.learning_rate) == pytest.approx(0.05)
    assert optimizer.global_clipnorm == 2.0 and optimizer.weight_decay == pytest.approx(1e-4)
    if name in ("momentum", "nesterov"):
        assert optimizer.momentum == pytest.approx(0.8) and optimizer.nesterov == (name == "nesterov")


@pytest.mark.parametrize(
    "schedule, expected",  # rate at the start of epochs 0, 1, 2 with 10 steps per epoch
    [
        ("constant", [0.1, 0.1, 0.1]),
        ("exponential", [0.1, 0.09, 0.081]),  # lr * (1 - 0.1) ** epoch
        ("inverse_time", [0.1, 0.1 / 1.1, 0.1 / 1.2]),  # lr / (1 + 0.1 * epoch)
        ("warmup", [0.01, 0.1, 0.1]),  # one warm-up epoch: step 0 is 1/10 of it
    ],
)
def test_schedules_follow_their_formula(schedule, expected):
    config = optim.OptimizerConfig(optimizer="sgd", lr=0.1, lr_schedule=schedule, warmup_epochs=1)
    rate = optim.make_schedule(config, steps_per_epoch=10, epochs=3)
    values = [float(rate(step)) if callable(rate) else rate for step in (0, 10, 20)]
    np.testing.assert_allclose(values, expected, rtol=1e-5)


def test_cosine_decays_to_zero_by_the_last_step():
    config = optim.OptimizerConfig(optimizer="sgd", lr=0.1, lr_schedule="cosine")
    rate = optim.make_schedule(config, steps_per_epoch=10, epochs=3)
    assert float(rate(0)) == pytest.approx(0.1) and float(rate(15)) == pytest.approx(0.05, rel=1e-4)
    assert float(rate(30)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"optimizer": "adamax"}, "Unknown optimizer 'adamax'"),
        ({"lr_schedule": "linear"}, "Unknown learning-rate schedule 'linear'"),
        ({"lr": 0}, "^lr must be > 0, received 0"),
        ({"momentum": 1.2}, r"^momentum must be in \[0, 1\), received 1.2"),
        ({"clip_norm": -5}, "^clip_norm must be > 0, received -5"),
        ({"optimizer": "lbfgs", "lr_schedule": "step"}, "does not apply to lbfgs"),
    ],
)
def test_optimizer_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        optim.OptimizerConfig(**kwargs)
