"""`dlsuite serve --enable-batching`: the batcher in this process on a small tf.function model (each call
counted), the parameters file, and one real server whose concurrent REST requests are joined.

Nothing here depends on timing: a batch runs when it is full (the batch
timeouts are long) or when a gate opens, and the tests assert on the calls
the model saw and on the metrics' batch counters.
"""

import concurrent.futures
import re
import subprocess
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

import zygote
from dlsuite.apps.core.errors import UsageError
from dlsuite.apps.serve import batching_config, calls
from dlsuite.apps.serve.batching import Batcher
from dlsuite.apps.serve.errors import ServingError
from dlsuite.apps.serve.repository import Signature, Version
from dlsuite.apps.serve.tensors import TensorSpec
from test_serve import KERAS_MODEL, Server, _dlsuite, _environment, _export_keras_model, call, stop

LONG_MICROS = 60_000_000  # a batch that is not full waits a minute: in these tests only full batches run


class CountingVersion(Version):
    """A loaded version whose signature calls are recorded as (signature, rows, inner shape), and may wait
    at a gate (`gate`, `entered`) before running."""

    def __init__(self, signatures):
        super().__init__(model="model", number=1, path=None, signatures=signatures, signature_defs={}, info=None)
        self.calls = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def predict(self, signature_name, arrays):
        (array, *_), = [list(arrays.values())]
        self.calls.append((signature_name, len(array), array.shape[1:]))
        self.entered.set()
        assert self.gate.wait(timeout=120)
        return super().predict(signature_name, arrays)


def _spec(name, spec):
    """The TensorSpec of a float32 tf.TensorSpec (every tensor of these models is float32)."""
    assert spec.dtype == tf.float32
    return TensorSpec(name=name, dtype_name="DT_FLOAT", numpy_dtype=np.dtype(np.float32),
                      shape=None if spec.shape.rank is None else tuple(spec.shape.as_list()))


def _signature(function, inputs):
    concrete = tf.function(function).get_concrete_function(**inputs)
    outputs = concrete.structured_outputs
    return Signature(function=concrete, inputs={name: _spec(name, spec) for name, spec in inputs.items()},
                     outputs={name: _spec(name, spec) for name, spec in outputs.items()},
                     tf_dtypes={name: spec.dtype for name, spec in inputs.items()})


def _version():
    """serving_default: y = 2x + 1 and each row's sum, on x of shape [None, None]; other: x * 3;
    total: one number for the whole batch (not batchable)."""
    x = {"x": tf.TensorSpec([None, None], tf.float32)}
    return CountingVersion({
        "serving_default": _signature(lambda x: {"y": 2.0 * x + 1.0, "sums": tf.reduce_sum(x, axis=1)}, x),
        "other": _signature(lambda x: {"y": 3.0 * x}, x),
        "total": _signature(lambda x: {"total": tf.reduce_sum(x)}, x),
    })


def _options(**values):
    return batching_config.BatchingOptions(**{"batch_timeout_micros": LONG_MICROS, "num_batch_threads": 1,
                                              **values})


def _rows(count, width, seed):
    return {"x": np.random.default_rng(seed).normal(size=(count, width)).astype(np.float32)}


def _alone(served, signature_name, arrays):
    return Version.predict(served, signature_name, arrays)


def _in_parallel(batcher, served, requests):
    """calls.run_signature of each (signature, arrays) on a thread of its own; their answers, in order."""
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        futures = [pool.submit(calls.run_signature, served, name, arrays, batcher=batcher)
                   for name, arrays in requests]
        return [future.result(timeout=120) for future in futures]


@pytest.fixture
def observed():
    return []


def _batcher(observed, **values):
    return Batcher(_options(**values), observe=lambda *batch: observed.append(batch))


def test_concurrent_requests_are_joined_into_one_call_and_answer_as_alone(observed):
    served = _version()
    batcher = _batcher(observed, max_batch_size=12)
    requests = [("serving_default", _rows(rows, 4, seed)) for seed, rows in enumerate([1, 2, 3, 1, 2, 3])]
    try:
        answers = _in_parallel(batcher, served, requests)
    finally:
        batcher.close()
    assert served.calls == [("serving_default", 12, (4,))]
    assert observed == [("model", 12, 6)]
    for (name, arrays), answer in zip(requests, answers):
        expected = _alone(served, name, arrays)
        assert set(answer) == {"y", "sums"}
        for output, value in expected.items():
            np.testing.assert_allclose(answer[output], value, rtol=1e-6)


