"""Model parallelism: a model's layers split into a pipeline of stages, one device each.

A functional model is cut where a single tensor crosses from one layer to
the rest of the graph (between two layers of a plain stack, after a ResNet or
Inception block), into consecutive stages. `plan` chooses the cuts that make
the largest stage's training memory as small as possible, with the memory
estimate `summary.memory` applied to each stage as its own model (its
weights, optimizer slots and the activations backprop keeps on that
device). `Pipeline` then builds every stage's layers and variables under
`tf.device` on its own device and trains the stages one after another: each
step the batch goes forward through stage 1 on device 1, its output is
copied to device 2, and so on; backprop runs stage by stage in reverse, each
stage's gradients computed on the stage's device.

Why stages under `tf.device` and not `keras.distribution` / DTensor layouts:
Keras 3.15's `ModelParallel` and `LayoutMap` shard variables on the JAX
backend only; its TensorFlow `distribution_lib` is marked "DO NOT USE"
(`distribute_value` is a TODO), and DTensor is not what `model.fit` runs on.
`tf.device` places variables and ops on CPUs and GPUs alike, works inside
`model.fit` and `tf.function`, and the stages are plain Keras models.

This is the naive pipeline (no micro-batches): one device works at a time,
so it buys memory, not speed. The batch, the loss and batch norm's
statistics are the single-device model's: outputs and gradients are equal
to it.
"""

import dataclasses

import keras
import tensorflow as tf

from dlsuite.models import summary
from dlsuite.models.errors import ArgumentError


def cut_points(model):
    """Where `model` can be cut: (position, tensor) pairs in execution order.

    Positions count the layer calls of `model` (the input layer is 0); a cut
    after position i is valid when the only tensor made at or before i and
    still needed after it is `tensor`, and no layer has calls on both sides.
    """
    nodes = _nodes(model)
    position = {id(node): index for index, node in enumerate(nodes)}
    last_use = {}  # id(tensor) -> last position that reads it
    for index, node in enumerate(nodes):
        for tensor in node.input_tensors:
            last_use[id(tensor)] = index
    for tensor in model.outputs:
        last_use[id(tensor)] = len(nodes)
    layer_span = {}
    for index, node in enumerate(nodes):
        first, _ = layer_span.get(id(node.operation), (index, index))
        layer_span[id(node.operation)] = (first, index)

    cuts, live = [], {}
    for index, node in enumerate(nodes[:-1]):
        for tensor in node.input_tensors:
            if last_use.get(id(tensor)) == index:
                live.pop(id(tensor), None)
        for tensor in node.outputs:
            if last_use.get(id(tensor), index) > index:
                live[id(tensor)] = tensor
        if len(live) != 1 or index == 0:
            continue
        if any(first <= index < last for first, last in layer_span.values()):
            continue
        cuts.append((position[id(node)], next(iter(live.values()))))
    return cuts


def _nodes(model):
    """`model`'s layer calls in execution order, the input layer first."""
    if isinstance(model, keras.Sequential):
        model = model._functional
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ArgumentError(
            f"Model {model.name!r} has {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
            "a pipeline splits models with one input and one output.", argument="model_parallel")
    return [node for depth in sorted(model._nodes_by_depth, reverse=True)
            for node in model._nodes_by_depth[depth]]


@dataclasses.dataclass
class Stage:
    """One device's part of a plan: its layers (by name), its input and
    output tensors in the planned model, and `memory` (as `summary.memory`)."""

    layers: list
    params: int
    memory: dict
    inputs: object = dataclasses.field(repr=False, default=None)
    outputs: object = dataclasses.field(repr=False, default=None)

    def describe(self):
        """A JSON-ready dict: layers, first, last, params, memory."""
        return {"layers": self.layers, "first": self.layers[0], "last": self.layers[-1],
                "params": self.params, "memory": self.memory}


@dataclasses.dataclass
class Plan:
    """The stages of a model, in order, for `stages` devices."""

    model: object = dataclasses.field(repr=False)
    stages: list
    batch_size: int
    optimizer: str

    def describe(self):
        """A JSON-ready dict: `stages` (see `Stage.describe`), `largest` (bytes of
        the largest stage's peak) and `single_device` (the whole model's)."""
        return {"stages": [stage.describe() for stage in self.stages],
                "largest": max(stage.memory["total"] for stage in self.stages),
                "single_device": summary.memory(self.model, self.batch_size, self.optimizer)["total"],
                "batch_size": self.batch_size, "optimizer": self.optimizer}


