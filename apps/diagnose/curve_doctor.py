"""The curve doctor: reads a run's history and names what it sees, with the
evidence (epochs, values) and the seed's remedies ("Network Tuning"):

* NaN: the loss became NaN or infinite -> the learning rate is too high;
* divergence: the loss exploded without becoming NaN (far above an untrained
  model's loss), or rose epoch after epoch, or the run's NaN guard stopped it
  for that -> the learning rate is too high (issue #15: `classify train
  --optimizer sgd --lr 1e6` ended at a loss of 6e6, which this used to call
  underfitting);
* flat: the training loss does not move -> the learning rate is too low;
* oscillation: the loss goes up and down from epoch to epoch -> too high;
* overfitting: validation loss rising while training loss falls -> more
  dropout, regularization, fewer layers, early stopping;
* underfitting: training loss stays high (and close to validation) -> more
  layers, less regularization, lower the learning rate, train longer.

Every detector reads the per-epoch `history` dict ({metric: [values]}), so
synthetic histories test them as well as real runs; divergence also reads
what the run directory says (`read_context`: how the run stopped, and an
untrained model's loss, ln(classes), from config.json).
"""

import dataclasses
import json
import math
import pathlib

from dlsuite.callbacks import nan_guard

# Thresholds, in relative terms so they hold for any loss scale.
FLAT_CHANGE = 0.02  # the training loss moved by less than 2% over the run
OVERFIT_RISE = 0.10  # validation loss ends 10% above its minimum ...
OVERFIT_TRAIN_FALL = 0.10  # ... while training loss fell 10% more after that minimum;
OVERFIT_STEADY_RISE = 0.02  # or it ends 2% above, rising in 60% of at least 5 epochs since
OVERFIT_STEADY_SHARE = 0.6
OVERFIT_STEADY_EPOCHS = 5
OSCILLATION_SHARE = 0.4  # the direction changes at 40% of the epochs or more ...
OSCILLATION_SIZE = 0.05  # ... counting moves of over 5% of the loss (15% for validation)
UNDERFIT_ACCURACY = 0.9  # training accuracy below this at the end ...
UNDERFIT_LOSS_FALL = 0.5  # ... or (without accuracy) the loss fell by less than half
UNDERFIT_GAP = 0.2  # and validation loss within 20% of training loss
PATIENCE = 3  # the --early-stopping the overfitting remedy suggests
STILL_FALLING = 0.02  # a loss still falling 2% per epoch at the end "has not converged"


@dataclasses.dataclass
class Finding:
    name: str  # "nan", "divergence", "flat", "oscillation", "overfitting", "underfitting", "healthy"
    summary: str
    evidence: str
    remedies: list

    def to_json(self):
        return dataclasses.asdict(self)


def _finite(values):
    return [v for v in values if math.isfinite(v)]


def _epoch(index):
    return index + 1  # histories are 0-based lists, people count epochs from 1


def find_nan(history):
    for metric in ("loss", "val_loss"):
        values = history.get(metric, [])
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            first = bad[0]
            before = (f"; it was {values[first - 1]:.4g} at epoch {_epoch(first - 1)}" if first > 0
                      and math.isfinite(values[first - 1]) else "")
            return Finding(
                "nan", "the loss became NaN: the learning rate is too high",
                f"{metric} is {values[first]} at epoch {_epoch(first)}{before}",
                ["lower the learning rate by 10x (--lr); the seed: 'loss goes to NaN: too high learning rate'",
                 "clip the gradient norm (--clip-norm 5), the fix for exploding gradients",
                 "check the input for NaN or infinite values and the loss for log(0)"],
            )
    return None


DIVERGENCE_REMEDIES = [
    "lower the learning rate by 10x (--lr), or find one with `dlsuite diagnose lr-range`; the seed: 'observe if "
    "the training process diverges (i.e., training loss increases), and decrease the rate until convergence'",
    "clip the gradient norm (--clip-norm 5), the fix for exploding gradients",
    "warm the rate up (--warmup-epochs 2) when a large rate or batch is what you want",
]


