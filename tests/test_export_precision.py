"""What an export's graph computes in (issue 28 item 4, apps/core/export_precision.py).

A model trained under mixed_bfloat16 exports a float32 graph by default, so the
SavedModel runs at full speed on any server; `--export-precision bfloat16` keeps
the bfloat16 graph, and is refused before training when the run will not train
in bfloat16. The signatures take and give what they do in float32 either way.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from dlsuite import models
from dlsuite.apps import cli
from dlsuite.apps.core import export_precision
from dlsuite.apps.core.errors import UsageError

TINY = ["classify", "train", "--dataset", "shapes", "--shapes-size", "32", "--shapes-count", "64",
        "--batch-size", "32", "--epochs", "1", "--model", "lenet5"]


@pytest.fixture
def bfloat16_policy():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    yield
    keras.mixed_precision.set_global_policy("float32")


def _graph_dtypes(version_dir):
    """Every dtype an op of the SavedModel's graph or functions declares."""
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((version_dir / "saved_model.pb").read_bytes())
    graph = saved.meta_graphs[0].graph_def
    nodes = list(graph.node) + [node for function in graph.library.function for node in function.node_def]
    return {tf.dtypes.as_dtype(value.type).name for node in nodes for value in node.attr.values() if value.type}


def _export_dir(run_dir):
    return run_dir.parent / "exports"


def test_a_mixed_model_becomes_a_float32_copy_with_the_same_weights_and_head(bfloat16_policy):
    model = models.build("lstm", vocab_size=20, units=8, layers=2, embedding_dim=4)
    assert export_precision.compute_precision(model) == "bfloat16"
    assert export_precision.in_precision(model, "bfloat16") is model
    copy = export_precision.in_precision(model, "float32")
    assert export_precision.compute_precision(copy) == "float32"
    assert {layer.compute_dtype for layer in copy.layers if layer.weights} == {"float32"}
    for ours, theirs in zip(copy.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(ours, theirs)
    tokens = np.random.default_rng(0).integers(0, 20, (3, 7))
    np.testing.assert_allclose(copy.predict(tokens, verbose=0), model.predict(tokens, verbose=0), atol=0.02)


@keras.saving.register_keras_serializable(package="test_export_precision")
class _Wrapper(keras.layers.Layer):
    """Makes its sublayer without passing its dtype on, as the caption decoder does."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = keras.layers.Dense(3)

    def call(self, x):
        return self.inner(x)


def test_sublayers_a_custom_layer_makes_are_float32_too(bfloat16_policy):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, _Wrapper(name="wrapper")(inputs))
    model.predict(np.zeros((1, 4)), verbose=0)
    assert model.get_layer("wrapper").inner.compute_dtype == "bfloat16"
    copy = export_precision.in_precision(model, "float32")
    assert copy.get_layer("wrapper").inner.compute_dtype == "float32"
    assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"  # the run's policy is left as it was


def test_bfloat16_is_refused_for_a_float32_model():
    model = models.build("lenet5", input_shape=(32, 32, 1), classes=3)
    with pytest.raises(UsageError, match="cannot export 'lenet5' in bfloat16: it computes in float32"):
        export_precision.in_precision(model, "bfloat16")


@pytest.mark.parametrize("precision, graph_has_bfloat16", [("float32", False), ("bfloat16", True)])
def test_a_bfloat16_run_exports_the_graph_asked_for_with_float32_signatures(precision, graph_has_bfloat16, tmp_path):
    run_dir = tmp_path / "run"
    argv = [*TINY, "--mixed-precision", "on", "--out", str(run_dir), "--export-dir", str(tmp_path / "exports"),
            "--export", "shapes", "--export-precision", precision]
    try:
        assert cli.main(argv) == 0
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert json.loads((run_dir / "config.json").read_text())["resolved"]["policy"] == "mixed_bfloat16"
    version = tmp_path / "exports" / "shapes" / "1"
    assert ("bfloat16" in _graph_dtypes(version)) == graph_has_bfloat16
    signature = tf.saved_model.load(str(version)).signatures["serving_default"]
    assert signature.structured_input_signature[1]["images"].dtype == tf.uint8  # pixels, as in every export
    probabilities = signature(images=tf.zeros((2, 32, 32, 3), tf.uint8))["probabilities"]
    assert probabilities.dtype == tf.float32
    np.testing.assert_allclose(probabilities.numpy().sum(axis=1), 1.0, rtol=1e-3)


def test_a_bfloat16_export_of_a_float32_run_is_refused_before_training(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = [*TINY, "--mixed-precision", "off", "--out", str(run_dir), "--export-precision", "bfloat16"]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip().endswith(
        "--export-precision bfloat16 needs a model trained in mixed_bfloat16, and this run trains in float32: pass "
        "--mixed-precision on (bfloat16 on a CPU), or --export-precision float32")
    assert not (run_dir / "model.keras").exists()
