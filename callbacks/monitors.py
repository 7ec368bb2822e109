"""Training monitors: the seed's tuning checks, watched while a model trains.

* `UpdateRatioMonitor`: per layer, the size of one update relative to the
  weights, |dw| / |w|. The seed's rule of thumb: about 1e-3; far below, the
  learning rate is too low; far above, too high.
* `GradientNormMonitor`: per layer, the norm of the loss gradient: vanishing
  (the first layers get almost nothing) or exploding (huge or non-finite),
  for convolutional and recurrent networks alike.
* `DeadReluMonitor`: per ReLU layer, the share of units that output 0 for
  every example of a held batch (dead units never learn again).

Each writes its values to TensorBoard (tf.summary scalars in `log_dir`, under
`update_ratio/`, `gradient_norm/` and `dead_relu/`), prints a warning the
first time a layer is far off, and `MonitorReport` prints a table and writes
`monitors.json` when training ends. `make_monitors` builds them from the
names of the `--monitor` option.

Cost, every `every` batches: updates copies the trainable weights before and
after one step (host memory for one copy of the weights); gradients runs one
extra forward and backward pass on a held batch (so about 1/every more
compute); dead-relu one extra forward pass.
"""

import json
import math
import os
import pathlib

import keras
import numpy as np

from dlsuite.models import compat

MONITORS = ("updates", "gradients", "dead-relu")

# The seed's ~1e-3 rule; a factor of 10 either side counts as far off.
TARGET_UPDATE_RATIO = 1e-3
LOW_UPDATE_RATIO = 1e-4
HIGH_UPDATE_RATIO = 1e-2
# Gradient norms: the first layers getting 10,000 times less than the most
# fed one is vanishing; a layer norm over 1e3 (or not finite) is exploding.
VANISHING_SPREAD = 1e-4
EXPLODING_NORM = 1e3
DEAD_SHARE = 0.5


def _group_by_layer(model):
    """[(layer name, [trainable variables])] in the model's order, nested
    models flattened (`outer/inner`)."""
    groups = []

    def visit(layer, prefix):
        if isinstance(layer, keras.Model) and layer is not model:
            for inner in layer.layers:
                visit(inner, f"{prefix}{layer.name}/")
            return
        if layer.trainable_weights:
            groups.append((prefix + layer.name, list(layer.trainable_weights)))

    for layer in model.layers:
        visit(layer, "")
    return groups


def _norm(arrays):
    return math.sqrt(sum(float(np.sum(np.square(np.asarray(a, dtype="float64")))) for a in arrays))


class _Monitor(keras.callbacks.Callback):
    """Shared bookkeeping: the step counter, the TensorBoard writer, the
    per-layer history and one-time warnings."""

    tag = ""

    def __init__(self, *, every=20, log_dir=None):
        super().__init__()
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1 batch, received {every!r}.")
        self.every = every
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.history = {}  # layer -> [(step, value)]
        self.warnings = []
        self._warned = set()
        self._step = 0
        self._writer = None

    def on_train_begin(self, logs=None):
        if self.log_dir and self._writer is None:
            import tensorflow as tf

            self._writer = tf.summary.create_file_writer(self.log_dir)

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1

    def _due(self):
        return self._step % self.every == 0

    def _record(self, values):
        for layer, value in values.items():
            self.history.setdefault(layer, []).append((self._step, float(value)))
        if self._writer is not None:
            import tensorflow as tf

            with self._writer.as_default(step=self._step):
                for layer, value in values.items():
                    tf.summary.scalar(f"{self.tag}/{layer}", value)
            self._writer.flush()

    def _warn(self, key, message):
        if key in self._warned:
            return
        self._warned.add(key)
        self.warnings.append(message)
        print(f"monitor: {message}", flush=True)

    def latest(self):
        """{layer: last value}."""
        return {layer: points[-1][1] for layer, points in self.history.items()}

    def summary(self):
        return {"every": self.every, "latest": self.latest(), "warnings": list(self.warnings),
                "history": {layer: points for layer, points in self.history.items()}}

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()