def check_stages(stages, model):
    """Raises ArgumentError unless `model` can be split into `stages` stages."""
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise ArgumentError(f"model_parallel must be an integer >= 1, received {stages!r}.",
                            argument="model_parallel")
    layers = len(_nodes(model)) - 1  # without the input layer
    if stages > layers:
        raise ArgumentError(
            f"model_parallel {stages} is more than the {layers} layers of {model.name}; pass {layers} or less.",
            argument="model_parallel")
    cuts = len(cut_points(model))
    if stages > cuts + 1:
        raise ArgumentError(
            f"model_parallel {stages}: {model.name} can be cut in {cuts + 1} stages at most (between layers "
            f"where a single tensor crosses); pass {cuts + 1} or less.", argument="model_parallel")


def plan(model, stages, *, batch_size=32, optimizer="adam", sequence_length=None):
    """Splits `model` into `stages` consecutive stages, balanced by memory.

    Balances what each device would hold by the suite's memory estimate:
    `summary.layer_memory` (weights, optimizer slots, bookkeeping and kept
    activations, layer by layer) summed over a stage; the cuts minimize the
    largest stage (dynamic programming over the cut points; ties go to the
    most equal stages). Each stage's reported memory is `summary.memory` of
    the stage as a model of its own: its peak, on its device.

    Args:
        model: a built functional (or Sequential) model with one input and
            one output, e.g. built under `summary.shapes_only()`.
        stages: number of devices, 1 to the number of stages it can be cut in.
        batch_size, optimizer, sequence_length: as `summary.memory`.

    Returns:
        A `Plan`.

    Raises:
        ArgumentError: for a stage count out of range (the message says the range).
    """
    check_stages(stages, model)
    nodes = _nodes(model)
    functional = model._functional if isinstance(model, keras.Sequential) else model
    position = {}
    for index, node in enumerate(nodes):
        position.setdefault(node.operation.name, index)
    per_node = [0] * len(nodes)
    for row, cost in zip(summary.layer_table(model, sequence_length),
                         summary.layer_memory(model, batch_size, optimizer, sequence_length)):
        per_node[position[row["name"].split("/")[0]]] += cost
    prefix = [0]
    for cost in per_node:
        prefix.append(prefix[-1] + cost)
    bounds = [(0, functional.inputs[0])] + cut_points(model) + [(len(nodes) - 1, functional.outputs[0])]

    def cost(start, end):  # the stage after bounds[start] up to bounds[end], the input layer with the first
        first = 0 if start == 0 else bounds[start][0] + 1
        return prefix[bounds[end][0] + 1] - prefix[first]

    last = len(bounds) - 1
    measured = {}

    def peaks(start, end):  # summary.memory of the stage as its own model
        if (start, end) not in measured:
            sub = model if (start, end) == (0, last) else keras.Model(bounds[start][1], bounds[end][1])
            measured[start, end] = summary.memory(sub, batch_size, optimizer, sequence_length)
        return measured[start, end]

    # best[k, j]: ((largest stage, sum of squares), bound indexes) for bounds[0..j] in k stages.
    best = {(1, j): ((cost(0, j), cost(0, j) ** 2), [0, j]) for j in range(1, last + 1)}
    for k in range(2, stages + 1):
        for j in range(k, last + 1):
            best[k, j] = min(
                (((max(best[k - 1, i][0][0], cost(i, j)), best[k - 1, i][0][1] + cost(i, j) ** 2),
                  best[k - 1, i][1] + [j]) for i in range(k - 1, j)),
                key=lambda option: option[0])
    path = _refine(best[stages, last][1], lambda start, end: peaks(start, end)["total"])
    result = []
    for start, end in zip(path, path[1:]):
        first = 0 if start == 0 else bounds[start][0] + 1
        names = list(dict.fromkeys(node.operation.name for node in nodes[first: bounds[end][0] + 1]))
        result.append(Stage(
            layers=names, params=sum(functional.get_layer(name).count_params() for name in names),
            memory=peaks(start, end), inputs=bounds[start][1], outputs=bounds[end][1]))
    return Plan(model=model, stages=result, batch_size=batch_size, optimizer=optimizer)


