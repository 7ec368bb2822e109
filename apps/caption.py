"""`dlsuite caption`: image captioning with a CNN encoder and a recurrent decoder.

The recipe `train` follows: load images with their reference captions, build
the vocabulary from the training captions, build the encoder (any registry
CNN or keras.applications backbone without its top, `apps/backbones.py`),
run it once over every image and cache the feature maps (or, with
`--fine-tune-encoder`, cache the resized pixels and train encoder and decoder
end to end), train the decoder with teacher forcing on every (image,
reference) pair, then decode the test images greedily and with beam search,
score corpus BLEU-1..4 against all references of each image next to the
image-blind baseline (the most frequent training caption), write the run
directory and export a SavedModel that turns image bytes into a sentence.
"""

import argparse
import dataclasses
import json
import pathlib
import sys

from dlsuite.apps import choices, train_args
from dlsuite.apps.cli import UsageError

# The offline default encoder, chosen by measurement on scenes (2,000 images,
# 12 epochs, test BLEU-4 with beam 3, before features were standardized): a
# randomly initialized, frozen VGG-11 cut after its fourth block (a 4x4x512
# map at 64x64) 0.57; its last block (2x2x512) 0.49, as five random blocks
# blur shape and colour; block3_pool (8x8x256) 0.47; ResNet-18 and LeNet-5
# (Caffe) below VGG-11's last block on the earlier grammar. With the defaults
# below (4,000 scenes, 8 epochs, dropout 0.5) it reaches 0.60 in about 200 s
# of CPU. Random filters need no download; on photos use ImageNet weights.
DEFAULT_ENCODER = ("vgg11", "block4_pool")

EPILOG_TRAIN = """examples:
  dlsuite caption train                                   # generated scenes, random frozen VGG-11, LSTM decoder (offline)
  dlsuite caption train --attention --decoder gru         # Show, Attend and Tell over the 2x2 feature map
  dlsuite caption train --fine-tune-encoder --encoder lenet5 --epochs 15     # encoder trained end to end
  dlsuite caption train --images Flicker8k_Dataset --captions Flickr8k.token.txt \\
      --encoder resnet50 --encoder-weights imagenet --pooling avg --units 512 --embedding 256
  dlsuite caption train --dataset tfds:coco_captions --encoder MobileNetV2 --encoder-weights imagenet --attention
  dlsuite caption train --resume runs/caption/20261126-120000      # after an interruption
"""

EPILOG_GENERATE = """examples:
  dlsuite caption generate saved_models/vgg11_lstm_scenes photo.png
  dlsuite caption generate saved_models/vgg11_lstm_scenes a.jpg b.jpg --greedy --json
  dlsuite caption generate saved_models/vgg11_lstm_scenes a.jpg --beam 5 --max-length 12
"""

EPILOG_EVALUATE = """examples:
  dlsuite caption evaluate saved_models/vgg11_lstm_scenes                   # the training run's test split
  dlsuite caption evaluate saved_models/resnet50_lstm_flickr8k --images Flicker8k_Dataset --captions test.token.txt
  dlsuite caption evaluate saved_models/vgg11_lstm_scenes --greedy --json
"""


@dataclasses.dataclass
class CaptionConfig(train_args.TrainingConfig):
    """A captioning run; saved as config.json beside the model."""

    dataset: str = "scenes"
    images: str | None = None
    captions: str | None = None
    data_dir: str | None = None
    scenes_count: int = 4000
    scenes_size: int = 64
    max_images: int | None = None
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    strict: bool = False
    encoder: str | None = None
    encoder_weights: str | None = "none"
    encoder_layer: str | None = None
    input_size: list | None = None
    preprocess: str = "auto"
    fine_tune_encoder: bool = False
    decoder: str = "lstm"
    attention: bool = False
    units: int = 256
    embedding: int = 128
    pooling: str = "flatten"
    dropout: float = 0.5
    max_length: int = 20
    max_tokens: int | None = None
    image_blind: bool = False
    beam: int = 3
    alpha: float = 0.7
    epochs: int = 8
    batch_size: int | None = 64