class UpdateRatioMonitor(_Monitor):
    """|w_after - w_before| / |w_before| of one step, per layer, every `every`
    batches; warns when a layer's median ratio over an epoch is 10x off the
    seed's ~1e-3."""

    tag = "update_ratio"

    def __init__(self, *, every=20, log_dir=None, low=LOW_UPDATE_RATIO, high=HIGH_UPDATE_RATIO):
        super().__init__(every=every, log_dir=log_dir)
        self.low, self.high = low, high
        self._before = None

    def on_train_batch_begin(self, batch, logs=None):
        if (self._step + 1) % self.every == 0:
            self._before = [(name, [np.array(v) for v in variables])
                            for name, variables in _group_by_layer(self.model)]

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        if self._before is None:
            return
        current = dict(_group_by_layer(self.model))
        ratios = {}
        for name, before in self._before:
            scale = _norm(before)
            if scale == 0:  # an all-zero layer (fresh biases only) has no ratio
                continue
            ratios[name] = _norm([np.array(v) - b for v, b in zip(current[name], before)]) / scale
        self._before = None
        self._record(ratios)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = self._step

    def on_epoch_end(self, epoch, logs=None):
        # Judged on the epoch's median, not one step: Adam's first steps are
        # large relative to fresh weights and settle within the epoch.
        start = getattr(self, "_epoch_start", 0)
        for name, points in self.history.items():
            values = [value for step, value in points if step > start]
            if not values:
                continue
            ratio = float(np.median(values))
            if ratio < self.low:
                self._warn((name, "low"), f"update/weight ratio {ratio:.1e} for {name} (median of epoch {epoch + 1}) "
                           f"is far below the seed's ~{TARGET_UPDATE_RATIO:g}: the learning rate may be too low")
            elif ratio > self.high:
                self._warn((name, "high"), f"update/weight ratio {ratio:.1e} for {name} (median of epoch {epoch + 1}) "
                           f"is far above the seed's ~{TARGET_UPDATE_RATIO:g}: the learning rate may be too high")


class _HeldBatchMonitor(_Monitor):
    """A monitor that looks at the model on one held batch.

    Probing a fixed batch (rather than reading the gradients of the step
    being trained) needs no change to the model's train_step, so it works
    with any model `fit` trains, and the values are comparable over time:
    they change with the weights, not with the batch. The probe runs in
    training mode (batch statistics, dropout on, as training sees the model)
    and puts back every non-trainable variable it touched (batch norm's
    moving statistics, dropout's seed, the loss trackers) so training is not
    disturbed.
    """

    def __init__(self, sample, *, every=20, log_dir=None):
        super().__init__(every=every, log_dir=log_dir)
        if not isinstance(sample, (tuple, list)) or len(sample) < 2:
            raise ValueError("sample must be one batch (x, y) from the training data.")
        self.sample = sample

    def _keeping_state(self, function):
        # The compiled loss also counts per-output losses in metric variables.
        variables = list(self.model.non_trainable_variables) + list(self.model.metrics_variables)
        saved = [np.array(v) for v in variables]
        try:
            return function()
        finally:
            for variable, value in zip(variables, saved):
                variable.assign(value)


