"""`dlsuite serve`'s gRPC API as a TensorFlow Serving client sees it (issue #26 item 1): a real server
process, tensorflow-serving-api's own stubs over a real channel on 127.0.0.1.

One server for the module (`served`), REST on a free port and gRPC on another
(`--grpc-port 0`, read back from its start-up line), on a base folder with:

* `regressor`, a plain `keras.Model.export` in two versions: version 1 is
  features @ ones(3, 2), version 2 features @ twos(3, 2);
* `lenet5_shapes`, a tiny classifier trained by `dlsuite classify` while the
  server starts, for our exports' string input (`serving_bytes`) and
  several outputs.
"""

import argparse
import base64
import re
import subprocess
import threading
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
import zygote
from google.protobuf import json_format
from tensorflow.core.framework import tensor_pb2
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
                                     model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc)

from dlsuite.apps.serve import cli
from test_serve import (CLASSIFIER, KERAS_MODEL, Server, _available, _dlsuite, _environment, _png, _wait_for, call,
                        stop)

POLL_SECONDS = 0.3
MAX_BODY_MB = 1


def _export_keras_model(folder, version, weight):
    """scores = features @ full((3, 2), weight), features declared [None, 3]."""
    import keras

    features = keras.Input((3,), name="features")
    scores = keras.layers.Dense(2, kernel_initializer=keras.initializers.Constant(weight), name="scores")(features)
    keras.Model(features, scores).export(str(folder / str(version)), verbose=False)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_grpc")
    base = root / "saved_models"
    base.mkdir()
    env = _environment()
    log = open(root / "classify.log", "w")
    training = zygote.Popen(
        _dlsuite("classify", "train", "--dataset", "shapes", "--shapes-size", "32", "--shapes-count", "120",
                 "--epochs", "1", "--export-dir", str(base), "--out", str(root / "run")),
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    _export_keras_model(base / KERAS_MODEL, 1, 1.0)
    _export_keras_model(base / KERAS_MODEL, 2, 2.0)
    process = zygote.Popen(
        _dlsuite("serve", str(base), "--port", "0", "--grpc-port", "0", "--poll-seconds", str(POLL_SECONDS),
                 "--max-body-mb", str(MAX_BODY_MB)),
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = Server(process)
    channel = None
    try:
        server.wait_ready(timeout=120)
        match = re.search(r"gRPC API: 127\.0\.0\.1:(\d+)\)", server.output())
        assert match, server.output()
        server.grpc_port = int(match.group(1))
        assert training.wait(timeout=300) == 0, (root / "classify.log").read_text()
        _wait_for(lambda: _available(server, CLASSIFIER), timeout=60,
                  what="the classifier's export to be loaded", server=server)
        channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        server.predictions = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        server.models = model_service_pb2_grpc.ModelServiceStub(channel)
        yield server
    finally:
        if channel is not None:
            channel.close()
        if training.poll() is None:
            training.kill()
            training.wait()
        stop(process)


def _predict_request(model, inputs, *, version=None, label=None, signature=None, output_filter=()):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    if signature is not None:
        request.model_spec.signature_name = signature
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(value if isinstance(value, tensor_pb2.TensorProto)
                                      else tf.make_tensor_proto(value))
    request.output_filter.extend(output_filter)
    return request


def _outputs(response):
    return {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}


FEATURES = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 4.0]], dtype=np.float32)


# -- Predict -------------------------------------------------------------------------------------------


def test_predict_answers_the_highest_version_as_rest_does(served):
    response = served.predictions.Predict(_predict_request(KERAS_MODEL, {"features": FEATURES}), timeout=30)
    assert response.model_spec.name == KERAS_MODEL
    assert response.model_spec.version.value == 2
    assert response.model_spec.signature_name == "serving_default"
    outputs = _outputs(response)
    np.testing.assert_allclose(outputs["output_0"], FEATURES @ np.full((3, 2), 2.0), rtol=1e-6)
    status, rest = call(served, f"/v1/models/{KERAS_MODEL}:predict", {"instances": FEATURES.tolist()})
    assert status == 200, rest
    np.testing.assert_allclose(outputs["output_0"], rest["predictions"], rtol=1e-6)


def test_predict_a_specific_version_by_model_spec_version(served):
    response = served.predictions.Predict(_predict_request(KERAS_MODEL, {"features": FEATURES}, version=1),
                                          timeout=30)
    assert response.model_spec.version.value == 1
    np.testing.assert_allclose(_outputs(response)["output_0"], FEATURES @ np.ones((3, 2)), rtol=1e-6)