def _input_size(text):
    from dlsuite.apps.transfer import input_size as parse

    return parse(text)


def _add_data_arguments(group, *, evaluate=False, scenes_count=4000):
    group.add_argument("--dataset", default=None if evaluate else "scenes",
                       help="scenes (generated shapes with colours, sizes and relations; offline) or tfds:coco_captions"
                            + (" (default: the training run's dataset, its test split)" if evaluate else " (default scenes)"))
    group.add_argument("--images", metavar="DIR", help="a folder of images (with --captions)")
    group.add_argument("--captions", metavar="FILE",
                       help="their captions: a Flickr8k/30k token file (name.jpg#0<TAB>caption), a CSV with "
                            "image and caption columns, a COCO captions JSON or a Karpathy dataset_*.json")
    group.add_argument("--data-dir", help="tfds: where TensorFlow Datasets keeps its files")
    group.add_argument("--strict", action="store_true", help="stop at an unreadable image instead of skipping it")
    if not evaluate:
        group.add_argument("--scenes-count", type=train_args.positive_int, default=scenes_count,
                           help=f"scenes: images (default {scenes_count})")
        group.add_argument("--scenes-size", type=train_args.positive_int, default=64, help="scenes: image side (default 64)")
        group.add_argument("--max-images", type=train_args.positive_int, metavar="N", help="use at most N images per split")
        group.add_argument("--validation-fraction", type=float, default=0.1, help="share of images held out (default 0.1)")
        group.add_argument("--test-fraction", type=float, default=0.1, help="share of images for the test (default 0.1)")


def _add_encoder_arguments(group, *, fine_tune):
    group.add_argument("--encoder",
                       help="registry CNN or keras.applications backbone, e.g. resnet50, MobileNetV2 (default: "
                            f"{DEFAULT_ENCODER[0]} cut at {DEFAULT_ENCODER[1]}, random weights: learns scenes offline)")
    group.add_argument("--encoder-weights", default="none",
                       help="none (random, the offline default), imagenet, a .weights.h5 file, or a model this suite "
                            "trained (runs/.../model.keras, saved_models/NAME)")
    group.add_argument("--encoder-layer", metavar="NAME",
                       help="use this layer's feature map instead of the last one, e.g. block4_pool (default: the "
                            "last, except for the default encoder)")
    group.add_argument("--input-size", type=_input_size, metavar="H,W",
                       help="size the encoder sees (default: the images' own size when they share one, else the backbone's)")
    group.add_argument("--preprocess", choices=choices.TRANSFER_PREPROCESSING, default="auto",
                       help="pixel preprocessing inside the encoder (default auto: what the weights expect)")
    if fine_tune:
        group.add_argument("--fine-tune-encoder", action="store_true",
                           help="train the encoder with the decoder (default: frozen, features computed once and cached)")


def _add_caption_arguments(group):
    group.add_argument("--max-length", type=train_args.positive_int, default=20, help="most words per caption (longer ones are cut)")
    group.add_argument("--max-tokens", type=train_args.positive_int, help="vocabulary size cap (default: every training word)")


def _add_beam_arguments(group):
    group.add_argument("--beam", type=train_args.positive_int, default=3, help="beam width for the test and the export (default 3)")
    group.add_argument("--alpha", type=float, default=0.7,
                       help="length normalization: score = log P / ((5 + length) / 6) ** alpha (default 0.7; 0: none)")


def add_data_arguments(group, *, scenes_count=4000):
    """What `dlsuite tune caption` holds fixed while it searches the decoder:
    the captioned images, the frozen encoder whose features every trial
    reads from one cache, the caption length and vocabulary, and the beam the
    best model is scored and exported with."""
    _add_data_arguments(group, scenes_count=scenes_count)
    _add_encoder_arguments(group, fine_tune=False)
    _add_caption_arguments(group)
    _add_beam_arguments(group)


