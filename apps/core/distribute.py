"""Distribution strategies, and the custom training loop multi-worker needs.

Every app trains on a `tf.distribute.Strategy` chosen by `--strategy`
(`STRATEGIES`): `make_strategy(name)` builds it, and the model and optimizer
are then created inside `strategy.scope()`.

Keras 3 `model.fit` fails under `MultiWorkerMirroredStrategy` ("Attempt to
convert a value (PerReplica...)", keras-team/keras#20585), so for it
(`needs_custom_loop(strategy)`) the engine trains with `train_custom_loop`: a
`strategy.run` loop that uses the same Keras model, loss and optimizer.

Multi-worker rules the caller must follow:

* Create the strategy first, before any other TensorFlow op (seeding,
  building a model, even `tf.constant`): it configures collective ops, which
  TensorFlow accepts only at program start-up; later, `make_strategy` raises
  RuntimeError.
* Every worker runs the same program on the same data; every worker takes
  every step, and also every save, because saving reads distributed variables
  through collective ops. Only the chief (`is_chief`) writes to the real
  paths; the others write to `worker_dir(path, strategy)` and delete it
  afterwards (TensorFlow's multi-worker checkpoint convention).
* Each worker reads the whole dataset and keeps its share of every global
  batch (auto-shard policy DATA), so all must see the same batches in the
  same order: shuffle with the same seed on every worker, or not at all.
* Collectives use TensorFlow's default implementation
  (`CommunicationImplementation.AUTO`); every worker needs the same number
  of GPUs.
* A worker that stops early leaves the others waiting in a collective op:
  decide to stop only from values that every worker shares, such as the
  reduced logs `train_custom_loop` passes to `on_epoch_end`.
"""

import contextlib
import json
import math
import os
import socket
import time

import keras
import numpy as np
import tensorflow as tf

from dlsuite.apps.core import choices
from dlsuite.apps.core.errors import UsageError
from dlsuite.callbacks.nan_guard import NAN_ADVICE

STRATEGIES = choices.STRATEGIES

TF_CONFIG_EXAMPLE = (
    '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
    '"task": {"type": "worker", "index": 0}}'
)

# Environment variables that Cloud TPU, Colab and GKE set; without one of them
# (or an explicit address) `auto` does not look for a TPU, because resolving
# one offline can block for minutes.
TPU_ENV_VARIABLES = ("TPU_NAME", "COLAB_TPU_ADDR", "KUBE_GOOGLE_CLOUD_TPU_ENDPOINTS")

# Seconds to wait for a TPU worker's gRPC port before calling it unreachable;
# TensorFlow's own connect retries forever.
TPU_CONNECT_TIMEOUT_S = 10.0


class NonFiniteLoss(UsageError):
    """The training loss became NaN or infinite; training stopped.

    Raised by `train_custom_loop` at the first step whose loss (reduced over
    all replicas, so every worker raises at the same step) is not finite. It
    is a `UsageError` because the usual cause is a too high learning rate; the
    message says what to change.

    Attributes:
        epoch: 0-based epoch of the step.
        step: 0-based step within the epoch.
        value: the non-finite mean batch loss.
        history: the history of the epochs completed before, as returned by
            `train_custom_loop`.
    """

    def __init__(self, *, epoch, step, value, history):
        super().__init__(NAN_ADVICE.format(value=value, epoch=epoch + 1, batch=step + 1))
        self.epoch = epoch
        self.step = step
        self.value = value
        self.history = history


