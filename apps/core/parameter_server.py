"""Parameter-server training: `--strategy parameter-server`.

A `tf.distribute.ParameterServerStrategy` cluster (TF_CONFIG with `chief`,
`worker` and `ps` tasks) keeps the variables on the parameter servers; the
chief (TensorFlow's coordinator) schedules training steps with
`ClusterCoordinator.schedule`, and each worker runs them asynchronously on
its own share of the input pipeline (`create_per_worker_dataset`), reading the
variables from the ps and sending its updates back.

Every task runs the same command. On a `worker` or `ps` task
`distribute.serve_cluster_task` starts the task's `tf.distribute.Server` and
waits until the chief's run is over (its address refuses connections, or
stops answering for `distribute.CHIEF_GONE_S`); only the chief loads data, builds the model and
writes the run directory. The workers need no data: the
chief ships the input pipeline's graph to them.

Keras 3.15's `model.fit` does not drive this strategy, so `fit` trains with a
schedule loop over the same model, loss and optimizer and gives the run the
same callbacks' effects as `model.fit` does: history.csv and train.log, the
best checkpoint, the NaN / divergence guard, early stopping, step and plateau
schedules, TensorBoard, and epoch-end checkpoints for `--resume`.

Evidence behind the choices (TF 2.21, Keras 3.15, measured on localhost):

* A Keras layer accepts a `ShardedVariable` (the partitioner's output) for
  its forward pass, but `tape.gradient(loss, model.trainable_variables)`
  fails ("'ShardedVariable' object has no attribute 'handle'", Keras's
  `Variable.handle`), and Keras's optimizer cannot update one
  ("ShardedVariable doesn't support being used as a reference", in
  `distribution.extended.update`). So the loop takes gradients with respect
  to the shards (`_shards`) and builds the optimizer over them: each slot is
  created colocated with its shard (TensorFlow never partitions a colocated
  variable), on the same parameter server.
* `model.save` cannot read a sharded variable ("'ShardedVariable' object has
  no attribute '__array__'"), so checkpoints are written from a plain copy of
  the model on the chief (`_HostCopy`), refreshed at each epoch end.
"""

import math
import os
import time

import keras
import numpy as np
import tensorflow as tf

from dlsuite import callbacks as dl_callbacks
from dlsuite.apps.core import checkpoints, distribute, loop_parts, optim, rundir
from dlsuite.apps.core import epochs as epochs_lib
from dlsuite.apps.core.errors import UsageError


# Steps in flight before the chief reads a step's loss (for the NaN guard and
# the running loss); it also bounds the coordinator's queue.
FETCH_WINDOW = 16

# What the coordinator raises when a parameter server (or the whole cluster)
# is gone; a lost worker raises nothing: its steps run elsewhere.
_CLUSTER_ERRORS = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError,
                   tf.errors.NotFoundError, tf.errors.FailedPreconditionError, tf.errors.InternalError,
                   tf.errors.UnknownError, tf.errors.DeadlineExceededError)


class ClusterLost(UsageError):
    """A parameter server (or the chief's link to it) was lost; training stopped.

    The checkpoints of the last finished epoch stay: start the lost task again
    and continue with `--resume RUN_DIR`.
    """


def shard_placement(model):
    """{variable path: [the device of each shard]} of `model`'s variables."""
    placement = {}
    for variable in model.variables:
        value = variable.value
        parts = value.variables if _is_sharded(value) else [value]
        placement[variable.path] = [part.device for part in parts]
    return placement


def describe_sharding(model):
    """ "split over the parameter servers: embedding/embeddings in 2 shards
    (ps 0, ps 1), ..." for the variables the partitioner split; None when it
    split none."""
    import re

    split = []
    for path, devices in shard_placement(model).items():
        if len(devices) > 1:
            tasks = [re.search(r"/job:ps/(?:replica:\d+/)?task:(\d+)", device) for device in devices]
            names = ", ".join(f"ps {task.group(1)}" if task else device for task, device in zip(tasks, devices))
            split.append(f"{path} in {len(devices)} shards ({names})")
    return f"split over the parameter servers: {'; '.join(split)}" if split else None


def _is_sharded(value):
    return type(value).__name__ == "ShardedVariable"


def _shards(variables):
    """The tf.Variables behind Keras variables: a sharded one's shards, in order."""
    return [part for v in variables for part in (v.value.variables if _is_sharded(v.value) else [v.value])]


