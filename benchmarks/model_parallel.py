"""Model parallelism: a pipeline of 2 stages against the same model on one device.

    python -m benchmarks.model_parallel            # ResNet-18, 64x64x3, 10 classes, batch 32, momentum
    python -m benchmarks.model_parallel --quick    # LeNet-5, 32x32x1, 10 classes, batch 8

Result `model_parallel_<model>_2stages`, in training images/s:

* ours: `models.parallel.Pipeline` of the model over 2 logical CPU devices
  (`parallel.devices(2)`, as `dlsuite classify train --model-parallel 2`
  on a machine without 2 GPUs): each stage's variables on its device, the
  step forward stage by stage and backprop stage by stage;
* reference: the same model, same weights, on one device, `train_on_batch`.

Both sides train on the same random batches, alternating repeat by repeat.
The logical devices share this machine's cores, so the ratio is the
pipeline's overhead (the copies between devices, a gradient call per
stage), not a speed-up: the naive pipeline runs one stage at a time and
buys memory per device. The row's details give that memory, the plan of
`dlsuite models show MODEL --model-parallel 2`, per device and on one.
"""

import numpy as np

from benchmarks import common

MIB = 2**20
STAGES = 2
OPTIMIZER = "momentum"
# (registry name, input shape, classes, batch size, steps per repeat, repeats) per mode.
FULL = ("resnet18", (64, 64, 3), 10, 32, 4, 5)
QUICK = ("lenet5", (32, 32, 1), 10, 8, 2, 5)


def main(argv=None):
    args = common.parse_args(__doc__, argv)
    mode = "quick" if args.quick else "full"
    name, input_shape, classes, batch_size, steps, repeats = QUICK if args.quick else FULL

    from dlsuite.models import parallel  # before TensorFlow starts: it makes the logical devices

    devices = parallel.devices(STAGES)
    import keras

    from dlsuite import models

    keras.utils.set_random_seed(0)
    plain = models.build(name, input_shape=input_shape, classes=classes)
    planned = parallel.plan(plain, STAGES, batch_size=batch_size, optimizer=OPTIMIZER)
    piped = parallel.Pipeline(plain, planned, devices)
    single = keras.models.clone_model(plain)
    single.set_weights(plain.get_weights())
    for model in (piped, single):
        model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (batch_size, *input_shape)).astype("float32")
    labels = rng.integers(0, classes, batch_size)

    def train(model):
        def run():
            for _ in range(steps):
                loss = model.train_on_batch(images, labels)
            float(np.asarray(loss))
            return steps * batch_size
        return run

    rates = common.interleaved({"pipeline": train(piped), "one device": train(single)}, warmup=1, repeats=repeats)
    described = planned.describe()
    stages = [{"device": device, "first": stage["first"], "last": stage["last"], "params": stage["params"],
               "peak_mib": stage["memory"]["total"] / MIB} for device, stage in zip(devices, described["stages"])]
    shape = ",".join(map(str, input_shape))
    common.report(
        f"model_parallel_{name}_{STAGES}stages", ours=rates["pipeline"], reference=rates["one device"], mode=mode,
        config={"model": name, "input_shape": list(input_shape), "classes": classes, "batch_size": batch_size,
                "optimizer": OPTIMIZER, "stages": STAGES, "devices": devices, "steps_per_repeat": steps,
                "repeats": repeats},
        stages=stages, single_device_mib=described["single_device"] / MIB,
        details="; ".join(f"{stage['device']}: {stage['first']} .. {stage['last']}, {stage['params']:,} params, "
                          f"{stage['peak_mib']:.1f} MiB" for stage in stages)
        + f"; one device {described['single_device'] / MIB:.1f} MiB (estimates at batch {batch_size}, {OPTIMIZER})",
        ours_label=f"pipeline of {STAGES} stages on {STAGES} logical CPU devices (models.parallel.Pipeline; "
                   f"`dlsuite models show {name} --input-shape {shape} --model-parallel {STAGES}` shows the split)",
        reference_label="the same model and weights on one device",
    )


if __name__ == "__main__":
    main()
