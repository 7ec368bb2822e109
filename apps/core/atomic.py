"""Files and folders written whole or not at all, and what a killed writer left.

Every output of a run (JSON, history, plots, `.keras` models, export
versions) is written under a temporary name beside its final one and renamed
into place. The temporary name says who writes it: `<host>-<pid>`. A process
killed mid-write (SIGKILL, a power cut) cannot clean up after itself, so the
next write of the same file or export removes the temporaries whose owner is
no longer running (`os.kill(pid, 0)`); ones from another machine (a shared
file system) or from before the owner tag (`legacy`) go only once they are
older than a day or an hour, the longest a write can take.

Out of space (ENOSPC, or EDQUOT over a quota) while writing is a user error,
one line naming the path (`UsageError`, exit 2), with the partial file
removed; the file or version written before stays as it was.
"""

import contextlib
import errno
import os
import pathlib
import re
import secrets
import shutil
import socket
import sys
import tempfile
import time

from dlsuite.apps.core.errors import UsageError

# How old a temporary must be before it counts as abandoned when its owner
# cannot be asked: another machine's process, or a name without an owner.
FOREIGN_AGE_S = 24 * 3600
LEGACY_AGE_S = 3600

_OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)
# TensorFlow's and h5py's errors carry the OS message in their text only.
_OUT_OF_SPACE_TEXT = ("no space left on device", "disk quota exceeded")
# `.tmp-[<version>-]<host>-<pid>-<8 hex>`: an export version's folder or a file's temporary.
_OWNER = re.compile(r"\.tmp-(?:\d+-)?(?P<tag>[A-Za-z0-9]+)-(?P<pid>\d+)-[0-9a-f]{8}")


def host():
    """This machine's name as it appears in temporary names (letters and digits)."""
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def owner_tag():
    """`<host>-<pid>`: who writes a temporary file or folder."""
    return f"{host()}-{os.getpid()}"


def temporary_name(prefix, suffix=""):
    """`{prefix}.tmp-<host>-<pid>-<8 hex>{suffix}`, unique to this write."""
    return f"{prefix}.tmp-{owner_tag()}-{secrets.token_hex(4)}{suffix}"


def temporary_file(path):
    """A hidden temporary path beside `path` with the same suffix (Keras
    insists on `.keras`): `dir/.name.tmp-<host>-<pid>-<hex>.keras`."""
    path = pathlib.Path(path)
    return path.with_name(temporary_name(f".{path.stem}", path.suffix))


def process_alive(pid):
    """Whether process `pid` of this machine is running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def is_abandoned(path, *, now=None):
    """True if the temporary `path` (a name a glob for temporaries found)
    belongs to no live process.

    Its name carries the owner (`.tmp-<host>-<pid>-`): on this machine, the
    owner is asked with `os.kill(pid, 0)`; from another machine, or without
    an owner in its name, it counts as abandoned once it is older than
    FOREIGN_AGE_S or LEGACY_AGE_S.
    """
    path = pathlib.Path(path)
    match = _OWNER.search(path.name)
    if match is not None and match["tag"] == host():
        pid = int(match["pid"])
        return pid != os.getpid() and not process_alive(pid)
    try:
        age = (now or time.time()) - path.lstat().st_mtime
    except FileNotFoundError:
        return False
    return age > (LEGACY_AGE_S if match is None else FOREIGN_AGE_S)


def remove(path):
    """Removes the file or folder `path`, if it is there."""
    path = pathlib.Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            path.unlink()


def clean_abandoned(folder, pattern):
    """Removes the temporaries in `folder` matching the glob `pattern` that
    no live process owns (`is_abandoned`); returns the removed paths."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.glob(pattern)):
        if is_abandoned(path):
            remove(path)
            removed.append(path)
    if removed:
        print(f"dlsuite: removed {len(removed)} temporary file(s) a killed run left: "
              + ", ".join(str(p) for p in removed[:3]) + (", ..." if len(removed) > 3 else ""),
              file=sys.stderr, flush=True)
    return removed


