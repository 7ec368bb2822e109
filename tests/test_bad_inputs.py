"""Every bad command line is one line (#15): exit status 2, exactly one line on
stderr starting `dlsuite: error:`, no traceback, and no new file, in every app
and subcommand.

The cases run in-process through `cli.main`, each in an empty working
directory; the files they point at (bad images, texts, configs, resume
folders, damaged SavedModels and .keras files, a SavedModel that writes a
file) are built once for the module.
"""

import json
import os
import shutil
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from dlsuite.apps import cli
from dlsuite.apps.caption import export as caption_export
from dlsuite.apps.lm import export as lm_export
from dlsuite.apps.vision import export

CLASS_NAMES = ["a", "b"]
# Where the untrusted SavedModel's signature writes when something runs it.
PWNED = "pwned.txt"


def _png(path, value=0, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)
    return path


def _tiny_classifier():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))
    return keras.Model(inputs, keras.layers.Dense(len(CLASS_NAMES), activation="softmax")(x))


def _write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def _classify_metadata(folder):
    """dlsuite.json of a classify export that records a registry backbone (what transfer rebuilds)."""
    _write_json(folder / "assets" / export.METADATA_FILE, {
        "format": export.FORMAT, "format_version": export.FORMAT_VERSION, "model_name": "tiny",
        "class_names": CLASS_NAMES, "input_size": [32, 32], "channels": 1, "signatures": list(export.SIGNATURES),
        "architecture": {"backbone": "lenet5", "knobs": {}, "preprocessing": "standardize", "statistics": None},
    })


def _lm_metadata(folder):
    shutil.rmtree(folder / "assets", ignore_errors=True)
    _write_json(folder / "assets" / lm_export.METADATA_FILE, {
        "format": lm_export.FORMAT, "format_version": lm_export.FORMAT_VERSION, "kind": "next_token",
        "level": "char", "signatures": list(lm_export.SIGNATURES["next_token"])})
    _write_json(folder / "assets" / lm_export.VOCABULARY_FILE, {"level": "char", "tokens": ["", "[UNK]", "a", "b"]})


def _caption_metadata(folder):
    shutil.rmtree(folder / "assets", ignore_errors=True)
    _write_json(folder / "assets" / caption_export.METADATA_FILE, {
        "format": caption_export.FORMAT, "format_version": caption_export.FORMAT_VERSION, "input_size": [8, 8],
        "channels": 1, "beam_size": 1, "alpha": 0.0, "max_length": 5, "signatures": list(caption_export.SIGNATURES)})
    _write_json(folder / "assets" / caption_export.VOCABULARY_FILE, ["", "<unk>", "<start>", "<end>", "a"])


def _untrusted_saved_model(path, target):
    """A SavedModel whose serving signature writes `target` (WriteFile inside a tf.function)."""
    module = tf.Module()
    module.scale = tf.Variable(2.0)

    @tf.function(input_signature=[tf.TensorSpec((None,), tf.float32)])
    def serve(x):
        tf.io.write_file(str(target), tf.strings.as_string(tf.reduce_sum(x)))
        return {"y": module.scale * x}

    module.serve = serve
    tf.saved_model.save(module, str(path), signatures={"serving_default": serve})
    return path


def _foreign_saved_model(path):
    """A harmless SavedModel with a signature no dlsuite command calls."""
    module = tf.Module()
    module.double = tf.function(lambda x: 2 * x, input_signature=[tf.TensorSpec((None,))])
    tf.saved_model.save(module, str(path), signatures={"double": module.double})
    return path


