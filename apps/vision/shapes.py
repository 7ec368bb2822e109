"""Generated images of geometric shapes: a small offline colour dataset.

Each image shows one shape (the class) drawn with PIL at a random position,
size and rotation, in a random fill colour on a random darker background,
with pixel noise on top. A small CNN learns it in a few epochs (about 85% on
4 classes after 10), yet no pixel statistic (colour, brightness, position)
gives the class away.
"""

import math

import numpy as np
from PIL import Image, ImageDraw

from dlsuite.apps.core.errors import UsageError

# Classes in the order they are taken: `classes=k` uses the first k, so the
# easy distinctions come first and every k is a superset of k - 1.
SHAPES = ("circle", "square", "triangle", "star", "cross", "pentagon", "hexagon", "ellipse")

MIN_SIZE = 16
MAX_SIZE = 1024

# Colours: a darker background and a brighter fill, at least this far apart in
# RGB and in luminance, so every shape stays visible under the noise and after
# conversion to grayscale. One polarity keeps the set learnable by LeNet-sized
# models from ~1,000 images; hue, brightness and noise still vary per image.
_BACKGROUND_MAX = 150
_FILL_MIN = 100
_MIN_CONTRAST = 110.0
_MIN_LUMA_CONTRAST = 60.0
_NOISE_STD = 8.0
# Shape circumradius as a fraction of the image side.
_RADIUS_RANGE = (0.22, 0.45)


def _regular_polygon(sides, radius, rotation):
    return [
        (radius * math.cos(rotation + 2 * math.pi * i / sides),
         radius * math.sin(rotation + 2 * math.pi * i / sides))
        for i in range(sides)
    ]


def _star(radius, rotation, points=5, inner=0.45):
    return [
        ((radius if i % 2 == 0 else radius * inner) * math.cos(rotation + math.pi * i / points),
         (radius if i % 2 == 0 else radius * inner) * math.sin(rotation + math.pi * i / points))
        for i in range(2 * points)
    ]


def _cross(radius, rotation, arm=0.33):
    w, r = radius * arm, radius
    outline = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r),
               (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r)]
    cos, sin = math.cos(rotation), math.sin(rotation)
    return [(x * cos - y * sin, x * sin + y * cos) for x, y in outline]


def _ellipse(radius, rotation, aspect, steps=40):
    cos, sin = math.cos(rotation), math.sin(rotation)
    points = []
    for i in range(steps):
        t = 2 * math.pi * i / steps
        x, y = radius * math.cos(t), radius * aspect * math.sin(t)
        points.append((x * cos - y * sin, x * sin + y * cos))
    return points


def _outline(shape, radius, rotation, aspect):
    """Vertices of `shape` centred on the origin, or None for the circle."""
    if shape == "circle":
        return None
    if shape == "square":
        return _regular_polygon(4, radius, rotation)
    if shape == "triangle":
        return _regular_polygon(3, radius, rotation)
    if shape == "pentagon":
        return _regular_polygon(5, radius, rotation)
    if shape == "hexagon":
        return _regular_polygon(6, radius, rotation)
    if shape == "star":
        return _star(radius, rotation)
    if shape == "cross":
        return _cross(radius, rotation)
    if shape == "ellipse":
        return _ellipse(radius, rotation, aspect)
    raise ValueError(f"Unknown shape {shape!r}.")


def draw_shape(draw, shape, centre, radius, colour, *, rotation=0.0, aspect=0.55):
    """Fills one shape of SHAPES on a PIL ImageDraw.

    Args:
        draw: a `PIL.ImageDraw.ImageDraw`.
        shape: a name in SHAPES.
        centre: (x, y) in pixels.
        radius: the circumradius in pixels (the circle's radius).
        colour: the fill, an RGB tuple of ints.
        rotation: radians, in image coordinates (y down, so clockwise on screen).
        aspect: the ellipse's minor/major axis ratio.
    """
    cx, cy = centre
    outline = _outline(shape, radius, rotation, aspect)
    if outline is None:
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    else:
        draw.polygon([(cx + x, cy + y) for x, y in outline], fill=colour)


def _luma(rgb):
    return rgb @ np.array([0.299, 0.587, 0.114])


def _too_close(fill, background):
    # Luminance as well as colour: the shape must survive conversion to grayscale.
    return ((np.linalg.norm(fill - background, axis=1) < _MIN_CONTRAST)
            | (np.abs(_luma(fill) - _luma(background)) < _MIN_LUMA_CONTRAST))


def _contrasting_colours(rng, count):
    """Darker background and brighter fill colours, (count, 3) each."""
    background = rng.integers(0, _BACKGROUND_MAX, size=(count, 3))
    fill = rng.integers(_FILL_MIN, 256, size=(count, 3))
    # Redraw only the pairs too close together; a few rounds settle them all.
    close = _too_close(fill, background)
    while close.any():
        fill[close] = rng.integers(_FILL_MIN, 256, size=(int(close.sum()), 3))
        close = _too_close(fill, background)
    return background, fill


def generate(*, classes=4, size=64, count=1200, seed=0):
    """Draws `count` shape images, balanced over the first `classes` SHAPES.

    Args:
        classes: number of shape classes, 2 to len(SHAPES).
        size: image side in pixels, MIN_SIZE to MAX_SIZE.
        count: number of images in total; classes differ in count by at most one.
        seed: the same seed gives the same images, labels and order.

    Returns:
        (images, labels, class_names): uint8 (count, size, size, 3), int32
        (count,) in shuffled order, and the list of class names.

    Raises:
        UsageError: `classes`, `size` or `count` out of range.
    """
    if not isinstance(classes, int) or not 2 <= classes <= len(SHAPES):
        raise UsageError(
            f"shapes_classes={classes!r} is out of range: choose 2 to {len(SHAPES)} "
            f"({', '.join(SHAPES)})."
        )
    if not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise UsageError(
            f"shapes_size={size!r} is out of range: choose {MIN_SIZE} to {MAX_SIZE} pixels."
        )
    if not isinstance(count, int) or count < classes:
        raise UsageError(
            f"shapes_count={count!r} is too small: give at least one image per class ({classes})."
        )

    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(count) % classes).astype(np.int32)
    background, fill = _contrasting_colours(rng, count)
    radius = rng.uniform(*_RADIUS_RANGE, size=count) * size
    # Keep the whole circumscribed circle inside the image.
    centre = rng.uniform(0.0, 1.0, size=(count, 2)) * (size - 2 * radius[:, None]) + radius[:, None]
    rotation = rng.uniform(0.0, 2 * math.pi, size=count)
    aspect = rng.uniform(0.45, 0.65, size=count)

    images = np.empty((count, size, size, 3), dtype=np.uint8)
    for i in range(count):
        image = Image.new("RGB", (size, size), tuple(int(c) for c in background[i]))
        draw_shape(ImageDraw.Draw(image), SHAPES[labels[i]], centre[i], radius[i], tuple(int(c) for c in fill[i]),
                   rotation=rotation[i], aspect=aspect[i])
        images[i] = np.asarray(image)

    # One vectorised pass of noise is far cheaper than noise per image.
    noise = rng.standard_normal(size=images.shape, dtype=np.float32) * _NOISE_STD
    images = np.clip(images + noise, 0, 255).round().astype(np.uint8)
    return images, labels, list(SHAPES[:classes])
