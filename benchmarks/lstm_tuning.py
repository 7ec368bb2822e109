"""What three knobs do to the 2x512 char-LSTM's training tokens per second:
`unroll` on short sequences, a larger batch, and `steps_per_execution`; and,
if PyTorch is installed, the ratio to the same model in PyTorch.

    python -m benchmarks.lstm_tuning            # 2x512 LSTM, 97-token vocabulary, embedding 64
    python -m benchmarks.lstm_tuning --quick    # 2x32 LSTM, tiny batches

Each result compares one setting against the app's (`dlsuite lm train`:
batch 64, 100-token windows, `unroll=False`, one step per `fit` execution),
with everything else the same: Adam(0.003, global_clipnorm=5), sparse
cross-entropy on logits, synthetic token ids.

* `lstm_2x512_unroll_seq20`: `keras.layers.LSTM(unroll=True)` against the
  default symbolic loop, 20-token sequences (unrolling needs a fixed, short
  length; the app's builder keeps the loop so the GPU can use cuDNN).
* `lstm_2x512_batch256`: batch 256 against 64, 100-token windows.
* `lstm_2x512_steps_per_execution8`: `model.fit` running 8 steps per
  execution against 1 (one Python round trip per step), 20-token sequences,
  where the round trip weighs most.
* `lstm_2x512_vs_pytorch`: only when `import torch` works (printed as skipped
  otherwise): the app's Keras model against `torch.nn.LSTM` of the same shape.
"""

import numpy as np

from benchmarks import common
from benchmarks.lm_speed import VOCAB_CHARS

VOCAB_SIZE = len(VOCAB_CHARS) + 2  # + padding and [UNK], as the char vocabulary
EMBEDDING = 64
OPTIMIZER = "Adam(0.003, global_clipnorm=5)"


