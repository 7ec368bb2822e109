"""`dlsuite serve` answering as TensorFlow Serving answers (issue #26), seen by a client over HTTP.

One server for the module, on a base folder holding:

* `half_plus_two`, TensorFlow Serving's quickstart model rebuilt as it was
  written: a TF1 graph (`tf.compat.v1` placeholder `x` of shape [None, 1],
  `y = 0.5 * x + 2`) saved with `tf.compat.v1.saved_model.Builder`, and a
  second signature, `matmul` (`x2` [None, 2] times a 2x1 matrix), for a
  request its graph refuses;
* `regressor`, a plain `keras.Model.export` (`features` [None, 3]).

The request's shape goes to the graph as the JSON gives it: the graph
accepts it or refuses it with its own error, a 400 like TensorFlow Serving's.
"""

import re
import subprocess
import sys
import urllib.request

import pytest

import zygote
from test_serve import Server, _environment, _export_keras_model, call, stop

TF1_MODEL = "half_plus_two"
KERAS_MODEL = "regressor"
POLL_SECONDS = 0.3


def _write_half_plus_two(folder):
    """TensorFlow Serving's half_plus_two as a TF1 graph: y = 0.5 * x + 2, x declared [None, 1]."""
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, shape=[None, 1], name="x")
        a = tf.compat.v1.get_variable("a", initializer=0.5)
        b = tf.compat.v1.get_variable("b", initializer=2.0)
        y = tf.add(tf.multiply(a, x), b, name="y")
        x2 = tf.compat.v1.placeholder(tf.float32, shape=[None, 2], name="x2")
        y2 = tf.matmul(x2, tf.constant([[1.0], [1.0]]), name="y2")
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            builder = tf.compat.v1.saved_model.Builder(str(folder / "1"))
            predict = tf.compat.v1.saved_model.predict_signature_def
            builder.add_meta_graph_and_variables(
                session, [tf.compat.v1.saved_model.tag_constants.SERVING],
                signature_def_map={"serving_default": predict(inputs={"x": x}, outputs={"y": y}),
                                   "matmul": predict(inputs={"x2": x2}, outputs={"y2": y2})})
            builder.save()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_tf_serving")
    base = root / "models"
    _write_half_plus_two(base / TF1_MODEL)
    _export_keras_model(base / KERAS_MODEL)
    env = _environment()
    process = zygote.Popen(
        [sys.executable, "-m", "dlsuite.apps.cli", "serve", str(base), "--port", "0",
         "--poll-seconds", str(POLL_SECONDS)],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = Server(process)
    try:
        server.wait_ready(timeout=120, names=[TF1_MODEL, KERAS_MODEL])
        yield server
    finally:
        stop(process)


# -- the request's shape goes to the graph -----------------------------------------------------------------

HALF_PLUS_TWO = f"/v1/models/{TF1_MODEL}:predict"


def test_half_plus_two_answers_tensorflow_servings_quickstart(served):
    # TensorFlow Serving's README: {"instances": [1.0, 2.0, 5.0]} -> {"predictions": [2.5, 3.0, 4.5]},
    # although x is declared [-1, 1]: the graph takes shape [3].
    assert call(served, HALF_PLUS_TWO, {"instances": [1.0, 2.0, 5.0]}) == (200, {"predictions": [2.5, 3.0, 4.5]})
    # The declared shape works as well, and integers become the signature's DT_FLOAT.
    assert call(served, HALF_PLUS_TWO, {"instances": [[1], [2], [5]]}) == (
        200, {"predictions": [[2.5], [3.0], [4.5]]})


def test_half_plus_two_in_columnar_format(served):
    assert call(served, HALF_PLUS_TWO, {"inputs": [1.0, 2.0, 5.0]}) == (200, {"outputs": [2.5, 3.0, 4.5]})
    assert call(served, HALF_PLUS_TWO, {"inputs": {"x": [[1.0], [2.0]]}}) == (200, {"outputs": [[2.5], [3.0]]})
    assert call(served, HALF_PLUS_TWO, {"signature_name": "serving_default", "inputs": 4.0}) == (
        200, {"outputs": 4.0})


def test_metadata_still_declares_the_graphs_shape(served):
    status, answer = call(served, f"/v1/models/{TF1_MODEL}/metadata")
    assert status == 200, answer
    x = answer["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]["x"]
    assert x["dtype"] == "DT_FLOAT" and [d["size"] for d in x["tensor_shape"]["dim"]] == ["-1", "1"]


# The words of TensorFlow's MatMul kernel for a vector, which differ by CPU: Eigen's, and oneDNN's
# on a CPU with AVX-512 (a 2-D and a 1-D input; the Keras model's Dense, 1-D against its kernel).
NOT_A_MATRIX = r"different ndims|In\[0\] ndims must be >= 2|In\[0\] is not a matrix"


@pytest.mark.parametrize("path, body, message", [
    # Refused by the graph: MatMul takes matrices only, of matching sizes.
    (HALF_PLUS_TWO, {"signature_name": "matmul", "instances": [1.0, 2.0, 5.0]}, NOT_A_MATRIX),
    (HALF_PLUS_TWO, {"signature_name": "matmul", "inputs": [[1.0, 2.0, 5.0]]}, "Matrix size-incompatible"),
    (f"/v1/models/{KERAS_MODEL}:predict", {"instances": [[1, 2]]}, "Matrix size-incompatible"),
    (f"/v1/models/{KERAS_MODEL}:predict", {"instances": [1, 2, 3]}, NOT_A_MATRIX),
    # Refused before the graph, as TensorFlow Serving's json_tensor.cc refuses it: the dtype is the signature's.
    (HALF_PLUS_TWO, {"instances": ["a", "b"]}, "is not of expected type: DT_FLOAT"),
    (HALF_PLUS_TWO, {"instances": [[1.0], [2.0, 3.0]]}, "unexpected size"),
])
def test_what_the_graph_refuses_is_a_400_with_its_own_words(served, path, body, message):
    status, answer = call(served, path, body)
    assert status == 400, answer
    assert set(answer) == {"error"} and re.search(message, answer["error"]), answer
    # The kernel's words, without eager's preamble, the graph node or the op name.
    assert not re.search(r"Graph execution error|Detected at node|\[\[|\[Op:", answer["error"]), answer
    # The server goes on.
    assert call(served, HALF_PLUS_TWO, {"instances": [0.0]}) == (200, {"predictions": [2.0]})


# -- Prometheus metrics ------------------------------------------------------------------------------------

METRICS = "/monitoring/prometheus/metrics"


def _metrics(server):
    """{(sample name, frozenset(labels)): value} of the metrics page, parsed by prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    status, text = call(server, METRICS)
    assert status == 200, text
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def _sum(samples, name, **labels):
    return sum(value for (sample, sample_labels), value in samples.items()
               if sample == name and set(labels.items()) <= sample_labels)


def test_metrics_count_requests_by_status_and_time_every_one(served):
    before = _metrics(served)
    requests = [
        (HALF_PLUS_TWO, {"instances": [1.0, 2.0, 5.0]}, 200),
        ("/v1/models/nope:predict", {"instances": [1.0]}, 404),
        (HALF_PLUS_TWO, {"instances": ["a"]}, 400),
        (f"/v1/models/{TF1_MODEL}/versions/1:predict", {"inputs": [1.0]}, 200),
        (f"/v1/models/{TF1_MODEL}/metadata", None, 200),
    ]
    for path, body, status in requests:
        assert call(served, path, body)[0] == status
    after = _metrics(served)

    def added(name, **labels):
        return _sum(after, name, **labels) - _sum(before, name, **labels)

    requests_total = "dlsuite_serve_requests_total"
    labels = {"model_name": TF1_MODEL, "api": "predict"}
    assert added(requests_total, **labels, version="1", status="OK", code="200") == 2
    assert added(requests_total, **labels, version="1", status="INVALID_ARGUMENT", code="400") == 1
    # A name the server does not serve is counted without it, so made-up names add no series.
    assert added(requests_total, model_name="", version="", api="predict", status="NOT_FOUND", code="404") == 1
    assert not any("nope" in dict(sample_labels).values() for _, sample_labels in after)
    assert added(requests_total, model_name=TF1_MODEL, api="metadata", version="1", status="OK") == 1
    # The histogram times every request, whatever its status.
    latency = "dlsuite_serve_request_latency_seconds"
    assert added(f"{latency}_count") == len(requests)
    assert added(f"{latency}_count", **labels) == 3
    assert added(f"{latency}_bucket", **labels, le="+Inf") == 3
    assert added(f"{latency}_sum", **labels) > 0
    # Loaded versions: a gauge read at the scrape.
    assert _sum(after, "dlsuite_serve_version_loaded", model_name=TF1_MODEL, version="1") == 1
    assert _sum(after, "dlsuite_serve_version_loaded") == 2


def test_metrics_page_is_the_text_exposition_format(served):
    request = urllib.request.Request(f"http://127.0.0.1:{served.port}{METRICS}")
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode("utf-8")
    assert "# TYPE dlsuite_serve_requests_total counter" in text
    assert "# TYPE dlsuite_serve_request_latency_seconds histogram" in text
    assert "# TYPE dlsuite_serve_version_loaded gauge" in text
    # A scraper that asks for OpenMetrics gets it.
    request = urllib.request.Request(f"http://127.0.0.1:{served.port}{METRICS}",
                                     headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers.get_content_type() == "application/openmetrics-text"
        assert response.read().decode("utf-8").endswith("# EOF\n")


def test_the_page_shows_the_request_rate_from_the_same_counter(served):
    def totals():
        status, answer = call(served, "/dlsuite/models")
        assert status == 200, answer
        return {model["name"]: model["requests_total"] for model in answer["models"]}

    before = totals()
    for _ in range(3):
        assert call(served, HALF_PLUS_TWO, {"instances": [1.0]})[0] == 200
    assert call(served, HALF_PLUS_TWO, {"instances": ["a"]})[0] == 400
    after = totals()
    assert after[TF1_MODEL] - before[TF1_MODEL] == 4 and after[KERAS_MODEL] == before[KERAS_MODEL]
    counted = _sum(_metrics(served), "dlsuite_serve_requests_total", model_name=TF1_MODEL)
    assert after[TF1_MODEL] == counted  # the page's number is the metrics' counter
    status, html = call(served, "/")
    assert status == 200
    assert 'id="rate"' in html and "requests_total" in html and "requests/s" in html