def test_our_classifier_export_takes_image_bytes_and_filters_outputs(served):
    png = _png()
    request = _predict_request(CLASSIFIER, {"image_bytes": np.array([png], dtype=object)}, signature="serving_bytes")
    outputs = _outputs(served.predictions.Predict(request, timeout=30))
    assert set(outputs) == {"probabilities", "class_index", "class_name"}
    status, rest = call(served, f"/v1/models/{CLASSIFIER}:predict",
                        {"signature_name": "serving_bytes", "instances": [{"b64": base64.b64encode(
                            png).decode("ascii")}]})
    assert status == 200, rest
    (expected,) = rest["predictions"]
    np.testing.assert_allclose(outputs["probabilities"][0], expected["probabilities"], rtol=1e-5, atol=1e-7)
    assert int(outputs["class_index"][0]) == expected["class_index"]
    assert outputs["class_name"][0].decode("utf-8") == expected["class_name"]
    # output_filter: only what is asked for.
    request.output_filter.append("class_name")
    only = _outputs(served.predictions.Predict(request, timeout=30))
    assert list(only) == ["class_name"]


def test_predict_calls_run_side_by_side(served):
    answers, errors = [], []

    def client():
        try:
            response = served.predictions.Predict(_predict_request(KERAS_MODEL, {"features": FEATURES}), timeout=60)
            answers.append(_outputs(response)["output_0"])
        except grpc.RpcError as error:  # noqa: PERF203
            errors.append(error)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(answers) == 8
    for answer in answers:
        np.testing.assert_allclose(answer, FEATURES @ np.full((3, 2), 2.0), rtol=1e-6)


# -- metadata and status -------------------------------------------------------------------------------


