"""Model builders for the classic CNN family and RNN stacks, behind one registry.

>>> from dlsuite import models
>>> models.names()[:3]
['alexnet', 'bigru', 'bilstm']
>>> model = models.build("resnet18", input_shape=(64, 64, 3), classes=10)
"""

from dlsuite.models import layers
from dlsuite.models.registry import ModelSpec, build, get, names, register

# Importing each family registers its variants.
from dlsuite.models import alexnet, bilm, googlenet, lenet, resnet, rnn, vgg  # noqa: E402,F401

__all__ = ["ModelSpec", "build", "get", "layers", "names", "register"]
