"""The HTTP side of `dlsuite serve`: TensorFlow Serving's REST API on aiohttp.

Why aiohttp: the server must keep answering while a request runs a slow
graph (a language model sampling 2,000 characters, a ResNet-50 batch) and
while clients misbehave (a half-sent body, a body over the limit, a
dropped connection). aiohttp is a mature, actively released asyncio HTTP
server (since 2014, used in production widely) with one install and no
compiler: it parses HTTP/1.1 and keep-alive for us, enforces a body limit
(`client_max_size`) before the body is buffered, drains what a refused
client still sends so it reads its 413, and never lets one handler's
exception take the process down. Its event loop holds thousands of idle
connections on one thread; the CPU work of a request (JSON decoding, the
TensorFlow call, JSON encoding) runs in a thread pool (`run_in_executor`),
so it never blocks other requests: TensorFlow releases the GIL while it
computes, and two requests run side by side. The standard library's
`http.server` would mean parsing and limits by hand and a thread per
connection; Flask or FastAPI bring a WSGI/ASGI server and more packages for
no gain here.

Routes, as TensorFlow Serving matches them (`http_rest_api_util.cc`, case
insensitive):

=====================================================  =====================================
GET  /v1/models/NAME[/versions/N|/labels/L]            model_version_status
GET  /v1/models/NAME[/versions/N|/labels/L]/metadata   model_spec and signature_def
POST /v1/models/NAME[/versions/N|/labels/L]:predict    predictions (instances) or outputs (inputs)
GET  /monitoring/prometheus/metrics                    Prometheus metrics (`metrics.py`)
GET  /                                                 the page for people (`page.py`)
GET  /dlsuite/models                                   models, versions, kind, signatures, requests (the page's)
=====================================================  =====================================

With `--model-config-file` (`model_config.py`), SIGHUP and every
`--model-config-file-poll-wait-seconds` re-read the file (`reload_config`)
and apply it to the repository without a restart.

TensorFlow Serving's gRPC API (`--grpc-port`) is `grpc_server.py`, on the same
event loop, repository, worker threads and metrics; the predict step both
protocols run is `calls.run_signature`; with `--enable-batching` it joins
concurrent calls through the server's `batching.Batcher`.

Every error is `{"error": message}` with TensorFlow Serving's status for it
(`errors.HTTP_STATUS`): 400 for malformed JSON, both `instances` and
`inputs`, a wrong dtype or shape, an unknown signature (TensorFlow Serving
answers that one with INVALID_ARGUMENT, `GetInfoMap` in
`http_rest_api_handler.cc`, not NOT_FOUND); 404 for an unknown model or
version; 413 for a body over `--max-body-mb`. A bug in this server answers
500 with its traceback on stderr, and the server goes on.
"""

import asyncio
import concurrent.futures
import functools
import os
import re
import signal
import socket
import sys
import time
import traceback

from aiohttp import web

from dlsuite.apps.core.errors import UsageError
from dlsuite.apps.serve import batching, calls, grpc_server, metrics, model_config, page, tensors
from dlsuite.apps.serve.errors import ServingError, invalid
from dlsuite.apps.serve.repository import DEFAULT_SIGNATURE

_V1 = re.compile(r"/v1(/.*)?", re.IGNORECASE)
# A version label (`model_config.py`) stands where a version number may: TensorFlow Serving's
# http_rest_api_handler.cc matches (?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))? too.
_PREDICT = re.compile(r"/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/([^/:]+))?:(classify|regress|predict)",
                      re.IGNORECASE)
_STATUS = re.compile(r"/v1/models(?:/([^/:]+))?(?:/versions/(\d+)|/labels/([^/:]+))?(?:/(metadata))?",
                     re.IGNORECASE)
_INT64_MAX = (1 << 63) - 1
MIB = 1 << 20
# Most worker threads set aside for requests waiting for their batch (--enable-batching).
_MAX_WAITING = 256
# request[...] keys: the model call a request is (its metrics labels), and its error's canonical code.
_CALL = "dlsuite.call"
_STATUS_NAME = "dlsuite.status_name"