def test_get_model_metadata_returns_the_signature_def(served):
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = KERAS_MODEL
    request.metadata_field.append("signature_def")
    response = served.predictions.GetModelMetadata(request, timeout=30)
    assert response.model_spec.name == KERAS_MODEL and response.model_spec.version.value == 2
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    signature = signatures.signature_def["serving_default"]
    assert signature.method_name == "tensorflow/serving/predict"
    features = signature.inputs["features"]
    assert features.dtype == tf.float32.as_datatype_enum
    assert [dim.size for dim in features.tensor_shape.dim] == [-1, 3]
    # The same map REST's /metadata answers.
    status, rest = call(served, f"/v1/models/{KERAS_MODEL}/metadata")
    assert status == 200
    assert json_format.MessageToDict(signatures, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True) == rest["metadata"]["signature_def"]
    # No metadata_field, or one TensorFlow Serving does not know: INVALID_ARGUMENT.
    del request.metadata_field[:]
    with pytest.raises(grpc.RpcError) as caught:
        served.predictions.GetModelMetadata(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at least one metadata_field" in caught.value.details()


def test_get_model_status_lists_every_version_available(served):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = KERAS_MODEL
    response = served.models.GetModelStatus(request, timeout=30)
    states = [(status.version, get_model_status_pb2.ModelVersionStatus.State.Name(status.state),
               status.status.error_code) for status in response.model_version_status]
    assert states == [(2, "AVAILABLE", 0), (1, "AVAILABLE", 0)]
    request.model_spec.version.value = 1
    (only,) = served.models.GetModelStatus(request, timeout=30).model_version_status
    assert only.version == 1


# -- errors: TensorFlow Serving's status codes ---------------------------------------------------------


def _refusal(method, request):
    with pytest.raises(grpc.RpcError) as caught:
        method(request, timeout=30)
    return caught.value.code(), caught.value.details()


def test_client_mistakes_get_tensorflow_servings_status_codes(served):
    predict = served.predictions.Predict
    features = {"features": FEATURES}
    code, details = _refusal(predict, _predict_request("nope", features))
    assert (code, details) == (grpc.StatusCode.NOT_FOUND, "Servable not found for request: Latest(nope)")
    code, details = _refusal(predict, _predict_request(KERAS_MODEL, features, version=7))
    assert (code, details) == (grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Specific({KERAS_MODEL}, 7)")
    code, details = _refusal(predict, _predict_request(KERAS_MODEL, {"features": FEATURES.astype(np.int32)}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "to be float32 but int32 is provided" in details
    code, details = _refusal(predict, _predict_request(KERAS_MODEL, {"x": FEATURES}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "Missing but required: {features}" in details
    code, details = _refusal(predict, _predict_request(KERAS_MODEL, {"features": FEATURES[:, :2]}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "Matrix size-incompatible" in details  # the graph's own
    code, details = _refusal(predict, _predict_request(KERAS_MODEL, features, signature="nope"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and 'Serving signature key "nope" not found.' in details
    code, details = _refusal(predict, _predict_request(KERAS_MODEL, features, output_filter=["nope"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "output tensor alias not found in signature: nope" in details
    code, details = _refusal(predict, _predict_request(KERAS_MODEL, features, label="stable"))
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, "Unrecognized servable version label: stable")
    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = "nope"
    assert _refusal(served.models.GetModelStatus, status_request)[0] == grpc.StatusCode.NOT_FOUND
    # Unimplemented APIs say so.
    classify = classification_pb2.ClassificationRequest()
    assert _refusal(served.predictions.Classify, classify)[0] == grpc.StatusCode.UNIMPLEMENTED


def test_too_large_is_resource_exhausted_and_the_server_goes_on(served):
    big = np.zeros((MAX_BODY_MB * (1 << 20) // 12 + 1, 3), dtype=np.float32)  # just over the limit
    code, _ = _refusal(served.predictions.Predict, _predict_request(KERAS_MODEL, {"features": big}))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    # A tiny message whose shape would unpack to gigabytes is refused before it is unpacked.
    huge = tensor_pb2.TensorProto(dtype=tf.float32.as_datatype_enum, float_val=[1.0])
    huge.tensor_shape.dim.add(size=1 << 30)
    huge.tensor_shape.dim.add(size=3)
    code, details = _refusal(served.predictions.Predict, _predict_request(KERAS_MODEL, {"features": huge}))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-body-mb" in details
    response = served.predictions.Predict(_predict_request(KERAS_MODEL, {"features": FEATURES}), timeout=30)
    assert response.model_spec.version.value == 2


# -- metrics, start-up, command line -------------------------------------------------------------------


def test_metrics_count_grpc_requests_apart_from_rest(served):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape():
        url = f"http://127.0.0.1:{served.port}/monitoring/prometheus/metrics"
        with urllib.request.urlopen(url, timeout=30) as response:
            text = response.read().decode("utf-8")
        return {(sample.name, frozenset(sample.labels.items())): sample.value
                for family in text_string_to_metric_families(text) for sample in family.samples}

    def total(samples, **labels):
        return sum(value for (name, sample_labels), value in samples.items()
                   if name == "dlsuite_serve_requests_total" and set(labels.items()) <= sample_labels)

    before = scrape()
    served.predictions.Predict(_predict_request(KERAS_MODEL, {"features": FEATURES}, version=1), timeout=30)
    _refusal(served.predictions.Predict, _predict_request(KERAS_MODEL, {"features": FEATURES.astype(np.int32)}))
    _refusal(served.predictions.Predict, _predict_request("nope", {"features": FEATURES}))
    after = scrape()
    grpc_predict = {"protocol": "grpc", "api": "predict"}
    assert total(after, **grpc_predict, model_name=KERAS_MODEL, version="1", status="OK", code="0") - total(
        before, **grpc_predict, model_name=KERAS_MODEL, version="1", status="OK", code="0") == 1
    assert total(after, **grpc_predict, version="2", status="INVALID_ARGUMENT", code="3") - total(
        before, **grpc_predict, version="2", status="INVALID_ARGUMENT", code="3") == 1
    assert total(after, **grpc_predict, model_name="", status="NOT_FOUND", code="5") - total(
        before, **grpc_predict, model_name="", status="NOT_FOUND", code="5") == 1
    assert total(after, protocol="rest") == total(before, protocol="rest")  # the scrape itself is not a model call


def test_start_up_line_names_both_addresses(served):
    line = next(line for line in served.lines if line.startswith("serve: ") and " on http://" in line)
    assert f"gRPC API: 127.0.0.1:{served.grpc_port}" in line
    assert served.grpc_port != served.port


def test_grpc_port_choice_and_a_taken_port_is_one_line(served, tmp_path):
    parser = argparse.ArgumentParser()
    parser.add_argument("--grpc-port", type=cli.grpc_port)
    assert cli.choose_grpc_port(parser.parse_args([]).grpc_port, 8501) == 8500  # TensorFlow Serving's
    assert cli.choose_grpc_port(None, 0) == 0  # servers started side by side do not fight over 8500
    assert cli.choose_grpc_port(parser.parse_args(["--grpc-port", "off"]).grpc_port, 8501) is None
    assert cli.choose_grpc_port(parser.parse_args(["--grpc-port", "9000"]).grpc_port, 0) == 9000
    with pytest.raises(SystemExit):
        parser.parse_args(["--grpc-port", "70000"])
    (tmp_path / "models").mkdir()
    result = zygote.run(
        _dlsuite("serve", str(tmp_path / "models"), "--port", "0", "--grpc-port", str(served.grpc_port)),
        env=_environment(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"cannot listen for gRPC on 127.0.0.1:{served.grpc_port}" in result.stderr
    assert "--grpc-port" in result.stderr


def test_grpc_off_serves_rest_alone(tmp_path):
    models = tmp_path / "models"
    _export_keras_model(models / KERAS_MODEL, 1, 1.0)
    process = zygote.Popen(_dlsuite("serve", str(models), "--port", "0", "--grpc-port", "off"),
                               env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = Server(process)
    try:
        server.wait_ready(timeout=120)
        assert "gRPC" not in server.output()
    finally:
        process.terminate()
        process.wait(timeout=20)
    _wait_for(lambda: "serve: stopped" in server.output(), timeout=10, what="the stop line", server=server)
