"""`dlsuite serve` as a client of TensorFlow Serving's REST API sees it: a real
server process on 127.0.0.1, real exports of the apps and of plain
`keras.Model.export`, real HTTP requests (urllib).

One server for the module (`served`): a base folder with a tiny classifier, a
tiny language model and a tiny captioner, and a Keras model folder given on
its own. The version
test changes only that Keras model's folder.
"""

import base64
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image, ImageDraw

import zygote
from dlsuite.apps.core.errors import UsageError

CLASSIFIER = "lenet5_shapes"
LANGUAGE_MODEL = "lstm_stdlib-docstrings"
CAPTIONER = "lenet5_caffe_lstm_scenes"
KERAS_MODEL = "regressor"
POLL_SECONDS = 0.3
MAX_BODY_MB = 1


def _dlsuite(*args):
    return [sys.executable, "-m", "dlsuite.apps.cli", *args]


def _environment():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}


def _export_keras_model(folder):
    """A model no dlsuite app wrote: scores = features @ ones(3, 2)."""
    import keras

    features = keras.Input((3,), name="features")
    scores = keras.layers.Dense(2, kernel_initializer="ones", name="scores")(features)
    keras.Model(features, scores).export(str(folder / "1"), verbose=False)


class Server:
    """A running `dlsuite serve` and the lines it printed."""

    def __init__(self, process):
        self.process = process
        self.lines = []
        self.port = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            match = re.search(r" on http://127\.0\.0\.1:(\d+)/", line)
            if match:
                self.port = int(match.group(1))
                self._ready.set()
        self._ready.set()  # exited

    def wait_ready(self, timeout, names=(KERAS_MODEL,)):
        """Until a version of every model of `names` is loaded, as a client would check readiness."""
        self._ready.wait(timeout)
        assert self.port, "dlsuite serve did not start:\n" + self.output()
        deadline = time.monotonic() + timeout
        while not all(_available(self, name) for name in names):
            assert time.monotonic() < deadline and self.process.poll() is None, self.output()
            time.sleep(0.1)

    def output(self):
        return "\n".join(self.lines)


def call(server, path, body=None, *, timeout=60):
    """(status, decoded JSON or text) of GET path, or POST body (dict, str or bytes)."""
    if isinstance(body, dict):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode("utf-8")
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, text, kind = response.status, response.read().decode("utf-8"), response.headers.get_content_type()
    except urllib.error.HTTPError as error:
        status, text, kind = error.code, error.read().decode("utf-8"), error.headers.get_content_type()
    return status, (json.loads(text) if kind == "application/json" else text)


def stop(process):
    """Stops a server as a supervisor does: SIGTERM, then SIGKILL after 20 s."""
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _available(server, name):
    """Whether a version of model `name` is loaded (its status answers 200 while it still loads)."""
    status, body = call(server, f"/v1/models/{name}")
    return status == 200 and any(version["state"] == "AVAILABLE" for version in body["model_version_status"])


