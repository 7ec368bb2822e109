"""SavedModels and .keras files given by the user (#15): the denylist scan that
`saved_model_cli scan` does, `trust_model`, one-line errors for damaged files,
and Keras's safe mode kept on for .keras files."""

import json
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow.python.tools import saved_model_cli

from dlsuite.apps.core import keras_files, saved_models
from dlsuite.apps.core.errors import UsageError
from dlsuite.apps.serve import repository
from dlsuite.apps.vision import datasets, export


def _writer(path, target):
    """A SavedModel whose signature writes `target` when called."""
    module = tf.Module()

    @tf.function(input_signature=[tf.TensorSpec((), tf.string)])
    def serve(text):
        tf.io.write_file(str(target), text)
        return {"echo": text}

    module.serve = serve
    tf.saved_model.save(module, str(path), signatures={"serving_default": serve})
    return path


def _plain(path):
    """A harmless float SavedModel: y = 2x."""
    module = tf.Module()
    module.scale = tf.Variable(2.0)
    module.serve = tf.function(lambda x: {"y": module.scale * x}, input_signature=[tf.TensorSpec((None, 3))])
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved_models")
    return {"root": root, "writer": _writer(root / "writer" / "1", root / "written.txt"),
            "plain": _plain(root / "plain" / "1")}


def test_the_denylist_is_saved_model_clis():
    assert saved_models.DENYLIST == saved_model_cli._OP_DENYLIST


def test_an_op_inside_a_function_is_found_and_refused_without_running(models):
    proto = saved_models.read(models["writer"])
    assert saved_models.denylisted_ops(proto) == ["WriteFile"]
    with pytest.raises(UsageError, match=r"saved_model.pb runs WriteFile: .* pass trust_model") as raised:
        saved_models.load(models["writer"])
    assert raised.value.option == ("trust_model",)
    assert not (models["root"] / "written.txt").exists()


def test_trust_model_loads_it_and_its_signature_does_what_it_says(models):
    loaded = saved_models.load(models["writer"], trust_model=True, signatures=("serving_default",))
    loaded.signatures["serving_default"](text=tf.constant("hello"))
    assert (models["root"] / "written.txt").read_text() == "hello"
    (models["root"] / "written.txt").unlink()


def test_ops_in_the_graph_def_itself_are_found_too(models, tmp_path):
    """A TF1-style graph keeps its ops in graph_def.node, not in a function."""
    proto = saved_models.read(models["plain"])
    assert saved_models.denylisted_ops(proto) == []
    proto.meta_graphs[0].graph_def.node.add(name="leak", op="PrintV2")
    shutil.copytree(models["plain"], tmp_path / "1")
    (tmp_path / "1" / "saved_model.pb").write_bytes(proto.SerializeToString())
    with pytest.raises(UsageError, match="runs PrintV2"):
        saved_models.check(tmp_path / "1")


def test_an_op_this_tensorflow_lacks_is_named(models, tmp_path):
    proto = saved_models.read(models["plain"])
    function = proto.meta_graphs[0].graph_def.library.function[0]
    function.node_def[0].op = "MadeUpOp"
    shutil.copytree(models["plain"], tmp_path / "1")
    (tmp_path / "1" / "saved_model.pb").write_bytes(proto.SerializeToString())
    with pytest.raises(UsageError, match=r"operations this TensorFlow does not have \(MadeUpOp\)"):
        saved_models.check(tmp_path / "1")


@pytest.mark.parametrize("damage, message", [
    (lambda folder: (folder / "saved_model.pb").write_bytes(b"\x0bgarbage\xff" * 9), "is not a SavedModel graph"),
    (lambda folder: (folder / "saved_model.pb").write_bytes(b""), "holds no MetaGraph"),
    (lambda folder: (folder / "saved_model.pb").unlink(), "is not a SavedModel .it holds no saved_model.pb"),
    (lambda folder: shutil.rmtree(folder / "variables"), "has no variables/ folder"),
    (lambda folder: (folder / "variables" / "variables.index").write_bytes(b"x"), "cannot read the variables"),
    (lambda folder: [path.write_bytes(path.read_bytes()[:3]) for path in (folder / "variables").glob("*.data-*")],
     "cannot read the variables"),
])
def test_a_damaged_saved_model_is_one_usage_error_naming_it(models, tmp_path, damage, message):
    folder = tmp_path / "1"
    shutil.copytree(models["plain"], folder)
    damage(folder)
    with pytest.raises(UsageError, match=message) as raised:
        saved_models.load(folder)
    assert str(folder) in str(raised.value)
    if message == "cannot read the variables":  # found without loading too, as a search's check does
        with pytest.raises(UsageError, match=message):
            saved_models.check_variables(folder)


