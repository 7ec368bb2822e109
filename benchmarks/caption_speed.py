"""Captioning: decoder epochs on cached encoder features against re-running
the frozen encoder at every step, and the cost of beam search against greedy.

    python -m benchmarks.caption_speed            # the app's defaults: VGG-11 to block4_pool, 64x64 scenes, LSTM 256
    python -m benchmarks.caption_speed --quick    # 20 scenes at 32x32, LSTM 32: checks that it runs and reports

Everything follows `dlsuite caption train` with its defaults (the config comes
from the app's own parser): generated scenes at 64x64, four references per
image, the random, frozen VGG-11 cut after block4_pool (a 4x4x512 map), the
LSTM decoder with 256 units, batch 64, Adam 0.002 with clipping. Results:

* `caption_cached_features_vs_encoder`: one decoder training epoch (every
  (image, reference) pair once) on the cached feature maps, which is what
  `train` does (`caption.task.cache_features` runs the encoder once over each split,
  `caption.batches.caption_batches` feeds `fit`), against the same epoch on the
  cached pixels with the encoder inside the model (as `--fine-tune-encoder`
  builds it, `caption_model.build_training_model(..., encoder=...)`) but
  frozen, so every step runs the CNN forward again. Captions per second;
  ratio = cached / encoder. The one-off cost of the cache (the encoder over
  the training images, written to .npy, `caption.feature_cache.cache_split`) is timed
  in the same repeats, and the break-even is that cost over the time one
  cached epoch saves: the cache pays for itself after that many epochs (an
  upper bound: the pixel cache the other side reads costs time once too).
* `caption_beam3_vs_greedy`: decoding the test split's cached features with
  greedy search (beam 1) against beam width 3, both through one
  `tf.function` that takes the width as a tensor, as `caption.task.decode_split`
  does for the test figures. Images per second; ratio = greedy / beam, the
  price of the beam (> 1). The decoder is the one the first result trained.
* `caption_export_beam3_vs_greedy` (full mode only): the same through the
  exported SavedModel's `caption` signature on PNG bytes, as `dlsuite caption
  evaluate` calls it: decoding the image and running the encoder are in both
  sides there, so the ratio is smaller.

Epochs are timed from the `fit` call to the end of the last training step:
with AUTOTUNE, TF 2.21 often holds the iterator's shutdown after the last step
until its autotuning thread wakes (see benchmarks/input_pipeline.py), a stall
that both sides share at random; it is left out and reported.
"""

import contextlib
import io
import pathlib
import statistics
import tempfile
import time

import numpy as np

from benchmarks import common

BEAM = 3
# `dlsuite caption train` options; the rest are the app's defaults. Full: a
# quarter of the default 4,000 scenes, so that an encoder-side epoch (3,200
# captions through VGG-11) takes seconds, not minutes.
FULL_OPTIONS = ["--scenes-count", "1000"]
QUICK_OPTIONS = ["--scenes-count", "20", "--scenes-size", "32", "--units", "32", "--embedding", "16"]


def _config(options):
    """The `dlsuite caption train` config for these options, the app's defaults elsewhere (its own parser)."""
    from dlsuite.apps import cli
    from dlsuite.apps.caption import task as caption
    from dlsuite.apps.core import train_args

    args = cli.build_parser().parse_args(["caption", "train", *options])
    task = caption.CaptionTask(train_args.config_from_args(caption.CaptionConfig, args))
    task.check()  # resolves the default encoder and its cut
    return task.config, task.weights


def _last_step_callback():
    """A Keras callback that records when the latest training step ended."""
    import keras

    class LastStep(keras.callbacks.Callback):
        time = None

        def on_train_batch_end(self, batch, logs=None):
            self.time = time.perf_counter()

    return LastStep()


def _quiet(fn, *args, **kwargs):
    """Runs fn with its stdout (the cache's progress bar) dropped."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def _compile(model, config, *, steps_per_epoch):
    """As `engine.fit` compiles: the app's optimizer, loss and jit setting."""
    from dlsuite.apps.caption import model as caption_model
    from dlsuite.apps.core import engine, optim

    optimizer = optim.make_optimizer(optim.OptimizerConfig(**config.optimizer), steps_per_epoch=steps_per_epoch,
                                     epochs=config.epochs)
    model.compile(optimizer=optimizer, loss=caption_model.caption_loss(), metrics=[],
                  jit_compile=engine.jit_setting(config.jit_compile))
    return model


