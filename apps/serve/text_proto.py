"""TensorFlow Serving's configuration files: protobuf text format, read into a message, with a
bad file refused in one line that names it (and protobuf's line and column)."""

import pathlib

from google.protobuf import text_format

from dlsuite.apps.core.errors import UsageError


def parse(text, message, *, path, option):
    """Parses `text` into the protobuf `message` (which it returns).

    Args:
        text: the file's text.
        message: an empty message of the file's type.
        path: the file, named in errors.
        option: the command-line option that gave the file (its dest name), named in errors.

    Raises:
        UsageError: "--option PATH: line L column C: what protobuf found".
    """
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as error:
        where = f"line {error.GetLine()} column {error.GetColumn()}" if error.GetLine() else "parse error"
        detail = str(error).split(" : ", 1)[-1] if error.GetLine() else str(error)
        lines = text.splitlines()
        if error.GetLine() and error.GetLine() <= len(lines):  # some errors quote the whole line first
            detail = detail.removeprefix(f"'{lines[error.GetLine() - 1]}': ")
        raise UsageError(f"{option} {path}: {where}: {' '.join(detail.split())}", option=option) from None
    return message


def read(path, *, option):
    """The text of the file at `path`; an unreadable one is a UsageError naming it."""
    path = pathlib.Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise UsageError(f"{option} {path}: cannot read it: {reason}", option=option) from None
