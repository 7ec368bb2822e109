"""Data and model for a short diagnostic run (overfit check, LR range test),
made from the classification pieces: `datasets.load`, `pipeline.batches`,
`classifier.build_classifier`, so a diagnosis looks at the very network
`dlsuite classify train` would train; for the range test also a language
model, made by `dlsuite lm train`'s own task."""

import dataclasses

from dlsuite.apps.core.errors import UsageError


@dataclasses.dataclass
class Setup:
    """What a diagnostic run needs: the data, the side the model sees and a way
    to build a fresh model."""

    data: object  # datasets.ImageDataset
    model_name: str
    image_size: int
    mean: object
    variance: object
    knobs: dict

    def build(self, seed=0):
        """A fresh classifier (raw pixels in, probabilities out), seeded."""
        import keras

        from dlsuite.apps.vision import classifier

        keras.utils.set_random_seed(seed)
        return classifier.build_classifier(
            self.model_name, classes=len(self.data.class_names), image_size=(self.image_size,) * 2,
            channels=self.data.channels, mean=self.mean, variance=self.variance, **self.knobs,
        )

    def batches(self, split, *, batch_size, training, seed=0):
        from dlsuite.apps.vision import pipeline

        return pipeline.batches(self.data.sources[split], image_size=(self.image_size,) * 2,
                                channels=self.data.channels, batch_size=batch_size, training=training, seed=seed)

    @property
    def name(self):
        return self.data.name

    @property
    def train_examples(self):
        return self.data.sizes["train"]

    def loss(self):
        import keras

        return keras.losses.SparseCategoricalCrossentropy()

    def train_command(self, **options):
        return _command("dlsuite classify train", options)


@dataclasses.dataclass
class LanguageModelSetup:
    """A language model of `dlsuite lm train` on its text, for the range test:
    the same builder, windows and loss (logits, every step)."""

    task: object  # an lm.task.LanguageModelTask with its data loaded
    text: str | None

    def build(self, seed=0):
        import keras

        keras.utils.set_random_seed(seed)
        return self.task.build_model()

    def batches(self, split, *, batch_size, training, seed=0):
        """Windows of `split` ("train" or "validation"), shuffled by the run's seed when training."""
        ids = {"train": self.task.train_ids, "validation": self.task.validation_ids}[split]
        return self.task.windows(ids, batch_size, shuffle=training)

    @property
    def name(self):
        return self.task.name

    @property
    def train_examples(self):
        return self.task.train_examples()

    def loss(self):
        return self.task.loss()

    def train_command(self, **options):
        config = self.task.config
        given = {"text": self.text, "cell": config.cell, "layers": config.layers, "units": config.units,
                 "seq-len": config.seq_len, **options}
        return _command("dlsuite lm train", given)


def _command(prefix, options):
    """`prefix --key value ...` for the options that have a value."""
    return " ".join([prefix, *(f"--{key} {value}" for key, value in options.items() if value is not None)])


def prepare_language_model(cell, *, text=None, layers, units, seq_len, max_chars, seed=0):
    """Loads the text of `dlsuite lm train --text TEXT` (default: the standard
    library's docstrings) and returns a `LanguageModelSetup`."""
    from dlsuite.apps.lm.task import LanguageModelTask, LMConfig

    lm_task = LanguageModelTask(LMConfig(text=text, cell=cell, layers=layers, units=units, seq_len=seq_len,
                                         max_chars=max_chars, seed=seed))
    lm_task.check()
    lm_task.load_data()
    return LanguageModelSetup(lm_task, text)


def image_size(requested, spec, data):
    """--image-size, else the data's own side when the model accepts it, else the model's."""
    if requested is not None:
        if requested < spec.min_input_size:
            raise UsageError(f"--image-size {requested} is too small for {spec.name}, which needs at least "
                             f"{spec.min_input_size}; pass --image-size {spec.min_input_size} or more")
        return requested
    shape = data.image_shape
    if shape and shape[0] == shape[1] and shape[0] >= spec.min_input_size:
        return shape[0]
    return spec.default_input_shape[0]


def prepare(model_name, dataset, *, seed=0, image_size_override=None, **knobs):
    """Loads `dataset`, checks `model_name` is a CNN and returns a `Setup`.

    Args:
        knobs: builder knobs (activation, kernel_initializer, batch_norm, ...);
            None values take the builder's defaults.
    """
    from dlsuite import models
    from dlsuite.apps.vision import classifier, datasets, pipeline

    spec = models.get(model_name)  # unknown names list the known ones
    if spec.kind != "cnn":
        raise UsageError(f"--model {model_name} is a {spec.kind} model; this check trains image classifiers, "
                         "pick a CNN such as lenet5 or resnet18 (see `dlsuite models list`)")
    data = datasets.load(dataset, seed=seed)
    size = image_size(image_size_override, spec, data)
    mean, variance = classifier.channel_statistics(pipeline.batches(
        data.sources["train"], image_size=(size, size), channels=data.channels, batch_size=256, training=False))
    knobs = {key: value for key, value in knobs.items() if value is not None}
    return Setup(data, model_name, size, mean, variance, knobs)
