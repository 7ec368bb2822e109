"""Command-line options every training app shares: the optimizer and its
schedule, epochs and batch size, the strategy and precision, the run
directory and export. One definition, so `classify`, `lm` and the apps after
them speak the same language. Also the option types other commands share
(`--input-shape` for `models show` and `diagnose memory`)."""

import argparse
import dataclasses

from dlsuite.apps.core import choices, export_precision
from dlsuite.apps.core.errors import UsageError


def positive_int(text):
    """argparse type: an integer >= 1, with the received text in the error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, received {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, received {text!r}")
    return value


def positive_float(option):
    """argparse type: a number > 0 (finite), with `option` and the received text in the error."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option} expects a number, received {text!r}") from None
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{option} must be > 0, received {text!r}")
        return value

    return parse


def port(text):
    """argparse type: a TCP port 0..65535 (0: any free port)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--port expects an integer, received {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"--port must be 0..65535 (0: any free port), received {text!r}")
    return value


def non_negative_float(text):
    """argparse type: a number >= 0, with the received text in the error."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, received {text!r}")
    return value


def size_pair(text):
    """argparse type for --input-size H,W (or one number for a square)."""
    parts = [part.strip() for part in text.split(",")]
    try:
        size = [int(part) for part in parts]
    except ValueError:
        size = []
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise argparse.ArgumentTypeError(f"expected HEIGHT,WIDTH such as 224,224, received {text!r}")
    return size


def parse_input_shape(text, kind):
    """Parses `--input-shape` for a `kind` ("cnn" or "rnn") model into a tuple.

    Raises:
        UsageError: naming the value and an example when it is malformed.
    """
    expected = (
        "H,W,C: three positive integers, e.g. 224,224,3" if kind == "cnn"
        else "T or T,F: time steps[, features] as positive integers, e.g. 35 or 100,8"
    )
    lengths = (3,) if kind == "cnn" else (1, 2)
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) not in lengths or any(dim < 1 for dim in shape):
        raise UsageError(f"--input-shape {text!r} must be {expected}.")
    return shape


def augment_kinds(text):
    """--augment KINDS: a comma-separated subset of choices.AUGMENTATIONS."""
    kinds = [kind.strip() for kind in text.split(",") if kind.strip()]
    if not kinds or any(kind not in choices.AUGMENTATIONS for kind in kinds):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(choices.AUGMENTATIONS)}, received {text!r}; "
            "for example --augment rotation,zoom,translation"
        )
    return kinds


def monitor_names(text):
    """argparse type for --monitor: a comma-separated subset of choices.MONITORS, or all."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["all"]:
        return list(choices.MONITORS)
    if not names or any(name not in choices.MONITORS for name in names):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(choices.MONITORS)} (or all), received {text!r}"
        )
    return list(dict.fromkeys(names))


def add_image_split_arguments(group):
    """The options every image app shares after --dataset: unreadable files,
    the split fractions, the generated shapes and the TFDS folder."""
    group.add_argument("--strict", action="store_true", help="stop at an unreadable image instead of skipping it")
    group.add_argument("--validation-fraction", type=float, default=0.15)
    group.add_argument("--test-fraction", type=float, default=0.15)
    group.add_argument("--validation-data", metavar="FOLDER",
                       help="a folder (one subfolder per class) used whole for validation: nothing of --dataset is "
                            "split off for it (the train/val/test layout of ImageNet and Kaggle)")
    group.add_argument("--test-data", metavar="FOLDER", help="a folder used whole as the test split, likewise")
    group.add_argument("--shapes-classes", type=positive_int, default=4, help="shapes: number of classes")
    group.add_argument("--shapes-size", type=positive_int, default=64, help="shapes: image side in pixels")
    group.add_argument("--shapes-count", type=positive_int, default=1200, help="shapes: number of images")
    group.add_argument("--data-dir", help="tfds: where TensorFlow Datasets keeps its files")
    group.add_argument("--cache", choices=("auto", "memory", "disk", "none"), default="auto",
                       help="where decoded images wait between epochs (uint8 at the model's size): auto keeps the "
                            "training and validation images in memory while they fit a quarter of the free memory "
                            "(at most 1.5 GB), "
                            "else in a file under --cache-dir if given, else decodes them every epoch (the first "
                            "lines say which); disk: a file under --cache-dir; none: decode every epoch")
    group.add_argument("--data-service", metavar="grpc://HOST:PORT",
                       help="send the reading and decoding of training images to the tf.data service at this "
                            "dispatcher (`dlsuite data dispatcher`, `dlsuite data worker`); no cache then, and the "
                            "order within an epoch is the workers' (docs/scaling.md)")
    group.add_argument("--cache-dir", metavar="DIR",
                       help="a local folder for --cache disk (default ~/.cache/dlsuite/images); files are named by "
                            "what they hold and reused by later runs on the same images")


@dataclasses.dataclass
class ImageSplitConfig:
    """The config fields of `add_image_split_arguments`, shared by the image apps' configs."""

    strict: bool = False
    validation_fraction: float = 0.15
    test_fraction: float = 0.15
    shapes_classes: int = 4
    shapes_size: int = 64
    shapes_count: int = 1200
    data_dir: str | None = None
    validation_data: str | None = None  # folders used whole as those splits
    test_data: str | None = None
    cache: str = "auto"  # image_cache.MODES
    cache_dir: str | None = None
    data_service: str | None = None  # grpc://HOST:PORT of a tf.data service dispatcher


