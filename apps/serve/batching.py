"""Request batching for `dlsuite serve --enable-batching`, as TensorFlow Serving's `--enable_batching`.

Concurrent requests to one signature of one loaded version, whose inputs
have the same names, dtypes and inner shapes (all but the first, batch,
dimension), are joined along the batch dimension, run as one call, and the
outputs split back by rows: each request gets what it would get alone. The
scheduling is TensorFlow Serving's `SharedBatchScheduler`
(`tensorflow/core/kernels/batching_util/shared_batch_scheduler.h`):

* each (version, signature, input layout) has a queue of batches; a request
  joins the newest batch if its rows fit in `max_batch_size`, else opens a
  new one;
* a batch runs when a batch thread (`num_batch_threads`, shared by every
  queue) is free and the batch is full, or is not the newest of its queue,
  or has waited `batch_timeout_micros` since it opened (0: at once, so
  requests are joined only while every batch thread is busy);
* a queue that holds `max_enqueued_batches` batches and cannot fit a
  request in its newest refuses it with UNAVAILABLE, TensorFlow Serving's
  "The batch scheduling queue to which this task was submitted is full"
  (REST 503), never a wait without end;
* a request of more rows than `max_batch_size` is refused with
  INVALID_ARGUMENT, "Task size N is larger than maximum input batch size M";
* with `enable_large_batch_splitting`, a request that does not fit in the
  newest batch is cut into pieces: the first fills that batch, the others
  open batches of at most `max_execution_batch_size` rows; its answer is
  the pieces' answers joined, in order (TensorFlow Serving's
  `SplitInputTask`, `batching_session.cc`);
* with `allowed_batch_sizes`, a batch is padded up to the next allowed size
  with copies of the first row of its last request, and the padding's
  outputs dropped (TensorFlow Serving's `BatchingSession` pads so,
  `batching_session.cc`).

Only signatures whose inputs and outputs all have a leading None dimension
are batched, and only requests whose inputs agree on their number of rows;
anything else runs alone on the caller's thread, as without batching.

The caller (`calls.run_signature`, on a server worker thread, never the
event loop) waits for its batch's answer; the call itself runs on a batch
thread. Each batch run is reported to `observe(model, rows, requests)`
(the metrics' batch-size histograms).
"""

import concurrent.futures
import dataclasses
import threading
import time

import numpy as np

from dlsuite.apps.serve.errors import ServingError, invalid


@dataclasses.dataclass(eq=False)
class _Task:
    arrays: dict
    rows: int
    future: concurrent.futures.Future


@dataclasses.dataclass(eq=False)
class _Batch:
    opened: float  # time.monotonic() of its first task
    tasks: list
    rows: int = 0


@dataclasses.dataclass(eq=False)
class _Queue:
    served: object  # the repository.Version the batches run on
    signature_name: str
    batches: list  # of _Batch, oldest first


def batchable(signature):
    """Whether a signature's inputs and outputs all have a leading None (batch) dimension."""
    specs = [*signature.inputs.values(), *signature.outputs.values()]
    return bool(signature.inputs) and all(spec.shape and spec.shape[0] is None for spec in specs)


