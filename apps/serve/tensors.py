"""TensorFlow Serving's JSON for `:predict`, to NumPy arrays and back.

The rules are those of `tensorflow_serving/util/json_tensor.cc`, so that a
request either server accepts means the same thing to both:

* row format, `{"instances": [...]}`: one item per example, batched along a
  new first axis. With one named input an item is that input's value; with
  several, an object holding every input by name. Answered with
  `{"predictions": [...]}`: one value per example, or one object per example
  when the signature has several outputs (every output then needs the same
  first dimension).
* columnar format, `{"inputs": value-or-object}`: each input whole, any
  shape, batch sizes free. Answered with `{"outputs": value-or-object}`.
  Signatures with scalar inputs (the language model's `prompt`, `length`)
  can only be called this way, as with TensorFlow Serving.
* `{"b64": "..."}` is a binary value of a DT_STRING tensor; outputs whose
  name ends in `_bytes` are written that way too. A string output that is
  not UTF-8 also comes back as `{"b64": ...}` (TensorFlow Serving would write
  the raw bytes, which is not JSON).
* a long list of integers (an image's pixels: 150,528 of them at
  224x224x3) is read by NumPy from the JSON text (`DenseIntegers`), with
  JSON's grammar checked, instead of becoming Python objects first: that
  took 37-50 ms of CPU per ResNet-50 image here, against 15-20 ms, and held
  `:predict` to 0.47 of the in-process rate (benchmarks/serving_http.py).
  Anything the reader does not take goes the general way, so both ways
  accept and refuse the same requests (tests/test_serve.py compares them).
* the shape is the JSON's, not the signature's: a TF1 graph whose `x` is
  declared [-1, 1] gets `{"instances": [1.0, 2.0, 5.0]}` as shape [3], as
  TensorFlow Serving feeds it (`json_tensor.cc` takes the shape from the
  JSON, `predict_util.cc` runs the session without comparing it), and the
  graph accepts it or refuses it (issue #26). The dtype is the signature's.
* numbers keep their type: an integer input refuses 1.5 or `true`, a float
  input refuses strings; a value outside the integer type's range is refused
  rather than wrapped. NaN and Infinity are accepted and written as the
  tokens JavaScript reads. float32 outputs are written with the shortest
  digits that read back to the same float32 (0.1, not 0.10000000149011612),
  as TensorFlow Serving writes them.

Nothing here calls TensorFlow: a signature is described by `TensorSpec`s of
this module, built by `repository` from the loaded SavedModel.
"""

import base64
import binascii
import dataclasses
import json
import math
import re

import numpy as np

from dlsuite.apps.serve.errors import invalid

