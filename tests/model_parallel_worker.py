"""The device half of tests/test_model_parallel.py, in a process of its own.

Logical CPU devices can be made only before TensorFlow starts, once per
process, so the checks that need two devices run here: `python
tests/model_parallel_worker.py` prints one JSON object of figures that the
test asserts on.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def gradients(model, x, y, loss):
    import tensorflow as tf

    with tf.GradientTape() as tape:
        value = loss(y, model(x, training=True)) + sum(model.losses)
    return value, tape.gradient(value, model.trainable_weights)


def compare(name, *, input_shape, devices, **kwargs):
    """Output, loss, one SGD step's gradients and the variables' devices, pipeline against plain."""
    import keras
    import numpy as np

    from dlsuite import models
    from dlsuite.models import parallel

    keras.utils.set_random_seed(0)
    plain = models.build(name, input_shape=input_shape, classes=5, **kwargs)
    piped = parallel.pipeline(plain, len(devices), device_names=devices)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (4, *input_shape)).astype("float32")
    y = np.arange(4) % 5
    loss = keras.losses.SparseCategoricalCrossentropy()
    output = piped(x, training=False).numpy()
    output_difference = float(np.abs(output - plain(x, training=False).numpy()).max())
    reference_loss, reference = gradients(plain, x, y, loss)
    # One step of plain SGD at rate 1 moves each weight by its gradient.
    piped.compile(optimizer=keras.optimizers.SGD(1.0), loss=loss)
    before = {weight.path: weight.numpy() for stage in piped.stages for weight in stage.trainable_weights}
    piped_loss = piped.train_on_batch(x, y)
    moved = {path: value - weight.numpy() for stage in piped.stages for weight in stage.trainable_weights
             for path, value in [(weight.path, before[weight.path])]}
    by_path = {weight.path: grad.numpy() for weight, grad in zip(plain.trainable_weights, reference)}
    slots = keras.optimizers.Adam()
    slots.build(piped.trainable_weights)
    return {
        "output_difference": output_difference,
        "output_scale": float(np.abs(output).max()),
        "loss": [float(reference_loss), float(piped_loss)],
        "gradient_difference": max(float(np.abs(moved[path] - by_path[path]).max()) for path in by_path),
        "gradient_scale": max(float(np.abs(grad).max()) for grad in by_path.values()),
        "same_weights": sorted(by_path) == sorted(moved),
        "stages": [{"device": device, "variables": sorted({weight.value.device for weight in stage.weights}),
                    "count": len(stage.weights)} for device, stage in zip(piped.devices, piped.stages)],
        # Adam's two moments per weight: how many on each device, against the weights there.
        "slots": {device: [sum(weight.value.device == device for weight in piped.trainable_weights),
                           sum(slot.value.device == device for slot in slots.variables)]
                  for device in sorted({slot.value.device for slot in slots.variables})},
    }


def main():
    from dlsuite.models import parallel

    devices = parallel.devices(3)  # first, before TensorFlow starts
    results = {
        "devices": devices,
        "lenet5": compare("lenet5", input_shape=(32, 32, 1), devices=devices[:2], l2=1e-3),
        "resnet18": compare("resnet18", input_shape=(32, 32, 3), devices=devices),
    }
    try:
        parallel.devices(4)
    except ValueError as error:
        results["too_many"] = str(error)
    print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