def test_different_inner_shapes_and_signatures_are_never_joined(observed):
    served = _version()
    batcher = _batcher(observed, max_batch_size=4)
    requests = [("serving_default", _rows(2, 3, 0)), ("serving_default", _rows(1, 5, 1)),
                ("other", _rows(4, 3, 2)), ("serving_default", _rows(2, 3, 3)), ("serving_default", _rows(3, 5, 4))]
    try:
        answers = _in_parallel(batcher, served, requests)
    finally:
        batcher.close()
    assert sorted(served.calls) == [("other", 4, (3,)), ("serving_default", 4, (3,)), ("serving_default", 4, (5,))]
    for (name, arrays), answer in zip(requests, answers):
        np.testing.assert_allclose(answer["y"], _alone(served, name, arrays)["y"], rtol=1e-6)


def test_a_batch_is_padded_to_the_next_allowed_size_and_the_padding_dropped(observed):
    served = _version()
    batcher = _batcher(observed, max_batch_size=8, allowed_batch_sizes=(4, 8), batch_timeout_micros=0)
    try:
        three = _rows(3, 2, 0)
        answer = calls.run_signature(served, "serving_default", three, batcher=batcher)
        five = _rows(5, 2, 1)
        answer_five = calls.run_signature(served, "serving_default", five, batcher=batcher)
    finally:
        batcher.close()
    assert [rows for _, rows, _ in served.calls] == [4, 8]
    assert observed == [("model", 4, 1), ("model", 8, 1)]
    np.testing.assert_allclose(answer["sums"], three["x"].sum(axis=1), rtol=1e-5)
    assert answer["y"].shape == (3, 2) and answer_five["y"].shape == (5, 2)
    np.testing.assert_allclose(answer_five["y"], 2 * five["x"] + 1, rtol=1e-6)


def _wait_queued(batcher, count):
    """Until `count` requests (or pieces) wait in the batcher's queues."""
    deadline = time.monotonic() + 60
    while batcher.queued() < count:
        assert time.monotonic() < deadline, f"{count} requests never reached the queue"
        time.sleep(0.01)


def test_a_full_queue_answers_unavailable_at_once(observed):
    served = _version()
    batcher = _batcher(observed, max_batch_size=2, max_enqueued_batches=1, batch_timeout_micros=0)
    served.gate.clear()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        try:
            running = pool.submit(calls.run_signature, served, "serving_default", _rows(2, 3, 0), batcher=batcher)
            assert served.entered.wait(timeout=60)  # the batch thread is busy with the first batch
            queued = pool.submit(calls.run_signature, served, "serving_default", _rows(2, 3, 1), batcher=batcher)
            _wait_queued(batcher, 1)
            with pytest.raises(ServingError) as refused:
                calls.run_signature(served, "serving_default", _rows(1, 3, 2), batcher=batcher)
            assert refused.value.code == "UNAVAILABLE" and refused.value.http_status == 503
            assert refused.value.message == ("The batch scheduling queue to which this task was submitted is full; "
                                             "currently 1 batches enqueued and max_enqueued_batches is 1")
        finally:
            served.gate.set()
        assert running.result(timeout=120)["y"].shape == (2, 3)
        assert queued.result(timeout=120)["y"].shape == (2, 3)
    batcher.close()
    assert len(served.calls) == 2


def test_a_request_over_max_batch_size_is_refused_as_tensorflow_serving_does(observed):
    served = _version()
    batcher = _batcher(observed, max_batch_size=4)
    try:
        with pytest.raises(ServingError) as refused:
            calls.run_signature(served, "serving_default", _rows(5, 2, 0), batcher=batcher)
    finally:
        batcher.close()
    assert refused.value.code == "INVALID_ARGUMENT"
    assert refused.value.message == "Task size 5 is larger than maximum input batch size 4"
    assert served.calls == []


