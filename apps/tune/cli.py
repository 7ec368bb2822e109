"""`dlsuite tune APP`: hyperparameter search with keras-tuner, for every app.

This module holds the command line: one parser per searchable app (its data
options, the search options, the output options) and `run`, the entry the
parser calls. `driver` runs the search (its docstring says what the tuning
directory holds, how a search resumes and how it spreads over machines);
`report` prints and writes its results.

The apps come from the app table (`apps/table.py`): each names its task and
its `tuning.py` (hyperparameters, default space, objectives).
"""

import argparse
import importlib

from dlsuite.apps import table
from dlsuite.apps.core import choices, train_args
from dlsuite.apps.tune import driver
from dlsuite.apps.tune import space as search_space


SPACE_EXAMPLE = """a --space file (YAML or JSON) narrows or widens the default space:
  model: [lenet5, resnet18]                  # a choice
  lr: {min: 1.0e-4, max: 0.1, sampling: log} # a range (also step; sampling linear, log, reverse_log)
  batch_size: 64                             # a fixed value
"""

DISTRIBUTED = """distributed search (keras-tuner's environment variables, the same command everywhere):
  KERASTUNER_TUNER_ID=chief  KERASTUNER_ORACLE_IP=10.0.0.1 KERASTUNER_ORACLE_PORT=8000 dlsuite tune classify
  KERASTUNER_TUNER_ID=tuner0 KERASTUNER_ORACLE_IP=10.0.0.1 KERASTUNER_ORACLE_PORT=8000 dlsuite tune classify
  KERASTUNER_TUNER_ID=tuner1 ...                     (one id per worker; the chief reports at the end)
"""


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "tune", help="hyperparameter search (keras-tuner): random, hyperband, bayesian",
        epilog="examples:\n" + "".join(app.search().examples for app in table.searchable().values()) + "\n"
               + SPACE_EXAMPLE + "\n" + DISTRIBUTED,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    apps = parser.add_subparsers(dest="app", required=True, metavar="APP")
    for name, app in table.searchable().items():
        _add_app_parser(apps, name, app)


def _add_app_parser(apps, name, entry):
    app = entry.search()
    parser = apps.add_parser(
        name, help=app.help, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + app.examples + "\n" + search_space.default_text(name) + "\n" + SPACE_EXAMPLE + "\n" + DISTRIBUTED)
    data = parser.add_argument_group("data")
    for option, text in app.fixing_options.items():
        data.add_argument(f"--{option.replace('_', '-')}", help=text)
    importlib.import_module(entry.parser).add_data_arguments(data, **app.data_defaults)
    for _, flag, kwargs in app.extra_options:
        data.add_argument(flag, **kwargs)

    search = parser.add_argument_group("search")
    search.add_argument("--tuner", choices=driver.TUNERS, default="random", help="random search (default), hyperband or bayesian optimization")
    search.add_argument("--max-trials", type=train_args.positive_int,
                        help=f"trials to run (default {app.max_trials}; hyperband: as many as its brackets need)")
    search.add_argument("--epochs", type=train_args.positive_int, default=app.epochs,
                        help=f"epochs per trial unless the space searches 'epochs' (hyperband: the most a trial trains); default {app.epochs}")
    search.add_argument("--objective", default=app.objective,
                        help=f"validation metric to optimize: {', '.join(f'{k} ({v})' for k, v in app.objectives.items())}; default {app.objective}")
    search.add_argument("--space", metavar="FILE", help="YAML or JSON file that narrows or widens the default search space")
    search.add_argument("--max-failures", type=train_args.positive_int, default=3,
                        help="stop the search after this many trials in a row fail (default 3)")
    search.add_argument("--seed", type=int, default=0, help="seeds the split, the search and every trial's initialization")
    search.add_argument("--strategy", default="auto", help="tf.distribute strategy each trial trains under: " + choices.strategy_help(
        [name for name in choices.STRATEGIES if name not in choices.UNTUNABLE_STRATEGIES]))

    train_args.add_config_argument(parser)
    output = parser.add_argument_group("output")
    output.add_argument("--dir", help=f"tuning directory; the same one resumes a search (default runs/tune/{name}_<data>_<tuner>)")
    output.add_argument("--overwrite", action="store_true", help="start the search in --dir over, deleting its trials")
    output.add_argument("--export", metavar="NAME", help="SavedModel name of the best model under --export-dir (default: as the app names it)")
    output.add_argument("--export-dir", default="saved_models")
    output.add_argument("--no-export", action="store_true")
    parser.set_defaults(func=run)


def run(args):
    """Checks the input, searches, reports the trials, finishes the best model."""
    return driver.run(args)
