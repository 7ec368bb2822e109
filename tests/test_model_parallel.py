"""Model parallelism (models.parallel): the plan `models show --model-parallel`
prints, and a pipeline on logical CPU devices that computes what the
single-device model does, with each stage's variables on its device.

The device checks run in tests/model_parallel_worker.py, a process of its
own: logical devices are made once, before TensorFlow starts, and this
process's TensorFlow may have started already (another test file).
"""

import json
import os
import pathlib
import sys

import pytest

import zygote
from dlsuite.apps import cli

WORKER = pathlib.Path(__file__).with_name("model_parallel_worker.py")


@pytest.fixture(scope="module")
def worker():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = zygote.run([sys.executable, str(WORKER)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["lenet5", "resnet18"])
def test_pipeline_outputs_and_gradients_equal_the_single_device_model(worker, name):
    figures = worker[name]
    assert figures["output_difference"] <= 1e-5 * max(1.0, figures["output_scale"])
    assert figures["loss"][0] == pytest.approx(figures["loss"][1], rel=1e-5)
    assert figures["same_weights"]
    # One SGD step at rate 1 moved every weight by the single-device gradient
    # (lenet5 with L2, whose penalty gradient reaches the first stage directly).
    assert figures["gradient_difference"] <= 1e-4 * figures["gradient_scale"]


@pytest.mark.parametrize("name, stages", [("lenet5", 2), ("resnet18", 3)])
def test_each_stage_variables_and_slots_live_on_its_device(worker, name, stages):
    figures = worker[name]
    assert [stage["device"] for stage in figures["stages"]] == worker["devices"][:stages]
    for index, stage in enumerate(figures["stages"]):
        assert stage["count"] > 0
        assert stage["variables"] == [f"/job:localhost/replica:0/task:0/device:CPU:{index}"]
    slots = figures["slots"]  # {device: [weights, Adam slots]}; the step counter and rate go with the first
    assert sorted(slots) == [f"/job:localhost/replica:0/task:0/device:CPU:{index}" for index in range(stages)]
    for index, (weights, count) in enumerate(slots.values()):
        assert count == 2 * weights + (2 if index == 0 else 0)


def test_more_devices_than_tensorflow_started_with_is_one_line(worker):
    assert "model_parallel 4 needs 4 devices" in worker["too_many"]


def show(capsys, *argv):
    status = cli.main(["models", "show", *argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_models_show_prints_each_device_layers_and_memory(capsys):
    status, out, _ = show(capsys, "vgg16", "--model-parallel", "2")
    assert status in (0, None)
    text = out.split("Model parallel, 2 devices")[1]
    lines = [line for line in text.splitlines() if line.startswith(("0 ", "1 "))]
    assert len(lines) == 2
    # The fully connected layers are a device of their own: most parameters, little activation.
    assert "input .. block5_pool" in lines[0]
    assert "flatten .. predictions" in lines[1] and "123,642,856" in lines[1]
    assert "Largest device" in text


def test_models_show_json_has_the_plan(capsys):
    status, out, _ = show(capsys, "lenet5", "--model-parallel", "3", "--json")
    plan = json.loads(out)["model_parallel"]
    stages = plan["stages"]
    assert len(stages) == 3
    assert stages[0]["first"] == "input" and stages[-1]["last"] == "predictions"
    layers = [layer for stage in stages for layer in stage["layers"]]
    assert layers == [row["name"] for row in json.loads(out)["layers"]]  # each layer once, in order
    assert sum(stage["params"] for stage in stages) == json.loads(out)["params"]
    assert plan["largest"] == max(stage["memory"]["total"] for stage in stages) < plan["single_device"]


@pytest.mark.parametrize("value, message", [
    ("0", "--model-parallel must be an integer >= 1, received 0."),
    ("9", "--model-parallel 9 is more than the 8 layers of lenet5; pass 8 or less."),
])
def test_models_show_refuses_a_stage_count_out_of_range(capsys, value, message):
    status, _, err = show(capsys, "lenet5", "--model-parallel", value)
    assert status == 2
    assert err.strip() == f"dlsuite: error: {message}"


def test_a_model_with_fewer_cut_points_than_stages_is_refused():
    from dlsuite import models
    from dlsuite.models import parallel, summary

    with summary.shapes_only():
        model = models.build("resnet18", input_shape=(32, 32, 3), classes=5)
    cuts = len(parallel.cut_points(model))
    with pytest.raises(ValueError, match=f"can be cut in {cuts + 1} stages at most"):
        parallel.plan(model, cuts + 2)


@pytest.mark.parametrize("flags, message", [
    (["--model-parallel", "0"], "argument --model-parallel: expected a positive integer, received '0'"),
    (["--model-parallel", "2", "--strategy", "mirrored"],
     "--model-parallel 2 places the model on its own devices and cannot be combined with strategy 'mirrored'; "
     "pass --strategy default"),
    (["--model-parallel", "2", "--jit-compile", "on"], "compiles for one device"),
])
def test_classify_train_refuses_bad_model_parallel_before_training(capsys, tmp_path, flags, message):
    status = cli.main(["classify", "train", "--out", str(tmp_path / "run"), "--no-export", *flags])
    assert status == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
