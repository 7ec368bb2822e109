"""keras-tuner HyperModels for the apps that `dlsuite tune` searches.

Each one wraps an app's own code rather than a copy of it: `build(hp)` builds
the app's model from the trial's hyperparameters and compiles it with the
app's optimizer and learning-rate schedule (`optim`); `fit(hp, model)` trains
it with the trial's batch size and epochs (keras-tuner's pattern for making
them searchable), on the training split, scored on the validation split.
After the search, `finish` scores the best model once on the test split and
exports it the way the app's `train` does.

`fit` returns the metrics of the trial's best epoch (the one keras-tuner's
checkpoint keeps) plus `epochs`, `best_epoch` and `seconds`; a loss that turns
NaN fails the trial with the NaN guard's advice.

A new app is one subclass here with `prepare`, `build_model`, `loss`,
`batches`, `steps_per_epoch` and `finish`, and its space in `search_space`.
"""

import dataclasses
import math
import pathlib
import shutil
import tempfile
import time
import weakref

import keras
import keras_tuner
import numpy as np

from dlsuite.apps.core import engine, optim, rundir
from dlsuite.apps.core.errors import UsageError
from dlsuite.callbacks import NaNGuard

_OPTIMIZER_FIELDS = tuple(field.name for field in dataclasses.fields(optim.OptimizerConfig))


class AppHyperModel(keras_tuner.HyperModel):
    """What every app's hypermodel shares: the declared space, compiling with
    the app's optimizer code, training with the trial's batch size and epochs.

    Args:
        space: the `search_space.SearchSpace` to search.
        objective: (name, direction) of the metric the tuner optimizes.
        seed: every trial starts from this seed, so trials differ by their
            hyperparameters only.
        verbose: passed to `model.fit`.
    """

    def __init__(self, *, space, objective, seed=0, verbose=0):
        super().__init__(name=space.app)
        self.space = space
        self.objective, self.direction = objective
        self.seed = seed
        self.verbose = verbose

    # keras-tuner calls this once before the first trial: the whole space is
    # known up front, so no model has to be built just to discover it.
    def declare_hyperparameters(self, hp):
        self.space.declare(hp)

    def optimizer_config(self, values):
        """The trial's optimizer and schedule; fields the space leaves out keep OptimizerConfig's defaults."""
        return optim.OptimizerConfig(**{k: v for k, v in values.items() if k in _OPTIMIZER_FIELDS})

    def build(self, hp):
        values = self.space.declare(hp)
        keras.utils.set_random_seed(self.seed)
        model = self.build_model(values)
        optimizer = optim.make_optimizer(
            self.optimizer_config(values), steps_per_epoch=self.steps_per_epoch(values), epochs=values["epochs"])
        model.compile(optimizer=optimizer, loss=self.loss(), metrics=self.metrics())
        # Its slots exist before any weights load, so a checkpoint (Hyperband
        # continuing a trial, the best model restored) brings the optimizer's
        # state too, without Keras's optimizer-mismatch warning.
        optimizer.build(model.trainable_variables)
        return model

    def fit(self, hp, model, *args, callbacks=(), epochs=None, initial_epoch=0, **kwargs):
        """Trains `model` for the trial; `epochs`/`initial_epoch` come from
        Hyperband, which sets each trial's budget itself."""
        values = self.space.declare(hp)
        train, validation = self.batches(values, model)
        nan_guard = NaNGuard()
        started = time.monotonic()
        history = model.fit(
            train, validation_data=validation, epochs=epochs or values["epochs"], initial_epoch=initial_epoch,
            # The app's metric callbacks come first: they add to the logs that
            # keras-tuner's best-epoch checkpoint (in `callbacks`) reads.
            callbacks=[*self.metric_callbacks(), nan_guard, *optim.schedule_callbacks(self.optimizer_config(values)),
                       *callbacks],
            shuffle=False, verbose=self.verbose,  # tf.data shuffles
        )
        if nan_guard.message:
            lr = self.optimizer_config(values).learning_rate
            raise keras_tuner.errors.FailedTrialError(f"{nan_guard.message} (this trial's lr is {lr:g})")
        return self.summarize(history.history, seconds=time.monotonic() - started, initial_epoch=initial_epoch)

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

    def metric_callbacks(self):
        return []

    def metrics(self):
        """The metrics `compile` adds to the loss."""
        return ["accuracy"]

    def close(self):
        """Removes what `prepare` wrote outside the tuning directory."""

    # What each app defines.
    def build_model(self, values):
        raise NotImplementedError

    def loss(self):
        raise NotImplementedError

    def batches(self, values, model):
        """(train, validation) tf.data batches for the trial."""
        raise NotImplementedError

    def steps_per_epoch(self, values):
        raise NotImplementedError

    def check(self):
        """Raises UsageError for a space the data cannot serve (before anything is written)."""

    def describe(self):
        """One line on the data, for the start of the search."""
        return ""

    def finish(self, model, values, *, out_dir, export_name, export_dir, no_export):
        """Scores the best model once on the test split, saves and exports it;
        returns the metrics for metrics.json."""
        raise NotImplementedError