def _wait_for(condition, *, timeout=20, what="", server=None):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}" + (
            f"; the server printed:\n{server.output()}" if server else "")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The server, started on an empty base folder while the apps train into it: their exports
    appear while it serves, as a user's next training run would."""
    root = tmp_path_factory.mktemp("serve")
    base, keras_folder = root / "saved_models", root / "plain" / KERAS_MODEL
    base.mkdir()
    env = _environment()
    commands = {
        "classify": ("classify", "train", "--dataset", "shapes", "--shapes-size", "32", "--shapes-count", "120",
                     "--epochs", "1"),
        "lm": ("lm", "train", "--max-chars", "3000", "--units", "8", "--layers", "1", "--embedding", "4",
               "--seq-len", "20", "--epochs", "1"),
        "caption": ("caption", "train", "--scenes-count", "40", "--scenes-size", "32", "--encoder", "lenet5_caffe",
                    "--units", "8", "--embedding", "4", "--epochs", "1"),
    }
    # Side by side (15-20 s each on one core), while this process exports the Keras model and the server starts.
    trainings = {}
    for app, command in commands.items():
        log = open(root / f"{app}.log", "w")
        trainings[app] = zygote.Popen(
            _dlsuite(*command, "--export-dir", str(base), "--out", str(root / f"run_{app}")),
            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
    _export_keras_model(keras_folder)
    process = zygote.Popen(
        _dlsuite("serve", str(base), str(keras_folder), "--port", "0", "--poll-seconds", str(POLL_SECONDS),
                 "--max-body-mb", str(MAX_BODY_MB)),
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = Server(process)
    try:
        for app, training in trainings.items():
            assert training.wait(timeout=300) == 0, (root / f"{app}.log").read_text()
        server.wait_ready(timeout=120)
        _wait_for(lambda: all(_available(server, name) for name in (CLASSIFIER, LANGUAGE_MODEL, CAPTIONER)),
                  timeout=60, what="the apps' exports to be loaded", server=server)
        server.keras_folder = keras_folder
        yield server
    finally:
        for training in trainings.values():
            if training.poll() is None:
                training.kill()
                training.wait()
        stop(process)


def _png(color=(220, 40, 40)):
    image = Image.new("RGB", (32, 32), (255, 255, 255))
    ImageDraw.Draw(image).ellipse((6, 6, 26, 26), fill=color)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _b64(data):
    return {"b64": base64.b64encode(data).decode("ascii")}


# -- status and metadata -------------------------------------------------------------------------------


def test_status_of_every_model_and_version(served):
    expected = {"model_version_status": [{"version": "1", "state": "AVAILABLE",
                                          "status": {"error_code": "OK", "error_message": ""}}]}
    for name in (CLASSIFIER, LANGUAGE_MODEL, CAPTIONER, KERAS_MODEL):
        assert call(served, f"/v1/models/{name}") == (200, expected)
        assert call(served, f"/v1/models/{name}/versions/1") == (200, expected)
    # One line per loaded version on stdout.
    for name in (CLASSIFIER, LANGUAGE_MODEL, CAPTIONER, KERAS_MODEL):
        assert re.search(rf"^serve: loaded {re.escape(name)} version 1 ", served.output(), re.MULTILINE)


def test_metadata_in_tensorflow_servings_layout(served):
    status, answer = call(served, f"/v1/models/{KERAS_MODEL}/metadata")
    assert status == 200
    assert answer["model_spec"] == {"name": KERAS_MODEL, "signature_name": "", "version": "1"}
    signature = answer["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["method_name"] == "tensorflow/serving/predict"
    features = signature["inputs"]["features"]
    assert features["dtype"] == "DT_FLOAT"
    assert features["tensor_shape"] == {"dim": [{"size": "-1", "name": ""}, {"size": "3", "name": ""}],
                                        "unknown_rank": False}
    assert signature["outputs"]["output_0"]["dtype"] == "DT_FLOAT"

    status, answer = call(served, f"/v1/models/{CLASSIFIER}/versions/1/metadata")
    signatures = answer["metadata"]["signature_def"]["signature_def"]
    assert status == 200 and {"serving_default", "serving_float", "serving_bytes"} <= set(signatures)
    assert signatures["serving_default"]["inputs"]["images"]["dtype"] == "DT_UINT8"
    assert signatures["serving_bytes"]["inputs"]["image_bytes"]["dtype"] == "DT_STRING"
    assert [d["size"] for d in signatures["serving_default"]["inputs"]["images"]["tensor_shape"]["dim"]] == ["-1"] * 4


def test_models_listing_names_the_kind_of_each_export(served):
    status, answer = call(served, "/dlsuite/models")
    kinds = {model["name"]: model["kind"] for model in answer["models"]}
    assert status == 200
    assert kinds == {CLASSIFIER: "classifier", LANGUAGE_MODEL: "language_model", CAPTIONER: "captioner",
                     KERAS_MODEL: "saved_model"}
    classifier = next(model for model in answer["models"] if model["name"] == CLASSIFIER)
    assert classifier["versions"] == [1] and classifier["dlsuite"]["class_names"] == [
        "circle", "square", "triangle", "star"]
    assert classifier["signatures"]["serving_bytes"]["inputs"] == {"image_bytes": {"dtype": "DT_STRING", "shape": [-1]}}


def test_page_for_people_is_one_offline_html_page(served):
    status, html = call(served, "/")
    assert status == 200 and html.lstrip().lower().startswith("<!doctype html>")
    assert "serving_bytes" in html and "/dlsuite/models" in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "external asset"


# -- predict -------------------------------------------------------------------------------------------


def test_plain_keras_export_row_and_columnar(served):
    path = f"/v1/models/{KERAS_MODEL}:predict"
    assert call(served, path, {"instances": [[1, 2, 3], [0.5, 0, 0]]}) == (
        200, {"predictions": [[6.0, 6.0], [0.5, 0.5]]})
    assert call(served, path, {"signature_name": "serving_default", "inputs": {"features": [[1, 2, 3]]}}) == (
        200, {"outputs": [[6.0, 6.0]]})
    assert call(served, f"/v1/models/{KERAS_MODEL}/versions/1:predict", {"inputs": [[1, 1, 1]]}) == (
        200, {"outputs": [[3.0, 3.0]]})


def test_classifier_row_and_columnar_agree(served):
    image = np.asarray(Image.open(io.BytesIO(_png()))).tolist()
    path = f"/v1/models/{CLASSIFIER}:predict"
    status, rows = call(served, path, {"instances": [image, image]})
    assert status == 200, rows
    first = rows["predictions"][0]
    assert set(first) == {"probabilities", "class_index", "class_name"}
    assert len(first["probabilities"]) == 4 and abs(sum(first["probabilities"]) - 1) < 1e-4
    assert first["class_name"] == ["circle", "square", "triangle", "star"][first["class_index"]]
    status, columns = call(served, path, {"inputs": {"images": [image]}})
    assert status == 200
    assert columns["outputs"]["class_name"] == [first["class_name"]]
    np.testing.assert_allclose(columns["outputs"]["probabilities"][0], first["probabilities"], rtol=1e-5)


def test_classifier_takes_encoded_images_as_b64(served):
    png = _png()
    status, answer = call(served, f"/v1/models/{CLASSIFIER}:predict",
                          {"signature_name": "serving_bytes", "instances": [_b64(png), _b64(_png((20, 20, 200)))]})
    assert status == 200, answer
    assert len(answer["predictions"]) == 2
    image = np.asarray(Image.open(io.BytesIO(png))).tolist()
    _, pixels = call(served, f"/v1/models/{CLASSIFIER}:predict", {"instances": [image]})
    np.testing.assert_allclose(answer["predictions"][0]["probabilities"],
                               pixels["predictions"][0]["probabilities"], rtol=1e-4, atol=1e-6)


def test_an_image_as_integers_means_what_it_means_as_floats(served):
    """A long integer list is read by NumPy (tensors.DenseIntegers); the same pixels written as
    floats go the general way: both give the same answer, and a bad value in a long list gets
    the general way's error."""
    pixels = np.random.default_rng(3).integers(0, 256, (1, 40, 40, 3))
    path = f"/v1/models/{CLASSIFIER}:predict"
    status, integers = call(served, path, {"instances": pixels.tolist()})
    assert status == 200, integers
    status, floats = call(served, path, {"signature_name": "serving_float", "instances": pixels.astype(float).tolist()})
    assert status == 200, floats
    assert integers == floats
    pixels[0, 5, 5, 1] = 300
    status, answer = call(served, path, {"instances": pixels.tolist()})
    assert status == 400 and "out of range for DT_UINT8" in answer["error"], answer


_IMAGE = np.random.default_rng(0).integers(0, 256, (1, 24, 24, 3)).tolist()
_IMAGE_TEXT = json.dumps(_IMAGE)


@pytest.mark.parametrize("body, fast", [
    (json.dumps({"instances": _IMAGE}), True),
    (json.dumps({"signature_name": "serving_default", "inputs": _IMAGE}, separators=(",", ":")), True),
    (json.dumps({"instances": _IMAGE}, indent=1), True),
    (json.dumps({"instances": (-np.asarray(_IMAGE)).tolist()}), True),  # -0 and negatives: out of range
    ('{"instances": ' + _IMAGE_TEXT.replace("[", "[ ") + "}", True),
    ('{"instances": ' + _IMAGE_TEXT.replace(",", " ,\n") + "}", True),
    ('{"instances": ' + _IMAGE_TEXT.replace(", ", " ", 1) + "}", False),  # "1 2"
    ('{"instances": ' + _IMAGE_TEXT.replace(", ", ", 0", 1) + "}", False),  # a leading zero
    ('{"instances": ' + _IMAGE_TEXT.replace(", ", ", -", 1).replace(", -", ", 1-", 1) + "}", False),
    ('{"instances": ' + _IMAGE_TEXT.replace(", ", ", 99999999999, ", 1) + "}", False),  # ragged
    ('{"instances": ' + _IMAGE_TEXT.replace("], [", "], 7, [", 1) + "}", False),
    ('{"instances": ' + _IMAGE_TEXT.replace(", ", ", , ", 1) + "}", False),
    ('{"instances": ' + _IMAGE_TEXT.replace("]]]]", "]]]") + "}", False),
    ('{"instances": ' + _IMAGE_TEXT + ', "signature_name": 7}', False),
    ('{"instances": ' + _IMAGE_TEXT + ', "inputs": [1]}', False),
    ('{"instances": ' + _IMAGE_TEXT + ', "x": "\\u0000dlsuite:dense-integers"}', False),
    ('{"inputs": {"images": ' + _IMAGE_TEXT + "}}", False),
])
@pytest.mark.parametrize("dtype", ["uint8", "int32", "float32", "int64"])
def test_long_integer_lists_are_read_as_json_reads_them(body, fast, dtype, monkeypatch):
    from dlsuite.apps.serve import tensors
    from dlsuite.apps.serve.errors import ServingError

    names = {"uint8": "DT_UINT8", "int32": "DT_INT32", "float32": "DT_FLOAT", "int64": "DT_INT64"}
    specs = {"images": tensors.TensorSpec("images", names[dtype], np.dtype(dtype), (None, None, None, 3))}

    def outcome():
        try:
            arrays = tensors.inputs_from_request(tensors.parse_request(body.encode()), specs)
        except ServingError as error:
            return error.message
        return {name: (array.dtype, array.shape, array.tolist()) for name, array in arrays.items()}

    assert isinstance(tensors._parse_with_dense_integers(body.encode()), dict) == fast
    read = outcome()
    monkeypatch.setattr(tensors, "_parse_with_dense_integers", lambda body: None)
    assert read == outcome()


def test_language_model_answers_text_in_columnar_format(served):
    request = {"inputs": {"prompt": "Return the ", "length": 40, "temperature": 0.7, "seed": 1}}
    status, answer = call(served, f"/v1/models/{LANGUAGE_MODEL}:predict", request)
    assert status == 200, answer
    assert isinstance(answer["outputs"]["text"], str) and len(answer["outputs"]["token_ids"]) == 40
    assert call(served, f"/v1/models/{LANGUAGE_MODEL}:predict", request)[1] == answer  # same seed, same text
    # Scalar inputs have no batch dimension: the row format gives them one, which the graph refuses, as under
    # TensorFlow Serving; the error says what to send instead.
    status, answer = call(served, f"/v1/models/{LANGUAGE_MODEL}:predict",
                          {"instances": [{"prompt": "a", "length": 5, "temperature": 1.0, "seed": 1}]})
    assert status == 400 and "columnar" in answer["error"]


def test_captioner_answers_image_bytes_with_a_caption(served):
    status, answer = call(served, f"/v1/models/{CAPTIONER}:predict", {"instances": [_b64(_png()), _b64(_png())]})
    assert status == 200, answer
    first = answer["predictions"][0]
    assert set(first) == {"caption", "log_likelihood", "score"} and isinstance(first["caption"], str)
    assert answer["predictions"][1] == first


# -- errors --------------------------------------------------------------------------------------------

KERAS_PREDICT = f"/v1/models/{KERAS_MODEL}:predict"


@pytest.mark.parametrize("path, body, status, message", [
    (KERAS_PREDICT, "instances = [1, 2]", 400, "JSON Parse error"),
    (KERAS_PREDICT, "", 400, "The document is empty"),
    (KERAS_PREDICT, "[1, 2]", 400, "Is not object"),
    (KERAS_PREDICT, {"instances": [[1, 2, 3]], "inputs": [[1, 2, 3]]}, 400, "only one of 'inputs' or 'instances'"),
    (KERAS_PREDICT, {"signature_name": "serving_default"}, 400, "Missing 'inputs' or 'instances'"),
    (KERAS_PREDICT, {"instances": []}, 400, "No values in 'instances'"),
    (KERAS_PREDICT, {"instances": [["a", "b", "c"]]}, 400, "is not of expected type: DT_FLOAT"),
    (KERAS_PREDICT, {"instances": [[1, 2]]}, 400, "Matrix size-incompatible"),  # the graph refuses it
    (KERAS_PREDICT, {"instances": [[1, 2, 3], [1, 2]]}, 400, "unexpected size"),
    (KERAS_PREDICT, {"signature_name": 7, "instances": [[1, 2, 3]]}, 400, "'signature_name' key must be a string"),
    (KERAS_PREDICT, {"inputs": {"other": [[1, 2, 3]]}}, 400, "Missing named input: features"),
    (f"/v1/models/{CLASSIFIER}:predict", {"instances": [[[[1.5, 0, 0]]]]}, 400, "not of expected type: DT_UINT8"),
    (f"/v1/models/{CLASSIFIER}:predict", {"instances": [[[[300, 0, 0]]]]}, 400, "out of range for DT_UINT8"),
    (f"/v1/models/{CLASSIFIER}:predict", {"signature_name": "serving_bytes", "instances": [{"b64": "not base64!"}]},
     400, "Unable to base64 decode"),
    (f"/v1/models/{CLASSIFIER}:predict", {"signature_name": "serving_bytes", "instances": [_b64(b"not an image")]},
     400, "image"),
    # TensorFlow Serving answers an unknown signature with INVALID_ARGUMENT (400), not NOT_FOUND.
    (KERAS_PREDICT, {"signature_name": "nope", "instances": [[1, 2, 3]]}, 400,
     'Serving signature name: "nope" not found'),
    ("/v1/models/nope:predict", {"instances": [[1, 2, 3]]}, 404, "Servable not found for request: Latest(nope)"),
    (f"/v1/models/{KERAS_MODEL}/versions/9:predict", {"instances": [[1, 2, 3]]}, 404,
     f"Servable not found for request: Specific({KERAS_MODEL}, 9)"),
    ("/v1/models/nope", None, 404, "Could not find any versions of model nope"),
    (f"/v1/models/{KERAS_MODEL}/versions/9", None, 404, f"Could not find version 9 of model {KERAS_MODEL}"),
    (f"/v1/models/{KERAS_MODEL}/versions/9/metadata", None, 404, "Servable not found"),
    ("/v1/models", None, 400, "Missing model name"),
    ("/v1/models/x/versions/99999999999999999999:predict", {}, 400, "Failed to convert version"),
    ("/v1/nothing", None, 400, "Malformed request: GET /v1/nothing"),
    (f"/v1/models/{KERAS_MODEL}:predict", None, 400, "Malformed request"),  # GET on :predict
])
def test_client_mistakes_get_tensorflow_servings_status_and_an_error(served, path, body, status, message):
    answer_status, answer = call(served, path, body)
    assert answer_status == status, answer
    assert set(answer) == {"error"} and message in answer["error"], answer


def test_body_over_the_limit_is_413_and_the_server_keeps_serving(served):
    rows = [[1.0, 2.0, 3.0]] * (MAX_BODY_MB * (1 << 20) // 15 + 1)  # "[1.0, 2.0, 3.0], " is 17 bytes
    status, answer = call(served, KERAS_PREDICT, {"instances": rows})
    assert status == 413 and "too large" in answer["error"]
    # Chunked, so the size is only known once the body is read.
    body = json.dumps({"instances": rows}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{served.port}{KERAS_PREDICT}",
                                     data=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]))  # no length: urllib sends it chunked
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=60)
    assert error.value.code == 413 and "error" in json.loads(error.value.read())
    assert call(served, KERAS_PREDICT, {"instances": [[1, 2, 3]]}) == (200, {"predictions": [[6.0, 6.0]]})
    assert served.process.poll() is None


# -- concurrency ---------------------------------------------------------------------------------------


def test_requests_are_answered_while_a_slow_one_runs(served):
    path = f"/v1/models/{LANGUAGE_MODEL}:predict"

    def generate(length):
        return call(served, path, {"inputs": {"prompt": "a", "length": length, "temperature": 1.0, "seed": 3}},
                    timeout=120)

    started = time.monotonic()
    assert generate(2000)[0] == 200
    per_token = (time.monotonic() - started) / 2000
    length = int(min(200_000, max(4000, 3.5 / per_token)))  # a request of about 3.5 s here
    finished = {}

    def slow():
        finished["slow_status"] = generate(length)[0]
        finished["slow"] = time.monotonic()

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.3)
    fast = []
    for _ in range(2):
        fast.append(call(served, KERAS_PREDICT, {"instances": [[1, 2, 3]]}))
        fast.append(call(served, f"/v1/models/{CLASSIFIER}"))
        fast.append(call(served, f"/v1/models/{CLASSIFIER}:predict",
                         {"signature_name": "serving_bytes", "instances": [_b64(_png())]}))
    fast_done = time.monotonic()
    thread.join(timeout=180)
    assert all(status == 200 for status, _ in fast), fast
    assert finished["slow_status"] == 200
    assert fast_done < finished["slow"], "the fast requests waited for the slow one"


