"""`dlsuite serve`: serve SavedModels over TensorFlow Serving's REST and gRPC APIs, and a page at `/`.

The work lives in `repository` (versions on disk), `model_config` (a
--model-config-file), `tensors` (the JSON), `calls` (the predict step),
`server` (HTTP), `grpc_server` (gRPC), `batching` and `batching_config`
(--enable-batching) and `page` (the HTML); this module
reads the command line, tells model folders from base folders (or reads the
model config file), and starts the server.
"""

import argparse
import functools
import pathlib

from dlsuite.apps.core import train_args
from dlsuite.apps.core.errors import UsageError

GRPC_PORT = 8500  # TensorFlow Serving's gRPC port
EPILOG = """examples:
  dlsuite serve                                        # every model under saved_models/
  dlsuite serve saved_models/lenet5_digits --port 8501
  dlsuite serve saved_models/lenet5_digits saved_models/lstm_stdlib-docstrings
  dlsuite serve exports/pets/ --model-name pets --host 0.0.0.0
  dlsuite serve --model-config-file models.config      # TF Serving's ModelServerConfig: policies, labels
  dlsuite serve --enable-batching --max-batch-size 32 --batch-timeout-micros 2000

then, as against TensorFlow Serving:
  curl http://127.0.0.1:8501/v1/models/lenet5_digits
  curl http://127.0.0.1:8501/v1/models/lenet5_digits/metadata
  curl -d '{"signature_name": "serving_bytes", "instances": [{"b64": "'$(base64 -w0 digit.png)'"}]}' \\
      http://127.0.0.1:8501/v1/models/lenet5_digits:predict
  curl -d '{"inputs": {"prompt": "Return the ", "length": 200, "temperature": 0.7, "seed": 1}}' \\
      http://127.0.0.1:8501/v1/models/lstm_stdlib-docstrings:predict
and open http://127.0.0.1:8501/ in a browser. gRPC clients (tensorflow-serving-api's stubs) call
127.0.0.1:8500, TensorFlow Serving's gRPC port (--grpc-port; docs/serving.md has a client).
"""


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "serve", help="serve exported models over TensorFlow Serving's REST API, with a page for people",
        description="Serve SavedModels the way TensorFlow Serving's REST API does (/v1/models/NAME, "
                    ":predict, /metadata), so that a client written against one works against the other. "
                    "Versions are the integer subfolders; the highest is the default, new ones are loaded and "
                    "removed ones unloaded while serving. http://HOST:PORT/ is a page to try the models.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("export_dirs", nargs="*", metavar="EXPORT_DIR", default=[],
                        help="a model folder (holding version folders 1/, 2/, ...) or a folder of model folders "
                             "(default: saved_models, or the models of --model-config-file)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=train_args.port, default=8501, help="port (default 8501, TensorFlow Serving's REST "
                                                                 "port; 0: any free port)")
    parser.add_argument("--grpc-port", type=grpc_port, default=None,
                        help="port of TensorFlow Serving's gRPC API (PredictionService, ModelService) (default 8500, "
                             "TensorFlow Serving's, or any free port when --port is 0; 0: any free port; "
                             "off: no gRPC)")
    parser.add_argument("--model-name", help="the name to serve a single model folder under (default: its "
                                             "folder name)")
    parser.add_argument("--model-config-file", metavar="FILE",
                        help="TensorFlow Serving's ModelServerConfig in text format: the models to serve, their "
                             "base_path, model_version_policy (latest N, all, specific) and version_labels; "
                             "re-read on SIGHUP (docs/serving.md)")
    parser.add_argument("--model-config-file-poll-wait-seconds", type=train_args.non_negative_float, default=0.0,
                        metavar="SECONDS", help="also re-read --model-config-file every SECONDS (default 0: only "
                                                "on SIGHUP)")
    parser.add_argument("--poll-seconds", type=train_args.positive_float("--poll-seconds"), default=2.0,
                        help="how often to look for new and removed versions (default 2)")
    parser.add_argument("--max-body-mb", type=train_args.positive_float("--max-body-mb"), default=16.0,
                        help="largest request body in MiB; larger ones get 413 (default 16)")
    parser.add_argument("--trust-model", action="store_true",
                        help="serve SavedModels whose graph reads or writes files or prints (ReadFile, WriteFile, "
                             "PrintV2, what `saved_model_cli scan` flags); such versions are refused by default, "
                             "since a SavedModel is a program: pass it only for models you trust")
    batching = parser.add_argument_group(
        "request batching", "TensorFlow Serving's --enable_batching: concurrent requests to one signature, with the "
                            "same inner shapes, run as one batch (docs/serving.md). Defaults are TensorFlow "
                            "Serving's; a flag overrides the parameters file")
    batching.add_argument("--enable-batching", action="store_true",
                          help="join concurrent predict requests into batches (REST and gRPC)")
    batching.add_argument("--batching-parameters-file", metavar="FILE",
                          help="TensorFlow Serving's BatchingParameters in text format "
                               "(max_batch_size { value: 32 } ...)")
    batching.add_argument("--max-batch-size", type=positive_int("--max-batch-size"), metavar="N",
                          help="most rows in a batch; a request of more is refused (default 1000); with "
                               "--enable-large-batch-splitting, most rows in a request")
    batching.add_argument("--enable-large-batch-splitting", action="store_const", const=True, default=None,
                          help="split a request into pieces that fill the open batch and then batches of "
                               "--max-execution-batch-size rows; its answer is the pieces' joined")
    batching.add_argument("--max-execution-batch-size", type=positive_int("--max-execution-batch-size"),
                          metavar="N", help="with --enable-large-batch-splitting: most rows in a batch run "
                                            "(default --max-batch-size)")
    batching.add_argument("--batch-timeout-micros", type=non_negative_int("--batch-timeout-micros"), metavar="US",
                          help="how long a batch that is not full waits for more requests (default 0: it runs "
                               "as soon as a batch thread is free)")
    batching.add_argument("--num-batch-threads", type=positive_int("--num-batch-threads"), metavar="N",
                          help="batches run at once (default: one per core)")
    batching.add_argument("--max-enqueued-batches", type=positive_int("--max-enqueued-batches"), metavar="N",
                          help="batches waiting per signature before requests are refused with 503 / UNAVAILABLE "
                               "(default 10)")
    batching.add_argument("--allowed-batch-sizes", type=batch_sizes, metavar="N,N,...",
                          help="pad each batch up to the next of these sizes (increasing, the last one "
                               "--max-batch-size, or --max-execution-batch-size when requests are split)")
    parser.set_defaults(func=run)


