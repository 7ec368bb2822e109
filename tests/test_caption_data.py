"""dlsuite caption data: the scenes generator, captions files in every format, TFDS, bad input.

No model is trained here; the command-line errors stop before any image is encoded.
"""

import json

import numpy as np
import pytest
from PIL import Image

from dlsuite.apps.caption import caption_files, data as caption_data, folder as caption_folder, model as caption_model
from dlsuite.apps.caption import scenes as caption_scenes
from dlsuite.apps import cli
from dlsuite.apps.core.errors import UsageError


def run_cli(argv, capsys):
    status = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# --- scenes ----------------------------------------------------------------------------


def test_scenes_are_deterministic_by_seed():
    images, captions = caption_scenes.generate_scenes(count=12, size=48, seed=3)
    again, captions_again = caption_scenes.generate_scenes(count=12, size=48, seed=3)
    other, _ = caption_scenes.generate_scenes(count=12, size=48, seed=4)
    assert images.shape == (12, 48, 48, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, again)
    assert captions == captions_again
    assert not np.array_equal(images, other)
    assert all(len(references) == 4 and len(set(references)) == 4 for references in captions)


def _centroid(image, colour):
    """Mean (row, column) of the pixels near `colour`, or None."""
    distance = np.linalg.norm(image.astype(float) - np.array(colour, float), axis=-1)
    rows, columns = np.nonzero(distance < 45)
    return (rows.mean(), columns.mean()) if len(rows) > 10 else None


def test_scene_captions_say_where_things_are():
    """The first reference's relation matches the drawn objects (checked where the two colours differ)."""
    images, captions = caption_scenes.generate_scenes(count=60, size=64, seed=0)
    checked = 0
    for image, references in zip(images, captions):
        first = references[0].split()
        relation = next((r for r in caption_scenes.RELATIONS if f" {r} " in references[0]), None)
        if relation is None:
            assert len(first) == 4 and first[0] == "a"  # "a small red circle"
            continue
        subject, reference = references[0].split(f" {relation} ")
        subject_colour, reference_colour = subject.split()[2], reference.split()[2]
        if subject_colour == reference_colour:
            continue
        colours = caption_scenes.SCENE_COLOURS
        (sy, sx), (ry, rx) = (_centroid(image, colours[c]) for c in (subject_colour, reference_colour))
        expected = {"above": sy < ry, "below": sy > ry, "left of": sx < rx, "right of": sx > rx}
        assert expected[relation], (references[0], (sy, sx), (ry, rx))
        checked += 1
    assert checked > 20


def test_scenes_split_by_image_with_every_reference():
    data = caption_data.load("scenes", scenes_count=50, scenes_size=32, seed=1)
    assert data.sizes == {"train": 40, "validation": 5, "test": 5}
    assert sum(len(r) for r in data.test.captions) == 20
    assert not set(data.train.names) & set(data.test.names)
    first = next(iter(data.test.images)).numpy()
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8


def test_vocabulary_adds_start_and_end_and_cuts_long_captions():
    vocabulary = caption_model.Vocabulary.build(["A red circle.", "a blue square above a red circle"])
    assert vocabulary.tokens[:5] == ["", "[UNK]", "<start>", "<end>", "a"]
    inputs, targets, cut = vocabulary.encode(["a RED circle!", "a blue square above a red circle", "a zebra"],
                                             max_length=4)
    ids = {token: i for i, token in enumerate(vocabulary.tokens)}
    assert inputs[0].tolist() == [2, ids["a"], ids["red"], ids["circle"], 0]
    assert targets[0].tolist() == [ids["a"], ids["red"], ids["circle"], 3, 0]
    assert targets[1].tolist()[-1] == 3 and cut == 1  # 7 words cut to 4, then <end>
    assert targets[2].tolist()[:3] == [ids["a"], 1, 3]  # an unknown word is [UNK]
    assert vocabulary.decode(targets) == ["a red circle", "a blue square above", "a [UNK]"]


# --- captions files -----------------------------------------------------------------------


@pytest.mark.parametrize("name,text", [
    ("flickr.token.txt", "a.jpg#0\tA dog runs .\na.jpg#1\tA brown dog .\nb.jpg#0\tTwo cats\n"),
    ("captions.txt", "image,caption\na.jpg,A dog runs .\na.jpg,\"A brown dog, running\"\nb.jpg,Two cats\n"),
    ("results.csv", "image_name| comment_number| comment\na.jpg| 0| A dog runs .\na.jpg| 1| A brown dog .\nb.jpg| 0| Two cats\n"),
    ("coco.json", json.dumps({"images": [{"id": 7, "file_name": "a.jpg"}, {"id": 9, "file_name": "b.jpg"}],
                              "annotations": [{"image_id": 7, "caption": "A dog runs ."},
                                              {"image_id": 7, "caption": "A brown dog ."},
                                              {"image_id": 9, "caption": "Two cats"}]})),
    ("dataset_flickr8k.json", json.dumps({"images": [
        {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "A dog runs ."}, {"raw": "A brown dog ."}]},
        {"filename": "b.jpg", "split": "test", "sentences": [{"raw": "Two cats"}]}]})),
])
def test_every_captions_format_gives_references_per_image(name, text, tmp_path):
    path = tmp_path / name
    path.write_text(text)
    parsed = caption_files.read_captions_file(path)
    assert sorted(parsed.captions) == ["a.jpg", "b.jpg"]
    assert len(parsed.captions["a.jpg"]) == 2 and parsed.captions["b.jpg"] == ["Two cats"]
    assert parsed.warnings == []
    if name.startswith("dataset_"):
        assert parsed.splits == {"a.jpg": "train", "b.jpg": "test"}


