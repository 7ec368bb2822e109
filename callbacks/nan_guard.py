"""Stop training on a NaN, infinite or diverging loss and say what the seed says.

A loss can explode without ever becoming NaN: `classify train --optimizer sgd
--lr 1e6` went from 2.59 at its first batch to 4.4e5 at its second and ended
30 epochs later at 6e6 with exit 0 (issue #15). `LossWatch` names:

* non-finite: the first batch whose loss is NaN or infinite;
* explosion: the epoch's running loss (what Keras logs after each batch: the
  mean over the epoch so far) above `EXPLOSION_FACTOR` times the loss at the
  first batch of the fit, the untrained model's, floored at `LOSS_FLOOR`;
* growth: the epoch loss rising `GROWTH_EPOCHS` epochs in a row to at least
  `GROWTH_FACTOR` times where the rise began (the seed's "observe if the
  training process diverges (i.e., training loss increases)").

Thresholds, measured on `classify train` (LeNet-5 on digits, batch 32 unless
said) and `lm train`, as the largest running loss from the 5th batch of an epoch on over the
first batch's loss (floored at 1.0):

    defaults, 2 epochs                     0.55
    adam --lr 0.01, 4 epochs               0.50
    sgd --lr 0.3, 4 epochs                 0.66
    --lr 0.01 --warmup-epochs 2, batch 8   0.73
    --batch-size 1 (with and without BN)   1.0 / 1.12 (single batches up to 3.1)
    lm train (char, 64 units, 60k chars)   0.98; --level word 1.0
    lm train --cell rnn --irnn --clip-norm 1   1.47 (single batches up to 4.0)
    sgd --lr 10                            14 at the 5th batch
    sgd --lr 1e6                           2,100,000 at the 5th batch

so 10x leaves 7 times the noisiest healthy run (IRNN's early spikes) and
still stops lr 10. The running mean is checked only from the `MIN_BATCHES`-th
batch of an epoch (and at the epoch's end, for short epochs): the first
batches of an epoch are single noisy batches, not a mean.
"""

import math

import keras

NAN_ADVICE = (
    "the loss became {value} at epoch {epoch}, batch {batch}: the learning rate is "
    "probably too high (the seed: 'loss goes to NaN: too high learning rate'); "
    "lower --lr (for example by 10x) or add --clip-norm"
)

DIVERGENCE_ADVICE = (
    "the loss diverged at epoch {epoch}{batch}: {evidence}; the learning rate is probably too high "
    "(the seed: 'observe if the training process diverges (i.e., training loss increases), and decrease "
    "the rate until convergence'); lower --lr (for example by 10x) or add --clip-norm"
)

# The running loss may reach this many times the reference before the run
# counts as diverged. Healthy runs stayed at or below 1.47x (see above).
EXPLOSION_FACTOR = 10.0
# The reference is at least this: a fit that starts from a trained model
# (--resume, Hyperband continuing a trial, transfer's fine-tuning phase) has a
# small, noisy first-batch loss that is no yardstick. Every app trains a
# cross-entropy, whose untrained value ln(classes) is >= 0.69 nats.
LOSS_FLOOR = 1.0
# The batch of an epoch from which its running loss is checked (1-based).
MIN_BATCHES = 5
# Rising epoch after epoch: this many rises in a row ...
GROWTH_EPOCHS = 3
# ... ending at least this many times the epoch loss where the rise began ...
GROWTH_FACTOR = 2.0
# ... and at least this share of the reference, so a tiny loss that creeps up
# (0.002 -> 0.005 near a perfect fit) is not called divergence.
GROWTH_OF_REFERENCE = 0.25


def explosion(loss, reference):
    """The evidence (a string) if `loss` is past `EXPLOSION_FACTOR` times
    `reference` (floored at `LOSS_FLOOR`), else None."""
    yardstick = max(reference, LOSS_FLOOR)
    if loss > EXPLOSION_FACTOR * yardstick:
        return (f"it reached {loss:.4g}, {loss / yardstick:,.0f} times the first batch's {reference:.4g}"
                if reference >= LOSS_FLOOR else
                f"it reached {loss:.4g}, {loss / yardstick:,.0f} times {LOSS_FLOOR:g} (the first batch's was "
                f"{reference:.4g})")
    return None


