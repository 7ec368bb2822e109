"""`dlsuite serve --enable-batching`: the batching parameters, from flags and TF Serving's parameters file.

The file is TensorFlow Serving's `--batching_parameters_file`, a
`tensorflow.serving.BatchingParameters` in protobuf text format
(`tensorflow_serving/servables/tensorflow/session_bundle_config.proto`):

    max_batch_size { value: 32 }
    batch_timeout_micros { value: 2000 }
    max_enqueued_batches { value: 100 }
    num_batch_threads { value: 4 }
    allowed_batch_sizes: 8
    allowed_batch_sizes: 32
    enable_large_batch_splitting { value: true }
    max_execution_batch_size { value: 32 }

The `tensorflow-serving-api` package ships the config messages but not
`session_bundle_config_pb2`, so the message is declared here, field for
field with the same numbers and types (wrappers for the scalars, as there),
and the file is parsed by protobuf's own `text_format`: the same grammar,
and its line and column in an error. A parameter not set keeps TensorFlow
Serving's default (`SharedBatchScheduler::QueueOptions` and `Options` in
TensorFlow's `shared_batch_scheduler.h`): max_batch_size 1000,
batch_timeout_micros 0, max_enqueued_batches 10, num_batch_threads one per
core. A flag given on the command line overrides the file.

With `enable_large_batch_splitting`, as in TensorFlow Serving
(`bundle_factory_util.h`, `GetQueueOptions`), `max_batch_size` bounds a
request and `max_execution_batch_size` (default: max_batch_size) a batch
run: a larger request is split to fill batches. Without it,
`max_execution_batch_size` is ignored, as there.
"""

import dataclasses
import os
import pathlib

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

from dlsuite.apps.core.errors import UsageError
from dlsuite.apps.serve import text_proto

OPTION = "batching_parameters_file"
# TensorFlow Serving's defaults (shared_batch_scheduler.h).
DEFAULT_MAX_BATCH_SIZE = 1000
DEFAULT_BATCH_TIMEOUT_MICROS = 0
DEFAULT_MAX_ENQUEUED_BATCHES = 10
# (field, number, wrapper type) of session_bundle_config.proto's BatchingParameters.
_WRAPPED = (("max_batch_size", 1, "Int64Value"), ("batch_timeout_micros", 2, "Int64Value"),
            ("max_enqueued_batches", 3, "Int64Value"), ("num_batch_threads", 4, "Int64Value"),
            ("thread_pool_name", 5, "StringValue"), ("enable_large_batch_splitting", 8, "BoolValue"),
            ("max_execution_batch_size", 9, "Int64Value"))


@dataclasses.dataclass(frozen=True)
class BatchingOptions:
    """How requests are joined into batches (`batching.Batcher`); TensorFlow Serving's names and defaults."""

    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    batch_timeout_micros: int = DEFAULT_BATCH_TIMEOUT_MICROS
    max_enqueued_batches: int = DEFAULT_MAX_ENQUEUED_BATCHES
    num_batch_threads: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    allowed_batch_sizes: tuple = ()
    enable_large_batch_splitting: bool = False
    max_execution_batch_size: int = None  # with splitting; None: max_batch_size

    @property
    def execution_batch_size(self):
        """The most rows a batch runs with: max_execution_batch_size when requests are split, else max_batch_size."""
        if self.enable_large_batch_splitting and self.max_execution_batch_size is not None:
            return self.max_execution_batch_size
        return self.max_batch_size

    def padded_size(self, rows):
        """The batch size `rows` rows run at: the next allowed size, or `rows` itself when none are given."""
        return next((size for size in self.allowed_batch_sizes if size >= rows), rows)