@pytest.fixture()
def flickr_folder(tmp_path):
    """Twelve scene PNGs, a token file for them plus two missing ones, an empty caption, an extra image."""
    images, captions = caption_scenes.generate_scenes(count=13, size=48, seed=2)
    folder = tmp_path / "images"
    folder.mkdir()
    lines = []
    for i, (image, references) in enumerate(zip(images, captions)):
        Image.fromarray(image).save(folder / f"{i:02d}.png")
        if i < 12:
            lines += [f"{i:02d}.png#{j}\t{reference}" for j, reference in enumerate(references)]
    lines += ["gone1.png#0\ta red circle", "gone2.png#0\ta blue square", "00.png#5\t   "]
    (folder / "broken.png").write_bytes(b"not a png")
    lines.append("broken.png#0\ta broken picture")
    token_file = tmp_path / "captions.token.txt"
    token_file.write_text("\n".join(lines) + "\n")
    return folder, token_file, captions


def test_missing_unreadable_and_uncaptioned_images_are_skipped_with_warnings(flickr_folder):
    folder, token_file, captions = flickr_folder
    found = caption_folder.captioned_images(folder, token_file)
    assert found.names == [f"{i:02d}.png" for i in range(12)]
    assert found.captions[3] == captions[3]
    warnings = "\n".join(found.warnings)
    assert f"{token_file} line 51: empty caption for 00.png, skipped" in warnings
    assert "2 of 15 images named in" in warnings and "gone1.png, gone2.png" in warnings
    assert "1 images cannot be read, skipped: broken.png (not an image)" in warnings
    assert "1 images in" in warnings and "have no captions" in warnings and "12.png" in warnings
    data = caption_data.load(images=folder, captions=token_file, seed=0, validation_fraction=0.2, test_fraction=0.2)
    assert data.sizes == {"train": 8, "validation": 2, "test": 2} and data.channels == 3
    assert next(iter(data.train.images)).numpy().shape == (48, 48, 3)


@pytest.mark.parametrize("name,text,message", [
    ("bad.token.txt", "a.jpg#0\tA dog\na.jpg#1 A dog without a tab\n",
     "line 2: expected IMAGE#N<TAB>CAPTION (Flickr token format), received 'a.jpg#1 A dog without a tab'"),
    ("bad.csv", "image,caption\na.jpg,A dog\nb.jpg\n", "line 3: expected 2 columns (image,caption), received 1"),
    ("bad.json", '{"images": [{"id": 1, "file_name": "a.jpg"}],\n "annotations": [{"image_id": 1}]}',
     "annotations[0] needs \"image_id\" and \"caption\""),
    ("broken.json", '{"images": [\n{"id": 1,,}]}', "line 2: not valid JSON"),
])
def test_malformed_captions_files_are_one_line_errors_with_the_line(name, text, message, tmp_path, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / name).write_text(text)
    out = tmp_path / "run"
    status, _, stderr = run_cli(["caption", "train", "--images", tmp_path / "images", "--captions", tmp_path / name,
                                 "--out", out], capsys)
    assert status == 2
    assert stderr.startswith("dlsuite: error: --captions") and message in stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert not out.exists()


@pytest.mark.parametrize("argv,message", [
    (["--images", "{tmp}"], "--images and --captions go together"),
    (["--images", "{tmp}/nowhere", "--captions", "{tmp}/c.txt"], "--images '{tmp}/nowhere' is not a folder"),
    (["--dataset", "flickr"], "unknown --dataset 'flickr'"),
    (["--encoder", "resnet9"], "unknown backbone 'resnet9'"),
    (["--encoder", "vgg11", "--encoder-weights", "{tmp}/no.h5"], "--weights '{tmp}/no.h5' does not exist"),
    (["--attention", "--pooling", "avg"], "--pooling applies without --attention"),
    (["--export", "../up"], "Invalid export name '../up'"),
])
def test_bad_train_arguments_are_one_line_errors(argv, message, tmp_path, capsys):
    (tmp_path / "c.txt").write_text("a.jpg#0\tA dog\n")
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    status, _, stderr = run_cli(["caption", "train", *argv, "--out", tmp_path / "run"], capsys)
    assert status == 2
    assert message.format(tmp=tmp_path) in stderr and len(stderr.strip().splitlines()) == 1