def test_parallel_clients_all_get_answers(served):
    results = []

    def client(index):
        results.append(call(served, KERAS_PREDICT, {"instances": [[index, 0, 0]]}))

    threads = [threading.Thread(target=client, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(answer["predictions"][0][0] for _, answer in results) == [float(i) for i in range(8)]


# -- versions ------------------------------------------------------------------------------------------


def _versions(server):
    status, answer = call(server, f"/v1/models/{KERAS_MODEL}")
    return {entry["version"]: entry["state"] for entry in answer["model_version_status"]} if status == 200 else {}


def _default_version(server):
    return call(server, f"/v1/models/{KERAS_MODEL}/metadata")[1]["model_spec"]["version"]


def test_versions_appear_and_go_while_serving(served):
    folder = served.keras_folder
    # Written under a hidden name, then renamed into place, as our exports do.
    shutil.copytree(folder / "1", folder / ".tmp-2-test")
    time.sleep(3 * POLL_SECONDS)
    assert set(_versions(served)) == {"1"}, "a hidden folder was loaded"
    os.rename(folder / ".tmp-2-test", folder / "2")
    _wait_for(lambda: _versions(served).get("2") == "AVAILABLE", what="version 2", server=served)
    assert _versions(served) == {"2": "AVAILABLE", "1": "AVAILABLE"}
    assert _default_version(served) == "2"
    assert call(served, f"/v1/models/{KERAS_MODEL}/versions/1:predict", {"instances": [[1, 1, 1]]})[0] == 200
    assert call(served, f"/v1/models/{KERAS_MODEL}/versions/2:predict", {"instances": [[1, 1, 1]]})[0] == 200

    # A version still being written (no variables/ yet) and one that cannot load: never served, never fatal.
    (folder / "3").mkdir()
    shutil.copy(folder / "1" / "saved_model.pb", folder / "3" / "saved_model.pb")
    (folder / "4" / "variables").mkdir(parents=True)
    (folder / "4" / "saved_model.pb").write_bytes(b"not a SavedModel")
    _wait_for(lambda: _versions(served).get("4") == "END", what="the failed load of version 4", server=served)
    assert "3" not in _versions(served)
    assert _default_version(served) == "2"
    assert call(served, f"/v1/models/{KERAS_MODEL}/versions/4:predict", {"instances": [[1, 2, 3]]})[0] == 404
    assert re.search(rf"^serve: cannot load {KERAS_MODEL} version 4 ", served.output(), re.MULTILINE)
    shutil.rmtree(folder / "3")
    shutil.rmtree(folder / "4")

    shutil.rmtree(folder / "2")
    _wait_for(lambda: "2" not in _versions(served), what="version 2 to be unloaded", server=served)
    assert _versions(served) == {"1": "AVAILABLE"}
    assert _default_version(served) == "1"
    status, answer = call(served, f"/v1/models/{KERAS_MODEL}/versions/2:predict", {"instances": [[1, 2, 3]]})
    assert status == 404 and "Specific" in answer["error"]
    assert re.search(rf"^serve: unloaded {KERAS_MODEL} version 2 ", served.output(), re.MULTILINE)
    assert served.process.poll() is None


# -- the command line ----------------------------------------------------------------------------------


def test_folders_are_told_apart_and_bad_ones_refused(tmp_path):
    from dlsuite.apps.serve.cli import resolve_folders

    (tmp_path / "base" / "pets" / "1").mkdir(parents=True)
    (tmp_path / "base" / "cars").mkdir()
    (tmp_path / "empty").mkdir()
    assert resolve_folders([tmp_path / "base"]) == ({}, [tmp_path / "base"])
    assert resolve_folders([tmp_path / "base" / "pets"]) == ({"pets": tmp_path / "base" / "pets"}, [])
    assert resolve_folders([tmp_path / "empty"], "mine") == ({"mine": tmp_path / "empty"}, [])
    (tmp_path / "base" / "pets" / "1" / "saved_model.pb").write_bytes(b"")
    with pytest.raises(UsageError, match="is a version folder"):
        resolve_folders([tmp_path / "base" / "pets" / "1"])
    with pytest.raises(UsageError, match="is not a folder"):
        resolve_folders([tmp_path / "missing"])
    with pytest.raises(UsageError, match="names one model"):
        resolve_folders([tmp_path / "base" / "pets", tmp_path / "empty"], "x")


def test_command_line_errors_are_one_line(tmp_path, capsys):
    import socket

    from dlsuite.apps import cli

    assert cli.main(["serve", str(tmp_path), "--port", "70000"]) == 2
    assert "--port must be 0..65535" in capsys.readouterr().err
    assert cli.main(["serve", str(tmp_path), "--poll-seconds", "0"]) == 2
    assert "--poll-seconds must be > 0" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert cli.main(["serve", str(tmp_path), "--port", str(taken.getsockname()[1])]) == 2
    error = capsys.readouterr().err
    assert error.startswith("dlsuite: error: cannot listen on 127.0.0.1:") and error.count("\n") == 1


# -- the page in a real browser ------------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _browser(tmp_path):
    """Headless Chromium through Selenium; CI (`.ci/run`) installs Debian's chromium and chromedriver."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        message = f"{CHROMIUM} and {CHROMEDRIVER} are needed (apt-get install chromium chromium-driver)"
        if os.environ.get("DLSUITE_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1100,900"):
        options.add_argument(flag)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)


def test_the_page_shows_a_classifiers_top_five_for_an_uploaded_image(served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    image = tmp_path / "circle.png"
    image.write_bytes(_png())
    status, answer = call(served, f"/v1/models/{CLASSIFIER}:predict",
                          {"signature_name": "serving_bytes", "instances": [_b64(image.read_bytes())]})
    assert status == 200
    expected = answer["predictions"][0]["class_name"]

    browser = _browser(tmp_path)
    try:
        browser.get(f"http://127.0.0.1:{served.port}/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: CLASSIFIER in [o.get_attribute("value") for o in b.find_elements(By.CSS_SELECTOR, "#model option")])
        Select(browser.find_element(By.ID, "model")).select_by_visible_text(CLASSIFIER)
        upload = browser.find_element(By.ID, "file")
        browser.execute_script("arguments[0].hidden = false;", upload)  # the page hides it behind the drop zone
        upload.send_keys(str(image))
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#bars .bar")) == 4)  # shapes: 4 classes
        rows = [bar.text.split("\n") for bar in browser.find_elements(By.CSS_SELECTOR, "#bars .bar")]
        artifacts = pathlib.Path(os.environ.get("DLSUITE_ARTIFACTS", tmp_path))
        artifacts.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(artifacts / "serve_page_classifier.png"))
    finally:
        browser.quit()
    names = [row[0].strip() for row in rows]
    percents = [float(row[-1].strip().rstrip("%")) for row in rows]
    assert names[0] == expected and len(rows) == 4  # shapes has 4 classes: all of them, best first
    assert percents == sorted(percents, reverse=True) and abs(sum(percents) - 100) < 1
