"""Tests for dlsuite.apps.core.distribute: strategy choice and the custom training loop.

The multi-worker test starts two worker processes on 127.0.0.1 and a
single-process reference (`multiworker_worker.py`); all three must end with the
same weights.
"""

import json
import os
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import zygote
from dlsuite.apps.core.errors import UsageError
from dlsuite.apps.core.distribute import STRATEGIES, is_chief, make_strategy, needs_custom_loop, worker_dir
from dlsuite.apps.core.loop_parts import NonFiniteLoss
from dlsuite.apps.core.multi_worker import train_custom_loop

WORKER_SCRIPT = os.path.join(os.path.dirname(__file__), "multiworker_worker.py")
WORKER_TIMEOUT_S = 100
LOG_KEYS = ["loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"]


# --- make_strategy ---------------------------------------------------------

# (name, expected class, replicas on a CPU-only machine)
LOCAL_STRATEGIES = [
    ("default", type(tf.distribute.get_strategy()), 1),
    ("one-device", tf.distribute.OneDeviceStrategy, 1),
    ("mirrored", tf.distribute.MirroredStrategy, 1),
]


@pytest.mark.parametrize("name, expected_class, replicas", LOCAL_STRATEGIES)
def test_make_strategy_local(name, expected_class, replicas):
    strategy = make_strategy(name)
    assert type(strategy) is expected_class
    assert strategy.num_replicas_in_sync == replicas
    assert not needs_custom_loop(strategy)
    assert is_chief(strategy)


def test_auto_without_accelerators_is_default(monkeypatch):
    for variable in ("TPU_NAME", "COLAB_TPU_ADDR", "KUBE_GOOGLE_CLOUD_TPU_ENDPOINTS"):
        monkeypatch.delenv(variable, raising=False)
    assert make_strategy("auto") is tf.distribute.get_strategy()


def test_unknown_strategy_lists_the_known_ones():
    with pytest.raises(UsageError, match="unknown strategy 'horovod'; choose one of: auto, default") as error:
        make_strategy("horovod")
    assert all(name in str(error.value) for name in STRATEGIES)


# (TF_CONFIG, words the message must contain); each message shows an example.
BAD_TF_CONFIGS = [
    (None, "needs the TF_CONFIG environment variable"),
    ("", "needs the TF_CONFIG environment variable"),
    ("{cluster", "TF_CONFIG is not valid JSON"),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}}', "needs a 'cluster' and a 'task'"),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "ps", "index": 0}}', "must be 'chief' or 'worker'"),
    ('{"cluster": {"worker": "127.0.0.1:1"}, "task": {"type": "worker", "index": 0}}', "list of 'host:port'"),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 1}}', "index must be 0..0"),
]


@pytest.mark.parametrize("tf_config, message", BAD_TF_CONFIGS)
def test_multi_worker_needs_a_valid_tf_config(monkeypatch, tf_config, message):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(UsageError, match=message) as error:
        make_strategy("multi-worker")
    assert '{"cluster": {"worker": ["host1:12345", "host2:12345"]}' in str(error.value)


def test_tpu_unreachable_is_a_usage_error():
    address = f"grpc://127.0.0.1:{_free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(UsageError, match="no TPU was reachable at grpc://127.0.0.1"):
        make_strategy("tpu", tpu_address=address)
    assert time.monotonic() - started < 30


def test_worker_dir_is_the_path_on_the_chief(tmp_path):
    assert worker_dir(str(tmp_path / "run"), tf.distribute.get_strategy()) == str(tmp_path / "run")


# --- train_custom_loop on one process ---------------------------------------


def _separable_data(num_examples=512, features=4, classes=3, seed=0):
    rng = np.random.RandomState(seed)
    centers = rng.normal(size=(classes, features)).astype("float32") * 4
    y = rng.randint(0, classes, size=num_examples).astype("int32")
    x = centers[y] + rng.normal(size=(num_examples, features)).astype("float32")
    return x, y


def _train(strategy_name="default", *, learning_rate=0.05, epochs=3, batch_size=32, **kwargs):
    strategy = make_strategy(strategy_name)
    x, y = _separable_data()
    train = tf.data.Dataset.from_tensor_slices((x[:400], y[:400])).batch(batch_size)
    validation = tf.data.Dataset.from_tensor_slices((x[400:], y[400:])).batch(batch_size)
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)])
        optimizer = keras.optimizers.SGD(learning_rate=learning_rate, momentum=0.9)
    kwargs.setdefault("validation_dataset", validation)
    history = train_custom_loop(
        strategy=strategy,
        model=model,
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        train_dataset=kwargs.pop("train_dataset", train),
        epochs=epochs,
        global_batch_size=batch_size,
        verbose=kwargs.pop("verbose", False),
        **kwargs,
    )
    return history, model, optimizer


