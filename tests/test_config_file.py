"""`--config FILE` on every app's train and tune (through the app table): a
file holds options, flags override it, a run's config.json repeats the run,
bad keys and values are one line."""

import csv
import dataclasses
import json

import pytest

from dlsuite.apps import cli, table
from dlsuite.apps.core import train_args

TRAINING_APPS = [app for app in table.APPS if app.task]
COMMAND = {"transfer": "finetune"}


def parse(argv):
    """The parsed arguments of `argv`, the --config file applied as cli.main does."""
    return cli.parse_arguments(cli.build_parser(), [str(arg) for arg in argv])


def config_of(app, argv):
    return train_args.config_from_args(app.task_class().config_class, parse(argv))


@pytest.mark.parametrize("app", TRAINING_APPS, ids=lambda app: app.name)
def test_a_file_sets_options_and_flags_override_it(app, tmp_path):
    command = [app.name, COMMAND.get(app.name, "train")]
    (tmp_path / "options.yaml").write_text("seed: 7\nlr: 0.0125\nearly_stopping: 3\nexport: from-file\n")
    config = config_of(app, [*command, "--config", tmp_path / "options.yaml", "--seed", "8"])
    assert (config.seed, config.optimizer["lr"], config.early_stopping, config.export) == (8, 0.0125, 3, "from-file")
    default = config_of(app, command)
    # A run's config.json is a config file: every field comes back, but its run directory.
    saved = dataclasses.replace(config, out="runs/elsewhere")
    (tmp_path / "config.json").write_text(json.dumps({"config": dataclasses.asdict(saved), "resolved": {}}))
    again = config_of(app, [*command, "--config", tmp_path / "config.json"])
    assert again == dataclasses.replace(config, out=default.out)


@pytest.mark.parametrize("app", table.searchable().values(), ids=lambda app: app.name)
def test_tune_takes_a_config_file_too(app, tmp_path):
    (tmp_path / "search.json").write_text(json.dumps({"max_trials": 3, "seed": 5}))
    args = parse(["tune", app.name, "--config", tmp_path / "search.json", "--max-trials", "4"])
    assert (args.max_trials, args.seed) == (4, 5)


@pytest.mark.parametrize("content, message", [
    ("epochz: 3\n", "unknown key 'epochz' for `dlsuite classify train`; allowed keys: "),
    ("epochs: three\n", "epochs (--epochs) cannot be 'three'"),
    ("epochs: 2.5\n", "epochs (--epochs) cannot be 2.5"),
    ("batch_norm: maybe\n", "batch_norm (--batch-norm/--no-batch-norm) takes true or false, received 'maybe'"),
    ("optimizer: adamw\n", "optimizer (--optimizer) must be one of sgd, momentum"),
    ("epochs: [1\n", "does not parse"),
    ("- a list\n", "must map option names to values"),
])
def test_bad_config_files_are_one_line(content, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text(content)
    status = cli.main(["classify", "train", "--config", "bad.yaml"])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("dlsuite: error: ") and len(err.strip().splitlines()) == 1
    assert message in err and "bad.yaml" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_a_missing_config_file_is_one_line(tmp_path, capsys):
    assert cli.main(["lm", "train", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml" in capsys.readouterr().err


def test_a_run_repeated_from_its_config_json_gives_the_same_history(tmp_path, capsys):
    argv = ["classify", "train", "--dataset", "shapes", "--shapes-size", "32", "--shapes-count", "120", "--epochs", "2",
            "--lr", "0.003", "--no-export", "--out", str(tmp_path / "first")]
    assert cli.main(argv) == 0
    assert cli.main(["classify", "train", "--config", str(tmp_path / "first" / "config.json"),
                     "--out", str(tmp_path / "again")]) == 0
    capsys.readouterr()
    rows = [list(csv.DictReader(open(tmp_path / name / "history.csv"))) for name in ("first", "again")]
    assert [row["loss"] for row in rows[0]] == [row["loss"] for row in rows[1]]  # CPU runs are deterministic
    first, again = (json.loads((tmp_path / name / "config.json").read_text())["config"] for name in ("first", "again"))
    assert {**first, "out": None} == {**again, "out": None}
