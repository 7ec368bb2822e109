"""A folder of images with a captions file naming them: which images are usable, and their splits.

Captions naming missing or unreadable images are skipped with a warning (the
list goes to `CaptionData.warnings`), as are images no caption names; a
Karpathy JSON keeps its own splits, other files are split by fraction, and
separate validation/test captions files are those splits whole.
"""

import dataclasses
import os

import numpy as np

from dlsuite.apps.caption.caption_files import read_captions_file
from dlsuite.apps.caption.splits import CaptionData, CaptionSplit, split_indices
from dlsuite.apps.core.errors import UsageError
from dlsuite.apps.vision import file_checks

# How many missing files a warning names before it just counts.
_LISTED = 5


def list_some(items):
    """The first few items, comma-separated, and how many more."""
    shown = ", ".join(items[:_LISTED])
    return shown + (f" and {len(items) - _LISTED} more" if len(items) > _LISTED else "")


@dataclasses.dataclass
class CaptionedImages:
    """The readable images a captions file describes, with their references."""

    names: list
    paths: list
    captions: list
    splits: dict | None  # name -> split, from a Karpathy JSON
    channels: int
    image_shape: tuple | None
    warnings: list


def captioned_images(images_dir, captions_path, *, strict=False, others_described=False):
    """Pairs a captions file with an image folder: missing, unreadable and uncaptioned images are warnings.

    Raises:
        UsageError: no folder, a malformed captions file, or no usable image at all.
    """
    images_dir, captions_path = os.fspath(images_dir), os.fspath(captions_path)
    if not os.path.isdir(images_dir):
        raise UsageError(f"--images {images_dir!r} is not a folder; pass the folder that holds the images")
    parsed = read_captions_file(captions_path)
    warnings = list(parsed.warnings)
    names = sorted(parsed.captions)
    paths = [os.path.join(images_dir, name) for name in names]
    missing = [name for name, path in zip(names, paths) if not os.path.isfile(path)]
    if missing:
        warnings.append(f"{len(missing)} of {len(names)} images named in {captions_path} are not in {images_dir}, "
                        f"skipped: {list_some(missing)}")
    present = [(name, path) for name, path in zip(names, paths) if os.path.isfile(path)]
    if not present:
        raise UsageError(f"none of the {len(names)} images named in --captions {captions_path!r} is in --images "
                         f"{images_dir!r} (e.g. {names[0]!r}); pass the folder that holds them")
    checks = file_checks.check_images([path for _, path in present], strict=strict)
    unreadable = [f"{name} ({check.reason})" for (name, _), check in zip(present, checks) if check.reason]
    if unreadable:
        warnings.append(f"{len(unreadable)} images cannot be read, skipped: {list_some(unreadable)}")
    kept = [(name, path, check) for (name, path), check in zip(present, checks) if check.reason is None]
    if not kept:
        raise UsageError(f"no image named in --captions {captions_path!r} can be read; all {len(present)} failed to decode")
    described = {os.path.normpath(path) for _, path in present}
    uncaptioned = [entry.name for entry in os.scandir(images_dir) if entry.is_file()
                   and entry.name.lower().endswith(file_checks.IMAGE_EXTENSIONS)
                   and os.path.normpath(entry.path) not in described]
    if uncaptioned and not others_described:  # the other splits' files describe those
        warnings.append(f"{len(uncaptioned)} images in {images_dir} have no captions in {captions_path}, ignored: "
                        f"{list_some(sorted(uncaptioned))}")
    channels = 3 if any(check.colour for _, _, check in kept) else 1
    native = {check.shape[:2] for _, _, check in kept}
    return CaptionedImages(
        names=[name for name, _, _ in kept], paths=[path for _, path, _ in kept],
        captions=[parsed.captions[name] for name, _, _ in kept], splits=parsed.splits, channels=channels,
        image_shape=(*native.pop(), channels) if len(native) == 1 else None, warnings=warnings)


def load_folder(images_dir, captions_path, *, seed, validation_fraction, test_fraction, strict, given=None):
    """Images with the captions of `captions_path`, split by fractions, by a
    Karpathy file's own splits, or taken from `given` ({"validation"/"test": captions file})."""
    given = given or {}
    found = captioned_images(images_dir, captions_path, strict=strict, others_described=bool(given))
    if given:
        split = split_indices(len(found.names), seed=seed, validation_fraction=validation_fraction,
                              test_fraction=test_fraction, name=f"--captions {captions_path!r}", given=given)
        splits = _caption_splits(found, split)
        shapes = {found.image_shape}
        for key, path in given.items():
            other = captioned_images(images_dir, path, strict=strict, others_described=True)
            splits[key] = _caption_splits(other, {key: np.arange(len(other.names))})[key]
            found.warnings.extend(other.warnings)
            found.channels = max(found.channels, other.channels)
            shapes.add(other.image_shape)
        # One native size in every file: the encoder sees the images' own size, as without split files.
        image_shape = (*shapes.pop()[:2], found.channels) if len(shapes) == 1 and None not in shapes else None
        return CaptionData(name=os.path.basename(os.path.normpath(os.fspath(images_dir))) or "images",
                           channels=found.channels, image_shape=image_shape, warnings=found.warnings, **splits)
    if found.splits:
        split = {key: np.array([i for i, name in enumerate(found.names) if found.splits.get(name, "train") == key],
                               dtype=np.int64) for key in ("train", "validation", "test")}
        empty = [key for key, indices in split.items() if not len(indices)]
        if empty:
            raise UsageError(f"--captions {captions_path!r} assigns no readable image to the {empty[0]} split")
    else:
        split = split_indices(len(found.names), seed=seed, validation_fraction=validation_fraction,
                              test_fraction=test_fraction, name=f"--captions {captions_path!r}")
    return CaptionData(name=os.path.basename(os.path.normpath(os.fspath(images_dir))) or "images",
                       channels=found.channels, image_shape=found.image_shape, warnings=found.warnings,
                       **_caption_splits(found, split))


def _caption_splits(found, split):
    """{split: CaptionSplit} of `found`'s images at the indices of `split`."""
    import tensorflow as tf

    from dlsuite.apps.vision import sources

    decode = sources.decode_file(found.channels, found.image_shape)
    paths = np.array(found.paths)

    def image_only(path):
        return decode(tf.io.read_file(path))

    return {
        key: CaptionSplit(
            images=tf.data.Dataset.from_tensor_slices(paths[indices]).map(
                image_only, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True),
            captions=[found.captions[i] for i in indices], names=[found.names[i] for i in indices])
        for key, indices in split.items()
    }
