"""TensorFlow Datasets sets named on the command line as "tfds:NAME[/CONFIG]",
for every app that reads them (image classification, text, captions): the
builder by name, with a one-line error for a name the catalog lacks."""

from dlsuite.apps.core.errors import UsageError


def builder(name, *, data_dir, kind):
    """The TensorFlow Datasets builder for `name`; an unknown name is a
    UsageError pointing at the catalog for `kind` (e.g. "text sets")."""
    # Imported here: it takes seconds and only tfds sources need it.
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise UsageError(
            f"Unknown TensorFlow Datasets name {name!r} in 'tfds:{name}': see "
            f"https://www.tensorflow.org/datasets/catalog for {kind}."
        ) from None
