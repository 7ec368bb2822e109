"""`dlsuite serve` over HTTP: `:predict` against calling the same signature in-process.

    python -m benchmarks.serving_http            # LeNet-5 and ResNet-50, batch 1, 1, 8 and 32 clients
    python -m benchmarks.serving_http --quick    # LeNet-5 only, few requests

Each model is the classify app's classifier with untrained weights, exported
by `apps.vision.export.export_classifier` (as `serving_latency` does). The
real server runs as a subprocess (`dlsuite serve EXPORT --port 0` on
127.0.0.1); once it reports the model AVAILABLE, client threads in this
process send `:predict` requests over kept-alive connections (http.client,
the request body encoded once beforehand, so the client costs the shared
cores little). Results, batch 1:

* `http_{model}_c{N}`: N clients, each sending its requests one after the
  other, `{"instances": [pixels]}` (uint8 values as JSON numbers) to
  `serving_default`, against N threads calling the loaded
  `serving_default` signature in this process on the same pixels (the
  ceiling: no HTTP, no JSON). Bar for ResNet-50 at 1 client: >= 0.8.
* `http_{model}_batching_c{N}`: the same requests to a second server
  started with `--enable-batching` (`BATCHING_FLAGS`), which joins the
  concurrent requests into batches, against the same in-process single
  calls; its details give the mean batch the server ran (from its metrics).
* `http_{model}_png_c1`: one client sending the image as a PNG file,
  `{"signature_name": "serving_bytes", "instances": [{"b64": ...}]}`, the
  form a production client sends an image in (TensorFlow Serving's guide
  does), against the `serving_bytes` signature called in-process on the
  same file's bytes.

The two sides alternate repeat by repeat (the server idles while the
in-process side runs, and the other way round), and the rows report the
requests per second and the p50 and p99 latency of every timed request.
"""

import base64
import http.client
import io
import json
import os
import pathlib
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from benchmarks import common
from benchmarks.serving_latency import MODELS, _classifier

# Requests each client sends per timed repeat: a repeat of about a second or more.
REQUESTS = {"lenet5": {1: 100, 8: 25, 32: 8}, "resnet50": {1: 8, 8: 3}}
QUICK_REQUESTS = {1: 10, 8: 3}
BATCHING_REQUESTS = {"lenet5": {1: 100, 8: 25, 32: 8}, "resnet50": {8: 3}}
QUICK_BATCHING_REQUESTS = {8: 3}
# No timeout, a batch thread per core (TensorFlow Serving's default): a batch runs as soon as a thread is
# free, and the requests that came while both were busy make up the next one, so one client waits for
# nothing. A 1 ms timeout cost a third of the rate at 1 client here (340 against 520 requests/s) and
# gained nothing sure at 8 or 32 clients.
BATCHING_FLAGS = ("--enable-batching", "--max-batch-size", "32", "--batch-timeout-micros", "0")
PNG_REQUESTS = {"lenet5": 100, "resnet50": 8}
START_SECONDS = 300  # importing TensorFlow and loading ResNet-50 on a busy 2-core machine


