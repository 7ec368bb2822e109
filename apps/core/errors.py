"""The errors a user gets for bad input, as opposed to bugs.

`UsageError` is bad input (a value out of range, a file that is not what it
should be): the command line prints it as one line and exits with status 2.
Library code raises it with `option`, the config field the value came from
("lr", "export_dir"), and a message that assumes no command line; the CLI
puts the flag in (`--lr`). Any other exception is a bug and keeps its
traceback.
"""


class UsageError(ValueError):
    """Bad input from the user; the CLI prints it as one line and exits 2.

    Args:
        message: what was wrong and what to do, naming the received value.
        option: the config field (or builder argument) the value came from,
            or a tuple of the fields the message names.
    """

    def __init__(self, message, *, option=None):
        super().__init__(message)
        self.option = option


class RunFailed(RuntimeError):
    """A run that cannot go on for a reason outside this process (a lost
    worker of the cluster), not a bug: the command line prints it as one
    line and exits 1; the message says how to continue."""


def user_errors():
    """What the command line shows as one line: bad input to an app or to a
    model builder (a knob out of range reaches `models` unchanged). A
    function, because importing `dlsuite.models` imports Keras, which
    `--help` must not wait for."""
    from dlsuite.models.errors import ArgumentError

    return (UsageError, ArgumentError)


def option_of(error):
    """The config field a user error names, or None."""
    return getattr(error, "option", None) or getattr(error, "argument", None)
