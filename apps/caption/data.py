"""Image-captioning data: images with several reference captions each, split three ways.

Every source gives the same `CaptionData`: for train, validation and test a
`CaptionSplit` whose `images` is an unbatched tf.data.Dataset of uint8 (H, W,
C) pixels in the order of its `captions` (one list of reference strings per
image) and `names` (file names or ids). The sources:

* "scenes", the offline default: generated images of one or two shapes with
  a colour and a size, the second placed above, below, left or right of the
  first, described by a small grammar ("a small red circle above a large blue
  square", "a large blue square below a small red circle", ...). Four
  references per image, so BLEU has something to match against; the words
  can only be right if the model looks at the image.
* a folder of images plus a captions file, in the formats people have:
  Flickr8k/Flickr30k token files (`1000268201_693b08cb0e.jpg#0<TAB>A child
  ...`), the Kaggle CSVs (`image,caption` or Flickr30k's `image_name|
  comment_number| comment`), COCO captions JSON (`images` + `annotations`)
  and Karpathy's `dataset_*.json` (with its own splits).
* "tfds:coco_captions" (or another TensorFlow Datasets set with an image and
  a `captions` sequence of `text`) through `tfds.load`.

Bad files are reported, not fatal where the rest is usable: captions naming
missing or unreadable images and empty captions are skipped with a warning
(the list goes to `CaptionData.warnings`); malformed lines are errors that
name the line.
"""

import collections
import csv
import dataclasses
import io
import json
import math
import os
import sys

import numpy as np

from dlsuite.apps.core import tfds_sets
from dlsuite.apps.core.errors import UsageError

SCENES = "scenes"
TFDS_PREFIX = "tfds:"

# The scenes grammar: shapes, colours (RGB) and sizes (radius as a fraction of the side).
SCENE_SHAPES = ("circle", "square", "triangle", "cross")
SCENE_COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "white": (235, 235, 235),
    "purple": (150, 60, 210),
}
SCENE_SIZES = {"small": (0.09, 0.12), "large": (0.17, 0.21)}
# Relation of the second object to the first, and its inverse. Short phrases on
# purpose: "to the left of a" would be a 4-gram every horizontal scene shares,
# and a caption that ignores the image would score BLEU-4 on such n-grams alone.
RELATIONS = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
SINGLE_FRACTION = 0.25  # share of scenes with one object
MIN_SCENE_SIZE = 32

# How many missing files a warning names before it just counts.
_LISTED = 5


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


# --- scenes --------------------------------------------------------------------------


