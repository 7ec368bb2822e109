"""The transfer-learning task: a backbone trained elsewhere, a new head, two phases.

The seed's recipe: drop the last fully connected layer and use the rest of
the network as a feature extractor; train a new head on the frozen backbone
(phase "freeze", the backbone called with `training=False` and its batch
norm frozen so its statistics stay), then unfreeze its top layers and train
on with a smaller learning rate (phase "finetune"); keep whichever phase
validated best, score the test split and export like `classify`. With
`--weights none` there is nothing to keep: one phase ("scratch") trains
every layer at the full rate, the baseline to compare with.
"""

import dataclasses

from dlsuite.apps.core import task, train_args
from dlsuite.apps.vision import classifier_task
from dlsuite.apps.core.errors import UsageError


@dataclasses.dataclass
class TransferConfig(train_args.TrainingConfig, train_args.ImageSplitConfig):
    """A fine-tuning run; saved as config.json beside the model."""

    backbone: str | None = None
    weights: str | None = "imagenet"
    trust_model: bool = False  # a SavedModel --weights may read or write files or print
    preprocess: str = "auto"
    batch_norm: bool | None = None
    dataset: str = "shapes"
    input_size: list | None = None
    train_per_class: int | None = None
    freeze_epochs: int = 5
    finetune_epochs: int = 5
    unfreeze: str = "all"
    finetune_lr_factor: float = 0.1
    head_dropout: float = 0.2
    batch_size: int | None = None
    augment: list | None = None


def few_labels(source, per_class, *, seed):
    """The first `per_class` images of each class after a seeded shuffle, as a
    `sources.Source` of the split `source` (read from its labels, nothing decoded)."""
    import numpy as np

    if source.labels is None:
        raise UsageError("train_per_class needs a split whose labels are known before reading it (a folder, "
                         "packed shards, digits or shapes); this TensorFlow Datasets set is read in sequence",
                         option="train_per_class")
    rng = np.random.default_rng(seed)
    keep = np.zeros(len(source.labels), dtype=bool)
    for label in np.unique(source.labels):
        members = np.flatnonzero(source.labels == label)
        keep[rng.permutation(members)[:per_class]] = True
    return source.subset(np.flatnonzero(keep))


