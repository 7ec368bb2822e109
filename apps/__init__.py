"""Command-line apps behind the `dlsuite` console script (see `dlsuite.apps.cli`)."""
