"""`dlsuite data pack` and `vision/shards.py`: an image folder as TFRecord shards, read back exactly."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from dlsuite.apps import cli
from dlsuite.apps.core.errors import UsageError
from dlsuite.apps.vision import datasets, file_checks, shards


def _image(rng, height, width, channels):
    shape = (height, width) if channels == 1 else (height, width, 3)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))


def make_folder(root, *, classes=("cat", "dog", "eel"), per_class=4, channels=3, corrupt=True):
    """Class subfolders of tiny PNGs and JPEGs of varied sizes (one in a
    nested folder), plus one corrupt PNG in the first class."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        os.makedirs(root / name / "more", exist_ok=True)
        for i in range(per_class):
            kind = "png" if i % 2 else "jpg"
            _image(rng, 6 + i, 5 + c, channels).save(root / name / f"{i:03d}.{kind}")
        _image(rng, 7, 7, channels).save(root / name / "more" / "nested.png")
    if corrupt:
        (root / classes[0] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def expected(root):
    """[(path, label)] in the packed order, readable files only."""
    class_names, files = file_checks.list_class_files(root)
    return [(path, label) for label, name in enumerate(class_names) for path in files[name]
            if not path.endswith("broken.png")]


def read_all(files):
    """{index: (encoded, label, filename)} of every record, parsed with FEATURES."""
    out = {}
    for record in tf.data.TFRecordDataset(files):
        example = tf.io.parse_single_example(record, shards.FEATURES)
        out[int(example["image/index"])] = (bytes(example["image/encoded"].numpy()),
                                            int(example["image/class/label"]),
                                            example["image/filename"].numpy().decode())
    return out


def run(capsys, *argv):
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_pack_gives_back_every_image_exactly(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "photos")
    monkeypatch.setattr(shards, "PROGRESS_EVERY_S", 0.0)  # a progress line after every image
    lines = []
    info = shards.pack(root, tmp_path / "packed", progress=lines.append)

    images = expected(root)
    assert info.count == len(images) == 15
    assert info.class_names == ["cat", "dog", "eel"]
    assert info.labels.dtype == np.int32 and info.labels.tolist() == [label for _, label in images]
    assert info.channels == 3 and info.image_shape is None  # sizes vary
    assert [os.path.basename(f) for f in info.files] == [f"shard-{k:05d}-of-00008.tfrecord" for k in range(8)]
    assert info.skipped == [(str(root / "cat" / "broken.png"), "damaged PNG header")]
    assert lines[0].startswith("checking 16 images in 3 class folders")
    assert any(line.startswith("packed 1/15 images, ") and line.endswith("MB written") for line in lines)

    got = [(int(i), bytes(e), int(label)) for i, e, label in shards.records(info.files).as_numpy_iterator()]
    assert sorted(i for i, _, _ in got) == list(range(15))
    for index, encoded, label in got:
        path, true_label = images[index]
        assert encoded == open(path, "rb").read()  # the file's own bytes
        assert label == true_label
    assert got == [(int(i), bytes(e), int(label)) for i, e, label in shards.records(info.files).as_numpy_iterator()]
    filenames = {index: name for index, (_, _, name) in read_all(info.files).items()}
    assert filenames[0] == "cat/000.jpg" and filenames[4] == "cat/more/nested.png"
    assert [filenames[i] for i in range(15)] == [os.path.relpath(p, root) for p, _ in images]

    # Image i is in shard i % 8: a worker's own files still hold several classes.
    first = shards.records(info.files[0]).as_numpy_iterator()
    assert [int(i) for i, _, _ in first] == [0, 8]

    description = json.loads((tmp_path / "packed" / "dataset.json").read_text())
    assert description["format"] == "dlsuite-shards" and description["version"] == 1
    assert description["count"] == 15 and description["class_counts"] == [5, 5, 5]
    assert description["channels"] == 3 and description["image_shape"] is None and description["resized"] is None
    assert [shard["count"] for shard in description["shards"]] == [2] * 7 + [1]
    assert description["skipped"] == [[str(root / "cat" / "broken.png"), "damaged PNG header"]]
    assert description["source"] == str(root)
    assert sorted(os.listdir(tmp_path)) == ["packed", "photos"]  # no partial folder left
    assert shards.is_packed(tmp_path / "packed") and not shards.is_packed(root)


@pytest.mark.parametrize("channels", [1, 3])
def test_image_size_resizes_to_jpeg(tmp_path, channels):
    root = make_folder(tmp_path / "photos", channels=channels, corrupt=False)
    info = shards.pack(root, tmp_path / "packed", image_size=(9, 7), progress=lambda line: None)
    assert info.image_shape == (9, 7, channels) and info.resized == (9, 7) and info.channels == channels
    index, encoded, _ = next(shards.records(info.files).as_numpy_iterator())
    assert bytes(encoded[:3]) == b"\xff\xd8\xff"  # JPEG
    decoded = tf.io.decode_jpeg(encoded)
    assert decoded.shape == (9, 7, channels)
    # What the training pipeline's bilinear resize gives, up to the JPEG's loss.
    source = tf.io.decode_image(open(expected(root)[index][0], "rb").read(), channels=3, expand_animations=False)
    if channels == 1:
        source = tf.image.rgb_to_grayscale(source)
    resized = tf.image.resize(source, (9, 7), method="bilinear")
    assert float(tf.reduce_mean(tf.abs(tf.cast(decoded, tf.float32) - resized))) < 12
    description = json.loads((tmp_path / "packed" / "dataset.json").read_text())
    assert description["image_shape"] == [9, 7, channels] and description["resized"] == [9, 7]


def test_one_native_size_is_the_image_shape(tmp_path):
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        os.makedirs(tmp_path / "photos" / name)
        for i in range(3):
            _image(rng, 4, 6, 1).save(tmp_path / "photos" / name / f"{i}.png")
    info = shards.pack(tmp_path / "photos", tmp_path / "packed", progress=lambda line: None)
    assert (info.channels, info.image_shape, len(info.files)) == (1, (4, 6, 1), 6)  # one shard per image below 8


@pytest.mark.parametrize("images, total_bytes, shard_mb, count", [
    (1, 10, 128, 1),
    (5, 10, 128, 5),  # one image each, below MIN_SHARDS
    (1000, 10e6, 128, 8),  # MIN_SHARDS for workers
    (1000, 1000e6, 100, 10),  # by size
    (3, 1000e6, 1, 3),  # never an empty shard
])
def test_shard_count(images, total_bytes, shard_mb, count):
    assert shards.shard_count(images, total_bytes, shard_mb) == count


def test_cli_pack_refuses_existing_out_and_overwrites_a_pack(tmp_path, capsys):
    root = make_folder(tmp_path / "photos")
    out = tmp_path / "packed"
    status, printed, err = run(capsys, "data", "pack", str(root), str(out))
    assert status == 0, err
    assert f"skipped {root / 'cat' / 'broken.png'}: damaged PNG header" in printed
    assert f"wrote {out}: 15 images, 3 classes" in printed
    assert printed.rstrip().endswith(f"train with: dlsuite classify train --dataset {out}")

    status, printed, err = run(capsys, "data", "pack", str(root), str(out), "--image-size", "5")
    assert status == 2 and err.count("\n") == 1
    assert err == (f"dlsuite: error: OUT '{out}' already exists and is not empty: choose another folder, or pass "
                   "--overwrite to replace an earlier pack there\n")
    status, printed, err = run(capsys, "data", "pack", str(root), str(out), "--image-size", "5", "--overwrite")
    assert status == 0, err
    assert shards.read_info(out).resized == (5, 5)

    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    status, _, err = run(capsys, "data", "pack", str(root), str(other), "--overwrite")
    assert status == 2 and "no dataset.json" in err and err.count("\n") == 1
    assert (other / "keep.txt").read_text() == "mine"


def _damage(out, how):
    if how == "no-json":
        os.remove(out / "dataset.json")
    elif how == "missing-shard":
        os.remove(out / "shard-00003-of-00008.tfrecord")
    elif how == "malformed-json":
        (out / "dataset.json").write_text('{"format": "dlsuite-shards", ')
    elif how == "other-format":
        (out / "dataset.json").write_text('{"format": "something"}')
    elif how == "short-labels":
        np.save(out / "labels.npy", np.zeros(3, np.int32))
    elif how == "no-labels":
        os.remove(out / "labels.npy")


@pytest.mark.parametrize("how, message", [
    ("no-json", "{out} is not a packed dataset: no dataset.json; write one with `dlsuite data pack FOLDER OUT`"),
    ("missing-shard", "{out}/shard-00003-of-00008.tfrecord is missing, a shard file that {out}/dataset.json lists"),
    ("malformed-json", "{out}/dataset.json is not valid JSON"),
    ("other-format", "{out}/dataset.json is not a dlsuite packed dataset description"),
    ("short-labels", "{out}/labels.npy holds 3 labels but {out}/dataset.json counts 15 images"),
    ("no-labels", "{out}/labels.npy is missing"),
])
def test_damaged_pack_is_one_line_and_exit_2(tmp_path, capsys, how, message):
    out = tmp_path / "packed"
    shards.pack(make_folder(tmp_path / "photos"), out, progress=lambda line: None)
    _damage(out, how)
    with pytest.raises(UsageError, match="^" + re.escape(message.format(out=out))):
        shards.read_info(out)
    status, printed, err = run(capsys, "data", "show", str(out))
    assert status == 2 and printed == ""
    assert err.startswith("dlsuite: error: " + message.format(out=out)) and err.count("\n") == 1


def test_show_prints_the_classes(tmp_path, capsys):
    out = tmp_path / "packed"
    shards.pack(make_folder(tmp_path / "photos"), out, progress=lambda line: None)
    status, printed, _ = run(capsys, "data", "show", str(out), "--json")
    assert status == 0
    shown = json.loads(printed)
    assert shown["class_counts"] == [5, 5, 5] and len(shown["files"]) == 8


@pytest.mark.parametrize("make_args, message", [
    (lambda t: (t / "nowhere", t / "out"), "Dataset folder '{t}/nowhere' does not exist"),
    (lambda t: (t / "photos", t / "photos" / "cat" / "packed"), "OUT '{t}/photos/cat/packed' and the image folder"),
    (lambda t: (t / "photos", t / "out", {"image_size": (0, 4)}), "image_size must be two positive integers"),
    (lambda t: (t / "photos", t / "out", {"shard_mb": 0}), "shard_mb must be a number > 0"),
    (lambda t: (t / "photos", t / "out", {"strict": True}),
     "Cannot read image '{t}/photos/cat/broken.png': damaged PNG header (strict mode"),
])
def test_pack_bad_input(tmp_path, make_args, message):
    make_folder(tmp_path / "photos")
    folder, out, *options = make_args(tmp_path)
    with pytest.raises(UsageError) as error:
        shards.pack(folder, out, progress=lambda line: None, **(options[0] if options else {}))
    assert str(error.value).startswith(message.format(t=tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["photos"]  # nothing written, no partial folder


def test_cli_arguments_are_one_line(tmp_path, capsys):
    status, _, err = run(capsys, "data", "pack", "a", "b", "--image-size", "3,x")
    assert status == 2 and "--image-size expects H or H,W" in err and err.count("\n") == 1
    status, _, err = run(capsys, "data", "pack", "a", "b", "--shard-mb", "-1")
    assert status == 2 and "--shard-mb must be > 0" in err


# The child packs through the real CLI, each image made slow, so that the
# parent can kill it while it writes.
_SLOW_PACK = """
import sys, time
from dlsuite.apps import cli
from dlsuite.apps.vision import shards
example = shards._example
def slow(*args, **kwargs):
    time.sleep(0.02)
    return example(*args, **kwargs)
shards._example = slow
sys.exit(cli.main(["data", "pack", sys.argv[1], sys.argv[2]]))
"""


def test_killed_pack_leaves_no_dataset(tmp_path, capsys):
    root = make_folder(tmp_path / "photos", per_class=100, corrupt=False)
    out = tmp_path / "packed"
    child = subprocess.Popen([sys.executable, "-c", _SLOW_PACK, str(root), str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = tmp_path / f"packed.partial-{child.pid}"
    deadline = time.monotonic() + 300  # a hang guard: TensorFlow took 20 s to import on a loaded 2-core machine
    while not (partial / "shard-00001-of-00008.tfrecord").exists():  # mid-pack: the second shard begun
        assert child.poll() is None, child.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not out.exists() and partial.is_dir()
    assert not shards.is_packed(out)
    with pytest.raises(UsageError, match="is not a packed dataset: it does not exist .*interrupted"):
        shards.read_info(out)

    # The next pack removes what the killed one left.
    lines = []
    info = shards.pack(root, out, progress=lines.append)
    assert info.count == 303
    assert f"removed {partial}, left by a pack that was killed" in lines
    assert sorted(os.listdir(tmp_path)) == ["packed", "photos"]


def test_object_store_paths(tmp_path):
    """OUT through tf.io.gfile alone, as on gs:// or s3://: TensorFlow's in-memory ram:// file system."""
    root = make_folder(tmp_path / "photos")
    out = f"ram://{tmp_path.name}/packed"
    info = shards.pack(root, out, progress=lambda line: None)
    assert info.files[0] == f"{out}/shard-00000-of-00008.tfrecord" and shards.is_packed(out)
    assert sorted(int(i) for i, _, _ in shards.records(info.files).as_numpy_iterator()) == list(range(15))
    with pytest.raises(UsageError, match="already exists and is not empty"):
        shards.pack(root, out, progress=lambda line: None)
    info = shards.pack(root, out, image_size=(4, 4), overwrite=True, progress=lambda line: None)
    assert shards.read_info(out).resized == (4, 4)
    assert tf.io.gfile.listdir(f"ram://{tmp_path.name}") == ["packed"]  # the partial folder moved, then went


def test_each_worker_reads_only_its_own_shard_files_and_takes_the_same_steps(tmp_path):
    from dlsuite.apps.vision import pipeline

    make_folder(tmp_path / "photos", per_class=10, corrupt=False)
    info = shards.pack(tmp_path / "photos", tmp_path / "packed", image_size=(8, 8), progress=lambda *_: None)
    assert len(info.files) == 8
    train = datasets.load(str(tmp_path / "packed"), validation_fraction=0.2, test_fraction=0.1, seed=0).sources["train"]
    parts = [train.worker_share(worker, 3) for worker in range(3)]
    # Worker w of 3 reads files w, w + 3, ...: its images are those at index i with i % 8 in them.
    assert [[os.path.basename(f) for f in part.files] for part in parts] == [
        [os.path.basename(info.files[k]) for k in range(w, 8, 3)] for w in range(3)]
    assert sum(part.count for part in parts) == train.count
    assert sorted(np.concatenate([part.labels for part in parts])) == sorted(train.labels)
    assert train.worker_share(0, 9) is None  # fewer files than workers: every worker reads all

    order = pipeline.epoch_order(train, image_size=(8, 8), channels=3, batch_size=6, seed=0, cache=None)
    steps = -(-train.count // 6)
    for worker, part in enumerate(parts):
        mine = order.worker_share(worker, 3, 2)
        labels = np.concatenate([y.numpy() for _, y in mine.epoch(0)])
        assert sorted(labels) == sorted(part.labels)  # one epoch of the worker's part is all of it, once
        batches = list(mine.stream(0, 2, steps=steps))
        assert len(batches) == 2 * steps and all(len(y) <= 2 for _, y in batches)


def test_two_workers_train_on_a_pack_each_reading_its_own_files(tmp_path):
    """A multi-worker run on packed shards as on a cluster (TF_CONFIG, two
    processes on localhost): each worker reads its own shard files."""
    import multiworker_cluster

    make_folder(tmp_path / "photos", per_class=12, corrupt=False)
    shards.pack(tmp_path / "photos", tmp_path / "packed", image_size=(32, 32), progress=lambda *_: None)
    workers = multiworker_cluster.start(
        ["classify", "train", "--dataset", tmp_path / "packed", "--model", "lenet5", "--image-size", "32",
         "--batch-size", "8", "--epochs", "2", "--cache", "none", "--strategy", "multi-worker",
         "--out", tmp_path / "run", "--no-export"], tmp_path, ports=[multiworker_cluster.free_port() for _ in range(2)])
    outputs = multiworker_cluster.outputs(workers)
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    assert "each of the 2 workers reads only its own part of the training data files" in outputs[0], outputs[0]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["epochs_run"] == 2


def test_a_parameter_server_worker_rebuilds_the_pipeline_of_its_own_files(tmp_path, monkeypatch, capsys):
    """The chief ships one graph per worker; worker i, by its index, picks
    the graph of its own files (`parameter_server._worker_share`)."""
    from dlsuite.apps.core import parameter_server
    from dlsuite.apps.vision import pipeline

    make_folder(tmp_path / "photos", per_class=10, corrupt=False)
    shards.pack(tmp_path / "photos", tmp_path / "packed", image_size=(8, 8), progress=lambda *_: None)
    train = datasets.load(str(tmp_path / "packed"), validation_fraction=0.2, test_fraction=0.1, seed=0).sources["train"]
    order = pipeline.epoch_order(train, image_size=(8, 8), channels=3, batch_size=4, seed=0, cache=None,
                                 in_process=False)
    monkeypatch.setattr(parameter_server.distribute, "cluster_size", lambda: {"worker": 2, "ps": 1, "chief": 1})
    dataset_fn = parameter_server._worker_share(order, 0, 1, global_batch_size=4)
    assert "each of the 2 workers reads only its own part" in capsys.readouterr().out
    seen = []
    for worker in range(2):
        monkeypatch.setattr(tf.distribute.coordinator, "experimental_get_current_worker_index",
                            lambda worker=worker: tf.constant(worker))
        part = train.worker_share(worker, 2)
        batches = list(dataset_fn().take(-(-part.count // 4)))
        assert sorted(np.concatenate([y.numpy() for _, y in batches])) == sorted(part.labels)
        seen.append({image.tobytes() for x, _ in batches for image in x.numpy()})
        assert len(seen[-1]) == part.count  # its whole part in one epoch, each image once
    assert not seen[0] & seen[1]  # and nothing of the other worker's
