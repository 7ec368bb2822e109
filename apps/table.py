"""The app table: every `dlsuite` command, and for the apps that train, their
task and what `dlsuite tune` may search.

Adding an app is one package (`apps/NAME/` with `cli.py`, `task.py` and,
for a searchable app, `tuning.py`) and one row here. Entries name modules as
strings, so that `dlsuite --help` imports no TensorFlow.
"""

import dataclasses
import importlib


@dataclasses.dataclass(frozen=True)
class App:
    """One row of the table.

    Attributes:
        name: the command, `dlsuite NAME`.
        parser: the module whose `add_parser(subparsers)` adds the command
            (and, for a searchable app, `add_data_arguments(group)`).
        task: "module:Class" of its `core.task.Task`, for apps that train.
        tuning: "module:NAME" of its `core.search.Tuning`, for apps `dlsuite tune` searches.
    """

    name: str
    parser: str
    task: str | None = None
    tuning: str | None = None

    def task_class(self):
        return _load(self.task)

    def search(self):
        return _load(self.tuning)


def _load(reference):
    module, name = reference.split(":")
    return getattr(importlib.import_module(module), name)


APPS = (
    App("models", parser="dlsuite.apps.models_cli"),
    App("classify", parser="dlsuite.apps.classify.cli", task="dlsuite.apps.classify.task:ClassifyTask",
        tuning="dlsuite.apps.classify.tuning:TUNING"),
    App("lm", parser="dlsuite.apps.lm.cli", task="dlsuite.apps.lm.task:LanguageModelTask",
        tuning="dlsuite.apps.lm.tuning:TUNING"),
    App("transfer", parser="dlsuite.apps.transfer.cli", task="dlsuite.apps.transfer.task:TransferTask",
        tuning="dlsuite.apps.transfer.tuning:TUNING"),
    App("tune", parser="dlsuite.apps.tune.cli"),
    App("caption", parser="dlsuite.apps.caption.cli", task="dlsuite.apps.caption.task:CaptionTask",
        tuning="dlsuite.apps.caption.tuning:TUNING"),
    App("diagnose", parser="dlsuite.apps.diagnose.cli"),
    App("serve", parser="dlsuite.apps.serve.cli"),
    App("data", parser="dlsuite.apps.data.cli"),
    App("info", parser="dlsuite.apps.info"),
)


def searchable():
    """{name: App} of the apps `dlsuite tune` can search, in the table's order."""
    return {app.name: app for app in APPS if app.tuning}


def get(name):
    return next(app for app in APPS if app.name == name)