def _draw(draw, shape, centre, radius, colour):
    cx, cy = centre
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    elif shape == "square":
        side = radius * 0.9  # the same area, roughly, as the circle
        draw.rectangle((cx - side, cy - side, cx + side, cy + side), fill=colour)
    elif shape == "triangle":
        points = [(cx + radius * math.cos(a), cy + radius * math.sin(a))
                  for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        draw.polygon(points, fill=colour)
    elif shape == "cross":
        arm = radius * 0.35
        draw.rectangle((cx - radius, cy - arm, cx + radius, cy + arm), fill=colour)
        draw.rectangle((cx - arm, cy - radius, cx + arm, cy + radius), fill=colour)
    else:
        raise ValueError(f"unknown scene shape {shape!r}")


def scene_captions(objects, relation=None):
    """The reference captions of a scene.

    Args:
        objects: one or two (size, colour, shape) tuples; with two, the
            second is `relation` the first ("above", "left of", ...).
        relation: a key of RELATIONS, for two objects.

    Returns:
        Four references: with and without sizes, from either object's side.
    """
    def full(obj):
        return f"a {obj[0]} {obj[1]} {obj[2]}"

    def short(obj):
        return f"a {obj[1]} {obj[2]}"

    if len(objects) == 1:
        (obj,) = objects
        return [full(obj), short(obj), f"one {obj[0]} {obj[1]} {obj[2]}", f"a single {obj[1]} {obj[2]}"]
    first, second = objects
    inverse = RELATIONS[relation]
    return [
        f"{full(second)} {relation} {full(first)}",
        f"{full(first)} {inverse} {full(second)}",
        f"{short(second)} {relation} {short(first)}",
        f"{short(first)} {inverse} {short(second)}",
    ]


def generate_scenes(*, count=2000, size=64, seed=0):
    """Draws `count` scenes with their reference captions.

    One object (a quarter of the scenes) or two, each a shape in a colour and
    a size, the two in different halves of the image so that the relation
    (above, below, left, right) is never ambiguous. Colours jitter, the
    background is a random dark grey, and pixel noise goes on top, so no
    single pixel value names a word.

    Args:
        count: number of images.
        size: image side in pixels (at least MIN_SCENE_SIZE).
        seed: the same seed gives the same images, captions and order.

    Returns:
        (images uint8 (count, size, size, 3), captions: list of 4 strings per image).

    Raises:
        UsageError: `count` or `size` out of range.
    """
    from PIL import Image, ImageDraw

    if not isinstance(count, int) or count < 1:
        raise UsageError(f"--scenes-count must be a positive number of images, received {count!r}")
    if not isinstance(size, int) or not MIN_SCENE_SIZE <= size <= 1024:
        raise UsageError(f"--scenes-size must be {MIN_SCENE_SIZE} to 1024 pixels, received {size!r}")
    rng = np.random.default_rng(seed)
    colour_names, size_names = list(SCENE_COLOURS), list(SCENE_SIZES)
    relations = list(RELATIONS)
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    captions = []
    for i in range(count):
        background = tuple(int(v) for v in rng.integers(0, 60, size=3))
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        single = rng.random() < SINGLE_FRACTION
        objects = []
        while len(objects) < (1 if single else 2):
            candidate = (size_names[rng.integers(len(size_names))], colour_names[rng.integers(len(colour_names))],
                         SCENE_SHAPES[rng.integers(len(SCENE_SHAPES))])
            if candidate[1:] not in [obj[1:] for obj in objects]:  # two objects differ in colour or shape
                objects.append(candidate)
        radii = [rng.uniform(*SCENE_SIZES[obj[0]]) * size for obj in objects]
        relation = None
        if single:
            r = radii[0]
            centres = [rng.uniform(r, size - r, size=2)]
        else:
            relation = relations[rng.integers(len(relations))]
            # The first object in one half, the second in the other; along
            # the other axis anywhere, so position alone says little.
            axis = 1 if relation in ("above", "below") else 0
            second_first = relation in ("above", "left of")
            centres = []
            for j, r in enumerate(radii):
                low_half = (j == 1) == second_first
                centre = rng.uniform(r, size - r, size=2)
                # Wholly inside its half, so the two never touch.
                half = (r + 1, size / 2 - r - 1) if low_half else (size / 2 + r + 1, size - r - 1)
                centre[axis] = rng.uniform(*half)
                centres.append(centre)
        for obj, centre, r in zip(objects, centres, radii):
            jitter = rng.integers(-20, 21, size=3)
            colour = tuple(int(v) for v in np.clip(np.array(SCENE_COLOURS[obj[1]]) + jitter, 0, 255))
            _draw(draw, obj[2], centre, r, colour)
        images[i] = np.asarray(image)
        captions.append(scene_captions(objects, relation))
    noise = rng.normal(0.0, 6.0, size=images.shape).astype(np.float32)
    images = np.clip(images + noise, 0, 255).round().astype(np.uint8)
    return images, captions


def _split_indices(count, *, seed, validation_fraction, test_fraction, name, given=()):
    """Shuffled image indices for train, validation and test (by image, never by caption);
    a split in `given` comes from a file of its own and takes no image here."""
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


def _array_split(images, captions, names, indices):
    import tensorflow as tf

    return CaptionSplit(images=tf.data.Dataset.from_tensor_slices(images[indices]),
                        captions=[captions[i] for i in indices], names=[names[i] for i in indices])


def _load_scenes(*, seed, count, size, validation_fraction, test_fraction):
    images, captions = generate_scenes(count=count, size=size, seed=seed)
    names = [f"scene_{i:05d}" for i in range(count)]
    split = _split_indices(count, seed=seed, validation_fraction=validation_fraction, test_fraction=test_fraction,
                           name="scenes")
    return CaptionData(name=SCENES, channels=3, image_shape=(size, size, 3),
                       **{key: _array_split(images, captions, names, indices) for key, indices in split.items()})


# --- captions files ------------------------------------------------------------------


@dataclasses.dataclass
class CaptionsFile:
    """What a captions file says: references per image name, optional splits, problems found."""

    captions: dict  # name -> [caption, ...] in file order
    splits: dict | None = None  # name -> "train" / "validation" / "test" (Karpathy JSON only)
    warnings: list = dataclasses.field(default_factory=list)


def read_captions_file(path):
    """Parses a captions file in any supported format (see the module docstring).

    Raises:
        UsageError: a missing or unreadable file, or a malformed line/entry,
            naming the line number.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UsageError(f"--captions {path!r} does not exist; pass a Flickr token file, a CSV or a COCO captions JSON")
    try:
        with open(path, encoding="utf-8-sig") as handle:
            text = handle.read()
    except UnicodeDecodeError as error:
        raise UsageError(f"--captions {path!r} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise UsageError(f"cannot read --captions {path!r}: {error.strerror or error}") from None
    if path.lower().endswith(".json") or text.lstrip().startswith("{"):
        return _read_json(path, text)
    first = next((line for line in text.splitlines() if line.strip()), "")
    header = [cell.strip().lower() for cell in first.replace("|", ",").split(",")]
    if "\t" not in first and any(h in ("image", "image_name") for h in header) and any(
            h in ("caption", "comment") for h in header):
        return _read_csv(path, text, delimiter="|" if "|" in first else ",")
    return _read_token_lines(path, text)


def _add(found, warnings, name, caption, where):
    caption = " ".join(str(caption).split())
    if not caption:
        warnings.append(f"{where}: empty caption for {name}, skipped")
        return
    found.setdefault(name, []).append(caption)


def _read_token_lines(path, text):
    """Flickr8k/30k: `name.jpg#N<TAB>caption` (the #N is optional)."""
    found, warnings = {}, []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        name, tab, caption = line.partition("\t")
        name = name.strip()
        if not tab or not name:
            shown = line if len(line) <= 60 else line[:57] + "..."
            raise UsageError(f"--captions {path!r} line {number}: expected IMAGE#N<TAB>CAPTION (Flickr token format), "
                             f"received {shown!r}")
        name = name.split("#", 1)[0] if "#" in name else name
        _add(found, warnings, name, caption, f"{path} line {number}")
    if not found:
        raise UsageError(f"--captions {path!r} holds no captions")
    return CaptionsFile(found, warnings=warnings)


def _read_csv(path, text, *, delimiter):
    """Kaggle Flickr8k `image,caption` or Flickr30k `image_name| comment_number| comment`."""
    found, warnings = {}, []
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    header = [cell.strip().lower() for cell in next(reader)]
    image_column = next(i for i, h in enumerate(header) if h in ("image", "image_name"))
    caption_column = next(i for i, h in enumerate(header) if h in ("caption", "comment"))
    for row in reader:
        number = reader.line_num
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(image_column, caption_column):
            raise UsageError(f"--captions {path!r} line {number}: expected {len(header)} columns "
                             f"({delimiter.join(header)}), received {len(row)}")
        _add(found, warnings, row[image_column].strip(), row[caption_column], f"{path} line {number}")
    if not found:
        raise UsageError(f"--captions {path!r} holds no captions")
    return CaptionsFile(found, warnings=warnings)


def _read_json(path, text):
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"--captions {path!r} line {error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UsageError(f"--captions {path!r}: expected a COCO captions JSON ({{\"images\": [...], "
                         "\"annotations\": [...]}}) or a Karpathy dataset_*.json")
    if "annotations" in data:
        return _read_coco(path, data)
    return _read_karpathy(path, data)


def _read_coco(path, data):
    found, warnings = {}, []
    file_names = {}
    for index, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise UsageError(f"--captions {path!r}: images[{index}] needs \"id\" and \"file_name\", received {image!r:.80}")
        file_names[image["id"]] = image["file_name"]
    unknown = 0
    for index, annotation in enumerate(data["annotations"]):
        if not isinstance(annotation, dict) or "image_id" not in annotation or "caption" not in annotation:
            raise UsageError(f"--captions {path!r}: annotations[{index}] needs \"image_id\" and \"caption\", "
                             f"received {annotation!r:.80}")
        name = file_names.get(annotation["image_id"])
        if name is None:
            unknown += 1
            continue
        _add(found, warnings, name, annotation["caption"], f"{path} annotations[{index}]")
    if unknown:
        warnings.append(f"{path}: {unknown} annotations name an image id not in \"images\", skipped")
    for name in file_names.values():
        if name not in found:
            warnings.append(f"{path}: image {name} has no captions, skipped")
    if not found:
        raise UsageError(f"--captions {path!r} holds no captions")
    return CaptionsFile(found, warnings=warnings)


def _read_karpathy(path, data):
    """Karpathy and Li's dataset_flickr8k.json / dataset_coco.json, with their splits."""
    found, warnings, splits = {}, [], {}
    names = {"train": "train", "restval": "train", "val": "validation", "test": "test"}
    for index, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "filename" not in image or "sentences" not in image:
            raise UsageError(f"--captions {path!r}: images[{index}] needs \"filename\" and \"sentences\" "
                             f"(Karpathy format), received {image!r:.80}")
        name = os.path.join(image.get("filepath", ""), image["filename"])
        for sentence in image["sentences"]:
            text = sentence.get("raw") or " ".join(sentence.get("tokens", [])) if isinstance(sentence, dict) else sentence
            _add(found, warnings, name, text, f"{path} images[{index}]")
        if name not in found:
            warnings.append(f"{path}: image {name} has no captions, skipped")
        if image.get("split") in names:
            splits[name] = names[image["split"]]
    if not found:
        raise UsageError(f"--captions {path!r} holds no captions")
    return CaptionsFile(found, splits=splits or None, warnings=warnings)


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
    from dlsuite.apps.vision import file_checks

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


def _load_folder(images_dir, captions_path, *, seed, validation_fraction, test_fraction, strict, given=None):
    """Images with the captions of `captions_path`, split by fractions, by a
    Karpathy file's own splits, or taken from `given` ({"validation"/"test": captions file})."""
    given = given or {}
    found = captioned_images(images_dir, captions_path, strict=strict, others_described=bool(given))
    if given:
        split = _split_indices(len(found.names), seed=seed, validation_fraction=validation_fraction,
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
        split = _split_indices(len(found.names), seed=seed, validation_fraction=validation_fraction,
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


# --- TensorFlow Datasets ---------------------------------------------------------------


def _tfds_caption_splits(name, known):
    """The TFDS split names for train, validation and test; `known` may be empty (unknown metadata)."""
    def pick(*candidates):
        return next((c for c in candidates if not known or c in known), None)

    chosen = {"train": pick("train"), "validation": pick("val", "validation"), "test": pick("test")}
    missing = [key for key, value in chosen.items() if value is None]
    if missing:
        raise UsageError(f"tfds:{name} has no {missing[0]} split (it has {', '.join(sorted(known))}); "
                         "use a folder and a captions file instead")
    return chosen


def _load_tfds(name, *, data_dir, max_images):
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


# --- entry point -------------------------------------------------------------------------


def load(dataset=SCENES, *, images=None, captions=None, seed=0, validation_fraction=0.1, test_fraction=0.1,
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
        A `CaptionData`.
    """
    given = {key: os.fspath(path) for key, path in (("validation", validation_captions), ("test", test_captions))
             if path is not None}
    if given and images is None:
        raise UsageError("--validation-captions and --test-captions name images of --images; pass --images DIR "
                         "--captions FILE with them")
    if (images is None) != (captions is None):
        raise UsageError("--images and --captions go together: the folder of images and the file of their captions")
    if images is not None:
        data = _load_folder(os.fspath(images), os.fspath(captions), seed=seed, validation_fraction=validation_fraction,
                            test_fraction=test_fraction, strict=strict, given=given)
    elif dataset == SCENES:
        data = _load_scenes(seed=seed, count=scenes_count, size=scenes_size, validation_fraction=validation_fraction,
                            test_fraction=test_fraction)
    elif str(dataset).startswith(TFDS_PREFIX):
        return _load_tfds(dataset[len(TFDS_PREFIX):], data_dir=data_dir, max_images=max_images)
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


# --- cached features and training batches ---------------------------------------------------


def cache_split(split, *, path, image_size, channels, batch_size, encoder=None, label="images"):
    """Runs the images of `split` once and keeps the result in a .npy file (memory-mapped).

    With a frozen `encoder` the file holds its feature maps (float32), so
    decoder epochs read features instead of re-running the CNN; with
    `encoder=None` (end-to-end training) it holds the resized pixels (uint8),
    so epochs skip decoding and resizing. Written to a temporary name and
    renamed, so a half-written cache is never read.

    Returns:
        The array, memory-mapped read-only: (N, h, w, c) features or (N, H, W, C) pixels.
    """
    import keras

    from dlsuite.apps.vision import pipeline

    count = len(split)
    if encoder is not None:
        shape, dtype = tuple(int(d) for d in encoder.output.shape[1:]), np.float32
    else:
        shape, dtype = (*image_size, channels), np.uint8
    batches = pipeline.batches(split.images.map(lambda image: (image, 0)), image_size=image_size, channels=channels,
                               batch_size=batch_size, training=False, cache=False)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = path + ".tmp.npy"
    array = np.lib.format.open_memmap(temporary, mode="w+", dtype=dtype, shape=(count, *shape))
    progress = keras.utils.Progbar(count, unit_name="image", verbose=1 if sys.stdout.isatty() else 2)
    position = 0
    try:
        for images, _ in batches:
            values = encoder(images, training=False) if encoder is not None else images
            values = np.asarray(values)
            array[position:position + len(values)] = values.astype(dtype) if encoder is not None else np.round(values)
            position += len(values)
            progress.update(position)
        if position != count:
            raise RuntimeError(f"{label}: the pipeline gave {position} images for {count} captioned ones")
        array.flush()
        del array
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return np.load(path, mmap_mode="r")


def caption_pairs(captions, vocabulary, *, max_length):
    """Every (image, reference) pair of a split: image indices and teacher-forcing ids.

    Returns:
        (image_index int32 (P,), inputs, targets int32 (P, max_length + 1), truncated count).
    """
    image_index = np.array([i for i, references in enumerate(captions) for _ in references], np.int32)
    flat = [reference for references in captions for reference in references]
    inputs, targets, truncated = vocabulary.encode(flat, max_length=max_length)
    return image_index, inputs, targets, truncated


def caption_batches(cache, pairs, *, batch_size, shuffle, seed=0):
    """((features or pixels, inputs), targets) batches of the pairs, rows gathered from `cache`.

    The pair list (a few ints each) is shuffled whole every epoch; the image
    rows are read from the memory-mapped cache per batch, so a cache larger
    than memory still trains.
    """
    pair_rows, finish = _caption_pipeline(cache, pairs, batch_size=batch_size)
    if shuffle:
        return finish(pair_rows.shuffle(len(pairs[0]), seed=seed, reshuffle_each_iteration=True))
    return finish(pair_rows)


def caption_order(cache, pairs, *, batch_size, seed=0):
    """The shuffled training batches of `caption_batches` as an
    `epochs.EpochOrder`: each epoch's order a function of (seed, epoch), so a
    resumed run sees what the interrupted one would have."""
    from dlsuite.apps.core import epochs

    pair_rows, finish = _caption_pipeline(cache, pairs, batch_size=batch_size)
    return epochs.EpochOrder(pair_rows, buffer=len(pairs[0]), seed=seed, finish=finish)


def _caption_pipeline(cache, pairs, *, batch_size):
    """(the unbatched (image index, inputs, targets) rows, the function that
    batches them and gathers their image rows from `cache`)."""
    import tensorflow as tf

    image_index, inputs, targets, _ = pairs
    dtype = tf.float32 if cache.dtype == np.float32 else tf.uint8
    row_shape = cache.shape[1:]

    def rows(indices):
        return np.ascontiguousarray(cache[indices])

    def gather(index, inputs, targets):
        values = tf.numpy_function(rows, [index], dtype, stateful=False)
        values = tf.cast(tf.ensure_shape(values, (None, *row_shape)), tf.float32)
        return (values, inputs), targets

    def finish(dataset):
        dataset = dataset.batch(batch_size).map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return dataset.prefetch(tf.data.AUTOTUNE)

    return tf.data.Dataset.from_tensor_slices((image_index, inputs, targets)), finish
