"""`dlsuite caption`: image captioning with a CNN encoder and a recurrent decoder.

The recipe `train` follows: load images with their reference captions, build
the vocabulary from the training captions, build the encoder (any registry
CNN or keras.applications backbone without its top, `vision/backbones.py`),
run it once over every image and cache the feature maps (or, with
`--fine-tune-encoder`, cache the resized pixels and train encoder and decoder
end to end), train the decoder with teacher forcing on every (image,
reference) pair, then decode the test images greedily and with beam search,
score corpus BLEU-1..4 against all references of each image next to the
image-blind baseline (the most frequent training caption), write the run
directory and export a SavedModel that turns image bytes into a sentence.
"""

import argparse
import json
import pathlib
import sys

from dlsuite.apps.core import choices, train_args
from dlsuite.apps.caption.task import DEFAULT_ENCODER, CaptionTask
from dlsuite.apps.core.errors import UsageError

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
        group.add_argument("--validation-captions", metavar="FILE",
                           help="captions of the validation images (in --images), used whole: nothing of --captions "
                                "is split off for validation (Flickr8k's Flickr_8k.devImages-style splits)")
        group.add_argument("--test-captions", metavar="FILE", help="captions of the test images, likewise")
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
    train_args.add_trust_model_argument(group, help="with a SavedModel as --encoder-weights: "
                                                    + train_args.TRUST_MODEL_HELP)
    group.add_argument("--encoder-layer", metavar="NAME",
                       help="use this layer's feature map instead of the last one, e.g. block4_pool (default: the "
                            "last, except for the default encoder)")
    group.add_argument("--input-size", type=train_args.size_pair, metavar="H,W",
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
    train_args.add_trust_model_argument(generate)
    generate.set_defaults(func=run_generate)

    evaluate = commands.add_parser("evaluate", help="corpus BLEU-1..4 of an export against reference captions",
                                   epilog=EPILOG_EVALUATE, formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluate.add_argument("saved_model", help="saved_models/NAME (its highest version) or a version folder")
    _add_data_arguments(evaluate.add_argument_group("data"), evaluate=True)
    _add_decoding_arguments(evaluate, default_beam=None)
    evaluate.add_argument("--batch-size", type=train_args.positive_int, default=32)
    evaluate.add_argument("--json", action="store_true")
    train_args.add_trust_model_argument(evaluate)
    evaluate.set_defaults(func=run_evaluate)


# --- train -----------------------------------------------------------------------------


def run_train(args):
    from dlsuite.apps.core import lifecycle

    return lifecycle.run_from_args(CaptionTask, args)


# --- generate and evaluate ---------------------------------------------------------------


def _search(args):
    """The decoding options of generate/evaluate; None keeps the export's default."""
    if args.alpha is not None and args.alpha < 0:
        raise UsageError(f"--alpha must be >= 0, received {args.alpha}")
    return {"beam_size": 1 if args.greedy else args.beam, "max_length": args.max_length, "alpha": args.alpha}


def run_generate(args):
    from dlsuite.apps.caption import export as caption_export, folder as caption_folder
    from dlsuite.apps.vision import file_checks

    checks = file_checks.check_images(args.image, strict=False)
    good = [check.path for check in checks if check.reason is None]
    bad = [f"{check.path} ({check.reason})" for check in checks if check.reason]
    search = _search(args)
    captioner = caption_export.ExportedCaptioner.load(args.saved_model, trust_model=args.trust_model)
    found = captioner.caption_files(good, **search) if good else {"caption": []}
    for index, path in enumerate(good):
        if args.json:
            print(json.dumps({"image": path, "caption": found["caption"][index],
                              "log_likelihood": float(found["log_likelihood"][index]),
                              "score": float(found["score"][index])}))
        else:
            print(f"{path}\t{found['caption'][index]}")
    if bad:
        raise UsageError(f"cannot read {len(bad)} of {len(checks)} images: {caption_folder.list_some(bad)}; "
                         "pass JPEG, PNG, BMP or GIF files")
    return 0


def run_evaluate(args):
    from dlsuite.apps.caption import export as caption_export, folder as caption_folder

    if (args.images is None) != (args.captions is None):
        raise UsageError("--images and --captions go together: the folder of images and the file of their captions")
    search = _search(args)
    captioner = caption_export.ExportedCaptioner.load(args.saved_model, trust_model=args.trust_model)
    if args.images is not None:
        found = caption_folder.captioned_images(args.images, args.captions, strict=args.strict)
        for warning in found.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        names, references = found.names, found.captions
        contents = (pathlib.Path(path).read_bytes() for path in found.paths)
        source = f"{args.captions} ({len(names)} images)"
    else:
        names, references, contents, source = _test_split(args, captioner)

    from dlsuite.apps.caption import decode as caption_decode

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

    from dlsuite.apps.caption import data as caption_data

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