def make_strategy(name, *, tpu_address=None):
    """Builds the distribution strategy named by `--strategy`.

    Args:
        name: one of `STRATEGIES`:
            `auto`: a TPU when one is plausibly there (a TPU environment
            variable, see `TPU_ENV_VARIABLES`, or `tpu_address`) and
            reachable, else `MirroredStrategy` over several GPUs,
            `OneDeviceStrategy` on a single GPU, or the default strategy.
            `default`: `tf.distribute.get_strategy()`, no distribution.
            `one-device`: GPU 0 if there is one, else the CPU.
            `mirrored`: `MirroredStrategy` over all local GPUs (the CPU, one
            replica, on a machine without GPUs).
            `multi-worker`: `MultiWorkerMirroredStrategy` over the cluster in
            the `TF_CONFIG` environment variable; create it before any other
            TensorFlow op (see the module docstring).
            `parameter-server`: `ParameterServerStrategy` over the TF_CONFIG
            cluster of chief, worker and ps tasks (`parameter_server`); on a
            worker or ps task this serves until the chief's run is over and
            exits the process (SystemExit 0) instead of returning.
            `tpu`: `TPUStrategy` on the TPU at `tpu_address` (a name or
            `grpc://host:port`; default: the environment's).
        tpu_address: TPU name or gRPC address, for `tpu` and `auto`.

    Returns:
        The strategy; create the model and optimizer inside its `scope()`.

    Raises:
        UsageError: unknown name, missing or invalid `TF_CONFIG`, no TPU.
        RuntimeError: `multi-worker` requested after TensorFlow started.
    """
    if name not in STRATEGIES:
        raise UsageError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}")
    if name == "auto":
        return _auto_strategy(tpu_address)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one-device":
        device = "/gpu:0" if tf.config.list_physical_devices("GPU") else "/cpu:0"
        return tf.distribute.OneDeviceStrategy(device)
    if name == "mirrored":
        # With no GPU, MirroredStrategy mirrors over the CPU: one replica.
        return tf.distribute.MirroredStrategy()
    if name == "multi-worker":
        return _multi_worker_strategy()
    if name == "parameter-server":
        from dlsuite.apps.core import parameter_server

        return parameter_server.make_strategy()
    return _tpu_strategy(tpu_address)


def _auto_strategy(tpu_address):
    if tpu_address or any(os.environ.get(var) for var in TPU_ENV_VARIABLES):
        try:
            return _tpu_strategy(tpu_address)
        except UsageError:
            pass  # a TPU was only plausible; fall back to the local devices
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    if gpus:
        return tf.distribute.OneDeviceStrategy("/gpu:0")
    return tf.distribute.get_strategy()


def _tpu_strategy(tpu_address):
    if not tpu_address and os.environ.get("COLAB_TPU_ADDR"):
        # Colab names its TPU by address only; TensorFlow does not read it.
        tpu_address = "grpc://" + os.environ["COLAB_TPU_ADDR"]
    where = tpu_address or "the environment's TPU (TPU_NAME)"
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu_address)
        if tpu_address != "local":
            for address in resolver.cluster_spec().as_dict().get("worker", []):
                _check_reachable(address)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    except (ValueError, RuntimeError, OSError, tf.errors.OpError) as error:
        raise UsageError(
            f"no TPU was reachable at {where} ({_one_line(error)}); set TPU_NAME "
            "(a TPU name, 'local' on a TPU VM, or grpc://host:port) or choose another --strategy"
        ) from error


def _check_reachable(address):
    """Raises OSError unless `address` ("[grpc://]host:port") accepts a TCP connection."""
    host, _, port = address.removeprefix("grpc://").rpartition(":")
    with socket.create_connection((host, int(port)), timeout=TPU_CONNECT_TIMEOUT_S):
        pass


def _multi_worker_strategy():
    _check_tf_config(os.environ.get("TF_CONFIG"))
    try:
        return tf.distribute.MultiWorkerMirroredStrategy()
    except RuntimeError as error:
        raise RuntimeError(
            "MultiWorkerMirroredStrategy must be created at program start, before any other "
            f"TensorFlow op: call make_strategy('multi-worker') first ({error})"
        ) from error


def parse_tf_config(raw, *, strategy, example):
    """(cluster, task) of the TF_CONFIG text `raw`, for `--strategy STRATEGY`.

    Raises:
        UsageError: missing, not JSON, or without a 'cluster' and a 'task' object;
            the message ends with `example`.
    """
    if not raw:
        raise UsageError(f"--strategy {strategy} needs the TF_CONFIG environment variable; {example}")
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise UsageError(f"TF_CONFIG is not valid JSON ({error}); {example}") from error
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise UsageError(f"TF_CONFIG needs a 'cluster' and a 'task' object; {example}")
    return cluster, task


