"""One registry of model builders, shared by the CLI, the apps and the tests.

A builder registers under a name with its family and default input shape;
`build(name, **kwargs)` calls it and `names()` lists them, so adding a variant
is one `register(...)` call next to its family's table.
"""

import dataclasses
from typing import Callable

from dlsuite.models.errors import ArgumentError


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one named builder.

    Attributes:
        name: registry name, e.g. "resnet50".
        family: family name shared by variants, e.g. "resnet".
        kind: "cnn" (image input) or "rnn" (sequence input).
        builder: callable returning a `keras.Model`; accepts keyword arguments.
        default_input_shape: input shape without batch, e.g. (224, 224, 3).
        min_input_size: smallest height/width the architecture accepts (cnn).
        description: one line shown by `dlsuite models list`.
    """

    name: str
    family: str
    kind: str
    builder: Callable
    default_input_shape: tuple
    min_input_size: int = 1
    description: str = ""


_REGISTRY: dict = {}


def register(spec):
    """Adds `spec` to the registry; a name can be registered once."""
    if spec.name in _REGISTRY:
        raise ArgumentError(f"Model name {spec.name!r} is already registered.")
    _REGISTRY[spec.name] = spec
    return spec


def names(family=None, kind=None):
    """Returns the registered model names, sorted, optionally filtered."""
    return sorted(
        spec.name
        for spec in _REGISTRY.values()
        if (family is None or spec.family == family)
        and (kind is None or spec.kind == kind)
    )


def get(name):
    """Returns the `ModelSpec` for `name`; unknown names list the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ArgumentError(
            f"Unknown model {name!r}. Known models: {', '.join(names())}.", argument="model"
        ) from None


def build(name, **kwargs):
    """Builds the registered model `name` with the builder's keyword arguments.

    Example:
        >>> model = build("resnet18", input_shape=(64, 64, 3), classes=10)
    """
    return get(name).builder(**kwargs)
