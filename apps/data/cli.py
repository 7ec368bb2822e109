"""`dlsuite data`: prepare data for large or remote training.

`pack FOLDER OUT` writes the images of a class-subfolder folder as TFRecord
shards with a dataset.json (`vision/shards.py`); `show OUT` prints what a
packed folder holds, checked the way training reads it. The work lives in
`vision/shards.py`; this module reads the command line and prints.
"""

import argparse
import functools
import json

import numpy as np

from dlsuite.apps.core import train_args

EPILOG = """examples:
  dlsuite data pack photos/train packed/train
  dlsuite data pack photos/train gs://my-bucket/photos-224 --image-size 224 --shard-mb 256
  dlsuite data show packed/train
  dlsuite classify train --dataset packed/train
"""

EPILOG_PACK = """OUT gets shard-NNNNN-of-NNNNN.tfrecord files (tf.train.Example: image/encoded,
image/class/label, image/index, image/filename), labels.npy and dataset.json.
It is written as OUT.partial-<pid> and renamed at the end: a killed pack leaves
no OUT. Without --image-size the files' own bytes are stored.

examples:
  dlsuite data pack photos/train packed/train
  dlsuite data pack photos/train packed/train-224 --image-size 224       # 224x224 JPEGs, quality 95
  dlsuite data pack photos/train gs://my-bucket/train --shard-mb 256 --strict
"""


def _image_size(text):
    """"H" or "H,W" -> (H, W)."""
    parts = text.replace("x", ",").split(",")
    try:
        sides = tuple(int(part) for part in parts)
    except ValueError:
        sides = ()
    if len(sides) == 1:
        sides = sides * 2
    if len(sides) != 2 or min(sides) < 1:
        raise argparse.ArgumentTypeError(f"--image-size expects H or H,W with positive integers (e.g. 224 or "
                                         f"224,160), received {text!r}")
    return sides


def add_parser(subparsers):
    """Adds `data pack` and `data show` to the `dlsuite` subparsers."""
    parser = subparsers.add_parser(
        "data", help="pack an image folder into TFRecord shards for large or remote training",
        description="Prepare data for training at scale: pack a folder of class subfolders into\n"
                    "TFRecord shards that several workers can read, locally or on GCS/S3.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    pack = commands.add_parser(
        "pack", help="write a class-subfolder image folder as TFRecord shards and a dataset.json",
        description="Write the images of FOLDER (one subfolder per class) as TFRecord shards in OUT,\n"
                    "with labels.npy and dataset.json, checked once here rather than on every run.",
        epilog=EPILOG_PACK, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pack.add_argument("folder", metavar="FOLDER", help="a local folder with one subfolder of images per class")
    pack.add_argument("out", metavar="OUT", help="the folder to write (local, gs:// or s3://); must not exist "
                                                 "or be empty, unless --overwrite")
    pack.add_argument("--image-size", type=_image_size, metavar="H[,W]",
                      help="resize every image to H x W (bilinear) and store it as a JPEG of quality 95; default: "
                           "store each file's bytes unchanged")
    pack.add_argument("--shard-mb", type=train_args.positive_float("--shard-mb"), default=128.0, metavar="N",
                      help="about N MB per shard (default 128); at least 8 shards when there are 8 images")
    pack.add_argument("--strict", action="store_true",
                      help="stop at the first image that cannot be decoded instead of skipping it")
    pack.add_argument("--overwrite", action="store_true", help="replace an earlier pack in OUT")
    pack.set_defaults(func=run_pack)

    show = commands.add_parser(
        "show", help="what a packed folder holds: classes, counts, shards",
        description="Read OUT's dataset.json and labels.npy, check that every shard file is there, and\n"
                    "print the classes, the counts and the shards.",
    )
    show.add_argument("out", metavar="OUT", help="a folder written by `dlsuite data pack`")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(func=run_show)

    dispatcher = commands.add_parser(
        "dispatcher", help="start a tf.data service dispatcher (input preprocessing on other machines)",
        description="Serve a tf.data service dispatcher until stopped; trainers pass\n"
                    "--data-service grpc://HOST:PORT and `dlsuite data worker` processes do their input work.",
    )
    dispatcher.add_argument("--port", type=train_args.port, default=5050, help="the dispatcher's port (default 5050)")
    dispatcher.add_argument("--work-dir", metavar="DIR",
                            help="keep the dispatcher's journal there: a restarted dispatcher recovers its jobs")
    dispatcher.set_defaults(func=run_dispatcher)

    worker = commands.add_parser(
        "worker", help="start a tf.data service worker of a dispatcher",
        description="Serve a tf.data service worker until stopped: it reads and decodes the images of the\n"
                    "trainers that use its dispatcher.",
    )
    worker.add_argument("--dispatcher", required=True, metavar="grpc://HOST:PORT", help="the dispatcher's address")
    worker.add_argument("--port", type=train_args.port, default=0, help="the worker's port (default: any free one)")
    worker.add_argument("--worker-address", metavar="HOST:PORT",
                        help="how the trainers reach this worker (default: this host's name and the port)")
    worker.set_defaults(func=run_worker)


def run_dispatcher(args):
    from dlsuite.apps.core import data_service

    data_service.run_dispatcher(port=args.port, work_dir=args.work_dir)


def run_worker(args):
    from dlsuite.apps.core import data_service

    data_service.check_reachable(args.dispatcher, option="dispatcher")
    data_service.run_worker(dispatcher=args.dispatcher, port=args.port, worker_address=args.worker_address)


def run_pack(args):
    from dlsuite.apps.vision import shards  # imports TensorFlow: not for --help

    info = shards.pack(args.folder, args.out, image_size=args.image_size, shard_mb=args.shard_mb,
                       strict=args.strict, overwrite=args.overwrite, progress=functools.partial(print, flush=True))
    print(f"wrote {info.path}: {_summary(info)}")
    print(f"train with: dlsuite classify train --dataset {info.path}")


def run_show(args):
    from dlsuite.apps.vision import shards

    info = shards.read_info(args.out)
    if args.json:
        counts = [int(n) for n in _class_counts(info)]
        print(json.dumps({"path": info.path, "classes": info.class_names, "count": info.count, "class_counts": counts,
                          "channels": info.channels, "image_shape": info.image_shape, "resized": info.resized,
                          "files": info.files, "shard_counts": info.shard_counts,
                          "skipped": [list(entry) for entry in info.skipped], "source": info.source}))
        return
    print(f"{info.path}: {_summary(info)}")
    width = max(len(name) for name in info.class_names)
    for name, count in zip(info.class_names, _class_counts(info)):
        print(f"  {name:<{width}}  {count}")
    for path, reason in info.skipped:
        print(f"skipped when packed: {path}: {reason}")


def _class_counts(info):
    return np.bincount(info.labels, minlength=len(info.class_names)).tolist()


def _summary(info):
    if info.image_shape is None:
        shape = "sizes vary"
    else:
        shape = "x".join(str(side) for side in info.image_shape)
    stored = f"resized to {info.resized[0]}x{info.resized[1]} JPEG" if info.resized else "original files"
    return (f"{info.count} images, {len(info.class_names)} classes, {shape} ({stored}, {info.channels} "
            f"channel{'s' if info.channels > 1 else ''}), {len(info.files)} shards"
            + (f", {len(info.skipped)} skipped" if info.skipped else ""))