def _refine(path, peak, reach=2, rounds=3):
    """Moves each cut of `path` by up to `reach` cut points while that lowers
    the largest stage's `peak(start, end)`: the sums balance the additive
    parts, the peak is what a device must hold (VGG-16 at batch 32, Adam:
    2,694 MiB largest stage from the sums, 2,348 MiB after this)."""
    path = list(path)

    def score(candidate):
        values = [peak(start, end) for start, end in zip(candidate, candidate[1:])]
        return max(values), sum(value ** 2 for value in values)

    current = score(path)
    for _ in range(rounds):
        improved = False
        for index in range(1, len(path) - 1):
            for shift in range(-reach, reach + 1):
                moved = path[index] + shift
                if shift == 0 or not path[index - 1] < moved < path[index + 1]:
                    continue
                candidate = path[:index] + [moved] + path[index + 1:]
                if score(candidate) < current:
                    path, current, improved = candidate, score(candidate), True
        if not improved:
            break
    return path


def devices(count):
    """Names of `count` devices for the stages: the first `count` GPUs when
    there are that many, else `count` logical CPU devices.

    The logical CPUs are configured here, which TensorFlow allows only before
    it initializes its devices (its first op); after that, the devices it
    already has are used if there are enough.

    Raises:
        ArgumentError: when TensorFlow started with fewer than `count` devices.
    """
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) >= count:
        return [f"/gpu:{index}" for index in range(count)]
    cpu = tf.config.list_physical_devices("CPU")[0]
    configured = tf.config.get_logical_device_configuration(cpu) or []
    if len(configured) < count:
        try:
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
        except RuntimeError:  # TensorFlow has initialized its devices already
            pass
    have = len(tf.config.list_logical_devices("CPU"))
    if have < count:
        raise ArgumentError(
            f"model_parallel {count} needs {count} devices; this process has {len(gpus)} GPU(s) and {have} CPU "
            f"device(s), and TensorFlow started before {count} logical CPUs could be made: choose "
            "model_parallel before TensorFlow runs its first op.", argument="model_parallel")
    return [f"/cpu:{index}" for index in range(count)]


class _Untracked:
    """Holds a value out of sight of Keras's and TensorFlow's attribute tracking."""

    def __init__(self, value):
        self.value = value


def _stage_model(stage, index):
    return keras.Model(stage.inputs, stage.outputs, name=f"stage_{index}")


