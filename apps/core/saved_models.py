"""SavedModels given by the user: read, scanned and loaded, with one-line errors.

A SavedModel is a program: its signatures can read and write files. Before
any command runs one that this process did not write, `load` reads its
`saved_model.pb` (a protobuf parse; nothing runs), refuses the operations
TensorFlow's own `saved_model_cli scan` denylists unless the caller trusts
the model, checks that the signatures the command needs are there and that
this TensorFlow has every operation it uses, and only then loads it.

Every failure is a `UsageError` naming the path, what is wrong with it and
what to do: a garbage or empty `saved_model.pb`, a folder without one, a
missing `variables/` folder, truncated or scrambled variables, a missing
signature. `trust_model` is the keyword of every loader that calls this
module, and the config field of the commands' `--trust-model` flag, so the
CLI names the flag in the message.
"""

import pathlib

from dlsuite.apps.core.errors import UsageError

# tensorflow/python/tools/saved_model_cli.py, _OP_DENYLIST (TensorFlow 2.21):
# what `saved_model_cli scan` reports. ReadFile and WriteFile reach any path
# the process can; PrintV2 can write to a file too (output_stream="file://...").
DENYLIST = frozenset({"ReadFile", "WriteFile", "PrintV2"})

GRAPH_FILE = "saved_model.pb"
TEXT_GRAPH_FILE = "saved_model.pbtxt"


def read(path):
    """The `SavedModel` protobuf of the folder `path`, parsed and not loaded.

    Raises:
        UsageError: not a folder, no saved_model.pb(txt), unreadable, not a
            SavedModel protobuf, or one without a MetaGraph.
    """
    from google.protobuf import message, text_format
    from tensorflow.core.protobuf import saved_model_pb2

    path = pathlib.Path(path)
    if not path.is_dir():
        raise UsageError(f"{path} is not a folder; pass a SavedModel folder (saved_models/NAME or "
                         "saved_models/NAME/VERSION)")
    binary, text = path / GRAPH_FILE, path / TEXT_GRAPH_FILE
    graph_file = binary if binary.exists() or not text.exists() else text
    proto = saved_model_pb2.SavedModel()
    try:
        contents = graph_file.read_bytes()
        if graph_file is text:
            text_format.Parse(contents.decode("utf-8"), proto)
        else:
            proto.ParseFromString(contents)
    except FileNotFoundError:
        raise UsageError(f"{path} is not a SavedModel (it holds no {GRAPH_FILE}); pass the folder an export "
                         "wrote (saved_models/NAME or saved_models/NAME/VERSION)") from None
    except OSError as error:
        raise UsageError(f"cannot read {graph_file}: {error.strerror or error}") from None
    except (message.DecodeError, text_format.ParseError, UnicodeDecodeError):
        raise UsageError(f"{graph_file} is not a SavedModel graph (it does not parse: truncated, corrupt or "
                         "another kind of file); export the model again or copy the whole folder") from None
    if not proto.meta_graphs:
        raise UsageError(f"{graph_file} holds no MetaGraph (an empty or foreign file); export the model again "
                         "or copy the whole folder")
    return proto


def meta_graph(proto, path):
    """The MetaGraph a load uses: the only one, else the one tagged "serve" (as TensorFlow Serving picks)."""
    graphs = list(proto.meta_graphs)
    if len(graphs) == 1:
        return graphs[0]
    serving = [graph for graph in graphs if "serve" in graph.meta_info_def.tags]
    if not serving:
        tag_sets = sorted(",".join(graph.meta_info_def.tags) or "(none)" for graph in graphs)
        raise UsageError(f"{path} holds {len(graphs)} MetaGraphs and none is tagged serve (tag sets: "
                         f"{'; '.join(tag_sets)}); export it with the serve tag")
    return serving[0]


def ops_used(graph):
    """The op names of a MetaGraph: its graph_def's nodes and every node of every library function."""
    graph_def = graph.graph_def
    ops = {node.op for node in graph_def.node}
    for function in graph_def.library.function:
        ops.update(node.op for node in function.node_def)
    return ops