def add_training_arguments(parser, *, app, epochs, optimizer="adam", clip_norm=None, batch_size=None, lr=None, export_default,
                           lr_schedule="constant", resumable=True, model_parallel=False):
    """Adds the training, hardware and output option groups to `parser`.

    Args:
        app: the app's name, for the default run directory in the help.
        epochs: default --epochs; None: the app counts epochs its own way.
        optimizer: default --optimizer.
        clip_norm: default --clip-norm (None: off).
        batch_size: default --batch-size (None: the device's default).
        lr: default --lr (None: the optimizer's default).
        lr_schedule: default --lr-schedule.
        export_default: how the default export name is made, for the help.
        resumable: offer --resume.
        model_parallel: offer --model-parallel (the app's task splits its model, `models.parallel`).
    """
    training = parser.add_argument_group("training")
    if epochs is not None:
        training.add_argument("--epochs", type=positive_int, default=epochs, help=f"epochs (L-BFGS: iterations), default {epochs}")
    training.add_argument("--batch-size", type=positive_int, default=batch_size,
                          help=f"global batch size, split across replicas (default {batch_size or '32 on CPU, 128 on GPU'})")
    training.add_argument("--optimizer", choices=choices.OPTIMIZERS, default=optimizer)
    training.add_argument("--lr", type=float, default=lr,
                          help=f"learning rate (default {lr or '0.001 for adam/rmsprop, 0.01 for the sgd family, 1 for lbfgs'})")
    training.add_argument("--momentum", type=float, default=0.9)
    training.add_argument("--weight-decay", type=float, default=0.0)
    training.add_argument("--clip-norm", type=float, default=clip_norm,
                          help=f"clip the global gradient norm, e.g. 5 (default {clip_norm or 'off'})")
    # None until parsed: --optimizer lbfgs (its own line search) takes no app default schedule.
    training.add_argument("--lr-schedule", choices=choices.SCHEDULES, default=None,
                          help=f"cosine decays the rate to 0 over all --epochs (default {lr_schedule}; constant for lbfgs)")
    parser.set_defaults(app_lr_schedule=lr_schedule)
    training.add_argument("--lr-drop", type=float, default=0.5, help="step/plateau factor (default 0.5)")
    training.add_argument("--lr-every", type=positive_int, default=10, help="step decay period in epochs (default 10)")
    training.add_argument("--lr-decay", type=float, default=0.1, help="exponential: lr*(1-d)^epoch; 1/t: lr/(1+d*epoch) (default 0.1)")
    training.add_argument("--warmup-epochs", type=int, default=0)
    training.add_argument("--lr-patience", type=positive_int, default=3, help="plateau: epochs without improvement")
    training.add_argument("--early-stopping", type=int, default=0, metavar="PATIENCE",
                          help="stop after PATIENCE epochs without val_loss improvement (0: off)")
    training.add_argument("--seed", type=int, default=0, help="seeds splits, initialization and shuffling; on CPU the run is reproducible")
    training.add_argument("--precise-bn", nargs="?", const=0, type=positive_int, metavar="BATCHES",
                          help="after training, recompute batch norm's statistics as the population mean and "
                               "unbiased variance of the training split (or BATCHES batches of it) with the final "
                               "weights; the better of those and the moving averages on the validation split is "
                               "exported, and metrics.json gives the test score of both")
    training.add_argument("--monitor", type=monitor_names, metavar="NAMES",
                          help="watch training: updates (update/weight ratio per layer, the seed's ~1e-3), gradients "
                               "(gradient norm per layer), dead-relu, or all; comma-separated, to TensorBoard and "
                               "monitors.json (e.g. --monitor updates,gradients)")

    hardware = parser.add_argument_group("hardware")
    hardware.add_argument("--strategy", default="auto", help=choices.strategy_help())
    hardware.add_argument("--mixed-precision", choices=choices.SWITCHES, default="auto",
                          help="auto (default): float16 on GPUs with tensor cores, bfloat16 on TPUs and on CPUs that "
                               "compute it natively (avx512_bf16 or amx_bf16 in /proc/cpuinfo), else float32; on: "
                               "bfloat16 on CPUs and TPUs, float16 on GPUs; off: float32. config.json records the "
                               "policy and why; --resume keeps it")
    hardware.add_argument("--jit-compile", choices=choices.SWITCHES, default="auto")
    if model_parallel:
        hardware.add_argument("--model-parallel", type=positive_int, default=1, metavar="N",
                              help="split the model's layers into N pipeline stages, one device each, balanced by "
                                   "memory (the GPUs when there are N, else N logical CPU devices): for a model too "
                                   "large for one device; `dlsuite models show NAME --model-parallel N` shows the "
                                   "split (default 1)")

    add_config_argument(parser)
    output = parser.add_argument_group("output")
    output.add_argument("--out", help=f"run directory (default runs/{app}/<timestamp>)")
    output.add_argument("--export", help=f"SavedModel name under --export-dir (default {export_default})")
    output.add_argument("--export-dir", default="saved_models")
    output.add_argument("--export-precision", choices=export_precision.CHOICES, default="float32",
                        help="what the export's graph computes in (its signatures are the same either way): "
                             "float32 (default), which any server runs at full speed; bfloat16, for a model trained "
                             "in mixed_bfloat16 and a server that computes bfloat16 natively")
    output.add_argument("--no-export", action="store_true")
    if resumable:
        output.add_argument("--resume", metavar="RUN_DIR",
                            help="continue an interrupted run from its directory, from its last checkpoint, with the "
                                 "batches and random numbers it would have had: it ends as if never stopped")
    output.add_argument("--checkpoint-every", type=non_negative_float, default=60.0, metavar="SECONDS",
                        help="write a checkpoint to resume from every SECONDS inside an epoch, besides each epoch's "
                             "end (default 60: a kill loses at most a minute; 0: at epoch ends only)")


