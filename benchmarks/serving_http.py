"""`dlsuite serve` over HTTP: `:predict` against calling the same signature in-process.

    python -m benchmarks.serving_http               # LeNet-5 and ResNet-50, batch 1, 1, 8 and 32 clients
    python -m benchmarks.serving_http --quick       # LeNet-5 only, few requests
    python -m benchmarks.serving_http --part grpc   # only the gRPC rows (parts: http, grpc)

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
  Not in --quick.
* `http_{model}_png_c1`: one client sending the image as a PNG file,
  `{"signature_name": "serving_bytes", "instances": [{"b64": ...}]}`, the
  form a production client sends an image in (TensorFlow Serving's guide
  does), against the `serving_bytes` signature called in-process on the
  same file's bytes.
* `grpc_{model}_c{N}` (part `grpc`): N clients, each with its own channel
  and `PredictionServiceStub` (the `tensorflow-serving-api` package's),
  sending blocking `Predict` calls with the pixels as a uint8 `TensorProto`
  to the server's gRPC port, against the same N clients sending the REST
  requests of `http_{model}_c{N}` to the same server, so the ratio is
  gRPC / REST. Bar at 1 client: >= 1.5 (issue #26: no JSON); the details
  give gRPC's p99 / p50, which the issue wants within 2.

The two sides alternate repeat by repeat (the server idles while the
in-process side runs, and the other way round), and the rows report the
requests per second and the p50 and p99 latency of every timed request.
"""

import atexit
import base64
import concurrent.futures
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

import grpc
import numpy as np

from benchmarks import common
from benchmarks.serving_latency import MODELS, _classifier

# Requests each client sends per timed repeat: a repeat of about a second or more.
REQUESTS = {"lenet5": {1: 100, 8: 25, 32: 8}, "resnet50": {1: 8, 8: 3}}
QUICK_REQUESTS = {1: 10, 8: 3}
GRPC_REQUESTS = {"lenet5": {1: 200, 8: 50}}  # both sides of a gRPC row send these: about 0.4 s a repeat
QUICK_GRPC_REQUESTS = {1: 10}
BATCHING_REQUESTS = {"lenet5": {1: 100, 8: 25, 32: 8}, "resnet50": {8: 3}}
# --quick starts no batching server: its rows only have to come out, a second server costs a
# TensorFlow start (about 7 s of a core, in the suite's quick run), and tests/test_serve_batching.py
# drives a real batching server.
# No timeout, a batch thread per core (TensorFlow Serving's default): a batch runs as soon as a thread is
# free, and the requests that came while both were busy make up the next one, so one client waits for
# nothing. A 1 ms timeout cost a third of the rate at 1 client here (340 against 520 requests/s) and
# gained nothing sure at 8 or 32 clients.
BATCHING_FLAGS = ("--enable-batching", "--max-batch-size", "32", "--batch-timeout-micros", "0")
PNG_REQUESTS = {"lenet5": 100, "resnet50": 8}
START_SECONDS = 300  # importing TensorFlow and loading ResNet-50 on a busy 2-core machine
PARTS = ("http", "grpc")


class ServerProcess:
    """`dlsuite serve` in a subprocess; `port` (REST) and `grpc_port` once it listens, `stop()` to end it."""

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
        self.port, self.grpc_port = self._wait_for_port()
        self._wait_until_available()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            match = re.search(r"on http://127\.0\.0\.1:(\d+)/", line)
            if match:
                # With --port 0 and no --grpc-port, gRPC takes a free port too; the same line names it.
                grpc_match = re.search(r"gRPC API: 127\.0\.0\.1:(\d+)\)", line)
                self._listening.put((int(match.group(1)), int(grpc_match.group(1)) if grpc_match else None))
        self._listening.put(None)

    def _wait_for_port(self):
        try:
            ports = self._listening.get(timeout=START_SECONDS)
        except queue.Empty:
            ports = None
        if ports is None:
            self.stop()
            raise RuntimeError("dlsuite serve did not start:\n" + "\n".join(self.lines[-30:]))
        return ports

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


def grpc_round(stubs, predict_request, *, clients, requests, latencies):
    """`clients` clients each sending `requests` blocking `Predict` calls on its own stub; as `http_round`."""
    def client(index):
        stub = stubs[index]
        times = []
        for _ in range(requests):
            start = time.perf_counter()
            stub.Predict(predict_request, timeout=300)  # a failed call raises grpc.RpcError
            times.append(time.perf_counter() - start)
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