BATCHING_FLAGS = ("max_batch_size", "batch_timeout_micros", "num_batch_threads", "max_enqueued_batches",
                  "allowed_batch_sizes", "enable_large_batch_splitting", "max_execution_batch_size")


def positive_int(option):
    """argparse type: an integer >= 1, with `option` and the received text in the error."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option} expects an integer, received {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{option} must be at least 1, received {text!r}")
        return value

    return parse


def non_negative_int(option):
    """argparse type: an integer >= 0, with `option` and the received text in the error."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = -1
        if value < 0:
            raise argparse.ArgumentTypeError(f"{option} expects an integer >= 0, received {text!r}")
        return value

    return parse


def batch_sizes(text):
    """argparse type of --allowed-batch-sizes: "8,16,32" -> (8, 16, 32)."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--allowed-batch-sizes expects integers separated by commas, received "
                                         f"{text!r}") from None


def batching_options(args):
    """The BatchingOptions of --enable-batching and its flags and file, or None without it.

    Raises:
        UsageError: a bad parameters file or value, or a batching flag
            without --enable-batching (TensorFlow Serving refuses its
            --batching_parameters_file without --enable_batching too).
    """
    from dlsuite.apps.serve import batching_config

    given = {name: getattr(args, name) for name in BATCHING_FLAGS}
    if not args.enable_batching:
        named = [name for name, value in given.items() if value is not None]
        if args.batching_parameters_file is not None:
            named.insert(0, "batching_parameters_file")
        if named:
            raise UsageError(f"{named[0]} is set without --enable-batching; add --enable-batching",
                             option=named[0])
        return None
    return batching_config.options(parameters_file=args.batching_parameters_file, **given)


def grpc_port(text):
    """argparse type of --grpc-port: a TCP port 0..65535 (0: any free port), or "off" (returned as -1)."""
    if text.strip().lower() == "off":
        return -1
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--grpc-port expects a port or 'off', received {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"--grpc-port must be 0..65535 (0: any free port) or 'off', "
                                         f"received {text!r}")
    return value


def choose_grpc_port(grpc_port_arg, rest_port):
    """The gRPC port to bind, or None for no gRPC.

    Not given: 8500, TensorFlow Serving's, unless the REST port is 0 (any
    free port): then any free port too, so that servers started side by
    side (tests, benchmarks) do not fight over 8500.
    """
    if grpc_port_arg is None:
        return 0 if rest_port == 0 else GRPC_PORT
    return None if grpc_port_arg < 0 else grpc_port_arg


def resolve_folders(paths, model_name=None):
    """Splits the given folders into models and bases.

    A folder with integer-named subfolders is a model (named after the
    folder, or `model_name`); any other folder is a base whose subfolders
    are models, watched for new ones. With `model_name`, the one folder
    given is the model even before its first version appears.

    Returns:
        ({name: model folder}, [base folders]).

    Raises:
        UsageError: a missing folder, a version folder, two models of one
            name, or `model_name` with more than one folder.
    """
    models, bases = {}, []
    if model_name is not None:
        if len(paths) != 1:
            raise UsageError(f"model_name names one model; pass one model folder, received {len(paths)} folders",
                             option="model_name")
        if not model_name or "/" in model_name or ":" in model_name:
            raise UsageError(f"model_name must be a name usable in a URL (no '/' or ':'), received {model_name!r}",
                             option="model_name")
    for path in map(pathlib.Path, paths):
        if not path.is_dir():
            raise UsageError(f"{path} is not a folder; pass a model folder (holding 1/, 2/, ...) or a folder of "
                             "models such as saved_models/", option="export_dirs")
        if (path / "saved_model.pb").is_file():
            raise UsageError(f"{path} is a version folder (it holds saved_model.pb); pass the folder above it, "
                             f"{path.resolve().parent}, whose integer subfolders are the versions",
                             option="export_dirs")
        if model_name is not None or _has_versions(path):
            name = model_name or path.resolve().name
            if ":" in name:
                raise UsageError(f"{path}: a model name cannot hold ':' (it ends the name in a :predict URL); "
                                 "pass --model-name", option="export_dirs")
            if name in models:
                raise UsageError(f"two model folders are named {name!r} ({models[name]} and {path}); serve them "
                                 "one at a time with --model-name", option="export_dirs")
            models[name] = path
        else:
            bases.append(path)
    return models, bases


def _has_versions(folder):
    return any(child.is_dir() and child.name.isascii() and child.name.isdigit() for child in folder.iterdir())


def run(args):
    from dlsuite.apps.serve import model_config
    from dlsuite.apps.serve.repository import Repository, load_version
    from dlsuite.apps.serve.grpc_server import BindError
    from dlsuite.apps.serve.server import MIB, Server, bind
    import asyncio

    configs = None
    if args.model_config_file is not None:
        if args.export_dirs or args.model_name is not None:
            raise UsageError("model_config_file names the models to serve; pass it without EXPORT_DIR and "
                             "--model-name", option="model_config_file")
        configs = model_config.read(args.model_config_file)  # a bad file: one line, before anything loads
        models, bases = {}, []
    else:
        models, bases = resolve_folders(args.export_dirs or ["saved_models"], args.model_name)
    batching = batching_options(args)  # a bad file: one line, before anything loads
    log = functools.partial(print, flush=True)
    loader = functools.partial(load_version, trust_model=args.trust_model)
    repository = Repository(models=models, bases=bases, poll_seconds=args.poll_seconds, log=log, loader=loader,
                            configs=configs)
    server = Server(repository, max_body_bytes=args.max_body_mb * MIB, poll_seconds=args.poll_seconds, log=log,
                    config_file=args.model_config_file, configs=configs,
                    config_poll_seconds=args.model_config_file_poll_wait_seconds, batching_options=batching)
    try:
        sock = bind(args.host, args.port)
    except OSError as error:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {error.strerror or error}; pick another "
                         "--port or --host", option="port") from None
    grpc_port_number = choose_grpc_port(args.grpc_port, args.port)
    try:
        asyncio.run(server.serve(sock, host=args.host, grpc_port=grpc_port_number))
    except BindError as error:
        raise UsageError(f"cannot listen for gRPC on {args.host}:{grpc_port_number}: {error}; pick another "
                         "--grpc-port (or --grpc-port off)", option="grpc_port") from None
    finally:
        sock.close()
    return 0