def test_a_missing_signature_is_named_before_loading(models):
    with pytest.raises(UsageError, match=r"lacks the signatures caption \(it has: serving_default\)"):
        saved_models.check(models["plain"], signatures=("serving_default", "caption"))


def test_our_classifier_export_passes_the_scan(tmp_path):
    inputs = keras.Input((8, 8, 1))
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(inputs))
    path = export.export_classifier(keras.Model(inputs, outputs), class_names=["a", "b"], name="m", base_dir=tmp_path)
    assert saved_models.denylisted_ops(saved_models.read(path)) == []
    saved_models.check(path, signatures=export.SIGNATURES)  # and every op is a registered one


def test_serve_refuses_an_untrusted_version_naming_the_flag_and_serves_it_when_trusted(models):
    with pytest.raises(UsageError, match="runs WriteFile.*pass --trust-model"):
        repository.load_version("writer", 1, models["writer"])
    version = repository.load_version("writer", 1, models["writer"], trust_model=True)
    assert set(version.signatures) == {"serving_default"}


def test_a_repository_keeps_an_untrusted_version_out_and_says_why(models):
    lines = []
    served = repository.Repository(models={"writer": models["writer"].parent}, poll_seconds=0.01, log=lines.append)
    served.scan()
    status = served.status("writer")
    assert status[0]["state"] == "END" and status[0]["status"]["error_code"] == "FAILED_PRECONDITION"
    assert "--trust-model" in status[0]["status"]["error_message"]
    assert "cannot load writer version 1" in lines[0]


# --- .keras files: Keras's safe mode stays on ---------------------------------------------


def test_a_lambda_layer_is_refused_before_and_by_keras_safe_mode(tmp_path):
    path = tmp_path / "lambda.keras"
    keras.Sequential([keras.Input((3,)), keras.layers.Lambda(lambda x: x * 2)]).save(path)
    with pytest.raises(UsageError, match="Lambda layer whose function is Python bytecode"):
        keras_files.check(path)
    with pytest.raises(ValueError, match="arbitrary code execution"):  # what load relies on behind the pre-check
        keras.saving.load_model(path, safe_mode=True)


def test_a_tfsm_layer_is_refused(models, tmp_path):
    path = tmp_path / "tfsm.keras"
    inputs = keras.Input((3,))
    outputs = keras.layers.TFSMLayer(str(models["plain"]), call_endpoint="serving_default")(inputs)
    keras.Model(inputs, outputs).save(path)
    with pytest.raises(UsageError, match="TFSMLayer"):
        keras_files.load(path)
    with pytest.raises(ValueError, match="arbitrary code execution"):
        keras.saving.load_model(path, safe_mode=True)


def test_a_damaged_keras_file_is_one_usage_error(tmp_path):
    path = tmp_path / "m.keras"
    keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="dense")]).save(path)
    model = keras_files.load(path)
    assert model.get_layer("dense").input is not None  # a Sequential comes back functional
    whole = path.read_bytes()
    for name, contents, message in (("truncated", whole[: len(whole) // 2], "not a zip archive"),
                                    ("text", b"hello", "not a zip archive")):
        (tmp_path / f"{name}.keras").write_bytes(contents)
        with pytest.raises(UsageError, match=message):
            keras_files.load(tmp_path / f"{name}.keras")
    with pytest.raises(UsageError, match="is a folder"):
        keras_files.load(tmp_path)


# --- file names that are not UTF-8 --------------------------------------------------------


def test_an_image_whose_name_is_not_utf8_is_skipped_and_named(tmp_path):
    for name in ("a", "b"):
        for i in range(10):
            (tmp_path / name).mkdir(exist_ok=True)
            Image.fromarray(np.full((8, 8), 25 * i, np.uint8)).save(tmp_path / name / f"{i}.png")
    bad = os.path.join(os.fsencode(tmp_path / "b"), b"caf\xe9.png")
    shutil.copy(tmp_path / "b" / "0.png", bad)
    data = datasets.load(str(tmp_path), seed=0)
    assert sum(data.sizes.values()) == 20
    [(path, reason)] = data.skipped
    assert os.fsencode(path) == bad and "not UTF-8" in reason
    json.dumps(data.skipped)  # config.json can record it
