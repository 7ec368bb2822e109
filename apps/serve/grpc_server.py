"""The gRPC side of `dlsuite serve`: TensorFlow Serving's PredictionService and ModelService.

A client written for TensorFlow Serving's gRPC port (8500) with the stubs of
the `tensorflow-serving-api` package works unchanged against this one:

=======================================  ==========================================================
PredictionService.Predict                PredictRequest (TensorProto inputs, output_filter) -> outputs
PredictionService.GetModelMetadata       metadata_field "signature_def" -> SignatureDefMap in an Any
ModelService.GetModelStatus              model_version_status, as REST's GET /v1/models/NAME
Classify, Regress, MultiInference,       UNIMPLEMENTED, as REST's :classify and :regress
HandleReloadConfigRequest
=======================================  ==========================================================

It serves the repository REST serves (the same versions, loads and polls),
with grpc's thread-pool server on the REST server's worker threads: each call
runs there whole (its TensorProto conversion and the TensorFlow call through
`calls.run_signature`, the step REST runs), so a slow graph never blocks
other requests of either protocol. grpc.aio on the REST server's asyncio loop
took a hop more per call (the loop, then a worker thread, then the loop):
LeNet-5 answered 0.86x REST's requests/s at one client that way, 0.98x on
the threads (`python -m benchmarks --only serving_http --part grpc`).
Errors are TensorFlow Serving's status codes with its messages (`predict_util.cc`,
`get_model_metadata_impl.cc`, `server_core.cc`): NOT_FOUND for an unknown
model or version (also the version a label names, when it is not loaded),
INVALID_ARGUMENT for a wrong dtype, a missing or extra input, an unknown
output_filter, a version label the model does not have, or a shape the
graph refuses; FAILED_PRECONDITION for an unknown signature (TensorFlow
Serving's gRPC Predict says so; its REST API says INVALID_ARGUMENT);
RESOURCE_EXHAUSTED for a message over `--max-body-mb` (gRPC's own check,
before any handler: such a request is not in the metrics) or a tensor that
would unpack past it; UNAVAILABLE when the batching queue is full
(`--enable-batching`, `batching.py`). Each answered request is counted in
the metrics with protocol="grpc".
"""

import asyncio
import sys
import time
import traceback

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc,
                                     predict_pb2, prediction_service_pb2_grpc)

from dlsuite.apps.serve import calls
from dlsuite.apps.serve.errors import ServingError, invalid
from dlsuite.apps.serve.repository import DEFAULT_SIGNATURE

_METADATA_FIELDS = ("signature_def",)


class BindError(OSError):
    """The gRPC address cannot be bound (taken, or not this machine's)."""