def compare_grpc(name, *, server, path, body, predict_request, clients, requests, repeats, mode, config, labels,
                 bar=None):
    """One row: gRPC Predict rounds against the REST rounds of the same requests to the same server, interleaved."""
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    channels = [grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") for _ in range(clients)]
    stubs = [prediction_service_pb2_grpc.PredictionServiceStub(channel) for channel in channels]
    connections = [http.client.HTTPConnection("127.0.0.1", server.port, timeout=300) for _ in range(clients)]
    grpc_latencies, http_latencies = [], []
    warmup = 1
    try:
        rates = common.interleaved({
            "grpc": lambda: grpc_round(stubs, predict_request, clients=clients, requests=requests,
                                       latencies=grpc_latencies),
            "http": lambda: http_round(server.port, path, body, clients=clients, requests=requests,
                                       connections=connections, latencies=http_latencies),
        }, warmup=warmup, repeats=repeats)
    finally:
        for connection in connections:
            connection.close()
        for channel in channels:
            channel.close()
    ours, reference = _percentiles(grpc_latencies, warmup), _percentiles(http_latencies, warmup)
    ours_rate, http_rate = statistics.median(rates["grpc"]), statistics.median(rates["http"])
    tail = ours["p99"] / ours["p50"]
    message_bytes = predict_request.ByteSize()
    return common.report(
        name, ours=rates["grpc"], reference=rates["http"], mode=mode, unit="requests/s", bar=bar,
        config={**config, "clients": clients, "requests_per_client": requests, "repeats": repeats,
                "warmup_repeats": warmup, "request_message_bytes": message_bytes, "body_bytes": len(body)},
        latency_ms={"ours": ours, "reference": reference}, p99_over_p50=tail,
        details=f"{clients} client{'s' if clients > 1 else ''}, batch 1: {ours_rate:.1f} req/s, "
                f"p50 {ours['p50']:.2f} ms, p99 {ours['p99']:.2f} ms (p99/p50 {tail:.2f}, target <= 2) over gRPC "
                f"({message_bytes:,}-byte message); REST {http_rate:.1f} req/s, p50 {reference['p50']:.2f} ms, "
                f"p99 {reference['p99']:.2f} ms ({len(body):,}-byte body) ({ours['requests']} timed requests "
                f"each side)",
        **labels,
    )


def _png(pixels):
    from PIL import Image

    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def export_model(name, folder):
    """Exports classifier `name` as version 1 into `folder`; returns the model's folder."""
    from dlsuite.apps.vision import export

    _, _, classes = MODELS[name]
    export.export_classifier(_classifier(name), class_names=[f"class_{i}" for i in range(classes)],
                             name=name, base_dir=folder, version=1)
    return pathlib.Path(folder) / name


def benchmark_model(name, *, requests, png_requests, repeats, mode, folder, batching_requests=None,
                    grpc_requests=None, servers=None):
    """The rows of one model: JSON pixels at each client count, a PNG file at 1 client, gRPC against REST at
    each client count of `grpc_requests`, then the batching server's rows.

    `servers`: `start_servers`' servers of the model exported in `folder`, used instead of exporting it
    and starting each server when its rows come.
    """
    import tensorflow as tf

    size, channels, classes = MODELS[name]
    model_dir = pathlib.Path(folder) / name if servers else export_model(name, folder)
    servers = servers or {}

    def serving(extra=()):
        return servers[extra].result() if extra in servers else ServerProcess(model_dir, name, extra=extra)

    signatures = tf.saved_model.load(str(model_dir / "1")).signatures
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, channels), dtype=np.uint8)
    png = _png(pixels)
    config = {"model": name, "image_size": size, "channels": channels, "classes": classes, "batch": 1,
              "weights": "untrained (random init)", "client": "http.client, kept-alive, body encoded once"}
    path = f"/v1/models/{name}:predict"
    body = json.dumps({"instances": [pixels.tolist()]}).encode()
    batch = tf.constant(pixels[np.newaxis])
    server = serving() if requests or png_requests or grpc_requests else None
    try:
        # The same answer both ways, or the comparison means nothing.
        local = signatures["serving_default"](images=batch)["probabilities"].numpy()[0]
        if server is not None:
            status, answer = request(server.port, "POST", path, body)
            served = np.asarray(json.loads(answer)["predictions"][0]["probabilities"])
            if status != 200 or np.abs(served - local).max() > 1e-5:
                raise AssertionError(f"{name}: the server answered {status} {answer[:300]!r}, not the local answer")
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
        if grpc_requests:
            predict_request = _predict_request(name, pixels)
            check_grpc(server, predict_request, local, name=name)
            for clients, count in grpc_requests.items():
                compare_grpc(f"grpc_{name}_c{clients}", server=server, path=path, body=body,
                             predict_request=predict_request, clients=clients, requests=count, repeats=repeats,
                             mode=mode, bar=1.5 if clients == 1 else None,
                             config={**config, "input": "uint8 pixels: a TensorProto over gRPC, JSON numbers over REST",
                                     "grpc_client": "grpcio, a channel and PredictionServiceStub per client, "
                                                    "blocking Predict, request message built once"},
                             labels={
                                 "ours_label": "PredictionService.Predict over gRPC to `dlsuite serve` "
                                               "(serving_default, uint8 TensorProto, tensorflow-serving-api stubs)",
                                 "reference_label": "POST :predict {\"instances\": [HxWxC pixels]} to the same server "
                                                    "over REST, same clients, interleaved"})
    finally:
        if server is not None:
            server.stop()
    if batching_requests:
        server = serving(BATCHING_FLAGS)
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