def cached_vs_encoder(config, weights, *, work, repeats, mode):
    """The first result; returns what the beam result reuses (decoder, test cache, data, base)."""
    import dataclasses

    from dlsuite.apps.caption import batches as pair_batches, feature_cache, model as caption_model, task as caption
    from dlsuite.apps.core import engine

    device = engine.device_kind()
    engine.set_seed(config.seed, deterministic=device == "cpu")
    engine.set_precision(config.mixed_precision, device)
    data, vocabulary, base = caption.load_data_and_encoder(config, weights)
    caches = caption.cache_features(config, data, vocabulary, base, cache_dir=work / "features",
                                    batch_size=config.batch_size)
    pairs, _ = caption.pair_captions(config, data, vocabulary)
    pixels = _quiet(caption.cache_features, dataclasses.replace(config, fine_tune_encoder=True), data, vocabulary,
                    base, cache_dir=work / "pixels", batch_size=config.batch_size)
    count = len(pairs["train"][0])
    batch_size = min(config.batch_size, count)
    steps = -(-count // batch_size)
    feature_shape = tuple(int(d) for d in base.model.output.shape[1:])
    mean, variance = caption_model.feature_statistics(caches["train"])
    # Frozen: the encoder side runs the CNN forward each step and trains the decoder alone.
    base.model.trainable = False

    def training_model(encoder):
        decoder = caption.make_decoder(config, vocabulary, mean=mean, variance=variance)
        model = caption_model.build_training_model(decoder, feature_shape=feature_shape,
                                                   caption_length=config.max_length + 1, encoder=encoder)
        model = _compile(model, config, steps_per_epoch=steps)
        if mode == "quick":
            common.build_optimizers(model)
        return model

    cached_model, encoder_model = training_model(None), training_model(base.model)
    stalls = []

    def epoch(model, cache):
        batches = pair_batches.caption_batches(cache, pairs["train"], batch_size=batch_size, shuffle=True,
                                               seed=config.seed)
        last_step = _last_step_callback()

        def run():
            start = time.perf_counter()
            model.fit(batches, epochs=1, verbose=0, shuffle=False, callbacks=[last_step])
            stalls.append(time.perf_counter() - last_step.time)
            return count, last_step.time - start
        return run

    def cache_train_features():
        # The one-off cost: the encoder once over the training images, into a .npy file.
        _quiet(feature_cache.cache_split, data.train, path=work / "timed" / "train.npy", image_size=base.input_size,
               channels=base.channels, batch_size=config.batch_size, encoder=base.model, label="train")
        return len(data.train)

    rates = common.interleaved({
        "cached": epoch(cached_model, caches["train"]),
        "encoder": epoch(encoder_model, pixels["train"]),
        "caching": cache_train_features,
    }, warmup=1, repeats=repeats)
    cached, encoder, caching = (statistics.median(rates[key]) for key in ("cached", "encoder", "caching"))
    caching_seconds = len(data.train) / caching
    saved_per_epoch = count / encoder - count / cached
    break_even = caching_seconds / saved_per_epoch if saved_per_epoch > 0 else None  # None: never repaid
    common.report(
        "caption_cached_features_vs_encoder", ours=rates["cached"], reference=rates["encoder"], mode=mode,
        unit="captions/s",
        config={"dataset": f"scenes {config.scenes_count}", "train_images": len(data.train),
                "image_size": config.scenes_size, "encoder": f"{base.name} to {config.encoder_layer}, random, frozen",
                "feature_shape": list(feature_shape), "decoder": f"{config.decoder} {config.units} units, embedding "
                f"{config.embedding}, dropout {config.dropout}", "batch_size": batch_size, "steps_per_epoch": steps,
                "captions_per_epoch": count, "optimizer": config.optimizer, "warmup_repeats": 1, "repeats": repeats,
                "timed": "model.fit start to the end of the epoch's last step"},
        caching_seconds=caching_seconds, caching_samples=rates["caching"], break_even_epochs=break_even,
        epoch_seconds={"cached": count / cached, "encoder": count / encoder},
        details=(f"{count / cached:.3g} s against {count / encoder:.3g} s an epoch of {count} captions; caching "
                 f"the train features once costs {caching_seconds:.3g} s ({len(data.train)} images), "
                 + (f"repaid after {break_even:.2f} epochs" if break_even is not None else "never repaid") +
                 f" (the app trains {config.epochs}); left out: iterator shutdown after "
                 f"the last step, up to {max(stalls):.1f} s"),
        ours_label="`dlsuite caption train`: fit on the cached feature maps (caption_batches over the .npy cache)",
        reference_label="the same epoch on cached pixels with the frozen encoder inside the model "
                        "(build_training_model(..., encoder=...), as --fine-tune-encoder builds it, frozen)",
    )
    return cached_model.get_layer("caption_decoder"), caches["test"], data, base, repeats + 1


def beam_vs_greedy(config, decoder, test_cache, *, epochs_trained, repeats, mode):
    import tensorflow as tf

    from dlsuite.apps.caption import decode as caption_decode

    @tf.function(reduce_retracing=True)
    def run(rows, beam):
        context, states = decoder.start(rows)
        return caption_decode.decode(decoder.step, states, context, beam_size=beam, max_length=config.max_length,
                                     alpha=config.alpha)

    chunks = [tf.constant(np.asarray(test_cache[start:start + config.batch_size], np.float32))
              for start in range(0, len(test_cache), config.batch_size)]
    words = {}

    def decode_all(beam):
        def go():
            found = [caption_decode.as_numpy(run(rows, tf.constant(beam))) for rows in chunks]
            words[beam] = float(np.concatenate([part.lengths for part in found]).mean())
            return len(test_cache)
        return go

    rates = common.interleaved({"greedy": decode_all(1), "beam": decode_all(BEAM)}, warmup=1, repeats=repeats)
    greedy, beam = statistics.median(rates["greedy"]), statistics.median(rates["beam"])
    common.report(
        f"caption_beam{BEAM}_vs_greedy", ours=rates["greedy"], reference=rates["beam"], mode=mode, unit="images/s",
        config={"images": len(test_cache), "batch_size": config.batch_size, "max_length": config.max_length,
                "alpha": config.alpha, "decoder": f"{config.decoder} {config.units} units",
                "decoder_epochs_trained": epochs_trained, "warmup_repeats": 1, "repeats": repeats},
        details=(f"{len(test_cache)} test images: {1000 / greedy:.2f} ms against "
                 f"{1000 / beam:.2f} ms per image; mean caption {words[1]:.1f} words greedy, {words[BEAM]:.1f} "
                 f"beam {BEAM} (decoder trained {epochs_trained} epochs)"),
        ours_label="greedy (beam 1): caption_decode.decode in one tf.function on cached test features",
        reference_label=f"beam {BEAM} through the same tf.function (the width is a tensor)",
    )


def export_beam_vs_greedy(config, decoder, data, base, *, work, repeats, mode):
    import tensorflow as tf

    from dlsuite.apps.caption import export as caption_export

    path = caption_export.export_captioner(base.model, decoder, name="benchmark", base_dir=work / "export",
                                           beam_size=BEAM, alpha=config.alpha, max_length=config.max_length)
    captioner = caption_export.ExportedCaptioner.load(path)
    contents = [tf.io.encode_png(image).numpy() for image in data.test.images.as_numpy_iterator()]
    batch = 32  # `dlsuite caption evaluate`'s default --batch-size

    def caption_all(beam):
        def go():
            for start in range(0, len(contents), batch):
                captioner.caption_bytes(contents[start:start + batch], beam_size=beam)
            return len(contents)
        return go

    rates = common.interleaved({"greedy": caption_all(1), "beam": caption_all(BEAM)}, warmup=1, repeats=repeats)
    greedy, beam = statistics.median(rates["greedy"]), statistics.median(rates["beam"])
    common.report(
        f"caption_export_beam{BEAM}_vs_greedy", ours=rates["greedy"], reference=rates["beam"], mode=mode,
        unit="images/s",
        config={"images": len(contents), "batch_size": batch, "max_length": config.max_length, "alpha": config.alpha,
                "input": "PNG bytes", "warmup_repeats": 1, "repeats": repeats},
        details=(f"{len(contents)} PNG images through the SavedModel: {1000 / greedy:.2f} ms against "
                 f"{1000 / beam:.2f} ms per image (decoding, encoder and search)"),
        ours_label="ExportedCaptioner.caption_bytes(beam_size=1), the `caption` signature",
        reference_label=f"the same with beam_size={BEAM}",
    )


def main(argv=None):
    args = common.parse_args(__doc__, argv)
    mode = "quick" if args.quick else "full"
    repeats = common.MIN_REPEATS
    if args.quick:
        config, weights = _config(QUICK_OPTIONS)
    else:
        config, weights = _config(FULL_OPTIONS)
    with tempfile.TemporaryDirectory(prefix="caption_speed_") as work:
        work = pathlib.Path(work)
        decoder, test_cache, data, base, epochs_trained = cached_vs_encoder(config, weights, work=work,
                                                                            repeats=repeats, mode=mode)
        beam_vs_greedy(config, decoder, test_cache, epochs_trained=epochs_trained, repeats=repeats, mode=mode)
        if not args.quick:
            export_beam_vs_greedy(config, decoder, data, base, work=work, repeats=repeats, mode=mode)


if __name__ == "__main__":
    main()
