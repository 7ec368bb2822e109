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
import os
import pathlib
import secrets
import sys

from dlsuite.apps.core import choices, train_args
from dlsuite.apps.core.errors import UsageError
from dlsuite.apps.transfer.task import TransferTask


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
    train_args.add_trust_model_argument(group, help="with a SavedModel as --weights: " + train_args.TRUST_MODEL_HELP)
    group.add_argument("--input-size", type=train_args.size_pair, metavar="H,W",
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
    train_args.add_training_arguments(finetune, app="transfer", epochs=None,
                                      export_default="<backbone>_<dataset>_transfer", resumable=True)
    finetune.set_defaults(func=run_finetune)


# --- extract ----------------------------------------------------------------------


def _list_images(root):
    """(paths, labels or None, class names or None) of an images folder."""
    from dlsuite.apps.vision import file_checks

    if not os.path.isdir(root):
        raise UsageError(f"--images {root!r} is not a folder; pass a folder of images or of class subfolders")
    class_names, files = file_checks.list_class_files(root)
    labeled = [name for name in class_names if files[name]]
    if labeled:
        paths = [path for name in labeled for path in files[name]]
        labels = [i for i, name in enumerate(labeled) for _ in files[name]]
        return paths, labels, labeled
    paths = sorted(
        entry.path for entry in os.scandir(root)
        if entry.is_file() and not entry.name.startswith(".") and entry.name.lower().endswith(file_checks.IMAGE_EXTENSIONS)
    )
    if not paths:
        raise UsageError(
            f"--images {root!r} has no images ({'/'.join(file_checks.IMAGE_EXTENSIONS)}) in it or in its subfolders; "
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
    from dlsuite.apps.core import outputs
    from dlsuite.apps.vision import backbones

    outputs.check_file(args.out, option="out", suffix=".npz")  # before the work, which an unwritable path would waste

    # Before any image is read; a model file's readable parts too.
    weights = backbones.check_weights_argument(args.backbone, args.weights, trust_model=args.trust_model)
    paths, labels, class_names = _list_images(args.images)

    import keras
    import numpy as np

    from dlsuite.apps.vision import datasets, file_checks, pipeline

    checks = file_checks.check_images(paths, strict=args.strict)
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
                                batch_norm=args.batch_norm, trust_model=args.trust_model)
    extractor = feature_model(base, args.layer, args.pooling)
    batches = pipeline.batches(datasets.file_source(paths, channels=channels), image_size=base.input_size,
                               channels=base.channels, batch_size=args.batch_size, training=False, cache=None)
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


def run_finetune(args):
    from dlsuite.apps.core import lifecycle

    return lifecycle.run_from_args(TransferTask, args)
