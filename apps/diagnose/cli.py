"""`dlsuite diagnose`: the seed's network-tuning workflow as tools that look at
a real model and say what they see, with pictures.

* `init`: activations layer by layer for each initialization (vanishing,
  exploding, saturation);
* `overfit`: can the model reach 100% accuracy on a tiny training set?
* `lr-range`: a learning-rate range test and a suggested rate;
* `run RUN_DIR`: the curve doctor, naming overfitting, underfitting, NaN,
  flat or oscillating loss with the evidence and the remedies;
* `memory NAME`: the measured peak of a training step beside the estimate.

The work lives in `init_study`, `overfit_check`, `lr_range`, `curve_doctor`
and `memory_probe`; this module parses the command line and prints.
"""

import argparse
import json
import sys

from dlsuite.apps.core import choices, train_args
from dlsuite.apps.core.errors import UsageError
from dlsuite.apps.lm.task import LMConfig

# `diagnose lr-range --model` names that mean `lm train`'s language model with that cell.
LANGUAGE_MODEL_CELLS = ("lstm", "gru", "rnn")

EPILOG = """examples:
  dlsuite diagnose init                                  # tanh, xavier, 5 layers x 100 units
  dlsuite diagnose init --activation relu --init xavier  # ReLU's spread shrinks layer after layer
  dlsuite diagnose init --model resnet18 --init small
  dlsuite diagnose overfit                               # LeNet-5 on 32 digits
  dlsuite diagnose lr-range --model lenet5 --dataset digits
  dlsuite diagnose run runs/classify/20261126-120000
  dlsuite diagnose memory resnet18 --input-shape 64,64,3 --batch-size 16 --optimizer adam
"""


def _float(text, *, option, minimum=None, above=None):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{option} expects a number, received {text!r}") from None
    if value != value or (minimum is not None and value < minimum) or (above is not None and value <= above):
        bound = f">= {minimum:g}" if minimum is not None else f"> {above:g}"
        raise argparse.ArgumentTypeError(f"{option} must be {bound}, received {text!r}")
    return value


def _positive_float(option):
    return lambda text: _float(text, option=option, above=0)


def _add_model_knobs(parser, *, batch_norm_default=True):
    knobs = parser.add_argument_group("model knobs (as `dlsuite classify train`)")
    knobs.add_argument("--image-size", type=train_args.positive_int,
                       help="side the model sees (default: the data's own size if the model accepts it)")
    knobs.add_argument("--activation", choices=choices.ACTIVATIONS)
    knobs.add_argument("--init", dest="kernel_initializer", choices=choices.INITIALIZERS)
    knobs.add_argument("--dropout", type=float)
    knobs.add_argument("--l2", type=float)
    knobs.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=batch_norm_default,
                       help="batch normalization after each conv/dense layer (default on, as classify train)")


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "diagnose", help="why a network does not learn: init study, overfit check, LR range, curve doctor, memory",
        description="The seed's network-tuning workflow as tools.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="diagnose_command", required=True, metavar="COMMAND")
    _add_init_parser(commands)
    _add_overfit_parser(commands)
    _add_lr_range_parser(commands)
    _add_run_parser(commands)
    _add_memory_parser(commands)
    _add_features_parser(commands)


