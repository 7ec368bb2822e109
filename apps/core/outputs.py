"""Output files a command will write, checked before any work (#15): a bad
path costs nothing and leaves nothing behind."""

import pathlib

from dlsuite.apps.core import atomic
from dlsuite.apps.core.errors import UsageError


def check_file(path, *, option, suffix=None):
    """Raises UsageError unless the file `path` can be written; leaves nothing behind.

    Args:
        option: the config field the path came from (the message starts with
            it, so the CLI shows its flag).
        suffix: the file's required ending, e.g. ".npz".

    Returns:
        `path` as a `pathlib.Path`.
    """
    path = pathlib.Path(path)
    if suffix is not None and path.suffix != suffix:
        raise UsageError(f"{option} {str(path)!r} must end in {suffix}, e.g. features{suffix}", option=option)
    if path.is_dir():
        raise UsageError(f"{option} {str(path)!r} is a folder; pass the path of a {suffix or ''} file to write",
                         option=option)
    existing = atomic.nearest_existing(path.parent)
    if not existing.is_dir():
        raise UsageError(f"{option} {str(path)!r} cannot be written: {str(existing)!r} is not a folder; pass a path "
                         "in a folder you can write to", option=option)
    # The file is written beside itself and renamed over: its folder decides.
    refusal = atomic.write_refusal(existing)
    if refusal:
        raise UsageError(f"{option} {str(path)!r} cannot be written: {refusal}; pass a path you can write to",
                         option=option)
    return path