def growth(epoch_losses, reference=LOSS_FLOOR):
    """The evidence if the last `GROWTH_EPOCHS` epoch losses each rose, to
    `GROWTH_FACTOR` times the start of the rise and `GROWTH_OF_REFERENCE` of
    `reference`, else None."""
    recent = list(epoch_losses)[-(GROWTH_EPOCHS + 1):]
    if len(recent) < GROWTH_EPOCHS + 1 or not all(math.isfinite(v) for v in recent):
        return None
    if not all(b > a for a, b in zip(recent, recent[1:])):
        return None
    if recent[-1] < GROWTH_FACTOR * recent[0] or recent[-1] < GROWTH_OF_REFERENCE * max(reference, LOSS_FLOOR):
        return None
    return (f"the epoch loss rose {GROWTH_EPOCHS} epochs in a row, "
            + " -> ".join(f"{v:.4g}" for v in recent) + f" ({recent[-1] / recent[0]:.1f}x)")


class LossWatch:
    """Watches a fit's losses, batch by batch and epoch by epoch; the first
    problem becomes `message` (NAN_ADVICE or DIVERGENCE_ADVICE).

    Framework-free, so the custom multi-worker loop and L-BFGS can use it as
    well as the Keras callback below.

    Args:
        reference: the untrained model's loss, when the caller knows it (a
            resumed run: its first epoch's); None takes the fit's first batch.
        epoch_losses: the epoch losses before this fit (a resumed run's
            history), for the growth rule.
    """

    def __init__(self, *, reference=None, epoch_losses=()):
        self.reference = reference
        self.epoch_losses = [float(v) for v in epoch_losses]
        self.message = None

    def batch(self, epoch, batch, loss):
        """After batch `batch` (0-based) of epoch `epoch` (0-based) whose
        running epoch loss is `loss`; returns True when training must stop."""
        if self.message is not None or loss is None:
            return self.message is not None
        loss = float(loss)
        if not math.isfinite(loss):
            self.message = NAN_ADVICE.format(value=loss, epoch=epoch + 1, batch=batch + 1)
        else:
            if self.reference is None:
                self.reference = loss
            if batch + 1 >= MIN_BATCHES and (evidence := explosion(loss, self.reference)):
                self.message = DIVERGENCE_ADVICE.format(epoch=epoch + 1, batch=f", batch {batch + 1}",
                                                        evidence=evidence)
        return self.message is not None

    def epoch(self, epoch, loss):
        """After epoch `epoch` (0-based) with epoch loss `loss`; returns True
        when training must stop."""
        if self.message is not None or loss is None:
            return self.message is not None
        loss = float(loss)
        if not math.isfinite(loss):
            self.message = NAN_ADVICE.format(value=loss, epoch=epoch + 1, batch="all")
            return True
        if self.reference is None:
            self.reference = loss
        self.epoch_losses.append(loss)
        evidence = explosion(loss, self.reference) or growth(self.epoch_losses, self.reference)
        if evidence:
            self.message = DIVERGENCE_ADVICE.format(epoch=epoch + 1, batch="", evidence=evidence)
        return self.message is not None


class NaNGuard(keras.callbacks.Callback):
    """Stops at the first non-finite batch loss, or a diverging one, and
    records why in `message`.

    Unlike keras.callbacks.TerminateOnNaN it keeps the message for the app to
    print, leaves the best checkpoint written so far untouched, and catches a
    loss that explodes without becoming NaN (`LossWatch`).

    Args:
        reference, epoch_losses: see `LossWatch` (a resumed fit passes its
            history's; by default the fit's first batch is the reference).
    """

    def __init__(self, *, reference=None, epoch_losses=()):
        super().__init__()
        self.watch = LossWatch(reference=reference, epoch_losses=epoch_losses)
        self._epoch = 0

    @property
    def message(self):
        return self.watch.message

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.watch.batch(self._epoch, batch, (logs or {}).get("loss")):
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if self.watch.epoch(epoch, (logs or {}).get("loss")):
            self.model.stop_training = True


def stop_cause(message):
    """"nan", "divergence" or None: what a stop `message` of this module says."""
    if not message:
        return None
    if message.startswith("the loss diverged"):
        return "divergence"
    if message.startswith("the loss became"):
        return "nan"
    return "other"
