"""Data and model for a short diagnostic run (overfit check, LR range test),
made from the classification pieces: `datasets.load`, `pipeline.batches`,
`classifier.build_classifier`, so a diagnosis looks at the very network
`dlsuite classify train` would train."""

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

        return pipeline.batches(getattr(self.data, split), image_size=(self.image_size,) * 2,
                                channels=self.data.channels, batch_size=batch_size, training=training, seed=seed)


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
        data.train, image_size=(size, size), channels=data.channels, batch_size=256, training=False))
    knobs = {key: value for key, value in knobs.items() if value is not None}
    return Setup(data, model_name, size, mean, variance, knobs)
