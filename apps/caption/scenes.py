"""The "scenes" caption set: generated images of one or two shapes, described by a small grammar.

Each shape has a colour and a size; a second one sits above, below, left or
right of the first ("a small red circle above a large blue square", "a large
blue square below a small red circle", ...). Four references per image, so
BLEU has something to match against; the words can only be right if the model
looks at the image. The shapes are drawn by `vision/shapes.py`.
"""

import math

import numpy as np
from PIL import Image, ImageDraw

from dlsuite.apps.caption.splits import CaptionData, CaptionSplit, split_indices
from dlsuite.apps.core.errors import UsageError
from dlsuite.apps.vision import shapes

SCENES = "scenes"

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
# How a scene poses each shape: (circumradius as a multiple of the object's
# radius, rotation in radians). Upright, so a shape's extent along either axis
# stays within its radius and the relation placement below holds; the square's
# half side is 0.9 radius, about the circle's area.
_POSES = {
    "circle": (1.0, 0.0),
    "square": (0.9 * math.sqrt(2), math.pi / 4),
    "triangle": (1.0, -math.pi / 2),
    "cross": (1.0, 0.0),
}
# Relation of the second object to the first, and its inverse. Short phrases on
# purpose: "to the left of a" would be a 4-gram every horizontal scene shares,
# and a caption that ignores the image would score BLEU-4 on such n-grams alone.
RELATIONS = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
SINGLE_FRACTION = 0.25  # share of scenes with one object
MIN_SCENE_SIZE = 32


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
            scale, rotation = _POSES[obj[2]]
            shapes.draw_shape(draw, obj[2], centre, r * scale, colour, rotation=rotation)
        images[i] = np.asarray(image)
        captions.append(scene_captions(objects, relation))
    noise = rng.normal(0.0, 6.0, size=images.shape).astype(np.float32)
    images = np.clip(images + noise, 0, 255).round().astype(np.uint8)
    return images, captions


def load_scenes(*, seed, count, size, validation_fraction, test_fraction):
    """`generate_scenes` split by image into a `CaptionData` named "scenes"."""
    import tensorflow as tf

    images, captions = generate_scenes(count=count, size=size, seed=seed)
    names = [f"scene_{i:05d}" for i in range(count)]
    split = split_indices(count, seed=seed, validation_fraction=validation_fraction, test_fraction=test_fraction,
                          name=SCENES)

    def array_split(indices):
        return CaptionSplit(images=tf.data.Dataset.from_tensor_slices(images[indices]),
                            captions=[captions[i] for i in indices], names=[names[i] for i in indices])

    return CaptionData(name=SCENES, channels=3, image_shape=(size, size, 3),
                       **{key: array_split(indices) for key, indices in split.items()})