class GradientNormMonitor(_HeldBatchMonitor):
    """The loss gradient's norm per layer on a held batch, every `every`
    batches; warns on vanishing and exploding gradients."""

    tag = "gradient_norm"

    def __init__(self, sample, *, every=20, log_dir=None, spread=VANISHING_SPREAD, exploding=EXPLODING_NORM):
        super().__init__(sample, every=every, log_dir=log_dir)
        self.spread, self.exploding = spread, exploding
        self._gradients = None

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        import tensorflow as tf

        model, (x, y) = self.model, self.sample[:2]
        variables = model.trainable_variables

        @tf.function(reduce_retracing=True)
        def gradients(x, y):
            with tf.GradientTape() as tape:
                y_pred = model(x, training=True)
                loss = model.compute_loss(x=x, y=y, y_pred=y_pred, training=True)
            # An embedding's gradient is sparse (IndexedSlices): made dense,
            # repeated rows summed, for its norm.
            return [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g
                    for g in tape.gradient(loss, variables)]

        self._gradients = gradients
        self._positions = {id(v): i for i, v in enumerate(variables)}
        self._x, self._y = x, y

    def measure(self):
        """{layer: gradient norm} on the held batch now."""
        grads = self._keeping_state(lambda: self._gradients(self._x, self._y))
        norms = {}
        for name, variables in _group_by_layer(self.model):
            values = [grads[self._positions[id(v)]] for v in variables if id(v) in self._positions]
            values = [np.asarray(g) for g in values if g is not None]
            if values:
                norms[name] = _norm(values)
        return norms

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        if not self._due():
            return
        norms = self.measure()
        self._record(norms)
        self._check(norms)

    def _check(self, norms):
        if not norms:
            return
        bad = [name for name, value in norms.items() if not math.isfinite(value)]
        big = [name for name, value in norms.items() if math.isfinite(value) and value > self.exploding]
        if bad or big:
            name = (bad or big)[0]
            self._warn(("exploding",), f"exploding gradients at step {self._step}: {name} has gradient norm "
                       f"{norms[name]:.3g}; clip them (--clip-norm 5) or lower the learning rate")
            return
        finite = {name: value for name, value in norms.items() if math.isfinite(value)}
        largest = max(finite.values())
        smallest_name = min(finite, key=finite.get)
        if largest == 0 or finite[smallest_name] < self.spread * largest:
            first = next(iter(finite))
            self._warn(("vanishing",), f"vanishing gradients at step {self._step}: {smallest_name} gets gradient "
                       f"norm {finite[smallest_name]:.2g} against {largest:.2g} for the most fed layer (first "
                       f"layer {first}: {finite[first]:.2g}); try batch norm, ReLU with He init, fewer layers")


def _relu_layer(layer):
    if isinstance(layer, keras.layers.ReLU):
        return layer.negative_slope == 0 and layer.threshold == 0
    activation = getattr(layer, "activation", None)
    return activation is not None and getattr(activation, "__name__", "") == "relu"


class DeadReluMonitor(_HeldBatchMonitor):
    """Share of dead units (output 0 for every example and position of the
    held batch) per ReLU layer, every `every` batches; warns above 50%.

    ReLU layers are those of the model's own graph and of functional models
    nested in it once (such as a transfer backbone)."""

    tag = "dead_relu"

    def __init__(self, sample, *, every=20, log_dir=None, threshold=DEAD_SHARE):
        super().__init__(sample, every=every, log_dir=log_dir)
        self.threshold = threshold
        self._probe = None

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._names, self._probe = self._build_probe(self.model)
        if not self._names:
            print("monitor: dead-relu: the model has no ReLU layers to watch", flush=True)

    @staticmethod
    def _build_probe(model):
        """(names, function x -> list of ReLU outputs)."""
        names, tensors = [], []
        for layer in model.layers:
            if _relu_layer(layer):
                names.append(layer.name)
                tensors.append(layer.output)
            elif isinstance(layer, keras.Model) and compat.inbound_node_count(layer) == 1:
                inner = [inner for inner in layer.layers if _relu_layer(inner)]
                if not inner:
                    continue
                # The nested model's own graph, called on the tensor it gets
                # in the outer graph.
                inner_probe = keras.Model(layer.inputs, [i.output for i in inner])
                outer_input = compat.first_call_inputs(layer)
                outer_input = outer_input[0] if len(outer_input) == 1 else outer_input
                names.extend(f"{layer.name}/{i.name}" for i in inner)
                outputs = inner_probe(outer_input)
                tensors.extend(outputs if isinstance(outputs, (list, tuple)) else [outputs])
        if not tensors:
            return [], None
        inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
        return names, keras.Model(inputs, tensors)

    def measure(self):
        """{layer: share of dead units} on the held batch now."""
        outputs = self._keeping_state(lambda: self._probe(self.sample[0], training=True))
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        shares = {}
        for name, value in zip(self._names, outputs):
            units = np.asarray(value).reshape(-1, np.shape(value)[-1])
            shares[name] = float(np.mean(units.max(axis=0) <= 0))
        return shares

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        if not self._due() or self._probe is None:
            return
        shares = self.measure()
        self._record(shares)
        for name, share in shares.items():
            if share > self.threshold:
                self._warn((name,), f"{share:.0%} of the units of {name} are dead at step {self._step} (0 for "
                           "every example); lower the learning rate, use He init or leaky ReLU")