def _check_tf_config(raw):
    """Raises UsageError unless `raw` is a TF_CONFIG naming a worker of a cluster."""
    example = f"for example TF_CONFIG='{TF_CONFIG_EXAMPLE}' (the same cluster on every worker, index 0, 1, ...)"
    cluster, task = parse_tf_config(raw, strategy="multi-worker", example=example)
    task_type, index = task.get("type"), task.get("index")
    if task_type not in ("chief", "worker"):
        raise UsageError(f"TF_CONFIG task type must be 'chief' or 'worker', got {task_type!r}; {example}")
    addresses = cluster.get(task_type)
    if not isinstance(addresses, list) or not all(isinstance(a, str) and ":" in a for a in addresses):
        raise UsageError(f"TF_CONFIG cluster[{task_type!r}] must be a list of 'host:port'; {example}")
    if not isinstance(index, int) or not 0 <= index < len(addresses):
        raise UsageError(
            f"TF_CONFIG task index must be 0..{len(addresses) - 1} for the {len(addresses)} "
            f"{task_type} address(es), got {index!r}; {example}"
        )


def _one_line(error):
    return " ".join(str(error).split()) or type(error).__name__


def needs_custom_loop(strategy):
    """True where `model.fit` cannot train: MultiWorkerMirroredStrategy (keras-team/keras#20585)."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def is_parameter_server(strategy):
    """True for `--strategy parameter-server`: `parameter_server.fit` trains it
    (neither `model.fit` nor `train_custom_loop` drives a ClusterCoordinator)."""
    return isinstance(strategy, tf.distribute.ParameterServerStrategy)


def is_chief(strategy):
    """True on the worker that writes run files and checkpoints (always, unless multi-worker)."""
    return bool(strategy.extended.should_checkpoint)


def worker_dir(path, strategy):
    """The directory this worker writes `path` to.

    The chief writes to `path` itself. Another worker must still save (saving
    takes part in collective ops) but to a directory of its own,
    `<parent of path>/workertemp_<task id>/<name of path>`, created here, which
    the caller deletes once written: TensorFlow's multi-worker checkpoint
    convention.

    Args:
        path: directory the run's files or checkpoints go to.
        strategy: the training strategy.

    Returns:
        `path`, or this worker's temporary directory.
    """
    if is_chief(strategy):
        return path
    parent, name = os.path.split(os.path.normpath(path))
    temporary = os.path.join(parent, f"workertemp_{strategy.cluster_resolver.task_id}", name)
    os.makedirs(temporary, exist_ok=True)
    return temporary


def train_custom_loop(
    *,
    strategy,
    model,
    optimizer,
    loss,
    train_dataset,
    validation_dataset=None,
    epochs,
    global_batch_size,
    metrics=("accuracy",),
    initial_epoch=0,
    on_epoch_end=None,
    steps_per_epoch=None,
    verbose=True,
):
    """Trains `model` with a `strategy.run` loop, as `model.fit` would.

    This is the loop of TensorFlow's custom-training guide: each replica
    computes its per-example losses, divides their sum by the number of
    examples in the global batch (`tf.nn.compute_average_loss`; the number is
    all-reduced, so a partial last batch weighs as in `model.fit`), adds
    `model.losses` scaled by 1/replicas, and takes the gradients. The
    gradients are summed over replicas before the Keras optimizer sees them,
    so its clipping acts on the global gradient as on one device; its
    schedule, weight decay and constraints apply as in `model.fit`.

    Args:
        strategy: the strategy `model` and `optimizer` were created under.
        model: a built Keras model, created inside `strategy.scope()`;
            compiled or not (its compiled loss and metrics are not used).
        optimizer: a Keras optimizer created inside `strategy.scope()`.
        loss: a Keras loss object, name or function of `(y_true, y_pred)`;
            its reduction is ignored: the loop reduces per-example losses.
        train_dataset: `tf.data.Dataset` of `(x, y)` batches of the GLOBAL
            batch size; every worker passes the same dataset and the loop
            gives each replica its share (auto-shard policy DATA).
        validation_dataset: same form, evaluated after each epoch, or None.
        epochs: index of the last epoch + 1, as in `model.fit`.
        global_batch_size: the batch size of the datasets, over all replicas;
            at least one example per replica. (The loss of each batch is
            divided by its actual size, which differs only for a partial
            last batch.)
        metrics: `("accuracy",)` or `()`; accuracy is sparse, categorical or
            binary after the shapes of labels and predictions.
        initial_epoch: epoch to start at, to resume a run.
        on_epoch_end: called as `on_epoch_end(epoch, logs)` after each epoch
            with `logs` {"loss", "accuracy", "val_loss", "val_accuracy",
            "learning_rate"} as floats, the same on every worker; return True
            to stop training there (early stopping).
        steps_per_epoch: steps per epoch; the dataset restarts when it runs
            out. None: one pass over the dataset, which must be finite.
        verbose: print one line per epoch (on the chief only).

    Returns:
        dict {log name: [one value per epoch]}, like `History.history`.

    Raises:
        NonFiniteLoss: the loss became NaN or infinite; it carries the history
            of the epochs completed before.
        ValueError: a model or optimizer created outside `strategy.scope()`,
            an unbuilt model, an unknown metric, an infinite dataset without
            `steps_per_epoch`, an empty dataset.
    """
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    _check_arguments(strategy, model, optimizer, train_dataset, global_batch_size, metrics, steps_per_epoch)
    _build_optimizer(strategy, model, optimizer)
    with_accuracy = bool(metrics)
    pre_reduce = _can_pre_reduce_gradients(optimizer)
    replica_train_step, replica_eval_step = _replica_steps(
        model, optimizer, loss, with_accuracy=with_accuracy, pre_reduce=pre_reduce
    )
    distributed_train, distributed_validation, train_step, eval_step = _distributed_steps(
        strategy, replica_train_step, replica_eval_step, train_dataset, validation_dataset
    )
    batches = _EpochBatches(distributed_train, steps_per_epoch)
    chief = is_chief(strategy)
    with _gradients_pre_reduced(optimizer, pre_reduce):
        return _run_epochs(
            optimizer=optimizer, train_step=train_step, eval_step=eval_step, batches=batches,
            distributed_validation=distributed_validation, initial_epoch=initial_epoch, epochs=epochs,
            with_accuracy=with_accuracy, on_epoch_end=on_epoch_end, verbose=verbose, chief=chief,
        )


def _build_optimizer(strategy, model, optimizer):
    """Step 1: creates the optimizer's variables under the strategy, if not yet built."""
    with strategy.scope():
        if not optimizer.built:
            # Optimizer variables cannot be created inside the replica step.
            optimizer.build(model.trainable_variables)


