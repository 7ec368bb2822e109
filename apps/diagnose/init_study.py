"""The seed's weight-initialization experiment, made real.

Push a batch of standard-normal inputs through a deep stack and look at the
activations layer by layer: the seed's goal is activations with zero mean and
the same variance at every layer. Its predictions, which this study shows:

* zeros: every unit computes the same thing (symmetry never breaks);
* small (std 0.01): the spread shrinks toward 0 layer after layer (vanishing);
* large (std 1): tanh and sigmoid saturate at their flat ends, ReLU explodes;
* xavier (Glorot, Var(w) ~ 1/n): keeps tanh's spread roughly constant, but
  halves ReLU's variance at every layer (ReLU zeroes half its inputs);
* he (Var(w) = 2/n): keeps ReLU's spread constant.

`study_stack` runs the seed's multilayer stack; `study_model` runs the same
look on a registry model, layer by layer through its nonlinearities.
"""

import dataclasses
import math

import numpy as np

# --init names (the seed's words) -> `dlsuite.models.common.INITIALIZERS`.
INIT_SCHEMES = {
    "zeros": "zeros",
    "small": "small_normal",
    "large": "large_normal",
    "xavier": "glorot_normal",
    "he": "he_normal",
}
STACK_ACTIVATIONS = ("sigmoid", "tanh", "relu", "leaky_relu")

# Verdict thresholds. Per layer, a spread that shrinks to under 3/4 (or grows
# past 4/3) compounds to under a third (over three times) in four layers:
# xavier with ReLU shrinks by 0.7 per layer, xavier with tanh by 0.84, he with
# ReLU stays at about 1.
SHRINK_PER_LAYER = 0.75
GROW_PER_LAYER = 1 / SHRINK_PER_LAYER
COLLAPSED_STD = 0.02  # below this the layer outputs about one value
EXPLODED_STD = 100.0
SATURATION_SHARE = 0.3  # of all values in a sigmoid/tanh layer at its flat ends
DEAD_SHARE = 0.3  # of ReLU units that output 0 for every input
NOT_CENTRED_MEAN = 0.25


@dataclasses.dataclass
class LayerStats:
    """Statistics of one layer's activations over the batch."""

    name: str
    mean: float
    std: float
    saturated: float | None  # share at the flat ends (sigmoid, tanh), else None
    dead_units: float | None  # share of units never above 0 (ReLU family), else None


@dataclasses.dataclass
class Study:
    """One activation and initialization through one network."""

    activation: str
    init: str
    layers: list  # LayerStats
    values: list  # one flat float32 array of activations per layer (for histograms)
    verdict: str
    flags: list  # short names: "identical", "vanishing", "exploding", "saturated", "dead", "not-centred"

    def to_json(self):
        return {
            "activation": self.activation, "init": self.init, "verdict": self.verdict, "flags": self.flags,
            "layers": [dataclasses.asdict(layer) for layer in self.layers],
        }


def _saturated_share(values, activation):
    if activation == "tanh":
        return float(np.mean(np.abs(values) > 0.99))
    if activation == "sigmoid":
        return float(np.mean((values < 0.01) | (values > 0.99)))
    return None


def _dead_share(values, activation):
    """Units (last axis) whose output is never above 0, for the ReLU family."""
    if activation not in ("relu", "leaky_relu", "elu"):
        return None
    units = values.reshape(-1, values.shape[-1])
    return float(np.mean(units.max(axis=0) <= 0))


def layer_stats(name, values, activation):
    values = np.asarray(values, dtype="float32")
    with np.errstate(over="ignore", invalid="ignore"):  # an exploding stack reaches inf
        mean, std = float(values.mean(dtype="float64")), float(values.std(dtype="float64"))
    return LayerStats(
        name=name, mean=mean, std=std,
        saturated=_saturated_share(values, activation), dead_units=_dead_share(values, activation),
    )