# float32 outputs up to this many values get the shortest round-trip digits
# (one str() per value); larger ones are written from their float64 value.
_SHORTEST_FLOAT_LIMIT = 1 << 16
# A run of JSON text this long holding only brackets, commas, digits, '-' and
# whitespace is read by `DenseIntegers`; shorter ones are cheap the general way.
_DENSE_MIN_BYTES = 4096
_DENSE_RUN = re.compile(rb"\[[-0-9,\[\] \t\n\r]{%d,}" % (_DENSE_MIN_BYTES - 1))
# What stands in for the run while the rest of the body is parsed.
_PLACEHOLDER = "\u0000dlsuite:dense-integers"
# Integers of at most this many digits: every int32 and uint32 fits, and float64 holds them exactly.
_DENSE_MAX_DIGITS = 10
_POWERS_OF_TEN = 10 ** np.arange(_DENSE_MAX_DIGITS, dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One input or output of a signature.

    Attributes:
        name: its key in the signature.
        dtype_name: TensorFlow's DataType name, "DT_FLOAT", "DT_STRING", ...
        numpy_dtype: the NumPy dtype its values take (object for DT_STRING).
        shape: the dimensions, None where unknown; None for an unknown rank.
    """

    name: str
    dtype_name: str
    numpy_dtype: object
    shape: tuple | None

    @property
    def is_string(self):
        return self.dtype_name == "DT_STRING"


def parse_request(body):
    """Returns the request object of a `:predict` body (bytes), or raises ServingError."""
    if not body or not body.strip():
        raise invalid("JSON Parse error: The document is empty")
    request = _parse_with_dense_integers(body)
    if request is not None:
        return request
    try:
        request = json.loads(body)
    except UnicodeDecodeError:
        raise invalid("JSON Parse error: the body is not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise invalid(f"JSON Parse error: {error.msg} at offset: {error.pos}") from None
    except RecursionError:
        raise invalid("JSON Parse error: the document is nested too deeply") from None
    if not isinstance(request, dict):
        raise invalid(f"JSON Value: {_short(request)} Is not object")
    signature = request.get("signature_name", "")
    if not isinstance(signature, str):
        raise invalid(f"JSON Value: {_short(request)} not formatted correctly. "
                      "'signature_name' key must be a string value.")
    if "instances" in request and "inputs" in request:
        raise invalid("Not formatted correctly: expecting only one of 'inputs' or 'instances' keys to exist, "
                      "received both")
    if "instances" not in request and "inputs" not in request:
        raise invalid("Missing 'inputs' or 'instances' key")
    return request


class DenseIntegers:
    """A long JSON list of integers read by NumPy (`_read_dense_integers`), and its text.

    `array(spec)` is the input `spec` gets from it; None where the general
    way must decide (a string, bool or int64 input, a value out of the
    input's range), which then reads `value()`, the list `json.loads` gives.
    """

    def __init__(self, text, values):
        self.text = text
        self.values = values  # int64, the list's shape

    def value(self):
        return json.loads(self.text)

    def array(self, spec):
        target = np.dtype(spec.numpy_dtype) if not spec.is_string else None
        if target is None or spec.dtype_name == "DT_BOOL" or target.kind not in "iuf":
            return None
        if target.kind in "iu" and np.iinfo(target).bits > 32:
            return None  # int64 values may need more digits than the reader takes
        values = self.values
        if target.kind in "iu" and values.size:
            info = np.iinfo(target)
            if values.min() < info.min or values.max() > info.max:
                return None  # the general way names the value
        return values.astype(target)


def _parse_with_dense_integers(body):
    """The request, its one long integer list as `DenseIntegers`; None where the general parse must run.

    Only a body whose `instances` or `inputs` is that list, once, with a
    valid `signature_name`, is taken: any other body (and any error) is
    the general parse's, messages included.
    """
    if not isinstance(body, (bytes, bytearray)) or len(body) < _DENSE_MIN_BYTES:
        return None
    runs = list(_DENSE_RUN.finditer(body))
    if len(runs) != 1:
        return None
    start, end = runs[0].span()
    text = bytes(body[start:end]).rstrip(b", \t\r\n")
    placeholder = json.dumps(_PLACEHOLDER).encode("ascii")
    try:
        request = json.loads(body[:start] + placeholder + body[start + len(text):])
    except (ValueError, RecursionError):  # the run was not one JSON value: the general parse says why
        return None
    if not isinstance(request, dict) or ("instances" in request) == ("inputs" in request):
        return None
    key = "instances" if "instances" in request else "inputs"
    if request[key] != _PLACEHOLDER or _occurrences(request, _PLACEHOLDER) != 1:
        return None
    if not isinstance(request.get("signature_name", ""), str):
        return None
    values = _read_dense_integers(text)
    if values is None:  # not JSON, ragged, or numbers the reader leaves to the general parse
        return None
    request[key] = DenseIntegers(text, values)
    return request


def _occurrences(value, text):
    """How often `text` is a key or a string value inside `value`."""
    if isinstance(value, dict):
        return sum((key == text) + _occurrences(item, text) for key, item in value.items())
    if isinstance(value, list):
        return sum(_occurrences(item, text) for item in value)
    return int(value == text)


def _read_dense_integers(text):
    """A regular nested JSON list of integers as an int64 array; None if it is not one.

    `text` holds only brackets, commas, digits, '-' and whitespace
    (`_DENSE_RUN`). Each number must be JSON's (`-?(0|[1-9][0-9]*)`), of at
    most `_DENSE_MAX_DIGITS` digits, alone in its place between `[` or `,`
    and `,` or `]`; whitespace anywhere between tokens. Each step is one
    NumPy or bytes operation over the text.
    """
    if not (text.startswith(b"[") and text.endswith(b"]")):
        return None
    packed = text.translate(None, b" \t\n\r")
    numbers_in_text = None
    if len(packed) != len(text):  # whitespace: counted numbers tell "1 2" from "12" once it is gone
        number = np.frombuffer(text, dtype=np.uint8) - np.uint8(45) < 13
        numbers_in_text = np.count_nonzero(number[1:] & ~number[:-1])
    chars = np.frombuffer(packed, dtype=np.uint8)
    number = chars - np.uint8(45) < 13  # '-' and the digits, the only bytes in 45..57 here
    shape = _regular_shape(packed.translate(None, b"-0123456789"))
    if shape is None:
        return None
    # A number after ']' or before '[' stands where a list should. The first byte is '[' and the
    # last ']', so no number touches an end; with the brackets regular, as many numbers as places
    # and none misplaced means one number in each place.
    if (number[1:] & (chars[:-1] == 93)).any() or (number[:-1] & (chars[1:] == 91)).any():
        return None
    starts = np.flatnonzero(number[1:] & ~number[:-1]) + 1
    if len(starts) != math.prod(shape) or numbers_in_text not in (None, len(starts)):
        return None
    ends = np.flatnonzero(number[:-1] & ~number[1:])  # inclusive
    negative = None
    if b"-" in packed:
        negative = chars[starts] == 45
        if packed.count(b"-") != np.count_nonzero(negative):
            return None  # a '-' inside a number
        first_digits = starts + negative
    else:
        first_digits = starts
    lengths = ends - first_digits + 1
    longest = int(lengths.max())
    if lengths.min() < 1 or longest > _DENSE_MAX_DIGITS:
        return None  # a lone '-', or more digits than the reader takes
    if ((chars[first_digits] == 48) & (lengths > 1)).any():
        return None  # a leading zero
    values = chars[ends].astype(np.int64) - 48
    for place in range(1, longest):  # the tens, hundreds, ... of every number at once
        digits = chars[np.maximum(ends - place, first_digits)].astype(np.int64) - 48
        values += np.where(lengths > place, digits, 0) * _POWERS_OF_TEN[place]
    if negative is not None:
        values[negative] *= -1
    return values.reshape(shape)


def _regular_shape(skeleton):
    """The shape of a nested list from its brackets and commas alone (b"[[,],[,]]": (2, 2)); None if ragged."""
    depth = len(skeleton) - len(skeleton.lstrip(b"["))
    if depth == 0:
        return None
    shape, block = [], b""
    for level in range(depth, 0, -1):  # innermost first
        # The first list of this level starts at its opening bracket and ends where its closings first meet.
        closing = skeleton.find(b"]" * (depth - level + 1))
        if closing < 0:
            return None
        length = closing + depth - 2 * level + 2
        count, remainder = divmod(length - 1, len(block) + 1)
        if remainder or count < 1:
            return None
        shape.insert(0, count)
        block = b"[" + b",".join([block] * count) + b"]"
    return tuple(shape) if block == skeleton else None


def request_format(request):
    """"row" for `instances`, "columnar" for `inputs`."""
    return "row" if "instances" in request else "columnar"


def inputs_from_request(request, specs):
    """The arrays a parsed request gives each input of a signature.

    Args:
        request: the object `parse_request` returned.
        specs: {name: TensorSpec} of the signature's inputs.

    Returns:
        {name: np.ndarray}, each of its spec's dtype, in the shape the JSON
        has: the shape is the graph's to accept or refuse, as TensorFlow
        Serving leaves it (see the module's docstring).

    Raises:
        ServingError: a value of the wrong type, a ragged list, a missing or
            extra input, an instances list that is not one.
    """
    if request_format(request) == "row":
        return _rows_to_arrays(request["instances"], specs)
    return _columns_to_arrays(request["inputs"], specs)


def _rows_to_arrays(instances, specs):
    if isinstance(instances, DenseIntegers):
        if len(specs) == 1:
            (name, spec), = specs.items()
            array = instances.array(spec)
            if array is not None:
                return {name: array}
        instances = instances.value()
    if not isinstance(instances, list):
        raise invalid("Expecting 'instances' to be a list/array")
    if not instances:
        raise invalid("No values in 'instances' array")
    names = sorted(specs)
    if not _is_named_object(instances[0]):
        if len(specs) > 1:
            raise invalid("instances is a plain list, but expecting list of objects as multiple input tensors "
                          f"required as per the signature: {','.join(names)}")
        for index, item in enumerate(instances):
            if _is_named_object(item):
                raise invalid(f"Expecting value/list but got object at item {index} of input list")
        name = names[0]
        return {name: _to_array(instances, specs[name], where="'instances' list")}
    for index, item in enumerate(instances):
        if not _is_named_object(item):
            raise invalid(f"Expecting object but got list at item {index} of input list")
        if set(item) != set(names):
            raise invalid(f"Failed to process element: {index} of 'instances' list. JSON object: {_short(item)} "
                          f"keys must be equal to: {','.join(names)}")
    return {name: _to_array([item[name] for item in instances], specs[name], where=f"key: {name} of 'instances' list")
            for name in names}


def _columns_to_arrays(inputs, specs):
    if isinstance(inputs, DenseIntegers):
        if len(specs) == 1:
            (name, spec), = specs.items()
            array = inputs.array(spec)
            if array is not None:
                return {name: array}
        inputs = inputs.value()
    names = sorted(specs)
    if not _is_named_object(inputs):
        if len(specs) > 1:
            raise invalid("inputs is a plain value/list, but expecting an object as multiple input tensors "
                          f"required as per the signature: {','.join(names)}")
        return {names[0]: _to_array(inputs, specs[names[0]], where="'inputs'")}
    arrays = {}
    for name in names:
        if name not in inputs:
            raise invalid(f"Missing named input: {name} in 'inputs' object.")
        arrays[name] = _to_array(inputs[name], specs[name], where=f"input: {name}")
    return arrays


def _is_named_object(value):
    return isinstance(value, dict) and not _is_b64(value)


def _is_b64(value):
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def _to_array(value, spec, *, where):
    """A JSON value as an array of `spec`'s dtype, checked as json_tensor.cc checks it."""
    if not spec.is_string and spec.dtype_name != "DT_BOOL":
        fast = _numeric_fast_path(value, spec)
        if fast is not None:
            return fast
    shape = _dense_shape(value)
    flat = []
    _flatten(value, shape, 0, spec, flat, where)
    if spec.is_string:
        array = np.empty(len(flat), dtype=object)
        array[:] = flat
        return array.reshape(shape)
    return np.asarray(flat, dtype=spec.numpy_dtype).reshape(shape)


def _numeric_fast_path(value, spec):
    """NumPy's own conversion of a well-formed numeric value (an image is
    150,000 of them); None where it is not one, for `_flatten` to name the fault."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):  # ragged lists
        return None
    kind = array.dtype.kind
    target = np.dtype(spec.numpy_dtype)
    if target.kind in "iu":
        if kind not in "iu":
            return None
        if array.size:
            info = np.iinfo(target)
            if array.min() < info.min or array.max() > info.max:
                return None
    elif kind not in "iuf":
        return None
    return array.astype(target, copy=False)


def _dense_shape(value):
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return tuple(shape)


def _flatten(value, shape, level, spec, out, where):
    if not isinstance(value, list):
        if level != len(shape):
            raise invalid(f"Failed to process {where}: JSON Value: {_short(value)} found at incorrect level: "
                          f"{level + 1} in the JSON DOM. Expected at level: {len(shape)}")
        out.append(_leaf(value, spec, where))
        return
    if level >= len(shape):
        raise invalid(f"Failed to process {where}: Encountered list at unexpected level: {level} "
                      f"expected < {len(shape)}")
    if len(value) != shape[level]:
        raise invalid(f"Failed to process {where}: Encountered list at unexpected size: {len(value)} at level: "
                      f"{level} expected size: {shape[level]}")
    for item in value:
        _flatten(item, shape, level + 1, spec, out, where)


def _leaf(value, spec, where):
    dtype = spec.dtype_name
    if spec.is_string:
        if isinstance(value, str):
            return value.encode("utf-8")
        if _is_b64(value):
            try:
                return base64.b64decode(value["b64"], validate=True)
            except (binascii.Error, ValueError):
                raise invalid(f"Failed to process {where}: Unable to base64 decode {_short(value)}") from None
        if isinstance(value, dict) and "b64" in value:
            raise invalid(f"Failed to process {where}: JSON Value: {_short(value)} not formatted correctly for "
                          "base64 data")
        raise _type_error(value, dtype, where)
    if dtype == "DT_BOOL":
        if isinstance(value, bool):
            return value
        raise _type_error(value, dtype, where)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _type_error(value, dtype, where)
    target = np.dtype(spec.numpy_dtype)
    if target.kind in "iu":
        if not isinstance(value, int):
            raise _type_error(value, dtype, where)
        info = np.iinfo(target)
        if not info.min <= value <= info.max:
            raise invalid(f"Failed to process {where}: JSON Value: {value} is out of range for {dtype} "
                          f"[{info.min}, {info.max}]")
    elif target.kind != "f" and target.name != "bfloat16":
        raise invalid(f"Conversion of JSON Value: {_short(value)} to type: {dtype} is not supported")
    return value


def _type_error(value, dtype, where):
    return invalid(f"Failed to process {where}: JSON Value: {_short(value)} Type: {_json_type(value)} "
                   f"is not of expected type: {dtype}")


def _json_type(value):
    if value is None:
        return "Null"
    if isinstance(value, bool):
        return "True" if value else "False"
    return {dict: "Object", list: "Array", str: "String"}.get(type(value), "Number")


def _short(value, limit=120):
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def response(outputs, fmt):
    """The JSON-ready answer to a `:predict` request.

    Args:
        outputs: {name: np.ndarray} of the signature's outputs.
        fmt: "row" or "columnar", the request's format.

    Raises:
        ServingError: row format with outputs that have no batch dimension
            or different batch sizes (use the columnar format).
    """
    names = sorted(outputs)
    if fmt == "columnar":
        values = {name: to_json_value(outputs[name], name) for name in names}
        return {"outputs": values[names[0]] if len(names) == 1 else values}
    batch = None
    for name in names:
        array = outputs[name]
        if array.ndim == 0:
            raise invalid(f"Tensor name: {name} has no shape information (a scalar output cannot be returned in "
                          "row format; send the columnar format, {\"inputs\": ...})")
        if batch is not None and array.shape[0] != batch:
            raise invalid(f"Tensor name: {name} has inconsistent batch size: {array.shape[0]} expecting: {batch}")
        batch = array.shape[0]
    values = {name: to_json_value(outputs[name], name) for name in names}
    if len(names) == 1:
        return {"predictions": values[names[0]]}
    return {"predictions": [{name: values[name][row] for name in names} for row in range(batch)]}


def to_json_value(array, name=""):
    """A NumPy array (or scalar) as nested lists of JSON values."""
    array = np.asarray(array)
    if array.dtype.kind in "OSU":
        as_bytes = name.endswith("_bytes")
        values = np.empty(array.shape, dtype=object)
        values.ravel()[:] = [_string_value(item, as_bytes) for item in array.ravel().tolist()] if array.size else []
        return values.tolist()
    if array.dtype.kind == "f" and array.dtype.itemsize <= 4 or array.dtype.name == "bfloat16":
        if array.size <= _SHORTEST_FLOAT_LIMIT:
            # str() of a float32 is its shortest round-trip form.
            shortest = [float(str(item)) for item in array.astype(np.float32).ravel()]
            return np.asarray(shortest, dtype=np.float64).reshape(array.shape).tolist()
        return array.astype(np.float64).tolist()
    return array.tolist()


def _string_value(item, as_bytes):
    if isinstance(item, str):
        item = item.encode("utf-8")
    if not as_bytes:
        try:
            return item.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return {"b64": base64.b64encode(item).decode("ascii")}


def dumps(value):
    """JSON text for an answer: NaN and Infinity as the tokens TensorFlow Serving writes."""
    return json.dumps(value, ensure_ascii=False, allow_nan=True, separators=(",", ":"))