def _largest(spec):
    """The largest value a space entry can take."""
    if "fixed" in spec:
        return spec["fixed"]
    if "choice" in spec:
        return max(spec["choice"])
    return spec["max"]


def _check_batch_sizes(space, available, what):
    """Raises UsageError when the space's largest batch size exceeds the `available` training examples."""
    largest = _largest(space.entries["batch_size"])
    if largest > available:
        raise UsageError(f"batch_size {largest} in the search space is larger than the {available} {what}; "
                         f"search batch sizes up to {available}")


class ClassifierHyperModel(AppHyperModel):
    """`dlsuite classify` under search: `classifier.build_classifier` on the
    app's data pipeline, the architecture (`model`) and knobs from the trial.

    Args:
        config: a `classify.TrainConfig` holding the data options; knobs the
            space leaves out keep its values.
        data: the `datasets.ImageDataset` it names (`classify.load_data`).
    """

    KNOBS = ("activation", "kernel_initializer", "l1", "l2", "max_norm", "dropout", "batch_norm")

    def __init__(self, *, config, data, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.data = data
        self._statistics = {}
        self._batches = {}

    @classmethod
    def prepare(cls, config, **kwargs):
        from dlsuite.apps.classify import cli as classify

        return cls(config=config, data=classify.load_data(config), **kwargs)

    def check(self):
        _check_batch_sizes(self.space, self.data.sizes["train"], "training images")

    def describe(self):
        sizes = self.data.sizes
        return (f"{self.data.name}: {sizes['train']} train / {sizes['validation']} validation / {sizes['test']} test "
                f"images, {len(self.data.class_names)} classes")

    def image_size(self, model_name):
        from dlsuite import models
        from dlsuite.apps.classify import cli as classify

        config = dataclasses.replace(self.config, model=model_name)
        return classify.image_size(config, models.get(model_name), self.data)

    def _split(self, split, size, batch_size, training):
        from dlsuite.apps.vision import pipeline

        def make():
            return pipeline.batches(getattr(self.data, split), image_size=(size, size), channels=self.data.channels,
                                    batch_size=batch_size, training=training, seed=self.config.seed)

        if training:
            # A new dataset each trial: its shuffle order then depends on the
            # seed alone, not on the trials before, so a trial retrained from
            # its hyperparameters is the same model.
            return make()
        key = (split, size, batch_size)
        if key not in self._batches:  # kept: evaluation batches are the same for every trial
            self._batches[key] = make()
        return self._batches[key]

    def statistics(self, size):
        from dlsuite.apps.vision import classifier

        if size not in self._statistics:
            self._statistics[size] = classifier.channel_statistics(self._split("train", size, 256, False))
        return self._statistics[size]

    def knobs(self, values):
        return {knob: values.get(knob, getattr(self.config, knob)) for knob in self.KNOBS}

    def build_model(self, values):
        from dlsuite.apps.vision import classifier

        model_name = values.get("model", self.config.model)
        size = self.image_size(model_name)
        mean, variance = self.statistics(size)
        return classifier.build_classifier(
            model_name, classes=len(self.data.class_names), image_size=(size, size), channels=self.data.channels,
            mean=mean, variance=variance, augment=self.config.augment, seed=self.config.seed, **self.knobs(values))

    def loss(self):
        return keras.losses.SparseCategoricalCrossentropy()

    def steps_per_epoch(self, values):
        return -(-self.data.sizes["train"] // values["batch_size"])

    def batches(self, values, model):
        size = int(model.inputs[0].shape[1])
        return (self._split("train", size, values["batch_size"], True),
                self._split("validation", size, values["batch_size"], False))

    def finish(self, model, values, *, out_dir, export_name, export_dir, no_export):
        from dlsuite.apps.vision import export, metrics

        size = int(model.inputs[0].shape[1])
        test = self._split("test", size, 256, False)
        labels = np.concatenate([np.asarray(y) for _, y in test])
        report = metrics.classification_report(model.predict(test, verbose=0), labels, self.data.class_names)
        rundir.plot_confusion(report["confusion_matrix"], self.data.class_names, out_dir / "confusion.png")
        engine.save_model(model, out_dir / "model.keras")
        summary = {f"test_{key}": report[key] for key in ("accuracy", "loss", "top5_accuracy") if key in report}
        model_name = values.get("model", self.config.model)
        if not no_export:
            mean, variance = self.statistics(size)
            architecture = {
                "backbone": model_name, "knobs": self.knobs(values), "preprocessing": "standardize",
                "statistics": {"mean": [float(v) for v in mean], "variance": [float(v) for v in variance]},
            }
            summary["export"] = str(export.export_classifier(
                model, class_names=self.data.class_names, name=export_name or f"{model_name}_{rundir.slug(self.data.name)}",
                base_dir=export_dir, architecture=architecture))
        summary["per_class"], summary["confusion_matrix"] = report["per_class"], report["confusion_matrix"]
        return summary


class _Perplexity(keras.callbacks.Callback):
    """Adds val_perplexity = exp(val_loss) to the epoch logs, so that it can
    be the objective and keras-tuner's checkpoint sees it."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and "val_loss" in logs:
            logs["val_perplexity"] = math.exp(min(float(logs["val_loss"]), 700.0))


@dataclasses.dataclass
class Corpus:
    """A text split by position: train, then validation, then test at the end."""

    name: str
    vocabulary: object
    train_ids: np.ndarray
    validation_ids: np.ndarray
    test_ids: np.ndarray


class LanguageModelHyperModel(AppHyperModel):
    """`dlsuite lm` under search: `lm.build_language_model` on `text.windows`,
    the cell, depth, width, embedding and sequence length from the trial.

    Args:
        config: an `lm.LMConfig` holding the data options.
        corpus: the `Corpus` it names (`prepare` splits it three ways).
    """

    STRUCTURE = ("cell", "layers", "units", "embedding", "dropout", "seq_len")

    def __init__(self, *, config, corpus, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.corpus = corpus

    @classmethod
    def prepare(cls, config, *, test_fraction, **kwargs):
        from dlsuite.apps.lm import cli as lm, text

        for option, value in (("--validation-fraction", config.validation_fraction), ("--test-fraction", test_fraction)):
            if not 0 < value < 0.5:
                raise UsageError(f"{option} must be in (0, 0.5), received {value}")
        name, _, vocabulary, ids = lm.load_corpus(config)
        window = _largest(kwargs["space"].entries["seq_len"]) + 1
        # The test part is the end of the text; validation the part before it.
        rest, test_ids = text.split_by_position(ids, validation_fraction=test_fraction, min_tokens=window)
        train_ids, validation_ids = text.split_by_position(
            rest, validation_fraction=config.validation_fraction / (1 - test_fraction), min_tokens=window)
        return cls(config=config, corpus=Corpus(name, vocabulary, train_ids, validation_ids, test_ids), **kwargs)

    def describe(self):
        corpus = self.corpus
        return (f"{corpus.name}: {len(corpus.train_ids):,} train / {len(corpus.validation_ids):,} validation / "
                f"{len(corpus.test_ids):,} test {self.config.level} tokens, vocabulary {corpus.vocabulary.size}")

    def model_config(self, values):
        return dataclasses.replace(self.config, **{k: values[k] for k in self.STRUCTURE if k in values})

    def build_model(self, values):
        from dlsuite.apps.lm import cli as lm

        return lm.build_language_model(self.model_config(values), self.corpus.vocabulary.size)

    def loss(self):
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def metric_callbacks(self):
        return [_Perplexity()]

    def steps_per_epoch(self, values):
        seq_len = self.model_config(values).seq_len
        return max(1, -(-(len(self.corpus.train_ids) - 1) // seq_len // values["batch_size"]))

    def batches(self, values, model):
        from dlsuite.apps.lm import text

        seq_len = self.model_config(values).seq_len
        return (text.windows(self.corpus.train_ids, seq_len=seq_len, batch_size=values["batch_size"], shuffle=True,
                             seed=self.config.seed),
                text.windows(self.corpus.validation_ids, seq_len=seq_len, batch_size=values["batch_size"], shuffle=False))

    def summarize(self, history, **kwargs):
        metrics = super().summarize(history, **kwargs)
        if "val_loss" in metrics:
            metrics["val_perplexity"] = math.exp(min(metrics["val_loss"], 700.0))
        return metrics

    def finish(self, model, values, *, out_dir, export_name, export_dir, no_export):
        from dlsuite.apps.lm import cli as lm, export as lm_export, text

        config = self.model_config(values)
        test = text.windows(self.corpus.test_ids, seq_len=config.seq_len, batch_size=values["batch_size"], shuffle=False)
        nats = model.evaluate(test, verbose=0, return_dict=True)["loss"]
        characters = len(self.corpus.vocabulary.decode(self.corpus.test_ids))
        figures = lm.perplexity_figures(nats, tokens=len(self.corpus.test_ids), characters=characters)
        summary = {key.replace("validation_", "test_"): value for key, value in figures.items()}
        engine.save_model(model, pathlib.Path(out_dir) / "model.keras")
        if not no_export:
            summary["export"] = str(lm_export.export_language_model(
                model, self.corpus.vocabulary, name=export_name or f"{config.cell}_{rundir.slug(self.corpus.name)}",
                base_dir=export_dir,
                metadata={"cell": config.cell, "layers": config.layers, "units": config.units, "seq_len": config.seq_len,
                          "test_perplexity": summary["test_perplexity"]}))
        return summary


class TransferHyperModel(ClassifierHyperModel):
    """`dlsuite transfer finetune` under search: the backbone and its weights
    fixed by the options, the phases, head and training from the trial.

    A trial trains like `transfer finetune`: the new head on the frozen
    backbone for the first part of its epochs, then the top `unfreeze`
    layers (batch norm stays frozen) at `lr x finetune_lr_factor` for the
    share `finetune_share`. An `unfreeze` past the backbone's layer count
    unfreezes all of them; `--weights none` trains every layer throughout.

    Args:
        config: a `transfer.TransferConfig` holding the backbone and data options.
        data: the dataset with its training split cut to --train-per-class.
        statistics: that split's per-channel statistics.
    """

    def __init__(self, *, config, data, statistics, **kwargs):
        super().__init__(config=config, data=data, **kwargs)
        self.fixed_statistics = statistics
        self.scratch = config.weights is None or str(config.weights).lower() in ("none", "random")
        self._finetuning = False

    @classmethod
    def prepare(cls, config, **kwargs):
        from dlsuite.apps.vision import backbones
        from dlsuite.apps.transfer import cli as transfer

        transfer.check_config(config)
        config = dataclasses.replace(config, weights=backbones.check_weights_argument(config.backbone, config.weights))
        data, statistics = transfer.load_data(config)
        return cls(config=config, data=data, statistics=statistics, **kwargs)

    def optimizer_config(self, values):
        config = super().optimizer_config(values)
        if self._finetuning:
            return dataclasses.replace(config, lr=config.learning_rate * values["finetune_lr_factor"])
        return config

    def build_model(self, values):
        from dlsuite.apps.vision import backbones
        from dlsuite.apps.transfer import cli as transfer

        self._finetuning = False
        base = backbones.build_base(
            self.config.backbone, weights=self.config.weights, input_size=self.config.input_size,
            channels=self.data.channels, statistics=self.fixed_statistics, preprocessing=self.config.preprocess,
            batch_norm=self.config.batch_norm)
        model = transfer.build_transfer_model(base, classes=len(self.data.class_names), augment=self.config.augment,
                                              seed=self.config.seed, head_dropout=values["head_dropout"])
        transfer.set_trainable(model, "all" if self.scratch else 0)
        return model

    def _split(self, split, size, batch_size, training):
        from dlsuite.apps.vision import pipeline

        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        key = (split, size, batch_size)
        if training or key not in self._batches:
            batches = pipeline.batches(getattr(self.data, split), image_size=size, channels=self.data.channels,
                                       batch_size=batch_size, training=training, seed=self.config.seed)
            if training:
                return batches
            self._batches[key] = batches
        return self._batches[key]

    def batches(self, values, model):
        size = tuple(int(d) for d in model.inputs[0].shape[1:3])
        return (self._split("train", size, values["batch_size"], True),
                self._split("validation", size, values["batch_size"], False))

    def fit(self, hp, model, *args, callbacks=(), epochs=None, initial_epoch=0, **kwargs):
        """Phase 1 then phase 2 in one trial; the best epoch of either counts."""
        from dlsuite.apps.transfer import cli as transfer

        values = self.space.declare(hp)
        total = epochs or values["epochs"]
        self._finetuning = False
        if self.scratch:
            return super().fit(hp, model, callbacks=callbacks, epochs=total, initial_epoch=initial_epoch)
        freeze = total - int(round(total * values["finetune_share"])) if total > 1 else total
        results = []
        if initial_epoch < freeze:
            results.append(super().fit(hp, model, callbacks=callbacks, epochs=freeze, initial_epoch=initial_epoch))
        if total > max(freeze, initial_epoch):
            base = model.get_layer("backbone")
            tunable = sum(1 for layer in base.layers
                          if layer.weights and not isinstance(layer, keras.layers.BatchNormalization))
            transfer.set_trainable(model, min(values["unfreeze"], tunable))
            self._finetuning = True
            optimizer = optim.make_optimizer(self.optimizer_config(values), steps_per_epoch=self.steps_per_epoch(values),
                                             epochs=total - freeze)
            model.compile(optimizer=optimizer, loss=self.loss(), metrics=["accuracy"])
            results.append(super().fit(hp, model, callbacks=callbacks, epochs=total,
                                       initial_epoch=max(freeze, initial_epoch)))
            self._finetuning = False
        pick = max if self.direction == "max" else min
        best = pick(results, key=lambda result: result[self.objective])
        return {**best, "epochs": float(total), "seconds": sum(result["seconds"] for result in results)}

    def finish(self, model, values, *, out_dir, export_name, export_dir, no_export):
        from dlsuite.apps.vision import export, metrics

        size = tuple(int(d) for d in model.inputs[0].shape[1:3])
        test = self._split("test", size, 256, False)
        labels = np.concatenate([np.asarray(y) for _, y in test])
        report = metrics.classification_report(model.predict(test, verbose=0), labels, self.data.class_names)
        rundir.plot_confusion(report["confusion_matrix"], self.data.class_names, out_dir / "confusion.png")
        engine.save_model(model, out_dir / "model.keras")
        summary = {f"test_{key}": report[key] for key in ("accuracy", "loss", "top5_accuracy") if key in report}
        if not no_export:
            summary["export"] = str(export.export_classifier(
                model, class_names=self.data.class_names, base_dir=export_dir,
                name=export_name or f"{model.name}_{rundir.slug(self.data.name)}"))
        summary["per_class"], summary["confusion_matrix"] = report["per_class"], report["confusion_matrix"]
        return summary


class _ValidationBLEU(keras.callbacks.Callback):
    """Adds val_bleu4: corpus BLEU-4 of the greedy captions of the validation
    images against all their references, at the end of each epoch, so that
    what captioning is judged by can be the objective."""

    def __init__(self, hypermodel):
        super().__init__()
        self.hypermodel = hypermodel

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["val_bleu4"] = self.hypermodel.bleu4(self.model.get_layer("caption_decoder"), "validation")


class CaptionHyperModel(AppHyperModel):
    """`dlsuite caption train` under search: the decoder (cell, attention,
    widths, dropout) and its training from the trial, over features the
    frozen encoder computed once for every trial.

    The features are cached in a temporary folder that lives as long as the
    hypermodel; `--fine-tune-encoder` has no place here, as every trial
    would then re-run the encoder.

    Args:
        config: a `caption.CaptionConfig` holding the data, encoder and decoding options.
        data, vocabulary, base: what `caption.load_data_and_encoder` returns.
        caches, pairs: what `caption.cache_inputs` returns.
        cache_dir: the temporary folder holding the caches, removed with the hypermodel.
    """

    STRUCTURE = ("decoder", "attention", "units", "embedding", "dropout", "pooling")

    def __init__(self, *, config, data, vocabulary, base, caches, pairs, cache_dir, **kwargs):
        super().__init__(**kwargs)
        self.config, self.data, self.vocabulary, self.base = config, data, vocabulary, base
        self.caches, self.pairs = caches, pairs
        self.feature_shape = tuple(int(d) for d in base.model.output.shape[1:])
        from dlsuite.apps.caption import model as caption_model

        self.mean, self.variance = caption_model.feature_statistics(caches["train"])
        # Removed by `close`, or at the latest when the hypermodel is collected.
        self._cleanup = weakref.finalize(self, shutil.rmtree, cache_dir, True)

    @classmethod
    def prepare(cls, config, **kwargs):
        from dlsuite.apps.caption import cli as caption

        weights = caption._check_config(config)
        data, vocabulary, base = caption.load_data_and_encoder(config, weights)
        cache_dir = tempfile.mkdtemp(prefix="dlsuite-tune-caption-")
        try:
            caches, pairs, _ = caption.cache_inputs(config, data, vocabulary, base, cache_dir=cache_dir, batch_size=64)
        except BaseException:
            shutil.rmtree(cache_dir, ignore_errors=True)
            raise
        return cls(config=config, data=data, vocabulary=vocabulary, base=base, caches=caches, pairs=pairs,
                   cache_dir=cache_dir, **kwargs)

    def close(self):
        self.caches = None
        self._cleanup()

    def check(self):
        _check_batch_sizes(self.space, len(self.pairs["train"][0]), "training captions")

    def describe(self):
        sizes = self.data.sizes
        return (f"{self.data.name}: {sizes['train']} train / {sizes['validation']} validation / {sizes['test']} test "
                f"images, {self.vocabulary.size} tokens; {self.base.name} features {self.feature_shape} cached")

    def model_config(self, values):
        config = dataclasses.replace(self.config, **{k: values[k] for k in self.STRUCTURE if k in values})
        # Attention reads every location: pooling applies without it only.
        return dataclasses.replace(config, pooling="flatten") if config.attention else config

    def build_model(self, values):
        from dlsuite.apps.caption import cli as caption, model as caption_model

        decoder = caption.make_decoder(self.model_config(values), self.vocabulary, mean=self.mean, variance=self.variance)
        return caption_model.build_training_model(decoder, feature_shape=self.feature_shape,
                                                  caption_length=self.config.max_length + 1)

    def loss(self):
        from dlsuite.apps.caption import model as caption_model

        return caption_model.caption_loss()

    def metrics(self):
        return []  # token accuracy would count the padding; BLEU is the callback's

    def metric_callbacks(self):
        return [_ValidationBLEU(self)] if self.objective == "val_bleu4" else []

    def steps_per_epoch(self, values):
        return -(-len(self.pairs["train"][0]) // values["batch_size"])

    def batches(self, values, model):
        from dlsuite.apps.caption import data as caption_data

        return (caption_data.caption_batches(self.caches["train"], self.pairs["train"], batch_size=values["batch_size"],
                                             shuffle=True, seed=self.config.seed),
                caption_data.caption_batches(self.caches["validation"], self.pairs["validation"],
                                             batch_size=values["batch_size"], shuffle=False))

    def bleu4(self, decoder, split):
        """Corpus BLEU-4 of the greedy captions of a split's images."""
        import tensorflow as tf

        from dlsuite.apps.caption import cli as caption, decode as caption_decode

        # Each epoch's decoder is new to tf.function: its retracing warning does not apply.
        logger, level = tf.get_logger(), tf.get_logger().level
        logger.setLevel("ERROR")
        try:
            decoded = caption.decode_split(decoder, self.caches[split], encoder=None, beam_sizes=(1,),
                                           max_length=self.config.max_length, alpha=self.config.alpha,
                                           batch_size=128)[1]
        finally:
            logger.setLevel(level)
        return caption_decode.bleu(getattr(self.data, split).captions, self.vocabulary.decode(decoded.token_ids))["bleu4"]

    def finish(self, model, values, *, out_dir, export_name, export_dir, no_export):
        from dlsuite.apps.caption import cli as caption, data as caption_data, decode as caption_decode, model as caption_model

        config = dataclasses.replace(self.model_config(values), export=export_name, export_dir=export_dir)
        decoder = model.get_layer("caption_decoder")
        figures = caption.evaluate_split(decoder, self.caches["test"], self.data.test.captions, self.vocabulary,
                                         encoder=None, beam_size=config.beam, max_length=config.max_length,
                                         alpha=config.alpha, batch_size=64)
        engine.save_model(caption_model.build_captioner(self.base.model, decoder, caption_length=config.max_length + 1),
                          pathlib.Path(out_dir) / "model.keras")
        test_bleu = {key: figures["beam"][key] for key in ("bleu1", "bleu2", "bleu3", "bleu4")}
        baseline = caption_data.most_frequent_caption(self.data.train.captions)
        summary = {f"test_{key}": value for key, value in test_bleu.items()}
        summary["test_greedy_bleu4"] = figures["greedy"]["bleu4"]
        summary["test_image_blind_bleu4"] = caption_decode.bleu(self.data.test.captions,
                                                                [baseline] * len(self.data.test))["bleu4"]
        summary["beam"] = config.beam
        if not no_export:
            summary["export"] = str(caption.export_captioner(config, self.base, self.base.model, decoder,
                                                             data_name=self.data.name, test_bleu=test_bleu))
        return summary
