"""Every private Keras and keras-tuner API in dlsuite/models/compat.py,
exercised against the installed versions: when an upgrade moves one, the test
of that API fails and names it, the installed version and the file to update."""

import ast
import importlib.metadata
import pathlib
import types
from concurrent import futures

import keras
import pytest

from dlsuite.models import compat

COMPAT_FILE = "dlsuite/models/compat.py"


def _broken(library, api, error):
    version = importlib.metadata.version(library)
    pytest.fail(f"{library} {version}: {api} moved or changed ({type(error).__name__}: {error}); "
                f"update {COMPAT_FILE}", pytrace=False)


def test_compat_imports_no_keras_tuner_and_no_upper_package():
    tree = ast.parse(pathlib.Path(compat.__file__).read_text())
    top_level = []
    for node in tree.body:  # module level only: the functions import lazily
        if isinstance(node, ast.Import):
            top_level += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            top_level.append(node.module or "")
    assert not [name for name in top_level if name.split(".")[0] == "keras_tuner"], top_level
    for node in ast.walk(tree):
        names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        assert not [n for n in names if n.startswith(("dlsuite.apps", "dlsuite.callbacks"))], names


def test_uninitialized_variable_queue():
    """keras.src.backend.common.global_state "uninitialized_variables"."""
    api = 'keras.src.backend.common.global_state.get_global_attribute("uninitialized_variables")'
    try:
        start = compat.uninitialized_variable_count()
        with keras.StatelessScope(initialize_variables=False):
            layer = keras.layers.Dense(3)
            layer.build((None, 2))
        assert compat.uninitialized_variable_count() == start + 2, "a deferred variable was not queued"
        compat.drop_uninitialized_variables(start)
        assert compat.uninitialized_variable_count() == start, "the queue did not shrink"
        # What summary.shapes_only guards against: the next top-level scope
        # initializes whatever is still queued, and empties the queue.
        with keras.StatelessScope(initialize_variables=False):
            keras.layers.Dense(3).build((None, 2))
        with keras.StatelessScope():
            pass
        assert compat.uninitialized_variable_count() == 0, "closing a StatelessScope did not drain the queue"
    except Exception as error:
        _broken("keras", api, error)


def test_inbound_nodes_of_a_nested_model():
    """keras Operation._inbound_nodes and Node.input_tensors."""
    api = "Operation._inbound_nodes / Node.input_tensors"
    try:
        inner_input = keras.Input((4,))
        inner = keras.Model(inner_input, keras.layers.Dense(2, activation="relu")(inner_input))
        lone = keras.layers.Dense(2)
        assert compat.inbound_node_count(inner) == 0 and compat.inbound_node_count(lone) == 0
        outer_input = keras.Input((4,))
        keras.Model(outer_input, inner(outer_input))
        assert compat.inbound_node_count(inner) == 1, "calling the model did not add one inbound node"
        inputs = compat.first_call_inputs(inner)
        assert len(inputs) == 1 and inputs[0] is outer_input, f"first call inputs {inputs}, not the outer Input"
        with pytest.raises(ValueError, match="never called"):
            compat.first_call_inputs(lone)
    except Exception as error:
        _broken("keras", api, error)


def _tuner(tmp_path, built):
    import keras_tuner

    class Declares:
        def declare_space(self):
            hp = self.oracle.get_space()
            hp.Fixed("units", 4)
            self.oracle.update_space(hp)

    def build(hp):
        built.append(hp)
        raise AssertionError(f"keras-tuner built the hypermodel instead of calling {compat.POPULATE_INITIAL_SPACE}")

    # As apps/tune/driver.py builds its tuners.
    tuner_class = type("RandomSearch", (Declares, keras_tuner.RandomSearch),
                       {compat.POPULATE_INITIAL_SPACE: Declares.declare_space})
    return tuner_class(hypermodel=build, objective=keras_tuner.Objective("val_loss", "min"), max_trials=1,
                       directory=str(tmp_path), project_name="p", overwrite=True)


def test_populate_initial_space_hook(tmp_path):
    """keras_tuner BaseTuner._populate_initial_space, called from __init__."""
    import keras_tuner

    api = f"keras_tuner BaseTuner.{compat.POPULATE_INITIAL_SPACE}"
    built = []
    try:
        assert callable(getattr(keras_tuner.Tuner, compat.POPULATE_INITIAL_SPACE, None)), "no such hook"
        tuner = _tuner(tmp_path, built)
        assert not built, "the default space discovery ran"
        assert tuner.oracle.get_space().values == {"units": 4}, "the override did not declare the space"
    except Exception as error:
        _broken("keras-tuner", api, error)


def test_oracle_servicer(tmp_path):
    """keras_tuner.src.distribute.oracle_chief.OracleServicer / exit_chief and
    keras_tuner.src.protos.get_service_grpc()."""
    import grpc

    api = "keras_tuner.src.distribute.oracle_chief (OracleServicer, exit_chief) / keras_tuner.src.protos"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    try:
        oracle = _tuner(tmp_path, []).oracle
        oracle.verbose = 0
        servicer = compat.add_oracle_servicer(oracle, server)
        assert not compat.search_finished(oracle, servicer), "finished before any trial"
        # A worker's calls, straight to the servicer (CreateTrial reads only tuner_id).
        response = servicer.CreateTrial(types.SimpleNamespace(tuner_id="worker0"), None)
        trial_id = response.trial.trial_id
        assert oracle.ongoing_trials["worker0"].trial_id == trial_id, "the servicer did not start a trial"
        assert not compat.search_finished(oracle, servicer), "finished with a trial running"
        oracle.update_trial(trial_id, {"val_loss": 0.5})
        trial = oracle.get_trial(trial_id)
        trial.status = "COMPLETED"
        oracle.end_trial(trial)
        servicer.CreateTrial(types.SimpleNamespace(tuner_id="worker0"), None)  # max_trials reached: STOPPED
        assert not oracle.tuner_ids and not oracle.ongoing_trials, "the worker was not stopped"
        assert compat.search_finished(oracle, servicer), "not finished once the last worker was stopped"
    except Exception as error:
        _broken("keras-tuner", api, error)
    finally:
        server.stop(grace=None)


def test_learning_rate_schedule_of_an_optimizer():
    schedule = keras.optimizers.schedules.CosineDecay(0.1, decay_steps=40)
    assert compat.learning_rate_schedule(keras.optimizers.Adam(schedule)) is schedule
    assert compat.learning_rate_schedule(keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(schedule))) is schedule
    assert compat.learning_rate_schedule(keras.optimizers.Adam(0.01)) is None