def _batch_sums(y, y_pred, per_example, regularization, *, with_accuracy, binary_threshold):
    """Step 2a: (loss sum, correct predictions, examples) of this replica's batch."""
    count = tf.cast(tf.shape(per_example)[0], tf.float32)
    loss_sum = tf.reduce_sum(tf.cast(per_example, tf.float32)) + count * regularization
    correct = (
        tf.reduce_sum(_per_example_accuracy(y, y_pred, binary_threshold)) if with_accuracy else tf.constant(0.0)
    )
    return tf.stack([loss_sum, correct, count])


def _replica_steps(model, optimizer, loss, *, with_accuracy, pre_reduce):
    """Step 2: the train and eval functions each replica runs on its share of a batch."""
    per_example_loss = _per_example_loss_fn(loss)
    binary_threshold = 0.0 if getattr(loss, "from_logits", False) else 0.5
    variables = model.trainable_variables

    def batch_sums(y, y_pred, per_example, regularization):
        return _batch_sums(
            y, y_pred, per_example, regularization, with_accuracy=with_accuracy, binary_threshold=binary_threshold
        )

    def replica_train_step(x, y):
        context = tf.distribute.get_replica_context()
        local_count = tf.cast(tf.shape(tf.nest.flatten(y)[0])[0], tf.float32)
        global_count = tf.cast(context.all_reduce(tf.distribute.ReduceOp.SUM, local_count), tf.int64)
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            per_example = per_example_loss(y, y_pred)
            batch_loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_count)
            regularization = _regularization(model)
            total = batch_loss + tf.nn.scale_regularization_loss(regularization)
            total = optimizer.scale_loss(total)  # a no-op unless loss scaling is set
        gradients = tape.gradient(total, variables)
        if pre_reduce:
            gradients = _all_reduce_sum(context, gradients)
        optimizer.apply(gradients, variables)
        return batch_sums(y, y_pred, per_example, regularization)

    def replica_eval_step(x, y):
        y_pred = model(x, training=False)
        return batch_sums(y, y_pred, per_example_loss(y, y_pred), _regularization(model))

    return replica_train_step, replica_eval_step