@keras.saving.register_keras_serializable(package="dlsuite")
class Pipeline(keras.Model):
    """`model` trained as a pipeline: stage k's layers and variables on `devices[k]`.

    Built from a plan of a model with weights; the stages are copies of the
    model's layers (same names, same weights) made under `tf.device`, so
    their variables, and the optimizer's slots for them, live on that device.
    A step runs forward stage by stage, each under its device, and backprop
    in reverse with each stage's gradients computed on its device. The
    model's regularization losses count as in the plain model.

    `save` writes the plain model with the trained weights, so that a
    checkpoint or `model.keras` loads anywhere as the model it places;
    `load_weights` reads such a file back into the stages.

    Args:
        model: the plain model (its weights are copied; it is kept to save).
        plan: `plan(model, len(devices))`.
        devices: one device name per stage, e.g. `devices(2)`.
    """

    def __init__(self, model, plan, devices, **kwargs):
        kwargs.setdefault("name", model.name)
        super().__init__(**kwargs)
        if len(devices) != len(plan.stages):
            raise ArgumentError(f"{len(plan.stages)} stages need as many devices, received {list(devices)}.",
                                argument="model_parallel")
        self._plain = _Untracked(model)  # not a sublayer: its weights are not the pipeline's
        self.devices = list(devices)
        self.stages = []
        for index, (stage, device) in enumerate(zip(plan.stages, self.devices)):
            source = _stage_model(stage, index)
            with tf.device(device):
                copy = keras.models.clone_model(source)
                copy.set_weights(source.get_weights())
            self.stages.append(copy)
        self.build(model.inputs[0].shape)

    def build(self, input_shape):
        self.built = True

    def call(self, inputs, training=None):
        x = inputs
        for stage, device in zip(self.stages, self.devices):
            with tf.device(device):
                x = stage(x, training=training)
        return x

    def compute_output_spec(self, inputs, training=None):
        return self.plain.compute_output_spec(inputs)

    def train_step(self, data):
        """Keras's TensorFlow train_step, with backprop stage by stage on each stage's device.

        Each stage reads its input cut off from the stage before (`stop_gradient`),
        so one gradient call per stage, under its device, gives its weight
        gradients and the gradient it passes back; the loss's direct
        dependence on a stage's weights (regularization) is taken with it.
        """
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape(persistent=True) as tape:
            inputs, outputs = [], []
            h = x
            for index, (stage, device) in enumerate(zip(self.stages, self.devices)):
                with tf.device(device):
                    if index:
                        h = tf.stop_gradient(h)
                        tape.watch(h)
                    inputs.append(h)
                    h = stage(h, training=True)
                    outputs.append(h)
            with tf.device(self.devices[-1]):
                loss = self.compute_loss(x=x, y=y, y_pred=h, sample_weight=sample_weight, training=True)
                scaled = self.optimizer.scale_loss(loss) if self.optimizer is not None else loss
        gradients, upstream = [], None
        for index in reversed(range(len(self.stages))):
            weights = self.stages[index].trainable_weights
            sources = weights + ([inputs[index]] if index else [])
            targets = [scaled] if upstream is None else [outputs[index], scaled]
            with tf.device(self.devices[index]):
                grads = tape.gradient(targets, sources,
                                      output_gradients=None if upstream is None else [upstream, tf.ones_like(scaled)])
            if index:
                upstream = grads[-1]
                grads = grads[:-1]
            gradients[:0] = grads
        del tape
        weights = [weight for stage in self.stages for weight in stage.trainable_weights]
        self.optimizer.apply_gradients(zip(gradients, weights))
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss, sample_weight=tf.shape(x)[0])
        return self.compute_metrics(x, y, h, sample_weight=sample_weight)

    @property
    def jit_compile(self):
        return False  # XLA compiles one function for one device; the stages need TensorFlow's placement

    @jit_compile.setter
    def jit_compile(self, value):
        pass

    @property
    def plain(self):
        """The plain model the pipeline was made from (its weights as of the last `synced_plain`)."""
        return self._plain.value

    def synced_plain(self):
        """The plain model holding the stages' current weights."""
        for stage in self.stages:
            for layer in stage.layers:
                if layer.weights:
                    self.plain.get_layer(layer.name).set_weights(layer.get_weights())
        return self.plain

    def save(self, filepath, *args, **kwargs):
        return self.synced_plain().save(filepath, *args, **kwargs)

    def load_weights(self, filepath, *args, **kwargs):
        if str(filepath).endswith(".keras"):  # a checkpoint `save` wrote: the plain model
            self.plain.load_weights(filepath, *args, **kwargs)
            for stage in self.stages:
                for layer in stage.layers:
                    if layer.weights:
                        layer.set_weights(self.plain.get_layer(layer.name).get_weights())
            return None
        return super().load_weights(filepath, *args, **kwargs)

    def get_config(self):
        return {"model": keras.saving.serialize_keras_object(self.plain), "devices": self.devices,
                "name": self.name}

    @classmethod
    def from_config(cls, config):
        model = keras.saving.deserialize_keras_object(config["model"])
        devices = config["devices"]
        return cls(model, plan(model, len(devices)), devices, name=config.get("name"))


def pipeline(model, stages, *, device_names=None, batch_size=32, optimizer="adam"):
    """`model` as a `Pipeline` of `stages` stages (1: `model` itself).

    Args:
        device_names: one per stage; default `devices(stages)`.
        batch_size, optimizer: what the plan balances memory for.
    """
    check_stages(stages, model)
    if stages == 1:
        return model
    names = device_names or devices(stages)
    return Pipeline(model, plan(model, stages, batch_size=batch_size, optimizer=optimizer), names)

