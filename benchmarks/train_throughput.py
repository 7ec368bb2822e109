"""Training throughput: registry ResNet-50 and VGG-16 against keras.applications.

Both sides get the same input size, batch, classes, optimizer (SGD with
momentum 0.9) and synthetic in-memory tensors, and train with
`model.train_on_batch`, the step `model.fit` runs. Figures are images per
second after warm-up; the bar is ours / Keras >= 0.97.

Each result also gives the model FLOP/s utilisation: training FLOPs per second
(3 x the forward FLOPs of `dlsuite.models.summary.flops`, per image, times
images/s) over the FLOP/s of a large float32 matmul measured in the same run.

Full size is ImageNet's: 224x224, batch 32, 1000 classes. On a 2-core CPU a
ResNet-50 step takes about 11 s and a VGG-16 step about 25 s, so each repeat is
one step: 1 warm-up step (it traces the step; the next one already runs at
full speed), then 5 timed repeats per model.

    python -m benchmarks.train_throughput [--quick]
"""

import dataclasses
import gc
import statistics

import keras
import tensorflow as tf

from benchmarks import common
from dlsuite import models
from dlsuite.models import summary

BAR = 0.97
LEARNING_RATE = 0.01
MOMENTUM = 0.9
# Forward, then backward for the activations' and for the weights' gradients:
# each costs about as much as the forward pass.
TRAINING_FLOPS_PER_FORWARD = 3


@dataclasses.dataclass(frozen=True)
class Setting:
    image_size: int
    batch_size: int
    classes: int
    warmup_repeats: int  # untimed repeats first; the first traces the step
    repeats: int
    steps_per_repeat: int


FULL = Setting(image_size=224, batch_size=32, classes=1000, warmup_repeats=1, repeats=5, steps_per_repeat=1)
# --quick checks that the row comes out: its first timed repeat may trace the step.
QUICK = Setting(image_size=32, batch_size=2, classes=10, warmup_repeats=0, repeats=5, steps_per_repeat=1)
MATMUL_SIZE = {"full": 2048, "quick": 512}  # --quick's peak only has to come out: 512 takes milliseconds
QUICK_MODELS = ("vgg16",)

# Registry name -> the keras.applications builder it is measured against.
REFERENCES = {
    "resnet50": keras.applications.ResNet50,
    "vgg16": keras.applications.VGG16,
}


def _compile(model):
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=LEARNING_RATE, momentum=MOMENTUM),
        loss=keras.losses.SparseCategoricalCrossentropy(),
    )
    return model


def _trainer(model, setting):
    """One repeat: `steps_per_repeat` training steps on fixed synthetic tensors."""
    shape = (setting.batch_size, setting.image_size, setting.image_size, 3)
    # The values do not change the cost of a step; only the shapes do.
    images = tf.random.stateless_uniform(shape, seed=(0, 1))
    labels = tf.random.stateless_uniform((setting.batch_size,), seed=(0, 2), maxval=setting.classes,
                                         dtype=tf.int32)

    def run():
        for _ in range(setting.steps_per_repeat):
            model.train_on_batch(images, labels)  # returns the loss as a number: the step is done
        return setting.steps_per_repeat * setting.batch_size

    return run


def _utilisation(forward_flops, images_per_second, peak):
    return TRAINING_FLOPS_PER_FORWARD * forward_flops * images_per_second / peak


def measure(name, setting, *, mode, matmul):
    """Trains registry `name` and its Keras reference, interleaved; reports the result.

    `matmul` holds the matmul FLOP/s measured so far in the run; this adds
    samples taken after the training, and the peak is the best of them all.
    """
    input_shape = (setting.image_size, setting.image_size, 3)
    keras.utils.set_random_seed(0)
    ours = _compile(models.build(name, input_shape=input_shape, classes=setting.classes, weights=None))
    reference = _compile(REFERENCES[name](weights=None, input_shape=input_shape, classes=setting.classes))
    if mode == "quick":
        common.build_optimizers(ours, reference)
    rates = common.interleaved(
        {"ours": _trainer(ours, setting), "reference": _trainer(reference, setting)},
        warmup=setting.warmup_repeats,
        repeats=setting.repeats,
    )
    matmul += common.matmul_rates(n=MATMUL_SIZE[mode])
    peak = max(matmul)
    flops = {"ours": summary.flops(ours), "reference": summary.flops(reference)}
    medians = {side: statistics.median(samples) for side, samples in rates.items()}
    utilisation = {side: _utilisation(flops[side], medians[side], peak) for side in rates}
    result = common.report(
        f"train_{name}",
        ours=rates["ours"],
        reference=rates["reference"],
        mode=mode,
        bar=BAR,
        config={
            **dataclasses.asdict(setting),
            "model": name,
            "optimizer": f"SGD(learning_rate={LEARNING_RATE}, momentum={MOMENTUM})",
            "step": "model.train_on_batch on synthetic in-memory tensors",
            "jit_compile": {"ours": ours.jit_compile, "reference": reference.jit_compile},
            "layers": {"ours": len(ours.layers), "reference": len(reference.layers)},
        },
        ours_label=f"dlsuite models.build({name!r}) (registry defaults)",
        reference_label=f"keras.applications.{REFERENCES[name].__name__}(weights=None)",
        forward_gflops_per_image={side: value / 1e9 for side, value in flops.items()},
        matmul_peak_gflops=peak / 1e9,
        matmul_samples=len(matmul),
        utilisation=utilisation,
        details=(
            f"FLOP/s utilisation: ours {utilisation['ours']:.0%}, Keras {utilisation['reference']:.0%} "
            f"of a {peak / 1e9:.0f} GFLOP/s float32 matmul peak (best of {len(matmul)} in the run)"
        ),
    )
    del ours, reference
    keras.backend.clear_session()
    gc.collect()
    return result


def main(argv=None):
    args = common.parse_args(__doc__.splitlines()[0], argv)
    mode = "quick" if args.quick else "full"
    setting = QUICK if args.quick else FULL
    matmul = common.matmul_rates(n=MATMUL_SIZE[mode])
    # --quick checks the code path, which is the same for both models: one is enough, and VGG-16
    # (16 layers) builds and traces in 14 s where ResNet-50 (177) took 55 (2 shared cores).
    for name in QUICK_MODELS if args.quick else REFERENCES:
        measure(name, setting, mode=mode, matmul=matmul)


if __name__ == "__main__":
    main()