def _add_init_parser(commands):
    """Adds `diagnose init`: the activation study of an initialization."""
    init = commands.add_parser(
        "init", help="activations per layer for an initialization: vanishing, exploding, saturation",
        description="Push standard-normal inputs through a deep stack (or a registry model) and show each\n"
                    "layer's activations: one histogram per layer, and a grid comparing initializations.",
        epilog="examples:\n  dlsuite diagnose init\n  dlsuite diagnose init --activation relu --init he --layers 10\n"
               "  dlsuite diagnose init --activation sigmoid --init large\n"
               "  dlsuite diagnose init --model lenet5 --dataset digits\n"
               "  dlsuite diagnose init --model resnet18 --image-size 64 --init small --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    init.add_argument("--activation", choices=choices.INIT_STUDY_ACTIVATIONS,
                      help="the stack's nonlinearity (default tanh; with --model, the model's own)")
    init.add_argument("--init", choices=choices.INIT_STUDY,
                      help="zeros, small (std 0.01), large (std 1), xavier (Glorot), he (default xavier; "
                           "with --model, the model's own)")
    init.add_argument("--layers", type=train_args.positive_int, default=5, help="stack depth (default 5)")
    init.add_argument("--width", type=train_args.positive_int, default=100, help="units per layer (default 100)")
    init.add_argument("--samples", type=train_args.positive_int,
                      help="inputs pushed through (default 1000 for the stack, 32 for a model)")
    init.add_argument("--model", help="study a registry CNN instead (see `dlsuite models list`)")
    init.add_argument("--dataset", help="with --model: feed real images of this dataset, normalized per channel "
                                        "(default: standard-normal inputs)")
    init.add_argument("--image-size", type=train_args.positive_int, help="with --model: input side (default the model's)")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--out", help="where the pictures go (default runs/diagnose/<timestamp>)")
    init.add_argument("--json", action="store_true", help="print the statistics as one JSON object")
    init.set_defaults(func=run_init)


