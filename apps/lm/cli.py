"""`dlsuite lm`: the command line of training character- or word-level
language models (`task.LanguageModelTask` through the shared lifecycle), and
of generating, evaluating and embedding with their exports."""

import argparse
import json
import os
import sys

from dlsuite.apps.core import train_args
from dlsuite.apps.core.errors import UsageError
from dlsuite.apps.lm.task import LanguageModelTask, LMConfig, perplexity_figures

CELLS = ("lstm", "gru", "rnn", "bilstm")
LEVELS = ("char", "word")

DEFAULT_LR = 0.003

EPILOG_TRAIN = f"""the default run stops by itself: {LMConfig.epochs} epochs (--epochs) while the rate decays from {DEFAULT_LR} to 0
along a cosine (--lr-schedule cosine). On 2 CPU cores and 1,000,000 characters that is about
12 minutes and a validation loss of about 1.46 nats/char on the docstrings; --epochs N is the
same recipe over N epochs (docs/lm.md, "The default run").

examples:
  dlsuite lm train                                   # 2x512 char LSTM on the standard library's docstrings
  dlsuite lm train --text book.txt --cell gru --units 256 --epochs 5
  dlsuite lm train --dataset tfds:tiny_shakespeare --seq-len 200
  dlsuite lm train --level word --text news.txt --units 256
  dlsuite lm train --cell rnn --irnn --clip-norm 1    # IRNN: identity recurrent init, ReLU
  dlsuite lm train --cell bilstm                      # ELMo-style biLM, then `dlsuite lm embed`
"""


