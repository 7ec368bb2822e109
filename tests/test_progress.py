"""EpochProgress (dlsuite.callbacks.progress): a line at least every 30 s of an epoch off a terminal."""

import io
import os
import re

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from dlsuite.callbacks import EpochProgress  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

LINE = re.compile(r"^epoch (\d+)/(\d+) step (\d+)/(\d+) loss (\d+\.\d{4}) ([\d,]+) (\w+)/s (\d+m)?\d+s$")


class FakeClock:
    """Each call advances the time by `tick` seconds: a step that takes `tick` seconds."""

    def __init__(self, tick):
        self.now, self.tick = 0.0, tick

    def __call__(self):
        self.now += self.tick
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def _fit(callback, *, epochs=2, steps=12):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x = np.ones((steps * 4, 3), "float32")
    model.fit(x, np.zeros((steps * 4, 1), "float32"), batch_size=4, epochs=epochs, verbose=0, callbacks=[callback])


def test_a_line_every_30_seconds_with_step_loss_and_rate():
    stream = io.StringIO()
    # 10 s a step: a line after every 3rd step, 4 per 12-step epoch.
    callback = EpochProgress(items_per_step=400, unit="tokens", stream=stream, clock=FakeClock(10.0))
    _fit(callback)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 8
    for line in lines:
        match = LINE.match(line)
        assert match, line
        assert match.group(2) == "2" and match.group(4) == "12" and match.group(7) == "tokens"
        assert match.group(6) == "40"  # 3 steps x 400 tokens in 30 s
    assert [LINE.match(line).group(3) for line in lines[:4]] == ["3", "6", "9", "12"]
    assert lines[4].startswith("epoch 2/2 step 3/12")


def test_no_line_before_the_interval_nor_on_a_terminal():
    quiet = io.StringIO()
    _fit(EpochProgress(items_per_step=4, stream=quiet, clock=FakeClock(1.0)))
    assert quiet.getvalue() == ""  # 12 steps of 1 s: never 30 s
    terminal = Terminal()
    _fit(EpochProgress(items_per_step=4, stream=terminal, clock=FakeClock(100.0)))
    assert terminal.getvalue() == ""  # Keras's progress bar shows it there


def test_the_real_clock_prints_on_time():
    stream = io.StringIO()
    _fit(EpochProgress(items_per_step=4, every=1e-9, stream=stream), epochs=1, steps=3)
    assert len(stream.getvalue().splitlines()) == 3
    assert all(" examples/s " in line for line in stream.getvalue().splitlines())


def test_tokens_for_fixed_length_id_sequences_else_examples():
    tokens = (tf.TensorSpec((None, 100), tf.int32), tf.TensorSpec((None, 100), tf.int32))
    progress = EpochProgress.for_batches(tokens, 64)
    assert (progress.items_per_step, progress.unit) == (6400, "tokens")
    images = (tf.TensorSpec((None, 28, 28, 1), tf.float32), tf.TensorSpec((None,), tf.int32))
    progress = EpochProgress.for_batches(images, 32, every=5.0)
    assert (progress.items_per_step, progress.unit, progress.every) == (32, "examples", 5.0)


@pytest.mark.parametrize("kwargs", [{"every": 0}, {"items_per_step": 0}])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        EpochProgress(**{"items_per_step": 1, **kwargs})