def start_servers(name, folder, *, batching=True):
    """Exports classifier `name` into `folder` and starts its servers on a thread, plain then (with
    `batching`) with BATCHING_FLAGS, each once the one before serves (each imports TensorFlow, which
    takes a core): {their extra flags: a future of the serving ServerProcess}."""
    model_dir = export_model(name, folder)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    flags = ((), BATCHING_FLAGS) if batching else ((),)
    servers = {extra: pool.submit(ServerProcess, model_dir, name, extra) for extra in flags}
    pool.shutdown(wait=False)
    return servers


# --quick's LeNet-5 servers, started by `start_early`: (their temporary folder, `start_servers`' servers).
_early = None


def start_early():
    """`python -m benchmarks --quick` calls this beside an earlier benchmark: the servers' imports of
    TensorFlow, most of this benchmark's time, run there."""
    global _early
    folder = tempfile.TemporaryDirectory()
    _early = folder, start_servers("lenet5", folder.name, batching=False)
    atexit.register(_stop_servers, _early[1])  # a run stopped before this benchmark's turn leaves none behind


def _stop_servers(servers):
    """Stops `start_servers`' servers that started (stopping one twice does nothing)."""
    for server in servers.values():
        if server.done() and server.exception() is None:
            server.result().stop()


def _predict_request(name, pixels):
    """The gRPC PredictRequest of one image to `name`'s serving_default signature."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    predict_request = predict_pb2.PredictRequest()
    predict_request.model_spec.name = name
    predict_request.model_spec.signature_name = "serving_default"
    predict_request.inputs["images"].CopyFrom(tf.make_tensor_proto(pixels[np.newaxis]))
    return predict_request


def check_grpc(server, predict_request, local, *, name):
    """Raises unless the server's gRPC answer is the in-process answer `local`."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(predict_request, timeout=120)
    served = tf.make_ndarray(response.outputs["probabilities"])[0]
    if np.abs(served - local).max() > 1e-5:
        raise AssertionError(f"{name}: the gRPC answer {served} is not the local answer {local}")


def main(argv=None):
    global _early
    args = common.parse_args(__doc__, argv, parts=PARTS)
    mode = "quick" if args.quick else "full"
    repeats = common.MIN_REPEATS if args.quick else 7
    rest_part, grpc_part = "http" in args.part, "grpc" in args.part
    if args.quick:
        if _early is None:
            start_early()
        (folder, servers), _early = _early, None
        with folder:
            try:
                benchmark_model("lenet5", requests=QUICK_REQUESTS if rest_part else {}, png_requests=0,
                                repeats=repeats, mode=mode, folder=folder.name, servers=servers,
                                grpc_requests=QUICK_GRPC_REQUESTS if grpc_part else {})
            finally:
                concurrent.futures.wait(servers.values())
                _stop_servers(servers)  # those the rows did not need, or a failure left
        return
    with tempfile.TemporaryDirectory() as folder:
        for name in ("lenet5", "resnet50"):
            grpc_requests = GRPC_REQUESTS.get(name, {}) if grpc_part else {}
            if not rest_part and not grpc_requests:
                continue
            benchmark_model(name, requests=REQUESTS[name] if rest_part else {},
                            png_requests=PNG_REQUESTS[name] if rest_part else 0,
                            repeats=repeats, mode=mode, folder=folder,
                            batching_requests=BATCHING_REQUESTS[name] if rest_part else {}, grpc_requests=grpc_requests)


if __name__ == "__main__":
    main()