def test_captions_naming_no_present_image_is_an_error(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "c.txt").write_text("a.jpg#0\tA dog\nb.jpg#0\tA cat\n")
    status, _, stderr = run_cli(["caption", "train", "--images", tmp_path / "images", "--captions",
                                 tmp_path / "c.txt", "--out", tmp_path / "run"], capsys)
    assert status == 2
    assert "none of the 2 images named in --captions" in stderr and "(e.g. 'a.jpg')" in stderr


# --- TensorFlow Datasets ----------------------------------------------------------------------


def test_coco_captions_loads_through_tfds_with_mock_data():
    """tfds.load's own code on coco_captions, with examples made by a mock (no download)."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    images, captions = caption_scenes.generate_scenes(count=6, size=40, seed=5)
    requested = []

    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
        requested.append((str(split), sorted(decoders or {})))
        encoded = decoders is not None and "image" in decoders  # SkipDecoding: the bytes stay encoded
        examples = [{"image": tf.io.encode_png(image) if encoded else tf.constant(image),
                     "captions": {"text": tf.constant(references + ([""] if i == 0 else [])),
                                  "id": tf.range(len(references) + (1 if i == 0 else 0), dtype=tf.int64)}}
                    for i, (image, references) in enumerate(zip(images, captions))]
        examples.append({"image": tf.io.encode_png(images[0]) if encoded else tf.constant(images[0]),
                         "captions": {"text": tf.constant([""]), "id": tf.constant([0], tf.int64)}})
        return tf.data.Dataset.from_tensor_slices({
            "image": tf.stack([e["image"] for e in examples]),
            "captions": {"text": tf.ragged.stack([e["captions"]["text"] for e in examples]).to_tensor(""),
                         "id": tf.ragged.stack([e["captions"]["id"] for e in examples]).to_tensor(0)},
        })

    with tfds.testing.mock_data(as_dataset_fn=as_dataset, policy=tfds.testing.MockPolicy.USE_CODE):
        data = caption_data.load("tfds:coco_captions")
    assert data.name == "tfds:coco_captions" and data.channels == 3
    # The 7th example has only an empty caption: dropped from captions and images alike.
    assert data.sizes == {"train": 6, "validation": 6, "test": 6}
    assert data.test.captions == captions
    pixels = np.stack([image.numpy() for image in data.test.images])
    np.testing.assert_array_equal(pixels, images)
    assert {split for split, _ in requested} >= {"train", "val", "test"}
    assert ["image"] in [decoders for _, decoders in requested]  # the captions pass skips image decoding


def test_a_tfds_set_without_captions_is_named(capsys, tmp_path):
    status, _, stderr = run_cli(["caption", "train", "--dataset", "tfds:mnist", "--data-dir", tmp_path,
                                 "--out", tmp_path / "run"], capsys)
    assert status == 2
    assert "tfds:mnist is not an image-captioning set: it needs an 'image' and a 'captions' sequence" in stderr


def test_separate_validation_and_test_caption_files_are_those_splits_whole(tmp_path):
    images, captions = caption_scenes.generate_scenes(count=20, size=32, seed=4)
    folder = tmp_path / "images"
    folder.mkdir()
    files = {"train": [], "validation": [], "test": []}
    for i, (image, references) in enumerate(zip(images, captions)):
        Image.fromarray(image).save(folder / f"{i:02d}.png")
        split = "train" if i < 12 else "validation" if i < 16 else "test"
        files[split] += [f"{i:02d}.png#{j}\t{reference}" for j, reference in enumerate(references)]
    for split, lines in files.items():
        (tmp_path / f"{split}.token.txt").write_text("\n".join(lines) + "\n")
    data = caption_data.load(images=folder, captions=tmp_path / "train.token.txt",
                             validation_captions=tmp_path / "validation.token.txt",
                             test_captions=tmp_path / "test.token.txt")
    assert data.sizes == {"train": 12, "validation": 4, "test": 4}
    assert data.test.names == ["16.png", "17.png", "18.png", "19.png"]
    assert data.test.captions[0] == captions[16] and not data.warnings  # no "uncaptioned" noise
    assert data.image_shape == (32, 32, 3)  # one native size in every file: the encoder sees it
    only_test = caption_data.load(images=folder, captions=tmp_path / "train.token.txt",
                                  test_captions=tmp_path / "test.token.txt", validation_fraction=0.25)
    assert only_test.sizes == {"train": 9, "validation": 3, "test": 4}
    with pytest.raises(UsageError, match="pass --images DIR --captions FILE with them"):
        caption_data.load(test_captions=tmp_path / "test.token.txt")