def _add_decoding_arguments(parser, *, default_beam=None):
    group = parser.add_argument_group("decoding")
    search = group.add_mutually_exclusive_group()
    search.add_argument("--beam", type=train_args.positive_int, default=default_beam, metavar="K",
                        help="beam width (default: the export's, which `train --beam` set)")
    search.add_argument("--greedy", action="store_true", help="greedy decoding (the same as --beam 1)")
    group.add_argument("--max-length", type=train_args.positive_int, help="most words per caption (default: the export's)")
    group.add_argument("--alpha", type=float, help="length normalization exponent (default: the export's; 0: none)")
    return group


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "caption", help="image captioning: CNN encoder, LSTM/GRU decoder, beam search, BLEU",
        epilog="examples:\n  dlsuite caption train\n  dlsuite caption generate saved_models/vgg11_lstm_scenes photo.png\n"
               "  dlsuite caption evaluate saved_models/vgg11_lstm_scenes",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="caption_command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a captioner, score BLEU on the test split, export",
                                epilog=EPILOG_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_data_arguments(train.add_argument_group("data"))
    _add_encoder_arguments(train.add_argument_group("encoder"), fine_tune=True)
    decoder = train.add_argument_group("decoder")
    decoder.add_argument("--decoder", choices=choices.CAPTION_CELLS, default="lstm")
    decoder.add_argument("--attention", action="store_true",
                         help="soft attention over the feature map's locations (Show, Attend and Tell)")
    decoder.add_argument("--units", type=train_args.positive_int, default=256, help="recurrent units (default 256)")
    decoder.add_argument("--embedding", type=train_args.positive_int, default=128,
                         help="word and image embedding width (default 128)")
    decoder.add_argument("--pooling", choices=choices.CAPTION_POOLING, default="flatten",
                         help="without --attention, how the feature map becomes the image vector: flatten (keeps "
                              "where things are; default) or avg/max (smaller, for big backbones)")
    decoder.add_argument("--dropout", type=float, default=0.5,
                         help="on the image features and before the output layer (default 0.5)")
    _add_caption_arguments(decoder)
    decoder.add_argument("--image-blind", action="store_true",
                         help="ablation: the decoder never sees the image (a caption language model), for a baseline")
    _add_beam_arguments(train.add_argument_group("decoding"))
    train_args.add_training_arguments(train, app="caption", epochs=8, batch_size=64, lr=0.002, clip_norm=5.0,
                                      export_default="<encoder>_<decoder>_<dataset>", resumable=True)
    train.set_defaults(func=run_train)

    generate = commands.add_parser("generate", help="one caption per image, from an export",
                                   epilog=EPILOG_GENERATE, formatter_class=argparse.RawDescriptionHelpFormatter)
    generate.add_argument("saved_model", help="saved_models/NAME (its highest version) or a version folder")
    generate.add_argument("image", nargs="+", help="JPEG, PNG, BMP or GIF files")
    _add_decoding_arguments(generate, default_beam=None)
    generate.add_argument("--json", action="store_true", help="one JSON object per image, with the log-likelihood")
    generate.set_defaults(func=run_generate)

    evaluate = commands.add_parser("evaluate", help="corpus BLEU-1..4 of an export against reference captions",
                                   epilog=EPILOG_EVALUATE, formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluate.add_argument("saved_model", help="saved_models/NAME (its highest version) or a version folder")
    _add_data_arguments(evaluate.add_argument_group("data"), evaluate=True)
    _add_decoding_arguments(evaluate, default_beam=None)
    evaluate.add_argument("--batch-size", type=train_args.positive_int, default=32)
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=run_evaluate)


# --- train -----------------------------------------------------------------------------


