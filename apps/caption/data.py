"""Image-captioning data: images with several reference captions each, split three ways.

Every source gives the same `splits.CaptionData`: for train, validation and
test a `CaptionSplit` whose `images` is an unbatched tf.data.Dataset of uint8
(H, W, C) pixels in the order of its `captions` (one list of reference
strings per image) and `names` (file names or ids). The sources, one module
each:

* "scenes" (`scenes.py`), the offline default: generated images of one or
  two coloured shapes, described by a small grammar.
* a folder of images plus a captions file (`folder.py`), in the formats
  `caption_files.py` reads: Flickr token files, the Kaggle CSVs, COCO
  captions JSON and Karpathy's `dataset_*.json` (with its own splits).
* "tfds:coco_captions" or another TensorFlow Datasets captioning set
  (`tfds_captions.py`).

What training makes of a split is elsewhere: `feature_cache.py` runs the
images once, `batches.py` pairs each reference with its cached image row.
"""

import collections
import os

from dlsuite.apps.caption import folder, scenes, tfds_captions
from dlsuite.apps.caption.splits import CaptionSplit
from dlsuite.apps.core.errors import UsageError


def load(dataset=scenes.SCENES, *, images=None, captions=None, seed=0, validation_fraction=0.1, test_fraction=0.1,
         scenes_count=2000, scenes_size=64, data_dir=None, max_images=None, strict=False, validation_captions=None,
         test_captions=None):
    """Loads a captioning dataset and splits it by image.

    Args:
        dataset: "scenes" or "tfds:NAME"; ignored when `images` and `captions` are given.
        images, captions: a folder of images and a captions file naming them.
        seed: seeds the scenes and the split.
        validation_fraction, test_fraction: shares of the images held out
            (sources with their own splits keep them).
        scenes_count, scenes_size: the generated set's size and image side.
        data_dir: TFDS only, where TensorFlow Datasets keeps its files.
        max_images: keep at most this many images per split (None: all).
        strict: stop at an unreadable image instead of skipping it.
        validation_captions, test_captions: captions files (of images in
            `images`) that are those splits whole; nothing of `captions` is
            split off for them.

    Returns:
        A `splits.CaptionData`.
    """
    given = {key: os.fspath(path) for key, path in (("validation", validation_captions), ("test", test_captions))
             if path is not None}
    if given and images is None:
        raise UsageError("--validation-captions and --test-captions name images of --images; pass --images DIR "
                         "--captions FILE with them")
    if (images is None) != (captions is None):
        raise UsageError("--images and --captions go together: the folder of images and the file of their captions")
    if images is not None:
        data = folder.load_folder(os.fspath(images), os.fspath(captions), seed=seed,
                                  validation_fraction=validation_fraction, test_fraction=test_fraction,
                                  strict=strict, given=given)
    elif dataset == scenes.SCENES:
        data = scenes.load_scenes(seed=seed, count=scenes_count, size=scenes_size,
                                  validation_fraction=validation_fraction, test_fraction=test_fraction)
    elif str(dataset).startswith(tfds_captions.TFDS_PREFIX):
        return tfds_captions.load_tfds(dataset[len(tfds_captions.TFDS_PREFIX):], data_dir=data_dir,
                                       max_images=max_images)
    else:
        raise UsageError(f"unknown --dataset {dataset!r}: use scenes (generated, offline), tfds:coco_captions, "
                         "or --images DIR --captions FILE")
    if max_images:
        for key in ("train", "validation", "test"):
            split = getattr(data, key)
            if len(split) > max_images:
                setattr(data, key, CaptionSplit(split.images.take(max_images), split.captions[:max_images],
                                                split.names[:max_images]))
    return data


def most_frequent_caption(captions):
    """The reference that occurs most often (first seen wins ties): the image-blind baseline."""
    counts = collections.Counter(reference for references in captions for reference in references)
    return max(counts, key=lambda reference: counts[reference])
