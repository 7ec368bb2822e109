"""`dlsuite transfer`: a trained network as a feature extractor, and two-phase fine-tuning.

The seed's recipe: drop the last fully connected layer and use the rest of the
network as a feature extractor; fine-tune with a smaller learning rate; the
early layers are generic, the late ones specific to the data they saw.

* `extract` writes the embeddings of every image in a folder (and, with
  `--layer`, pooled feature maps of intermediate layers) to one `.npz`.
* `finetune` trains a new head on the frozen backbone (phase 1, the backbone
  called with `training=False` so its batch-norm statistics stay), then
  unfreezes its top layers and trains on with a smaller learning rate
  (phase 2); evaluates on the test split and exports like `classify`.
"""

import argparse
import dataclasses
import os
import pathlib
import secrets
import sys

from dlsuite.apps import choices, train_args
from dlsuite.apps.cli import UsageError

# The sub-runs `finetune` writes, each a run directory of its own.
PHASES = ("freeze", "finetune", "scratch")

EPILOG_EXTRACT = """examples:
  dlsuite transfer extract --backbone resnet50 --weights imagenet --images ./photos --out features.npz
  dlsuite transfer extract --backbone lenet5 --weights runs/classify/20261126-120000/model.keras \\
      --images ./digits --layer conv1 --layer conv2 --out features.npz
  dlsuite transfer extract --backbone MobileNetV2 --weights imagenet --images ./photos --pooling max --batch-size 64
"""

EPILOG_FINETUNE = """examples:
  dlsuite transfer finetune --backbone ResNet50 --weights imagenet --dataset ./photos
  dlsuite transfer finetune --weights saved_models/lenet5_shapes --dataset shapes --shapes-classes 8 --train-per-class 10
  dlsuite transfer finetune --backbone lenet5 --weights none --dataset shapes --shapes-classes 8 --train-per-class 10   # from scratch
  dlsuite transfer finetune --backbone efficientnetb0 --weights imagenet --dataset tfds:tf_flowers --input-size 160,160 --unfreeze 20
  dlsuite transfer finetune --resume runs/transfer/20261126-120000    # after an interruption
"""


@dataclasses.dataclass
class TransferConfig(train_args.TrainingConfig):
    """A fine-tuning run; saved as config.json beside the model."""

    backbone: str | None = None
    weights: str | None = "imagenet"
    preprocess: str = "auto"
    batch_norm: bool | None = None
    dataset: str = "shapes"
    input_size: list | None = None
    train_per_class: int | None = None
    freeze_epochs: int = 5
    finetune_epochs: int = 5
    unfreeze: str = "all"
    finetune_lr_factor: float = 0.1
    head_dropout: float = 0.2
    batch_size: int | None = None
    augment: list | None = None
    strict: bool = False
    validation_fraction: float = 0.15
    test_fraction: float = 0.15
    shapes_classes: int = 4
    shapes_size: int = 64
    shapes_count: int = 1200
    data_dir: str | None = None


def input_size(text):
    """--input-size H,W (or one number for a square)."""
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


def _unfreeze(text):
    """--unfreeze N|all."""
    if text == "all":
        return text
    try:
        return str(train_args.positive_int(text))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive number of layers or 'all', received {text!r}") from None


def _add_backbone_arguments(group, *, weights_default):
    group.add_argument("--backbone", help="registry CNN or keras.applications model, e.g. resnet50, vgg16, lenet5, "
                                          "MobileNetV2, EfficientNetB0 (optional when --weights is a trained model)")
    group.add_argument("--weights", default=weights_default,
                       help="imagenet (downloaded once into the Keras cache), none (random), a .weights.h5/.h5 file, "
                            "or a model this suite trained: runs/.../model.keras or saved_models/NAME "
                            f"(default {weights_default})")
    group.add_argument("--input-size", type=input_size, metavar="H,W",
                       help="size the backbone sees (default: the trained model's, else the backbone's own, e.g. 224,224)")
    group.add_argument("--preprocess", choices=choices.TRANSFER_PREPROCESSING, default="auto",
                       help="pixel preprocessing inside the model (default auto: what the weights were trained with)")
    group.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=None,
                       help="registry CNN with random weights or a weights file: batch norm after each conv "
                            "(default: on for random weights, as classify trains; off for a weights file)")