def check_model_parallel(config):
    """Raises UsageError for a --model-parallel the run cannot take (the model's own limit is checked when built)."""
    from dlsuite.apps.core.errors import UsageError

    stages = config.model_parallel
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise UsageError(f"model_parallel must be an integer >= 1, received {stages!r}", option="model_parallel")
    if stages > 1 and config.strategy not in ("auto", "default"):
        raise UsageError(f"model_parallel {stages} places the model on its own devices and cannot be combined with "
                         f"strategy {config.strategy!r}; pass --strategy default", option="model_parallel")


def add_config_argument(parser):
    """--config FILE: options from a YAML or JSON file (`config_file`); flags override it."""
    parser.add_argument("--config", metavar="FILE",
                        help="a YAML or JSON file of options (keys as the config.json a run writes: epochs, lr, "
                             "batch_norm, ...); flags on the command line override it; a run's config.json "
                             "repeats the run")


TRUST_MODEL_HELP = ("run the SavedModel even if its graph reads or writes files or prints (ReadFile, WriteFile, "
                    "PrintV2, what `saved_model_cli scan` flags); refused by default, since a SavedModel is a "
                    "program: pass it only for a model you trust")


def add_trust_model_argument(parser, help=TRUST_MODEL_HELP):
    """--trust-model, for every command that loads a SavedModel it is given (`core.saved_models`)."""
    parser.add_argument("--trust-model", action="store_true", help=help)


