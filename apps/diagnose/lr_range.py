"""Learning-rate range test (Smith, 2017, "Cyclical Learning Rates for
Training Neural Networks"): the seed's "start with a relatively large value,
observe if training diverges, decrease until it converges", done in one short
run.

The rate grows exponentially from `min_lr` to `max_lr` over a few hundred
steps of ordinary training while the loss is recorded; the sweep stops when
the loss (a moving average) has grown to 4x its lowest. Too low a rate leaves
the loss flat; a good one makes it fall fastest; too high a one makes it
blow up. The suggestion is a tenth of the rate where the smoothed loss was
lowest: the lowest point sits just short of divergence, and a tenth of it
is still on the steep, stable part of the curve.
"""

import dataclasses
import math

import numpy as np

SMOOTHING = 0.9  # exponential moving average of the loss (debiased)
DIVERGED = 4.0  # stop when the smoothed loss exceeds 4x its lowest value
SUGGESTION_FRACTION = 0.1


@dataclasses.dataclass
class RangeResult:
    lrs: list
    losses: list
    smoothed: list  # centered moving average (see smooth_centered)
    min_loss_lr: float  # where the smoothed loss was lowest
    steepest_lr: float  # where it fell fastest per decade of rate
    suggestion: float
    stopped: str  # why the sweep ended

    def to_json(self):
        return dataclasses.asdict(self)


def rates(min_lr, max_lr, steps):
    """`steps` rates from `min_lr` to `max_lr`, evenly spaced in log scale."""
    return [min_lr * (max_lr / min_lr) ** (i / (steps - 1)) for i in range(steps)]


def smooth(losses, beta=SMOOTHING):
    """Debiased exponential moving average, as Adam debiases its moments; it
    lags, so it only decides when to stop the sweep."""
    average, out = 0.0, []
    for index, value in enumerate(losses, start=1):
        average = beta * average + (1 - beta) * value
        out.append(average / (1 - beta**index))
    return out


def smooth_centered(losses, lrs):
    """Moving average over about a quarter of a decade of rates on each side:
    no lag, so the lowest point sits at the rate that caused it."""
    values = np.asarray(losses, dtype="float64")
    if len(values) < 3:
        return values.tolist()
    per_decade = (len(lrs) - 1) / max(math.log10(lrs[-1] / lrs[0]), 1e-12)
    half = max(1, round(per_decade / 4))
    out = []
    for index in range(len(values)):
        window = values[max(0, index - half): index + half + 1]
        window = window[np.isfinite(window)]
        out.append(float(window.mean()) if window.size else math.nan)
    return out


def suggest(lrs, smoothed):
    """(suggestion, lr at the lowest smoothed loss, lr of the steepest fall)."""
    finite = [i for i, v in enumerate(smoothed) if math.isfinite(v)]
    lowest = min(finite, key=lambda i: smoothed[i])
    steepest = lrs[lowest]
    if lowest >= 2:
        # Slope per decade of rate up to the lowest point; the most negative wins.
        logs = np.log10(lrs[: lowest + 1])
        slopes = np.gradient(np.asarray(smoothed[: lowest + 1]), logs)
        steepest = lrs[int(np.argmin(slopes))]
    return lrs[lowest] * SUGGESTION_FRACTION, lrs[lowest], steepest


def lr_range(setup, *, optimizer="adam", min_lr=1e-7, max_lr=10.0, steps=200, batch_size=32, clip_norm=None, seed=0,
             on_step=None):
    """Runs the range test on a fresh model of `setup`.

    Args:
        setup: a `diagnose_setup.Setup` or `LanguageModelSetup`.
        optimizer: an `optim.OPTIMIZERS` name other than lbfgs.
        min_lr, max_lr: the sweep's first and last rate.
        steps: training steps (batches) in the sweep.
        clip_norm: clip the global gradient norm, as the run to come will
            (None: off); clipping moves where the loss blows up.
        on_step: called as on_step(step, lr, loss) after every step.

    Returns:
        A `RangeResult`.
    """
    from dlsuite.apps.core import optim

    model = setup.build(seed)
    update = optim.make_optimizer(optim.OptimizerConfig(optimizer=optimizer, lr=min_lr, clip_norm=clip_norm), steps_per_epoch=1,
                                  epochs=1)
    model.compile(optimizer=update, loss=setup.loss())
    batches = iter(setup.batches("train", batch_size=batch_size, training=True, seed=seed).repeat())
    schedule = rates(min_lr, max_lr, steps)
    used, losses, stopped = [], [], f"reached --max-lr {max_lr:g}"
    for step, rate in enumerate(schedule, start=1):
        inputs, targets = next(batches)
        update.learning_rate = rate
        loss = float(model.train_on_batch(inputs, targets))
        used.append(rate)
        losses.append(loss)
        if on_step:
            on_step(step, rate, loss)
        if not math.isfinite(loss):
            stopped = f"the loss became {loss} at lr {rate:.3g}"
            break
        smoothed = smooth(losses)
        if step > 10 and smoothed[-1] > DIVERGED * min(smoothed):
            stopped = f"the loss diverged (over {DIVERGED:g}x its lowest) at lr {rate:.3g}"
            break
    smoothed = smooth_centered(losses, used) if len(used) > 1 else losses
    if not any(math.isfinite(v) for v in smoothed):
        from dlsuite.apps.core.errors import UsageError

        raise UsageError(f"the loss was not finite from the first step at --min-lr {min_lr:g}; lower --min-lr")
    suggestion, lowest, steepest = suggest(used, smoothed)
    return RangeResult(used, losses, smoothed, lowest, steepest, suggestion, stopped)


def plot(result, path, *, title):
    """Loss against learning rate (log scale), the suggestion marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dlsuite.apps.core import rundir

    figure, axis = plt.subplots(figsize=(7, 4))
    raw = [v if math.isfinite(v) else np.nan for v in result.losses]
    smoothed = [v if math.isfinite(v) else np.nan for v in result.smoothed]
    axis.plot(result.lrs, raw, color="tab:blue", alpha=0.3, label="loss per batch")
    axis.plot(result.lrs, smoothed, color="tab:blue", label="smoothed")
    axis.axvline(result.min_loss_lr, color="gray", linestyle=":", label=f"lowest loss {result.min_loss_lr:.2g}")
    axis.axvline(result.suggestion, color="tab:green", label=f"suggested {result.suggestion:.2g}")
    axis.set_xscale("log")
    finite = [v for v in smoothed if np.isfinite(v)]
    if finite:  # keep the blow-up from flattening the useful part
        axis.set_ylim(min(finite) * 0.9, max(finite[0], min(finite)) * 1.6)
    axis.set_xlabel("learning rate")
    axis.set_ylabel("training loss")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8)
    axis.set_title(title)
    figure.tight_layout()
    rundir.save_figure(figure, path)


def write_csv(result, path):
    """lr, loss, smoothed per step, atomically."""
    import csv
    import os
    import pathlib

    path = pathlib.Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "lr", "loss", "smoothed"])
        for step, row in enumerate(zip(result.lrs, result.losses, result.smoothed), start=1):
            writer.writerow([step, *row])
    os.replace(temporary, path)