def _damaged_copies(good, root):
    """{kind: folder}: copies of the export `good`, each damaged one way."""
    found = {}

    def copy(kind):
        folder = root / kind / "1"
        shutil.copytree(good, folder)
        found[kind] = folder
        return folder

    (copy("garbage_pb") / "saved_model.pb").write_bytes(b"this is not a protobuf \xff\x00" * 20)
    (copy("empty_pb") / "saved_model.pb").write_bytes(b"")
    (copy("no_pb") / "saved_model.pb").unlink()
    shutil.rmtree(copy("no_variables") / "variables")
    data = next((copy("truncated_variables") / "variables").glob("variables.data-*"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    (copy("truncated_index") / "variables" / "variables.index").write_bytes(b"short")
    data = next((copy("scrambled_variables") / "variables").glob("variables.data-*"))
    data.write_bytes(bytes(255 - byte for byte in data.read_bytes()))
    return found


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{name: path} of every file and folder the cases point at, built once."""
    root = tmp_path_factory.mktemp("bad_inputs")
    f = {"root": root}
    keras.utils.set_random_seed(0)

    # Images and image folders.
    f["image"] = _png(root / "image.png")
    (root / "not_an_image.png").write_text("hello", encoding="utf-8")
    f["not_an_image"] = root / "not_an_image.png"
    (root / "empty.png").write_bytes(b"")
    f["empty_image"] = root / "empty.png"
    f["images"] = root / "images"
    for name in CLASS_NAMES:
        for i in range(3):
            _png(f["images"] / name / f"{i}.png", value=80 * i)
    f["empty_dir"] = root / "empty_dir"
    f["empty_dir"].mkdir()
    f["one_class"] = root / "one_class"
    _png(f["one_class"] / "only" / "0.png")
    f["unreadable_class"] = root / "unreadable_class"  # class b holds only a text file named .png
    _png(f["unreadable_class"] / "a" / "0.png")
    (f["unreadable_class"] / "b").mkdir()
    (f["unreadable_class"] / "b" / "fake.png").write_text("not a png", encoding="utf-8")
    f["non_utf8_class"] = root / "non_utf8_class"  # class b's only image has a name that is not UTF-8
    _png(f["non_utf8_class"] / "a" / "0.png")
    (f["non_utf8_class"] / "b").mkdir()
    shutil.copy(f["image"], os.path.join(os.fsencode(f["non_utf8_class"] / "b"), b"\xff\xfe.png"))

    # Text files.
    f["text"] = root / "text.txt"
    f["text"].write_text("abab abba baba " * 300, encoding="utf-8")
    f["empty_text"] = root / "empty.txt"
    f["empty_text"].write_text("", encoding="utf-8")
    f["latin1_text"] = root / "latin1.txt"
    f["latin1_text"].write_bytes("caf\xe9 na\xefve ".encode("latin-1") * 50)
    f["binary_text"] = root / "binary.txt"
    f["binary_text"].write_bytes(bytes(range(256)) * 4)
    f["short_text"] = root / "short.txt"
    f["short_text"].write_text("ab", encoding="utf-8")
    f["captions_bad"] = root / "captions.txt"
    f["captions_bad"].write_text("no tab on this line\n", encoding="utf-8")

    # Config files (--config, --space) and resume folders.
    f["bad_yaml"] = root / "bad.yaml"
    f["bad_yaml"].write_text("epochs: [1, 2\nlr: 0.1\n", encoding="utf-8")
    f["bad_json"] = root / "bad.json"
    f["bad_json"].write_text('{"epochs": 3,', encoding="utf-8")
    f["unknown_key"] = root / "unknown.yaml"
    f["unknown_key"].write_text("epochs: 1\nwarp_speed: 9\n", encoding="utf-8")
    f["wrong_type"] = root / "wrong_type.yaml"
    f["wrong_type"].write_text("epochs: ten\n", encoding="utf-8")
    f["list_yaml"] = root / "list.yaml"
    f["list_yaml"].write_text("- epochs\n- 3\n", encoding="utf-8")
    f["binary_config"] = root / "binary.yaml"
    f["binary_config"].write_bytes(b"\xff\xfe\x00epochs: 3\n")
    f["empty_config"] = root / "empty.yaml"
    f["empty_config"].write_text("", encoding="utf-8")
    f["space_unknown"] = root / "space.yaml"
    f["space_unknown"].write_text("warp_speed: [1, 2]\n", encoding="utf-8")
    f["run_no_config"] = root / "run_no_config"
    f["run_no_config"].mkdir()
    f["run_no_key"] = root / "run_no_key"
    _write_json(f["run_no_key"] / "config.json", {"resolved": {}})
    f["run_malformed"] = root / "run_malformed"
    f["run_malformed"].mkdir()
    (f["run_malformed"] / "config.json").write_text('{"config": {"epochs": 2,', encoding="utf-8")
    f["run_config_list"] = root / "run_config_list"
    _write_json(f["run_config_list"] / "config.json", {"config": [1, 2]})
    f["run_bad_history"] = root / "run_bad_history"
    f["run_bad_history"].mkdir()
    (f["run_bad_history"] / "history.csv").write_text("epoch,loss\n0,abc\n1\n", encoding="utf-8")
    f["run_empty_history"] = root / "run_empty_history"
    f["run_empty_history"].mkdir()
    (f["run_empty_history"] / "history.csv").write_text("", encoding="utf-8")
    f["run_wrong_type"] = root / "run_wrong_type"
    _write_json(f["run_wrong_type"] / "config.json", {"config": {"epochs": "many"}})

    # A plain file where a folder should be (an unwritable --out, --dir or --export-dir, even for root).
    f["file"] = root / "plain_file"
    f["file"].write_text("x", encoding="utf-8")

    # Model files.
    good = export.export_classifier(_tiny_classifier(), class_names=CLASS_NAMES, name="tiny",
                                    base_dir=root / "saved_models")
    f["export"] = good
    _classify_metadata(good)
    f.update(_damaged_copies(good, root / "damaged"))
    f["untrusted"] = _untrusted_saved_model(root / "untrusted" / "1", root / PWNED)
    _classify_metadata(f["untrusted"])
    f["foreign"] = _foreign_saved_model(root / "foreign" / "1")
    _classify_metadata(f["foreign"])  # says it is ours, lacks our signatures
    for app, write in (("lm", _lm_metadata), ("caption", _caption_metadata)):
        for kind in ("garbage_pb", "no_variables", "untrusted", "foreign"):
            folder = root / f"{app}_{kind}" / "1"
            shutil.copytree(f[kind], folder)
            write(folder)
            f[f"{app}_{kind}"] = folder

    keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(2, 3, name="conv1"), keras.layers.Flatten(name="flatten"),
                      keras.layers.Dense(2)]).save(root / "good.keras")
    contents = (root / "good.keras").read_bytes()
    f["truncated_keras"] = root / "truncated.keras"
    f["truncated_keras"].write_bytes(contents[: len(contents) // 2])
    f["text_keras"] = root / "text.keras"
    f["text_keras"].write_text("not a zip", encoding="utf-8")
    f["zip_keras"] = root / "zip.keras"  # a zip, but no model in it
    with zipfile.ZipFile(f["zip_keras"], "w") as archive:
        archive.writestr("readme.txt", "hello")
    f["lambda_keras"] = root / "lambda.keras"
    keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Lambda(lambda x: x * 2)]).save(f["lambda_keras"])
    f["not_h5"] = root / "fake.weights.h5"
    f["not_h5"].write_text("not hdf5", encoding="utf-8")
    f["truncated_h5"] = root / "truncated.weights.h5"
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(64)]).save_weights(root / "whole.weights.h5")
    whole = (root / "whole.weights.h5").read_bytes()
    f["truncated_h5"].write_bytes(whole[: len(whole) // 2])
    return {name: str(path) for name, path in f.items()}


def _case(*argv, id):
    return pytest.param(list(argv), id=id)


EXPORTS = ("garbage_pb", "empty_pb", "no_pb", "no_variables", "truncated_variables", "truncated_index",
           "scrambled_variables", "untrusted", "foreign")

CASES = [
    # --- dlsuite, models, info --------------------------------------------------------------
    _case("nope", id="unknown-command"),
    _case("models", id="models-no-subcommand"),
    _case("models", "show", "nope", id="models-show-unknown"),
    _case("models", "show", "lenet5", "--input-shape", "32,x,3", id="models-show-bad-shape"),
    _case("models", "show", "lenet5", "--classes", "0", id="models-show-classes-0"),
    _case("models", "show", "lenet5", "--batch-size", "-1", id="models-show-batch-negative"),
    _case("models", "show", "lenet5", "--optimizer", "adamw", id="models-show-unknown-optimizer"),
    _case("models", "list", "--family", "nope", id="models-list-unknown-family"),
    _case("models", "list", "--kind", "transformer", id="models-list-unknown-kind"),
    _case("info", "--bogus", id="info-unknown-flag"),

    # --- classify train ---------------------------------------------------------------------
    _case("classify", "train", "--epochs", "0", id="train-epochs-0"),
    _case("classify", "train", "--epochs", "x", id="train-epochs-x"),
    _case("classify", "train", "--lr", "abc", id="train-lr-abc"),
    _case("classify", "train", "--lr", "-1", id="train-lr-negative"),
    _case("classify", "train", "--optimizer", "adamw", id="train-unknown-optimizer"),
    _case("classify", "train", "--model", "nope", id="train-unknown-model"),
    _case("classify", "train", "--dataset", "nope", id="train-unknown-dataset"),
    _case("classify", "train", "--dataset", "{root}/missing", id="train-missing-folder"),
    _case("classify", "train", "--dataset", "{empty_dir}", id="train-empty-folder"),
    _case("classify", "train", "--dataset", "{one_class}", id="train-one-class"),
    _case("classify", "train", "--dataset", "{unreadable_class}", id="train-class-of-non-images"),
    _case("classify", "train", "--dataset", "{non_utf8_class}", id="train-class-of-non-utf8-names"),
    _case("classify", "train", "--dataset", "{images}", "--strict", "--validation-data", "{unreadable_class}",
          id="train-strict-validation-non-image"),
    _case("classify", "train", "--validation-fraction", "1.5", id="train-validation-fraction"),
    _case("classify", "train", "--test-fraction", "-0.1", id="train-test-fraction"),
    _case("classify", "train", "--image-size", "0", id="train-image-size-0"),
    _case("classify", "train", "--augment", "spin", id="train-unknown-augment"),
    _case("classify", "train", "--activation", "swish", id="train-unknown-activation"),
    _case("classify", "train", "--init", "foo", id="train-unknown-init"),
    _case("classify", "train", "--dropout", "1.5", id="train-dropout"),
    _case("classify", "train", "--batch-size", "0", id="train-batch-0"),
    _case("classify", "train", "--lr-schedule", "foo", id="train-unknown-schedule"),
    _case("classify", "train", "--mixed-precision", "maybe", id="train-mixed-precision"),
    _case("classify", "train", "--strategy", "nope", id="train-unknown-strategy"),
    _case("classify", "train", "--monitor", "nope", id="train-unknown-monitor"),
    _case("classify", "train", "--precise-bn", "0", id="train-precise-bn-0"),
    _case("classify", "train", "--shapes-classes", "0", id="train-shapes-classes-0"),
    _case("classify", "train", "--config", "{root}/missing.yaml", id="train-config-missing"),
    _case("classify", "train", "--config", "{bad_yaml}", id="train-config-bad-yaml"),
    _case("classify", "train", "--config", "{bad_json}", id="train-config-bad-json"),
    _case("classify", "train", "--config", "{unknown_key}", id="train-config-unknown-key"),
    _case("classify", "train", "--config", "{wrong_type}", id="train-config-wrong-type"),
    _case("classify", "train", "--config", "{list_yaml}", id="train-config-list"),
    _case("classify", "train", "--config", "{binary_config}", id="train-config-not-utf8"),
    _case("classify", "train", "--config", "{empty_dir}", id="train-config-folder"),
    _case("classify", "train", "--resume", "{root}/missing", id="train-resume-missing"),
    _case("classify", "train", "--resume", "{run_no_config}", id="train-resume-no-config"),
    _case("classify", "train", "--resume", "{run_no_key}", id="train-resume-config-without-key"),
    _case("classify", "train", "--resume", "{run_malformed}", id="train-resume-config-malformed"),
    _case("classify", "train", "--resume", "{run_config_list}", id="train-resume-config-list"),
    _case("classify", "train", "--resume", "{run_wrong_type}", id="train-resume-config-wrong-type"),
    _case("classify", "train", "--export-dir", "{file}/exports", id="train-export-dir-under-file"),
    _case("classify", "train", "--export", "bad/name", id="train-bad-export-name"),
    _case("classify", "train", "--out", "{file}/run", id="train-out-under-file"),
    _case("classify", "train", "--validation-data", "{root}/missing", id="train-validation-data-missing"),
    _case("classify", "train", "--dataset", "{images}", "--test-data", "{image}", id="train-test-data-file"),
    _case("classify", "train", "--bogus", "1", id="train-unknown-flag"),

    # --- classify evaluate and predict ------------------------------------------------------
    _case("classify", "evaluate", "{export}", id="evaluate-no-dataset"),
    _case("classify", "evaluate", "{root}/missing", "--dataset", "digits", id="evaluate-missing-export"),
    _case("classify", "evaluate", "{empty_dir}", "--dataset", "digits", id="evaluate-empty-folder"),
    *[_case("classify", "evaluate", "{%s}" % kind, "--dataset", "{images}", id=f"evaluate-{kind}")
      for kind in EXPORTS],
    _case("classify", "evaluate", "{export}", "--dataset", "{unreadable_class}", id="evaluate-other-classes"),
    _case("classify", "evaluate", "{export}", "--dataset", "digits", "--split", "nope", id="evaluate-unknown-split"),
    _case("classify", "evaluate", "{export}", "--dataset", "digits", "--split", "all", id="evaluate-split-all-not-folder"),
    _case("classify", "evaluate", "{export}", "--dataset", "{images}", "--split", "test", "--test-fraction", "2",
          id="evaluate-test-fraction"),
    _case("classify", "evaluate", "{export}", "--dataset", "{images}", "--out", "{file}/metrics",
          id="evaluate-out-under-file"),
    _case("classify", "predict", "{export}", id="predict-no-images"),
    _case("classify", "predict", "{export}", "{root}/missing.png", id="predict-missing-image"),
    _case("classify", "predict", "{export}", "{not_an_image}", id="predict-not-an-image"),
    _case("classify", "predict", "{export}", "{empty_image}", id="predict-empty-image"),
    _case("classify", "predict", "{export}", "{image}", "--top-k", "0", id="predict-top-k-0"),
    _case("classify", "predict", "{root}/good.keras", "{image}", id="predict-keras-file"),
    *[_case("classify", "predict", "{%s}" % kind, "{image}", id=f"predict-{kind}") for kind in EXPORTS],

    # --- data -------------------------------------------------------------------------------
    _case("data", "pack", "{root}/missing", "packed", id="data-pack-missing-folder"),
    _case("data", "pack", "{empty_dir}", "packed", id="data-pack-empty-folder"),
    _case("data", "pack", "{images}", "{images}", id="data-pack-out-exists"),
    _case("data", "pack", "{images}", "{file}/packed", id="data-pack-out-under-file"),
    _case("data", "pack", "{images}", "packed", "--shard-mb", "0", id="data-pack-shard-mb-0"),
    _case("data", "pack", "{images}", "packed", "--image-size", "0", id="data-pack-image-size-0"),
    _case("data", "show", "{root}/missing", id="data-show-missing"),
    _case("data", "show", "{images}", id="data-show-not-packed"),
    _case("data", "dispatcher", "--port", "70000", id="data-dispatcher-port"),
    _case("data", "worker", "--dispatcher", "grpc://127.0.0.1:1", id="data-worker-unreachable-dispatcher"),
    _case("data", "worker", "--dispatcher", "grpc://127.0.0.1:1", "--port", "x", id="data-worker-port-x"),

    # --- lm ---------------------------------------------------------------------------------
    _case("lm", "train", "--text", "{root}/missing.txt", id="lm-train-missing-text"),
    _case("lm", "train", "--text", "{empty_text}", id="lm-train-empty-text"),
    _case("lm", "train", "--text", "{latin1_text}", id="lm-train-not-utf8"),
    _case("lm", "train", "--text", "{binary_text}", id="lm-train-binary"),
    _case("lm", "train", "--text", "{empty_dir}", id="lm-train-text-folder"),
    _case("lm", "train", "--text", "{short_text}", id="lm-train-text-too-short"),
    _case("lm", "train", "--level", "sentence", id="lm-train-unknown-level"),
    _case("lm", "train", "--cell", "transformer", id="lm-train-unknown-cell"),
    _case("lm", "train", "--seq-len", "0", id="lm-train-seq-len-0"),
    _case("lm", "train", "--units", "x", id="lm-train-units-x"),
    _case("lm", "train", "--dataset", "nope", id="lm-train-unknown-dataset"),
    _case("lm", "train", "--text", "{text}", "--validation-fraction", "1", id="lm-train-validation-fraction"),
    _case("lm", "train", "--max-chars", "-1", id="lm-train-max-chars-negative"),
    _case("lm", "train", "--text", "{text}", "--dropout", "1", id="lm-train-dropout"),
    _case("lm", "train", "--config", "{bad_yaml}", id="lm-train-config-bad-yaml"),
    _case("lm", "train", "--config", "{empty_config}", "--text", "{empty_text}", id="lm-train-config-empty"),
    _case("lm", "train", "--resume", "{run_no_key}", id="lm-train-resume-config-without-key"),
    _case("lm", "train", "--resume", "{run_malformed}", id="lm-train-resume-config-malformed"),
    _case("lm", "train", "--text", "{text}", "--export-dir", "{file}/x", id="lm-train-export-dir-under-file"),
    _case("lm", "train", "--text", "{text}", "--out", "{file}/x", id="lm-train-out-under-file"),
    _case("lm", "generate", "{root}/missing", id="lm-generate-missing"),
    _case("lm", "generate", "{export}", id="lm-generate-classifier"),
    _case("lm", "generate", "{lm_garbage_pb}", id="lm-generate-garbage-pb"),
    _case("lm", "generate", "{lm_no_variables}", id="lm-generate-no-variables"),
    _case("lm", "generate", "{lm_untrusted}", id="lm-generate-untrusted"),
    _case("lm", "generate", "{lm_foreign}", id="lm-generate-foreign"),
    _case("lm", "generate", "{lm_foreign}", "--length", "0", id="lm-generate-length-0"),
    _case("lm", "generate", "{lm_foreign}", "--temperature", "0", id="lm-generate-temperature-0"),
    _case("lm", "generate", "{lm_foreign}", "--top-k", "0", id="lm-generate-top-k-0"),
    _case("lm", "generate", "{lm_foreign}", "--seed", "x", id="lm-generate-seed-x"),
    _case("lm", "evaluate", "{lm_foreign}", id="lm-evaluate-no-text"),
    _case("lm", "evaluate", "{lm_garbage_pb}", "--text", "{text}", id="lm-evaluate-garbage-pb"),
    _case("lm", "evaluate", "{lm_untrusted}", "--text", "{text}", id="lm-evaluate-untrusted"),
    _case("lm", "embed", "{lm_no_variables}", "--text", "{text}", "--out", "e.npz", id="lm-embed-no-variables"),
    _case("lm", "embed", "{lm_foreign}", "--text", "{text}", "--out", "{file}/e.npz", id="lm-embed-out-under-file"),
    _case("lm", "embed", "{lm_foreign}", "--text", "{text}", "--out", "e.csv", id="lm-embed-out-not-npz"),
    _case("lm", "embed", "{lm_untrusted}", "--text", "{text}", "--out", "e.npz", id="lm-embed-untrusted"),
    _case("lm", "embed", "{lm_foreign}", "--text", "{text}", id="lm-embed-no-out"),

    # --- transfer ---------------------------------------------------------------------------
    _case("transfer", "extract", "--backbone", "nope", "--images", "{images}", id="extract-unknown-backbone"),
    _case("transfer", "extract", "--weights", "none", "--images", "{images}", id="extract-no-backbone"),
    _case("transfer", "extract", "--backbone", "lenet5", "--images", "{images}", id="extract-no-imagenet"),
    _case("transfer", "extract", "--backbone", "lenet5", "--weights", "{root}/missing.h5", "--images", "{images}",
          id="extract-missing-weights"),
    _case("transfer", "extract", "--backbone", "lenet5", "--weights", "{not_h5}", "--images", "{images}",
          id="extract-weights-not-hdf5"),
    _case("transfer", "extract", "--backbone", "lenet5", "--weights", "{truncated_h5}", "--images", "{images}",
          id="extract-weights-truncated-hdf5"),
    *[_case("transfer", "extract", "--weights", "{%s}" % kind, "--images", "{images}", id=f"extract-{kind}")
      for kind in ("garbage_pb", "no_variables", "truncated_variables", "untrusted", "foreign")],
    *[_case("transfer", "extract", "--weights", "{%s}" % kind, "--images", "{images}", id=f"extract-{kind}")
      for kind in ("truncated_keras", "text_keras", "zip_keras", "lambda_keras")],
    _case("transfer", "extract", "--weights", "{root}/good.keras", "--images", "{images}", "--out", "{file}/f.npz",
          id="extract-out-under-file"),
    _case("transfer", "extract", "--weights", "{root}/good.keras", "--images", "{images}", "--out", "{empty_dir}",
          id="extract-out-folder"),
    _case("transfer", "extract", "--backbone", "lenet5", "--weights", "none", "--images", "{root}/missing",
          id="extract-missing-images"),
    _case("transfer", "extract", "--backbone", "lenet5", "--weights", "none", "--images", "{empty_dir}",
          id="extract-no-images"),
    _case("transfer", "extract", "--backbone", "lenet5", "--weights", "none", "--images", "{images}", "--out",
          "features.txt", id="extract-out-not-npz"),
    _case("transfer", "extract", "--backbone", "lenet5", "--weights", "none", "--images", "{images}", "--layer",
          "nope", id="extract-unknown-layer"),
    _case("transfer", "extract", "--backbone", "lenet5", "--input-size", "0,0", "--images", "{images}",
          id="extract-input-size-0"),
    _case("transfer", "finetune", "--backbone", "nope", id="finetune-unknown-backbone"),
    *[_case("transfer", "finetune", "--weights", "{%s}" % kind, "--dataset", "{images}", id=f"finetune-{kind}")
      for kind in ("garbage_pb", "no_variables", "truncated_variables", "untrusted", "truncated_keras",
                   "lambda_keras")],
    _case("transfer", "finetune", "--backbone", "lenet5", "--weights", "none", "--unfreeze", "zero",
          id="finetune-unfreeze"),
    _case("transfer", "finetune", "--backbone", "lenet5", "--weights", "none", "--freeze-epochs", "0",
          "--finetune-epochs", "0", id="finetune-nothing-to-train"),
    _case("transfer", "finetune", "--backbone", "lenet5", "--weights", "none", "--finetune-lr-factor", "2",
          id="finetune-lr-factor"),
    _case("transfer", "finetune", "--backbone", "lenet5", "--weights", "none", "--head-dropout", "1",
          id="finetune-head-dropout"),
    _case("transfer", "finetune", "--backbone", "lenet5", "--weights", "none", "--optimizer", "lbfgs",
          id="finetune-lbfgs"),
    _case("transfer", "finetune", "--resume", "{run_malformed}", id="finetune-resume-config-malformed"),

    # --- tune -------------------------------------------------------------------------------
    _case("tune", "nope", id="tune-unknown-app"),
    _case("tune", "classify", "--tuner", "grid", id="tune-unknown-tuner"),
    _case("tune", "classify", "--max-trials", "0", id="tune-max-trials-0"),
    _case("tune", "classify", "--objective", "nope", id="tune-unknown-objective"),
    _case("tune", "classify", "--space", "{root}/missing.yaml", id="tune-space-missing"),
    _case("tune", "classify", "--space", "{bad_yaml}", id="tune-space-bad-yaml"),
    _case("tune", "classify", "--space", "{space_unknown}", id="tune-space-unknown-key"),
    _case("tune", "classify", "--dir", "{file}/search", id="tune-dir-under-file"),
    _case("tune", "classify", "--config", "{bad_json}", id="tune-config-bad-json"),
    *[_case("tune", "transfer", "--weights", "{%s}" % kind, "--dataset", "{images}", "--dir", "search",
            id=f"tune-transfer-{kind}")
      for kind in ("garbage_pb", "no_variables", "truncated_variables", "scrambled_variables", "untrusted",
                   "truncated_keras", "text_keras", "lambda_keras")],
    _case("tune", "transfer", "--backbone", "lenet5", "--weights", "{truncated_h5}", "--dataset", "{images}",
          "--dir", "search", id="tune-transfer-truncated-hdf5"),
    _case("tune", "transfer", "--weights", "{root}/missing", "--backbone", "lenet5", "--dir", "search",
          id="tune-transfer-missing-weights"),
    _case("tune", "lm", "--text", "{empty_text}", id="tune-lm-empty-text"),
    _case("tune", "caption", "--dataset", "nope", id="tune-caption-unknown-dataset"),

    # --- caption ----------------------------------------------------------------------------
    _case("caption", "train", "--decoder", "transformer", id="caption-train-unknown-decoder"),
    _case("caption", "train", "--images", "{images}", id="caption-train-images-without-captions"),
    _case("caption", "train", "--images", "{images}", "--captions", "{root}/missing.txt",
          id="caption-train-missing-captions"),
    _case("caption", "train", "--images", "{images}", "--captions", "{empty_text}", id="caption-train-empty-captions"),
    _case("caption", "train", "--images", "{images}", "--captions", "{latin1_text}",
          id="caption-train-captions-not-utf8"),
    _case("caption", "train", "--images", "{images}", "--captions", "{captions_bad}",
          id="caption-train-captions-malformed"),
    _case("caption", "train", "--encoder-weights", "{untrusted}", id="caption-train-untrusted-encoder"),
    _case("caption", "train", "--encoder-weights", "{garbage_pb}", id="caption-train-garbage-encoder"),
    _case("caption", "train", "--encoder-weights", "{truncated_keras}", id="caption-train-truncated-keras-encoder"),
    _case("caption", "train", "--attention", "--pooling", "avg", id="caption-train-attention-pooling"),
    _case("caption", "train", "--dropout", "1", id="caption-train-dropout"),
    _case("caption", "train", "--resume", "{run_no_key}", id="caption-train-resume-config-without-key"),
    _case("caption", "generate", "{root}/missing", "{image}", id="caption-generate-missing"),
    _case("caption", "generate", "{export}", "{image}", id="caption-generate-classifier"),
    _case("caption", "generate", "{caption_garbage_pb}", "{image}", id="caption-generate-garbage-pb"),
    _case("caption", "generate", "{caption_no_variables}", "{image}", id="caption-generate-no-variables"),
    _case("caption", "generate", "{caption_untrusted}", "{image}", id="caption-generate-untrusted"),
    _case("caption", "generate", "{caption_foreign}", "{image}", id="caption-generate-foreign"),
    _case("caption", "generate", "{caption_foreign}", "{image}", "--beam", "0", id="caption-generate-beam-0"),
    _case("caption", "generate", "{caption_foreign}", "{image}", "--alpha", "-1", id="caption-generate-alpha"),
    _case("caption", "evaluate", "{caption_garbage_pb}", id="caption-evaluate-garbage-pb"),
    _case("caption", "evaluate", "{caption_untrusted}", "--images", "{images}", "--captions", "{text}",
          id="caption-evaluate-untrusted"),
    _case("caption", "evaluate", "{caption_foreign}", "--images", "{images}", id="caption-evaluate-no-captions"),

    # --- diagnose ---------------------------------------------------------------------------
    _case("diagnose", "init", "--layers", "0", id="diagnose-init-layers-0"),
    _case("diagnose", "init", "--activation", "swish", id="diagnose-init-activation"),
    _case("diagnose", "overfit", "--model", "nope", id="diagnose-overfit-unknown-model"),
    _case("diagnose", "overfit", "--lr", "-1", id="diagnose-overfit-lr"),
    _case("diagnose", "lr-range", "--min-lr", "1", "--max-lr", "0.1", id="diagnose-lr-range-order"),
    _case("diagnose", "run", "{root}/missing", id="diagnose-run-missing"),
    _case("diagnose", "run", "{empty_dir}", id="diagnose-run-not-a-run"),
    _case("diagnose", "run", "{run_bad_history}", id="diagnose-run-history-malformed"),
    _case("diagnose", "run", "{run_empty_history}", id="diagnose-run-history-empty"),
    _case("diagnose", "memory", "nope", id="diagnose-memory-unknown-model"),
    _case("diagnose", "memory", "lenet5", "--batch-size", "0", id="diagnose-memory-batch-0"),
    _case("diagnose", "features", "{root}/missing", id="diagnose-features-missing"),
    _case("diagnose", "features", "{truncated_keras}", id="diagnose-features-truncated-keras"),
    _case("diagnose", "features", "{text_keras}", id="diagnose-features-text-keras"),
    _case("diagnose", "features", "{lambda_keras}", id="diagnose-features-lambda-keras"),
    _case("diagnose", "features", "{garbage_pb}", id="diagnose-features-garbage-pb"),
    _case("diagnose", "features", "{untrusted}", id="diagnose-features-untrusted"),
    _case("diagnose", "features", "{truncated_variables}", id="diagnose-features-truncated-variables"),
    _case("diagnose", "features", "lenet5", "--weights", "{not_h5}", id="diagnose-features-weights-not-hdf5"),

    # --- serve ------------------------------------------------------------------------------
    _case("serve", "{root}/missing", id="serve-missing"),
    _case("serve", "{export}", id="serve-version-folder"),
    _case("serve", "{image}", id="serve-file"),
    _case("serve", "--port", "70000", id="serve-port-range"),
    _case("serve", "--port", "x", id="serve-port-x"),
    _case("serve", "--poll-seconds", "0", id="serve-poll-0"),
    _case("serve", "--max-body-mb", "-1", id="serve-body-negative"),
    _case("serve", "{images}", "{empty_dir}", "--model-name", "m", id="serve-model-name-two-folders"),
]


def _listing(folder):
    return sorted(os.fsdecode(path.relative_to(folder)) for path in Path(folder).rglob("*"))


def test_the_table_covers_every_subcommand():
    assert len(CASES) >= 120
    commands = {tuple(word for word in case.values[0][:2] if not word.startswith(("-", "{"))) for case in CASES}
    parser = cli.build_parser()
    import argparse

    def leaves(parser, prefix=()):
        subs = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
        if not subs:
            return [prefix]
        return [leaf for name, child in subs[0].choices.items() for leaf in leaves(child, (*prefix, name))]

    missing = [leaf for leaf in leaves(parser) if not any(command[:len(leaf)] == leaf for command in commands)]
    assert not missing


@pytest.mark.parametrize("argv", CASES)
def test_bad_command_line_is_one_line(argv, files, tmp_path, monkeypatch, capsys, request):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    fixtures = _listing(files["root"])
    argv = [word.format(**files) for word in argv]
    status = cli.main(argv)
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert status == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("dlsuite: error: "), err
    assert _listing(cwd) == [], "the command left files behind"
    assert _listing(files["root"]) == fixtures, "the command wrote beside its input"
    assert not Path(files["root"], PWNED).exists(), "the untrusted SavedModel ran"
    if "untrusted" in request.node.callspec.id:  # refused for what it does, not for a missing signature
        assert "runs WriteFile" in lines[0] and "pass --trust-model" in lines[0], lines[0]


@pytest.mark.parametrize("argv, named", [
    (["classify", "train", "--export-dir", "/proc/dlsuite-exports"], "/proc/dlsuite-exports"),
    (["classify", "train", "--out", "/proc/dlsuite-runs"], "/proc/dlsuite-runs"),
    (["transfer", "finetune", "--backbone", "lenet5", "--weights", "none", "--dataset", "{images}",
      "--export-dir", "/proc"], "/proc"),
    (["transfer", "extract", "--backbone", "lenet5", "--weights", "none", "--images", "{images}",
      "--out", "/proc/features.npz"], "/proc/features.npz"),
], ids=["export-dir", "run-dir", "finetune-export-dir", "extract-out"])
def test_a_folder_that_refuses_new_files_is_named_before_any_work_even_for_root(argv, named, files, tmp_path,
                                                                                monkeypatch, capsys):
    # /proc refuses new files to everyone, root included, where the permission bits say yes to root.
    monkeypatch.chdir(tmp_path)
    status = cli.main([word.format(**files) for word in argv])
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert len(err.splitlines()) == 1, err
    assert repr(named) in err and "'/proc' refuses new files" in err and ".tmp" not in err, err
    assert _listing(tmp_path) == [], "the command started its work"
