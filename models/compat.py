"""Every private Keras and keras-tuner API dlsuite relies on, in one place.

dlsuite needs a few things neither library exposes publicly: Keras's queue of
variables whose initialization was deferred, the call history of a layer, and
keras-tuner's gRPC oracle servicer and its tuner hook that discovers the
search space. Each is wrapped here by a function whose docstring names the
private API and the versions it was checked with; `tests/test_compat.py`
exercises every one of them against the installed versions, and setup.cfg
bounds keras and keras-tuner to the versions checked.

When a Keras or keras-tuner release moves one of these, only this module
changes. It lives in `dlsuite.models`, the bottom package, so `callbacks` and
`apps` can both use it; it imports nothing from them, and keras-tuner only
inside the functions that need it (importing it never imports keras_tuner).

Checked with keras 3.15.1 and keras-tuner 1.4.8.
"""

_UNINITIALIZED = "uninitialized_variables"

# The name of keras-tuner's private hook `BaseTuner._populate_initial_space()`
# (keras_tuner/src/engine/base_tuner.py), which `BaseTuner.__init__` calls when
# it starts a new project (not when it reloads one) to discover the search
# space; the default builds the hypermodel once per conditional branch. To
# override it, put a method under this name in a tuner class mixed in before
# keras-tuner's, e.g.
#     type(base.__name__, (Mixin, base), {POPULATE_INITIAL_SPACE: Mixin.declare_space})
# Checked with keras-tuner 1.4.8.
POPULATE_INITIAL_SPACE = "_populate_initial_space"


def _global_state():
    from keras.src.backend.common import global_state

    return global_state


def _pending():
    """Keras's live list of variables waiting for their initializer."""
    return _global_state().get_global_attribute(_UNINITIALIZED, [], set_to_default=True)


def uninitialized_variable_count():
    """How many variables Keras holds queued for a deferred initialization.

    A variable created inside `keras.StatelessScope(initialize_variables=False)`
    skips its initializer and is appended to a per-thread queue; Keras
    initializes every queued variable when the next top-level StatelessScope
    closes. Pair with `drop_uninitialized_variables(count)` to take off the
    queue what was added since `count` was read.

    Wraps the private `keras.src.backend.common.global_state
    .get_global_attribute("uninitialized_variables", [], set_to_default=True)`,
    the list `keras.src.backend.common.variables
    .register_uninitialized_variable` appends to and `initialize_all_variables`
    drains. Checked with keras 3.15.1.
    """
    return len(_pending())


def drop_uninitialized_variables(start):
    """Takes the variables queued after the first `start` off Keras's queue of
    deferred initializations (see `uninitialized_variable_count`), so no later
    StatelessScope initializes them. They stay uninitialized for good.

    Wraps the private `keras.src.backend.common.global_state
    .get_global_attribute("uninitialized_variables")` list, deleting its
    entries in place. Checked with keras 3.15.1.
    """
    del _pending()[start:]


def inbound_node_count(layer):
    """How many times `layer` (a layer or a model) was called on symbolic
    tensors, that is in how many functional graphs it is a node.

    Wraps the private `keras.src.ops.operation.Operation._inbound_nodes`, the
    list of `keras.src.ops.node.Node`s a call on KerasTensors appends to.
    Checked with keras 3.15.1.
    """
    return len(layer._inbound_nodes)


def first_call_inputs(layer):
    """The KerasTensors `layer` was first called on symbolic tensors with, as
    a flat list (one entry for a single input): for a nested model, the
    tensors it gets in the outer graph, where `layer.inputs` would give its own.

    Wraps the private `layer._inbound_nodes[0].input_tensors`
    (`keras.src.ops.node.Node.input_tensors`, the flat KerasTensors of the
    call's arguments). Checked with keras 3.15.1.

    Raises:
        ValueError: `layer` was never called on symbolic tensors.
    """
    if not layer._inbound_nodes:
        raise ValueError(f"Layer {layer.name!r} was never called on symbolic tensors.")
    return list(layer._inbound_nodes[0].input_tensors)


def add_oracle_servicer(oracle, server):
    """Serves `oracle` to distributed keras-tuner workers on `server` (a
    `grpc.server`, not started yet) and returns the servicer, for
    `search_finished`.

    This is what keras-tuner's chief loop does before it blocks: wraps the
    private `keras_tuner.src.distribute.oracle_chief.OracleServicer(oracle)`
    and `keras_tuner.src.protos.get_service_grpc()
    .add_OracleServicer_to_server(servicer, server)`. Checked with
    keras-tuner 1.4.8.
    """
    from keras_tuner.src import protos
    from keras_tuner.src.distribute import oracle_chief

    servicer = oracle_chief.OracleServicer(oracle)
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    return servicer


def search_finished(oracle, servicer):
    """True once the oracle has no trial left to hand out (a worker was told
    to stop), no trial is running and no worker is still attached: the chief
    may stop serving.

    Wraps the private `OracleServicer.stop_triggered` (set when the oracle
    answers a worker's CreateTrial with a STOPPED trial) and
    `keras_tuner.src.distribute.oracle_chief.exit_chief(oracle)`, the test
    keras-tuner's own `oracle_chief.start_server` loop ends on. Checked with
    keras-tuner 1.4.8.
    """
    if not servicer.stop_triggered:
        return False
    from keras_tuner.src.distribute import oracle_chief

    return bool(oracle_chief.exit_chief(oracle))


def build_training_state(model, element_spec):
    """Creates the optimizer's slots and the compiled metrics' variables of a
    compiled `model` before its first step, from the (x, y) `element_spec` of
    its training batches (no data is read), so a checkpoint can be restored
    into them. Keras's private `Trainer._symbolic_build(data_batch=...)`;
    `fit` runs it itself only under a distribution strategy and otherwise
    builds this state in the first step. Checked with keras 3.15.1.
    """
    model._symbolic_build(data_batch=element_spec)
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)


def learning_rate_schedule(optimizer):
    """The `LearningRateSchedule` `optimizer` was given, or None for a fixed rate.

    Keras keeps it in the private `_learning_rate` (the public property gives
    the rate at the current step only); a loss-scale optimizer holds it in
    its inner optimizer.
    """
    import keras

    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    schedule = getattr(optimizer, "_learning_rate", None)
    return schedule if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule) else None