def _app_model(units, *, mode, steps_per_execution=1):
    import keras

    from dlsuite import models

    model = models.build("lstm", vocab_size=VOCAB_SIZE, units=units, layers=2, embedding_dim=EMBEDDING,
                         classifier_activation=None)
    model.compile(optimizer=keras.optimizers.Adam(0.003, global_clipnorm=5.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=steps_per_execution)
    if mode == "quick":
        common.build_optimizers(model)
    return model


def _keras_lstm(units, *, seq_len, unroll, mode):
    """The app's shape written with keras.layers.LSTM, whose `unroll` the builder leaves False."""
    import keras

    model = keras.Sequential([
        keras.Input((seq_len,), dtype="int32"),
        keras.layers.Embedding(VOCAB_SIZE, EMBEDDING),
        keras.layers.LSTM(units, return_sequences=True, unroll=unroll),
        keras.layers.LSTM(units, return_sequences=True, unroll=unroll),
        keras.layers.Dense(VOCAB_SIZE),
    ])
    model.compile(optimizer=keras.optimizers.Adam(0.003, global_clipnorm=5.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    if mode == "quick":
        common.build_optimizers(model)
    return model


def _tokens(batch, seq_len, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(2, VOCAB_SIZE, (batch, seq_len)).astype("int32")
    y = rng.integers(2, VOCAB_SIZE, (batch, seq_len)).astype("int32")
    return x, y


def _train_on_batch(model, x, y, steps):
    def run():
        for _ in range(steps):
            loss = model.train_on_batch(x, y)
        float(np.asarray(loss))  # the work is done once the loss is a number
        return steps * x.size
    return run


def _config(units, **fields):
    return {"model": f"2x{units} LSTM, embedding {EMBEDDING}, vocabulary {VOCAB_SIZE}",
            "optimizer": OPTIMIZER, "warmup_repeats": 1, **fields}


def unroll(*, units, batch, seq_len, steps, repeats, mode):
    x, y = _tokens(batch, seq_len)
    rates = common.interleaved({
        "unrolled": _train_on_batch(_keras_lstm(units, seq_len=seq_len, unroll=True, mode=mode), x, y, steps),
        "loop": _train_on_batch(_keras_lstm(units, seq_len=seq_len, unroll=False, mode=mode), x, y, steps),
    }, warmup=1, repeats=repeats)
    common.report(
        f"lstm_2x{units}_unroll_seq{seq_len}", ours=rates["unrolled"], reference=rates["loop"], mode=mode,
        unit="tokens/s", config=_config(units, batch=batch, seq_len=seq_len, steps_per_repeat=steps, repeats=repeats),
        ours_label=f"keras.layers.LSTM(unroll=True) x2, fixed length {seq_len}, train_on_batch",
        reference_label="keras.layers.LSTM(unroll=False) x2 (the symbolic loop the app uses), train_on_batch",
    )


def batch_size(*, units, batch, large_batch, seq_len, steps, repeats, mode):
    small, large = _tokens(batch, seq_len), _tokens(large_batch, seq_len)
    rates = common.interleaved({
        "large": _train_on_batch(_app_model(units, mode=mode), *large, steps),
        "default": _train_on_batch(_app_model(units, mode=mode), *small, steps),
    }, warmup=1, repeats=repeats)
    common.report(
        f"lstm_2x{units}_batch{large_batch}", ours=rates["large"], reference=rates["default"], mode=mode,
        unit="tokens/s",
        config=_config(units, batch={"ours": large_batch, "reference": batch}, seq_len=seq_len,
                       steps_per_repeat=steps, repeats=repeats),
        ours_label=f"the lm app's model, batch {large_batch}, train_on_batch",
        reference_label=f"the same model at the app's default batch {batch}",
    )


def steps_per_execution(*, units, batch, seq_len, steps, repeats, mode):
    import time

    import keras
    import tensorflow as tf

    x, y = _tokens(batch * steps, seq_len)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).cache()

    class LastStep(keras.callbacks.Callback):
        """When the latest step ended; a per-batch callback reads the loss back, as the app's NaNGuard does."""

        time = None

        def on_train_batch_end(self, batch, logs=None):
            self.time = time.perf_counter()

    stalls = []

    def epoch(model):
        last_step = LastStep()

        def run():
            # Timed to the end of the last step: TF 2.21 often holds the epoch's
            # tf.data iterator shutdown until its autotuning thread wakes (at
            # 2.55, 5.11 ... s, see benchmarks/input_pipeline.py), which would
            # round every epoch up to those marks on both sides.
            start = time.perf_counter()
            model.fit(dataset, epochs=1, verbose=0, shuffle=False, callbacks=[last_step])
            stalls.append(time.perf_counter() - last_step.time)
            return x.size, last_step.time - start
        return run

    rates = common.interleaved({
        "grouped": epoch(_app_model(units, mode=mode, steps_per_execution=steps)),
        "single": epoch(_app_model(units, mode=mode, steps_per_execution=1)),
    }, warmup=1, repeats=repeats)
    common.report(
        f"lstm_2x{units}_steps_per_execution{steps}", ours=rates["grouped"], reference=rates["single"],
        mode=mode, unit="tokens/s",
        config=_config(units, batch=batch, seq_len=seq_len, steps_per_epoch=steps, repeats=repeats,
                       timed="model.fit start to the end of the epoch's last step"),
        details=f"left out: the iterator shutdown after the last step, up to {max(stalls):.1f} s per epoch",
        ours_label=f"the lm app's model, model.fit(one epoch of {steps} batches), steps_per_execution={steps}",
        reference_label="the same with steps_per_execution=1 (the app's setting)",
    )


def pytorch(*, units, batch, seq_len, steps, repeats, mode):
    """The app's Keras model against the same model in PyTorch, or a skip line."""
    try:
        import torch
    except ImportError:
        print("lstm_tuning: PyTorch is not installed (import torch failed): the PyTorch ratio is skipped.",
              flush=True)
        return

    class TorchLSTM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(VOCAB_SIZE, EMBEDDING)
            self.lstm = torch.nn.LSTM(EMBEDDING, units, num_layers=2, batch_first=True)
            self.head = torch.nn.Linear(units, VOCAB_SIZE)

        def forward(self, ids):
            outputs, _ = self.lstm(self.embedding(ids))  # (batch, time, units)
            return self.head(outputs)  # (batch, time, vocabulary)

    x, y = _tokens(batch, seq_len)
    torch_model = TorchLSTM()
    optimizer = torch.optim.Adam(torch_model.parameters(), lr=0.003)
    torch_x, torch_y = torch.from_numpy(x).long(), torch.from_numpy(y).long()

    def torch_steps():
        for _ in range(steps):
            optimizer.zero_grad()
            logits = torch_model(torch_x)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB_SIZE), torch_y.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 5.0)
            optimizer.step()
        float(loss.item())
        return steps * x.size

    rates = common.interleaved({
        "keras": _train_on_batch(_app_model(units, mode=mode), x, y, steps),
        "torch": torch_steps,
    }, warmup=1, repeats=repeats)
    common.report(
        f"lstm_2x{units}_vs_pytorch", ours=rates["keras"], reference=rates["torch"], mode=mode, unit="tokens/s",
        config=_config(units, batch=batch, seq_len=seq_len, steps_per_repeat=steps, repeats=repeats,
                       torch_threads=torch.get_num_threads()),
        versions_torch=torch.__version__,
        ours_label="the lm app's Keras model, train_on_batch",
        reference_label="torch.nn.Embedding + nn.LSTM(num_layers=2) + nn.Linear, Adam + clip_grad_norm_(5)",
    )


def main(argv=None):
    args = common.parse_args(__doc__, argv)
    mode = "quick" if args.quick else "full"
    # More repeats in full: a 2x512 step takes seconds, and on shared cores one
    # slow spell can hit a few repeats of one side.
    repeats = common.MIN_REPEATS if args.quick else 7
    if args.quick:
        sizes = dict(units=32, batch=8)
        unroll(**sizes, seq_len=10, steps=1, repeats=repeats, mode=mode)
        batch_size(**sizes, large_batch=32, seq_len=10, steps=1, repeats=repeats, mode=mode)
        steps_per_execution(**sizes, seq_len=10, steps=4, repeats=repeats, mode=mode)
        pytorch(**sizes, seq_len=10, steps=1, repeats=repeats, mode=mode)
        return
    sizes = dict(units=512, batch=64)
    unroll(**sizes, seq_len=20, steps=2, repeats=repeats, mode=mode)
    steps_per_execution(**sizes, seq_len=20, steps=8, repeats=repeats, mode=mode)
    batch_size(**sizes, large_batch=256, seq_len=100, steps=1, repeats=repeats, mode=mode)
    pytorch(**sizes, seq_len=100, steps=1, repeats=repeats, mode=mode)


if __name__ == "__main__":
    main()
