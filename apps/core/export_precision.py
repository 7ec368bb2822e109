"""The precision an export's graph computes in (issue 28, item 4).

A model trained under `mixed_bfloat16` (or `mixed_float16`) computes in
16 bits; traced as it is, its export would too, and a SavedModel travels: a
server without native bfloat16 emulates it, several times slower than
float32. So an export computes in float32 by default, from a copy of the
model built under the float32 policy with the same weights; its signatures
are the same either way. `bfloat16` keeps the `mixed_bfloat16`
graph of a model trained in it, for a server that computes bfloat16
natively (docs/scaling.md, `python -m benchmarks.bfloat16 --part serving`).

    model = export_precision.in_precision(model, "float32")
"""

from dlsuite.apps.core.errors import UsageError

CHOICES = ("float32", "bfloat16")


def compute_precision(model):
    """The precision `model`'s layers compute in: "float32", "bfloat16" or "float16"."""
    dtypes = {layer.compute_dtype for layer in _layers(model) if layer.weights}
    for low in ("bfloat16", "float16"):
        if low in dtypes:
            return low
    return "float32"


def in_precision(model, precision):
    """`model` itself when it computes in `precision`, else a float32 copy of it.

    Args:
        model: a built functional or Sequential Keras model.
        precision: "float32", or "bfloat16" for a model trained under
            mixed_bfloat16 (a float32 model cannot tell which of its layers,
            such as the softmax head, must stay float32 in bfloat16).

    Raises:
        UsageError: "bfloat16" for a model that computes in another precision.
    """
    if precision not in CHOICES:
        raise ValueError(f"precision must be one of {', '.join(CHOICES)}, not {precision!r}")
    computes = compute_precision(model)
    if computes == precision:
        return model
    if precision == "bfloat16":
        raise UsageError(f"cannot export {model.name!r} in bfloat16: it computes in {computes}. Train it under "
                         "--mixed-precision on (or auto, on a CPU with native bfloat16), or export in float32.")
    import keras  # here, not at the top: the command line imports CHOICES before TensorFlow starts

    # The variables are float32 under every policy: only the layers' compute dtype changes. The
    # global policy too, for the sublayers a custom layer makes without passing its own dtype on.
    serialized = _in_float32(keras.saving.serialize_keras_object(model))
    global_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        copy = keras.saving.deserialize_keras_object(serialized)
    finally:
        keras.mixed_precision.set_global_policy(global_policy)
    copy.set_weights(model.get_weights())
    return copy


def _in_float32(config):
    """`config` with every mixed dtype policy made float32, nested models included."""
    if isinstance(config, list):
        return [_in_float32(item) for item in config]
    if not isinstance(config, dict):
        return config
    if config.get("class_name") == "DTypePolicy" and isinstance(config.get("config"), dict):
        return {**config, "config": {**config["config"], "name": "float32"}}
    return {key: _in_float32(value) for key, value in config.items()}


def _layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _layers(layer)
