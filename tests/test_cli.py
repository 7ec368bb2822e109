"""The `dlsuite` entry point and `dlsuite models`, run in-process via `main`."""

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from dlsuite import models
from dlsuite.apps import cli
from dlsuite.apps.core.errors import UsageError
from dlsuite.models import summary


def run(capsys, *argv):
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_models_list_json_has_every_registered_model(capsys):
    status, out, err = run(capsys, "models", "list", "--json")
    assert status == 0
    rows = json.loads(out)
    assert [row["name"] for row in rows] == models.names()
    by_name = {row["name"]: row for row in rows}
    assert by_name["lenet5"]["params"] == 61706
    assert by_name["lenet5"]["family"] == "lenet"
    assert by_name["lenet5"]["default_input_shape"] == [32, 32, 1]
    assert all(row["params"] > 0 for row in rows)


def test_models_list_filters_and_prints_a_table(capsys):
    status, out, _ = run(capsys, "models", "list", "--family", "lenet")
    assert status == 0
    assert "lenet5" in out and "61,706" in out and "resnet" not in out


def test_models_show_lenet5_json(capsys):
    status, out, _ = run(capsys, "models", "show", "lenet5", "--json")
    assert status == 0
    info = json.loads(out)  # one JSON object and nothing else
    assert info["name"] == "lenet5"
    assert info["params"] == info["trainable_params"] == 61706
    assert info["non_trainable_params"] == 0
    assert info["flops"] == 833040  # the hand count of tests/test_summary.py
    assert info["output_shape"] == [10]
    assert set(info["memory"]) >= {"weights", "optimizer", "activations", "total"}
    assert info["memory"]["optimizer"] == 2 * info["memory"]["weights"]  # adam


def test_models_show_options_reach_the_builder_and_memory(capsys):
    status, out, _ = run(
        capsys, "models", "show", "lenet5", "--input-shape", "36,36,3", "--classes", "5",
        "--batch-size", "2", "--optimizer", "sgd", "--json",
    )
    assert status == 0
    info = json.loads(out)
    assert info["input_shape"] == [36, 36, 3]
    assert info["output_shape"] == [5]
    assert info["memory"]["optimizer"] == 0
    assert info["batch_size"] == 2


def test_models_show_table(capsys):
    status, out, _ = run(capsys, "models", "show", "lenet5")
    assert status == 0
    assert "conv1 (Conv2D)" in out
    assert "61,706" in out
    assert "FLOPs" in out and "activations" in out


