"""The predict step REST and gRPC share: find the signature, run it, map the graph's refusal.

Both protocols turn their request into {input: np.ndarray} (`tensors` from
JSON, `grpc_server` from TensorProtos), then come here, and both run this on
the server's worker threads (`server.Server.offload`), never on the event
loop: TensorFlow releases the GIL while it computes, so a slow graph does
not hold up other requests. With `--enable-batching` the call goes through
a `batching.Batcher`, which joins concurrent calls into one and runs them on
its batch threads while this worker thread waits; its refusals and the
graph's are mapped here the same way.
"""

import re

import tensorflow as tf

from dlsuite.apps.serve.errors import ServingError, invalid
from dlsuite.apps.serve.repository import op_error_name


def run_signature(served, signature_name, arrays, *, hint="", batcher=None):
    """Runs a signature of a loaded version on {input: np.ndarray}, as TensorFlow Serving's session would.

    The arrays go to the graph in the request's shape, not held to the
    signature's: TensorFlow Serving feeds them to the session and the graph
    accepts or refuses (issue #26). A restored signature (TF 2.21:
    load._WrapperFunction for a TF2 SavedModel, the pruned WrappedFunction of
    a TF1 one) checks only the dtypes, so the refusal is the graph's own, an
    OpError from its kernel.

    Args:
        served: a `repository.Version`.
        signature_name: a key of `served.signatures` (the caller checked it).
        arrays: {input name: np.ndarray}, each of the input's dtype.
        hint: words appended to a refusal (REST: use the columnar format).
        batcher: a `batching.Batcher` to join the call with concurrent ones
            (`--enable-batching`), or None to call the signature at once.

    Returns:
        {output name: np.ndarray}.

    Raises:
        ServingError: the graph's refusal with its canonical code (usually
            INVALID_ARGUMENT), or the function's refusal of the arguments;
            the batcher's UNAVAILABLE for a full queue, INVALID_ARGUMENT for
            a request over its max_batch_size.
    """
    try:
        if batcher is not None:
            return batcher.run(served, signature_name, arrays)
        return served.predict(signature_name, arrays)
    except tf.errors.OpError as error:  # e.g. a shape the graph cannot take, bytes that are not an image
        raise ServingError(op_message(error) + hint, code=op_error_name(error)) from None
    except (TypeError, ValueError) as error:  # the function refused the arguments
        raise invalid(" ".join(str(error).split()) + hint) from None


def op_message(error):
    """The kernel's own words, as TensorFlow Serving's session would give them.

    Eager adds "Graph execution error:", "Detected at node N defined at ...:"
    with the stack (or "<stack traces unavailable>"), and appends the graph
    node ("\n\t [[{{node ...}}]]") and " [Op:...]": noise to a client.
    """
    message = error.message.split("\n\t [[")[0]
    lines = message.split("\n")
    if lines and lines[0].strip() == "Graph execution error:":
        lines = lines[1:]
    for index, line in enumerate(lines):
        if line.startswith("Detected at node "):  # the traceback lines are indented or blank
            rest = lines[index + 1:]
            while rest and (not rest[0].strip() or rest[0][0].isspace() or rest[0] == "<stack traces unavailable>"):
                rest = rest[1:]
            lines = lines[:index] + rest
            break
    return re.sub(r"\s*\[Op:[^\]]*\]$", "", " ".join(" ".join(lines).split())) or error.message
