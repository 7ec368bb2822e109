"""`dlsuite serve --model-config-file` (issue #26 item 3): TensorFlow Serving's ModelServerConfig.

The parsing is tested on its own; then one real server for the module
(`served`) reads a config of two models, each a tiny SavedModel in several
versions whose output is `x * version`, so an answer says which version gave it:

* `scaler`: versions 1, 2, 3 on disk, `specific { versions: 1 versions: 3 }`,
  labels stable -> 1 and canary -> 3;
* `doubler`: versions 1, 2 on disk, `specific { versions: 2 versions: 7 }`
  (7 is missing: a warning line at start-up, version 2 served).

The labels are swapped in the file and the server is sent SIGHUP; a second,
smaller server re-reads its file every second.
"""

import re
import signal
import subprocess

import grpc
import numpy as np
import pytest
import tensorflow as tf
import zygote
from tensorflow_serving.apis import (get_model_status_pb2, model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

from dlsuite.apps.core.errors import UsageError
from dlsuite.apps.serve import model_config
from test_serve import Server, _browser, _dlsuite, _environment, _wait_for, call, stop

POLL_SECONDS = 0.3


class _Scale(tf.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = tf.Variable(scale)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
    def serve(self, x):
        return {"y": x * self.scale}


def _write_versions(folder, versions):
    """folder/N/ for each N: a SavedModel whose serving_default is y = x * N (x: float32 [None])."""
    for version in versions:
        module = _Scale(float(version))
        tf.saved_model.save(module, str(folder / str(version)), signatures={"serving_default": module.serve})


CONFIG = """
model_config_list {
  config {
    name: "scaler"
    base_path: "models/scaler"
    model_platform: "tensorflow"
    model_version_policy { specific { versions: 1 versions: 3 } }
    version_labels { key: "stable" value: %(stable)d }
    version_labels { key: "canary" value: %(canary)d }
  }
  config {
    name: "doubler"
    base_path: "%(doubler)s"
    model_version_policy { specific { versions: 2 versions: 7 } }
  }
}
"""


# -- parsing -------------------------------------------------------------------------------------------


def test_a_good_file_gives_each_models_path_policy_and_labels(tmp_path):
    (tmp_path / "models" / "scaler").mkdir(parents=True)
    (tmp_path / "doubler").mkdir()
    path = tmp_path / "models.config"
    path.write_text(CONFIG % {"stable": 1, "canary": 3, "doubler": tmp_path / "doubler"})
    scaler, doubler = model_config.read(path)
    assert scaler == model_config.ModelConfig(
        name="scaler", base_path=tmp_path / "models" / "scaler",  # relative to the file's folder
        policy=model_config.Policy(kind="specific", versions=(1, 3)), labels=(("canary", 3), ("stable", 1)))
    assert (doubler.name, doubler.base_path, doubler.labels) == ("doubler", tmp_path / "doubler", ())
    # No policy is TensorFlow Serving's default, the latest version; latest N and all.
    text = 'model_config_list { config { name: "a" base_path: "%s" %s } }'
    for policy, expected in [("", model_config.Policy("latest", 1)),
                             ("model_version_policy { latest { num_versions: 2 } }", model_config.Policy("latest", 2)),
                             ("model_version_policy { all {} }", model_config.Policy("all"))]:
        assert model_config.parse(text % (tmp_path / "doubler", policy), path=path)[0].policy == expected


@pytest.mark.parametrize("policy, found, selected", [
    (model_config.Policy("latest", 1), [1, 2, 3], [3]),
    (model_config.Policy("latest", 2), [3, 1, 2], [2, 3]),
    (model_config.Policy("latest", 5), [1, 2], [1, 2]),
    (model_config.Policy("all"), [1, 3], [1, 3]),
    (model_config.Policy("specific", versions=(1, 3, 9)), [1, 2, 3], [1, 3]),
    (model_config.Policy("latest", 1), [], []),
])
def test_a_policy_selects_the_version_folders_tensorflow_serving_would(policy, found, selected):
    assert model_config.select(policy, found) == selected


@pytest.mark.parametrize("text, message", [
    ('model_config_list {\n  config {\n    name: "a"\n    base_path "x"\n', r"line 4 column 15: "),
    ('model_config_list { config { name: "a" model_version_policy { newest {} } } }',
     r'line 1 column 63: Message type ".*ServableVersionPolicy" has no field named "newest"'),
    ('model_config_list { config { name: "a" model_version_policy { specific { versions: "x" } } } }',
     r"line 1 column \d+: Couldn't parse integer"),
    ('model_config_list { config { name: "a" base_path: "missing" } }', r"model 'a': could not find base path "),
    ('model_config_list { config { name: "a" } }', r"model 'a': base_path is missing"),
    ('model_config_list { config { name: "a" base_path: "." model_platform: "onnx" } }', r"model_platform 'onnx'"),
    ('model_config_list { config { name: "a" base_path: "." } config { name: "a" base_path: "." } }',
     r"configured twice"),
    ('model_config_list { config { name: "a" base_path: "." model_version_policy { specific {} } } }',
     r"lists no versions"),
])
def test_a_bad_file_is_one_line_naming_the_file_and_where(tmp_path, text, message):
    path = tmp_path / "models.config"
    path.write_text(text)
    with pytest.raises(UsageError) as caught:
        model_config.read(path)
    line = str(caught.value)
    assert line.startswith(f"model_config_file {path}: ") and "\n" not in line
    assert re.search(message, line), line


def test_a_bad_file_exits_2_before_anything_loads(tmp_path, capsys):
    from dlsuite.apps import cli

    path = tmp_path / "models.config"
    path.write_text('model_config_list { config { name: "a" model_version_policy { newest {} } } }')
    assert cli.main(["serve", "--model-config-file", str(path), "--port", "0"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"dlsuite: error: --model-config-file {path}: line 1 column 63: ")
    assert error.count("\n") == 1
    assert cli.main(["serve", str(tmp_path), "--model-config-file", str(path)]) == 2
    assert "without EXPORT_DIR" in capsys.readouterr().err


# -- a real server -------------------------------------------------------------------------------------


def _start(root, config, *extra):
    process = zygote.Popen(
        _dlsuite("serve", "--model-config-file", str(config), "--port", "0", "--grpc-port", "0",
                 "--poll-seconds", str(POLL_SECONDS), *extra),
        cwd=root, env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return Server(process)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_config")
    _write_versions(root / "models" / "scaler", [1, 2, 3])
    _write_versions(root / "doubler", [1, 2])
    config = root / "models.config"
    config.write_text(CONFIG % {"stable": 1, "canary": 3, "doubler": root / "doubler"})
    server = _start(root, config)
    channel = None
    try:
        server.wait_ready(timeout=120, names=["scaler", "doubler"])
        _wait_for(lambda: [version["state"] for version in call(server, "/v1/models/scaler")[1]["model_version_status"]]
                  == ["AVAILABLE", "AVAILABLE"], timeout=30, what="both versions of scaler", server=server)
        server.grpc_port = int(re.search(r"gRPC API: 127\.0\.0\.1:(\d+)\)", server.output()).group(1))
        channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        server.predictions = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        server.models = model_service_pb2_grpc.ModelServiceStub(channel)
        server.root, server.config = root, config
        yield server
    finally:
        if channel is not None:
            channel.close()
        stop(server.process)


def _rest(server, path):
    """y of x = [1.0] from POST path:predict, and the status."""
    status, answer = call(server, f"{path}:predict", {"instances": [1.0]})
    return status, (answer["predictions"][0] if status == 200 else answer)


def _grpc(server, model, **choice):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    if "label" in choice:
        request.model_spec.version_label = choice["label"]
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([1.0], np.float32)))
    response = server.predictions.Predict(request, timeout=30)
    return float(tf.make_ndarray(response.outputs["y"])[0]), response.model_spec.version.value


def test_the_policy_decides_which_versions_are_served(served):
    status, answer = call(served, "/v1/models/scaler")
    assert status == 200 and [entry["version"] for entry in answer["model_version_status"]] == ["3", "1"]
    assert [entry["version"] for entry in call(served, "/v1/models/doubler")[1]["model_version_status"]] == ["2"]
    assert _rest(served, "/v1/models/scaler/versions/2")[0] == 404
    assert _rest(served, "/v1/models/scaler") == (200, 3.0)  # no version: the highest served


def test_a_missing_version_of_the_policy_is_one_warning_line_at_start_up(served):
    lines = [line for line in served.lines if "version 7 of model doubler" in line]
    assert lines == [f"serve: warning: version 7 of model doubler, which its specific version policy names, was not "
                     f"found in {served.root / 'doubler'}; serving 2"], served.output()
    start = next(index for index, line in enumerate(served.lines) if " on http://" in line)
    assert served.lines.index(lines[0]) < start


def test_labels_answer_on_rest_from_the_version_they_name(served):
    assert _rest(served, "/v1/models/scaler/labels/canary") == (200, 3.0)
    assert _rest(served, "/v1/models/scaler/labels/stable") == (200, 1.0)
    status, answer = call(served, "/v1/models/scaler/labels/stable/metadata")
    assert status == 200 and answer["model_spec"]["version"] == "1"
    status, answer = call(served, "/v1/models/scaler/labels/canary")
    assert status == 200 and [entry["version"] for entry in answer["model_version_status"]] == ["3"]
    assert _rest(served, "/v1/models/scaler/labels/nope") == (400, {
        "error": "Unrecognized servable version label: nope"})
    assert _rest(served, "/v1/models/doubler/labels/stable")[0] == 400  # labels belong to their model


def test_labels_answer_on_grpc_from_the_version_they_name(served):
    assert _grpc(served, "scaler", label="canary") == (3.0, 3)
    assert _grpc(served, "scaler", label="stable") == (1.0, 1)
    with pytest.raises(grpc.RpcError) as caught:
        _grpc(served, "scaler", label="nope")
    assert (caught.value.code(), caught.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                             "Unrecognized servable version label: nope")
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "scaler"
    request.model_spec.version_label = "stable"
    answer = served.models.GetModelStatus(request, timeout=30)
    assert [status.version for status in answer.model_version_status] == [1]


def test_the_models_listing_shows_versions_and_labels(served):
    models = {model["name"]: model for model in call(served, "/dlsuite/models")[1]["models"]}
    assert models["scaler"]["versions"] == [3, 1] and models["scaler"]["labels"] == {"canary": 3, "stable": 1}
    assert models["doubler"]["versions"] == [2] and models["doubler"]["labels"] == {}
    page = call(served, "/")[1]  # the page's version menu lists the labels and calls /labels/LABEL:predict
    assert "m.labels" in page and '"/labels/"' in page


def test_the_pages_version_menu_offers_the_labels(served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser = _browser(tmp_path)
    try:
        browser.get(f"http://127.0.0.1:{served.port}/")
        WebDriverWait(browser, 20).until(lambda b: "scaler" in b.find_element(By.ID, "model").text)
        Select(browser.find_element(By.ID, "model")).select_by_visible_text("scaler")
        browser.execute_script("document.getElementById('model').dispatchEvent(new Event('change'))")
        menu = Select(browser.find_element(By.ID, "version"))
        assert [option.text for option in menu.options] == [
            "3 (canary)", "1 (stable)", "label canary (version 3)", "label stable (version 1)"]
        menu.select_by_value("label:canary")
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 20).until(lambda b: b.find_element(By.ID, "status").text.startswith("200"))
        assert browser.find_element(By.ID, "request").text.startswith("POST /v1/models/scaler/labels/canary:predict")
    finally:
        browser.quit()


def test_sighup_rereads_the_file_and_a_bad_file_keeps_the_config(served):
    served.config.write_text("model_config_list { config { name: \"scaler\" ")  # cut short
    served.process.send_signal(signal.SIGHUP)
    _wait_for(lambda: any("cannot re-read the model config (SIGHUP)" in line for line in served.lines), timeout=20,
              what="the bad file's line", server=served)
    line = next(line for line in served.lines if "cannot re-read the model config" in line)
    assert f"--model-config-file {served.config}" in line or f"model_config_file {served.config}" in line
    assert line.endswith("keeping the previous config")
    assert _rest(served, "/v1/models/scaler/labels/canary") == (200, 3.0)
    # Labels swapped: canary now answers from version 1, without a restart.
    served.config.write_text(CONFIG % {"stable": 3, "canary": 1, "doubler": served.root / "doubler"})
    served.process.send_signal(signal.SIGHUP)
    _wait_for(lambda: _rest(served, "/v1/models/scaler/labels/canary") == (200, 1.0), timeout=20,
              what="the swapped labels", server=served)
    assert _rest(served, "/v1/models/scaler/labels/stable") == (200, 3.0)
    assert _grpc(served, "scaler", label="canary") == (1.0, 1)
    assert served.process.poll() is None


def test_a_polled_file_adds_and_removes_models_and_changes_policies(tmp_path):
    _write_versions(tmp_path / "a", [1, 2])
    _write_versions(tmp_path / "b", [1])
    config = tmp_path / "models.config"
    config.write_text('model_config_list { config { name: "a" base_path: "a" } }')  # latest 1
    server = _start(tmp_path, config, "--model-config-file-poll-wait-seconds", "1")
    try:
        server.wait_ready(timeout=120, names=["a"])
        assert [entry["version"] for entry in call(server, "/v1/models/a")[1]["model_version_status"]] == ["2"]
        config.write_text('model_config_list { config { name: "a" base_path: "a" model_version_policy { all {} } } '
                          'config { name: "b" base_path: "b" version_labels { key: "stable" value: 1 } } }')
        _wait_for(lambda: _rest(server, "/v1/models/b/labels/stable") == (200, 1.0), timeout=20,
                  what="model b from the polled file", server=server)
        _wait_for(lambda: len(call(server, "/v1/models/a")[1].get("model_version_status", [])) == 2, timeout=20,
                  what="both versions of a under the all policy", server=server)
        config.write_text('model_config_list { config { name: "b" base_path: "b" } }')
        _wait_for(lambda: call(server, "/v1/models/a")[0] == 404, timeout=20, what="model a to go", server=server)
        assert re.search(r"^serve: model config .* re-read \(poll\): 1 model \(b\)$", server.output(), re.MULTILINE)
        assert _rest(server, "/v1/models/b/labels/stable")[0] == 400  # its labels went with the old file
        assert server.process.poll() is None
    finally:
        stop(server.process)
