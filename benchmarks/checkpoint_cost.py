"""What the checkpoints to resume from cost (#15): training with them against
the same training without.

    python -m benchmarks.checkpoint_cost            # ResNet-18 on 64x64x3 batch 32; 2x512 LSTM batch 64 x 100
    python -m benchmarks.checkpoint_cost --quick    # LeNet-5 and a 1x32 LSTM

Results `checkpoint_cost_<model>`, in training examples/s:

* ours: `model.fit` with `checkpoints.ResumeCheckpoint` as the apps use it
  (`--checkpoint-every 60`): a time check after every batch, and a whole
  checkpoint (model, optimizer, random and metric state, synced to disk)
  at each epoch's end. Every repeat is one epoch of about 20 s on 2 cores,
  so a checkpoint is written about three times as often as the default's
  one a minute: its cost is an upper bound of the default's;
* reference: the same fit, the same model and batches, without it.

The two alternate epoch by epoch in one process. The details give one
checkpoint's write time and size, and the cost it amounts to at the
default of one a minute.
"""

import os
import pathlib
import tempfile
import time

import numpy as np

from benchmarks import common

# (result name, builder arguments, example shape and label range, batch size, batches an epoch, repeats)
FULL = [
    ("resnet18", dict(name="resnet18", input_shape=(64, 64, 3), classes=4), "image", 32, 40, 5),
    ("lstm_2x512", dict(name="lstm", vocab_size=98, units=512, layers=2, embedding_dim=64,
                        classifier_activation=None), "tokens", 64, 14, 5),
]
QUICK = [
    ("lenet5", dict(name="lenet5", input_shape=(32, 32, 1), classes=10), "image", 16, 3, 5),
    ("lstm_1x32", dict(name="lstm", vocab_size=30, units=32, layers=1, embedding_dim=8,
                       classifier_activation=None), "tokens", 8, 3, 5),
]
SEQ_LEN = 100
DEFAULT_EVERY_S = 60.0


def _batches(kind, arguments, batch_size, steps):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    count = batch_size * steps
    if kind == "image":
        x = rng.uniform(0, 255, (count, *arguments["input_shape"])).astype("float32")
        y = rng.integers(0, arguments["classes"], count).astype("int32")
    else:
        x = rng.integers(0, arguments["vocab_size"], (count, SEQ_LEN)).astype("int32")
        y = rng.integers(0, arguments["vocab_size"], (count, SEQ_LEN)).astype("int32")
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).cache()


def measure(result, arguments, kind, batch_size, steps, repeats, *, mode):
    import keras

    from dlsuite import models
    from dlsuite.apps.core import checkpoints

    keras.utils.set_random_seed(0)
    arguments = dict(arguments)
    model = models.build(arguments.pop("name"), **arguments)
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=kind == "tokens"),
                  metrics=["accuracy"])
    data = _batches(kind, {**arguments}, batch_size, steps)
    folder = pathlib.Path(tempfile.mkdtemp(prefix="dlsuite-checkpoint-cost-"))
    store = checkpoints.Store(folder)
    epoch = [0]

    def fit(with_checkpoints):
        def run():
            callbacks = [checkpoints.ResumeCheckpoint(store, every=DEFAULT_EVERY_S)] if with_checkpoints else []
            model.fit(data, epochs=epoch[0] + 1, initial_epoch=epoch[0], callbacks=callbacks, verbose=0)
            epoch[0] += 1
            return batch_size * steps
        return run

    rates = common.interleaved({"with": fit(True), "without": fit(False)}, warmup=1, repeats=repeats)
    writes = []
    for _ in range(3):  # one checkpoint's write, alone
        start = time.perf_counter()
        path = store.write(checkpoints.state_variables(model), epoch=0, batch=0, history={})
        store.wait()  # the write runs on a thread: its whole time
        writes.append(time.perf_counter() - start)
    size = os.path.getsize(path)
    store.clear()
    write_s = sorted(writes)[1]
    common.report(
        f"checkpoint_cost_{result}", ours=rates["with"], reference=rates["without"], mode=mode, bar=0.97,
        unit="examples/s",
        config={"model": result, "batch_size": batch_size, "steps_per_epoch": steps, "repeats": repeats,
                "checkpoint_every_s": DEFAULT_EVERY_S},
        write_seconds=write_s, checkpoint_bytes=size,
        details=f"one checkpoint: {size / 2**20:.1f} MiB written and synced in {write_s:.2f} s, "
                f"{100 * write_s / DEFAULT_EVERY_S:.2f}% of a minute (the default's cost); measured here with one "
                f"each epoch of {steps} batches",
        ours_label="model.fit with checkpoints.ResumeCheckpoint (a checkpoint at every epoch end)",
        reference_label="the same fit without it",
    )


def main(argv=None):
    args = common.parse_args(__doc__, argv)
    mode = "quick" if args.quick else "full"
    for row in QUICK if args.quick else FULL:
        measure(*row, mode=mode)


if __name__ == "__main__":
    main()