def find_divergence(history, *, stopped=None, untrained_loss=None):
    """The loss diverged: the run's guard stopped it for that (`stopped`,
    metrics.json of a stopped run), the last epoch's loss is past
    `nan_guard.EXPLOSION_FACTOR` times an untrained model's (`untrained_loss`),
    or any epoch's past that many times the first epoch's, or it rose `nan_guard.GROWTH_EPOCHS` epochs in a
    row to twice where it began. The same thresholds as the guard's."""
    summary = "the loss diverged: the learning rate is too high"
    if stopped and nan_guard.stop_cause(stopped.get("reason")) == "divergence":
        reason = stopped["reason"].split("; the learning rate")[0]
        return Finding("divergence", summary, f"training stopped: {reason}", DIVERGENCE_REMEDIES)
    losses = history.get("loss", [])
    if not losses or not all(math.isfinite(v) for v in losses):
        return None  # NaN is its own finding
    reference = untrained_loss if untrained_loss else losses[0]
    where = "an untrained model's" if untrained_loss else "the first epoch's"
    # Against ln(classes), the loss must still be up at the end: a large
    # weight penalty (--l2 on a big model) starts high too, but falls.
    peak = len(losses) - 1 if untrained_loss else max(range(len(losses)), key=lambda i: losses[i])
    if nan_guard.explosion(losses[peak], reference):
        return Finding("divergence", summary,
                       f"loss {losses[peak]:.4g} at epoch {_epoch(peak)}, "
                       f"{losses[peak] / max(reference, nan_guard.LOSS_FLOOR):,.0f} times {where} "
                       f"({reference:.4g})" + (f"; it ended at {losses[-1]:.4g}" if peak < len(losses) - 1 else ""),
                       DIVERGENCE_REMEDIES)
    for end in range(nan_guard.GROWTH_EPOCHS + 1, len(losses) + 1):
        if evidence := nan_guard.growth(losses[:end], reference):
            return Finding("divergence", summary, f"{evidence}, by epoch {end}", DIVERGENCE_REMEDIES)
    return None


def find_flat(history):
    losses = _finite(history.get("loss", []))
    if len(losses) < 3:
        return None
    change = abs(losses[-1] - losses[0]) / max(abs(losses[0]), 1e-12)
    if change >= FLAT_CHANGE:
        return None
    return Finding(
        "flat", "the training loss is flat: the learning rate is too low (or no gradient gets through)",
        f"loss {losses[0]:.4g} at epoch 1 and {losses[-1]:.4g} at epoch {len(losses)} "
        f"({change:.1%} change over {len(losses)} epochs)",
        ["raise the learning rate by 10x (--lr), or find one with `dlsuite diagnose lr-range`; the seed: "
         "'loss not decreasing: too low learning rate'",
         "check the initialization (`dlsuite diagnose init`): zeros or tiny weights stop the gradient",
         "for vanishing gradients: batch normalization (--batch-norm), ReLU with --init he_normal, fewer layers"],
    )


def _swings(values, size):
    """Signs of the epoch-to-epoch moves larger than `size` (relative), in order."""
    return [
        (1 if b > a else -1, i)
        for i, (a, b) in enumerate(zip(values, values[1:]), start=1)
        if abs(b - a) > size * max(abs(a), 1e-12)
    ]


def find_oscillation(history):
    # The validation loss of a small validation set jitters more: it must
    # swing harder to count.
    for metric, size in (("loss", OSCILLATION_SIZE), ("val_loss", 3 * OSCILLATION_SIZE)):
        values = _finite(history.get(metric, []))
        if len(values) < 5:
            continue
        moves = len(values) - 1
        swings = _swings(values, size)
        # Direction changes between consecutive large moves: a loss that
        # falls then rises (overfitting) changes once; an oscillating one
        # changes at almost every epoch.
        turns = [i for (a, _), (b, i) in zip(swings, swings[1:]) if a != b]
        if len(turns) < max(3, OSCILLATION_SHARE * moves):
            continue
        largest = max(abs(b - a) / max(abs(a), 1e-12) for a, b in zip(values, values[1:]))
        ups = sum(1 for sign, _ in swings if sign > 0)
        return Finding(
            "oscillation", f"{metric} oscillates from epoch to epoch: the learning rate is too high",
            f"{metric} changed direction {len(turns)} times in {moves} epochs (at epochs "
            f"{', '.join(str(i) for i in turns[:8])}{', ...' if len(turns) > 8 else ''}), rising in {ups} "
            f"epochs, by up to {largest:.0%}; it went {values[0]:.4g} -> {values[-1]:.4g}",
            ["lower the learning rate by 3-10x (--lr)",
             "decay it as training goes (--lr-schedule step or plateau)",
             "a larger batch (--batch-size) smooths the gradient, the seed's 'bigger mini-batch gives smoother "
             "gradient update'"],
        )
    return None


