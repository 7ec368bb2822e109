"""Distribution strategies: which one `--strategy` names, built, and what
the cluster around it is.

Every app trains on a `tf.distribute.Strategy` chosen by `--strategy`
(`STRATEGIES`): `make_strategy(name)` builds it, and the model and optimizer
are then created inside `strategy.scope()`. The loops that train under them
are elsewhere: Keras fit in `engine`, the all-reduce loop multi-worker needs
in `multi_worker`, the parameter-server loop in `parameter_server`; this
module builds the strategies those loops run under, the parameter-server
cluster's tasks included (`serve_cluster_task`).

Multi-worker rules the caller must follow:

* Create the strategy first, before any other TensorFlow op (seeding,
  building a model, even `tf.constant`): it configures collective ops, which
  TensorFlow accepts only at program start-up; later, `make_strategy` raises
  RuntimeError.
* Every worker runs the same program; every worker takes every step, and
  also every save, because saving reads distributed variables through
  collective ops. Only the chief (`is_chief`) writes to the real paths; the
  others write to `worker_dir(path, strategy)` and delete it afterwards
  (TensorFlow's multi-worker checkpoint convention).
* Collectives use TensorFlow's default implementation
  (`CommunicationImplementation.AUTO`); every worker needs the same number
  of GPUs.
"""

import json
import os
import socket
import time

import tensorflow as tf

from dlsuite.apps.core import choices
from dlsuite.apps.core.errors import UsageError

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
        return _parameter_server_strategy()
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
        workers = len(cluster_workers()) or replicas
        return f"{workers} workers, all-reduce ({replicas} replicas)"
    if is_parameter_server(strategy):
        return _describe_ps()
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


def cluster_workers():
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
            f"{len(cluster_workers())} workers configured" if cluster_workers() else "TF_CONFIG is not set"),
        "parameter-server": "variables on the TF_CONFIG cluster's ps tasks, steps on its workers: " + (
            _ps_cluster_line() if os.environ.get("TF_CONFIG") else "TF_CONFIG is not set"),
        "tpu": "the TPU named by TPU_NAME" + (" (set)" if tpu_hint else " (not set here)"),
    }[name]


def _ps_cluster_line():
    size = cluster_size()
    return f"{size.get('worker', 0)} workers, {size.get('ps', 0)} ps configured"


# --- parameter-server clusters ------------------------------------------------------

PS_TF_CONFIG_EXAMPLE = (
    '{"cluster": {"chief": ["host0:2222"], "worker": ["host1:2222", "host2:2222"], "ps": ["host3:2222"]}, '
    '"task": {"type": "chief", "index": 0}}'
)


# A variable smaller than this stays whole; a larger one is split over the
# parameter servers in shards of at least this size (TensorFlow's
# MinSizePartitioner default; LeNet-5's largest kernel, 192 KB, stays whole,
# a 50,000 x 256 embedding, 51 MB, splits over every ps).
MIN_SHARD_BYTES = 256 << 10


# A worker or ps task exits once the chief it served has not answered for
# this long: the chief's run is over (or it died; start every task again
# and the chief with --resume).
CHIEF_GONE_S = 10.0
# ... or once the chief's host refused the connection this many polls in a
# row: its process is gone (its run ended), where a host that stopped
# answering, perhaps for a moment, times out instead and gets CHIEF_GONE_S.
CHIEF_REFUSED_POLLS = 2


def check_ps_tf_config(raw):
    """The parsed TF_CONFIG of a parameter-server cluster.

    Raises:
        UsageError: missing, not JSON, no chief, worker or ps tasks, or a task
            that is not one of them.
    """
    example = f"for example TF_CONFIG='{PS_TF_CONFIG_EXAMPLE}' (the same cluster on every task, each its own task)"
    cluster, task = parse_tf_config(raw, strategy="parameter-server", example=example)
    for role, minimum in (("chief", 1), ("worker", 1), ("ps", 1)):
        addresses = cluster.get(role)
        if (not isinstance(addresses, list) or len(addresses) < minimum
                or not all(isinstance(a, str) and ":" in a for a in addresses)):
            raise UsageError(f"TF_CONFIG cluster[{role!r}] must be a list of 'host:port' "
                             f"(a parameter-server cluster has a chief, workers and ps tasks); {example}")
    if len(cluster["chief"]) != 1:
        raise UsageError(f"TF_CONFIG must name one chief, got {len(cluster['chief'])}; {example}")
    task_type, index = task.get("type"), task.get("index")
    if task_type not in ("chief", "worker", "ps"):
        raise UsageError(f"TF_CONFIG task type must be 'chief', 'worker' or 'ps', got {task_type!r}; {example}")
    if not isinstance(index, int) or not 0 <= index < len(cluster[task_type]):
        raise UsageError(f"TF_CONFIG task index must be 0..{len(cluster[task_type]) - 1} for the "
                         f"{len(cluster[task_type])} {task_type} address(es), got {index!r}; {example}")
    return {"cluster": cluster, "task": task}


