"""`dlsuite models`: list the registered models, or show one's layers and costs.

`list` builds every registered model at its default input shape to count its
parameters; `show` builds one and prints its layer table (output shapes,
parameters, receptive fields, FLOPs) and what training it would cost in
memory for a batch size and an optimizer.
"""

import argparse
import json

from dlsuite.apps.core import choices, train_args
from dlsuite.apps.core.errors import UsageError

# Time steps assumed when a sequence model's default input leaves the length
# open; FLOPs and activations grow linearly with it.
DEFAULT_TIME_STEPS = 100

EPILOG_MODELS = """examples:
  dlsuite models list
  dlsuite models list --kind rnn --json
  dlsuite models show lenet5
  dlsuite models show resnet18 --input-shape 64,64,3 --classes 10 --batch-size 128
  dlsuite models show vgg16 --optimizer sgd --json
  dlsuite models show lstm --input-shape 35
  dlsuite models show vgg16 --model-parallel 2
"""

EPILOG_LIST = """examples:
  dlsuite models list
  dlsuite models list --family resnet
  dlsuite models list --json
"""

EPILOG_SHOW = f"""--input-shape is H,W,C for image models (e.g. 224,224,3) and T or T,F for
sequence models: T time steps of token ids, or of F float features (e.g. 35 or
100,8). Sequence models default to T={DEFAULT_TIME_STEPS}.

examples:
  dlsuite models show lenet5
  dlsuite models show resnet50 --batch-size 64 --optimizer sgd
  dlsuite models show resnet18 --input-shape 64,64,3 --classes 10
  dlsuite models show gru --input-shape 35 --classes 10000 --json
  dlsuite models show vgg16 --model-parallel 2    # which layers on which device, memory per device
"""