class _HostCopy:
    """A plain copy of the model on the chief, for what cannot read sharded
    or remote variables: `model.save` (the best checkpoint), validation."""

    def __init__(self, model, *, optimizer, loss, metrics):
        # fit runs outside strategy.scope(): these variables are the chief's own.
        self.model = keras.models.clone_model(model)
        # The same kind of optimizer, built, so that a saved checkpoint loads
        # without Keras's "Skipping variable loading for optimizer" warning.
        copy = optimizer.__class__.from_config(optimizer.get_config())
        self.model.compile(optimizer=copy, loss=loss, metrics=list(metrics))
        copy.build(self.model.trainable_variables)
        self._source, self._optimizer = model, optimizer

    def refresh(self):
        """Copies the trained values in (call it with no step in flight);
        the optimizer's slots too where no variable is sharded."""
        for target, source in zip(self.model.variables, self._source.variables):
            target.assign(tf.convert_to_tensor(source.value))
        targets, sources = self.model.optimizer.variables, self._optimizer.variables
        if [tuple(v.shape) for v in targets] == [tuple(v.shape) for v in sources]:
            for target, source in zip(targets, sources):
                target.assign(source.numpy())


class _Value:
    """A variable as `checkpoints.Store.write` reads it, sharded or not."""

    def __init__(self, variable):
        self.path = variable.path
        self.shape = variable.shape
        self.value = tf.convert_to_tensor(variable.value)


def fit(model, train, validation, *, strategy, optimizer_config, loss, metrics=("accuracy",), epochs,
        steps_per_epoch, global_batch_size, paths, early_stopping=0, resume=False, callbacks=(),
        initial_epoch=0, best_checkpoint=True, checkpoint_every=60.0, verbose=True, resume_paths=None):
    """Trains `model` on the parameter-server cluster of `strategy`.

    Each training step is one batch of `global_batch_size` on one worker;
    an epoch is `steps_per_epoch` steps, whichever workers run them. Each
    worker reads its own share of the training stream (`_worker_share`), so
    with W workers each takes about 1/W of an epoch's steps and batches.
    Validation runs on the chief after each epoch, on a plain copy of
    the trained weights. Checkpoints for `--resume` are written at epoch ends
    (a resumed run starts at the epoch after the last finished one).

    Args:
        model: built inside `strategy.scope()`.
        train: an `epochs.EpochOrder` or a batched (x, y) dataset.
        validation: a batched (x, y) dataset, or None.
        strategy: a `ParameterServerStrategy`.
        optimizer_config: an `optim.OptimizerConfig`.
        loss: a Keras loss object.
        metrics: `("accuracy",)` or `()`.
        epochs: the epoch to end at.
        steps_per_epoch: steps in one epoch.
        global_batch_size: examples in one step.
        paths: `engine.run_paths(run_dir)`.
        early_stopping: patience in epochs on val_loss; 0 disables it.
        resume: go on from the newest checkpoint in `paths["resume"]`.
        callbacks: more Keras callbacks, run first (epoch-end ones: metric
            callbacks that read the logs).
        initial_epoch: the epoch to start at (without a checkpoint).
        best_checkpoint: keep `paths["best"]`.
        checkpoint_every: None: no checkpoints to resume from; any other
            value: a checkpoint at each epoch end.
        verbose: print one line per epoch.
        resume_paths: `engine.run_paths` of the run whose checkpoint
            `resume` goes on from (default: `paths`).

    Returns:
        A `loop_parts.FitResult`.

    Raises:
        ClusterLost: a parameter server stopped answering.
    """
    verbose = True if verbose is None else bool(verbose)
    os.makedirs(os.path.dirname(paths["best"]), exist_ok=True)
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    if any(isinstance(m, (list, tuple)) for m in metrics) or any(m not in ("accuracy", "acc") for m in metrics):
        raise UsageError(f"--strategy parameter-server trains single-output models with the metric 'accuracy', "
                         f"got {list(metrics)}; choose another --strategy", option="strategy")
    coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
    with strategy.scope():
        optimizer = optim.make_optimizer(optimizer_config, steps_per_epoch=steps_per_epoch, epochs=epochs)
        model.compile(optimizer=optimizer, loss=loss, metrics=list(metrics))
        variables = _shards(model.trainable_variables)
        optimizer.build(variables)
        totals = tf.Variable(tf.zeros(3), trainable=False, name="epoch_totals")  # loss sum, correct, examples
    host = _HostCopy(model, optimizer=optimizer, loss=loss, metrics=metrics)

    store = checkpoints.Store(paths["resume"])
    saved = checkpoints.Store((resume_paths or paths)["resume"]).latest() if resume else None
    start_epoch = saved.epoch if saved else initial_epoch
    state = [*model.variables, *optimizer.variables]
    if saved:
        checkpoints.restore(state, saved)
        rundir.write_history(paths["history"], saved.history)
        print(f"resuming from {saved.path}: epoch {start_epoch + 1}", flush=True)
    logged = {key: list(values) for key, values in (saved.history if saved else {}).items()}

    iterator = iter(coordinator.create_per_worker_dataset(_worker_share(train, start_epoch, epochs,
                                                                        global_batch_size=global_batch_size)))
    train_step = _train_step(strategy, model, optimizer, loss, variables, totals, with_accuracy=bool(metrics))
    eval_step = _eval_step(host.model, loss, with_accuracy=bool(metrics))

    nan_guard = dl_callbacks.NaNGuard(epoch_losses=logged.get("loss", ()))
    stateful = loop_parts.stateful_callbacks(optimizer_config, early_stopping)
    run_callbacks = loop_parts.run_callbacks(paths, epochs=epochs, resume=resume, initial_epoch=initial_epoch,
                                             best_checkpoint=best_checkpoint)
    every = [*callbacks, *stateful, dl_callbacks.LearningRateLogger(steps_per_epoch=steps_per_epoch), nan_guard,
             *run_callbacks]
    if resume:
        every.insert(len(callbacks) + len(stateful), checkpoints.HistoryReplay(stateful, logged))
    callback_list = keras.callbacks.CallbackList(every, model=model, add_history=False, add_progbar=False,
                                                 epochs=epochs, steps=steps_per_epoch, verbose=0)
    for callback in run_callbacks:
        if isinstance(callback, dl_callbacks.BestCheckpoint):
            callback.set_model(host.model)

    history = {}
    model.stop_training = False
    try:
        callback_list.on_train_begin()
        for epoch in range(start_epoch, epochs):
            started = time.perf_counter()
            callback_list.on_epoch_begin(epoch)
            totals.assign(tf.zeros(3))
            _run_epoch(coordinator, train_step, iterator, steps_per_epoch, callback_list, model)
            sums = totals.numpy()
            if sums[2] == 0:
                raise ValueError("the training dataset is empty")
            logs = _logs(sums, prefix="", with_accuracy=bool(metrics))
            host.refresh()
            if validation is not None:
                logs.update(_logs(_evaluate(eval_step, validation), prefix="val_", with_accuracy=bool(metrics)))
            callback_list.on_epoch_end(epoch, logs)
            for key, value in logs.items():
                history.setdefault(key, []).append(float(value))
                logged.setdefault(key, []).append(float(value))
            if verbose:
                print(f"Epoch {epoch + 1}/{epochs} - {time.perf_counter() - started:.1f}s - "
                      + " - ".join(f"{key}: {value:.4g}" for key, value in logs.items()), flush=True)
            if checkpoint_every is not None and nan_guard.message is None:
                store.write([_Value(v) for v in state], epoch=epoch + 1, batch=0, history=logged)
            if model.stop_training:
                break
        callback_list.on_train_end()
    except _CLUSTER_ERRORS as error:
        raise ClusterLost(_lost_message(error, paths)) from None
    if checkpoint_every is not None and nan_guard.message is None:
        store.mark_finished(len(logged.get("loss", [])))
    full_history = rundir.read_history(paths["history"]) or dict(logged)
    full_history.pop("epoch", None)
    return loop_parts.FitResult(history=full_history, stopped_reason=nan_guard.message,
                            best_checkpoint=paths["best"] if os.path.exists(paths["best"]) else None,
                            epochs_run=len(history.get("loss", [])))


