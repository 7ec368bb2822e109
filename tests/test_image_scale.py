"""Image folders of any size in bounded memory (#25): the cache decision,
streamed epochs equal to cached ones, exact resume while streaming, files
damaged after the check, the check manifest, the disk cache's faults."""

import json
import os
import pathlib
import signal
import sys

import numpy as np
import pytest
from PIL import Image

import zygote
from dlsuite.apps import cli
from dlsuite.apps.vision import datasets, file_checks, image_cache, manifest, pipeline, sources
from test_kill_resume import killed, weights

SIZE = (24, 24)


def photo_folder(root, *, per_class=12, classes=3):
    """JPEG and PNG files of a few sizes, one subfolder per class."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        for i in range(per_class):
            height, width = 20 + (i % 3) * 4, 28 - (i % 2) * 6
            base = np.full((height, width, 3), 60 * c, np.uint8)
            image = np.clip(base + rng.integers(0, 60, (height, width, 3)), 0, 255).astype(np.uint8)
            folder = root / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:03d}.{'jpg' if i % 2 else 'png'}")
    return root


def epoch_batches(order, epoch, skip=0):
    return [(images.numpy(), labels.numpy()) for images, labels in order.epoch(epoch, skip)]


def test_the_plan_caches_what_fits_the_budget_and_says_why():
    splits = [("train", 11_200, (224, 224), 3), ("validation", 2_400, (224, 224), 3)]
    fits = image_cache.plan(splits, mode="auto", cache_dir=None, budget=10 * 2**30)
    assert {key: choice.kind for key, choice in fits.items()} == {"train": "memory", "validation": "memory"}
    assert fits["train"].line.startswith("caching 11,200 train images at 224x224x3 in memory, 1.7 GB")

    tiny = image_cache.plan(splits, mode="auto", cache_dir=None, budget=1.9e9)
    assert tiny["train"].kind == "memory" and tiny["validation"].kind == "none"  # the budget goes to train first
    assert tiny["validation"].line.startswith("streaming: 2,400 validation images at 224x224x3 would need 361.3 MB")

    imagenet = image_cache.plan([("train", 1_281_167, (224, 224), 3)], mode="auto", cache_dir="/data/cache",
                                budget=6 * 2**30)
    assert imagenet["train"].kind == "disk" and "192.9 GB" in imagenet["train"].line
    forced = image_cache.plan(splits, mode="none", cache_dir=None, budget=10 * 2**30)
    assert {choice.kind for choice in forced.values()} == {"none"}


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_streamed_epochs_equal_cached_epochs_batch_for_batch(kind, tmp_path):
    data = datasets.load(str(photo_folder(tmp_path / "photos")), validation_fraction=0.2, test_fraction=0.2)
    source = data.sources["train"]
    cache = image_cache.build(source, sources.prepared(SIZE, 3), image_size=SIZE, channels=3, kind=kind,
                              cache_dir=str(tmp_path / "cache"))
    shape = dict(image_size=SIZE, channels=3, batch_size=5, seed=7)
    streamed = pipeline.epoch_order(source, cache=None, **shape)
    cached = pipeline.epoch_order(source, cache=cache, **shape)
    assert streamed.steps_per_epoch == cached.steps_per_epoch == -(-source.count // 5)
    for epoch in (0, 1):
        a, b = epoch_batches(streamed, epoch), epoch_batches(cached, epoch)
        assert len(a) == len(b) == streamed.steps_per_epoch
        for (images_a, labels_a), (images_b, labels_b) in zip(a, b):
            np.testing.assert_array_equal(images_a, images_b)
            np.testing.assert_array_equal(labels_a, labels_b)
    # Epochs differ, and a resumed epoch is the tail of the whole one.
    assert not np.array_equal(epoch_batches(streamed, 0)[0][1], epoch_batches(streamed, 1)[0][1])
    tail = epoch_batches(streamed, 1, skip=2)
    for (images_a, _), (images_b, _) in zip(tail, epoch_batches(streamed, 1)[2:]):
        np.testing.assert_array_equal(images_a, images_b)
    if kind == "disk":
        files = sorted(p.name for p in (tmp_path / "cache").iterdir())
        assert len(files) == 2 and files[0].endswith(".u8") and not any(".tmp-" in name for name in files)


def test_a_file_damaged_after_the_check_is_skipped_named_and_the_epoch_keeps_its_length(tmp_path, capfd):
    root = photo_folder(tmp_path / "photos")
    data = datasets.load(str(root), validation_fraction=0.2, test_fraction=0.2)
    source = data.sources["train"]
    victim = pathlib.Path(source.paths[3])
    contents = bytearray(victim.read_bytes())
    contents[20:len(contents) - 20] = bytes(len(contents) - 40)  # header and end marker kept, the body gone
    victim.write_bytes(bytes(contents))

    order = pipeline.epoch_order(source, image_size=SIZE, channels=3, batch_size=4, seed=0, cache=None)
    batches = epoch_batches(order, 0)
    assert len(batches) == order.steps_per_epoch
    err = capfd.readouterr().err
    assert f'dlsuite: skipped "{victim}" (it could not be read or decoded' in err
    assert data.read_failures() == [str(victim)]


def test_files_failing_apart_in_one_batch_and_at_the_end_are_each_named_once_and_left_out(tmp_path, capfd):
    # Failures are found per batch (#25): two in one batch with a good file
    # between them, and the epoch's last file, must each be named once, and
    # the epoch is every other image in its order, as they decode undamaged.
    data = datasets.load(str(photo_folder(tmp_path / "photos")), validation_fraction=0.2, test_fraction=0.2)
    source = data.sources["train"]
    undamaged = image_cache.build(source, sources.prepared(SIZE, 3), image_size=SIZE, channels=3, kind="memory")
    order = pipeline.epoch_order(source, image_size=SIZE, channels=3, batch_size=6, seed=3, cache=None)
    visited = [int(index) for _, index in order.indices(0).as_numpy_iterator()]
    victims = [visited[1], visited[3], visited[-1]]
    for index in victims:
        pathlib.Path(source.paths[index]).write_bytes(b"\xff\xd8\xff" + bytes(200) + b"\xff\xd9")

    batches = epoch_batches(order, 0)
    assert len(batches) == order.steps_per_epoch
    kept = [index for index in visited if index not in victims]
    images = np.concatenate([images for images, _ in batches])[:len(kept)]
    labels = np.concatenate([labels for _, labels in batches])[:len(kept)]
    np.testing.assert_array_equal(images, undamaged.images[kept].astype(np.float32))
    np.testing.assert_array_equal(labels, source.labels[kept])
    err = capfd.readouterr().err
    for index in victims:
        assert err.count(f'dlsuite: skipped "{source.paths[index]}"') == 1
    assert sorted(data.read_failures()) == sorted(str(source.paths[index]) for index in victims)


def test_a_jpeg_whose_frame_follows_a_large_exif_block_is_checked_from_its_header(tmp_path):
    # The check reads a JPEG's first 4 KB, then up to 64 KB when its frame
    # header comes later (camera photos carry EXIF thumbnails first).
    exif = Image.Exif()
    exif[0x010E] = "x" * 20_000  # ImageDescription: 20 KB before the frame
    image = Image.fromarray(np.full((30, 40, 3), (200, 30, 30), np.uint8))
    path = tmp_path / "camera.jpg"
    image.save(path, exif=exif)
    assert path.read_bytes().find(b"\xff\xc0") > 20_000
    assert file_checks.check_images([str(path)], strict=False)[0] == file_checks.FileCheck(
        str(path), shape=(30, 40, 3), colour=True)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(path.read_bytes()[:-300])
    assert file_checks.check_images([str(cut)], strict=False)[0].reason == "truncated JPEG"


def test_the_manifest_is_reused_and_a_changed_file_is_checked_again(tmp_path):
    root = photo_folder(tmp_path / "photos")
    first = datasets.load(str(root))
    assert "0 unchanged since the last check" in first.check_line
    path = manifest.path_for(str(root))
    assert os.path.exists(path) and path in first.check_line
    assert len(manifest.read(path)) == 36

    second = datasets.load(str(root))
    assert "36 unchanged since the last check" in second.check_line
    changed = root / "class1" / "004.png"
    changed.write_bytes(changed.read_bytes()[:-30])  # now truncated
    third = datasets.load(str(root))
    assert "35 unchanged since the last check" in third.check_line
    assert dict(third.skipped) == {str(changed): "truncated PNG"}
    assert manifest.read(path)[str(changed)][2] == "truncated PNG"


def _folder_with_a_truncated_jpeg_checked_in_this_thread(tmp_path):
    """The 120 paths of a folder whose class2/007.jpg is cut short, and their checks in this thread."""
    root = photo_folder(tmp_path / "photos", per_class=40)
    (root / "class2" / "007.jpg").write_bytes((root / "class2" / "007.jpg").read_bytes()[:-40])
    _, files = file_checks.list_class_files(str(root))
    paths = [path for name in sorted(files) for path in files[name]]
    in_thread = file_checks.check_images(paths, strict=False)
    return paths, in_thread


def test_checks_that_wait_on_the_disk_move_to_threads_with_the_same_verdicts_in_order(tmp_path, monkeypatch):
    paths, in_thread = _folder_with_a_truncated_jpeg_checked_in_this_thread(tmp_path)
    # A chunk whose every read blocked waited on the disk: the rest go to the pool.
    monkeypatch.setattr(file_checks, "CHECK_CHUNK", 20)
    blocked = iter(range(0, 10**6, 1000))
    monkeypatch.setattr(file_checks, "_blocking_waits", lambda: next(blocked))
    pooled = file_checks.check_images(paths, strict=False)
    assert [(c.path, c.reason, c.shape) for c in pooled] == [(c.path, c.reason, c.shape) for c in in_thread]
    assert [c.reason for c in pooled if c.reason] == ["truncated JPEG"]
    with pytest.raises(file_checks.UsageError, match="007.jpg.*truncated JPEG.*strict mode"):
        file_checks.check_images(paths, strict=True)


_checked_in_this_process = file_checks._check_each
_CHECKERS = []  # [the file the checking processes write their pids to]


def _checked_in_a_child(files):
    with open(_CHECKERS[0], "a") as log:
        log.write(f"{os.getpid()}\n")
    return _checked_in_this_process(files)


def test_many_checks_in_the_page_cache_go_to_processes_with_the_same_verdicts_in_order(tmp_path, monkeypatch):
    paths, in_thread = _folder_with_a_truncated_jpeg_checked_in_this_thread(tmp_path)
    # Nothing waited on the disk, and enough files are left after the first chunk.
    monkeypatch.setattr(file_checks, "CHECK_CHUNK", 20)
    monkeypatch.setattr(file_checks, "PROCESS_MIN_FILES", 20)
    monkeypatch.setattr(file_checks, "_processes", lambda: 2)
    monkeypatch.setattr(file_checks, "_blocking_waits", lambda: 0)
    monkeypatch.setattr(file_checks, "_check_each", _checked_in_a_child)
    monkeypatch.setattr(sys.modules[__name__], "_CHECKERS", [tmp_path / "checkers"])
    forked = file_checks.check_images(paths, strict=False)
    assert forked == in_thread
    checkers = set((tmp_path / "checkers").read_text().split())
    assert checkers and str(os.getpid()) not in checkers  # other processes checked them
    assert [c.reason for c in forked if c.reason] == ["truncated JPEG"]
    with pytest.raises(file_checks.UsageError, match="007.jpg.*truncated JPEG.*strict mode"):
        file_checks.check_images(paths, strict=True)


def test_a_disk_cache_killed_while_written_is_rebuilt_by_the_next_run(tmp_path):
    root = photo_folder(tmp_path / "photos", per_class=40)
    cache_dir = tmp_path / "cache"
    script = f"""
