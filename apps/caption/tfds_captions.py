"""TensorFlow Datasets caption sets: "tfds:coco_captions", or any set with an
`image` and a `captions` sequence of `text`, in the set's own splits."""

import numpy as np

from dlsuite.apps.caption.splits import CaptionData, CaptionSplit
from dlsuite.apps.core import tfds_sets
from dlsuite.apps.core.errors import UsageError

TFDS_PREFIX = "tfds:"


def _tfds_caption_splits(name, known):
    """The TFDS split names for train, validation and test; `known` may be empty (unknown metadata).

    Raises:
        UsageError: the set lacks one of the three.
    """
    def pick(*candidates):
        return next((c for c in candidates if not known or c in known), None)

    chosen = {"train": pick("train"), "validation": pick("val", "validation"), "test": pick("test")}
    missing = [key for key, value in chosen.items() if value is None]
    if missing:
        raise UsageError(f"tfds:{name} has no {missing[0]} split (it has {', '.join(sorted(known))}); "
                         "use a folder and a captions file instead")
    return chosen


def load_tfds(name, *, data_dir, max_images):
    """The TFDS set `name` (without the "tfds:" prefix) as a `CaptionData`.

    Images without a caption are dropped from both the images and the references.

    Args:
        name: a TFDS name such as "coco_captions".
        data_dir: where TensorFlow Datasets keeps its files (None: its default).
        max_images: at most this many images per split (None: all).

    Raises:
        UsageError: not a captioning set, not downloadable, or a split with no captioned image.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    builder = tfds_sets.builder(name, data_dir=data_dir, kind="image-captioning sets (e.g. coco_captions)")
    features = builder.info.features
    keys = list(features.keys()) if isinstance(features, tfds.features.FeaturesDict) else []
    captions_feature = features["captions"] if "captions" in keys else None
    if not ("image" in keys and isinstance(features["image"], tfds.features.Image) and captions_feature is not None
            and "text" in getattr(captions_feature, "feature", {}).keys()):
        raise UsageError(f"tfds:{name} is not an image-captioning set: it needs an 'image' and a 'captions' sequence "
                         f"with 'text' (it has: {', '.join(keys) or type(features).__name__})")
    channels = features["image"].shape[-1]
    try:
        builder.download_and_prepare()
    except OSError as error:
        raise UsageError(f"could not download or prepare tfds:{name}: {error} (check the network, or pass the "
                         "--data-dir that already holds it)") from None
    chosen = _tfds_caption_splits(name, set(builder.info.splits.keys()))

    def limited(split):
        return f"{split}[:{max_images}]" if max_images else split

    splits = {}
    for key, split in chosen.items():
        # One cheap pass for the captions (images left encoded), then the images in the same stored order.
        texts = tfds.load(name, split=limited(split), data_dir=data_dir, shuffle_files=False, download=False,
                          decoders={"image": tfds.decode.SkipDecoding()})
        captions, names = [], []
        for index, example in enumerate(texts.map(lambda ex: ex["captions"]["text"]).as_numpy_iterator()):
            captions.append([" ".join(t.decode("utf-8").split()) for t in example if t.strip()])
            names.append(f"{split}/{index}")
        keep = np.array([bool(c) for c in captions])
        images = tfds.load(name, split=limited(split), data_dir=data_dir, shuffle_files=False, download=False)
        images = images.map(lambda ex: ex["image"], num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        if not keep.all():  # an image without captions teaches nothing: drop it from both
            mask = tf.constant(keep)
            images = images.enumerate().filter(lambda i, image: mask[i]).map(lambda i, image: image)
        splits[key] = CaptionSplit(images=images, captions=[c for c, k in zip(captions, keep) if k],
                                   names=[n for n, k in zip(names, keep) if k])
    empty = [key for key, split in splits.items() if not len(split)]
    if empty:
        raise UsageError(f"tfds:{name} split {chosen[empty[0]]!r} holds no captioned image")
    return CaptionData(name=f"{TFDS_PREFIX}{name}", channels=channels, image_shape=None, **splits)
