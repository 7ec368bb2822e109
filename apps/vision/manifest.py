"""What checking an image folder found, kept between runs so that a second
run on the same folder re-checks only the files that changed.

One tab-separated file per folder, under `core.user_cache.root()/manifests`
(`dlsuite` prints its path), a line per file: path, size in bytes,
modification time in nanoseconds, and the verdict: "ok" with height, width
and channels, or the reason the file cannot be used. A file whose size or
time differs from its line is checked again. The file is written whole or
not at all (a temporary name, then a rename).
"""

import hashlib
import os

from dlsuite.apps.core import user_cache

HEADER = "# dlsuite image manifest 1: path, size, mtime_ns, verdict (ok H W C colour | reason)\n"


def path_for(root):
    """The manifest file of the folder `root`: named after it, unique per absolute path."""
    absolute = os.path.abspath(os.path.expanduser(root))
    digest = hashlib.sha1(absolute.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    name = os.path.basename(absolute.rstrip(os.sep)) or "root"
    return os.path.join(user_cache.root(), "manifests", f"{name}-{digest}.tsv")


def read(path):
    """{file path: (size, mtime_ns, verdict)} from a manifest, the verdict as
    its line holds it (tab-separated fields); {} when there is none or it is unreadable."""
    entries = {}
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as file:
            if file.readline() != HEADER:
                return {}
            for line in file:
                parts = line.rstrip("\n").split("\t", 3)
                try:
                    entries[parts[0]] = (int(parts[1]), int(parts[2]), parts[3])
                except (IndexError, ValueError):
                    continue  # a damaged line: that file is checked again
    except (OSError, UnicodeError):
        return {}
    return entries


def write(path, rows):
    """Writes [(file path, size, mtime_ns, fields)] atomically; a folder that cannot be written is let be."""
    temporary = f"{path}.partial-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(temporary, "w", encoding="utf-8", errors="surrogateescape") as file:
            file.write(HEADER)
            for name, size, mtime, fields in rows:
                if "\t" in name or "\n" in name:
                    continue  # such a name is checked every run
                file.write("\t".join([name, str(size), str(mtime), *fields]) + "\n")
        os.replace(temporary, path)
        return True
    except OSError:
        if os.path.exists(temporary):
            os.remove(temporary)
        return False