def _lost_message(error, paths):
    run_dir = os.path.dirname(os.fspath(paths["history"]))
    return (f"the parameter-server cluster lost {distribute.lost_task_phrase(error, unnamed='a task the run needs')}; "
            f"the checkpoints of the last finished epoch are in {paths['resume']}: start every task again and the "
            f"chief with --resume {run_dir}")


def _worker_share(train, start_epoch, epochs, *, global_batch_size):
    """The dataset function of each worker's own share of the batches.

    Where the training data is in files a worker can have to itself (packed
    shards: `EpochOrder.worker_share`), worker i of W reads only files i,
    i + W, ..., in its own epochs. Otherwise worker i reads batches i, i + W,
    i + 2W, ... of the run's stream: without it every worker would read the
    same stream, and an epoch of N steps would train on the first N/W
    batches W times over. The coordinator gives steps to whichever worker is
    free, so a faster worker reads ahead into the next epoch's batches and a
    restarted one starts its share again; over the run each batch is still
    read about once.
    """
    workers = max(1, distribute.cluster_size().get("worker", 1))
    order = train if isinstance(train, epochs_lib.EpochOrder) else None
    own = order.worker_share if order is not None and order.worker_share and workers > 1 else None
    parts = [own(worker, workers, global_batch_size) for worker in range(workers)] if own else []
    if parts and all(part is not None for part in parts):
        # One graph per worker, the right one picked on the worker by its index.
        streams = [part.stream(start_epoch, epochs) for part in parts]
        graphs, spec = tf.stack([_as_graph(stream) for stream in streams]), streams[0].element_spec
        print(f"each of the {workers} workers reads only its own part of the training data files", flush=True)

        def own_files():
            index = tf.distribute.coordinator.experimental_get_current_worker_index()
            rebuilt = tf.raw_ops.DatasetFromGraph(graph_def=tf.gather(graphs, index))
            return tf.data.experimental.from_variant(rebuilt, spec).repeat()

        return own_files

    stream = order.stream(start_epoch, epochs) if order is not None else train
    graph, spec = _as_graph(stream), stream.element_spec

    def dataset_fn():
        rebuilt = tf.data.experimental.from_variant(tf.raw_ops.DatasetFromGraph(graph_def=graph), spec)
        index = tf.distribute.coordinator.experimental_get_current_worker_index()
        return rebuilt.shard(workers, index).repeat()

    return dataset_fn