def _parameter_server_strategy(*, min_shard_bytes=MIN_SHARD_BYTES):
    """The chief's `ParameterServerStrategy`; on a worker or ps task, its server.

    On the chief: the strategy over the TF_CONFIG cluster, with a
    `MinSizePartitioner` that splits a variable over the parameter servers
    when it is at least twice `min_shard_bytes`. Create it before any other
    TensorFlow op, as for multi-worker.

    On a `worker` or `ps` task this does not return: the task serves until
    the chief's run is over, then the process exits with status 0
    (`SystemExit`), before loading any data.

    Raises:
        UsageError: a missing or invalid TF_CONFIG.
        SystemExit: on a worker or ps task, when its chief has gone.
    """
    config = check_ps_tf_config(os.environ.get("TF_CONFIG"))
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if config["task"]["type"] != "chief":
        serve_cluster_task(resolver, chief=config["cluster"]["chief"][0])
        raise SystemExit(0)
    num_ps = len(config["cluster"]["ps"])
    partitioner = tf.distribute.experimental.partitioners.MinSizePartitioner(
        min_shard_bytes=min_shard_bytes, max_shards=num_ps) if num_ps > 1 else None
    return tf.distribute.ParameterServerStrategy(resolver, variable_partitioner=partitioner)


def serve_cluster_task(resolver, *, chief, gone_after=CHIEF_GONE_S, poll=1.0):
    """Runs this worker or ps task's server until `chief` ("host:port") has
    answered once and then refused CHIEF_REFUSED_POLLS polls in a row or
    stopped answering for `gone_after` seconds."""
    task = f"{resolver.task_type} {resolver.task_id}"
    address = resolver.cluster_spec().task_address(resolver.task_type, resolver.task_id)
    tf.distribute.Server(resolver.cluster_spec(), job_name=resolver.task_type, task_index=resolver.task_id,
                         protocol=resolver.rpc_layer or "grpc", start=True)
    print(f"parameter-server cluster: {task} serving at {address}; the chief at {chief} drives the run",
          flush=True)
    seen, silent_since, refused = False, None, 0
    while True:
        reached = reach(chief)
        if reached == "answered":
            if not seen:
                print(f"parameter-server cluster: {task}: the chief connected", flush=True)
            seen, silent_since, refused = True, None, 0
        elif seen:
            silent_since = silent_since or time.monotonic()
            refused = refused + 1 if reached == "refused" else 0
            if refused >= CHIEF_REFUSED_POLLS or time.monotonic() - silent_since >= gone_after:
                print(f"parameter-server cluster: {task}: the chief at {chief} is gone; exiting", flush=True)
                return
        time.sleep(poll)


def reach(address):
    """"answered" when a TCP connection to "host:port" opens, "refused" when the host
    refuses it (nothing listens there), "silent" otherwise (a timeout, no route)."""
    host, _, port = address.removeprefix("grpc://").rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2.0):
            return "answered"
    except ConnectionRefusedError:
        return "refused"
    except OSError:
        return "silent"


def cluster_size():
    """{"chief": 1, "worker": W, "ps": P} from TF_CONFIG (empty when unset)."""
    cluster, _ = tf_config()
    return {role: len(cluster.get(role, [])) for role in ("chief", "worker", "ps") if cluster.get(role)}


def _describe_ps():
    """ "2 workers, 1 parameter server (asynchronous)" """
    size = cluster_size()
    workers, ps = size.get("worker", 0), size.get("ps", 0)
    return (f"{workers} worker{'s' if workers != 1 else ''}, {ps} parameter server{'s' if ps != 1 else ''} "
            "(asynchronous)")