def _check_config(config):
    from dlsuite.apps import backbones

    if (config.images is None) != (config.captions is None):
        raise UsageError("--images and --captions go together: the folder of images and the file of their captions")
    if config.encoder is None and not backbones.is_model_file(config.encoder_weights):
        config.encoder = DEFAULT_ENCODER[0]
        config.encoder_layer = config.encoder_layer or DEFAULT_ENCODER[1]
    if config.encoder is not None:
        config.encoder = backbones.canonical_name(config.encoder)
    if not 0 <= config.dropout < 1:
        raise UsageError(f"--dropout must be in [0, 1), received {config.dropout}")
    if config.alpha < 0:
        raise UsageError(f"--alpha must be >= 0, received {config.alpha}")
    if config.attention and config.pooling != "flatten":
        raise UsageError("--pooling applies without --attention; attention reads every location of the feature map")
    if config.optimizer.get("optimizer") == "lbfgs":
        raise UsageError("--optimizer lbfgs is for small image classifiers; captioners train with adam, rmsprop or sgd")
    if config.export is not None:
        from dlsuite.apps import export

        export.check_export_name(config.export)
    return backbones.check_weights_argument(config.encoder, config.encoder_weights)


def run_train(args):
    if args.resume:
        config, run_dir = train_args.load_resumed_config(CaptionConfig, args.resume), pathlib.Path(args.resume)
    else:
        config, run_dir = train_args.config_from_args(CaptionConfig, args), None
    return train(config, run_dir=run_dir, resume=bool(args.resume))