def test_models_show_rnn_takes_time_steps(capsys):
    status, out, _ = run(capsys, "models", "show", "gru", "--input-shape", "12", "--json")
    assert status == 0
    info = json.loads(out)
    assert info["input_shape"] == [12]
    assert info["flops"] > 0


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["models", "show", "nope"], "lenet5"),  # lists the known models
        (["models", "show", "lenet5", "--input-shape", "32,x,3"], "'32,x,3'"),
        (["models", "show", "lenet5", "--input-shape", "32,32"], "224,224,3"),
        (["models", "show", "lstm", "--input-shape", "1,2,3"], "time steps"),
        (["models", "show", "resnet18", "--input-shape", "8,8,3"], "at least 32x32"),
        (["models", "show", "lenet5", "--classes", "0"], "--classes"),
        (["models", "show", "lenet5", "--classes", "-3"], "--classes"),
        (["models", "show", "lenet5", "--batch-size", "0"], "--batch-size"),
        (["models", "list", "--family", "nope"], "families"),
        # argparse's own errors, one line too, naming the help to read.
        (["models", "show", "lenet5", "--optimizer", "foo"], "argument --optimizer: invalid choice: 'foo'"),
        (["classify", "train", "--bogus", "1"], "unrecognized arguments: --bogus 1; see `dlsuite classify train --help`"),
        (["tune", "caption", "--fine-tune-encoder"], "see `dlsuite tune caption --help`"),
        (["nope"], "argument COMMAND: invalid choice: 'nope'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, fragment):
    status, out, err = run(capsys, *argv)
    assert status == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dlsuite: error: ")
    assert fragment in lines[0]
    assert "Traceback" not in err


def test_help_exits_0(capsys):
    assert run(capsys, "--help")[0] == 0


def test_a_plugged_in_app_gets_one_line_errors(capsys, monkeypatch):
    """The plug-in contract: `add_parser(subparsers)` setting `func`; a
    UsageError is one line, a ValueError from anywhere else is a bug and keeps
    its traceback."""
    def fake_run(args):
        if args.fail == "usage":
            raise UsageError("bad\nthing")
        if args.fail == "option":
            raise UsageError("fail must be sane", option="fail")
        if args.fail == "value":
            raise ValueError("bad value")

    def add_parser(subparsers):
        parser = subparsers.add_parser("fake")
        parser.add_argument("--fail", choices=("usage", "option", "value"))
        parser.set_defaults(func=fake_run)

    app = types.ModuleType("fake_app")
    app.add_parser = add_parser
    monkeypatch.setitem(sys.modules, "fake_app", app)
    monkeypatch.setattr(cli, "SUBCOMMANDS", cli.SUBCOMMANDS + ("fake_app",))
    assert run(capsys, "fake")[0] == 0
    for kind, message in (("usage", "bad thing"), ("option", "--fail must be sane")):
        status, _, err = run(capsys, "fake", "--fail", kind)
        assert (status, err) == (2, f"dlsuite: error: {message}\n")
    with pytest.raises(ValueError, match="bad value"):
        run(capsys, "fake", "--fail", "value")


def test_installed_console_script():
    script = Path(sys.executable).parent / "dlsuite"
    if not script.exists():
        pytest.skip(f"console script not installed at {script}; run `pip install -e .`")
    result = subprocess.run(
        [str(script), "models", "show", "lenet5"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "61,706" in result.stdout
    assert "Traceback" not in result.stderr


def test_parsers_import_no_tensorflow():
    """`dlsuite --help` and every app's --help answer without loading TensorFlow."""
    import subprocess

    code = ("import sys; from dlsuite.apps import cli; cli.build_parser(); "
            "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr


def test_command_line_choices_match_the_libraries():
    from dlsuite.apps.core import choices, optim
    from dlsuite.models import common

    assert choices.ACTIVATIONS == common.ACTIVATIONS
    assert choices.INITIALIZERS == tuple(common.INITIALIZERS)
    assert set(choices.OPTIMIZERS) <= set(summary.OPTIMIZERS)
    assert optim.OPTIMIZERS == choices.OPTIMIZERS


def test_every_strategy_help_names_every_strategy_the_command_accepts():
    import argparse

    from dlsuite.apps.core import choices, distribute

    def commands(parser, prefix=()):
        subs = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
        if not subs:
            yield prefix, parser
        for sub in subs:
            for name, child in sub.choices.items():
                yield from commands(child, (*prefix, name))

    found = 0
    for command, parser in commands(cli.build_parser()):
        strategy = next((a for a in parser._actions if "--strategy" in a.option_strings), None)
        if strategy is None:
            continue
        found += 1
        refused = choices.UNTUNABLE_STRATEGIES if command[0] == "tune" else ()
        for name in distribute.STRATEGIES:
            assert (f"{name}" in strategy.help.replace(",", " ").split()) == (name not in refused), (command, name)
    assert found >= 5


def test_info_names_versions_devices_strategies_and_caches(capsys):
    assert cli.main(["info", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["versions"]["keras"] and facts["versions"]["tensorflow"]
    assert facts["devices"]["trains_on"] == "cpu" and facts["devices"]["cpu"] >= 1
    assert set(facts["strategies"]) == {"auto", "default", "one-device", "mirrored", "multi-worker",
                                         "parameter-server", "tpu"}
    assert facts["caches"]["keras_weights"].endswith("models")
    assert cli.main(["info"]) == 0
    assert "strategies:" in capsys.readouterr().out