def add_parser(subparsers):
    """Adds `models list` and `models show` to the `dlsuite` subparsers."""
    parser = subparsers.add_parser(
        "models",
        help="list the registered models or show one's layers and costs",
        description="List the registered models, or show one's layer table, FLOPs\n"
        "and training memory.",
        epilog=EPILOG_MODELS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    list_parser = commands.add_parser(
        "list",
        help="every registered model with its family, input shape and parameters",
        description="List every registered model, built at its default input shape\n"
        "to count its parameters.",
        epilog=EPILOG_LIST,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    list_parser.add_argument("--family", help="only this family, e.g. resnet")
    list_parser.add_argument("--kind", choices=("cnn", "rnn"), help="only image or sequence models")
    list_parser.add_argument("--json", action="store_true", help="print one JSON array")
    list_parser.set_defaults(func=run_list)

    show_parser = commands.add_parser(
        "show",
        help="layer table, receptive fields, FLOPs and memory of one model",
        description="Build one model and show its layers (output shape, parameters,\n"
        "receptive field, FLOPs), its totals and the memory training it needs.",
        epilog=EPILOG_SHOW,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show_parser.add_argument("name", metavar="NAME", help="a name from `dlsuite models list`")
    show_parser.add_argument(
        "--input-shape", metavar="SHAPE", help="H,W,C for images; T or T,F for sequences"
    )
    show_parser.add_argument("--classes", type=int, help="output classes (builder default)")
    show_parser.add_argument(
        "--batch-size", type=int, default=32, help="examples per step for memory (default 32)"
    )
    show_parser.add_argument(
        "--optimizer", choices=choices.OPTIMIZERS, default="adam",
        help="sets the optimizer slots counted in memory (default adam)",
    )
    show_parser.add_argument(
        "--model-parallel", type=int, metavar="N",
        help="split the layers into N pipeline stages, one device each, balanced by memory; "
             "print each device's layers and memory",
    )
    show_parser.add_argument("--json", action="store_true", help="print one JSON object")
    show_parser.set_defaults(func=run_show)


def _specs(family=None, kind=None):
    from dlsuite import models

    specs = [models.get(name) for name in models.names(family=family, kind=kind)]
    if not specs:
        raise UsageError(
            f"No models match family={family!r} kind={kind!r}; "
            f"families: {', '.join(sorted({models.get(n).family for n in models.names()}))}."
        )
    return specs


def _count_params(spec):
    from dlsuite.models import summary

    # Shapes only: counting needs no weight values, and skipping the
    # initializers lists all models in seconds rather than a minute.
    with summary.shapes_only():
        return spec.builder(input_shape=spec.default_input_shape).count_params()


def run_list(args):
    """`dlsuite models list`."""
    rows = [
        {
            "name": spec.name,
            "family": spec.family,
            "kind": spec.kind,
            "default_input_shape": list(spec.default_input_shape),
            "min_input_size": spec.min_input_size,
            "params": _count_params(spec),
            "description": spec.description,
        }
        for spec in _specs(family=args.family, kind=args.kind)
    ]
    if args.json:
        print(json.dumps(rows))
        return
    table = [("Name", "Family", "Kind", "Input", "Params", "Description")]
    table += [
        (
            row["name"], row["family"], row["kind"],
            _shape_text(row["default_input_shape"]), f"{row['params']:,}", row["description"],
        )
        for row in rows
    ]
    _print_table(table, right_aligned={4})


def _check_positive(option, value):
    if value is not None and value < 1:
        raise UsageError(f"{option} must be an integer >= 1, received {value}.")


def run_show(args):
    """`dlsuite models show NAME`."""
    from dlsuite import models
    from dlsuite.models import summary

    spec = models.get(args.name)
    _check_positive("--classes", args.classes)
    _check_positive("--batch-size", args.batch_size)
    note = None
    if args.input_shape is None:
        input_shape = spec.default_input_shape
        if spec.kind == "rnn" and input_shape[0] is None:
            input_shape = (DEFAULT_TIME_STEPS,) + tuple(input_shape[1:])
            note = (f"{DEFAULT_TIME_STEPS} time steps assumed; FLOPs and activations "
                    "scale with them (set with --input-shape T).")
    else:
        input_shape = train_args.parse_input_shape(args.input_shape, spec.kind)
    kwargs = {"input_shape": input_shape}
    if args.classes is not None:
        kwargs["classes"] = args.classes
    with summary.shapes_only():  # the analysis reads shapes, never weight values
        model = spec.builder(**kwargs)
    info = summary.describe(model, batch_size=args.batch_size, optimizer=args.optimizer)
    info = {"name": spec.name, "family": spec.family, "kind": spec.kind, **info}
    if args.model_parallel is not None:
        info["model_parallel"] = _model_parallel(model, args)
    if args.json:
        print(json.dumps(info))
        return
    _print_show(info, note)
    if args.model_parallel is not None:
        _print_model_parallel(info["model_parallel"])


def _model_parallel(model, args):
    from dlsuite.models import parallel

    try:
        return parallel.plan(model, args.model_parallel, batch_size=args.batch_size,
                             optimizer=args.optimizer).describe()
    except ValueError as error:  # models.errors.ArgumentError: the range of N
        raise UsageError(str(error).replace("model_parallel", "--model-parallel", 1)) from None


def _print_model_parallel(plan):
    stages = plan["stages"]
    print()
    print(f"Model parallel, {len(stages)} devices (pipeline stages, batch {plan['batch_size']}, "
          f"{plan['optimizer']}):")
    table = [("Device", "Layers", "Params", "Weights+slots", "Activations", "Peak")]
    for index, stage in enumerate(stages):
        memory = stage["memory"]
        table.append((
            str(index), f"{stage['first']} .. {stage['last']} ({len(stage['layers'])})", f"{stage['params']:,}",
            _bytes_text(memory["weights"] + memory["optimizer"]), _bytes_text(memory["activations"]),
            _bytes_text(memory["total"]),
        ))
    _print_table(table, right_aligned={2, 3, 4, 5})
    print(f"Largest device {_bytes_text(plan['largest'])}, against {_bytes_text(plan['single_device'])} "
          "on one device; each device's peak as `models show` counts a whole model's.")


def _print_show(info, note=None):
    from dlsuite.models import summary

    print(
        f"{info['name']} ({info['family']}, {info['kind']}): input "
        f"{_shape_text(info['input_shape'])} -> output {_shape_text(info['output_shape'])}"
    )
    if note:
        print(note)
    print()
    # Receptive fields are about images; sequence models would show only dashes.
    spatial = info["kind"] == "cnn"
    header = ("Layer (type)", "Output shape", "Params") + (("RF", "Jump") if spatial else ())
    table = [header + ("FLOPs",)]
    for layer in info["layers"]:
        fields = (
            (_field_text(layer["receptive_field"]), _field_text(layer["jump"])) if spatial else ()
        )
        table.append((
            f"{layer['name']} ({layer['class']})",
            _shape_text(layer["output_shape"]),
            f"{layer['params']:,}",
            *fields,
            _count_text(layer["flops"]),
        ))
    _print_table(table, right_aligned={2, len(header)})
    print()
    print(
        f"Parameters:     {info['params']:,} (trainable {info['trainable_params']:,}, "
        f"non-trainable {info['non_trainable_params']:,})"
    )
    print(f"FLOPs/example:  {_count_text(info['flops'])} (2 x multiply-adds, forward pass)")
    memory = info["memory"]
    slots = summary.OPTIMIZER_SLOTS[info["optimizer"]]
    print(f"Training memory, batch {info['batch_size']}, {info['optimizer']}:")
    explanations = {
        "weights": "all parameters",
        "gradients": "weight gradients alive at the peak (those of the last 3 layers backprop passed)",
        "optimizer": f"{slots} slot(s) per trainable parameter",
        "activations": f"layer outputs backprop still needs at the peak x batch {info['batch_size']}",
        "workspace": "gradients flowing between layers, update temporaries",
        "framework": "Keras/TensorFlow bookkeeping, about 44 KiB per variable",
        "total": "peak of a training step",
    }
    for key, explanation in explanations.items():
        print(f"  {key:<12} {_bytes_text(memory[key]):>10}  {explanation}".rstrip())
    if spatial:
        print("RF: receptive field, input pixels per side; Jump: input pixels between "
              "neighbouring outputs.")


def _print_table(rows, right_aligned=()):
    widths = [max(len(str(row[col])) for row in rows) for col in range(len(rows[0]))]
    for index, row in enumerate(rows):
        cells = [
            str(cell).rjust(width) if col in right_aligned else str(cell).ljust(width)
            for col, (cell, width) in enumerate(zip(row, widths))
        ]
        print("  ".join(cells).rstrip())
        if index == 0:
            print("  ".join("-" * width for width in widths))


def _shape_text(shape):
    if shape and isinstance(shape[0], (list, tuple)):
        return ", ".join(_shape_text(one) for one in shape)
    return str(tuple(shape))


def _field_text(value):
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if len(set(value)) == 1:
        return str(value[0])
    return "x".join(str(size) for size in value)


def _count_text(count):
    if count is None:
        return "?"
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if count >= factor:
            return f"{count / factor:.2f}{suffix}"
    return str(count)


def _bytes_text(count):
    for factor, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if count >= factor:
            return f"{count / factor:.1f} {suffix}"
    return f"{count} B"
