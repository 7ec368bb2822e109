"""`dlsuite info`: what this installation is and sees: versions, devices,
the strategies that would run here, where weights and datasets are cached."""

import argparse
import dataclasses
import json
import os
import pathlib


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "info", help="versions, devices, strategies and caches of this installation",
        epilog="examples:\n  dlsuite info\n  dlsuite info --json", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def _version(package):
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def gather():
    """The facts `dlsuite info` prints, as a JSON-ready dict."""
    import tensorflow as tf

    from dlsuite.apps.core import distribute, engine

    gpus = tf.config.list_physical_devices("GPU")
    device = engine.device_kind()
    keras_home = pathlib.Path(os.environ.get("KERAS_HOME", pathlib.Path.home() / ".keras"))
    return {
        "versions": {name: _version(name) for name in
                     ("dlsuite", "tensorflow", "keras", "keras-tuner", "tensorflow-datasets", "numpy")},
        "devices": {"cpu": len(tf.config.list_physical_devices("CPU")), "gpu": [gpu.name for gpu in gpus],
                    "tpu": bool(tf.config.list_logical_devices("TPU")), "trains_on": device},
        "defaults": {"batch_size": engine.default_batch_size(device),
                     "mixed_precision_auto": "float16 on GPUs of compute capability 7.0+, bfloat16 on TPUs and on "
                                             "CPUs with avx512_bf16 or amx_bf16, else float32",
                     "mixed_precision_auto_here": dataclasses.asdict(engine.choose_precision("auto", device))},
        "strategies": {name: distribute.strategy_availability(name) for name in distribute.STRATEGIES},
        "caches": {"keras_weights": str(keras_home / "models"),
                   "tfds_data": os.environ.get("TFDS_DATA_DIR", str(pathlib.Path.home() / "tensorflow_datasets"))},
    }


def run(args):
    facts = gather()
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    print("versions: " + ", ".join(f"{name} {version or 'not installed'}" for name, version in facts["versions"].items()))
    devices = facts["devices"]
    print(f"devices: {devices['cpu']} CPU, {len(devices['gpu'])} GPU{'' if len(devices['gpu']) == 1 else 's'}"
          f"{' (' + ', '.join(devices['gpu']) + ')' if devices['gpu'] else ''}, TPU {'yes' if devices['tpu'] else 'no'}; "
          f"training runs on the {devices['trains_on'].upper()}, default batch size {facts['defaults']['batch_size']}")
    here = facts["defaults"]["mixed_precision_auto_here"]
    print(f"--mixed-precision auto: {here['policy']} ({here['reason']})")
    print("strategies:")
    for name, availability in facts["strategies"].items():
        print(f"  {name:<13} {availability}")
    print(f"caches: Keras weights {facts['caches']['keras_weights']}, TFDS data {facts['caches']['tfds_data']}")
    return 0
