"""One process of the multi-worker test in `test_distribute.py`.

Run as `python multiworker_worker.py --strategy multi-worker --out w0.npz` with
TF_CONFIG set (one process per worker), with `--strategy default` for the
single-process reference, or with `--strategy two-cpu-mirrored` for a
MirroredStrategy over two logical CPUs (two replicas in one process). Every process builds the same model from the same
seed and trains it on the same deterministic data, so the final weights of
the workers and of the reference must agree.

The model has an L2 regularizer and the optimizer a momentum and a global clip
norm that the data's gradients exceed, so the comparison also checks that
regularization is not counted once per replica and that clipping sees the
gradient summed over replicas.
"""

import argparse
import json
import os
import sys

# Sizes chosen so that the last batch is partial (244 = 7 * 32 + 20): it is
# split over the workers and must weigh as on one device.
SEED = 1234
TRAIN_EXAMPLES = 244
VALIDATION_EXAMPLES = 64
FEATURES = 8
CLASSES = 3
GLOBAL_BATCH_SIZE = 32


def synthetic_data(num_examples, offset):
    """Linearly separable 3-class data: the same arrays in every process."""
    import numpy as np

    rng = np.random.RandomState(SEED)
    centers = rng.normal(size=(CLASSES, FEATURES)).astype("float32") * 3
    rng = np.random.RandomState(SEED + offset)
    y = rng.randint(0, CLASSES, size=num_examples).astype("int32")
    x = centers[y] + rng.normal(size=(num_examples, FEATURES)).astype("float32")
    return x, y


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)

    from dlsuite.apps.core.distribute import is_chief, make_strategy, needs_custom_loop, worker_dir
    from dlsuite.apps.core.multi_worker import train_custom_loop

    import keras
    import numpy as np
    import tensorflow as tf

    if args.strategy == "two-cpu-mirrored":
        # Devices can be split only before TensorFlow starts.
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    else:
        # First, before any other TensorFlow op (MultiWorkerMirroredStrategy).
        strategy = make_strategy(args.strategy)

    keras.utils.set_random_seed(SEED)
    x, y = synthetic_data(TRAIN_EXAMPLES, offset=1)
    x_val, y_val = synthetic_data(VALIDATION_EXAMPLES, offset=2)
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH_SIZE)
    validation = tf.data.Dataset.from_tensor_slices((x_val, y_val)).batch(GLOBAL_BATCH_SIZE)
    with strategy.scope():
        model = keras.Sequential(
            [
                keras.Input((FEATURES,)),
                keras.layers.Dense(16, activation="relu", kernel_regularizer=keras.regularizers.L2(1e-2), name="hidden"),
                keras.layers.Dense(CLASSES, name="logits"),
            ]
        )
        optimizer = keras.optimizers.SGD(learning_rate=0.1, momentum=0.9, global_clipnorm=0.5)
    history = train_custom_loop(
        strategy=strategy,
        model=model,
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        train_dataset=train,
        validation_dataset=validation,
        epochs=args.epochs,
        global_batch_size=GLOBAL_BATCH_SIZE,
        verbose=False,
    )
    np.savez(
        args.out,
        *model.get_weights(),
        history=json.dumps(history),
        replicas=strategy.num_replicas_in_sync,
        chief=is_chief(strategy),
        custom_loop=needs_custom_loop(strategy),
        run_dir=worker_dir(os.path.join(os.path.dirname(os.path.abspath(args.out)), "run"), strategy),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