@pytest.mark.parametrize("strategy_name", ["default", "one-device", "mirrored"])
def test_custom_loop_learns_separable_data(strategy_name):
    seen = []
    history, _, _ = _train(strategy_name, on_epoch_end=lambda epoch, logs: seen.append((epoch, logs)))
    assert list(history) == LOG_KEYS
    assert all(len(values) == 3 for values in history.values())
    assert history["accuracy"][-1] > 0.9 and history["val_accuracy"][-1] > 0.9
    assert history["loss"][-1] < history["loss"][0]
    assert history["learning_rate"] == pytest.approx([0.05] * 3)
    assert [epoch for epoch, _ in seen] == [0, 1, 2]
    assert all(isinstance(value, float) for value in seen[-1][1].values())


def test_custom_loop_resumes_at_initial_epoch_and_prints_progress(capsys):
    history, _, optimizer = _train(initial_epoch=2, epochs=4, verbose=True)
    assert len(history["loss"]) == 2
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" - ")[0] for line in lines] == ["Epoch 3/4", "Epoch 4/4"]
    assert "val_accuracy: " in lines[-1]
    assert int(optimizer.iterations) == 2 * 13  # 400 examples / 32: 13 steps per epoch


def test_custom_loop_stops_when_on_epoch_end_says_so():
    history, _, _ = _train(epochs=5, on_epoch_end=lambda epoch, logs: epoch == 1)
    assert len(history["loss"]) == 2


def test_custom_loop_steps_per_epoch_on_a_repeated_dataset():
    x, y = _separable_data(num_examples=64)
    repeated = tf.data.Dataset.from_tensor_slices((x, y)).batch(16).repeat()
    history, _, optimizer = _train(train_dataset=repeated, steps_per_epoch=5, epochs=2, validation_dataset=None)
    assert list(history) == ["loss", "accuracy", "learning_rate"]
    assert int(optimizer.iterations) == 10


def test_custom_loop_refuses_an_endless_epoch():
    x, y = _separable_data(num_examples=64)
    repeated = tf.data.Dataset.from_tensor_slices((x, y)).batch(16).repeat()
    with pytest.raises(ValueError, match="repeats forever: pass steps_per_epoch"):
        _train(train_dataset=repeated)


def test_custom_loop_reports_a_nan_loss():
    with pytest.raises(NonFiniteLoss, match="the loss became nan at epoch 1, batch ") as error:
        _train(learning_rate=1e9, epochs=2)
    assert isinstance(error.value, UsageError)
    assert error.value.epoch == 0 and error.value.history == {}


def test_custom_loop_refuses_a_model_built_outside_the_scope():
    strategy = tf.distribute.MirroredStrategy()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    with strategy.scope():
        optimizer = keras.optimizers.SGD()
    with pytest.raises(ValueError, match="not created inside strategy.scope()"):
        train_custom_loop(
            strategy=strategy,
            model=model,
            optimizer=optimizer,
            loss="sparse_categorical_crossentropy",
            train_dataset=tf.data.Dataset.from_tensor_slices((np.zeros((4, 4)), np.zeros(4))).batch(2),
            epochs=1,
            global_batch_size=2,
        )


# (loss, label form, output units): the accuracy follows the labels' form.
LABEL_FORMS = [
    ("sparse_categorical_crossentropy", "sparse", 3),
    (keras.losses.CategoricalCrossentropy(from_logits=True), "one-hot", 3),
    (keras.losses.BinaryCrossentropy(from_logits=True), "binary", 1),
]


@pytest.mark.parametrize("loss, labels, units", LABEL_FORMS)
def test_custom_loop_accuracy_for_each_label_form(loss, labels, units):
    x, y = _separable_data(num_examples=256, classes=2 if labels == "binary" else 3)
    y = {"sparse": y, "one-hot": np.eye(3, dtype="float32")[y], "binary": y[:, None].astype("float32")}[labels]
    strategy = tf.distribute.get_strategy()
    activation = "softmax" if isinstance(loss, str) else None  # the named loss expects probabilities
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(units, activation=activation)])
    history = train_custom_loop(
        strategy=strategy,
        model=model,
        optimizer=keras.optimizers.Adam(0.05),
        loss=loss,
        train_dataset=tf.data.Dataset.from_tensor_slices((x, y)).batch(32),
        epochs=3,
        global_batch_size=32,
        verbose=False,
    )
    assert history["accuracy"][-1] > 0.9