def test_large_batch_splitting_fills_the_open_batch_and_joins_the_pieces_answers(observed):
    """enable_large_batch_splitting, batches of at most 4 rows: after a request of 2 rows opened a
    batch, one of 7 rows fills it with its first 2 and runs its other 5 as batches of 4 and 1;
    each request gets its own rows' answers, in order, as alone."""
    served = _version()
    batcher = _batcher(observed, max_batch_size=8, enable_large_batch_splitting=True, max_execution_batch_size=4,
                       batch_timeout_micros=0)
    blocker, small, large = _rows(2, 3, 0), _rows(2, 3, 1), _rows(7, 3, 2)
    served.gate.clear()
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        try:
            futures = [pool.submit(calls.run_signature, served, "serving_default", blocker, batcher=batcher)]
            assert served.entered.wait(timeout=60)  # the one batch thread waits at the gate
            for arrays, queued in ((small, 1), (large, 4)):
                futures.append(pool.submit(calls.run_signature, served, "serving_default", arrays, batcher=batcher))
                _wait_queued(batcher, queued)
        finally:
            served.gate.set()
        answers = [future.result(timeout=120) for future in futures]
    batcher.close()
    assert [rows for _, rows, _ in served.calls] == [2, 4, 4, 1]
    assert observed == [("model", 2, 1), ("model", 4, 2), ("model", 4, 1), ("model", 1, 1)]
    for arrays, answer in zip((blocker, small, large), answers):
        for output, value in _alone(served, "serving_default", arrays).items():
            np.testing.assert_allclose(answer[output], value, rtol=1e-6)
    assert answers[2]["y"].shape == (7, 3)


def test_split_pieces_that_overflow_the_queue_answer_unavailable(observed):
    served = _version()
    batcher = _batcher(observed, max_batch_size=8, enable_large_batch_splitting=True, max_execution_batch_size=2,
                       max_enqueued_batches=3)
    try:
        with pytest.raises(ServingError) as refused:  # 4 batches of 2 rows where 3 may wait
            calls.run_signature(served, "serving_default", _rows(8, 3, 0), batcher=batcher)
    finally:
        batcher.close()
    assert refused.value.code == "UNAVAILABLE" and "max_enqueued_batches is 3" in refused.value.message
    assert served.calls == [] and batcher.queued() == 0


def test_a_signature_without_a_batch_dimension_runs_alone(observed):
    served = _version()
    batcher = _batcher(observed, max_batch_size=8)
    try:
        answer = calls.run_signature(served, "total", _rows(3, 2, 0), batcher=batcher)
    finally:
        batcher.close()
    assert answer["total"].shape == () and observed == []
    assert served.calls == [("total", 3, (2,))]


def _refuse_large(x):
    with tf.control_dependencies([tf.debugging.assert_less(x, 100.0, message="too large")]):
        return {"y": tf.identity(x)}


def test_the_graphs_refusal_reaches_every_request_of_the_batch(observed):
    served = CountingVersion({"serving_default": _signature(
        _refuse_large, {"x": tf.TensorSpec([None, None], tf.float32)})})
    batcher = _batcher(observed, max_batch_size=2)
    try:
        requests = [("serving_default", {"x": np.array([[1.0]], np.float32)}),
                    ("serving_default", {"x": np.array([[1000.0]], np.float32)})]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(calls.run_signature, served, name, arrays, batcher=batcher)
                       for name, arrays in requests]
            errors = [future.exception(timeout=120) for future in futures]
    finally:
        batcher.close()
    assert len(served.calls) == 1
    assert all(isinstance(error, ServingError) and error.code == "INVALID_ARGUMENT" and "too large" in error.message
               for error in errors)


# -- the parameters file and the flags -------------------------------------------------------------------

GOOD_FILE = """
max_batch_size { value: 32 }
batch_timeout_micros { value: 2000 }   # 2 ms
max_enqueued_batches { value: 100 }
num_batch_threads { value: 4 }
thread_pool_name { value: "model_server_batch_threads" }
allowed_batch_sizes: 8
allowed_batch_sizes: 32
"""