def _distributed_steps(strategy, replica_train_step, replica_eval_step, train_dataset, validation_dataset):
    """Step 3: the distributed datasets and their reduced train and eval steps (eval: None without data)."""
    if callable(train_dataset):  # each worker's own data (`own_data`)
        distributed_train = strategy.distribute_datasets_from_function(train_dataset)
    else:
        distributed_train = strategy.experimental_distribute_dataset(_shard_by_data(train_dataset))
    distributed_validation = (
        strategy.experimental_distribute_dataset(_shard_by_data(validation_dataset))
        if validation_dataset is not None
        else None
    )
    train_step = _reduced_step(strategy, replica_train_step, distributed_train)
    eval_step = (
        _reduced_step(strategy, replica_eval_step, distributed_validation)
        if distributed_validation is not None
        else None
    )
    return distributed_train, distributed_validation, train_step, eval_step


def _run_epochs(
    *, optimizer, train_step, eval_step, batches, distributed_validation, initial_epoch, epochs, with_accuracy,
    on_epoch_end, verbose, chief,
):
    """Step 4: the epoch loop; returns the history."""
    history = {}
    for epoch in range(initial_epoch, epochs):
        started = time.perf_counter()
        totals = _train_epoch(train_step, batches, epoch=epoch, history=history)
        logs = _logs(totals, prefix="", with_accuracy=with_accuracy)
        if eval_step is not None:
            val_totals = _evaluate(eval_step, distributed_validation)
            logs.update(_logs(val_totals, prefix="val_", with_accuracy=with_accuracy))
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        for key, value in logs.items():
            history.setdefault(key, []).append(value)
        if verbose and chief:
            _print_epoch(epoch, epochs, time.perf_counter() - started, logs)
        if on_epoch_end is not None and on_epoch_end(epoch, dict(logs)) is True:
            break
    return history


def _train_epoch(train_step, batches, *, epoch, history):
    """Step 4a: one epoch of training steps; returns the summed (loss, correct, examples)."""
    totals = np.zeros(3)
    for step, batch in enumerate(batches.next_epoch()):
        sums = train_step(batch).numpy()
        if not math.isfinite(sums[0]):
            raise NonFiniteLoss(
                epoch=epoch, step=step, value=float(sums[0] / max(sums[2], 1.0)), history=history
            )
        totals += sums
    return totals


def _evaluate(eval_step, distributed_validation):
    """Step 4b: one pass over the validation data; returns the summed (loss, correct, examples)."""
    val_totals = np.zeros(3)
    for batch in distributed_validation:
        val_totals += eval_step(batch).numpy()
    return val_totals


def _print_epoch(epoch, epochs, seconds, logs):
    """Step 4c: the epoch's one-line report."""
    line = " - ".join(f"{key}: {value:.4g}" for key, value in logs.items())
    print(f"Epoch {epoch + 1}/{epochs} - {seconds:.1f}s - {line}", flush=True)