def _add_overfit_parser(commands):
    """Adds `diagnose overfit`: the tiny-subset memorization check."""
    overfit = commands.add_parser(
        "overfit", help="can the model reach 100%% training accuracy on a tiny subset?",
        description="The seed's first check: train on a few images until all are classified right.\n"
                    "Exit status 0 when it gets there, 1 when it cannot, with the likely causes.",
        epilog="examples:\n  dlsuite diagnose overfit\n  dlsuite diagnose overfit --model resnet18 --dataset shapes --samples 16\n"
               "  dlsuite diagnose overfit --lr 0      # what a setup that cannot learn looks like",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    overfit.add_argument("--model", default="lenet5", help="registry CNN (default lenet5)")
    overfit.add_argument("--dataset", default="digits", help="as classify train (default digits, bundled)")
    overfit.add_argument("--samples", type=train_args.positive_int, default=32, help="images to memorize (default 32)")
    overfit.add_argument("--max-steps", type=train_args.positive_int, default=300, help="give up after this many steps (default 300)")
    overfit.add_argument("--optimizer", choices=[o for o in choices.OPTIMIZERS if o != "lbfgs"], default="adam")
    overfit.add_argument("--lr", type=lambda t: _float(t, option="--lr", minimum=0),
                         help="learning rate (default the optimizer's; 0 is allowed here)")
    _add_model_knobs(overfit)
    overfit.add_argument("--seed", type=int, default=0)
    overfit.add_argument("--out", help="where overfit.png goes (default runs/diagnose/<timestamp>)")
    overfit.add_argument("--json", action="store_true")
    overfit.set_defaults(func=run_overfit)


def _add_lr_range_parser(commands):
    """Adds `diagnose lr-range`: the learning-rate range test."""
    sweep = commands.add_parser(
        "lr-range", help="learning-rate range test: loss against an exponentially growing rate, and a suggestion",
        description="Train briefly while the learning rate grows from --min-lr to --max-lr; plot the loss\n"
                    "against the rate and suggest one (a tenth of the rate at the lowest loss).",
        epilog="examples:\n  dlsuite diagnose lr-range\n  dlsuite diagnose lr-range --model resnet18 --dataset shapes --optimizer momentum\n"
               "  dlsuite diagnose lr-range --min-lr 1e-5 --max-lr 1 --steps 100 --json\n"
               "  dlsuite diagnose lr-range --model lstm --text book.txt --batch-size 64   # lm train's model on a text",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sweep.add_argument("--model", default="lenet5",
                       help="registry CNN (default lenet5), or lstm, gru or rnn: `lm train`'s language model")
    sweep.add_argument("--dataset", default="digits", help="as classify train (default digits, bundled)")
    sweep.add_argument("--optimizer", choices=[o for o in choices.OPTIMIZERS if o != "lbfgs"], default="adam")
    sweep.add_argument("--min-lr", type=_positive_float("--min-lr"), default=1e-7)
    sweep.add_argument("--max-lr", type=_positive_float("--max-lr"), default=10.0)
    sweep.add_argument("--steps", type=train_args.positive_int, default=200, help="training steps in the sweep (default 200)")
    sweep.add_argument("--batch-size", type=train_args.positive_int, default=32)
    _add_model_knobs(sweep)
    language = sweep.add_argument_group("language model (--model lstm, gru or rnn; as `dlsuite lm train`)")
    language.add_argument("--text", help="a UTF-8 text file (default: the standard library's docstrings)")
    from dlsuite.apps.lm.cli import max_chars_type

    language.add_argument("--max-chars", type=max_chars_type, default=LMConfig.max_chars,
                          help=f"use the first this many characters; 0: all of them (default {LMConfig.max_chars:,})")
    for option, default in (("--layers", LMConfig.layers), ("--units", LMConfig.units), ("--seq-len", LMConfig.seq_len)):
        language.add_argument(option, type=train_args.positive_int, default=default, help=f"default {default:,}")
    language.add_argument("--clip-norm", type=_positive_float("--clip-norm"),
                          help="clip the global gradient norm (default 5 for a language model, as lm train; else off)")
    sweep.add_argument("--seed", type=int, default=0)
    sweep.add_argument("--out", help="where lr_range.png and .csv go (default runs/diagnose/<timestamp>)")
    sweep.add_argument("--json", action="store_true")
    sweep.set_defaults(func=run_lr_range)


def _add_run_parser(commands):
    """Adds `diagnose run`: the curve doctor on a run's history."""
    doctor = commands.add_parser(
        "run", help="the curve doctor: what a run's history says, with the evidence and the remedies",
        description="Read a run's history.csv and name overfitting, underfitting, NaN, flat or\n"
                    "oscillating loss, with the epochs and values that show it.",
        epilog="examples:\n  dlsuite diagnose run runs/classify/20261126-120000\n  dlsuite diagnose run runs/lm/20261126-130000/history.csv --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    doctor.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (or its history.csv)")
    doctor.add_argument("--out", help="where diagnosis.png and diagnosis.json go (default the run directory)")
    doctor.add_argument("--json", action="store_true")
    doctor.set_defaults(func=run_doctor)


def _add_memory_parser(commands):
    """Adds `diagnose memory`: the measured peak memory of a training step."""
    memory = commands.add_parser(
        "memory", help="measured peak memory of a training step beside the estimate",
        description="Train a registry CNN for a few steps in a fresh process and measure its memory\n"
                    "(process resident set on CPU, the allocator's peak on GPU), beside the estimate\n"
                    "`dlsuite models show NAME --batch-size B --optimizer O` prints.",
        epilog="examples:\n  dlsuite diagnose memory lenet5\n  dlsuite diagnose memory resnet18 --input-shape 64,64,3 --batch-size 16\n"
               "  dlsuite diagnose memory vgg11 --input-shape 32,32,3 --batch-size 64 --optimizer sgd --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    memory.add_argument("name", metavar="NAME", help="a CNN from `dlsuite models list`")
    memory.add_argument("--batch-size", type=train_args.positive_int, default=32, help="examples per step (default 32)")
    memory.add_argument("--optimizer", choices=[o for o in choices.OPTIMIZERS if o != "lbfgs"], default="adam")
    memory.add_argument("--input-shape", metavar="H,W,C", help="default the model's (224,224,3 for most)")
    memory.add_argument("--classes", type=train_args.positive_int, help="output classes (builder default)")
    memory.add_argument("--json", action="store_true")
    memory.set_defaults(func=run_memory)

def _add_features_parser(commands):
    features = commands.add_parser(
        "features", help="see what a network learned: filters, feature maps, top patches, saliency, Grad-CAM",
        description="The pictures of Zeiler & Fergus (ZFNet) for a trained CNN: the first convolution's filters,\n"
                    "feature maps of a few layers, the image patches that excite each unit most (cropped to its\n"
                    "receptive field), gradient saliency and Grad-CAM for one prediction; index.html shows them.",
        epilog="examples:\n  dlsuite diagnose features runs/classify/20261126-120000\n"
               "  dlsuite diagnose features runs/classify/20261126-120000/model.keras --images ./photos --layer conv2\n"
               "  dlsuite diagnose features saved_models/shapes --images ./photos --image ./photos/cat/1.jpg",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    features.add_argument("model", metavar="MODEL",
                          help="a classify run directory, a .keras file or an export folder (saved_models/NAME[/VERSION])")
    features.add_argument("--images", metavar="DIR",
                          help="a folder of images, or of class subfolders of images (default: the run's test split)")
    features.add_argument("--image", metavar="PATH", help="the image for feature maps and saliency (default the first)")
    features.add_argument("--layer", action="append", metavar="NAME",
                          help="a conv/pool layer to look at; repeatable (default 4 spread from first to last)")
    features.add_argument("--units", type=train_args.positive_int, default=8,
                          help="channels per layer whose top patches are shown (default 8)")
    features.add_argument("--top-k", type=train_args.positive_int, default=6, help="patches per unit (default 6)")
    features.add_argument("--max-images", type=train_args.positive_int, default=500,
                          help="images searched for top patches (default 500)")
    features.add_argument("--weights", help="with a registry name as MODEL: imagenet, a .weights.h5 file or none")
    features.add_argument("--input-size", type=train_args.size_pair, metavar="H,W",
                          help="with a registry name as MODEL: the input size (default the model's)")
    features.add_argument("--out", help="where the pictures go (default runs/features/<time>)")
    train_args.add_trust_model_argument(features)
    features.set_defaults(func=run_features)


def _status(args, text):
    """Progress goes to stderr when stdout carries JSON."""
    print(text, file=sys.stderr if getattr(args, "json", False) else sys.stdout, flush=True)


# --- init ---------------------------------------------------------------------------------


def run_init(args):
    from dlsuite.apps.diagnose import init_study
    from dlsuite.apps.core import rundir

    if args.model is None and (args.dataset or args.image_size):
        raise UsageError("--dataset and --image-size apply to --model; pass --model NAME (e.g. lenet5) or drop them")
    if args.model is None:
        activation, init = args.activation or "tanh", args.init or "xavier"
        samples = args.samples or 1000
        what = f"{args.layers} layers x {args.width} units, {samples} standard-normal inputs"

        def run_one(scheme):
            return init_study.study_stack(activation, scheme, layers=args.layers, width=args.width,
                                          samples=samples, seed=args.seed)
    else:
        inputs, source = _model_inputs(args)
        activation, init = args.activation, args.init
        what = f"{args.model}, {len(inputs)} {source} inputs of {'x'.join(map(str, inputs.shape[1:]))}"

        def run_one(scheme):
            return init_study.study_model(args.model, init=scheme, activation=activation, inputs=inputs, seed=args.seed)

    study = run_one(init)
    out = rundir.create(args.out, "diagnose")
    if args.model is None:
        label = f"{activation}, {init}"
    else:
        label = ", ".join([activation or f"{args.model}'s own activation", init or f"{args.model}'s own init"])
    init_study.plot_histograms(study, out / "histograms.png", title=f"{label}: {what}")
    others = [study if scheme == init else run_one(scheme) for scheme in init_study.INIT_SCHEMES]
    init_study.plot_grid(others, out / "grid.png", title=f"{activation or 'own activation'}: {what}")
    rundir.write_json(out / "init_study.json", {"setup": what, "study": study.to_json(),
                                                 "grid": [s.to_json() for s in others]})
    if args.json:
        print(json.dumps({"setup": what, **study.to_json(), "grid": [s.to_json() for s in others],
                          "histograms": str(out / "histograms.png"), "grid_png": str(out / "grid.png")}))
        return 0
    print(f"{label}: {what}")
    print(f"{'layer':<28} {'mean':>10} {'std':>10}  {'saturated':>9}  {'dead units':>10}")
    for layer in study.layers:
        saturated = "-" if layer.saturated is None else f"{layer.saturated:.1%}"
        dead = "-" if layer.dead_units is None else f"{layer.dead_units:.1%}"
        print(f"{layer.name:<28} {layer.mean:>10.4g} {layer.std:>10.4g}  {saturated:>9}  {dead:>10}")
    print(f"verdict: {study.verdict}")
    print()
    print(f"std per layer for every initialization ({activation or 'own activation'}):")
    shown = init_study.spread_indices(len(study.layers), 8)
    for other in others:
        stds = " ".join(f"{other.layers[i].std:>9.3g}" for i in shown)
        print(f"  {other.init:<7} {stds}   {', '.join(other.flags) or 'healthy'}")
    print(f"histograms: {out / 'histograms.png'}; grid: {out / 'grid.png'}")
    return 0


def _model_inputs(args):
    """(batch of normalized inputs, description) for `init --model`."""
    import numpy as np

    from dlsuite import models

    spec = models.get(args.model)
    if spec.kind != "cnn":
        raise UsageError(f"--model {args.model} is a {spec.kind} model; the init study takes a CNN (see `dlsuite models list`)")
    samples = args.samples or 32
    size = args.image_size or spec.default_input_shape[0]
    if size < spec.min_input_size:
        raise UsageError(f"--image-size {size} is too small for {args.model}, which needs at least {spec.min_input_size}")
    channels = spec.default_input_shape[2]
    if args.dataset is None:
        rng = np.random.default_rng(args.seed)
        return rng.standard_normal((samples, size, size, channels)).astype("float32"), "standard-normal"
    from dlsuite.apps.vision import datasets, pipeline

    data = datasets.load(args.dataset, seed=args.seed)
    batches = pipeline.batches(data.sources["train"], image_size=(size, size), channels=channels, batch_size=samples, training=False)
    images = np.asarray(next(iter(batches))[0], dtype="float32") / 255.0
    # Zero mean and unit variance per channel, as the classifier's Normalization layer does.
    mean, std = images.mean(axis=(0, 1, 2)), images.std(axis=(0, 1, 2)) + 1e-6
    return (images - mean) / std, f"{data.name} (normalized)"


# --- overfit ------------------------------------------------------------------------------


def _knobs(args):
    return dict(activation=args.activation, kernel_initializer=args.kernel_initializer, dropout=args.dropout,
                l2=args.l2, batch_norm=args.batch_norm)


def run_overfit(args):
    from dlsuite.apps.diagnose import overfit_check, setup as diagnose_setup
    from dlsuite.apps.core import rundir

    setup = diagnose_setup.prepare(args.model, args.dataset, seed=args.seed, image_size_override=args.image_size,
                                   **_knobs(args))
    if args.samples > setup.data.sizes["train"]:
        raise UsageError(f"--samples {args.samples} is more than the {setup.data.sizes['train']} training images of "
                         f"{setup.data.name}; pass --samples {setup.data.sizes['train']} or less")
    out = rundir.create(args.out, "diagnose")  # after every check: bad input leaves nothing
    _status(args, f"{args.model} on {args.samples} images of {setup.data.name} ({setup.image_size}x{setup.image_size}), "
                  f"{args.optimizer}, lr {'default' if args.lr is None else f'{args.lr:g}'}, up to {args.max_steps} steps")

    def progress(step, loss, accuracy):
        if step % 25 == 0:
            _status(args, f"  step {step}: loss {loss:.4f}, accuracy {accuracy:.3f}")

    result = overfit_check.overfit(setup, samples=args.samples, max_steps=args.max_steps, optimizer=args.optimizer,
                                   lr=args.lr, seed=args.seed, on_step=progress)
    overfit_check.plot(result, out / "overfit.png", title=f"{args.model}: overfitting {args.samples} images")
    rundir.write_json(out / "overfit.json", result.to_json())
    if args.json:
        print(json.dumps({**result.to_json(), "plot": str(out / "overfit.png")}))
    elif result.reached:
        print(f"reached 100% training accuracy on {args.samples} images in {result.steps} steps "
              f"(loss {result.loss[-1]:.4f}): the model and its training can learn; plot {out / 'overfit.png'}")
    else:
        print(f"could not reach 100% on {args.samples} images in {result.steps} steps: best accuracy "
              f"{max(result.accuracy):.3f} (step {result.accuracy.index(max(result.accuracy)) + 1}), "
              f"loss {result.loss[0]:.4g} -> {result.loss[-1]:.4g}")
        print("likely causes:")
        for cause in result.causes:
            print(f"  - {cause}")
        print(f"plot: {out / 'overfit.png'}")
    return 0 if result.reached else 1


# --- lr-range -----------------------------------------------------------------------------


def run_lr_range(args):
    from dlsuite.apps.diagnose import lr_range, setup as diagnose_setup
    from dlsuite.apps.core import rundir

    if args.min_lr >= args.max_lr:
        raise UsageError(f"--min-lr {args.min_lr:g} must be below --max-lr {args.max_lr:g}; e.g. --min-lr 1e-7 --max-lr 10")
    if args.steps < 10:
        raise UsageError(f"--steps {args.steps} is too few to see the loss curve; pass --steps 50 or more")
    clip_norm = args.clip_norm
    if args.model in LANGUAGE_MODEL_CELLS:
        setup = diagnose_setup.prepare_language_model(args.model, text=args.text, layers=args.layers, units=args.units,
                                                      seq_len=args.seq_len, max_chars=args.max_chars, seed=args.seed)
        clip_norm = 5.0 if clip_norm is None else clip_norm
        examples = "training windows"
    else:
        setup = diagnose_setup.prepare(args.model, args.dataset, seed=args.seed, image_size_override=args.image_size,
                                       **_knobs(args))
        examples = "training images"
    if args.batch_size > setup.train_examples:
        raise UsageError(f"--batch-size {args.batch_size} is larger than the {setup.train_examples} {examples}")
    out = rundir.create(args.out, "diagnose")
    _status(args, f"{args.model} on {setup.name}, {args.optimizer}: lr {args.min_lr:g} -> {args.max_lr:g} "
                  f"over {args.steps} steps of batch {args.batch_size}")

    def progress(step, rate, loss):
        if step % 25 == 0:
            _status(args, f"  step {step}: lr {rate:.3g}, loss {loss:.4f}")

    result = lr_range.lr_range(setup, optimizer=args.optimizer, min_lr=args.min_lr, max_lr=args.max_lr,
                               steps=args.steps, batch_size=args.batch_size, clip_norm=clip_norm, seed=args.seed,
                               on_step=progress)
    lr_range.plot(result, out / "lr_range.png", title=f"{args.model} on {setup.name}, {args.optimizer}")
    lr_range.write_csv(result, out / "lr_range.csv")
    command = setup.train_command(**({} if args.model in LANGUAGE_MODEL_CELLS else
                                     {"model": args.model, "dataset": args.dataset}),
                                  optimizer=args.optimizer, **{"batch-size": args.batch_size}, lr=f"{result.suggestion:.2g}")
    if args.json:
        print(json.dumps({**result.to_json(), "command": command, "plot": str(out / "lr_range.png")}))
        return 0
    print(f"sweep ended: {result.stopped} after {len(result.lrs)} steps")
    print(f"lowest smoothed loss {min(result.smoothed):.4f} at lr {result.min_loss_lr:.3g}; steepest fall at lr "
          f"{result.steepest_lr:.3g}")
    print(f"suggested learning rate: {result.suggestion:.2g} (a tenth of {result.min_loss_lr:.2g})")
    print(f"train with: {command}")
    print(f"plot: {out / 'lr_range.png'}; values: {out / 'lr_range.csv'}")
    return 0


# --- run (curve doctor) -------------------------------------------------------------------


def run_doctor(args):
    from dlsuite.apps.diagnose import curve_doctor
    from dlsuite.apps.core import rundir

    history, label, run_dir = curve_doctor.read_run(args.run_dir)
    findings = curve_doctor.diagnose(history, **curve_doctor.read_context(run_dir))
    out = rundir.create(args.out or run_dir, "diagnose")
    curve_doctor.plot(history, findings, out / "diagnosis.png", title=label)
    rundir.write_json(out / "diagnosis.json", {"run": label, "findings": [f.to_json() for f in findings]})
    if args.json:
        print(json.dumps({"run": label, "epochs": len(history["loss"]), "findings": [f.to_json() for f in findings],
                          "plot": str(out / "diagnosis.png")}))
        return 0
    print(f"{label}: {len(history['loss'])} epochs ({', '.join(history)})")
    for finding in findings:
        print(f"{finding.name}: {finding.summary}")
        print(f"  evidence: {finding.evidence}")
        for remedy in finding.remedies:
            print(f"  - {remedy}")
    print(f"picture: {out / 'diagnosis.png'}")
    return 0


# --- memory -------------------------------------------------------------------------------


def run_memory(args):
    from dlsuite import models
    from dlsuite.apps.diagnose import memory_probe
    from dlsuite.models import summary

    spec = models.get(args.name)
    if spec.kind != "cnn":
        raise UsageError(f"{args.name} is a {spec.kind} model; `diagnose memory` measures CNNs "
                         "(`dlsuite models show` still estimates it)")
    shape = train_args.parse_input_shape(args.input_shape, "cnn") if args.input_shape else tuple(spec.default_input_shape)
    if min(shape[:2]) < spec.min_input_size:
        raise UsageError(f"--input-shape {args.input_shape} is too small for {args.name}, which needs at least "
                         f"{spec.min_input_size}x{spec.min_input_size}")
    kwargs = {"input_shape": shape, **({"classes": args.classes} if args.classes else {})}
    with summary.shapes_only():
        model = spec.builder(**kwargs)
    estimate = summary.memory(model, batch_size=args.batch_size, optimizer=args.optimizer)
    classes = model.output_shape[-1]
    _status(args, f"measuring {args.name} ({'x'.join(map(str, shape))}, {classes} classes), batch {args.batch_size}, "
                  f"{args.optimizer}: a fresh process builds it, runs 1 warm-up and {memory_probe.MEASURED_STEPS} "
                  "measured steps...")
    try:
        measured = memory_probe.measure(args.name, batch_size=args.batch_size, optimizer=args.optimizer,
                                        input_shape=shape, classes=args.classes, classes_count=classes)
    except memory_probe.MeasurementError as error:
        print(f"dlsuite: {error}", file=sys.stderr)
        return 1
    rows = memory_probe.compare(estimate, measured)
    if args.json:
        print(json.dumps({"name": args.name, "input_shape": list(shape), "batch_size": args.batch_size,
                          "optimizer": args.optimizer, "estimate": estimate, "measured": measured, "rows": rows}))
        return 0
    shape_option = (f" --input-shape {args.input_shape}" if args.input_shape else "") + (
        f" --classes {args.classes}" if args.classes else "")
    print(f"{'':<34} {'estimate':>11} {'measured':>11} {'difference':>10}")
    for row in rows:
        print(f"{row['what']:<34} {_mib(row['estimate']):>11} {_mib(row['measured']):>11} {row['difference']:>+10.0%}")
    print(f"measured: {measured['meter']}; the step peak is the highest of {len(measured['steps'])} steps "
          f"({', '.join(_mib(v) for v in measured['steps'])})")
    print(f"estimate: weights {_mib(estimate['weights'])}, optimizer {_mib(estimate['optimizer'])}, framework "
          f"{_mib(estimate['framework'])}; at the peak gradients {_mib(estimate['gradients'])}, activations "
          f"{_mib(estimate['activations'])}, workspace {_mib(estimate['workspace'])} "
          f"(`dlsuite models show {args.name}{shape_option} --batch-size {args.batch_size} --optimizer {args.optimizer}`)")
    return 0


def _mib(value):
    return f"{value / 2**20:.2f} MiB"


# --- features -----------------------------------------------------------------------------


def run_features(args):
    from dlsuite.apps.core import rundir
    from dlsuite.apps.diagnose import features

    network = features.load_network(args.model, weights=args.weights, input_size=args.input_size,
                                    trust_model=args.trust_model)  # every check before the output folder: bad input leaves nothing
    layers = features.choose_layers(network, args.layer)
    image = features.load_image(network, args.image) if args.image else None
    images = features.load_images(network, folder=args.images, max_images=args.max_images, image=image)
    image = images.pixels[0] if image is None else image
    out = rundir.create(args.out, "features")
    print(f"{network.source}: layers {', '.join(layers)}; top {args.top_k} patches of {args.units} units over "
          f"{images.source}", flush=True)
    index = features.write_report(network, images, image, layers=layers, units=args.units, top_k=args.top_k, out=out,
                                  image_label=args.image or "the first image of the set")
    print(index)
    return 0