def denylisted_ops(proto):
    """The sorted `DENYLIST` ops any MetaGraph of `proto` uses."""
    return sorted(set().union(*(ops_used(graph) for graph in proto.meta_graphs)) & DENYLIST)


def check(path, *, trust_model=False, signatures=()):
    """Everything about the SavedModel at `path` that needs no load; returns the MetaGraph to load.

    Args:
        path: the version folder (holding saved_model.pb).
        trust_model: run the denylisted operations too.
        signatures: the signature names the caller needs.

    Raises:
        UsageError: an unreadable graph, a denylisted operation (unless
            trusted), an operation this TensorFlow lacks, a missing
            signature, or no variables/ folder.
    """
    from tensorflow.python.framework import op_def_registry

    path = pathlib.Path(path)
    proto = read(path)
    found = denylisted_ops(proto)
    if found and not trust_model:
        raise UsageError(f"{path / GRAPH_FILE} runs {', '.join(found)}: operations that read or write files or "
                         "print (a SavedModel is a program, and these are what `saved_model_cli scan` flags); "
                         "pass trust_model if you trust the model and where it came from", option=("trust_model",))
    graph = meta_graph(proto, path)
    functions = {function.signature.name for function in graph.graph_def.library.function}
    unknown = sorted(op for op in ops_used(graph) if op not in functions and op_def_registry.get(op) is None)
    if unknown:
        raise UsageError(f"{path / GRAPH_FILE} uses operations this TensorFlow does not have ({', '.join(unknown[:5])}"
                         f"{', ...' if len(unknown) > 5 else ''}); load it where the library that defines them "
                         "is installed, or export it with standard operations")
    if not (path / "variables").is_dir():
        raise UsageError(f"{path} has no variables/ folder (an incomplete copy?); copy the whole SavedModel folder "
                         "or export it again")
    missing = [name for name in signatures if name not in graph.signature_def]
    if missing:
        have = ", ".join(sorted(name for name in graph.signature_def if not name.startswith("__"))) or "none"
        raise UsageError(f"{path} lacks the signatures {', '.join(missing)} (it has: {have}); pass a model this "
                         "command's app exported, or export it again")
    return graph


# What a damaged variables/ folder raises, in loading or reading it: NotFoundError
# (an OpError; an OSError from tf.saved_model.load) for a missing index or data
# file, OpError for a scrambled one ("not an sstable", "Checksum does not match"),
# IndexError for a truncated data file ("Read less bytes than requested").
def _variable_errors():
    import tensorflow as tf

    return (tf.errors.OpError, OSError, IndexError)


def _unreadable_variables(path, error):
    detail = " ".join(str(error).split(". ")[0].split())[:160] or type(error).__name__
    return UsageError(f"cannot read the variables of the SavedModel {path} ({detail}): variables/ is incomplete, "
                      "truncated or corrupt; copy the whole folder again or export it again")


def check_variables(path):
    """Reads every variable of the SavedModel at `path` from its checkpoint, without loading the model:
    for checks made before any work (a search's --weights) that must find truncated files too.

    Raises:
        UsageError: variables/ is missing, incomplete, truncated or scrambled.
    """
    import tensorflow as tf

    path = pathlib.Path(path)
    try:
        reader = tf.train.load_checkpoint(str(path / "variables" / "variables"))
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except _variable_errors() as error:
        raise _unreadable_variables(path, error) from None


def load(path, *, trust_model=False, signatures=()):
    """`check`s the SavedModel at `path`, then loads it with TensorFlow.

    Returns:
        The loaded object (keep it alive while its signatures are used).

    Raises:
        UsageError: what `check` raises, or variables that cannot be read
            (missing, truncated, scrambled).
    """
    import tensorflow as tf

    path = pathlib.Path(path)
    graph = check(path, trust_model=trust_model, signatures=signatures)
    tags = list(graph.meta_info_def.tags) or None
    try:
        return tf.saved_model.load(str(path), tags=tags)
    except _variable_errors() as error:
        raise _unreadable_variables(path, error) from None