def find_overfitting(history):
    losses, validation = history.get("loss", []), history.get("val_loss", [])
    n = min(len(losses), len(validation))
    if n < 3 or not all(math.isfinite(v) for v in losses[:n] + validation[:n]):
        return None
    best = min(range(n), key=lambda i: validation[i])
    last = n - 1
    rise = (validation[last] - validation[best]) / max(abs(validation[best]), 1e-12)
    fall = (losses[best] - losses[last]) / max(abs(losses[best]), 1e-12)
    after = list(zip(validation[best:n], validation[best + 1:n]))
    rising_epochs = sum(1 for a, b in after if b > a)
    # A sharp rise, or a slow one that goes on: most epochs since the best
    # one raised the validation loss (memorizing the training set).
    steady = (last - best >= OVERFIT_STEADY_EPOCHS and rise >= OVERFIT_STEADY_RISE
              and rising_epochs >= OVERFIT_STEADY_SHARE * len(after))
    if best == last or fall < OVERFIT_TRAIN_FALL or not (rise >= OVERFIT_RISE or steady):
        return None
    gap_then, gap_now = validation[best] - losses[best], validation[last] - losses[last]
    accuracy = ""
    if "accuracy" in history and "val_accuracy" in history and len(history["val_accuracy"]) >= n:
        accuracy = (f"; accuracy {history['accuracy'][last]:.3f} on training against "
                    f"{history['val_accuracy'][last]:.3f} on validation")
    return Finding(
        "overfitting", "validation loss rising while training loss falls",
        f"val_loss fell to {validation[best]:.4g} at epoch {_epoch(best)}, then rose to {validation[last]:.4g} "
        f"by epoch {_epoch(last)} (+{rise:.0%}), while loss fell from {losses[best]:.4g} to {losses[last]:.4g}; "
        f"the gap grew from {gap_then:.3g} to {gap_now:.3g}{accuracy}",
        [_early_stopping_remedy(best, n),
         "more dropout (--dropout 0.5)",
         "more regularization (--l2 1e-4, --l1, --max-norm 3)",
         "fewer layers or a smaller model; more data or augmentation (--augment)",
         "look at the weights' distribution for extreme values"],
    )


def _early_stopping_remedy(best, epochs):
    """Early stopping's advice for a run whose lowest val_loss is at index
    `best` of `epochs`. Keras stops `PATIENCE` epochs after the best one; a
    run that ended by then would not have stopped sooner (issue #27: a
    30-epoch run "would have stopped at epoch 31")."""
    stop = _epoch(best) + PATIENCE
    if stop < epochs:
        return (f"early stopping (--early-stopping {PATIENCE} would have stopped at epoch {stop} of {epochs}; "
                f"the best checkpoint is from epoch {_epoch(best)})")
    return (f"keep the best checkpoint, from epoch {_epoch(best)} (--early-stopping {PATIENCE} would not have "
            f"ended this run sooner: it ended {epochs - _epoch(best)} epoch(s) after its best)")


def find_underfitting(history):
    losses = _finite(history.get("loss", []))
    if len(losses) < 2:
        return None
    accuracy = history.get("accuracy", [])
    if accuracy:
        high = accuracy[-1] < UNDERFIT_ACCURACY
        level = f"training accuracy {accuracy[-1]:.3f} at the end"
    else:
        high = losses[-1] > UNDERFIT_LOSS_FALL * losses[0]
        level = f"loss {losses[0]:.4g} -> {losses[-1]:.4g}"
    validation = _finite(history.get("val_loss", []))
    close = not validation or validation[-1] <= losses[-1] * (1 + UNDERFIT_GAP)
    if not (high and close):
        return None
    recent = losses[-4:]
    per_epoch = (recent[0] - recent[-1]) / max(abs(recent[0]), 1e-12) / max(1, len(recent) - 1)
    still = (f"; the loss still fell {per_epoch:.0%} per epoch over the last {len(recent) - 1} epochs"
             if per_epoch > STILL_FALLING else "")
    gap = f", validation loss {validation[-1]:.4g} against training {losses[-1]:.4g}" if validation else ""
    remedies = ["a larger model (more layers or units)", "less regularization (lower --dropout, --l2)",
                "lower the learning rate once the loss stalls (--lr-schedule plateau)"]
    if still:
        remedies.insert(0, "train longer (--epochs): it had not converged")
    return Finding("underfitting", "the model does not fit even the training data",
                   f"{level}{gap}{still}", remedies)


DETECTORS = (find_nan, find_divergence, find_flat, find_oscillation, find_overfitting, find_underfitting)