class Batcher:
    """Joins concurrent calls of a signature into batches, run on `options.num_batch_threads` threads.

    Args:
        options: a `batching_config.BatchingOptions`.
        observe: called as observe(model, rows, requests) for each batch run
            (rows including padding), from a batch thread; or None.
    """

    def __init__(self, options, *, observe=None):
        self.options = options
        self._observe = observe
        self._timeout = options.batch_timeout_micros / 1e6
        self._condition = threading.Condition()
        self._queues = {}  # key -> _Queue
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"serve-batch-{index}", daemon=True)
                         for index in range(options.num_batch_threads)]
        for thread in self._threads:
            thread.start()

    def run(self, served, signature_name, arrays):
        """{output: np.ndarray} of a signature on {input: np.ndarray}, in a batch where it can be.

        Blocks the calling thread until the answer is there.

        Raises:
            ServingError: UNAVAILABLE for a full queue, INVALID_ARGUMENT for
                more rows than max_batch_size.
            Whatever the call raises (tf.errors.OpError, TypeError, ...), for
                the caller to map.
        """
        rows = _rows(arrays)
        if rows is None or not batchable(served.signatures[signature_name]):
            return served.predict(signature_name, arrays)
        limit = self.options.max_batch_size
        if rows > limit:
            raise invalid(f"Task size {rows} is larger than maximum input batch size {limit}")
        key = (id(served), signature_name,
               tuple((name, array.dtype.str, array.shape[1:]) for name, array in sorted(arrays.items())))
        with self._condition:
            if self._closed:
                raise ServingError("The batch scheduler is stopping", code="UNAVAILABLE")
            queue = self._queues.get(key)
            if queue is None or queue.served is not served:
                queue = self._queues[key] = _Queue(served=served, signature_name=signature_name, batches=[])
            batches = queue.batches
            pieces, joins_newest = self._pieces(batches, rows)
            if len(batches) + len(pieces) - joins_newest > self.options.max_enqueued_batches:  # TensorFlow Serving's words
                raise ServingError("The batch scheduling queue to which this task was submitted is full; "
                                   f"currently {len(batches)} batches enqueued and max_enqueued_batches is "
                                   f"{self.options.max_enqueued_batches}", code="UNAVAILABLE")
            tasks, start = [], 0
            for index, piece in enumerate(pieces):
                if index > 0 or not joins_newest:
                    batches.append(_Batch(opened=time.monotonic(), tasks=[]))
                part = arrays if piece == rows else {name: array[start:start + piece] for name, array in arrays.items()}
                tasks.append(_Task(arrays=part, rows=piece, future=concurrent.futures.Future()))
                batches[-1].tasks.append(tasks[-1])
                batches[-1].rows += piece
                start += piece
            self._condition.notify()
        answers = [task.future.result() for task in tasks]
        if len(answers) == 1:
            return answers[0]
        return {name: np.concatenate([answer[name] for answer in answers], axis=0) for name in answers[0]}

    def _pieces(self, batches, rows):
        """([rows of each piece], whether the first joins the newest batch) for a request of `rows` rows.

        Without splitting the request is one piece, in the newest batch if it fits, else in a
        batch of its own. With it, a request that does not fit fills the newest batch with its
        first piece and opens batches of at most the execution batch size for the rest.
        """
        size = self.options.execution_batch_size
        room = size - batches[-1].rows if batches else 0
        if rows <= room:
            return [rows], True
        if not self.options.enable_large_batch_splitting:
            return [rows], False
        pieces = [room] if room > 0 else []
        rest = rows - room
        pieces += [min(size, rest - start) for start in range(0, rest, size)]
        return pieces, room > 0

    def queued(self):
        """How many requests wait in a batch not yet running."""
        with self._condition:
            return sum(len(batch.tasks) for queue in self._queues.values() for batch in queue.batches)

    def close(self):
        """Stops the batch threads once the batches they run end; requests still queued get UNAVAILABLE."""
        with self._condition:
            self._closed = True
            waiting = [task for queue in self._queues.values() for batch in queue.batches for task in batch.tasks]
            self._queues = {}
            self._condition.notify_all()
        for task in waiting:
            task.future.set_exception(ServingError("The batch scheduler is stopping", code="UNAVAILABLE"))

    # -- the batch threads ---------------------------------------------------------------------------

    def _work(self):
        while True:
            with self._condition:
                while True:
                    if self._closed:
                        return
                    taken, wait = self._take()
                    if taken is not None:
                        break
                    self._condition.wait(wait)
                if self._queues:  # another thread may find the next batch ready
                    self._condition.notify()
            self._run(*taken)

    def _take(self):
        """(queue, batch) of the oldest batch ready to run, removed from its queue; else (None, seconds
        until one may be ready, or None for "until a request comes"). Holds the condition's lock."""
        now = time.monotonic()
        ready, wait = None, None
        for key, queue in self._queues.items():
            batch = queue.batches[0]
            due = batch.opened + self._timeout
            if len(queue.batches) > 1 or batch.rows >= self.options.execution_batch_size or due <= now:
                if ready is None or batch.opened < ready[1].opened:
                    ready = (key, batch)
            else:
                wait = due - now if wait is None else min(wait, due - now)
        if ready is None:
            return None, wait
        key, batch = ready
        queue = self._queues[key]
        queue.batches.pop(0)
        if not queue.batches:
            del self._queues[key]
        return (queue, batch), None

    def _run(self, queue, batch):
        tasks = batch.tasks
        try:
            padded = self.options.padded_size(batch.rows)
            arrays = _concatenate([task.arrays for task in tasks], padded - batch.rows)
            if self._observe is not None:
                self._observe(queue.served.model, padded, len(tasks))
            outputs = queue.served.predict(queue.signature_name, arrays)
        except Exception as error:  # the graph's refusal: every request of the batch gets it, to map
            for task in tasks:
                task.future.set_exception(error)
            return
        if any(np.ndim(value) == 0 or len(value) != padded for value in outputs.values()):
            for task in tasks:  # an output without the batch's rows cannot be split: each request alone
                _run_alone(queue, task)
            return
        start = 0
        for task in tasks:
            task.future.set_result({name: value[start:start + task.rows] for name, value in outputs.items()})
            start += task.rows


def _run_alone(queue, task):
    try:
        task.future.set_result(queue.served.predict(queue.signature_name, task.arrays))
    except Exception as error:
        task.future.set_exception(error)


def _rows(arrays):
    """The number of rows every input of a request has, or None when they disagree (or one is a scalar, or 0)."""
    sizes = {array.shape[0] if np.ndim(array) else None for array in arrays.values()}
    if len(sizes) != 1:
        return None
    rows = sizes.pop()
    return rows if rows else None


def _concatenate(requests, padding):
    """{input: the requests' rows joined, then `padding` copies of the last one's first row}."""
    arrays = {}
    for name in requests[0]:
        parts = [request[name] for request in requests]
        if padding:
            parts.append(np.repeat(parts[-1][:1], padding, axis=0))
        arrays[name] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    return arrays
