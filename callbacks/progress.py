"""A progress line inside the epoch when the output is not a terminal.

On a terminal Keras draws its progress bar. Sent to a file or a pipe (a job's
log, `nohup`, `| tee`), Keras writes one line per epoch, and a 2x512 LSTM's
epoch on a 2-core CPU is minutes of silence (issue 17). `EpochProgress`
fills that gap: every `every` seconds (30 by default) one line such as

    epoch 1/4 step 120/560 loss 2.3412 9,830 tokens/s 1m12s

with the epoch's mean loss so far and the throughput since the previous line.
"""

import sys
import time

import keras
import numpy as np


def _duration(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class EpochProgress(keras.callbacks.Callback):
    """Prints `epoch E/N step S/M loss L R unit/s T` at least every `every` seconds of an epoch.

    Args:
        items_per_step: what one training step processes, e.g. the global
            batch size times the sequence length for a language model.
        unit: the name of those items: "tokens", "examples", ...
        every: seconds between lines, > 0.
        stream: where the lines go (default sys.stdout, looked up when
            training starts).
        only_when_not_a_terminal: stay quiet when `stream` is a terminal,
            where Keras's progress bar already shows the step and the loss.
        clock: the time source, for tests.
    """

    def __init__(self, *, items_per_step, unit="examples", every=30.0, stream=None,
                 only_when_not_a_terminal=True, clock=time.monotonic):
        super().__init__()
        if not every > 0:
            raise ValueError(f"every must be > 0 seconds, received {every!r}.")
        if items_per_step is not None and not items_per_step > 0:
            raise ValueError(f"items_per_step must be > 0 or None, received {items_per_step!r}.")
        self.items_per_step = items_per_step
        self.unit = unit
        self.every = every
        self.stream = stream
        self.only_when_not_a_terminal = only_when_not_a_terminal
        self.clock = clock
        self._active = False
        self._epoch = 0
        self._epoch_start = self._last_time = 0.0
        self._last_step = 0

    @classmethod
    def for_batches(cls, element_spec, global_batch_size, **kwargs):
        """Counts tokens for integer sequences of a fixed length, else examples.

        Args:
            element_spec: the training dataset's `element_spec`, (x, y) or x.
            global_batch_size: examples per step across all replicas.
            **kwargs: the other arguments of `EpochProgress`.
        """
        spec = element_spec[0] if isinstance(element_spec, (tuple, list)) else element_spec
        shape, dtype = getattr(spec, "shape", None), getattr(spec, "dtype", None)
        if (shape is not None and dtype is not None and dtype.is_integer and shape.rank == 2
                and shape[1] is not None):
            return cls(items_per_step=global_batch_size * shape[1], unit="tokens", **kwargs)  # (batch, time) ids
        return cls(items_per_step=global_batch_size, unit="examples", **kwargs)

    def _stream(self):
        return self.stream if self.stream is not None else sys.stdout

    def on_train_begin(self, logs=None):
        stream = self._stream()
        is_terminal = getattr(stream, "isatty", lambda: False)()
        self._active = not (self.only_when_not_a_terminal and is_terminal)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._epoch_start = self._last_time = self.clock()
        self._last_step = 0

    def on_train_batch_end(self, batch, logs=None):
        if not self._active:
            return
        now = self.clock()
        if now - self._last_time < self.every:
            return
        step = batch + 1
        self._stream().write(self._line(step, logs or {}, now) + "\n")
        self._stream().flush()
        self._last_time, self._last_step = now, step

    def _line(self, step, logs, now):
        params = self.params or {}
        epochs, steps = params.get("epochs"), params.get("steps")
        fields = [f"epoch {self._epoch + 1}" + (f"/{epochs}" if epochs else ""),
                  f"step {step}" + (f"/{steps}" if steps else "")]
        if "loss" in logs:
            fields.append(f"loss {float(np.asarray(logs['loss'])):.4f}")
        seconds = now - self._last_time
        if self.items_per_step and seconds > 0:
            rate = (step - self._last_step) * self.items_per_step / seconds
            fields.append(f"{rate:,.0f} {self.unit}/s")
        fields.append(_duration(now - self._epoch_start))
        return " ".join(fields)
