"""Input preprocessing on other machines: TensorFlow's tf.data service.

`dlsuite data dispatcher` and `dlsuite data worker` start its servers; a
training run with `--data-service grpc://HOST:PORT` sends its input
pipeline's per-example work (reading, decoding, resizing) to the workers and
batches what comes back. It pays when decoding is the bottleneck: a GPU
trainer fed by a few CPU cores (docs/scaling.md).

Each epoch is a "distributed_epoch" job: the dispatcher hands the epoch's
indices to the workers in splits, so every example is visited once an epoch,
but in the order the workers finish them, not the order (seed, epoch) gives.
A resumed run goes on at the right epoch and step with the examples not yet
reached in that order; which of them were trained before the kill is not
exact through the service.
"""

import socket

from dlsuite.apps.core.errors import UsageError

PROTOCOL = "grpc"
CONNECT_TIMEOUT_S = 5.0


def parse_address(text, *, option="data_service"):
    """"grpc://HOST:PORT" (or "HOST:PORT") -> ("HOST", PORT); a UsageError naming the text otherwise."""
    address = text.removeprefix(f"{PROTOCOL}://")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"data_service {text!r} is not an address: give grpc://HOST:PORT, e.g. "
                         "grpc://localhost:5050", option=option)
    return host, int(port)


def check_reachable(text, *, option="data_service"):
    """Raises UsageError unless the dispatcher at `text` accepts a connection (before any training)."""
    host, port = parse_address(text, option=option)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as error:
        raise UsageError(f"cannot reach the tf.data service dispatcher at {text}: {error.strerror or error}; start "
                         f"one with `dlsuite data dispatcher --port {port}` (and workers) or fix the address",
                         option=option) from None


def distribute(examples, address):
    """`examples` made by the service's workers, each element once an epoch."""
    import tensorflow as tf

    return examples.apply(tf.data.experimental.service.distribute(
        processing_mode="distributed_epoch", service=f"{PROTOCOL}://{address.removeprefix(f'{PROTOCOL}://')}"))


def run_dispatcher(*, port, work_dir=None):
    """Serves a dispatcher until the process is stopped; with `work_dir`, a
    restarted one recovers its jobs from there (fault-tolerant mode)."""
    import tensorflow as tf

    config = tf.data.experimental.service.DispatcherConfig(port=port, work_dir=work_dir,
                                                           fault_tolerant_mode=work_dir is not None)
    server = tf.data.experimental.service.DispatchServer(config)
    print(f"tf.data service dispatcher on {PROTOCOL}://{socket.gethostname()}:{port} "
          f"(train with --data-service {PROTOCOL}://HOST:{port})", flush=True)
    server.join()


def run_worker(*, dispatcher, port=0, worker_address=None):
    """Serves a worker of the dispatcher at `dispatcher` until the process is stopped."""
    import tensorflow as tf

    host, dispatcher_port = parse_address(dispatcher, option="dispatcher")
    config = tf.data.experimental.service.WorkerConfig(
        dispatcher_address=f"{host}:{dispatcher_port}", port=port,
        worker_address=worker_address or f"{socket.gethostname()}:%port%")
    server = tf.data.experimental.service.WorkerServer(config)
    print(f"tf.data service worker of {dispatcher} listening", flush=True)
    server.join()