class ServerProcess:
    """`dlsuite serve` in a subprocess; `port` once it listens, `stop()` to end it."""

    def __init__(self, export_dir, name, extra=()):
        dlsuite = pathlib.Path(sys.executable).with_name("dlsuite")
        program = [str(dlsuite)] if dlsuite.exists() else [sys.executable, "-m", "dlsuite.apps.cli"]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
        self.name = name
        self.process = subprocess.Popen(
            program + ["serve", str(export_dir), "--model-name", name, "--host", "127.0.0.1", "--port", "0",
                       *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines = []
        self._listening = queue.Queue()
        # Drains the server's output for as long as it runs, so a full pipe never stalls it.
        threading.Thread(target=self._read, daemon=True).start()
        self.port = self._wait_for_port()
        self._wait_until_available()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            match = re.search(r"on http://127\.0\.0\.1:(\d+)/", line)
            if match:
                self._listening.put(int(match.group(1)))
        self._listening.put(None)

    def _wait_for_port(self):
        try:
            port = self._listening.get(timeout=START_SECONDS)
        except queue.Empty:
            port = None
        if port is None:
            self.stop()
            raise RuntimeError("dlsuite serve did not start:\n" + "\n".join(self.lines[-30:]))
        return port

    def _wait_until_available(self):
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            status, body = request(self.port, "GET", f"/v1/models/{self.name}")
            if status == 200 and json.loads(body)["model_version_status"][0]["state"] == "AVAILABLE":
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} never became AVAILABLE:\n" + "\n".join(self.lines[-30:]))

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def request(port, method, path, body=None):
    """One request on a fresh connection: (status, body bytes)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def _concurrently(clients, work):
    """Runs `work(client)` in `clients` threads started together; returns (per-client results, seconds)."""
    barrier = threading.Barrier(clients + 1)
    results, errors = [None] * clients, []

    def run(client):
        try:
            barrier.wait()
            results[client] = work(client)
        except Exception as error:  # reported after the round, in this thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(client,)) for client in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    return results, seconds


def http_round(port, path, body, *, clients, requests, connections, latencies):
    """`clients` clients each sending `requests` POSTs of `body` one after the other.

    Returns (requests answered, seconds) for `common.interleaved`; appends
    this round's per-request seconds to `latencies`.
    """
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}

    def client(index):
        connection = connections[index]
        times = []
        for _ in range(requests):
            start = time.perf_counter()
            connection.request("POST", path, body=body, headers=headers)
            answer = connection.getresponse()
            data = answer.read()
            times.append(time.perf_counter() - start)
            if answer.status != 200:
                raise RuntimeError(f"POST {path}: {answer.status} {data[:500]!r}")
        return times

    per_client, seconds = _concurrently(clients, client)
    latencies.append([t for times in per_client for t in times])
    return clients * requests, seconds


def local_round(call, *, clients, requests, latencies):
    """`clients` threads each calling the signature `requests` times; as `http_round`."""
    def client(_):
        times = []
        for _ in range(requests):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return times

    per_client, seconds = _concurrently(clients, client)
    latencies.append([t for times in per_client for t in times])
    return clients * requests, seconds


def _percentiles(rounds, warmup):
    """p50 and p99 in milliseconds of the timed rounds' requests (the first `warmup` rounds left out)."""
    times = np.asarray([t for timed in rounds[warmup:] for t in timed]) * 1000
    return {"p50": float(np.percentile(times, 50)), "p99": float(np.percentile(times, 99)), "requests": len(times)}


def batch_totals(port, name):
    """(requests, batches) the server ran in batches for model `name` so far, from its metrics."""
    status, page = request(port, "GET", "/monitoring/prometheus/metrics")
    pattern = rf'^dlsuite_serve_batch_requests_(sum|count)\{{model_name="{re.escape(name)}"\}} (\S+)$'
    values = dict(re.findall(pattern, page.decode(), re.MULTILINE)) if status == 200 else {}
    return float(values.get("sum", 0)), float(values.get("count", 0))


def compare(name, *, port, path, body, call, clients, requests, repeats, mode, config, labels, bar=None,
            model=None):
    """One row: the HTTP rounds against the in-process rounds, interleaved."""
    before = batch_totals(port, model) if model else None
    connections = [http.client.HTTPConnection("127.0.0.1", port, timeout=300) for _ in range(clients)]
    http_latencies, local_latencies = [], []
    warmup = 1
    try:
        rates = common.interleaved({
            "http": lambda: http_round(port, path, body, clients=clients, requests=requests,
                                       connections=connections, latencies=http_latencies),
            "local": lambda: local_round(call, clients=clients, requests=requests, latencies=local_latencies),
        }, warmup=warmup, repeats=repeats)
    finally:
        for connection in connections:
            connection.close()
    ours, reference = _percentiles(http_latencies, warmup), _percentiles(local_latencies, warmup)
    batch_words = ""
    if model:
        after = batch_totals(port, model)
        batches = after[1] - before[1]
        batch_words = f"; mean batch {(after[0] - before[0]) / batches:.1f} requests" if batches else ""
    ours_rate, local_rate = statistics.median(rates["http"]), statistics.median(rates["local"])
    return common.report(
        name, ours=rates["http"], reference=rates["local"], mode=mode, unit="requests/s", bar=bar,
        config={**config, "clients": clients, "requests_per_client": requests, "repeats": repeats,
                "warmup_repeats": warmup, "body_bytes": len(body)},
        latency_ms={"ours": ours, "reference": reference},
        details=f"{clients} client{'s' if clients > 1 else ''}, batch 1, {len(body):,}-byte body: "
                f"{ours_rate:.1f} req/s, p50 {ours['p50']:.1f} ms, p99 {ours['p99']:.1f} ms over HTTP; "
                f"in-process {local_rate:.1f} calls/s, p50 {reference['p50']:.1f} ms, p99 {reference['p99']:.1f} ms "
                f"({ours['requests']} timed requests each side){batch_words}",
        **labels,
    )


def _png(pixels):
    from PIL import Image

    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def benchmark_model(name, *, requests, png_requests, repeats, mode, folder, batching_requests=None):
    """The rows of one model: JSON pixels at each client count, then a PNG file at 1 client."""
    import tensorflow as tf

    from dlsuite.apps.vision import export

    size, channels, classes = MODELS[name]
    export.export_classifier(_classifier(name), class_names=[f"class_{i}" for i in range(classes)],
                             name=name, base_dir=folder, version=1)
    model_dir = pathlib.Path(folder) / name
    signatures = tf.saved_model.load(str(model_dir / "1")).signatures
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, channels), dtype=np.uint8)
    png = _png(pixels)
    config = {"model": name, "image_size": size, "channels": channels, "classes": classes, "batch": 1,
              "weights": "untrained (random init)", "client": "http.client, kept-alive, body encoded once"}
    path = f"/v1/models/{name}:predict"
    server = ServerProcess(model_dir, name)
    try:
        # The same answer both ways, or the comparison means nothing.
        status, answer = request(server.port, "POST", path, json.dumps({"instances": [pixels.tolist()]}))
        served = np.asarray(json.loads(answer)["predictions"][0]["probabilities"])
        local = signatures["serving_default"](images=tf.constant(pixels[np.newaxis]))["probabilities"].numpy()[0]
        if status != 200 or np.abs(served - local).max() > 1e-5:
            raise AssertionError(f"{name}: the server answered {status} {answer[:300]!r}, not the local answer")

        body = json.dumps({"instances": [pixels.tolist()]}).encode()
        batch = tf.constant(pixels[np.newaxis])
        for clients, count in requests.items():
            compare(f"http_{name}_c{clients}", port=server.port, path=path, body=body,
                    call=lambda: signatures["serving_default"](images=batch)["probabilities"].numpy(),
                    clients=clients, requests=count, repeats=repeats, mode=mode,
                    config={**config, "input": "instances: uint8 pixels as JSON numbers, serving_default"},
                    bar=0.8 if name == "resnet50" and clients == 1 else None, labels={
                        "ours_label": "POST :predict {\"instances\": [HxWxC pixels]} to `dlsuite serve` "
                                      "(serving_default, JSON numbers)",
                        "reference_label": "tf.saved_model.load(export).signatures['serving_default'] called "
                                           "in-process, same pixels (uint8 tensor), same number of threads"})
        if png_requests:
            png_body = json.dumps({"signature_name": "serving_bytes",
                                   "instances": [{"b64": base64.b64encode(png).decode("ascii")}]}).encode()
            files = tf.constant([png])
            compare(f"http_{name}_png_c1", port=server.port, path=path, body=png_body,
                    call=lambda: signatures["serving_bytes"](image_bytes=files)["probabilities"].numpy(),
                    clients=1, requests=png_requests, repeats=repeats, mode=mode,
                    config={**config, "input": f"instances: one b64 PNG ({len(png):,} bytes), serving_bytes"},
                    bar=0.8 if name == "resnet50" else None, labels={
                        "ours_label": "POST :predict {\"signature_name\": \"serving_bytes\", \"instances\": "
                                      "[{\"b64\": PNG}]} to `dlsuite serve`",
                        "reference_label": "the serving_bytes signature called in-process on the same PNG bytes"})
    finally:
        server.stop()
    if batching_requests:
        server = ServerProcess(model_dir, name, extra=BATCHING_FLAGS)
        try:
            for clients, count in batching_requests.items():
                compare(f"http_{name}_batching_c{clients}", port=server.port, path=path, body=body,
                        call=lambda: signatures["serving_default"](images=batch)["probabilities"].numpy(),
                        clients=clients, requests=count, repeats=repeats, mode=mode, model=name,
                        config={**config, "input": "instances: uint8 pixels as JSON numbers, serving_default",
                                "server_flags": " ".join(BATCHING_FLAGS)}, labels={
                            "ours_label": "POST :predict {\"instances\": [HxWxC pixels]} to `dlsuite serve "
                                          + " ".join(BATCHING_FLAGS) + "`",
                            "reference_label": "tf.saved_model.load(export).signatures['serving_default'] called "
                                               "in-process at batch 1, same pixels, same number of threads"})
        finally:
            server.stop()


def main(argv=None):
    args = common.parse_args(__doc__, argv)
    mode = "quick" if args.quick else "full"
    repeats = common.MIN_REPEATS if args.quick else 7
    with tempfile.TemporaryDirectory() as folder:
        if args.quick:
            benchmark_model("lenet5", requests=QUICK_REQUESTS, png_requests=0, repeats=repeats, mode=mode,
                            folder=folder, batching_requests=QUICK_BATCHING_REQUESTS)
            return
        for name in ("lenet5", "resnet50"):
            benchmark_model(name, requests=REQUESTS[name], png_requests=PNG_REQUESTS[name], repeats=repeats,
                            mode=mode, folder=folder, batching_requests=BATCHING_REQUESTS[name])


if __name__ == "__main__":
    main()
