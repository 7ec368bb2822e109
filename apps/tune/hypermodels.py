"""The keras-tuner HyperModel of every app: its task, trained by the engine.

`build(hp)` builds the task's model from the trial's hyperparameters
(`Task.with_values`: structure fields of the app's config, optimizer and
schedule fields) and compiles it with the app's optimizer; `fit(hp, model)`
trains it through `lifecycle.train_phases` and `engine.fit`, as a run does,
with the trial's batch size and epochs, on the training split, scored on
the validation split; the trial's files go into its keras-tuner folder.
After the search, `finish` scores the best model once, saves and exports it
with the task's own hooks.

`fit` returns the metrics of the trial's best epoch (the one keras-tuner's
checkpoint keeps) plus `epochs`, `best_epoch` and `seconds`; a loss that turns
NaN or diverges fails the trial (keras-tuner's FailedTrialError: recorded
FAILED, not retried) with the NaN guard's advice.
"""

import pathlib
import shutil
import tempfile
import time
import weakref

import keras
import keras_tuner
import tensorflow as tf

from dlsuite.apps.core import engine, lifecycle
from dlsuite.apps.core.errors import UsageError


def _largest(spec):
    """The largest value a space entry can take."""
    if "fixed" in spec:
        return spec["fixed"]
    if "choice" in spec:
        return max(spec["choice"])
    return spec["max"]


class TaskHyperModel(keras_tuner.HyperModel):
    """A task under search.

    Args:
        task: the app's `task.Task`, its data loaded (`prepare`).
        space: the `space.SearchSpace` to search.
        objective: (name, direction) of the metric the tuner optimizes.
        seed: every trial starts from this seed, so trials differ by their
            hyperparameters only.
        verbose: passed to `model.fit`.
    """

    def __init__(self, task, *, space, objective, seed=0, verbose=0):
        super().__init__(name=space.app)
        self.task = task
        self.space = space
        self.objective, self.direction = objective
        self.seed = seed
        self.verbose = verbose
        self._built = None  # (model, the trial task that built it)

    @classmethod
    def prepare(cls, task, *, space, **kwargs):
        """Loads the task's data once for every trial (and its cached inputs,
        in a temporary folder removed by `close`)."""
        hypermodel = cls(task, space=space, **kwargs)
        if "seq_len" in space.entries:  # every trial's windows must fit the validation part
            task.load_data(longest_window=task.window(_largest(space.entries["seq_len"])))
        else:
            task.load_data()
        work_dir = tempfile.mkdtemp(prefix=f"dlsuite-tune-{task.app}-")
        # Removed by `close`, or at the latest when the hypermodel is collected.
        hypermodel._cleanup = weakref.finalize(hypermodel, shutil.rmtree, work_dir, True)
        task.prepare_inputs(work_dir)
        return hypermodel

    def close(self):
        """Removes what `prepare` wrote outside the tuning directory."""
        if hasattr(self, "_cleanup"):
            self.task.caches = None
            self._cleanup()

    def check(self):
        """Raises UsageError for a space the data cannot serve (before anything is written)."""
        largest, available = _largest(self.space.entries["batch_size"]), self.task.train_examples()
        if largest > available:
            raise UsageError(f"batch_size {largest} in the search space is larger than the {available} training "
                             f"examples; search batch sizes up to {available}")

    def describe(self):
        return self.task.describe(None, None)

    # keras-tuner calls this once before the first trial: the whole space is
    # known up front, so no model has to be built just to discover it.
    def declare_hyperparameters(self, hp):
        self.space.declare(hp)

    def trial(self, hp, epochs=None, model=None):
        """(values, the trial's task) for keras-tuner's `hp`; for a `model`
        that `build` made, the task that built it (transfer's backbone stays)."""
        values = self.space.declare(hp)
        built = self._built[1] if self._built and self._built[0] is model else self.task
        return values, built.with_values({**values, "epochs": epochs or values["epochs"]})

    def build(self, hp):
        values, trial = self.trial(hp)
        self._built = None
        keras.utils.set_random_seed(self.seed)
        model = trial.build_model()
        first = [phase for phase in trial.phases() if phase.epochs > 0][0]
        if first.prepare:
            first.prepare(model)
        optimizer = engine.compile_model(
            model, strategy=tf.distribute.get_strategy(), optimizer_config=first.optimizer, loss=trial.loss(),
            metrics=trial.metrics, steps_per_epoch=trial.batches(values["batch_size"]).steps_per_epoch,
            epochs=first.epochs)
        # Its slots exist before any weights load, so a checkpoint (Hyperband
        # continuing a trial, the best model restored) brings the optimizer's
        # state too, without Keras's optimizer-mismatch warning.
        optimizer.build(model.trainable_variables)
        self._built = (model, trial)
        return model

    def fit(self, hp, model, *args, callbacks=(), epochs=None, initial_epoch=0, run_dir=None, **kwargs):
        """Trains `model` for the trial in `run_dir` (its keras-tuner folder);
        `epochs`/`initial_epoch` come from Hyperband, which sets each trial's
        budget itself."""
        values, trial = self.trial(hp, epochs, model)
        started = time.monotonic()
        trained = lifecycle.train_phases(
            trial, model, trial.batches(values["batch_size"]), strategy=tf.distribute.get_strategy(),
            run_dir=pathlib.Path(run_dir or tempfile.mkdtemp(prefix="dlsuite-trial-")), initial_epoch=initial_epoch,
            callbacks=[*trial.objective_callbacks(self.objective), *callbacks], verbose=self.verbose,
            trial=True)
        if trained.stopped is not None:
            lr = trial.optimizer_config().learning_rate
            raise keras_tuner.errors.FailedTrialError(f"{trained.stopped.stopped_reason} (this trial's lr is {lr:g})")
        return self.summarize(trained.history, seconds=time.monotonic() - started, initial_epoch=initial_epoch)

    def summarize(self, history, *, seconds, initial_epoch=0):
        """The metrics of the best epoch by the objective, plus epochs run,
        the best epoch (1-based) and the training time."""
        series = history[self.objective]
        pick = max if self.direction == "max" else min
        best = series.index(pick(series))
        metrics = {name: float(values[best]) for name, values in history.items() if len(values) > best}
        metrics.update(epochs=float(initial_epoch + len(series)), best_epoch=float(initial_epoch + best + 1),
                       seconds=float(seconds))
        return metrics

    def finish(self, model, hp, *, out_dir, export_name, export_dir, no_export):
        """Scores the best model once, saves and exports it with the task's
        hooks; returns the figures for metrics.json."""
        _, trial = self.trial(hp, model=model)
        figures = trial.evaluate(model, out_dir)
        trial.save_model(model, pathlib.Path(out_dir) / "model.keras")
        if not no_export:
            figures["export"] = str(trial.export(model, figures, name=export_name, base_dir=export_dir))
        return figures