def train(config, *, run_dir=None, resume=False):
    """Runs the whole recipe for `config`; returns the exit status.

    With `resume`, `run_dir` is an interrupted run's directory: the features
    are cached again (the same encoder gives the same ones) and training
    goes on from the last finished epoch.
    """
    from dlsuite.apps import distribute

    weights = _check_config(config)
    strategy = distribute.make_strategy(config.strategy)

    import numpy as np

    from dlsuite.apps import backbones, caption_data, caption_decode, caption_model, engine, optim, rundir

    device = engine.device_kind()
    engine.set_seed(config.seed, deterministic=device == "cpu")
    policy = engine.set_precision(config.mixed_precision, device)
    batch_size = config.batch_size or engine.default_batch_size(device)

    data, vocabulary, base = load_data_and_encoder(config, weights)
    run_dir = pathlib.Path(run_dir if run_dir is not None else rundir.create(config.out, "caption"))
    caches, pairs, truncated = cache_inputs(config, data, vocabulary, base, cache_dir=run_dir / "cache",
                                            batch_size=batch_size)
    batch_size = min(batch_size, len(pairs["train"][0]))
    train_batches = caption_data.caption_batches(caches["train"], pairs["train"], batch_size=batch_size, shuffle=True,
                                                 seed=config.seed)
    validation_batches = caption_data.caption_batches(caches["validation"], pairs["validation"],
                                                      batch_size=batch_size, shuffle=False)

    feature_shape = tuple(int(d) for d in base.model.output.shape[1:])
    # The encoder's channel statistics on training images (of its initial weights when fine-tuned).
    mean, variance = caption_model.feature_statistics(
        base.model.predict(np.asarray(caches["train"][:256], np.float32), batch_size=batch_size, verbose=0)
        if config.fine_tune_encoder else caches["train"])
    with strategy.scope():
        decoder = make_decoder(config, vocabulary, mean=mean, variance=variance)
        model = caption_model.build_training_model(
            decoder, feature_shape=feature_shape, caption_length=config.max_length + 1,
            encoder=base.model if config.fine_tune_encoder else None)
        if config.fine_tune_encoder:
            _set_encoder_trainable(base, pretrained=weights is not None)
    if not resume:  # the interrupted run's config.json stays as it was
        rundir.write_json(run_dir / "config.json", {"config": config, "resolved": {
            "encoder": base.name, "encoder_weights": base.source, "preprocessing": base.preprocessing,
            "input_size": list(base.input_size), "channels": base.channels, "feature_shape": list(feature_shape),
            "vocabulary_size": vocabulary.size, "batch_size": batch_size, "policy": policy, "device": device,
            "strategy": type(strategy).__name__, "sizes": data.sizes, "pairs": {k: len(v[0]) for k, v in pairs.items()},
            "parameters": model.count_params(), "truncated_captions": truncated,
        }})
    print(f"{config.decoder}{' + attention' if config.attention else ''} decoder ({config.units} units) on "
          f"{feature_shape} features: {model.count_params():,} parameters, {len(pairs['train'][0])} training "
          f"captions an epoch; run dir {run_dir}", flush=True)

    result = engine.fit(
        model, train_batches, validation_batches, strategy=strategy,
        optimizer_config=optim.OptimizerConfig(**config.optimizer), loss=caption_model.caption_loss(), metrics=(),
        epochs=config.epochs, steps_per_epoch=-(-len(pairs["train"][0]) // batch_size), global_batch_size=batch_size,
        run_dir=run_dir, early_stopping=config.early_stopping, jit_compile=engine.jit_setting(config.jit_compile),
        resume=resume, monitors=config.monitor or ())
    if result.history:
        rundir.plot_curves(result.history, run_dir / "curves.png", title=f"captioning {data.name}")
    if result.stopped_reason:
        return engine.report_stop(result, run_dir)
    model = engine.final_model(result, model)
    decoder = model.get_layer("caption_decoder")
    encoder = model.get_layer(backbones.BACKBONE_LAYER) if config.fine_tune_encoder else base.model
    engine.save_model(caption_model.build_captioner(encoder, decoder, caption_length=config.max_length + 1),
                      run_dir / "model.keras")

    figures = evaluate_split(decoder, caches["test"], data.test.captions, vocabulary,
                             encoder=encoder if config.fine_tune_encoder else None, beam_size=config.beam,
                             max_length=config.max_length, alpha=config.alpha, batch_size=batch_size)
    baseline = caption_data.most_frequent_caption(data.train.captions)
    figures["baseline"] = {"caption": baseline, **caption_decode.bleu(data.test.captions, [baseline] * len(data.test))}
    figures["examples"] = [{"image": name, "caption": caption, "references": references}
                           for name, caption, references in zip(data.test.names, figures.pop("captions"),
                                                                data.test.captions)][:5]
    metrics = {"status": "finished", **{key: figures["beam"][key] for key in ("bleu1", "bleu2", "bleu3", "bleu4")},
               **figures, "epochs_run": result.epochs_run,
               "validation_loss": min(result.history.get("val_loss") or [float("nan")])}
    if not config.no_export:
        metrics["export"] = str(export_captioner(config, base, encoder, decoder, data_name=data.name,
                                                 test_bleu={key: metrics[key] for key in ("bleu1", "bleu2", "bleu3", "bleu4")}))
    rundir.write_json(run_dir / "metrics.json", metrics)
    beam, greedy = figures["beam"], figures["greedy"]
    print(f"test BLEU-1..4 {beam['bleu1']:.3f} {beam['bleu2']:.3f} {beam['bleu3']:.3f} {beam['bleu4']:.3f} "
          f"(beam {config.beam}); greedy BLEU-4 {greedy['bleu4']:.3f}; image-blind baseline "
          f"({baseline!r}) BLEU-4 {figures['baseline']['bleu4']:.3f}; mean log-likelihood beam "
          f"{beam['mean_log_likelihood']:.3f} vs greedy {greedy['mean_log_likelihood']:.3f}; run dir {run_dir}"
          + (f"; export {metrics['export']}" if "export" in metrics else ""))
    return 0


def load_data_and_encoder(config, weights):
    """The captioned images, the vocabulary of their training captions and the encoder.

    Args:
        config: a checked `CaptionConfig`.
        weights: the encoder's weights, as `_check_config` resolved them.

    Returns:
        (`caption_data.CaptionData`, `caption_model.Vocabulary`, `backbones.Base` cut at --encoder-layer).
    """
    from dlsuite.apps import backbones, caption_data, caption_model, classifier, pipeline

    data = caption_data.load(
        config.dataset, images=config.images, captions=config.captions, seed=config.seed,
        validation_fraction=config.validation_fraction, test_fraction=config.test_fraction,
        scenes_count=config.scenes_count, scenes_size=config.scenes_size, data_dir=config.data_dir,
        max_images=config.max_images, strict=config.strict)
    for warning in data.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    vocabulary = caption_model.Vocabulary.build(
        [reference for references in data.train.captions for reference in references], max_tokens=config.max_tokens)

    # The encoder sees the images' own size when they share one and its weights do not dictate another.
    input_size = config.input_size
    if input_size is None and data.image_shape and weights is None:
        input_size = list(data.image_shape[:2])
    probe = pipeline.batches(data.train.images.map(lambda image: (image, 0)),
                             image_size=tuple(input_size or (64, 64)), channels=data.channels, batch_size=64,
                             training=False, cache=False)
    base = backbones.build_base(config.encoder, weights=weights, input_size=input_size, channels=data.channels,
                                statistics=classifier.channel_statistics(probe, max_batches=8),
                                preprocessing=config.preprocess)
    if config.encoder_layer:
        base = _cut_encoder(base, config.encoder_layer)
    return data, vocabulary, base


def cache_inputs(config, data, vocabulary, base, *, cache_dir, batch_size):
    """Runs the frozen encoder once over every split (the resized pixels with
    --fine-tune-encoder) into .npy files in `cache_dir`, and pairs each image
    with its references as teacher-forcing ids.

    Returns:
        ({split: memory-mapped array}, {"train"/"validation": caption_data.caption_pairs}, captions cut at --max-length).
    """
    from dlsuite.apps import caption_data

    what = "pixels" if config.fine_tune_encoder else f"{base.name} features"
    print(f"{data.name}: {data.sizes['train']} train / {data.sizes['validation']} validation / {data.sizes['test']} "
          f"test images, {vocabulary.size} tokens; caching {what} "
          f"({base.input_size[0]}x{base.input_size[1]}x{base.channels} in) in {cache_dir}", flush=True)
    caches = {
        key: caption_data.cache_split(getattr(data, key), path=pathlib.Path(cache_dir) / f"{key}.npy",
                                      image_size=base.input_size, channels=base.channels, batch_size=batch_size,
                                      encoder=None if config.fine_tune_encoder else base.model, label=key)
        for key in ("train", "validation", "test")
    }
    pairs = {key: caption_data.caption_pairs(getattr(data, key).captions, vocabulary, max_length=config.max_length)
             for key in ("train", "validation")}
    truncated = pairs["train"][3] + pairs["validation"][3]
    if truncated:
        print(f"warning: {truncated} captions have more than {config.max_length} words and were cut; "
              "raise --max-length to keep them whole", file=sys.stderr)
    return caches, pairs, truncated


def make_decoder(config, vocabulary, *, mean, variance):
    """The `CaptionDecoder` of `config` (cell, attention, widths, dropout) over
    features with per-channel `mean` and `variance`."""
    from dlsuite.apps import caption_model

    return caption_model.CaptionDecoder(
        vocabulary.tokens, units=config.units, embedding=config.embedding, cell=config.decoder,
        attention=config.attention, pooling=config.pooling, dropout=config.dropout,
        image_blind=config.image_blind, feature_mean=mean, feature_variance=variance, name="caption_decoder")


def export_captioner(config, base, encoder, decoder, *, data_name, test_bleu):
    """Exports the captioner as --export (default <encoder>_<decoder>_<dataset>); returns its version folder."""
    from dlsuite.apps import caption_export, rundir

    name = config.export or "_".join([base.name, config.decoder + ("_attention" if config.attention else "")
                                      + ("_blind" if config.image_blind else ""), rundir.slug(data_name)])
    return caption_export.export_captioner(
        encoder, decoder, name=name, base_dir=config.export_dir, beam_size=config.beam, alpha=config.alpha,
        max_length=config.max_length, metadata={
            "encoder": base.name, "encoder_weights": base.source, "decoder": config.decoder,
            "attention": config.attention, "dataset": _dataset_facts(config), "test_bleu": test_bleu})


def _cut_encoder(base, layer_name):
    """The same backbone ending at `layer_name` (still named "backbone")."""
    import keras

    from dlsuite.apps import backbones

    known = base.feature_layers()
    if layer_name not in known:
        raise UsageError(f"--encoder-layer {layer_name} is not a layer of {base.name}; choose from {', '.join(known)}")
    output = base.model.get_layer(layer_name).output
    return dataclasses.replace(base, model=keras.Model(base.model.input, output, name=backbones.BACKBONE_LAYER))


def _dataset_facts(config):
    """What `evaluate` needs to rebuild the same test split."""
    return {"dataset": config.dataset, "images": config.images, "captions": config.captions, "seed": config.seed,
            "scenes_count": config.scenes_count, "scenes_size": config.scenes_size, "max_images": config.max_images,
            "validation_fraction": config.validation_fraction, "test_fraction": config.test_fraction,
            "data_dir": config.data_dir}


def _set_encoder_trainable(base, *, pretrained):
    """End-to-end training: every encoder layer learns; a pretrained encoder's batch norm keeps its statistics."""
    import keras

    base.model.trainable = True
    if pretrained:
        for layer in base.model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False


def decode_split(decoder, cache, *, encoder, beam_sizes, max_length, alpha, batch_size):
    """Captions every image of `cache` with each beam width of `beam_sizes` (1: greedy).

    Args:
        decoder: a trained `caption_model.CaptionDecoder`.
        cache: (N, ...) features, or pixels when `encoder` is given.

    Returns:
        {beam width: `caption_decode.Decoded` of the N images}.
    """
    import numpy as np
    import tensorflow as tf

    from dlsuite.apps import caption_decode

    @tf.function(reduce_retracing=True)
    def run(rows, beam):
        features = encoder(rows, training=False) if encoder is not None else rows
        context, states = decoder.start(features)
        return caption_decode.decode(decoder.step, states, context, beam_size=beam, max_length=max_length, alpha=alpha)

    parts = {beam: [] for beam in beam_sizes}  # a width given twice is decoded once
    for start in range(0, len(cache), batch_size):
        rows = tf.constant(np.asarray(cache[start:start + batch_size], dtype=np.float32))
        for beam in parts:
            parts[beam].append(caption_decode.as_numpy(run(rows, tf.constant(beam))))
    return {beam: caption_decode.Decoded(*[np.concatenate([getattr(part, field) for part in chunks])
                                           for field in caption_decode.Decoded._fields])
            for beam, chunks in parts.items()}


def evaluate_split(decoder, cache, references, vocabulary, *, encoder, beam_size, max_length, alpha, batch_size):
    """Greedy and beam captions of every image in `cache`, scored by BLEU and log-likelihood.

    Returns:
        {"beam": {bleu1..4, mean_log_likelihood, mean_score, greedy_kept}, "greedy": {...},
        "beam_not_worse": count of images whose beam score >= greedy's, "captions": beam captions}.
    """
    from dlsuite.apps import caption_decode

    decoded = decode_split(decoder, cache, encoder=encoder, beam_sizes=(1, beam_size), max_length=max_length,
                           alpha=alpha, batch_size=batch_size)
    found = {"greedy": decoded[1], "beam": decoded[beam_size]}
    captions = {key: vocabulary.decode(result.token_ids) for key, result in found.items()}
    figures = {
        key: {**caption_decode.bleu(references, captions[key]), "beam_size": beam,
              "mean_log_likelihood": float(found[key].log_likelihood.mean()),
              "mean_score": float(found[key].score.mean()), "mean_words": float(found[key].lengths.mean()),
              # Where the beam's own best scored below greedy's caption, which was kept instead.
              "greedy_kept": int(found[key].greedy_won.sum()) if beam > 1 else None}
        for key, beam in (("greedy", 1), ("beam", beam_size))
    }
    figures["beam_not_worse"] = int((found["beam"].score >= found["greedy"].score - 1e-5).sum())
    figures["images"] = len(cache)
    figures["captions"] = captions["beam"]
    return figures


# --- generate and evaluate ---------------------------------------------------------------


def _search(args):
    """The decoding options of generate/evaluate; None keeps the export's default."""
    if args.alpha is not None and args.alpha < 0:
        raise UsageError(f"--alpha must be >= 0, received {args.alpha}")
    return {"beam_size": 1 if args.greedy else args.beam, "max_length": args.max_length, "alpha": args.alpha}


def run_generate(args):
    from dlsuite.apps import caption_data, caption_export, datasets

    checks = datasets.check_images(args.image, strict=False)
    good = [check.path for check in checks if check.reason is None]
    bad = [f"{check.path} ({check.reason})" for check in checks if check.reason]
    search = _search(args)
    captioner = caption_export.ExportedCaptioner.load(args.saved_model)
    found = captioner.caption_files(good, **search) if good else {"caption": []}
    for index, path in enumerate(good):
        if args.json:
            print(json.dumps({"image": path, "caption": found["caption"][index],
                              "log_likelihood": float(found["log_likelihood"][index]),
                              "score": float(found["score"][index])}))
        else:
            print(f"{path}\t{found['caption'][index]}")
    if bad:
        raise UsageError(f"cannot read {len(bad)} of {len(checks)} images: {caption_data.list_some(bad)}; "
                         "pass JPEG, PNG, BMP or GIF files")
    return 0


def run_evaluate(args):
    from dlsuite.apps import caption_data, caption_export

    if (args.images is None) != (args.captions is None):
        raise UsageError("--images and --captions go together: the folder of images and the file of their captions")
    search = _search(args)
    captioner = caption_export.ExportedCaptioner.load(args.saved_model)
    if args.images is not None:
        found = caption_data.captioned_images(args.images, args.captions, strict=args.strict)
        for warning in found.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        names, references = found.names, found.captions
        contents = (pathlib.Path(path).read_bytes() for path in found.paths)
        source = f"{args.captions} ({len(names)} images)"
    else:
        names, references, contents, source = _test_split(args, captioner)

    from dlsuite.apps import caption_decode

    hypotheses, log_likelihood = [], []
    chunk = []
    for data in contents:
        chunk.append(data)
        if len(chunk) == args.batch_size:
            _caption_chunk(captioner, chunk, search, hypotheses, log_likelihood)
            chunk = []
    if chunk:
        _caption_chunk(captioner, chunk, search, hypotheses, log_likelihood)
    scores = caption_decode.bleu(references, hypotheses)
    result = {**scores, "images": len(names), "beam_size": search["beam_size"] or captioner.metadata["beam_size"],
              "mean_log_likelihood": sum(log_likelihood) / max(1, len(log_likelihood)), "source": source}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{source}: BLEU-1 {scores['bleu1']:.4f}  BLEU-2 {scores['bleu2']:.4f}  BLEU-3 {scores['bleu3']:.4f}  "
              f"BLEU-4 {scores['bleu4']:.4f}  (beam {result['beam_size']}, mean log-likelihood "
              f"{result['mean_log_likelihood']:.3f})")
    return 0


