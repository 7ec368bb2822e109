"""The seed's first check of a new network: can it overfit a tiny training set?

"Ensure that we can overfit a small training set to acc = 100%": a model and
training setup that cannot memorize a few dozen images will not learn the
whole set either, and the way it fails points at the cause (the learning
rate, the initialization, too much regularization). `overfit` trains on one
fixed batch of `samples` images, checks the accuracy on that batch in
inference mode after every step, and stops at 100%.
"""

import dataclasses
import math

import numpy as np

# Relative weight change below which the weights "did not move".
STILL_WEIGHTS = 1e-6
# Gradient norm below which "no gradient reaches the weights".
NO_GRADIENT = 1e-8
# Share of steps whose loss rose by more than RISE for the loss to "oscillate".
OSCILLATING_SHARE = 0.3
RISE = 0.1
# The loss must fall by at least this share of its start to have "moved".
MOVED = 0.1


@dataclasses.dataclass
class OverfitResult:
    reached: bool
    steps: int  # steps run (the step that reached 100% when reached)
    samples: int
    loss: list  # per step, on the batch, in training mode
    accuracy: list  # per step, on the batch, in inference mode
    initial_gradient_norm: float
    weight_change: float  # |w_end - w_start| / |w_start| over all trainable weights
    causes: list  # likely causes when not reached

    def to_json(self):
        return dataclasses.asdict(self)


def _subset(setup, samples, seed):
    size = setup.data.sizes["train"]
    if samples > size:
        from dlsuite.apps.core.errors import UsageError

        raise UsageError(f"--samples {samples} is more than the {size} training images of {setup.data.name}; "
                         f"pass --samples {size} or less")
    images, labels = next(iter(setup.batches("train", batch_size=samples, training=True, seed=seed)))
    return np.asarray(images), np.asarray(labels)


def _norm(arrays):
    return math.sqrt(sum(float(np.sum(np.square(a, dtype="float64"))) for a in arrays))


def gradient_norm(model, images, labels):
    """Global norm of the loss gradient over the trainable weights, once."""
    import keras
    import tensorflow as tf

    loss = keras.losses.SparseCategoricalCrossentropy()
    with tf.GradientTape() as tape:
        value = loss(labels, model(images, training=True))
    gradients = tape.gradient(value, model.trainable_variables)
    return _norm([np.asarray(g) for g in gradients if g is not None])


def overfit(setup, *, samples=32, max_steps=300, optimizer="adam", lr=None, seed=0, on_step=None):
    """Trains a fresh model of `setup` on one batch of `samples` images until
    it classifies all of them right (inference mode) or `max_steps` pass.

    Args:
        setup: a `diagnose_setup.Setup`.
        optimizer: an `optim.OPTIMIZERS` name other than lbfgs.
        lr: learning rate; None takes the optimizer's default and 0 is
            allowed here, to show what a setup that cannot learn looks like.
        on_step: called as on_step(step, loss, accuracy) after every step.

    Returns:
        An `OverfitResult`.
    """
    import keras

    from dlsuite.apps.core import optim

    images, labels = _subset(setup, samples, seed)
    model = setup.build(seed)
    config = optim.OptimizerConfig(optimizer=optimizer, lr=lr or None)
    update = optim.make_optimizer(config, steps_per_epoch=1, epochs=max_steps)
    if lr == 0:
        update.learning_rate = 0.0
    model.compile(optimizer=update, loss=keras.losses.SparseCategoricalCrossentropy())
    start = [np.array(w) for w in model.trainable_weights]
    initial_gradient = gradient_norm(model, images, labels)

    losses, accuracies, reached = [], [], False
    for step in range(1, max_steps + 1):
        loss = float(model.train_on_batch(images, labels))
        accuracy = float(np.mean(np.argmax(model.predict_on_batch(images), axis=-1) == labels))
        losses.append(loss)
        accuracies.append(accuracy)
        if on_step:
            on_step(step, loss, accuracy)
        if accuracy == 1.0:
            reached = True
            break
        if not math.isfinite(loss):
            break
    change = _norm([np.array(w) - s for w, s in zip(model.trainable_weights, start)]) / max(_norm(start), 1e-12)
    causes = [] if reached else likely_causes(losses, weight_change=change, gradient=initial_gradient, lr=lr)
    return OverfitResult(reached, len(losses), samples, losses, accuracies, initial_gradient, change, causes)


def likely_causes(losses, *, weight_change, gradient, lr):
    """The seed's reading of a run that could not overfit, most likely first."""
    bad = [(step, value) for step, value in enumerate(losses, start=1) if not math.isfinite(value)]
    if bad:
        step, value = bad[0]
        return [f"the loss became {value} at step {step}: the learning rate is too high (the seed: 'loss goes to "
                "NaN: too high learning rate'); lower --lr by 10x or add --clip-norm"]
    causes = []
    if gradient < NO_GRADIENT:
        causes.append(f"no gradient reaches the weights (gradient norm {gradient:.1e} at the start): zero or tiny "
                      "initialization, or dead units; try --init he_normal (ReLU) or glorot_uniform (tanh, sigmoid)")
    if weight_change < STILL_WEIGHTS:
        rate = "is 0" if lr == 0 else "is far too low"
        causes.append(f"the weights did not move (relative change {weight_change:.1e}) although the gradient "
                      f"norm is {gradient:.2g}: the learning rate {rate} (the seed: 'loss not decreasing: too low "
                      "learning rate'); try --lr 0.001 with adam or 0.01 with sgd")
    if causes:
        return causes
    first, best, last = losses[0], min(losses), losses[-1]
    rises = sum(1 for a, b in zip(losses, losses[1:]) if b > a * (1 + RISE))
    if len(losses) > 2 and rises / (len(losses) - 1) > OSCILLATING_SHARE:
        return [f"the loss oscillates ({rises} of {len(losses) - 1} steps rose by over {RISE:.0%}, "
                f"{first:.3g} -> {last:.3g}): the learning rate is too high; lower --lr by 3-10x"]
    if first - best < MOVED * first:
        return [f"the loss barely moved ({first:.3g} -> best {best:.3g}): the learning rate is too low, or the "
                "gradients vanish on the way down (try --batch-norm, ReLU with --init he_normal); raise --lr by 10x"]
    return [f"the loss fell ({first:.3g} -> {last:.3g}) but not far enough in {len(losses)} steps: give it more "
            "--max-steps or a higher --lr; if it still stalls, the model is too small or too regularized for "
            "the task (lower --dropout, --l2), or the labels are noisy"]


def plot(result, path, *, title):
    """Loss (log scale) and accuracy on the tiny set, per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dlsuite.apps.core import rundir

    steps = np.arange(1, len(result.loss) + 1)
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    finite = [v if math.isfinite(v) and v > 0 else np.nan for v in result.loss]
    left.plot(steps, finite)
    left.set_yscale("log")
    left.set_xlabel("step")
    left.set_ylabel("training loss")
    left.grid(alpha=0.3)
    right.plot(steps, result.accuracy, color="tab:green")
    right.axhline(1.0, color="gray", linestyle=":")
    right.set_ylim(0, 1.05)
    right.set_xlabel("step")
    right.set_ylabel(f"accuracy on the {result.samples} images")
    right.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    rundir.save_figure(figure, path)