def add_data_arguments(group):
    """The backbone and the data it is fine-tuned on (`transfer finetune`, `tune transfer`)."""
    _add_backbone_arguments(group, weights_default="imagenet")
    group.add_argument("--dataset", default="shapes",
                       help="digits, shapes (generated, default), a folder with one subfolder per class, or tfds:NAME")
    group.add_argument("--train-per-class", type=train_args.positive_int, metavar="N",
                       help="keep N training images per class (few-label transfer); validation and test stay whole")
    group.add_argument("--augment", nargs="?", const=list(choices.AUGMENTATIONS), type=train_args.augment_kinds,
                       metavar="KINDS", help="random flip, rotation, zoom, translation, contrast (bare --augment: all)")
    train_args.add_image_split_arguments(group)


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "transfer", help="transfer learning: extract features, fine-tune a pretrained backbone",
        epilog="examples:\n  dlsuite transfer extract --backbone resnet50 --weights imagenet --images ./photos --out features.npz\n"
               "  dlsuite transfer finetune --backbone ResNet50 --weights imagenet --dataset ./photos\n"
               "  dlsuite transfer finetune --weights saved_models/lenet5_shapes --dataset shapes --train-per-class 10",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="transfer_command", required=True, metavar="COMMAND")

    extract = commands.add_parser("extract", help="embeddings of every image in a folder, to a .npz",
                                  epilog=EPILOG_EXTRACT, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_backbone_arguments(extract.add_argument_group("backbone"), weights_default="imagenet")
    extract.add_argument("--images", required=True, metavar="DIR",
                         help="a folder of images, or of class subfolders (then labels are saved too)")
    extract.add_argument("--out", default="features.npz", help="the .npz to write (default features.npz)")
    extract.add_argument("--layer", action="append", default=[], metavar="NAME",
                         help="also save this layer's pooled output (repeatable), e.g. --layer conv1 --layer conv2")
    extract.add_argument("--pooling", choices=("avg", "max"), default="avg", help="how feature maps become vectors")
    extract.add_argument("--batch-size", type=train_args.positive_int, default=32)
    extract.add_argument("--strict", action="store_true", help="stop at an unreadable image instead of skipping it")
    extract.set_defaults(func=run_extract)

    finetune = commands.add_parser("finetune", help="new head on a frozen backbone, then fine-tune its top layers",
                                   epilog=EPILOG_FINETUNE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(finetune.add_argument_group("backbone and data"))

    phases = finetune.add_argument_group("phases")
    phases.add_argument("--freeze-epochs", type=int, default=5, metavar="E",
                        help="phase 1: epochs training the new head on the frozen backbone (default 5)")
    phases.add_argument("--finetune-epochs", type=int, default=5, metavar="E",
                        help="phase 2: epochs with the top layers unfrozen (default 5; 0 skips phase 2)")
    phases.add_argument("--unfreeze", type=_unfreeze, default="all", metavar="N|all",
                        help="phase 2 trains the top N layers that have weights (batch norm stays frozen), or all (default all)")
    phases.add_argument("--finetune-lr-factor", type=float, default=0.1,
                        help="phase 2 learning rate = --lr x this (default 0.1)")
    phases.add_argument("--head-dropout", type=float, default=0.2, help="dropout before the new classifier (default 0.2)")
    train_args.add_training_arguments(finetune, app="transfer", epochs=None, export_default="<backbone>_<dataset>",
                                      resumable=True)
    finetune.set_defaults(func=run_finetune)


# --- extract ----------------------------------------------------------------------


def _list_images(root):
    """(paths, labels or None, class names or None) of an images folder."""
    from dlsuite.apps import datasets

    if not os.path.isdir(root):
        raise UsageError(f"--images {root!r} is not a folder; pass a folder of images or of class subfolders")
    class_names, files = datasets.list_class_files(root)
    labeled = [name for name in class_names if files[name]]
    if labeled:
        paths = [path for name in labeled for path in files[name]]
        labels = [i for i, name in enumerate(labeled) for _ in files[name]]
        return paths, labels, labeled
    paths = sorted(
        entry.path for entry in os.scandir(root)
        if entry.is_file() and not entry.name.startswith(".") and entry.name.lower().endswith(datasets.IMAGE_EXTENSIONS)
    )
    if not paths:
        raise UsageError(
            f"--images {root!r} has no images ({'/'.join(datasets.IMAGE_EXTENSIONS)}) in it or in its subfolders; "
            "pass the folder that holds them"
        )
    return paths, None, None


def feature_model(base, layer_names, pooling):
    """pixels -> [pooled backbone output, pooled output of each named layer]."""
    import keras

    known = base.feature_layers()
    unknown = [name for name in layer_names if name not in known]
    if unknown:
        raise UsageError(f"--layer {unknown[0]} is not a layer of {base.name}; choose from {', '.join(known)}")
    outputs = [base.model.output] + [base.model.get_layer(name).output for name in layer_names]
    pool = {"avg": keras.layers.GlobalAveragePooling2D, "max": keras.layers.GlobalMaxPooling2D}[pooling]
    pooled = [pool(name=f"pool_{i}")(output) if len(output.shape) == 4 else output for i, output in enumerate(outputs)]
    return keras.Model(base.model.input, pooled, name="features")


def _atomic_npz(path, arrays):
    import numpy as np

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temporary, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def run_extract(args):
    if not args.out.endswith(".npz"):
        raise UsageError(f"--out {args.out!r} must end in .npz, e.g. --out features.npz")
    from dlsuite.apps import backbones

    weights = backbones.check_weights_argument(args.backbone, args.weights)  # before any image is read
    paths, labels, class_names = _list_images(args.images)

    import keras
    import numpy as np
    import tensorflow as tf

    from dlsuite.apps import datasets, pipeline

    checks = datasets.check_images(paths, strict=args.strict)
    good = [check for check in checks if check.reason is None]
    for check in checks:
        if check.reason:
            print(f"skipped {check.path}: {check.reason}", file=sys.stderr)
    if not good:
        raise UsageError(f"--images {args.images!r} has no readable image; all {len(checks)} failed to decode")
    keep = [check.reason is None for check in checks]
    paths = [path for path, kept in zip(paths, keep) if kept]
    labels = [label for label, kept in zip(labels, keep) if kept] if labels is not None else None
    channels = 3 if any(check.colour for check in good) else 1

    base = backbones.build_base(args.backbone, weights=weights,
                                input_size=args.input_size, channels=channels, preprocessing=args.preprocess,
                                batch_norm=args.batch_norm)
    extractor = feature_model(base, args.layer, args.pooling)
    images = tf.data.Dataset.from_tensor_slices((paths, np.zeros(len(paths), "int32"))).map(
        datasets.decoder(channels, None), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    batches = pipeline.batches(images, image_size=base.input_size, channels=base.channels,
                               batch_size=args.batch_size, training=False, cache=False)
    print(f"{base.name} ({base.source}) on {len(paths)} images at {base.input_size[0]}x{base.input_size[1]}x"
          f"{base.channels}, {args.pooling} pooling", flush=True)
    progress = keras.utils.Progbar(len(paths), unit_name="image", verbose=1 if sys.stdout.isatty() else 2)
    collected = [[] for _ in extractor.outputs]
    for batch, _ in batches:
        outputs = extractor(batch, training=False)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]  # Keras unwraps a single output
        for store, output in zip(collected, outputs):
            store.append(np.asarray(output, dtype="float32"))
        progress.add(int(batch.shape[0]))

    root = os.path.abspath(args.images)
    arrays = {
        "file_names": np.array([os.path.relpath(os.path.abspath(path), root) for path in paths]),
        "features": np.concatenate(collected[0]),
        "backbone": np.array(base.name),
    }
    for name, store in zip(args.layer, collected[1:]):
        arrays[f"layer_{name}"] = np.concatenate(store)
    if labels is not None:
        arrays["labels"] = np.array(labels, dtype="int32")
        arrays["class_names"] = np.array(class_names)
    _atomic_npz(args.out, arrays)
    extra = "".join(f", {key} {arrays[key].shape[1]}-d" for key in arrays if key.startswith("layer_"))
    print(f"wrote {args.out}: {len(paths)} images, features {arrays['features'].shape[1]}-d{extra}"
          + (f", labels of {len(class_names)} classes" if labels is not None else ""))
    return 0


# --- finetune ---------------------------------------------------------------------


def check_config(config):
    from dlsuite.apps import backbones

    if config.backbone is None and not backbones.is_model_file(config.weights):
        raise UsageError("--backbone is needed unless --weights is a model this suite trained; "
                         "e.g. --backbone resnet50 --weights imagenet")
    if config.backbone is not None:
        config.backbone = backbones.canonical_name(config.backbone)
    if config.freeze_epochs < 0 or config.finetune_epochs < 0:
        raise UsageError(f"--freeze-epochs and --finetune-epochs must be >= 0, received "
                         f"{config.freeze_epochs} and {config.finetune_epochs}")
    if config.freeze_epochs + config.finetune_epochs == 0:
        raise UsageError("--freeze-epochs and --finetune-epochs are both 0: nothing to train; e.g. --freeze-epochs 5")
    if not 0 < config.finetune_lr_factor <= 1:
        raise UsageError(f"--finetune-lr-factor must be in (0, 1], received {config.finetune_lr_factor}")
    if not 0 <= config.head_dropout < 1:
        raise UsageError(f"--head-dropout must be in [0, 1), received {config.head_dropout}")
    if config.optimizer.get("optimizer") == "lbfgs":
        raise UsageError("--optimizer lbfgs cannot train a frozen backbone in phases; use adam, sgd or momentum")
    if config.export is not None:
        from dlsuite.apps import export

        export.check_export_name(config.export)


def few_labels(dataset, per_class, *, seed):
    """The first `per_class` images of each class after a seeded shuffle; returns (dataset, count)."""
    import numpy as np
    import tensorflow as tf

    labels = np.array([int(label) for _, label in dataset.as_numpy_iterator()])
    rng = np.random.default_rng(seed)
    keep = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        keep[rng.permutation(members)[:per_class]] = True
    mask = tf.constant(keep)

    def chosen(index, element):
        return mask[index]

    def without_index(index, element):
        return element

    kept = dataset.enumerate().filter(chosen).map(without_index)
    # tf.data cannot count a filter's output; Keras needs the count to end epochs cleanly.
    kept = kept.apply(tf.data.experimental.assert_cardinality(int(keep.sum())))
    return kept, int(keep.sum())


def build_transfer_model(base, *, classes, augment=None, seed=None, head_dropout=0.2):
    """pixels -> [augmentation] -> backbone(training=False) -> pooling -> dropout -> softmax.

    The backbone is called in inference mode and its batch-norm layers stay
    frozen (`set_trainable`): they keep their statistics in both phases, as
    the keras transfer guide advises (updating them from a few images would
    undo what the backbone learned).
    """
    import keras
    from keras import layers

    from dlsuite.apps import classifier

    pixels = keras.Input((*base.input_size, base.channels), name="pixels")
    x = pixels
    for layer in classifier.augmentation(augment, seed) if augment else []:
        x = layer(x)
    x = base.model(x, training=False)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if head_dropout:
        x = layers.Dropout(head_dropout, seed=seed, name="head_dropout")(x)
    x = layers.Dense(classes, name="predictions")(x)
    probabilities = layers.Activation("softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(pixels, probabilities, name=base.name)


def set_trainable(model, unfreeze):
    """Freezes the backbone, then unfreezes its top `unfreeze` layers ("all", a count, or 0).

    Counted are the layers with weights other than batch normalization, which
    stays frozen in every phase: a frozen BatchNormalization runs in inference
    mode in Keras 3, whereas the `training=False` the backbone is called with
    is overridden by fit's `training=True` (keras functional.operation_fn
    passes the outer value down), so freezing is what keeps the statistics.
    """
    import keras

    from dlsuite.apps import backbones

    base = model.get_layer(backbones.BACKBONE_LAYER)
    tunable = [layer for layer in base.layers
               if layer.weights and not isinstance(layer, keras.layers.BatchNormalization)]
    count = len(tunable) if unfreeze == "all" else int(unfreeze)
    if count > len(tunable):
        raise UsageError(f"--unfreeze {count} is more than the {len(tunable)} layers with weights in the backbone "
                         f"(batch norm excluded); pass --unfreeze {len(tunable)} or --unfreeze all")
    base.trainable = count > 0
    for layer in base.layers:
        layer.trainable = False
    for layer in tunable[len(tunable) - count:]:
        layer.trainable = True
    return count


def run_finetune(args):
    if args.resume:
        return finetune(_resumed_config(args.resume), run_dir=pathlib.Path(args.resume))
    return finetune(train_args.config_from_args(TransferConfig, args))


def _resumed_config(run_dir):
    """The config an interrupted `finetune` saved; its phases keep their own backups."""
    config = train_args.saved_config(TransferConfig, run_dir)
    run_dir = pathlib.Path(run_dir)
    if (run_dir / "metrics.json").exists():
        raise UsageError(f"--resume {str(run_dir)!r}: that run finished; start a new run instead")
    for phase in PHASES:
        if (run_dir / phase / "metrics.json").exists():
            raise UsageError(f"--resume {str(run_dir)!r}: its {phase} phase stopped ({run_dir / phase / 'metrics.json'} "
                             "says why); start a new run with other settings")
    return config


def _phase_state(phase_dir):
    """"new", "interrupted" (a backup to go on from) or "finished", from what the phase left."""
    from dlsuite.apps import engine, rundir

    paths = engine.run_paths(phase_dir)
    if os.path.exists(paths["backup"]):
        return "interrupted"
    if rundir.read_history(paths["history"]).get("loss"):
        return "finished"
    return "new"  # not started, or stopped before its first epoch ended


def load_data(config):
    """The dataset with its training split cut to --train-per-class, and the
    per-channel statistics of that split (for backbones that standardize)."""
    from dlsuite.apps import classifier, datasets, pipeline

    data = datasets.load(
        config.dataset, seed=config.seed, validation_fraction=config.validation_fraction,
        test_fraction=config.test_fraction, strict=config.strict, shapes_classes=config.shapes_classes,
        shapes_size=config.shapes_size, shapes_count=config.shapes_count, data_dir=config.data_dir,
    )
    for path, reason in data.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if config.train_per_class:
        train, size = few_labels(data.train, config.train_per_class, seed=config.seed)
        data = dataclasses.replace(data, train=train, sizes={**data.sizes, "train": size})
    probe_size = tuple(config.input_size) if config.input_size else (
        data.image_shape[:2] if data.image_shape else (64, 64))
    statistics = classifier.channel_statistics(
        pipeline.batches(data.train, image_size=probe_size, channels=data.channels, batch_size=64, training=False))
    return data, statistics


def finetune(config, *, run_dir=None):
    """Runs both phases for `config`; returns the exit status.

    With `run_dir`, an interrupted run goes on: a finished phase is read back
    (its history and best weights), the interrupted one resumes from its
    backup, and the phases after it run as usual.
    """
    from dlsuite.apps import distribute

    check_config(config)
    strategy = distribute.make_strategy(config.strategy)

    import keras

    from dlsuite.apps import backbones, engine, export, metrics, optim, pipeline, rundir

    weights = backbones.check_weights_argument(config.backbone, config.weights)
    scratch = weights is None
    device = engine.device_kind()
    engine.set_seed(config.seed, deterministic=device == "cpu")
    policy = engine.set_precision(config.mixed_precision, device)
    batch_size = config.batch_size or engine.default_batch_size(device)
    data, statistics = load_data(config)
    train_split, train_size = data.train, data.sizes["train"]
    batch_size = min(batch_size, train_size)
    with strategy.scope():
        base = backbones.build_base(config.backbone, weights=weights, input_size=config.input_size,
                                    channels=data.channels, statistics=statistics, preprocessing=config.preprocess,
                                    batch_norm=config.batch_norm)
        model = build_transfer_model(base, classes=len(data.class_names), augment=config.augment, seed=config.seed,
                                     head_dropout=config.head_dropout)
    unfreeze = config.unfreeze
    set_trainable(model, unfreeze)  # checks --unfreeze against the backbone before anything is written

    resume = run_dir is not None
    run_dir = pathlib.Path(run_dir if resume else rundir.create(config.out, "transfer"))
    shape = dict(image_size=base.input_size, channels=base.channels, batch_size=batch_size)
    train_batches = pipeline.batches(train_split, training=True, seed=config.seed, **shape)
    validation_batches = pipeline.batches(data.validation, training=False, **shape)
    test_batches = pipeline.batches(data.test, training=False, **shape)
    steps_per_epoch = -(-train_size // batch_size)
    if not resume:  # the interrupted run's config.json stays as it was
        rundir.write_json(run_dir / "config.json", {"config": config, "resolved": {
            "backbone": base.name, "weights": base.source, "preprocessing": base.preprocessing,
            "input_size": list(base.input_size), "channels": base.channels, "batch_size": batch_size, "policy": policy,
            "device": device, "strategy": type(strategy).__name__, "class_names": data.class_names,
            "sizes": {**data.sizes, "train": train_size}, "parameters": model.count_params(),
        }})
    print(f"{base.name} ({base.source}) on {data.name}: {train_size} train / {data.sizes['validation']} validation / "
          f"{data.sizes['test']} test images, {len(data.class_names)} classes, input "
          f"{base.input_size[0]}x{base.input_size[1]}x{base.channels}, run dir {run_dir}", flush=True)

    optimizer_config = optim.OptimizerConfig(**config.optimizer)
    fit = dict(strategy=strategy, loss=keras.losses.SparseCategoricalCrossentropy(), steps_per_epoch=steps_per_epoch,
               global_batch_size=batch_size, early_stopping=config.early_stopping,
               jit_compile=engine.jit_setting(config.jit_compile), monitors=config.monitor or ())
    if scratch:
        # Random features are not worth freezing: train every layer at the full rate.
        phases = [("scratch", "all", config.freeze_epochs + config.finetune_epochs, optimizer_config)]
    else:
        finetune_optimizer = dataclasses.replace(optimizer_config, lr=optimizer_config.learning_rate * config.finetune_lr_factor)
        phases = [("freeze", 0, config.freeze_epochs, optimizer_config),
                  ("finetune", unfreeze, config.finetune_epochs, finetune_optimizer)]

    histories, best = [], None  # best: (val_loss, weights) over both phases
    for phase, layers_to_train, epochs, phase_optimizer in phases:
        if epochs == 0:
            continue
        with strategy.scope():
            trained = set_trainable(model, layers_to_train)
        state = _phase_state(run_dir / phase) if resume else "new"
        if state == "finished":
            history = rundir.read_history(engine.run_paths(run_dir / phase)["history"])
            history.pop("epoch", None)
            best_path = engine.run_paths(run_dir / phase)["best"]
            result = engine.FitResult(history=history, stopped_reason=None, epochs_run=0,
                                      best_checkpoint=best_path if os.path.exists(best_path) else None)
            print(f"phase {phase}: finished before ({len(history.get('loss', []))} epochs), read back", flush=True)
        else:
            print(f"phase {phase}: {epochs} epochs, {trained} backbone layers trainable, "
                  f"lr {phase_optimizer.learning_rate:g}" + (", resumed" if state == "interrupted" else ""), flush=True)
            result = engine.fit(model, train_batches, validation_batches, optimizer_config=phase_optimizer,
                                epochs=epochs, run_dir=run_dir / phase, resume=state == "interrupted", **fit)
        if result.stopped_reason:
            return engine.report_stop(result, run_dir / phase)
        histories.append((phase, result.history))
        if result.best_checkpoint:  # the same model object stays, inside the strategy's scope
            model.load_weights(result.best_checkpoint)
        phase_best = min(result.history.get("val_loss") or [float("inf")])
        if best is None or phase_best <= best[0]:
            best = (phase_best, model.get_weights())
    # Fine-tuning may not beat the head alone; keep whichever validated best.
    model.set_weights(best[1])
    model = engine.final_model(dataclasses.replace(result, best_checkpoint=None), model)

    history = {key: [value for _, phase_history in histories for value in phase_history.get(key, [])]
               for key in histories[0][1]}
    rundir.write_history(run_dir / "history.csv", history)
    rundir.plot_curves(history, run_dir / "curves.png", title=f"{base.name} on {data.name}")
    labels, probabilities = classifier_predictions(model, test_batches)
    report = metrics.classification_report(probabilities, labels, data.class_names)
    rundir.plot_confusion(report["confusion_matrix"], data.class_names, run_dir / "confusion.png")
    engine.save_model(model, run_dir / "model.keras")
    export_path = None
    if not config.no_export:
        name = config.export or f"{base.name}_{rundir.slug(data.name)}"
        export_path = export.export_classifier(model, class_names=data.class_names, name=name, base_dir=config.export_dir)
    rundir.write_json(run_dir / "metrics.json", {
        "status": "finished", "test_accuracy": report["accuracy"], "test_loss": report["loss"],
        "phases": {phase: len(phase_history.get("loss", [])) for phase, phase_history in histories}, "export": export_path,
        "per_class": report["per_class"], "confusion_matrix": report["confusion_matrix"],
    })
    print(f"test accuracy {report['accuracy']:.4f}, loss {report['loss']:.4f}; run dir {run_dir}"
          + (f"; export {export_path}" if export_path else ""))
    return 0


def classifier_predictions(model, batches):
    import numpy as np

    labels = np.concatenate([np.asarray(y) for _, y in batches])
    return labels, model.predict(batches, verbose=0)