def max_chars_type(text):
    """argparse type of --max-chars: a number of characters, or 0 for the whole text."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of characters, or 0 for the whole text, received {text!r}")
    return value


def add_data_arguments(group, *, max_chars=1_000_000):
    """Adds the options that choose the text to `group` (`lm train`, `tune lm`)."""
    source = group.add_mutually_exclusive_group()
    source.add_argument("--text", help="a UTF-8 text file (default: the Python standard library's docstrings, gathered offline)")
    source.add_argument("--dataset", help="tfds:NAME, a TensorFlow Datasets text set, e.g. tfds:tiny_shakespeare")
    group.add_argument("--data-dir", help="tfds: where TensorFlow Datasets keeps its files")
    group.add_argument("--max-chars", type=max_chars_type, default=max_chars,
                       help=f"use the first this many characters; 0: all of them (default {max_chars:,})")
    group.add_argument("--token-cache", metavar="DIR",
                       help="where a --text file's token file goes, encoded once and reused by later runs "
                            "(default ~/.cache/dlsuite/tokens, or $XDG_CACHE_HOME/dlsuite/tokens)")
    group.add_argument("--level", choices=LEVELS, default="char")
    group.add_argument("--max-tokens", type=train_args.positive_int, help="vocabulary size cap (word default 20000)")
    group.add_argument("--validation-fraction", type=float, default=0.1, help="the last part of the text, by position (default 0.1)")


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "lm", help="language modeling: train, generate, evaluate, embed",
        epilog="examples:\n  dlsuite lm train\n  dlsuite lm generate saved_models/lstm_stdlib-docstrings --prompt 'Return the '\n"
               "  dlsuite lm evaluate saved_models/lstm_stdlib-docstrings --text book.txt\n"
               "  dlsuite lm embed saved_models/bilstm_stdlib-docstrings --text notes.txt --out notes.npz",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="lm_command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a language model, report perplexity, export",
                                epilog=EPILOG_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(train.add_argument_group("data"))
    model = train.add_argument_group("model")
    model.add_argument("--cell", choices=CELLS, default="lstm", help="lstm (forget-gate bias 1), gru, rnn, or bilstm (ELMo-style biLM)")
    model.add_argument("--layers", type=train_args.positive_int, default=2)
    model.add_argument("--units", type=train_args.positive_int, default=512)
    model.add_argument("--embedding", type=train_args.positive_int, default=64)
    model.add_argument("--seq-len", type=train_args.positive_int, default=100, help="tokens per training sequence (default 100)")
    model.add_argument("--dropout", type=float, default=LMConfig.dropout,
                       help=f"rate of the dropout after each recurrent layer (default {LMConfig.dropout})")
    model.add_argument("--irnn", action="store_true", help="--cell rnn only: identity recurrent init and ReLU (Le et al., 2015)")
    train_args.add_training_arguments(train, app="lm", epochs=LMConfig.epochs, clip_norm=5.0, batch_size=64, lr=DEFAULT_LR,
                                      lr_schedule="cosine", export_default="<cell>_<corpus>")
    train.set_defaults(func=run_train)

    generate = commands.add_parser("generate", help="stream generated text from an export",
                                   epilog="example:\n  dlsuite lm generate saved_models/lstm_stdlib-docstrings --prompt 'The ' --length 300 --temperature 0.7 --seed 1",
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    generate.add_argument("saved_model")
    generate.add_argument("--prompt", default="")
    generate.add_argument("--length", type=int, default=500, help="tokens to generate (default 500)")
    generate.add_argument("--temperature", type=float, default=0.8)
    generate.add_argument("--top-k", type=int, help="sample among the K most likely tokens only")
    generate.add_argument("--seed", type=int, default=0)
    train_args.add_trust_model_argument(generate)
    generate.set_defaults(func=run_generate)

    evaluate = commands.add_parser("evaluate", help="loss, perplexity and bits per character of an export on a text",
                                   epilog="example:\n  dlsuite lm evaluate saved_models/lstm_stdlib-docstrings --text book.txt",
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluate.add_argument("saved_model")
    evaluate.add_argument("--text", required=True)
    evaluate.add_argument("--json", action="store_true")
    train_args.add_trust_model_argument(evaluate)
    evaluate.set_defaults(func=run_evaluate)

    embed = commands.add_parser("embed", help="contextual embeddings of a text from a biLM export",
                                epilog="example:\n  dlsuite lm embed saved_models/bilstm_stdlib-docstrings --text notes.txt --out notes.npz",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    embed.add_argument("saved_model")
    embed.add_argument("--text", required=True)
    embed.add_argument("--out", required=True, help="an .npz file: tokens and embeddings (tokens, 2 x units)")
    train_args.add_trust_model_argument(embed)
    embed.set_defaults(func=run_embed)


def run_train(args):
    from dlsuite.apps.core import lifecycle

    return lifecycle.run_from_args(LanguageModelTask, args)


def _load_export(args):
    """The export at args.saved_model, in a TensorFlow set up as the lm app runs."""
    from dlsuite.apps.core import engine
    from dlsuite.apps.lm import export as lm_export

    engine.set_intra_op_threads(LanguageModelTask.intra_op_threads())  # before TensorFlow starts
    return lm_export.ExportedLanguageModel.load(args.saved_model, trust_model=args.trust_model)


def run_generate(args):
    if args.length <= 0:
        raise UsageError(f"--length must be > 0 tokens, received {args.length}")
    if args.temperature <= 0:
        raise UsageError(f"--temperature must be > 0, received {args.temperature}; 0.8 is typical, lower is more conservative")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1, received {args.top_k}")
    served = _load_export(args)
    unknown = served.vocabulary.unknown_count(args.prompt)
    if unknown:
        unit = "characters" if served.vocabulary.level == "char" else "words"
        print(f"warning: {unknown} prompt {unit} are not in the vocabulary; they read as [UNK]", file=sys.stderr)
    sys.stdout.write(args.prompt)
    for piece in served.stream(args.prompt, length=args.length, temperature=args.temperature, top_k=args.top_k, seed=args.seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def run_evaluate(args):
    from dlsuite.apps.lm import text

    served = _load_export(args)
    _, content = text.load_text(args.text)
    loss_sum, tokens = served.score(content)
    if tokens < 1:
        raise UsageError(f"{args.text!r} has fewer than two tokens to score")
    figures = perplexity_figures(loss_sum / tokens, tokens=tokens, characters=len(content))
    figures = {"text": args.text, "tokens": int(tokens), "characters": len(content), **figures}
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"{args.text}: {tokens} tokens, loss {figures['validation_loss']:.4f} nats/token, perplexity "
              f"{figures['validation_perplexity']:.2f}, {figures['bits_per_character']:.3f} bits/char")
    return 0


def run_embed(args):
    import numpy as np

    from dlsuite.apps.core import outputs
    from dlsuite.apps.lm import text

    out = outputs.check_file(args.out, option="out", suffix=".npz")  # before the work, which an unwritable path would waste
    served = _load_export(args)
    if not served.can_embed:
        raise UsageError(f"{args.saved_model!r} is a one-direction language model; embeddings come from a biLM "
                         "(train one with `dlsuite lm train --cell bilstm`)")
    _, content = text.load_text(args.text)
    tokens, embeddings = served.embed(content)
    temporary = out.with_name(f".{out.stem}.tmp.npz")
    np.savez(temporary, tokens=np.asarray(tokens), embeddings=embeddings)
    os.replace(temporary, out)
    print(f"{len(tokens)} tokens x {embeddings.shape[-1]} dimensions -> {out}")
    return 0
