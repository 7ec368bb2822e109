"""Two or more `dlsuite` processes as the workers of a multi-worker cluster
on 127.0.0.1, each with its own TF_CONFIG (for the tests that train that way)."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import zygote


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(argv, cwd, *, ports, stdout=subprocess.PIPE, stderr=subprocess.STDOUT):
    """One `dlsuite ARGV` process per port, worker i at ports[i]; returns the Popen objects."""
    script = pathlib.Path(sys.executable).parent / "dlsuite"
    workers = []
    for index in range(len(ports)):
        tf_config = {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]}, "task": {"type": "worker", "index": index}}
        # Each worker picks its threads as on a user's machine (the lm app sets its own):
        # not the share of the cores conftest gives the pytest workers.
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "TF_NUM_INTRAOP_THREADS"}
        env.update(TF_CONFIG=json.dumps(tf_config), CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
        workers.append(zygote.Popen([str(script), *map(str, argv)], env=env, cwd=cwd, stdout=stdout,
                                        stderr=stderr, text=True))
    return workers


def outputs(workers, timeout=300):
    """What each worker printed, once all have ended (any still running after `timeout` is killed)."""
    try:
        return [worker.communicate(timeout=timeout)[0] for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