def test_custom_loop_uses_the_optimizer_schedule_decay_and_clipping():
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([13], [0.01, 0.001])
    strategy = tf.distribute.get_strategy()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=0.1, clipnorm=1.0)
    x, y = _separable_data(num_examples=400)
    history = train_custom_loop(
        strategy=strategy,
        model=model,
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        train_dataset=tf.data.Dataset.from_tensor_slices((x, y)).batch(32),
        epochs=2,
        global_batch_size=32,
        verbose=False,
    )
    # The schedule read after each epoch: steps 13 (still the first piece) and 26.
    assert history["learning_rate"] == pytest.approx([0.01, 0.001])
    assert int(optimizer.iterations) == 26
    assert "_all_reduce_sum_gradients" not in vars(optimizer)  # the loop's override is gone


# --- two workers -------------------------------------------------------------


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker_env(tf_config):
    env = {
        key: value
        for key, value in os.environ.items()
        # gRPC honours proxy variables; the workers must talk to 127.0.0.1 directly.
        if key.lower() not in ("http_proxy", "https_proxy", "all_proxy", "grpc_proxy", "tf_config")
    }
    env.update(CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2", no_proxy="127.0.0.1,localhost")
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return env


def _run_all(commands, tmp_path):
    """Runs (name, argv, env) processes at once; kills them all on failure or timeout."""
    processes, logs = {}, {}
    try:
        for name, argv, env in commands:
            logs[name] = open(tmp_path / f"{name}.log", "w+")
            processes[name] = zygote.Popen(argv, env=env, stdout=logs[name], stderr=subprocess.STDOUT)
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        for name, process in processes.items():
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} still running after {WORKER_TIMEOUT_S}s:\n{_tail(logs[name])}")
            if process.returncode != 0:
                pytest.fail(f"{name} exited with {process.returncode}:\n{_tail(logs[name])}")
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
        for log in logs.values():
            log.close()


def _tail(log, lines=30):
    log.flush()
    log.seek(0)
    return "".join(log.readlines()[-lines:])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Trains the worker script's model four ways at once; {name: saved arrays}.

    worker0, worker1: two MultiWorkerMirroredStrategy workers on 127.0.0.1;
    reference: one process, default strategy; mirrored: MirroredStrategy with
    two replicas on two logical CPUs.
    """
    tmp_path = tmp_path_factory.mktemp("distribute")
    cluster = {"worker": [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]}

    def command(name, strategy, tf_config=None):
        argv = [sys.executable, WORKER_SCRIPT, "--strategy", strategy, "--out", str(tmp_path / f"{name}.npz")]
        return name, argv, _worker_env(tf_config)

    _run_all(
        [
            command(f"worker{index}", "multi-worker", {"cluster": cluster, "task": {"type": "worker", "index": index}})
            for index in range(2)
        ]
        + [command("reference", "default"), command("mirrored", "two-cpu-mirrored")],
        tmp_path,
    )
    results = {name: dict(np.load(tmp_path / f"{name}.npz")) for name in ("worker0", "worker1", "reference", "mirrored")}
    results["tmp_path"] = tmp_path
    return results


def _weights(arrays):
    return [arrays[f"arr_{index}"] for index in range(sum(key.startswith("arr_") for key in arrays))]


def _assert_matches_reference(arrays, reference):
    for weights, reference_weights in zip(_weights(arrays), _weights(reference), strict=True):
        np.testing.assert_allclose(weights, reference_weights, rtol=1e-4, atol=1e-5)
    history, reference_history = json.loads(str(arrays["history"])), json.loads(str(reference["history"]))
    for key in LOG_KEYS:
        np.testing.assert_allclose(history[key], reference_history[key], rtol=1e-4)


def test_two_workers_train_in_sync_and_match_one_process(trained):
    worker0, worker1 = trained["worker0"], trained["worker1"]
    assert int(worker0["replicas"]) == int(worker1["replicas"]) == 2
    assert bool(worker0["custom_loop"]) and bool(worker1["custom_loop"])
    assert bool(worker0["chief"]) and not bool(worker1["chief"])
    assert str(worker0["run_dir"]) == str(trained["tmp_path"] / "run")
    assert str(worker1["run_dir"]) == str(trained["tmp_path"] / "workertemp_1" / "run")
    assert os.path.isdir(str(worker1["run_dir"]))
    for w0, w1 in zip(_weights(worker0), _weights(worker1), strict=True):
        np.testing.assert_array_equal(w0, w1)
    # The logs are reduced over the workers: the same on both.
    assert json.loads(str(worker0["history"])) == json.loads(str(worker1["history"]))
    _assert_matches_reference(worker0, trained["reference"])


def test_two_mirrored_replicas_match_one_process(trained):
    assert int(trained["mirrored"]["replicas"]) == 2
    _assert_matches_reference(trained["mirrored"], trained["reference"])