def verdict(layers, activation):
    """What the per-layer statistics say, in the seed's terms: (sentence, flags)."""
    stds = [layer.std for layer in layers]
    first, last = stds[0], stds[-1]
    flags, notes = [], []
    if max(stds) < 1e-7:
        return ("every unit outputs the same value (std 0): the symmetry never breaks and all weights "
                "get the same update; never initialize weights to zeros"), ["identical"]
    per_layer = (last / first) ** (1 / (len(stds) - 1)) if len(stds) > 1 and first > 0 else 1.0
    trend = f"std {first:.3g} at {layers[0].name} -> {last:.3g} at {layers[-1].name}"
    if len(stds) > 1:
        trend += f", x{per_layer:.2f} per layer"
    if per_layer < SHRINK_PER_LAYER or last < COLLAPSED_STD:
        flags.append("vanishing")
        notes.append(f"vanishing: the spread shrinks toward 0 ({trend}); deeper layers see almost constant "
                     "inputs and their gradients vanish; use a larger scale (xavier for tanh/sigmoid, he for ReLU)")
    elif per_layer > GROW_PER_LAYER or last > EXPLODED_STD:
        flags.append("exploding")
        notes.append(f"exploding: the spread grows layer after layer ({trend}); use a smaller scale "
                     "(xavier for tanh/sigmoid, he for ReLU)")
    saturated = [layer for layer in layers if (layer.saturated or 0) > SATURATION_SHARE]
    if saturated:
        worst = max(saturated, key=lambda layer: layer.saturated)
        flags.append("saturated")
        notes.append(f"saturated: up to {worst.saturated:.0%} of {activation} outputs sit at the flat ends "
                     f"({worst.name}), where the gradient is about 0; use a smaller scale")
    dead = [layer for layer in layers if (layer.dead_units or 0) > DEAD_SHARE]
    if dead:
        worst = max(dead, key=lambda layer: layer.dead_units)
        flags.append("dead")
        notes.append(f"dead units: {worst.dead_units:.0%} of the units of {worst.name} never fire for any input")
    if activation == "sigmoid" and abs(layers[-1].mean) > NOT_CENTRED_MEAN:
        flags.append("not-centred")
        notes.append(f"not zero-centred (mean {layers[-1].mean:.2f}): the next layer's weight gradients all share "
                     "one sign; the seed prefers zero-mean activations (tanh)")
    if not flags:
        return f"healthy: the spread stays roughly constant ({trend})", []
    return "; ".join(notes), flags


def _initializer(init):
    from dlsuite.models import common

    return common.INITIALIZERS[INIT_SCHEMES[init]]()


def study_stack(activation="tanh", init="xavier", *, layers=5, width=100, samples=1000, seed=0):
    """The seed's experiment: `layers` fully connected layers of `width` units
    without biases, fed `samples` standard-normal input vectors.

    Returns:
        A `Study`.
    """
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((width,), name="input")
    x, outputs = inputs, []
    for index in range(1, layers + 1):
        x = keras.layers.Dense(width, activation=activation, use_bias=False,
                               kernel_initializer=_initializer(init), name=f"layer{index}")(x)
        outputs.append(x)
    model = keras.Model(inputs, outputs)
    data = np.random.default_rng(seed).standard_normal((samples, width)).astype("float32")
    values = [np.asarray(v) for v in model(data, training=False)]
    stats = [layer_stats(f"layer{i}", v, activation) for i, v in enumerate(values, start=1)]
    sentence, flags = verdict(stats, activation)
    return Study(activation, init, stats, [v.ravel() for v in values], sentence, flags)


def _nonlinearity(layer):
    """The activation name a layer applies (None if it applies none)."""
    import keras

    from dlsuite.models.layers import Maxout

    if isinstance(layer, Maxout):
        return "maxout"
    if isinstance(layer, keras.layers.ReLU):
        return "relu"
    if isinstance(layer, keras.layers.LeakyReLU):
        return "leaky_relu"
    function = getattr(layer, "activation", None)
    if function is None or isinstance(layer, keras.layers.InputLayer):
        return None
    name = getattr(function, "__name__", str(function))
    return None if name in ("linear", "softmax") else name


def activation_layers(model):
    """The layers of `model` whose output is an activation (post-nonlinearity), in order."""
    return [layer for layer in model.layers if _nonlinearity(layer)]