def test_a_good_parameters_file_gives_its_values_and_flags_override_it(tmp_path):
    path = tmp_path / "batching.config"
    path.write_text(GOOD_FILE)
    assert batching_config.options(parameters_file=path) == batching_config.BatchingOptions(
        max_batch_size=32, batch_timeout_micros=2000, max_enqueued_batches=100, num_batch_threads=4,
        allowed_batch_sizes=(8, 32))
    mixed = batching_config.options(parameters_file=path, batch_timeout_micros=0, num_batch_threads=None)
    assert (mixed.batch_timeout_micros, mixed.num_batch_threads) == (0, 4)
    defaults = batching_config.options()
    assert (defaults.max_batch_size, defaults.batch_timeout_micros, defaults.max_enqueued_batches) == (1000, 0, 10)
    assert defaults.execution_batch_size == 1000 and not defaults.enable_large_batch_splitting
    path.write_text("max_batch_size { value: 64 }\nenable_large_batch_splitting { value: true }\n")
    split = batching_config.options(parameters_file=path)
    assert split.enable_large_batch_splitting and split.execution_batch_size == 64  # TF Serving's default
    assert batching_config.options(parameters_file=path, max_execution_batch_size=16).execution_batch_size == 16
    # Without splitting, TensorFlow Serving ignores max_execution_batch_size: so do we.
    assert batching_config.options(max_batch_size=8, max_execution_batch_size=4).execution_batch_size == 8


