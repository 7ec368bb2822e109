"""The multi-worker training loop: `--strategy multi-worker`.

Keras 3 `model.fit` fails under `MultiWorkerMirroredStrategy` ("Attempt to
convert a value (PerReplica...)", keras-team/keras#20585), so for it
(`distribute.needs_custom_loop(strategy)`) the engine trains with `fit`
here, over `train_custom_loop`: a `strategy.run` loop that uses the same
Keras model, loss and optimizer.

The data: each worker reads the whole dataset and keeps its share of every
global batch (auto-shard policy DATA), so all must see the same batches in
the same order (the same seed on every worker); where the training data is
in files each worker can have to itself (packed shards), each reads only its
own (`own_data`). A worker that stops early leaves the others waiting in a
collective op: decide to stop only from values that every worker shares,
such as the reduced logs `train_custom_loop` passes to `on_epoch_end`.
"""

import contextlib
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf

from dlsuite import callbacks as dl_callbacks
from dlsuite.apps.core import atomic, checkpoints, distribute, errors, loop_parts, optim, rundir


def fit(model, train, validation, *, order, strategy, optimizer_config, loss, epochs, steps_per_epoch,
        global_batch_size, paths, resume_paths=None, checkpoint_every=60.0):
    """Multi-worker training: Keras 3.15's fit fails under
    MultiWorkerMirroredStrategy (keras#20585), so a custom loop over
    strategy.run trains the same model and optimizer.

    The chief checkpoints at epoch ends; started again with --resume, every
    worker restores the chief's last checkpoint (`resume_paths`), so all go
    on from the same epoch. A lost worker stops the others with one line
    (`RunFailed`) instead of a traceback.
    """
    with strategy.scope():
        optimizer = optim.make_optimizer(optimizer_config, steps_per_epoch=steps_per_epoch, epochs=epochs)
        optimizer.build(model.trainable_variables)  # its slots exist before a checkpoint is restored into them
    variables = [*model.variables, *optimizer.variables]
    store = checkpoints.Store(paths["resume"])
    saved = checkpoints.Store(resume_paths["resume"]).latest() if resume_paths else None
    chief = distribute.is_chief(strategy)
    if saved:
        checkpoints.restore(variables, saved)
        print(f"resuming from {saved.path}: epoch {saved.epoch + 1}", flush=True)
    start, logged = (saved.epoch, {k: list(v) for k, v in saved.history.items()}) if saved else (0, {})
    best_path = paths["best"] if chief else os.path.join(distribute.worker_dir(os.path.dirname(paths["best"]), strategy), "best.keras")
    best = dl_callbacks.BestCheckpoint(best_path, monitor="val_loss", save=atomic.save_model,
                                       best=min(logged["val_loss"]) if logged.get("val_loss") else None)
    best.set_model(model)
    step_decay = [c for c in optim.schedule_callbacks(optimizer_config) if isinstance(c, dl_callbacks.StepDecay)]
    log = dl_callbacks.EpochLog(paths["log"], epochs) if chief else None

    def on_epoch_end(epoch, logs):
        best.on_epoch_end(epoch, logs)
        if log:
            log.on_epoch_end(epoch, logs)
        for callback in step_decay:  # set the next epoch's rate
            optimizer.learning_rate = callback.rate(epoch + 1)
        for key, value in logs.items():
            logged.setdefault(key, []).append(float(value))
        if checkpoint_every is not None and chief:
            store.write(variables, epoch=epoch + 1, batch=0, history=logged)

    for callback in step_decay:
        optimizer.learning_rate = callback.rate(start)
    own, line = own_data(order, strategy, global_batch_size=global_batch_size,
                         steps_per_epoch=steps_per_epoch, first_epoch=start, end_epoch=epochs)
    if line and chief:
        print(line, flush=True)
    reason = None
    try:
        train_custom_loop(
            strategy=strategy, model=model, optimizer=optimizer, loss=loss, train_dataset=own or train,
            validation_dataset=validation, epochs=epochs, global_batch_size=global_batch_size,
            on_epoch_end=on_epoch_end, verbose=chief, initial_epoch=start, steps_per_epoch=steps_per_epoch if own else None,
        )
    except loop_parts.NonFiniteLoss as stop:
        reason = str(stop)
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError,
            tf.errors.CancelledError, tf.errors.InternalError) as error:
        raise errors.RunFailed(_lost_peer_line(error, store)) from None
    if reason is None and checkpoint_every is not None and chief:
        store.mark_finished(len(logged.get("loss", [])))
    if chief:
        rundir.write_history(paths["history"], logged)
    return loop_parts.FitResult(logged, reason, best_path if os.path.exists(best_path) else None,
                     len(logged.get("loss", [])) - start)


def _lost_peer_line(error, store):
    """What a worker says when a collective failed because another task of the cluster is gone."""
    where = f"{store.folder}" if store.has_any() else "the chief's run directory"
    return (f"training stopped: the cluster lost {distribute.lost_task_phrase(error, unnamed='another task')}; "
            "start every task again with "
            f"--resume RUN_DIR to go on from the last checkpoint ({where})")



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
    chief = distribute.is_chief(strategy)
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


def _replica_steps(model, optimizer, loss, *, with_accuracy, pre_reduce):
    """Step 2: the train and eval functions each replica runs on its share of a batch."""
    per_example_loss = loop_parts.per_example_loss_fn(loss)
    binary_threshold = 0.0 if getattr(loss, "from_logits", False) else 0.5
    variables = model.trainable_variables

    def batch_sums(y, y_pred, per_example, regularization):
        return loop_parts.batch_sums(
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
            regularization = loop_parts.regularization(model)
            total = batch_loss + tf.nn.scale_regularization_loss(regularization)
            total = optimizer.scale_loss(total)  # a no-op unless loss scaling is set
        gradients = tape.gradient(total, variables)
        if pre_reduce:
            gradients = _all_reduce_sum(context, gradients)
        optimizer.apply(gradients, variables)
        return batch_sums(y, y_pred, per_example, regularization)

    def replica_eval_step(x, y):
        y_pred = model(x, training=False)
        return batch_sums(y, y_pred, per_example_loss(y, y_pred), loop_parts.regularization(model))

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
            raise loop_parts.NonFiniteLoss(
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
    workers = max(1, len(distribute.cluster_workers()))
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