def _as_graph(dataset):
    """`dataset` as a serialized graph: the chief's datasets travel to the
    workers so (a dataset tensor cannot be copied to another task), as the
    coordinator ships a plain dataset."""
    return tf.raw_ops.DatasetToGraphV2(input_dataset=tf.data.experimental.to_variant(dataset),
                                       external_state_policy=0, strip_device_assignment=True)  # 0: warn


def _train_step(strategy, model, optimizer, loss, variables, totals, *, with_accuracy):
    """The function a worker runs for one step: next batch, gradients with
    respect to the shards, the optimizer's update on the ps, the batch's
    (loss sum, correct, examples) added to `totals` and returned."""
    per_example_loss = loop_parts.per_example_loss_fn(loss)
    threshold = 0.0 if getattr(loss, "from_logits", False) else 0.5

    def replica_step(x, y):
        count = tf.cast(tf.shape(tf.nest.flatten(y)[0])[0], tf.float32)
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            per_example = per_example_loss(y, y_pred)
            regularization = loop_parts.regularization(model)
            total = tf.reduce_sum(tf.cast(per_example, tf.float32)) / count + regularization
            total = optimizer.scale_loss(total)
        gradients = tape.gradient(total, variables)
        optimizer.apply(gradients, variables)
        sums = loop_parts.batch_sums(y, y_pred, per_example, regularization, with_accuracy=with_accuracy,
                                      binary_threshold=threshold)
        totals.assign_add(sums)
        return sums

    @tf.function
    def step(iterator):
        x, y = next(iterator)
        sums = strategy.run(replica_step, args=(x, y))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, sums, axis=None)

    return step


def _eval_step(model, loss, *, with_accuracy):
    per_example_loss = loop_parts.per_example_loss_fn(loss)
    threshold = 0.0 if getattr(loss, "from_logits", False) else 0.5

    @tf.function
    def step(x, y):
        y_pred = model(x, training=False)
        return loop_parts.batch_sums(y, y_pred, per_example_loss(y, y_pred), loop_parts.regularization(model),
                                      with_accuracy=with_accuracy, binary_threshold=threshold)

    return step


def _run_epoch(coordinator, train_step, iterator, steps, callback_list, model):
    """Schedules an epoch's steps, reading each step's loss FETCH_WINDOW
    steps later (the NaN guard's batch check, early stop); waits for all."""
    pending, done, running = [], 0, np.zeros(3)

    def read_one():
        nonlocal done
        running[:] += pending.pop(0).fetch()
        callback_list.on_train_batch_end(done, {"loss": float(running[0] / max(running[2], 1.0))})
        done += 1

    for _ in range(steps):
        pending.append(coordinator.schedule(train_step, args=(iterator,)))
        if len(pending) > FETCH_WINDOW:
            read_one()
        if model.stop_training:
            break
    coordinator.join()
    while pending and not model.stop_training:
        read_one()


def _evaluate(eval_step, dataset):
    sums = np.zeros(3)
    for x, y in dataset:
        sums += eval_step(x, y).numpy()
    return sums


def _logs(sums, *, prefix, with_accuracy):
    loss_sum, correct, count = (float(v) for v in sums)
    if count == 0:
        raise ValueError(f"the {'validation' if prefix else 'training'} dataset is empty")
    logs = {f"{prefix}loss": loss_sum / count if math.isfinite(loss_sum) else loss_sum}
    if with_accuracy:
        logs[f"{prefix}accuracy"] = correct / count
    return logs