def predict(repository, name, version, body, *, label=None, call=None, batcher=None):
    """Answers one `:predict` body (bytes) with the JSON-ready response; raises ServingError.

    Args:
        label: a version label, instead of `version`.
        call: a dict whose "version" is set to the version that answers, once
            known (the metrics' label), whatever happens after.
        batcher: the server's `batching.Batcher` (--enable-batching), or None.
    """
    request = tensors.parse_request(body)
    served = repository.get(name, version, label=label)
    if call is not None:
        call["version"] = served.number
    signature_name = request.get("signature_name") or DEFAULT_SIGNATURE
    signature = served.signatures.get(signature_name)
    if signature is None:
        raise invalid(f'Serving signature name: "{signature_name}" not found in signature def '
                      f"(this model has: {', '.join(sorted(served.signatures)) or 'none'})")
    arrays = tensors.inputs_from_request(request, signature.inputs)
    outputs = calls.run_signature(served, signature_name, arrays, hint=_scalar_hint(request, signature),
                                  batcher=batcher)
    return tensors.response(outputs, tensors.request_format(request))


def _scalar_hint(request, signature):
    """Why a row-format request to a signature with scalar inputs was refused: each was given a batch axis."""
    scalars = sorted(name for name, spec in signature.inputs.items() if spec.shape == ())
    if not scalars or tensors.request_format(request) != "row":
        return ""
    return (f" (the scalar input{'s' if len(scalars) > 1 else ''} {', '.join(scalars)} got a batch dimension from "
            "the row format; send the columnar format, {\"inputs\": {...}})")


def _predict_response(repository, name, version, label, body, call, batcher):
    return _json(predict(repository, name, version, body, label=label, call=call, batcher=batcher))


def metadata(repository, name, version, *, label=None, call=None):
    """GetModelMetadataResponse in TensorFlow Serving's JSON layout (`label`, `call`: as `predict`'s)."""
    served = repository.get(name, version, label=label)
    if call is not None:
        call["version"] = served.number
    return {
        "model_spec": {"name": name, "signature_name": "", "version": str(served.number)},
        "metadata": {"signature_def": {"signature_def": served.signature_defs}},
    }


def _json(value, status=200):
    return web.Response(text=tensors.dumps(value), status=status, content_type="application/json")


def _error(message, status):
    return _json({"error": message}, status=status)