def _message_class():
    """BatchingParameters, declared in a pool of its own (the package does not ship it)."""
    pool = descriptor_pool.DescriptorPool()
    wrappers = descriptor_pb2.FileDescriptorProto()
    wrappers_pb2.DESCRIPTOR.CopyToProto(wrappers)
    pool.Add(wrappers)
    proto = descriptor_pb2.FileDescriptorProto(name="dlsuite/batching_parameters.proto", package="tensorflow.serving",
                                               syntax="proto3", dependency=["google/protobuf/wrappers.proto"])
    message = proto.message_type.add(name="BatchingParameters")
    field = descriptor_pb2.FieldDescriptorProto
    for name, number, wrapper in _WRAPPED:
        message.field.add(name=name, number=number, label=field.LABEL_OPTIONAL, type=field.TYPE_MESSAGE,
                          type_name=f".google.protobuf.{wrapper}")
    message.field.add(name="allowed_batch_sizes", number=6, label=field.LABEL_REPEATED, type=field.TYPE_INT64)
    message.field.add(name="pad_variable_length_inputs", number=7, label=field.LABEL_OPTIONAL, type=field.TYPE_BOOL)
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters"))


BatchingParameters = _message_class()


def parse(text, *, path):
    """{parameter: value} of the fields a BatchingParameters text sets; `path` names the file in errors.

    Raises:
        UsageError: one line naming the file (and protobuf's line and column
            for a parse error), also for what we do not do
            (pad_variable_length_inputs).
    """
    message = BatchingParameters()
    text_proto.parse(text, message, path=path, option=OPTION)
    if message.pad_variable_length_inputs:
        raise UsageError(f"{OPTION} {path}: pad_variable_length_inputs is not supported; requests of different "
                         "shapes are batched apart", option=OPTION)
    values = {name: getattr(message, name).value for name, _, _ in _WRAPPED if message.HasField(name)
              and name != "thread_pool_name"}  # one pool of batch threads here
    if message.allowed_batch_sizes:
        values["allowed_batch_sizes"] = tuple(message.allowed_batch_sizes)
    return values


def read(path):
    """`parse` of the file at `path`; an unreadable file is a UsageError too."""
    return parse(text_proto.read(path, option=OPTION), path=pathlib.Path(path))


def options(*, parameters_file=None, **flags):
    """The BatchingOptions of a parameters file and the flags given (None: not given), flags first.

    Raises:
        UsageError: a bad file, or values TensorFlow Serving would refuse:
            a size, count or thread number below 1, a negative timeout,
            max_execution_batch_size above max_batch_size, allowed_batch_sizes
            not increasing or not ending at the largest batch that runs
            (max_batch_size, or max_execution_batch_size when requests are
            split: its own checks, `batching_session.cc`).
    """
    values = read(parameters_file) if parameters_file is not None else {}
    source = {name: f"{OPTION} {parameters_file}: {name}" for name in values}
    for name, value in flags.items():
        if value is not None:
            values[name] = tuple(value) if name == "allowed_batch_sizes" else value
            source[name] = name
    for name in ("max_batch_size", "max_enqueued_batches", "num_batch_threads", "max_execution_batch_size"):
        if name in values and values[name] < 1:
            raise UsageError(f"{source[name]} must be at least 1, received {values[name]}",
                             option=_option(source[name]))
    if values.get("batch_timeout_micros", 0) < 0:
        raise UsageError(f"{source['batch_timeout_micros']} must be 0 or more, received "
                         f"{values['batch_timeout_micros']}", option=_option(source["batch_timeout_micros"]))
    result = BatchingOptions(**values)
    if result.execution_batch_size > result.max_batch_size:
        where = source["max_execution_batch_size"]
        raise UsageError(f"{where} must be at most max_batch_size ({result.max_batch_size}), received "
                         f"{result.execution_batch_size}", option=_option(where))
    sizes = result.allowed_batch_sizes
    if sizes:
        where = source["allowed_batch_sizes"]
        if any(size < 1 for size in sizes) or list(sizes) != sorted(set(sizes)):
            raise UsageError(f"{where} must be increasing sizes of at least 1, received "
                             f"{','.join(map(str, sizes))}", option=_option(where))
        if sizes[-1] != result.execution_batch_size:  # TensorFlow Serving's words, with and without splitting
            rule = ("must be equal to max_execution_batch_size" if result.enable_large_batch_splitting
                    else "must match max_batch_size")
            raise UsageError(f"{where}: last entry in allowed_batch_sizes {rule}; last entry was {sizes[-1]}; "
                             f"expected {result.execution_batch_size}", option=_option(where))
    return result


def _option(source):
    """The option an error's first word is (the CLI shows it as its flag): the flag's, or the file's."""
    return OPTION if source.startswith(OPTION) else source