class GrpcServer:
    """TensorFlow Serving's gRPC API over a `repository.Repository`, its calls on `executor`'s threads.

    Args:
        repository: the models to serve (REST's).
        metrics: the server's `metrics.Metrics`.
        executor: the worker threads the calls run on (`server.Server`'s).
        max_message_bytes: larger requests are refused (RESOURCE_EXHAUSTED).
        batcher: the server's `batching.Batcher` (--enable-batching), or None.
    """

    def __init__(self, repository, *, metrics, executor, max_message_bytes, batcher=None):
        self.repository = repository
        self.metrics = metrics
        self.executor = executor
        self.max_message_bytes = int(max_message_bytes)
        self.batcher = batcher
        self._server = None

    def start(self, host, port):
        """Listens on host:port (0: a free port); returns the port bound.

        Raises:
            BindError: the address cannot be bound.
        """
        self._server = grpc.server(self.executor, options=[
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second server on a taken port must fail, not share it
        ])
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(_PredictionService(self), self._server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(_ModelService(self), self._server)
        try:
            bound = self._server.add_insecure_port(address(host, port))
        except RuntimeError as error:  # grpc's "Failed to bind to address"
            raise BindError(str(error)) from None
        if not bound:
            raise BindError(f"cannot bind {address(host, port)}")
        self._server.start()
        return bound

    async def stop(self, grace=1.0):
        """Stops listening; requests in flight get `grace` seconds to finish."""
        if self._server is not None:
            stopped = self._server.stop(grace)
            await asyncio.get_running_loop().run_in_executor(None, stopped.wait)

    def answer(self, context, *, api, model, work):
        """Runs `work(call)` on this thread, counts it, and turns a ServingError into the gRPC status
        of its canonical code; `call["version"]` is the version that answered."""
        started = time.perf_counter()
        call = {"version": None}
        status_name, message, response = "OK", None, None
        try:
            response = work(call)
        except ServingError as error:
            status_name, message = error.code, error.message
        except Exception as error:  # a bug here: the client is told, the server goes on
            traceback.print_exc(file=sys.stderr)
            status_name, message = "INTERNAL", f"Internal error in dlsuite serve: {type(error).__name__}: {error}"
        code = grpc.StatusCode[status_name] if status_name in grpc.StatusCode.__members__ else grpc.StatusCode.UNKNOWN
        self.metrics.record(model=model, version=call["version"], api=api, code=code.value[0], status_name=code.name,
                            seconds=time.perf_counter() - started, protocol="grpc")
        if message is not None:
            context.abort(code, message)  # raises
        return response

    # -- the calls, each run whole on a worker thread ------------------------------------------------------

    def predict(self, request, call):
        """PredictResponse for a PredictRequest; raises ServingError."""
        served = self._version(request.model_spec, call)
        signature_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
        signature = served.signatures.get(signature_name)
        if signature is None:
            raise ServingError(f'Serving signature key "{signature_name}" not found. (this model has: '
                               f"{', '.join(sorted(served.signatures)) or 'none'})", code="FAILED_PRECONDITION")
        arrays = self._inputs(request.inputs, signature)
        names = _output_names(request.output_filter, signature)
        outputs = calls.run_signature(served, signature_name, arrays, batcher=self.batcher)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = served.number
        response.model_spec.signature_name = signature_name
        for name in names:
            response.outputs[name].CopyFrom(tf.make_tensor_proto(outputs[name]))
        return response

    def metadata(self, request, call):
        """GetModelMetadataResponse: the signature_def map of the version asked for."""
        if not request.HasField("model_spec"):
            raise invalid("Missing ModelSpec")
        if not request.metadata_field:
            raise invalid("GetModelMetadataRequest must specify at least one metadata_field")
        for field in request.metadata_field:
            if field not in _METADATA_FIELDS:
                raise invalid(f"Metadata field {field} is not supported")
        served = self._version(request.model_spec, call)
        signature_defs = json_format.ParseDict({"signature_def": served.signature_defs},
                                               get_model_metadata_pb2.SignatureDefMap())
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = served.number
        response.metadata["signature_def"].Pack(signature_defs)
        return response

    def status(self, request, call):
        """GetModelStatusResponse: every version's state (or the one asked for), highest first."""
        spec = request.model_spec
        if not spec.name:
            raise invalid("Missing model name in request.")
        version = spec.version.value if spec.HasField("version") else None
        if spec.WhichOneof("version_choice") == "version_label":  # the status of the version the label names
            version = self.repository.label_version(spec.name, spec.version_label)
        call["version"] = version
        return json_format.ParseDict({"model_version_status": self.repository.status(spec.name, version)},
                                     get_model_status_pb2.GetModelStatusResponse())

    def _version(self, spec, call):
        choice = spec.WhichOneof("version_choice")
        served = self.repository.get(spec.name, spec.version.value if choice == "version" else None,
                                     label=spec.version_label if choice == "version_label" else None)
        call["version"] = served.number
        return served

    def _inputs(self, protos, signature):
        """{input: np.ndarray} of a request's TensorProtos, each checked against the signature's dtype."""
        expected, sent = set(signature.inputs), set(protos)
        if expected != sent:
            extra, missing = ",".join(sorted(sent - expected)), ",".join(sorted(expected - sent))
            raise invalid(f"input size does not match signature: {len(sent)}!={len(expected)} "
                          f"len({{{','.join(sorted(expected))}}}). Sent extra: {{{extra}}}. "
                          f"Missing but required: {{{missing}}}.")
        arrays = {}
        for name in sorted(sent):
            proto, wanted = protos[name], signature.tf_dtypes[name]
            if proto.dtype != wanted.as_datatype_enum:
                try:
                    given = tf.as_dtype(proto.dtype).name
                except TypeError:
                    raise invalid(f"tensor parsing error: {name}") from None
                raise invalid(f"Expects input {name} to be {wanted.name} but {given} is provided")
            self._check_size(name, proto, wanted)
            try:
                arrays[name] = tf.make_ndarray(proto)
            except (TypeError, ValueError):  # values that do not fill the shape, a negative dimension
                raise invalid(f"tensor parsing error: {name}") from None
        return arrays

    def _check_size(self, name, proto, dtype):
        """A shape larger than the message limit is refused before it is unpacked (`make_ndarray` repeats
        the last value to fill the shape: three bytes could ask for terabytes)."""
        dims = [dim.size for dim in proto.tensor_shape.dim]
        if proto.tensor_shape.unknown_rank or any(size < 0 for size in dims):
            raise invalid(f"tensor parsing error: {name}")
        count = int(np.prod(dims, dtype=object)) if dims else 1
        size = count * (1 if dtype == tf.string else dtype.size)
        if size > self.max_message_bytes:
            raise ServingError(f"input {name} of shape {dims} holds {size} bytes, over the limit of "
                               f"{self.max_message_bytes} bytes (dlsuite serve --max-body-mb)",
                               code="RESOURCE_EXHAUSTED")


def _output_names(output_filter, signature):
    """The outputs a request asks for: its output_filter, checked, or every output."""
    seen = []
    for name in output_filter:
        if name not in signature.outputs:
            raise invalid(f"output tensor alias not found in signature: {name} Outputs expected to be in the set "
                          f"{{{','.join(sorted(signature.outputs))}}}.")
        if name in seen:
            raise invalid(f"duplicate output tensor alias: {name}")
        seen.append(name)
    return seen or sorted(signature.outputs)


def address(host, port):
    """host:port as gRPC writes it ([::1]:8500 for an IPv6 address)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _unimplemented(what):
    def method(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED,
                      f"dlsuite serve answers Predict, GetModelMetadata and GetModelStatus, not {what}")
    return method


class _PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, server):
        self._server = server

    def Predict(self, request, context):  # noqa: N802 (the service's method names)
        return self._server.answer(context, api="predict", model=request.model_spec.name,
                                   work=lambda call: self._server.predict(request, call))

    def GetModelMetadata(self, request, context):  # noqa: N802
        return self._server.answer(context, api="metadata", model=request.model_spec.name,
                                   work=lambda call: self._server.metadata(request, call))

    Classify = _unimplemented("Classify; send the same inputs to Predict")
    Regress = _unimplemented("Regress; send the same inputs to Predict")
    MultiInference = _unimplemented("MultiInference")


class _ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, server):
        self._server = server

    def GetModelStatus(self, request, context):  # noqa: N802
        return self._server.answer(context, api="status", model=request.model_spec.name,
                                   work=lambda call: self._server.status(request, call))

    HandleReloadConfigRequest = _unimplemented("HandleReloadConfigRequest; edit the --model-config-file and send "
                                               "the server SIGHUP")