class Server:
    """The aiohttp application over a `repository.Repository`.

    Args:
        repository: the models to serve.
        max_body_bytes: requests with a larger body get 413.
        poll_seconds: how often the model folders are scanned.
        workers: threads for the requests' CPU work.
        log: where the start and stop lines go.
        config_file: the model config file the repository was configured
            from (`model_config.py`), re-read on SIGHUP and every
            `config_poll_seconds` (0: on SIGHUP only), or None.
        configs: the ModelConfigs read from it at start-up.
        batching_options: `batching_config.BatchingOptions` to join concurrent
            predict calls into batches (--enable-batching), or None.
    """

    def __init__(self, repository, *, max_body_bytes=16 * MIB, poll_seconds=2.0, workers=None, log=print,
                 config_file=None, configs=None, config_poll_seconds=0.0, batching_options=None):
        self.repository = repository
        self.max_body_bytes = int(max_body_bytes)
        self.poll_seconds = poll_seconds
        self.config_file = config_file
        self.config_poll_seconds = config_poll_seconds
        self._configs = configs
        self._log = log
        self.metrics = metrics.Metrics(repository)
        self.batcher = None
        if batching_options is not None:
            self.batcher = batching.Batcher(batching_options, observe=self.metrics.record_batch)
            # A request waits for its batch on a worker thread: enough of them to fill a batch of
            # one-row requests, besides those parsing and answering.
            workers = workers or min(32, (os.cpu_count() or 1) + 4) + min(batching_options.max_batch_size, _MAX_WAITING)
        self._workers = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="serve")
        # Loads get their own thread: a slow load never holds up a request.
        self._scanner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="serve-scan")

    def application(self):
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[self._count, self._errors])
        app.router.add_get("/", self._page)
        app.router.add_get("/dlsuite/models", self._models)
        app.router.add_get(metrics.PATH, self._metrics)
        app.router.add_route("*", "/{path:.*}", self._dispatch)
        return app

    @web.middleware
    async def _count(self, request, handler):
        """Counts each model call (`_dispatch` marks them) with the status `_errors` gave it."""
        started = time.perf_counter()
        response = await handler(request)
        call = request.get(_CALL)
        if call is not None:
            self.metrics.record(model=call["model"], version=call["version"], api=call["api"],
                                code=response.status, status_name=request.get(_STATUS_NAME),
                                seconds=time.perf_counter() - started)
        return response

    @web.middleware
    async def _errors(self, request, handler):
        try:
            return await handler(request)
        except ServingError as error:
            request[_STATUS_NAME] = error.code
            return _error(error.message, error.http_status)
        except web.HTTPRequestEntityTooLarge:
            return self._too_large(None)
        except web.HTTPException as error:
            if error.status < 400:
                raise
            return _error(f"{error.reason}: {request.method} {request.path}", error.status)
        except ConnectionResetError:  # the client went away mid-body: nobody reads this answer
            return _error("Connection lost while reading the request", 400)
        except Exception as error:  # a bug here: the client is told, the server goes on
            traceback.print_exc(file=sys.stderr)
            return _error(f"Internal error in dlsuite serve: {type(error).__name__}: {error}", 500)

    def _too_large(self, size):
        received = f" ({size} bytes)" if size is not None else ""
        return _error(f"Request body too large{received}: over the limit of {self.max_body_bytes} bytes "
                      f"(dlsuite serve --max-body-mb {self.max_body_bytes / MIB:g})", 413)

    async def _page(self, request):
        return web.Response(text=page.HTML, content_type="text/html", charset="utf-8")

    async def _models(self, request):
        described = self.repository.describe()
        totals = self.metrics.request_totals()
        for model in described["models"]:  # the page shows the rate from two of these
            model["requests_total"] = totals.get(model["name"], 0)
        return _json(described)

    async def _metrics(self, request):
        body, content_type = self.metrics.exposition(request.headers.get("Accept"))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _dispatch(self, request):
        path = request.path
        if not _V1.fullmatch(path):
            return _error(f"Not found: {request.method} {path}; the REST API is under /v1/models/NAME", 404)
        if request.method == "POST":
            match = _PREDICT.fullmatch(path)
            if match:
                request[_CALL] = {"model": match.group(1), "api": match.group(4).lower(), "version": None}
                return await self._predict(request, match)
        elif request.method == "GET":
            match = _STATUS.fullmatch(path)
            if match:
                if match.group(1):
                    request[_CALL] = {"model": match.group(1), "api": "metadata" if match.group(4) else "status",
                                      "version": None}
                return self._status(match, request.get(_CALL))
        raise invalid(f"Malformed request: {request.method} {path}")

    async def _predict(self, request, match):
        name, version_text, label, method = match.groups()
        version = _version(version_text)
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            return self._too_large(request.content_length)
        body = await request.read()  # HTTPRequestEntityTooLarge past the limit, chunked or not
        if method.lower() != "predict":
            raise ServingError(f"dlsuite serve answers :predict only, not :{method}; "
                               "send the same inputs to :predict", code="UNIMPLEMENTED")
        # One trip to the pool for the JSON in, the call and the JSON out: on a busy machine every
        # hand-over between threads waits for a core.
        return await self.offload(_predict_response, self.repository, name, version, label, body, request[_CALL],
                                  self.batcher)

    def _status(self, match, call):
        name, version_text, label, subresource = match.groups()
        if not name:
            raise invalid("Missing model name in request.")
        version = _version(version_text)
        if subresource:
            return _json(metadata(self.repository, name, version, label=label, call=call))
        if label is not None:  # the status of the version the label names
            version = self.repository.label_version(name, label)
        answer = {"model_version_status": self.repository.status(name, version)}
        call["version"] = version
        return _json(answer)

    async def offload(self, function, *args):
        """function(*args) on the worker threads: the CPU work of a request (REST's and gRPC's)."""
        return await asyncio.get_running_loop().run_in_executor(self._workers, functools.partial(function, *args))

    # -- running -------------------------------------------------------------------------------------

    async def serve(self, sock, *, host, grpc_port=None):
        """Scans once, serves on the bound socket `sock` until SIGINT/SIGTERM, polling the folders.

        Args:
            host: the address `sock` is bound to, for the start-up line (and gRPC's).
            grpc_port: TensorFlow Serving's gRPC API on host:grpc_port too
                (0: a free port; None: no gRPC).

        Raises:
            grpc_server.BindError: the gRPC port cannot be bound (before any model loads).
        """
        loop = asyncio.get_running_loop()
        grpc_api = None
        if grpc_port is not None:
            grpc_api = grpc_server.GrpcServer(self.repository, metrics=self.metrics, executor=self._workers,
                                              max_message_bytes=self.max_body_bytes, batcher=self.batcher)
            grpc_port = grpc_api.start(host, grpc_port)
        try:
            await loop.run_in_executor(self._scanner, self.repository.scan)
            runner = web.AppRunner(self.application(), access_log=None, handle_signals=False)
            await runner.setup()
            await web.SockSite(runner, sock).start()
        except BaseException:
            if grpc_api is not None:
                await grpc_api.stop(grace=0)
            raise
        port = sock.getsockname()[1]
        names = self.repository.names()
        where = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        grpc_where = f"; gRPC API: {grpc_server.address(host, grpc_port)}" if grpc_api is not None else ""
        self._log(f"serve: {len(names)} model{'' if len(names) == 1 else 's'} ({', '.join(names) or 'none yet'}) "
                  f"on {where}/ (REST API: {where}/v1/models/NAME{grpc_where})")
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        tasks = set()  # held until done: the loop keeps only weak references to tasks

        def start(coroutine):
            task = asyncio.create_task(coroutine)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        start(self._poll())
        if self.config_file is not None:
            loop.add_signal_handler(signal.SIGHUP, lambda: start(self._reload("SIGHUP")))
            if self.config_poll_seconds > 0:
                start(self._poll_config())
        try:
            await stop.wait()
        finally:
            for task in list(tasks):
                task.cancel()
            if grpc_api is not None:
                await grpc_api.stop(grace=1.0)
            await runner.cleanup()
            if self.batcher is not None:
                self.batcher.close()
            self._workers.shutdown(wait=False, cancel_futures=True)
            self._scanner.shutdown(wait=False, cancel_futures=True)
        self._log("serve: stopped")

    async def _poll(self):
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.poll_seconds)
            try:
                await loop.run_in_executor(self._scanner, self.repository.scan)
            except Exception:  # a bug in scanning: say so, keep serving and polling
                traceback.print_exc(file=sys.stderr)


    async def _poll_config(self):
        while True:
            await asyncio.sleep(self.config_poll_seconds)
            await self._reload("poll")

    async def _reload(self, why):
        try:
            await asyncio.get_running_loop().run_in_executor(self._scanner, self.reload_config, why)
        except Exception:  # a bug in reloading: say so, keep serving
            traceback.print_exc(file=sys.stderr)

    def reload_config(self, why):
        """Re-reads the model config file and, when it changed, applies it and scans (on the scan thread).

        A file that cannot be read or is not valid keeps the config in force,
        with one line saying why. Returns whether the config changed.
        """
        try:
            configs = model_config.read(self.config_file)
        except UsageError as error:
            line = re.sub(r"^model_config_file\b", "--model-config-file", str(error))
            self._log(f"serve: cannot re-read the model config ({why}): {line}; keeping the previous config")
            return False
        if configs == self._configs:
            return False
        self._configs = configs
        self.repository.configure(configs)
        names = ", ".join(config.name for config in configs) or "none"
        self._log(f"serve: model config {self.config_file} re-read ({why}): {len(configs)} "
                  f"model{'' if len(configs) == 1 else 's'} ({names})")
        self.repository.scan()
        return True


def _version(text):
    if not text:
        return None
    number = int(text)
    if number > _INT64_MAX:
        raise invalid(f"Failed to convert version: {text} to numeric.")
    return number


def bind(host, port):
    """A socket bound to host:port (0: a free port), before any model loads, so a taken port fails at once.

    Raises:
        OSError: the address cannot be resolved or bound.
    """
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock
