"""dlsuite caption end to end: train on scenes, beat the image-blind baselines, export, serve text.

One small captioner is trained once per module by `dlsuite caption train` (the
default encoder, 400 scenes, a 64-unit LSTM); the tests read its run directory,
its export and its feature cache.
"""

import json
import os
import sys

import keras
import numpy as np
import pytest
from PIL import Image

import keras_cache
import zygote
from dlsuite.apps.caption import batches as pair_batches, data as caption_data, decode as caption_decode
from dlsuite.apps.caption import export as caption_export, model as caption_model
from dlsuite.apps import cli

SCENES = ["--scenes-count", "400", "--validation-fraction", "0.1", "--test-fraction", "0.15"]
SMALL = ["--units", "64", "--embedding", "32", "--batch-size", "32", "--dropout", "0.1", "--max-length", "12"]


def run_cli(argv, capsys):
    status = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("caption")
    status = cli.main([str(arg) for arg in ["caption", "train", *SCENES, *SMALL, "--epochs", "12", "--lr", "0.005",
                                            "--out", root / "run", "--export", "scenes",
                                            "--export-dir", root / "saved_models"]])
    assert status == 0
    metrics = json.loads((root / "run" / "metrics.json").read_text())
    data = caption_data.load("scenes", scenes_count=400, validation_fraction=0.1, test_fraction=0.15)
    return {"root": root, "run": root / "run", "export": root / "saved_models" / "scenes", "metrics": metrics,
            "data": data}


@pytest.fixture(scope="module")
def test_images(trained, tmp_path_factory):
    """The first 12 test scenes as PNG files, with their references."""
    folder = tmp_path_factory.mktemp("test_images")
    paths = []
    for i, image in enumerate(trained["data"].test.images.take(12).as_numpy_iterator()):
        Image.fromarray(image).save(folder / f"{i:02d}.png")
        paths.append(folder / f"{i:02d}.png")
    return paths, trained["data"].test.captions[:12]


def test_the_run_directory_has_config_history_curves_and_bleu(trained):
    run = trained["run"]
    for name in ("config.json", "history.csv", "curves.png", "metrics.json", "model.keras", "train.log"):
        assert (run / name).is_file(), name
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["encoder"] == "vgg11" and config["config"]["encoder_layer"] == "block4_pool"
    assert config["resolved"]["feature_shape"] == [4, 4, 512]
    assert config["resolved"]["pairs"] == {"train": 300 * 4, "validation": 40 * 4}
    metrics = trained["metrics"]
    assert {"bleu1", "bleu2", "bleu3", "bleu4", "greedy", "beam", "baseline", "examples"} <= set(metrics)
    assert metrics["bleu1"] >= metrics["bleu2"] >= metrics["bleu3"] >= metrics["bleu4"] > 0
    assert metrics["images"] == 60 and metrics["epochs_run"] == 12
    history = (run / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch") and len(history) == 13


def test_features_are_cached_once_per_split(trained):
    cache = np.load(trained["run"] / "cache" / "train.npy", mmap_mode="r")
    assert cache.shape == (300, 4, 4, 512) and cache.dtype == np.float32
    assert np.load(trained["run"] / "cache" / "test.npy", mmap_mode="r").shape == (60, 4, 4, 512)


def test_the_captioner_beats_the_most_frequent_caption_by_far(trained):
    metrics = trained["metrics"]
    assert metrics["baseline"]["bleu4"] < 0.05
    assert metrics["bleu4"] > 0.3 and metrics["bleu4"] > 5 * metrics["baseline"]["bleu4"]


def test_an_image_blind_decoder_scores_far_lower(trained):
    """The same decoder and training on the same cached features, with the image zeroed out."""
    data = trained["data"]
    cache = {key: np.load(trained["run"] / "cache" / f"{key}.npy", mmap_mode="r") for key in ("train", "validation",
                                                                                              "test")}
    seeing = keras.saving.load_model(trained["run"] / "model.keras").get_layer("caption_decoder")
    vocabulary = caption_model.Vocabulary(seeing.vocabulary)
    pairs = pair_batches.caption_pairs(data.train.captions, vocabulary, max_length=12)
    blind = caption_model.CaptionDecoder(seeing.vocabulary, units=64, embedding=32, dropout=0.1, image_blind=True,
                                         feature_mean=seeing.feature_mean, feature_variance=seeing.feature_variance,
                                         name="caption_decoder")
    model = caption_model.build_training_model(blind, feature_shape=(4, 4, 512), caption_length=13)
    model.compile(optimizer=keras.optimizers.Adam(0.005, clipnorm=5.0), loss=caption_model.caption_loss())
    model.fit(pair_batches.caption_batches(cache["train"], pairs, batch_size=32, shuffle=True), epochs=12, verbose=0,
              shuffle=False)  # the dataset shuffles itself
    from dlsuite.apps.caption.task import evaluate_split

    blind_figures = evaluate_split(blind, cache["test"], data.test.captions, vocabulary, encoder=None, beam_size=3,
                                   max_length=12, alpha=0.7, batch_size=64)
    assert len(set(blind_figures["captions"])) == 1  # one caption for every image
    assert trained["metrics"]["bleu4"] > 1.5 * blind_figures["beam"]["bleu4"]
    assert trained["metrics"]["bleu4"] - blind_figures["beam"]["bleu4"] > 0.15


def test_beam_search_is_never_worse_than_greedy_by_model_log_likelihood(trained, test_images):
    """Per test image, through the export: beam's captions score at least greedy's under the model,
    with length normalization (what both maximize) and without (alpha 0: plain log-likelihood)."""
    captioner = caption_export.ExportedCaptioner.load(trained["export"])
    contents = [path.read_bytes() for path in test_images[0]]
    for alpha in (0.0, 0.7):
        greedy = captioner.caption_bytes(contents, beam_size=1, alpha=alpha)
        beam = captioner.caption_bytes(contents, beam_size=3, alpha=alpha)
        assert (beam["score"] >= greedy["score"] - 1e-5).all()
        # Scored again by teacher forcing: the searches report the model's own log-likelihood.
        for found in (greedy, beam):
            np.testing.assert_allclose(captioner.score_bytes(contents, found["caption"]), found["log_likelihood"],
                                       rtol=1e-4, atol=1e-4)
        if alpha == 0.0:
            assert (beam["log_likelihood"] >= greedy["log_likelihood"] - 1e-5).all()
    # And over the whole test split, from the run's own evaluation.
    metrics = trained["metrics"]
    assert metrics["beam_not_worse"] == metrics["images"]
    assert metrics["beam"]["mean_score"] >= metrics["greedy"]["mean_score"]


def test_the_export_answers_image_bytes_with_text_in_a_tensorflow_only_process(trained, test_images):
    paths, _ = test_images
    script = f"""
import sys
import tensorflow as tf
model = tf.saved_model.load({str(trained['export'] / '1')!r})
images = tf.constant([open(p, 'rb').read() for p in {[str(p) for p in paths[:3]]!r}])
out = model.signatures['serving_default'](image_bytes=images)
print('|'.join(c.decode() for c in out['caption'].numpy()))
print('dlsuite loaded:', any(name.startswith('dlsuite') for name in sys.modules))
"""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = zygote.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    captions, loaded = result.stdout.strip().splitlines()[-2:]
    assert loaded == "dlsuite loaded: False"
    captioner = caption_export.ExportedCaptioner.load(trained["export"])
    expected = captioner.caption_files(paths[:3])["caption"]
    assert captions.split("|") == expected
    assert all(caption and set(caption.split()) <= set(captioner.vocabulary[4:]) for caption in expected)


def test_the_export_passes_the_saved_model_scan(trained):
    """Nothing `saved_model_cli scan` flags (#15): our exports load without --trust-model."""
    from dlsuite.apps.core import saved_models

    path = trained["export"] / "1"
    assert saved_models.denylisted_ops(saved_models.read(path)) == []
    saved_models.check(path, signatures=caption_export.SIGNATURES)


def test_the_keras_model_and_the_export_agree(trained, test_images):
    """model.keras (pixels + words -> logits) scores a caption as the export's `score` signature does."""
    paths, references = test_images
    model = keras.saving.load_model(trained["run"] / "model.keras")
    vocabulary = caption_model.Vocabulary(model.get_layer("caption_decoder").vocabulary)
    captions = [refs[0] for refs in references[:4]]
    inputs, targets, _ = vocabulary.encode(captions, max_length=12)
    pixels = np.stack([np.asarray(Image.open(path), dtype="float32") for path in paths[:4]])
    expected = caption_decode.caption_log_likelihood(model([pixels, inputs]), targets).numpy()
    captioner = caption_export.ExportedCaptioner.load(trained["export"])
    np.testing.assert_allclose(captioner.score_bytes([p.read_bytes() for p in paths[:4]], captions), expected,
                               rtol=1e-4, atol=1e-3)
    assert captioner.metadata["beam_size"] == 3 and captioner.metadata["max_length"] == 12
    assert captioner.vocabulary == vocabulary.tokens


def test_generate_prints_one_caption_per_image_and_names_unreadable_ones(trained, test_images, tmp_path, capsys):
    paths, _ = test_images
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG but not really")
    status, out, err = run_cli(["caption", "generate", trained["export"], paths[0], paths[1], broken, "--greedy"],
                               capsys)
    assert status == 2
    lines = out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(paths[0]), str(paths[1])]
    assert all(line.split("\t")[1] for line in lines)
    assert err.strip() == f"dlsuite: error: cannot read 1 of 3 images: {broken} (damaged PNG header); pass JPEG, " \
                          "PNG, BMP or GIF files"
    status, out, _ = run_cli(["caption", "generate", trained["export"], paths[0], "--beam", "2", "--json"], capsys)
    assert status == 0
    record = json.loads(out)
    assert record["image"] == str(paths[0]) and record["caption"] and record["log_likelihood"] < 0


def test_evaluate_reproduces_the_runs_bleu_and_reads_a_captions_file(trained, test_images, capsys):
    status, out, _ = run_cli(["caption", "evaluate", trained["export"], "--json"], capsys)
    assert status == 0
    result = json.loads(out)
    for n in range(1, 5):
        assert result[f"bleu{n}"] == pytest.approx(trained["metrics"][f"bleu{n}"], abs=1e-6)
    paths, references = test_images
    token_file = paths[0].parent / "captions.token.txt"
    token_file.write_text("".join(f"{path.name}#{j}\t{reference}\n" for path, refs in zip(paths, references)
                                  for j, reference in enumerate(refs)))
    status, out, _ = run_cli(["caption", "evaluate", trained["export"], "--images", paths[0].parent,
                              "--captions", token_file], capsys)
    assert status == 0
    assert "captions.token.txt (12 images): BLEU-1" in out


def test_bad_generate_and_evaluate_input_is_one_line(trained, tmp_path, capsys):
    status, _, err = run_cli(["caption", "generate", tmp_path / "none", "x.png"], capsys)
    assert status == 2 and "No exported model at" in err and len(err.strip().splitlines()) == 1
    status, _, err = run_cli(["caption", "evaluate", trained["export"], "--images", tmp_path], capsys)
    assert status == 2 and "--images and --captions go together" in err


def test_an_attention_gru_trained_end_to_end_exports_and_captions(trained, test_images, tmp_path, capsys):
    """--fine-tune-encoder caches pixels and trains the CNN too; the attention decoder decodes inside the graph."""
    status, _, err = run_cli(["caption", "train", "--scenes-count", "40", "--scenes-size", "32",
                              "--encoder", "lenet5_caffe", "--fine-tune-encoder", "--attention", "--decoder", "gru",
                              *SMALL, "--epochs", "1", "--out", tmp_path / "run",
                              "--export-dir", tmp_path / "saved_models"], capsys)
    assert status == 0, err
    cache = np.load(tmp_path / "run" / "cache" / "train.npy", mmap_mode="r")
    assert cache.dtype == np.uint8 and cache.shape == (32, 32, 32, 3)
    captioner = caption_export.ExportedCaptioner.load(tmp_path / "saved_models" / "lenet5_caffe_gru_attention_scenes")
    assert captioner.metadata["attention"] is True and captioner.metadata["encoder"] == "lenet5_caffe"
    found = captioner.caption_files(test_images[0][:2], beam_size=2)
    assert len(found["caption"]) == 2 and all(found["caption"]) and np.isfinite(found["log_likelihood"]).all()
    # The encoder learned: its filters left their initial values, which a frozen run keeps.
    from dlsuite.apps.vision import backbones

    for name, conv, run, changed in (("lenet5_caffe", "conv1", tmp_path / "run", True),
                                     ("vgg11", "block1_conv1", trained["run"], False)):
        keras.utils.set_random_seed(0)  # as `train` seeds before building the encoder
        # (the kernels do not depend on the input size)
        initial = backbones.build_base(name, input_size=(64, 64), channels=3).model.get_layer(conv).get_weights()[0]
        saved = keras.saving.load_model(run / "model.keras").get_layer("backbone").get_layer(conv).get_weights()[0]
        assert np.allclose(saved, initial) != changed, name


def test_imagenet_weights_come_from_the_keras_cache_and_features_match_keras(tmp_path, monkeypatch, capsys):
    """--encoder-weights imagenet offline: a MobileNetV2 file put in the Keras cache is used, with Keras' preprocessing."""
    reference = keras_cache.cached_mobilenet_v2(tmp_path, monkeypatch)
    status, _, err = run_cli(["caption", "train", "--encoder", "MobileNetV2", "--encoder-weights", "imagenet",
                              "--input-size", "32", "--scenes-count", "20", "--scenes-size", "32", "--units", "8",
                              "--embedding", "8", "--epochs", "1", "--out", tmp_path / "run", "--no-export"], capsys)
    assert status == 0, err
    cached = np.load(tmp_path / "run" / "cache" / "train.npy")
    images = np.stack(list(caption_data.load("scenes", scenes_count=20, scenes_size=32).train.images.as_numpy_iterator()))
    expected = reference.predict(images.astype("float32") / 127.5 - 1, verbose=0)  # Keras' own preprocessing
    assert cached.shape == (16, 1, 1, 1280)
    np.testing.assert_allclose(cached, expected, atol=1e-3)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["resolved"]["encoder_weights"] == "imagenet" and config["resolved"]["preprocessing"] == "tf"
    (tmp_path / "models" / keras_cache.MOBILENET_V2_NO_TOP).unlink()
    status, _, err = run_cli(["caption", "train", "--encoder", "MobileNetV2", "--encoder-weights", "imagenet",
                              "--scenes-count", "20", "--out", tmp_path / "run2"], capsys)
    assert status == 2 and "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5" in err
    assert len(err.strip().splitlines()) == 1