class MonitorReport(keras.callbacks.Callback):
    """At the end of training: one table of the monitors' last values, their
    warnings, and `monitors.json` (written atomically) when `path` is set."""

    def __init__(self, monitors, path=None):
        super().__init__()
        self.monitors = list(monitors)
        self.path = None if path is None else pathlib.Path(path)

    def on_train_end(self, logs=None):
        columns = [(m.tag, m.latest()) for m in self.monitors]
        layers = []
        for _, values in columns:
            layers += [name for name in values if name not in layers]
        if layers:
            width = max(len(name) for name in layers)
            print("monitors (last values): " + ", ".join(
                f"{tag}" for tag, _ in columns) + (f"; TensorBoard: {self.monitors[0].log_dir}"
                                                    if self.monitors[0].log_dir else ""))
            print("  " + "layer".ljust(width) + "".join(f"  {tag:>14}" for tag, _ in columns))
            for name in layers:
                cells = "".join(f"  {values[name]:>14.3g}" if name in values else f"  {'-':>14}"
                                for _, values in columns)
                print("  " + name.ljust(width) + cells)
        warnings = [w for m in self.monitors for w in m.warnings]
        print("monitor warnings: " + ("none" if not warnings else f"{len(warnings)}"), flush=True)
        for warning in warnings:
            print(f"  - {warning}")
        if self.path is not None:
            data = {m.tag: m.summary() for m in self.monitors}
            temporary = self.path.with_name(f".{self.path.name}.tmp")
            temporary.write_text(json.dumps(data, indent=1) + "\n")
            os.replace(temporary, self.path)


def parse_names(text):
    """--monitor text -> tuple of MONITORS names ("all" for every one)."""
    if isinstance(text, (list, tuple)):
        names = [str(name).strip() for name in text]
    else:
        names = [name.strip() for name in str(text).split(",") if name.strip()]
    if names == ["all"]:
        return MONITORS
    unknown = [name for name in names if name not in MONITORS]
    if unknown or not names:
        raise ValueError(f"--monitor takes a comma-separated list of {', '.join(MONITORS)} (or all), "
                         f"received {text!r}")
    return tuple(dict.fromkeys(names))


def make_monitors(names, *, sample, log_dir=None, every=20, summary_path=None):
    """The callbacks for `names` (see MONITORS), then their `MonitorReport`.

    Args:
        names: monitor names, e.g. ("updates", "gradients").
        sample: one training batch (x, y), held for the gradient and ReLU probes.
        log_dir: TensorBoard directory, or None.
        every: batches between two measurements.
        summary_path: where `monitors.json` goes, or None.
    """
    makers = {
        "updates": lambda: UpdateRatioMonitor(every=every, log_dir=log_dir),
        "gradients": lambda: GradientNormMonitor(sample, every=every, log_dir=log_dir),
        "dead-relu": lambda: DeadReluMonitor(sample, every=every, log_dir=log_dir),
    }
    monitors = [makers[name]() for name in parse_names(names)]
    return [*monitors, MonitorReport(monitors, summary_path)]