def out_of_space(error):
    """True if `error` (an OSError, or TensorFlow's or h5py's wrapping of
    one) says the disk or the quota is full."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if getattr(error, "errno", None) in _OUT_OF_SPACE:
            return True
        if any(text in str(error).lower() for text in _OUT_OF_SPACE_TEXT):
            return True
        error = error.__cause__ or error.__context__
    return False


def no_space_error(path, error, *, partial="file"):
    """The one-line UsageError for running out of space writing `path`
    (`partial`: "file", or "version" for an export)."""
    what = "the disk quota is exceeded" if getattr(error, "errno", None) == errno.EDQUOT or (
        "quota" in str(error).lower()) else "no space left on the device"
    return UsageError(f"cannot write {str(path)!r}: {what}; the partial {partial} was removed. Free some space "
                      "there or write to another disk")


@contextlib.contextmanager
def replacing(path):
    """Yields a temporary path beside `path`, which the caller fills; on
    success it replaces `path` in one rename, on any failure it is removed.

    The temporaries of `path` that a killed writer left are removed first.
    Out of space is a `UsageError` naming `path`; an earlier `path` stays.
    """
    path = pathlib.Path(path)
    for pattern in temporary_patterns(path):
        clean_abandoned(path.parent, pattern)
    temporary = temporary_file(path)
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException as error:  # KeyboardInterrupt too: nothing half-written stays
        remove(temporary)
        if isinstance(error, Exception) and out_of_space(error):
            raise no_space_error(path, error) from None
        raise


def temporary_patterns(path):
    """Globs for the temporaries of `path` in its folder: this module's
    (`.name.tmp-<owner>-<hex>.ext`) and the ownerless names used before
    issue #15 (`name.tmp.keras`, `.name.json.tmp`, `.name.tmp.png`)."""
    path = pathlib.Path(path)
    stem, suffix, name = (glob_escape(part) for part in (path.stem, path.suffix, path.name))
    return [f".{stem}.tmp-*{suffix}", f"{stem}.tmp{suffix}", f".{name}.tmp", f".{stem}.tmp{suffix}"]


# Every temporary a run directory can hold, for `clean_tree`.
_RUN_PATTERNS = (".*.tmp-*", "*.tmp.keras", ".*.tmp", ".*.tmp.*")


def clean_tree(folder, *, depth=2):
    """Removes the abandoned temporaries (`is_abandoned`) in `folder` and
    its subfolders down to `depth` levels (a run directory: its phases and
    their `checkpoints/`); returns the removed paths."""
    folder = pathlib.Path(folder)
    removed = []
    for level in range(depth + 1):
        prefix = "*/" * level
        for pattern in _RUN_PATTERNS:
            for parent in sorted({p.parent for p in folder.glob(prefix + pattern)}):
                removed += clean_abandoned(parent, pattern)
    return removed


def glob_escape(text):
    """`text` with glob's special characters taken literally."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def check_writable(path, *, what, option=None, hint="pass a folder you can write to"):
    """Raises UsageError unless `path` (a folder, maybe not there yet) could
    be created and written by this process; leaves nothing behind.

    Called before training, so that a bad output path costs nothing.
    """
    path = pathlib.Path(path)
    existing = nearest_existing(path)
    if not existing.is_dir():
        raise UsageError(f"cannot write {what} under {str(path)!r}: {str(existing)!r} is not a folder; {hint}",
                         option=option)
    refusal = write_refusal(existing)
    if refusal:
        raise UsageError(f"cannot write {what} under {str(path)!r}: {refusal}; {hint}", option=option)
    return path


def nearest_existing(path):
    """`path`, or its nearest parent that exists."""
    path = pathlib.Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def write_refusal(folder):
    """Why a new file cannot be made in the existing `folder`, or None.

    Found by making and removing an empty file there: the permission bits
    (`os.access`) say yes to root, and to anyone on a read-only or pseudo file
    system (/proc) or on NFS with root squashing, which then refuse the write.
    """
    try:
        handle, probe = tempfile.mkstemp(prefix=".dlsuite-write-check-", dir=folder)
    except OSError as error:
        return f"{str(folder)!r} refuses new files ({error.strerror or type(error).__name__})"
    os.close(handle)
    os.unlink(probe)
    return None


def save_model(model, path):
    """Saves a `.keras` file beside `path` and renames it into place
    (`atomic.replacing`): a kill leaves the earlier file or none, the next
    save removes the temporary a killed one left, and a full disk is a
    UsageError naming `path`."""
    with replacing(path) as temporary:
        model.save(temporary)