def _caption_chunk(captioner, chunk, search, hypotheses, log_likelihood):
    found = captioner.caption_bytes(chunk, **search)
    hypotheses.extend(found["caption"])
    log_likelihood.extend(float(v) for v in found["log_likelihood"])


def _test_split(args, captioner):
    """The test split of the dataset the export was trained on (or --dataset), as encoded PNGs."""
    import tensorflow as tf

    from dlsuite.apps import caption_data

    facts = dict(captioner.metadata.get("dataset") or {})
    dataset = args.dataset or facts.get("dataset") or "scenes"
    if args.dataset is None and facts.get("images"):
        raise UsageError(f"{captioner.path} was trained on --images {facts['images']}; pass --images DIR "
                         "--captions FILE to evaluate it")
    same = dataset == facts.get("dataset")
    data = caption_data.load(
        dataset, seed=facts.get("seed", 0) if same else 0, data_dir=args.data_dir or facts.get("data_dir"),
        **({key: facts[key] for key in ("scenes_count", "scenes_size", "max_images", "validation_fraction",
                                        "test_fraction") if key in facts} if same else {}))
    contents = (tf.io.encode_png(image).numpy() for image in data.test.images.as_numpy_iterator())
    return data.test.names, data.test.captions, contents, f"{data.name} test split ({len(data.test)} images)"