def _check_arguments(strategy, model, optimizer, train_dataset, global_batch_size, metrics, steps_per_epoch):
    unknown = [metric for metric in metrics if metric not in ("accuracy", "acc")]
    if unknown:
        raise ValueError(f"train_custom_loop supports only the metric 'accuracy', got {unknown}")
    if not isinstance(global_batch_size, int) or global_batch_size < strategy.num_replicas_in_sync:
        raise ValueError(
            f"global_batch_size must be an int of at least the {strategy.num_replicas_in_sync} "
            f"replica(s), got {global_batch_size!r}"
        )
    if steps_per_epoch is not None and steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be positive or None, got {steps_per_epoch}")
    if steps_per_epoch is None and train_dataset.cardinality() == tf.data.INFINITE_CARDINALITY:
        raise ValueError("the training dataset repeats forever: pass steps_per_epoch")
    if not model.built:
        raise ValueError(f"model {model.name!r} is not built: build it inside strategy.scope() first")
    outside = [
        v.path for v in model.trainable_variables if not strategy.extended.variable_created_in_scope(_tf_variable(v))
    ]
    if outside:
        raise ValueError(f"model {model.name!r} was not created inside strategy.scope() (e.g. {outside[0]})")
    # Keras optimizers remember the strategy they were created under and
    # update variables through it.
    if getattr(optimizer, "_distribution_strategy", strategy) is not strategy:
        raise ValueError("the optimizer was not created inside strategy.scope()")


def _tf_variable(variable):
    return variable.value if isinstance(variable, keras.Variable) else variable


def _per_example_loss_fn(loss):
    """Returns `fn(y_true, y_pred)` -> one loss per example, shape (batch,)."""
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        # `Loss.call` gives the unreduced losses; `__call__` would reduce them
        # with the object's reduction. Cast as `Loss.__call__` does.
        def unreduced(y_true, y_pred):
            return loss.call(
                tf.nest.map_structure(lambda t: tf.cast(t, loss.dtype), y_true),
                tf.nest.map_structure(lambda t: tf.cast(t, loss.dtype), y_pred),
            )
    elif callable(loss):
        unreduced = loss
    else:
        raise ValueError(f"loss must be a keras loss object, name or function, got {loss!r}")

    def per_example(y_true, y_pred):
        losses = unreduced(y_true, y_pred)
        # Losses per time step or pixel: their mean, as "sum_over_batch_size" weighs them.
        if losses.shape.rank > 1:
            losses = tf.reduce_mean(losses, axis=list(range(1, losses.shape.rank)))
        return losses

    return per_example


def _per_example_accuracy(y_true, y_pred, binary_threshold):
    """1.0 per correctly classified example (mean over positions for sequences)."""
    if y_pred.shape[-1] == 1:
        correct = keras.metrics.binary_accuracy(y_true, y_pred, threshold=binary_threshold)
    elif y_true.shape.rank == y_pred.shape.rank and y_true.shape[-1] == y_pred.shape[-1]:
        correct = keras.metrics.categorical_accuracy(y_true, y_pred)
    else:
        correct = keras.metrics.sparse_categorical_accuracy(y_true, y_pred)
    correct = tf.cast(correct, tf.float32)
    if correct.shape.rank > 1:
        correct = tf.reduce_mean(correct, axis=list(range(1, correct.shape.rank)))
    return correct


def _regularization(model):
    losses = model.losses
    return tf.add_n([tf.cast(value, tf.float32) for value in losses]) if losses else tf.constant(0.0)


def _can_pre_reduce_gradients(optimizer):
    """Whether the loop can sum gradients itself instead of the optimizer.

    A Keras TensorFlow optimizer sums gradients over replicas only after it
    clipped each replica's share, so `clipnorm` would act on a fraction of the
    gradient. The loop sums first and turns the optimizer's own sum off. A
    loss-scale optimizer checks each replica's gradients itself, so it keeps
    Keras's order.
    """
    return hasattr(type(optimizer), "_all_reduce_sum_gradients") and not isinstance(
        optimizer, keras.optimizers.LossScaleOptimizer
    )