@pytest.mark.parametrize("text, message", [
    ("max_batch_size: 32", "line 1 column 17: Expected \"{\"."),
    ("max_batch_size { value: 32 }\nbatch_size { value: 3 }",
     'line 2 column 1: Message type "tensorflow.serving.BatchingParameters" has no field named "batch_size".'),
    ("max_batch_size { value: 32 }\nallowed_batch_sizes: 8\nallowed_batch_sizes: 16",
     "last entry in allowed_batch_sizes must match max_batch_size; last entry was 16; expected 32"),
    ("num_batch_threads { value: 0 }", "num_batch_threads must be at least 1, received 0"),
    ("max_batch_size { value: 8 }\nenable_large_batch_splitting { value: true }\nmax_execution_batch_size { value: 16 }",
     "max_execution_batch_size must be at most max_batch_size (8), received 16"),
    ("max_batch_size { value: 32 }\nenable_large_batch_splitting { value: true }\nmax_execution_batch_size { value: 8 }"
     "\nallowed_batch_sizes: 4\nallowed_batch_sizes: 32",
     "last entry in allowed_batch_sizes must be equal to max_execution_batch_size; last entry was 32; expected 8"),
    ("pad_variable_length_inputs: true", "pad_variable_length_inputs is not supported"),
])
def test_a_bad_parameters_file_is_one_line_naming_the_file(tmp_path, text, message):
    path = tmp_path / "batching.config"
    path.write_text(text)
    with pytest.raises(UsageError) as error:
        batching_config.options(parameters_file=path)
    assert str(error.value).startswith(f"batching_parameters_file {path}") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_bad_batching_options_exit_2_with_one_line(tmp_path, capsys):
    from dlsuite.apps import cli

    path = tmp_path / "batching.config"
    path.write_text("max_batch_size { value: 32 }\nbatch_size { value: 3 }\n")
    assert cli.main(["serve", str(tmp_path), "--enable-batching", "--batching-parameters-file", str(path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"dlsuite: error: --batching-parameters-file {path}: line 2 column 1")
    assert error.count("\n") == 1
    assert cli.main(["serve", str(tmp_path), "--batching-parameters-file", str(path)]) == 2
    assert "--batching-parameters-file is set without --enable-batching" in capsys.readouterr().err
    assert cli.main(["serve", str(tmp_path), "--enable-batching", "--max-batch-size", "0"]) == 2
    assert "--max-batch-size must be at least 1" in capsys.readouterr().err
    assert cli.main(["serve", str(tmp_path), "--enable-batching", "--enable-large-batch-splitting", "--max-batch-size",
                     "8", "--max-execution-batch-size", "16"]) == 2
    assert "--max-execution-batch-size must be at most max_batch_size (8), received 16" in capsys.readouterr().err


# -- a real server ---------------------------------------------------------------------------------------

def _histogram(page, name, model):
    """{le: cumulative count, "sum": sum} of a histogram of the metrics page, for one model."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.labels.get("model_name") != model:
                continue
            if sample.name == f"{name}_bucket":
                values[float(sample.labels["le"])] = sample.value
            elif sample.name == f"{name}_sum":
                values["sum"] = sample.value
    return values


def _grpc_predict(port, row):
    """The output of a gRPC Predict of one row, with tensorflow-serving-api's stub."""
    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = KERAS_MODEL
    request.inputs["features"].CopyFrom(tf.make_tensor_proto(np.array([row], np.float32)))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=60)
    return tf.make_ndarray(response.outputs["output_0"]).tolist()


def test_a_real_server_joins_concurrent_rest_and_grpc_requests(tmp_path):
    folder = tmp_path / KERAS_MODEL
    _export_keras_model(folder)
    # A batch runs when 8 rows are in, or 2 s after its first request: the 8 requests sent together are joined.
    process = zygote.Popen(
        _dlsuite("serve", str(folder), "--port", "0", "--enable-batching", "--max-batch-size", "8",
                 "--batch-timeout-micros", "2000000", "--num-batch-threads", "1"),
        cwd=tmp_path, env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = Server(process)
    try:
        server.wait_ready(timeout=120)
        grpc_port = int(re.search(r"gRPC API: 127\.0\.0\.1:(\d+)\)", server.output()).group(1))
        features = [[float(index), 1.0, -2.0] for index in range(8)]
        unbatched = [[[sum(row)] * 2] for row in features]  # scores = features @ ones(3, 2)
        path = f"/v1/models/{KERAS_MODEL}:predict"
        assert call(server, path, {"instances": [features[5]]}) == (200, {"predictions": unbatched[5]})
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            rest = [pool.submit(call, server, path, {"instances": [row]}) for row in features]
            remote = [pool.submit(_grpc_predict, grpc_port, row) for row in features[:4]]
            assert [future.result() for future in rest] == [(200, {"predictions": answer}) for answer in unbatched]
            assert [future.result() for future in remote] == unbatched[:4]
        page = call(server, "/monitoring/prometheus/metrics")[1]
        requests = _histogram(page, "dlsuite_serve_batch_requests", KERAS_MODEL)
        sizes = _histogram(page, "dlsuite_serve_batch_size", KERAS_MODEL)
        batches = requests[float("inf")] - 1  # the first request ran alone
        assert batches < 12, f"12 concurrent requests ran in {batches:g} batches, none joined:\n{page}"
        assert sizes[float("inf")] - sizes[1.0] >= 1  # a batch of more than one row
        assert sizes["sum"] == requests["sum"] == 13  # rows run = requests answered: no padding
    finally:
        stop(process)


def test_a_real_server_splits_a_request_larger_than_its_batches(tmp_path):
    """--enable-large-batch-splitting: 10 rows run as batches of 4, 4 and 2, and answer as one request."""
    folder = tmp_path / KERAS_MODEL
    _export_keras_model(folder)
    process = zygote.Popen(
        _dlsuite("serve", str(folder), "--port", "0", "--grpc-port", "off", "--enable-batching",
                 "--enable-large-batch-splitting", "--max-batch-size", "16", "--max-execution-batch-size", "4"),
        cwd=tmp_path, env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = Server(process)
    try:
        server.wait_ready(timeout=120)
        features = [[float(index), 1.0, -2.0] for index in range(10)]
        path = f"/v1/models/{KERAS_MODEL}:predict"
        assert call(server, path, {"instances": features}) == (200, {"predictions": [[sum(row)] * 2 for row in features]})
        status, body = call(server, path, {"instances": features * 2})
        assert status == 400 and body["error"] == "Task size 20 is larger than maximum input batch size 16"
        sizes = _histogram(call(server, "/monitoring/prometheus/metrics")[1], "dlsuite_serve_batch_size", KERAS_MODEL)
        assert sizes[float("inf")] == 3 and sizes["sum"] == 10 and sizes[4.0] == 3  # three batches of at most 4
    finally:
        stop(process)
