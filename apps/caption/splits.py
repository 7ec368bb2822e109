"""What every caption source gives: `CaptionData` of three `CaptionSplit`s, split by image."""

import dataclasses

import numpy as np

from dlsuite.apps.core.errors import UsageError


@dataclasses.dataclass
class CaptionSplit:
    """One split: images and their reference captions, in the same order.

    Attributes:
        images: unbatched uint8 (H, W, C) raw pixels, one per entry of `captions`.
        captions: [[reference, ...], ...], at least one non-empty string per image.
        names: the image's file name (relative to the folder) or id.
    """

    images: "object"
    captions: list
    names: list

    def __len__(self):
        return len(self.captions)


@dataclasses.dataclass
class CaptionData:
    """A captioning dataset: three splits, the channel count, what was skipped."""

    name: str
    train: CaptionSplit
    validation: CaptionSplit
    test: CaptionSplit
    channels: int
    image_shape: tuple | None
    warnings: list = dataclasses.field(default_factory=list)

    @property
    def sizes(self):
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


def split_indices(count, *, seed, validation_fraction, test_fraction, name, given=()):
    """Shuffled image indices for train, validation and test (by image, never by caption).

    Args:
        count: the number of captioned images.
        seed: the same seed gives the same split.
        validation_fraction, test_fraction: shares of the images held out.
        name: the source, as error messages name it.
        given: splits that come from a file of their own and take no image here.

    Returns:
        {"train" / "validation" / "test": sorted int64 indices}.

    Raises:
        UsageError: a fraction out of range, or too few images for three splits.
    """
    if given:
        validation_fraction = 0.0 if "validation" in given else validation_fraction
        test_fraction = 0.0 if "test" in given else test_fraction
    for key, label, value in (("validation", "--validation-fraction", validation_fraction),
                              ("test", "--test-fraction", test_fraction)):
        if key in given:
            continue
        if not 0.0 < value < 1.0:
            raise UsageError(f"{label} must be between 0 and 1, received {value!r}")
    if validation_fraction + test_fraction >= 1.0:
        raise UsageError(f"--validation-fraction + --test-fraction = {validation_fraction + test_fraction:g} "
                         "leaves no training images; lower them")
    order = np.random.default_rng(seed).permutation(count)
    n_validation = 0 if "validation" in given else max(1, int(round(count * validation_fraction)))
    n_test = 0 if "test" in given else max(1, int(round(count * test_fraction)))
    if count - n_validation - n_test < 1:
        raise UsageError(f"{name} has {count} captioned images: too few for train, validation and test splits; "
                         "add images or lower --validation-fraction/--test-fraction")
    return {"train": np.sort(order[n_validation + n_test:]), "validation": np.sort(order[:n_validation]),
            "test": np.sort(order[n_validation:n_validation + n_test])}