@contextlib.contextmanager
def _gradients_pre_reduced(optimizer, active):
    """Turns the optimizer's gradient all-reduce off while the loop runs."""
    if not active:
        yield
        return
    # The loop's gradients arrive summed already; summing again would multiply
    # them by the number of replicas.
    optimizer._all_reduce_sum_gradients = lambda grads_and_vars: grads_and_vars
    try:
        yield
    finally:
        del optimizer._all_reduce_sum_gradients


def _all_reduce_sum(context, gradients):
    """Sums gradients over replicas in one batched all-reduce; None stays None."""
    present = [g for g in gradients if g is not None]
    summed = iter(context.all_reduce(tf.distribute.ReduceOp.SUM, present) if present else [])
    return [None if g is None else next(summed) for g in gradients]


def own_data(order, strategy, *, global_batch_size, steps_per_epoch, first_epoch, end_epoch):
    """The input of a multi-worker run where each worker reads only its own
    part of the training data (packed shards: its own shard files), rather
    than all of it to keep its share of each batch.

    Args:
        order: the training split's `epochs.EpochOrder`.

    Returns:
        (dataset function for `train_custom_loop`, or None to read as usual;
        the line that says which and why).
    """
    workers = max(1, len(_cluster_workers()))
    share = getattr(order, "worker_share", None)
    if workers < 2 or share is None:
        return None, None
    if global_batch_size % strategy.num_replicas_in_sync:
        return None, (f"every worker reads all the training data and keeps its part of each batch: the batch of "
                      f"{global_batch_size} does not divide among {strategy.num_replicas_in_sync} replicas")
    if any(share(worker, workers, 1) is None for worker in range(workers)):
        return None, (f"every worker reads all the training data and keeps its part of each batch: fewer data "
                      f"files than the {workers} workers (pack with a smaller --shard-mb for one file each at least)")

    def dataset_fn(context):
        # Each worker's epochs take the same number of steps, whatever its part's size: the all-reduce needs every worker.
        mine = share(context.input_pipeline_id, context.num_input_pipelines,
                     context.get_per_replica_batch_size(global_batch_size))
        return mine.stream(first_epoch, end_epoch, steps=steps_per_epoch)

    return dataset_fn, f"each of the {workers} workers reads only its own part of the training data files"


