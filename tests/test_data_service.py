"""Input preprocessing on other machines (#25): a tf.data service dispatcher
and two workers on localhost, started with `dlsuite data dispatcher|worker`,
feed `classify train --data-service`."""

import json
import socket
import subprocess
import sys
import time

import pytest

import zygote
from dlsuite.apps import cli
from test_image_scale import photo_folder

DLSUITE = [sys.executable, "-c", "import sys; from dlsuite.apps.cli import main; sys.exit(main())"]


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(port, process, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-2000:]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"nothing listens on {port}")


@pytest.fixture
def service():
    """grpc://localhost:PORT of a dispatcher with two workers, all subprocesses of the CLI."""
    port = free_port()
    processes = [zygote.Popen([*DLSUITE, "data", "dispatcher", "--port", str(port)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)]
    try:
        wait_for(port, processes[0])
        for _ in range(2):
            worker_port = free_port()
            processes.append(zygote.Popen(
                [*DLSUITE, "data", "worker", "--dispatcher", f"grpc://localhost:{port}", "--port", str(worker_port),
                 "--worker-address", f"localhost:{worker_port}"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            wait_for(worker_port, processes[-1])
        yield f"grpc://localhost:{port}"
    finally:
        for process in processes:
            process.kill()
            process.wait()


def test_classify_trains_on_images_the_service_workers_decode(service, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = photo_folder(tmp_path / "photos", per_class=16)
    status = cli.main(["classify", "train", "--dataset", str(root), "--image-size", "32", "--batch-size", "8",
                       "--epochs", "2", "--data-service", service, "--out", str(tmp_path / "run"), "--no-export"])
    out = capsys.readouterr().out
    assert status == 0
    assert f"the tf.data service at {service} decodes the training images every epoch" in out
    sizes = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]["sizes"]
    rows = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert len(rows) == 3  # a header and both epochs, every step of them fed by the service
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "finished" and sum(sizes.values()) == 48


def test_an_unreachable_dispatcher_is_one_line_before_training(tmp_path, capsys):
    port = free_port()
    status = cli.main(["classify", "train", "--data-service", f"grpc://127.0.0.1:{port}", "--out",
                       str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert err.startswith(f"dlsuite: error: cannot reach the tf.data service dispatcher at grpc://127.0.0.1:{port}")
    assert not (tmp_path / "run").exists()