def study_model(name, *, init=None, activation=None, inputs, seed=0):
    """The same look through registry model `name`, at every layer that applies
    a nonlinearity, for the batch `inputs` (already normalized).

    Args:
        init: one of INIT_SCHEMES, or None for the builder's default.
        activation: a `dlsuite.models.common.ACTIVATIONS` name, or None for the model's own.
        inputs: float32 (batch, H, W, C) at the model's input shape.

    Returns:
        A `Study` (activation "model default" when None).
    """
    import keras

    from dlsuite import models

    keras.utils.set_random_seed(seed)
    knobs = {}
    if init is not None:
        knobs["kernel_initializer"] = INIT_SCHEMES[init]
    if activation is not None:
        knobs["activation"] = activation
    model = models.build(name, input_shape=tuple(inputs.shape[1:]), **knobs)
    chosen = activation_layers(model)
    if not chosen:
        raise ValueError(f"{name} has no layer with a nonlinearity to study.")
    probe = keras.Model(model.inputs[0], [layer.output for layer in chosen])
    # Training mode: what the first training step sees (batch norm
    # normalizes with the batch's statistics, not its untrained moving ones).
    outputs = probe(inputs, training=True)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    stats, values = [], []
    for layer, value in zip(chosen, outputs):
        value = np.asarray(value)
        stats.append(layer_stats(layer.name, value, _nonlinearity(layer)))
        values.append(value.ravel())
    sentence, flags = verdict(stats, activation or _nonlinearity(chosen[-1]))
    return Study(activation or "model default", init or "model default", stats, values, sentence, flags)


# --- pictures ---------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _sample(values, limit=200_000, seed=0):
    if values.size <= limit:
        return values
    return np.random.default_rng(seed).choice(values, limit, replace=False)


def _shared_range(arrays):
    """One x range for several layers, so shrinking or growing shows."""
    finite = [a[np.isfinite(a)] for a in arrays]
    finite = [a for a in finite if a.size]
    if not finite:
        return -1.0, 1.0
    low, high = min(float(a.min()) for a in finite), max(float(a.max()) for a in finite)
    if high - low < 1e-12:  # one value: a bar where it sits
        low, high = low - 0.5, high + 0.5
    return low, high


def _histogram(axis, values, layer, *, value_range, show_stats=True):
    values = _sample(values)
    values = values[np.isfinite(values)]
    axis.hist(values, bins=50, range=value_range, color="tab:blue")
    axis.set_yticks([])
    axis.tick_params(labelsize=7)
    if show_stats:
        axis.set_title(f"{layer.name}\nmean {layer.mean:.2g}, std {layer.std:.2g}", fontsize=8)


def spread_indices(count, limit):
    """Indices of at most `limit` evenly spread panels out of `count` layers."""
    if count <= limit:
        return list(range(count))
    return sorted({round(i * (count - 1) / (limit - 1)) for i in range(limit)})


def plot_histograms(study, path, *, title, max_panels=24):
    """One histogram panel per layer (at most `max_panels`, evenly spread), on
    one shared x range so a shrinking or growing spread shows."""
    from dlsuite.apps.core import rundir

    plt = _pyplot()
    picks = spread_indices(len(study.layers), max_panels)
    columns = min(6, len(picks))
    rows = math.ceil(len(picks) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.3 * rows), squeeze=False)
    for axis in axes.ravel()[len(picks):]:
        axis.axis("off")
    value_range = _shared_range([study.values[i] for i in picks])
    for axis, index in zip(axes.ravel(), picks):
        _histogram(axis, study.values[index], study.layers[index], value_range=value_range)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    rundir.save_figure(figure, path)


def plot_grid(studies, path, *, title, max_columns=8):
    """Rows: one initialization each (one x range per row); columns: layers;
    a histogram per cell."""
    from dlsuite.apps.core import rundir

    plt = _pyplot()
    picks = spread_indices(len(studies[0].layers), max_columns)
    figure, axes = plt.subplots(len(studies), len(picks), figsize=(2.2 * len(picks), 1.9 * len(studies)),
                                squeeze=False)
    for row, study in zip(axes, studies):
        value_range = _shared_range([study.values[i] for i in picks])  # one range per initialization
        for column, (axis, index) in enumerate(zip(row, picks)):
            layer = study.layers[index]
            _histogram(axis, study.values[index], layer, value_range=value_range, show_stats=False)
            axis.set_title(f"{layer.name}: std {layer.std:.2g}", fontsize=7)
            if column == 0:
                label = study.init + (f"\n({', '.join(study.flags)})" if study.flags else "\n(healthy)")
                axis.set_ylabel(label, fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    rundir.save_figure(figure, path)
