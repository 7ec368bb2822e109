"""The task layer: what differs between apps, behind one interface.

A `Task` holds an app's config and says how to load its data, build its
model, batch its splits, score the trained model and export it; the
lifecycle (`lifecycle.run`) and the tuner (`tune.hypermodels`) drive any task
the same way. Model Garden's `base_task.Task` is the model, made smaller:
no train or validation step of our own, because `engine.fit` trains every
task.

Order of the hooks in a run::

    check()              arguments only: no TensorFlow work, nothing written
    load_data()          once; the tuner shares the data between its trials
    batches(batch_size)  the training and validation tf.data batches
    build_model()        inside the strategy's scope
    phases()             one fit each (transfer: freeze, then fine-tune)
    evaluate(model, run_dir)   on the chief: the test score and its plots
    save_model(model, path), export(model, metrics)

A task keeps what `load_data` found on itself; `with_values` gives the
tuner a copy with other hyperparameters that shares that data.
"""

import copy
import dataclasses

# Nothing here imports TensorFlow: the app parsers import their tasks, and
# `dlsuite --help` must stay instant.


@dataclasses.dataclass
class Batches:
    """A task's training and validation batches for one batch size."""

    train: object  # tf.data.Dataset of (x, y), global batch size
    validation: object
    steps_per_epoch: int
    batch_size: int
    train_examples: int


@dataclasses.dataclass
class Phase:
    """One `engine.fit` of a run.

    Attributes:
        name: its subfolder of the run directory, or None for the run
            directory itself (single-phase tasks).
        epochs: epochs to train in this phase.
        optimizer: the `optim.OptimizerConfig` of this phase.
        prepare: called with the model inside the strategy's scope before
            the phase trains (transfer sets which layers train); returns a
            short description for the progress line, or None.
    """

    name: str | None
    epochs: int
    optimizer: object  # optim.OptimizerConfig
    prepare: object = None


class Task:
    """An app's task; subclasses set `app` and `config_class` and override the hooks.

    Args:
        config: the app's config dataclass (extends `train_args.TrainingConfig`).
    """

    app = ""  # runs/<app>/<time> by default
    config_class = None
    metrics = ("accuracy",)  # Keras metric names, or one list per output
    batch_norm_statistics = None  # "recomputed" or "moving_average" after --precise-bn chose

    def __init__(self, config):
        self.config = config

    # --- before anything is written -------------------------------------------------

    @classmethod
    def intra_op_threads(cls):
        """TensorFlow's intra-op thread count for the process that runs this
        task, set before TensorFlow starts; None leaves TensorFlow's default."""
        return None

    def check(self):
        """Raises UsageError for a bad config; reads no data and starts no TensorFlow work."""

    def load_data(self):
        """Loads and checks the data (raising UsageError for bad data); keeps it on `self`."""
        raise NotImplementedError

    def batch_size(self, requested):
        """The batch size a run trains with, given the requested one (the
        default: as requested; a task may refuse or clip one larger than its
        training split)."""
        return requested

    def prepare_inputs(self, work_dir):
        """Work the batches need once, kept in `work_dir` (caption caches its
        encoder's features there)."""

    def batches(self, batch_size):
        """A `Batches` of the training and validation splits at `batch_size`."""
        raise NotImplementedError

    # --- the model ------------------------------------------------------------------------

    def build_model(self):
        """The model to train, built inside the strategy's scope."""
        raise NotImplementedError

    def loss(self):
        raise NotImplementedError

    def phases(self):
        """The fits of a run; by default one, of `config.epochs` epochs."""
        return [Phase(name=None, epochs=self.config.epochs, optimizer=self.optimizer_config())]

    def optimizer_config(self):
        from dlsuite.apps.core import optim

        return optim.OptimizerConfig(**self.config.optimizer)

    def metric_callbacks(self):
        """Callbacks that add metrics to the epoch logs (before checkpoints read them)."""
        return []

    def objective_callbacks(self, objective):
        """Callbacks a search adds so that `objective` is in the epoch logs
        (caption's val_bleu4 decodes the validation images each epoch)."""
        return []

    # --- what a run records ----------------------------------------------------------------

    def resolved(self, model, batches):
        """What the run resolved from its config, for config.json's "resolved"."""
        return {}

    def describe(self, model, batches):
        """The line printed before training."""
        return ""

    def write_inputs(self, run_dir):
        """Files the run directory gets beside config.json (lm: vocabulary.json)."""

    def title(self):
        """The title of curves.png."""
        return self.app

    # --- after training, on the chief -------------------------------------------------------

    def evaluate(self, model, run_dir):
        """Scores the trained model (test split), writes its plots into
        `run_dir`; returns the figures for metrics.json."""
        raise NotImplementedError

    def save_model(self, model, path):
        """Saves what `model.keras` holds (caption: the captioner, not the training model)."""
        from dlsuite.apps.core import atomic

        atomic.save_model(model, path)

    def export(self, model, figures, *, name=None, base_dir=None):
        """Exports the model for serving; returns the version folder."""
        raise NotImplementedError

    def report(self, figures):
        """The line printed at the end of a run."""
        return ""

    def export_facts(self):
        """What an export's metadata records about the run beside the model."""
        return {} if self.batch_norm_statistics is None else {"batch_norm_statistics": self.batch_norm_statistics}

    # --- the tuner ---------------------------------------------------------------------------

    def with_values(self, values):
        """A copy whose config takes `values` (a trial's hyperparameters) where
        they name config fields or optimizer fields; the data is shared."""
        from dlsuite.apps.core import optim

        optimizer_fields = {field.name for field in dataclasses.fields(optim.OptimizerConfig)}
        config_fields = {field.name for field in dataclasses.fields(self.config)} - {"optimizer"}
        optimizer = {**self.config.optimizer, **{k: v for k, v in values.items() if k in optimizer_fields}}
        trial = copy.copy(self)
        trial.config = dataclasses.replace(
            self.config, optimizer=optimizer, **{k: v for k, v in values.items() if k in config_fields})
        return trial