def optimizer_config(args):
    """The `optim.OptimizerConfig` fields from parsed arguments, as a dict."""
    from dlsuite.apps.core import optim

    config = optim.OptimizerConfig(
        optimizer=args.optimizer, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
        clip_norm=args.clip_norm,
        lr_schedule=args.lr_schedule or ("constant" if args.optimizer == "lbfgs" else args.app_lr_schedule),
        lr_drop=args.lr_drop, lr_every=args.lr_every,
        lr_decay=args.lr_decay, warmup_epochs=args.warmup_epochs, lr_patience=args.lr_patience,
    )
    return dataclasses.asdict(config)


@dataclasses.dataclass
class TrainingConfig:
    """The fields of `add_training_arguments`' options that every app's config
    shares with the same defaults; each app's config dataclass extends it
    (epochs and batch size stay with the apps, whose defaults differ)."""

    optimizer: dict = dataclasses.field(default_factory=dict)  # optim.OptimizerConfig fields
    early_stopping: int = 0
    monitor: list | None = None  # --monitor: names of callbacks.monitors.MONITORS
    seed: int = 0
    strategy: str = "auto"
    mixed_precision: str = "auto"
    jit_compile: str = "auto"
    precise_bn: int | None = None  # --precise-bn: batches to recompute batch norm over (0: the training split)
    checkpoint_every: float = 60.0  # seconds between checkpoints inside an epoch (0: at epoch ends only)
    out: str | None = None
    export: str | None = None
    export_dir: str = "saved_models"
    export_precision: str = "float32"
    no_export: bool = False


def config_from_args(config_class, args):
    """An app's config dataclass filled from `args` (field names = option dests)."""
    fields = {f.name for f in dataclasses.fields(config_class)} - {"optimizer"}
    values = {name: getattr(args, name) for name in fields if hasattr(args, name)}
    return config_class(optimizer=optimizer_config(args), **values)


def saved_config(config_class, run_dir):
    """The config a run saved in its config.json (fields `config_class` does not know are dropped)."""
    import json
    import pathlib

    from dlsuite.apps.core.errors import UsageError

    path = pathlib.Path(run_dir) / "config.json"
    if not path.exists():
        raise UsageError(f"resume {str(run_dir)!r}: no config.json there; pass the directory of an interrupted run",
                         option="resume")

    def refuse(problem):
        return UsageError(f"resume {str(run_dir)!r}: {path} is not a config this app wrote ({problem}); pass the "
                          "directory of an interrupted run", option="resume")

    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise refuse("not UTF-8 text") from None
    except ValueError as error:  # names the line and column
        raise refuse(f"malformed JSON: {error}") from None
    if not isinstance(saved, dict) or "config" not in saved:
        raise refuse('no "config" key')
    saved = saved["config"]
    if not isinstance(saved, dict):
        raise refuse(f'"config" holds a {type(saved).__name__}, not a mapping of fields')
    names = {f.name for f in dataclasses.fields(config_class)}
    values = {k: v for k, v in saved.items() if k in names}
    from dlsuite.apps.core import optim

    wrong = _wrong_types(values, config_class) or _wrong_types(
        values.get("optimizer") if isinstance(values.get("optimizer"), dict) else {}, optim.OptimizerConfig)
    if wrong:
        raise refuse(wrong)
    return config_class(**values)


def _wrong_types(values, config_class):
    """'FIELD is VALUE, not TYPE' for the first value whose type its dataclass field does not allow, or None."""
    import types
    import typing

    hints = typing.get_type_hints(config_class)

    def fits(value, hint):
        if hint is None or hint is typing.Any:
            return True
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            return any(fits(value, arg) for arg in typing.get_args(hint))
        if hint is type(None):
            return value is None
        if hint is bool:
            return isinstance(value, bool)
        if hint is int:
            return isinstance(value, int) and not isinstance(value, bool)
        if hint is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        origin = typing.get_origin(hint) or hint
        return not isinstance(origin, type) or isinstance(value, origin)

    for key, value in values.items():
        if not fits(value, hints.get(key)):
            return f"{key} is {value!r}, not {getattr(hints[key], '__name__', hints[key])}"
    return None