def diagnose(history, *, stopped=None, untrained_loss=None):
    """Every finding for `history` ({metric: [per-epoch values]}), most
    urgent first; a single "healthy" finding when nothing is wrong.

    Args:
        stopped: a stopped run's metrics.json ({"status": "stopped",
            "reason": ...}), or None.
        untrained_loss: an untrained model's loss (ln(classes) for a
            cross-entropy), or None; see `read_context`.
    """
    findings = [finding for detect in DETECTORS if (finding := (
        detect(history, stopped=stopped, untrained_loss=untrained_loss) if detect is find_divergence
        else detect(history)))]
    if any(f.name in ("nan", "divergence", "flat", "oscillation") for f in findings):
        # The learning rate explains the high loss; "a bigger model" would mislead.
        findings = [f for f in findings if f.name != "underfitting"]
    if findings:
        return findings
    losses, validation = history.get("loss", []), history.get("val_loss", [])
    evidence = f"loss {losses[0]:.4g} -> {losses[-1]:.4g}"
    if validation:
        evidence += f", val_loss {validation[0]:.4g} -> {validation[-1]:.4g} (lowest {min(validation):.4g})"
    return [Finding("healthy", "no problem seen: training and validation loss fell together", evidence, [])]


def read_run(path):
    """(history, label, run_dir) from a run directory or a history.csv file.

    Raises:
        UsageError: no such path, no history.csv, or too little in it.
    """
    from dlsuite.apps.core import rundir
    from dlsuite.apps.core.errors import UsageError

    path = pathlib.Path(path)
    if not path.exists():
        raise UsageError(f"{str(path)!r} does not exist; pass a run directory (runs/classify/<time>) or its history.csv")
    csv_path = path / "history.csv" if path.is_dir() else path
    if not csv_path.is_file():
        raise UsageError(f"{str(path)!r} has no history.csv; pass the directory of a training run")
    try:
        history = rundir.read_history(csv_path)
    except (ValueError, KeyError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read {str(csv_path)!r} as a history ({error}); pass a history.csv a run wrote") from None
    history.pop("epoch", None)
    if "loss" not in history:
        raise UsageError(f"{str(csv_path)!r} has no 'loss' column (columns: {', '.join(history) or 'none'})")
    # A run its guard stopped in the first epoch has one row, and the reason.
    needed = 1 if read_context(csv_path.parent)["stopped"] else 2
    if len(history["loss"]) < needed:
        raise UsageError(f"{str(csv_path)!r} has {len(history['loss'])} epoch(s); the curve doctor needs at least 2")
    return history, str(path), csv_path.parent


def read_context(run_dir):
    """What the run directory says beside its history: {"stopped": a
    stopped run's metrics.json or None, "untrained_loss": ln(classes) of a
    classifier or ln(vocabulary) of a language model or captioner, from
    config.json, or None}. A phase's folder (transfer) reads its run's
    files; unreadable files count as absent."""
    run_dir = pathlib.Path(run_dir)

    def read(name):
        for folder in (run_dir, run_dir.parent):
            try:
                return json.loads((folder / name).read_text())
            except (OSError, ValueError):
                continue
        return None

    metrics = read("metrics.json")
    stopped = metrics if isinstance(metrics, dict) and metrics.get("status") == "stopped" else None
    resolved = (read("config.json") or {}).get("resolved") if isinstance(read("config.json"), dict) else None
    untrained = None
    if isinstance(resolved, dict):
        classes = len(resolved["class_names"]) if isinstance(resolved.get("class_names"), list) else (
            resolved.get("vocabulary_size"))
        if isinstance(classes, int) and classes >= 2:
            untrained = math.log(classes)
    return {"stopped": stopped, "untrained_loss": untrained}


def plot(history, findings, path, *, title):
    """The loss curves with what the doctor saw marked on them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from dlsuite.apps.core import rundir

    figure, axis = plt.subplots(figsize=(7, 4))
    for metric, colour in (("loss", "tab:blue"), ("val_loss", "tab:orange")):
        values = history.get(metric)
        if values:
            shown = [v if math.isfinite(v) else np.nan for v in values]
            axis.plot(np.arange(1, len(values) + 1), shown, marker=".", color=colour,
                      label="training" if metric == "loss" else "validation")
            for epoch, value in enumerate(values, start=1):
                if not math.isfinite(value):
                    axis.axvline(epoch, color="red", linestyle="--", label=f"{metric} NaN")
                    break
    validation = history.get("val_loss", [])
    if any(f.name == "overfitting" for f in findings):
        best = min(range(len(validation)), key=lambda i: validation[i])
        axis.axvline(best + 1, color="gray", linestyle=":", label=f"lowest val_loss (epoch {best + 1})")
    shown = [v for m in ("loss", "val_loss") for v in history.get(m, []) if math.isfinite(v)]
    if shown and min(shown) > 0:
        axis.set_yscale("log")  # a small training loss and the gap to validation stay visible
    axis.set_xlabel("epoch")
    axis.set_ylabel("loss")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title(f"{title}\n{'; '.join(f.name for f in findings)}", fontsize=9)
    figure.tight_layout()
    rundir.save_figure(figure, path)
