"""What the image-classifier tasks share (classify, transfer): the splits as
tf.data batches at the model's input size, the loss, test scoring with the
classification report, the end-of-run line. A subclass says where the data
comes from, which input size and channels the model takes, and builds it."""

from dlsuite.apps.core import task


def _current_strategy():
    import tensorflow as tf

    return tf.distribute.get_strategy()


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
        source, cache = self.data.sources[name], self.image_cache(name, tuple(size), channels)
        if training:  # an `epochs.EpochOrder`: each epoch's order depends on the seed and the epoch alone
            from dlsuite.apps.core import distribute

            return pipeline.epoch_order(source, seed=self.config.seed, cache=cache,
                                        service=getattr(self.config, "data_service", None),
                                        in_process=not distribute.is_parameter_server(_current_strategy()), **shape)
        kept = self.__dict__.setdefault("_split_batches", {})
        key = (name, tuple(size), batch_size)
        if key not in kept:
            kept[key] = pipeline.batches(source, training=False, cache=cache, **shape)
        return kept[key]

    def image_cache(self, name, size, channels):
        """The cache of split `name` at `size`, as the run's plan chose it
        (train and validation, read every epoch; the test split is read once
        and never cached). The plan's lines are printed when it is made."""
        from dlsuite.apps.core import distribute
        from dlsuite.apps.vision import image_cache, sources

        caches = self.__dict__.setdefault("_image_caches", {})
        if (name, size, channels) not in caches:
            mode = getattr(self.config, "cache", "auto")
            if distribute.is_parameter_server(_current_strategy()) and mode != "none":
                # The chief ships its pipeline to the workers as a graph; a
                # cache is an array in the chief's memory.
                print("parameter-server training reads images from their files every epoch (no cache)")
                mode = "none"
            if getattr(self.config, "data_service", None) and mode != "none":
                print(f"the tf.data service at {self.config.data_service} decodes the training images every epoch "
                      "(no cache)")
                mode = "none"
            splits = [(key, self.data.sources[key].count, size, channels) for key in ("train", "validation")]
            plan = image_cache.plan(splits, mode=mode, cache_dir=getattr(self.config, "cache_dir", None))
            for key, choice in plan.items():
                print(choice.line, flush=True)
                caches[(key, size, channels)] = image_cache.build(
                    self.data.sources[key], sources.prepared(size, channels), image_size=size, channels=channels,
                    kind=choice.kind, cache_dir=getattr(self.config, "cache_dir", None), label=f"{key} images")
            caches.setdefault(("test", size, channels), None)
        return caches.get((name, size, channels))

    def batches(self, batch_size):
        train_size = self.data.sizes["train"]
        return task.Batches(train=self.split("train", batch_size, training=True),
                            validation=self.split("validation", batch_size), batch_size=batch_size,
                            steps_per_epoch=-(-train_size // batch_size), train_examples=train_size)

    def read_failures(self):
        """Files skipped because they failed to decode when training read them."""
        return self.data.read_failures()

    def loss(self):
        import keras

        return keras.losses.SparseCategoricalCrossentropy()

    def data_line(self):
        data = self.data
        return (f"{data.name}: {data.sizes['train']} train / {data.sizes['validation']} validation / "
                f"{data.sizes['test']} test images, {len(data.class_names)} classes")

    def evaluate(self, model, run_dir):
        from dlsuite.apps.vision import metrics

        figures = metrics.score_classifier(model, self.split("test", 256), self.data.class_names, run_dir)
        if self.read_failures():  # found by a pipeline after the files were checked
            figures["skipped_when_read"] = self.read_failures()
        return figures

    def report(self, figures):
        from dlsuite.apps.vision import metrics

        return metrics.report_line(figures)
