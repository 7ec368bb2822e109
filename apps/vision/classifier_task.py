"""What the image-classifier tasks share (classify, transfer): the splits as
tf.data batches at the model's input size, the loss, test scoring with the
classification report, the end-of-run line. A subclass says where the data
comes from, which input size and channels the model takes, and builds it."""

from dlsuite.apps.core import task


class ImageClassifierTask(task.Task):
    """A `Task` over a `datasets.ImageDataset` (`self.data`, set by `load_data`)."""

    def input_shape(self):
        """((height, width), channels) the model takes."""
        raise NotImplementedError

    def train_examples(self):
        return self.data.sizes["train"]

    def split(self, name, batch_size, *, training=False):
        """The batches of one split at the model's input size; evaluation
        batches are kept (a search's trials share them)."""
        from dlsuite.apps.vision import pipeline

        size, channels = self.input_shape()
        shape = dict(image_size=tuple(size), channels=channels, batch_size=batch_size)
        if training:  # an `epochs.EpochOrder`: each epoch's order depends on the seed and the epoch alone
            return pipeline.epoch_order(getattr(self.data, name), seed=self.config.seed, **shape)
        cache = self.__dict__.setdefault("_split_cache", {})
        key = (name, tuple(size), batch_size)
        if key not in cache:
            cache[key] = pipeline.batches(getattr(self.data, name), training=False, **shape)
        return cache[key]

    def batches(self, batch_size):
        train_size = self.data.sizes["train"]
        return task.Batches(train=self.split("train", batch_size, training=True),
                            validation=self.split("validation", batch_size), batch_size=batch_size,
                            steps_per_epoch=-(-train_size // batch_size), train_examples=train_size)

    def loss(self):
        import keras

        return keras.losses.SparseCategoricalCrossentropy()

    def data_line(self):
        data = self.data
        return (f"{data.name}: {data.sizes['train']} train / {data.sizes['validation']} validation / "
                f"{data.sizes['test']} test images, {len(data.class_names)} classes")

    def evaluate(self, model, run_dir):
        from dlsuite.apps.vision import metrics

        return metrics.score_classifier(model, self.split("test", 256), self.data.class_names, run_dir)

    def report(self, figures):
        from dlsuite.apps.vision import metrics

        return metrics.report_line(figures)