import os, signal, numpy as np
from dlsuite.apps.vision import datasets, image_cache, sources
data = datasets.load({str(root)!r})
original = np.memmap.flush
def die(self):
    os.kill(os.getpid(), signal.SIGKILL)
np.memmap.flush = die
image_cache.build(data.sources["train"], sources.prepared({SIZE}, 3), image_size={SIZE}, channels=3, kind="disk",
                  cache_dir={str(cache_dir)!r})
"""
    done = zygote.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=os.environ)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert [p.name for p in cache_dir.iterdir() if ".tmp-" in p.name]  # what the killed writer left

    data = datasets.load(str(root))
    cache = image_cache.build(data.sources["train"], sources.prepared(SIZE, 3), image_size=SIZE, channels=3,
                              kind="disk", cache_dir=str(cache_dir))
    assert not [p.name for p in cache_dir.iterdir() if ".tmp-" in p.name]
    assert cache.readable.all() and cache.images.shape == (data.sources["train"].count, *SIZE, 3)


def dlsuite(*arguments, cwd):
    """A `dlsuite` command in a process of its own (`zygote`): TensorFlow's thread pools as in
    the killed run (a test process may hold other ones, set by an earlier test)."""
    done = zygote.run([sys.executable, "-c", "import sys; from dlsuite.apps.cli import main; sys.exit(main())",
                           *map(str, arguments)], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_a_streamed_run_killed_mid_epoch_resumes_exactly(tmp_path, capsys, monkeypatch):
    root = photo_folder(tmp_path / "photos", per_class=20)
    monkeypatch.chdir(tmp_path)

    def argv(out):
        return ["classify", "train", "--dataset", str(root), "--image-size", "32", "--cache", "none",
                "--batch-size", "8", "--epochs", "2", "--checkpoint-every", "0.000001", "--out", str(out),
                "--no-export"]

    assert cli.main(argv(tmp_path / "whole")) == 0  # in this process: one TensorFlow start-up less
    assert "streaming" in capsys.readouterr().out
    killed("batch", 7, argv(tmp_path / "run"), tmp_path)
    assert "resuming from" in dlsuite("classify", "train", "--resume", tmp_path / "run", cwd=tmp_path)
    for ours, whole in zip(weights(tmp_path / "run" / "model.keras"), weights(tmp_path / "whole" / "model.keras")):
        np.testing.assert_array_equal(ours, whole)


def test_an_unwritable_cache_dir_is_one_line_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    status = cli.main(["classify", "train", "--cache", "disk", "--cache-dir", str(blocker / "cache"),
                       "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert err.startswith(f"dlsuite: error: cannot write the image cache folder under '{blocker / 'cache'}'")
    assert "--cache-dir" in err and not (tmp_path / "run").exists()


def test_training_from_packed_shards_equals_training_from_the_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = photo_folder(tmp_path / "photos")
    assert cli.main(["data", "pack", str(root), str(tmp_path / "packed")]) == 0
    runs = {}
    for name, dataset in (("folder", root), ("packed", tmp_path / "packed")):
        assert cli.main(["classify", "train", "--dataset", str(dataset), "--image-size", "32", "--batch-size", "8",
                         "--epochs", "2", "--out", str(tmp_path / name), "--no-export"]) == 0
        runs[name] = json.loads((tmp_path / name / "config.json").read_text())["resolved"]
    assert runs["packed"]["sizes"] == runs["folder"]["sizes"]
    for ours, folder in zip(weights(tmp_path / "packed" / "model.keras"), weights(tmp_path / "folder" / "model.keras")):
        np.testing.assert_array_equal(ours, folder)

    # Streamed from the shards (a shuffle of encoded records), it trains too.
    assert cli.main(["classify", "train", "--dataset", str(tmp_path / "packed"), "--image-size", "32", "--cache",
                     "none", "--batch-size", "8", "--epochs", "1", "--out", str(tmp_path / "streamed"),
                     "--no-export"]) == 0
    assert (tmp_path / "streamed" / "metrics.json").exists()


def test_a_folder_named_as_shards_without_its_json_is_one_line(tmp_path, capsys):
    packed = tmp_path / "packed"
    assert cli.main(["data", "pack", str(photo_folder(tmp_path / "photos")), str(packed)]) == 0
    (packed / "dataset.json").unlink()
    status = cli.main(["classify", "train", "--dataset", str(packed), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and str(packed) in err
