"""Where dlsuite keeps what it can rebuild (image caches, file-check
manifests, token files): $XDG_CACHE_HOME/dlsuite, else ~/.cache/dlsuite.
No TensorFlow here: the file checks' worker processes import it."""

import os


def root():
    """$XDG_CACHE_HOME/dlsuite, else ~/.cache/dlsuite."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dlsuite")
