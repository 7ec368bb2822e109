"""The `dlsuite` command: one subcommand per app.

Plugging in an app is one row of `table.APPS`. Its parser module exposes
`add_parser(subparsers)`, which adds its parser to the `argparse`
subparsers and sets the function to run::

    def add_parser(subparsers):
        parser = subparsers.add_parser("classify", help="...", epilog="...")
        parser.add_argument(...)
        parser.set_defaults(func=run)   # run(args) -> exit status or None

A user error, bad input rather than a bug, is raised as
`core.errors.UsageError` (or `models.errors.ArgumentError` from a builder):
`main` prints it as one line, `dlsuite: error: <message>`, on stderr and
exits with status 2, with the option's flag where the error names its
field. So is an operating-system error on a path (a missing file, a full
disk, a folder without write permission), with the path named. Anything
else is a bug and keeps its traceback. argparse's own errors also exit 2.
"""

import argparse
import importlib
import os
import re
import sys

from dlsuite.apps import table
from dlsuite.apps.core import config_file, errors

# The modules that each add one subcommand, from the app table (a new app is one row there).
SUBCOMMANDS = tuple(app.parser for app in table.APPS)

EXIT_USAGE = 2

EPILOG = """examples:
  dlsuite classify train
  dlsuite lm train
  dlsuite transfer finetune --backbone resnet50 --weights imagenet --dataset ./photos
  dlsuite tune classify --max-trials 10
  dlsuite caption train
  dlsuite models list
  dlsuite models show resnet50 --batch-size 64 --optimizer sgd
  dlsuite diagnose run runs/classify/<time>          # or init, overfit, lr-range, memory
  dlsuite <command> --help
"""


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors as the one line `dlsuite: error: ...` that
    every bad input gets, instead of the usage block; the subcommands'
    parsers are of this class too (argparse's default)."""

    def parse_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_args(args, namespace)

    def error(self, message):
        if message.startswith("unrecognized arguments"):  # found by the top parser, for a subcommand
            message += f"; see `{self._command(getattr(self, '_argv', []))} --help`"
        where = f"{self.prog}: " if self.prog != "dlsuite" else ""
        self.exit(EXIT_USAGE, f"dlsuite: error: {where}{message}\n")

    def _command(self, argv):
        """The prog of the deepest subcommand `argv` names, e.g. "dlsuite tune caption"."""
        return _subcommand_parser(self, argv).prog


def build_parser():
    """Returns the `dlsuite` parser with every module of SUBCOMMANDS added."""
    parser = OneLineParser(
        prog="dlsuite",
        description="Train, tune, diagnose and ship the classic deep-learning models.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in SUBCOMMANDS:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def _one_line(error):
    return " ".join(str(error).split()) or type(error).__name__


def _flags(parser, argv):
    """{dest: flag} of the options of the (sub)command `argv` runs."""
    parser = _subcommand_parser(parser, argv)
    return {action.dest: action.option_strings[-1] for action in parser._actions if action.option_strings}


def _subcommand_parser(parser, argv):
    """The deepest subcommand parser `argv` names."""
    for word in argv:
        choices = next((action.choices for action in parser._actions
                        if isinstance(action, argparse._SubParsersAction)), None)
        if not choices or word not in choices:
            break
        parser = choices[word]
    return parser


def user_error_line(error, flags):
    """One line for a user error: the config field it starts with, or each of
    the fields it names as a tuple, is shown as its flag (`lr must be > 0` ->
    `--lr must be > 0`); "Unknown model 'x'" stays as it is."""
    text = _one_line(error)
    fields = errors.option_of(error) or ()
    if isinstance(fields, str):
        flag = flags.get(fields)
        return f"{flag}{text[len(fields):]}" if flag and re.match(rf"{re.escape(fields)}(?![\w-])", text) else text
    for field in fields:
        if flags.get(field):
            text = re.sub(rf"(?<![\w-]){re.escape(field)}(?![\w-])", flags[field], text, count=1)
    return text


def os_error_line(error):
    """One line for an operating-system error on a path: what and where."""
    where = error.filename if error.filename2 is None else f"{error.filename} -> {error.filename2}"
    return f"{error.strerror or _one_line(error)}: {where!s}"


def _quiet_tensorflow_start():
    """Imports TensorFlow with file descriptor 2 silenced.

    TensorFlow 2.21 writes its start-up lines (oneDNN notice, CUDA probing)
    through absl before TF_CPP_MIN_LOG_LEVEL applies; they would bury the
    one-line messages users read. Python errors still surface: the descriptor
    is restored before any exception propagates.
    """
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") in ("", "0"):
        return
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        import tensorflow as tf

        tf.config.list_physical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def parse_arguments(parser, argv=None):
    """Parses `argv`; with `--config FILE`, the file's options become the
    command's defaults and `argv` is parsed again, so that flags win."""
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        command = _subcommand_parser(parser, parser._argv)
        config_file.apply(command, args.config, command=command.prog)
        args = parser.parse_args(argv)
    return args


def main(argv=None):
    """Runs `dlsuite` with `argv` (default: the command line); returns the exit status."""
    # Before any app module imports TensorFlow, so its C++ start-up INFO and
    # WARNING lines stay off the terminal; a value the user set wins.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()  # imports no TensorFlow: --help stays instant
    try:
        args = parse_arguments(parser, argv)
    except SystemExit as exit_:  # --help (0) or an argparse error (2)
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    except errors.UsageError as error:  # a bad --config file
        print(f"dlsuite: error: {user_error_line(error, {'config': '--config'})}", file=sys.stderr)
        return EXIT_USAGE
    _quiet_tensorflow_start()
    try:
        status = args.func(args)
    except errors.user_errors() as error:
        print(f"dlsuite: error: {user_error_line(error, _flags(parser, parser._argv))}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:
        if error.filename is None:  # not about a path the user gave: a bug, or TensorFlow's
            raise
        print(f"dlsuite: error: {os_error_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except errors.RunFailed as error:
        print(f"dlsuite: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dlsuite: interrupted", file=sys.stderr)
        return 130
    return 0 if status is None else status


if __name__ == "__main__":
    sys.exit(main())