def _shard_by_data(dataset):
    """Each worker reads the whole dataset and takes its share of every batch."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def _reduced_step(strategy, replica_fn, distributed_dataset):
    """A tf.function running `replica_fn(x, y)` on each replica, its sums added up."""

    def step(batch):
        x, y = batch
        sums = strategy.run(replica_fn, args=(x, y))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, sums, axis=None)

    # The signature's unknown batch size keeps a partial last batch from
    # tracing the step a second time.
    return tf.function(step, input_signature=[distributed_dataset.element_spec])


class _EpochBatches:
    """The distributed batches of each epoch: one pass, or `steps` batches."""

    def __init__(self, distributed_dataset, steps):
        self._dataset = distributed_dataset
        self._steps = steps
        self._iterator = None

    def next_epoch(self):
        if self._steps is None:
            yield from self._one_pass()
            return
        for _ in range(self._steps):
            if self._iterator is None:
                self._iterator = iter(self._dataset)
            try:
                yield next(self._iterator)
            except StopIteration:
                # Out of data: start the next pass, as Keras would with a repeated dataset.
                self._iterator = iter(self._dataset)
                try:
                    yield next(self._iterator)
                except StopIteration:
                    raise ValueError("the training dataset is empty") from None

    def _one_pass(self):
        empty = True
        for batch in self._dataset:
            empty = False
            yield batch
        if empty:
            raise ValueError("the training dataset is empty")


def _logs(totals, *, prefix, with_accuracy):
    loss_sum, correct, count = totals
    if count == 0:
        raise ValueError(f"the {'validation' if prefix else 'training'} dataset is empty")
    logs = {f"{prefix}loss": float(loss_sum / count)}
    if with_accuracy:
        logs[f"{prefix}accuracy"] = float(correct / count)
    return logs


def describe(strategy):
    """What a strategy means here, for people: "one CPU", "2 GPUs mirrored",
    "2 workers, all-reduce", "TPU, 8 cores"."""
    replicas = strategy.num_replicas_in_sync
    try:
        devices = strategy.extended.worker_devices
    except RuntimeError:  # the default strategy has none: the current device
        devices = ["GPU"] if tf.config.list_physical_devices("GPU") else []
    kind = "GPU" if any("GPU" in device.upper() for device in devices) else "CPU"
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        workers = len(_cluster_workers()) or replicas
        return f"{workers} workers, all-reduce ({replicas} replicas)"
    if is_parameter_server(strategy):
        from dlsuite.apps.core import parameter_server

        return parameter_server.describe()
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return f"TPU, {replicas} cores"
    if isinstance(strategy, tf.distribute.MirroredStrategy):
        return f"{replicas} {kind}{'s' if replicas != 1 else ''} mirrored"
    return f"one {kind}"


def tf_config():
    """TF_CONFIG's (cluster, task) dicts for describing a run, ({}, {}) when it
    is unset or unreadable (the strategies check it strictly themselves)."""
    try:
        config = json.loads(os.environ.get("TF_CONFIG") or "{}")
        cluster, task = config.get("cluster", {}), config.get("task", {})
    except (ValueError, AttributeError):
        return {}, {}
    return (cluster if isinstance(cluster, dict) else {}), (task if isinstance(task, dict) else {})


def lost_task_phrase(error, *, unnamed):
    """ "ps 1 (UnavailableError)": the TF_CONFIG tasks a cluster error blames,
    or `unnamed` with the error's first words when it names none.

    TensorFlow's coordination service names the task that stopped sending
    heartbeats; a failed connection names the address. The task that reports
    the error is never the lost one.
    """
    import re

    text = str(getattr(error, "message", error))
    tasks = set(re.findall(r"reported from /job:(\w+)/(?:replica:\d+/)?task:(\d+)", text))
    cluster, me = tf_config()
    for job, addresses in cluster.items():
        for index, address in enumerate(addresses if isinstance(addresses, list) else []):
            if isinstance(address, str) and re.search(rf"(?<![\d.]){re.escape(address)}(?!\d)", text):
                tasks.add((job, str(index)))
    tasks.discard((me.get("type"), str(me.get("index"))))
    if tasks:
        return f"{', '.join(f'{job} {index}' for job, index in sorted(tasks))} ({type(error).__name__})"
    first = " ".join(text.split("Additional GRPC error information")[0].split())[:160] or "no message"
    return f"{unnamed} ({type(error).__name__}: {first})"


def _cluster_workers():
    cluster, _ = tf_config()
    return list(cluster.get("chief", [])) + list(cluster.get("worker", []))


def strategy_availability(name):
    """One line on what `--strategy NAME` would do on this machine (nothing is created)."""
    gpus = len(tf.config.list_physical_devices("GPU"))
    tpu_hint = any(os.environ.get(var) for var in TPU_ENV_VARIABLES)
    return {
        "auto": "a TPU if one is configured, else mirrored over the GPUs, else the default: here "
                + ("a TPU" if tpu_hint else f"{gpus} GPUs mirrored" if gpus > 1 else "one GPU" if gpus else "one CPU"),
        "default": "no distribution: one device",
        "one-device": "GPU 0" if gpus else "the CPU",
        "mirrored": f"{max(gpus, 1)} {'GPU' if gpus else 'CPU'} replica{'s' if gpus > 1 else ''} in this process",
        "multi-worker": "all-reduce over the TF_CONFIG cluster: " + (
            f"{len(_cluster_workers())} workers configured" if _cluster_workers() else "TF_CONFIG is not set"),
        "parameter-server": "variables on the TF_CONFIG cluster's ps tasks, steps on its workers: " + (
            _ps_cluster_line() if os.environ.get("TF_CONFIG") else "TF_CONFIG is not set"),
        "tpu": "the TPU named by TPU_NAME" + (" (set)" if tpu_hint else " (not set here)"),
    }[name]


def _ps_cluster_line():
    from dlsuite.apps.core import parameter_server

    size = parameter_server.cluster_size()
    return f"{size.get('worker', 0)} workers, {size.get('ps', 0)} ps configured"
