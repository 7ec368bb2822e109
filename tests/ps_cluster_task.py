"""One task of the parameter-server tests in `test_parameter_server.py`.

Run as `python ps_cluster_task.py dlsuite ARGS...` with TF_CONFIG set: the
`dlsuite` command line, in a process of its own per task.
"""

import sys

if __name__ == "__main__":
    from dlsuite.apps import cli

    sys.exit(cli.main(sys.argv[2:]))