def build_transfer_model(base, *, classes, augment=None, seed=None, head_dropout=0.2):
    """pixels -> [augmentation] -> backbone(training=False) -> pooling -> dropout -> softmax.

    The backbone is called in inference mode and its batch-norm layers stay
    frozen (`set_trainable`): they keep their statistics in both phases, as
    the keras transfer guide advises (updating them from a few images would
    undo what the backbone learned).
    """
    import keras
    from keras import layers

    from dlsuite.apps.vision import classifier

    pixels = keras.Input((*base.input_size, base.channels), name="pixels")
    x = pixels
    for layer in classifier.augmentation(augment, seed) if augment else []:
        x = layer(x)
    x = base.model(x, training=False)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if head_dropout:
        x = layers.Dropout(head_dropout, seed=seed, name="head_dropout")(x)
    x = layers.Dense(classes, name="predictions")(x)
    probabilities = layers.Activation("softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(pixels, probabilities, name=base.name)


def set_trainable(model, unfreeze):
    """Freezes the backbone, then unfreezes its top `unfreeze` layers ("all", a count, or 0).

    Counted are the layers with weights other than batch normalization, which
    stays frozen in every phase: a frozen BatchNormalization runs in inference
    mode in Keras 3, whereas the `training=False` the backbone is called with
    is overridden by fit's `training=True` (keras functional.operation_fn
    passes the outer value down), so freezing is what keeps the statistics.
    """
    import keras

    from dlsuite.apps.vision import backbones

    base = model.get_layer(backbones.BACKBONE_LAYER)
    tunable = [layer for layer in base.layers
               if layer.weights and not isinstance(layer, keras.layers.BatchNormalization)]
    count = len(tunable) if unfreeze == "all" else int(unfreeze)
    if count > len(tunable):
        raise UsageError(f"unfreeze {count} is more than the {len(tunable)} layers with weights in the backbone "
                         f"(batch norm excluded); pass {len(tunable)} or all", option="unfreeze")
    base.trainable = count > 0
    for layer in base.layers:
        layer.trainable = False
    for layer in tunable[len(tunable) - count:]:
        layer.trainable = True
    return count


def load_data(config):
    """The dataset with its training split cut to --train-per-class, and the
    per-channel statistics of that split (for backbones that standardize)."""
    from dlsuite.apps.vision import classifier, datasets, pipeline

    data = datasets.load_configured(config)
    if config.train_per_class:
        data = data.with_source("train", few_labels(data.sources["train"], config.train_per_class, seed=config.seed))
    probe_size = tuple(config.input_size) if config.input_size else (
        data.image_shape[:2] if data.image_shape else (64, 64))
    statistics = classifier.channel_statistics(
        pipeline.batches(data.sources["train"], image_size=probe_size, channels=data.channels, batch_size=64, training=False))
    return data, statistics


class TransferTask(classifier_task.ImageClassifierTask):
    """`dlsuite transfer finetune`."""

    app = "transfer"
    config_class = TransferConfig

    def check(self):
        from dlsuite.apps.vision import backbones

        config = self.config
        if config.backbone is None and not backbones.is_model_file(config.weights):
            raise UsageError("backbone is needed unless weights is a model this suite trained; "
                             "e.g. --backbone resnet50 --weights imagenet", option=("backbone", "weights"))
        if config.backbone is not None:
            config.backbone = backbones.canonical_name(config.backbone)
        if config.freeze_epochs < 0 or config.finetune_epochs < 0:
            raise UsageError(f"freeze_epochs and finetune_epochs must be >= 0, received "
                             f"{config.freeze_epochs} and {config.finetune_epochs}", option=("freeze_epochs", "finetune_epochs"))
        if config.freeze_epochs + config.finetune_epochs == 0:
            raise UsageError("freeze_epochs and finetune_epochs are both 0: nothing to train; train one epoch or more",
                             option=("freeze_epochs", "finetune_epochs"))
        if not 0 < config.finetune_lr_factor <= 1:
            raise UsageError(f"finetune_lr_factor must be in (0, 1], received {config.finetune_lr_factor}", option="finetune_lr_factor")
        if not 0 <= config.head_dropout < 1:
            raise UsageError(f"head_dropout must be in [0, 1), received {config.head_dropout}", option="head_dropout")
        if config.optimizer.get("optimizer") == "lbfgs":
            raise UsageError("optimizer lbfgs cannot train a frozen backbone in phases; use adam, sgd or momentum", option="optimizer")
        self.weights = backbones.check_weights_argument(config.backbone, config.weights,
                                                        trust_model=config.trust_model)

    clip_unfreeze = False  # a search's trial unfreezes at most every layer the backbone has

    @property
    def scratch(self):
        return self.weights is None

    def with_values(self, values):
        """A trial's task: `epochs` split by `finetune_share` into the two phases
        (the first phase takes them all when there is one epoch)."""
        values = dict(values)
        total = values.pop("epochs")
        freeze = total - int(round(total * values.pop("finetune_share", 0.0))) if total > 1 else total
        trial = super().with_values({**values, "freeze_epochs": freeze, "finetune_epochs": total - freeze,
                                     **({"unfreeze": str(values["unfreeze"])} if "unfreeze" in values else {})})
        trial.clip_unfreeze = True
        return trial

    def load_data(self):
        self.data, self.statistics = load_data(self.config)

    def batch_size(self, requested):
        return min(requested, self.data.sizes["train"])

    def input_shape(self):
        return self.base.input_size, self.base.channels

    def build_model(self):
        from dlsuite.apps.vision import backbones

        config = self.config
        self.base = backbones.build_base(config.backbone, weights=self.weights, input_size=config.input_size,
                                         channels=self.data.channels, statistics=self.statistics,
                                         preprocessing=config.preprocess, batch_norm=config.batch_norm,
                                         trust_model=config.trust_model)
        model = build_transfer_model(self.base, classes=len(self.data.class_names), augment=config.augment,
                                     seed=config.seed, head_dropout=config.head_dropout)
        if not self.clip_unfreeze:
            set_trainable(model, config.unfreeze)  # checks --unfreeze against the backbone before training
        return model

    def unfreeze_count(self, model):
        """--unfreeze, or for a trial at most the backbone's weighted layers."""
        if not self.clip_unfreeze or self.config.unfreeze == "all":
            return self.config.unfreeze
        import keras

        tunable = sum(1 for layer in model.get_layer("backbone").layers
                      if layer.weights and not isinstance(layer, keras.layers.BatchNormalization))
        return min(int(self.config.unfreeze), tunable)

    def phases(self):
        config, optimizer = self.config, self.optimizer_config()

        def trainable(layers):
            def prepare(model):
                count = set_trainable(model, self.unfreeze_count(model) if layers == "unfreeze" else layers)
                return f"{count} backbone layers trainable"

            return prepare

        if self.scratch:  # random features are not worth freezing: every layer at the full rate
            return [task.Phase("scratch", config.freeze_epochs + config.finetune_epochs, optimizer, trainable("all"))]
        finetune = dataclasses.replace(optimizer, lr=optimizer.learning_rate * config.finetune_lr_factor)
        return [task.Phase("freeze", config.freeze_epochs, optimizer, trainable(0)),
                task.Phase("finetune", config.finetune_epochs, finetune, trainable("unfreeze"))]

    def resolved(self, model, batches):
        base = self.base
        return {"backbone": base.name, "weights": base.source, "preprocessing": base.preprocessing,
                "input_size": list(base.input_size), "channels": base.channels, "class_names": self.data.class_names,
                "sizes": self.data.sizes}

    def describe(self, model, batches):
        base, line = getattr(self, "base", None), self.data_line()  # a search describes its data before any model
        if base is None:
            return line
        return (f"{base.name} ({base.source}) on {line}, input "
                f"{base.input_size[0]}x{base.input_size[1]}x{base.channels}")

    def title(self):
        return f"{self.base.name} on {self.data.name}"

    def export(self, model, figures, *, name=None, base_dir=None):
        from dlsuite.apps.core import rundir
        from dlsuite.apps.vision import export

        # Not `classify`'s <model>_<dataset> (issue #27): `--weights saved_models/lenet5_shapes` then
        # exported into its own source's folder, and the next run's --weights read that version back.
        return export.export_classifier(model, class_names=self.data.class_names, base_dir=base_dir,
                                        name=name or f"{self.base.name}_{rundir.slug(self.data.name)}_transfer",
                                        facts=self.export_facts())

