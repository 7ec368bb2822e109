"""Data folders a user already has: train/, val/, test/ with one subfolder per
class, used as they are; `classify evaluate` on a folder the model never saw
scores every image of it."""

import json

from PIL import Image

from dlsuite.apps import cli
from dlsuite.apps.vision import shapes


def _folder(root, images, labels, names):
    for index, (image, label) in enumerate(zip(images, labels)):
        (root / names[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / names[label] / f"{index}.png")
    return root


def _splits(tmp_path):
    """train/ 60, val/ 20, test/ 24 images of two shape classes."""
    images, labels, names = shapes.generate(classes=2, size=32, count=104, seed=3)
    return {name: _folder(tmp_path / name, images[a:b], labels[a:b], names)
            for name, (a, b) in {"train": (0, 60), "val": (60, 80), "test": (80, 104)}.items()}


def run(argv, capsys):
    status = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_given_validation_and_test_folders_are_used_whole(tmp_path, capsys):
    folders = _splits(tmp_path)
    status, out, err = run(["classify", "train", "--dataset", folders["train"], "--validation-data", folders["val"],
                            "--test-data", folders["test"], "--epochs", "1", "--out", tmp_path / "run",
                            "--export-dir", tmp_path / "exports"], capsys)
    assert status == 0, err
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]
    assert resolved["sizes"] == {"train": 60, "validation": 20, "test": 24}
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert sum(row["support"] for row in metrics["per_class"].values()) == 24

    # The export knows what it was trained on: its own test folder is scored whole as any other folder,
    # and the training folder as its test split.
    export = next((tmp_path / "exports").iterdir())
    status, out, _ = run(["classify", "evaluate", export, "--dataset", folders["test"], "--json", "--out",
                          tmp_path / "evaluate"], capsys)
    assert status == 0 and json.loads(out)["examples"] == 24
    status, out, _ = run(["classify", "evaluate", export, "--dataset", folders["val"], "--out", tmp_path / "e2"], capsys)
    assert status == 0 and out.startswith(f"20 images (all of {folders['val']})")


def test_only_a_test_folder_still_splits_validation_off_the_training_folder(tmp_path, capsys):
    folders = _splits(tmp_path)
    status, _, err = run(["transfer", "finetune", "--backbone", "lenet5", "--weights", "none", "--dataset",
                          folders["train"], "--test-data", folders["test"], "--validation-fraction", "0.25",
                          "--freeze-epochs", "1", "--finetune-epochs", "0", "--out", tmp_path / "run", "--no-export"],
                         capsys)
    assert status == 0, err
    sizes = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]["sizes"]
    assert sizes == {"train": 45, "validation": 15, "test": 24}


def test_a_folder_with_other_classes_is_one_line(tmp_path, capsys):
    folders = _splits(tmp_path)
    (folders["val"] / "hexagon").mkdir()
    Image.new("RGB", (32, 32)).save(folders["val"] / "hexagon" / "x.png")
    status, _, err = run(["classify", "train", "--dataset", folders["train"], "--validation-data", folders["val"],
                          "--epochs", "1", "--out", tmp_path / "run"], capsys)
    assert status == 2 and err.startswith("dlsuite: error: validation folder") and "not in training: ['hexagon']" in err
    assert not (tmp_path / "run").exists()
