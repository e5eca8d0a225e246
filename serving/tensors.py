"""v2 request bodies as the Open Inference Protocol's clients send them: JSON, or JSON followed by
binary tensors (the binary tensor data extension), and gRPC's ``raw_input_contents``.

The REST body is JSON whatever its ``Content-Type`` says (tritonclient sends none; ``curl -d`` sends
a form type). With the ``Inference-Header-Content-Length`` header, the first that many bytes are the
JSON header and the rest is each binary input's data in the order of the inputs, as long as its
``binary_data_size`` parameter says: little-endian values, and BYTES elements each preceded by its
length as a 4-byte little-endian integer. KServe's own decoder (``InferRequest.from_bytes``) trusts
every length and turns a malformed body into a 500, and it copies binary data into Python lists; here
every length is checked against the body and the shape, each mistake is an ``InvalidInput`` (400)
naming the input, and binary data stays a numpy array (:meth:`serving.requests.RequestSchema.v2`
checks it column-wise).
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferRequest

from serving.requests import parse_json

HEADER = "inference-header-content-length"

# Each fixed-size datatype as it travels: little-endian, as the protocol says.
DTYPES = {
    "BOOL": np.dtype("u1"), "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
DATATYPES = frozenset(DTYPES) | {"BYTES"}
_LENGTH = struct.Struct("<I")


def element_count(name: str, shape: Any) -> int:
    """The number of elements a tensor's shape holds; a shape that is not a list of whole numbers
    at least 0 is the client's mistake."""
    if not isinstance(shape, (list, tuple)) or not shape or any(
            isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
        raise InvalidInput(f"input '{name}': shape must be a non-empty list of whole numbers at least 0, got {list(shape) if isinstance(shape, (list, tuple)) else shape!r}")
    return math.prod(shape)


def decode_tensor(name: str, datatype: str, shape: Any, raw: bytes) -> np.ndarray:
    """A binary tensor's data as a flat numpy array, checked against its datatype and shape."""
    count = element_count(name, shape)
    datatype = str(datatype).upper()
    if datatype == "BYTES":
        elements = split_bytes(name, raw)
        if len(elements) != count:
            raise InvalidInput(f"input '{name}': its binary data holds {len(elements)} BYTES element(s), but shape {list(shape)} needs {count}")
        array = np.empty(count, dtype=object)
        array[:] = elements
        return array
    dtype = DTYPES.get(datatype)
    if dtype is None:
        raise InvalidInput(f"input '{name}': unknown datatype {datatype!r}; the v2 datatypes are {', '.join(sorted(DATATYPES))}")
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(f"input '{name}': {len(raw)} bytes of binary data, but shape {list(shape)} of {datatype} "
                           f"needs {count * dtype.itemsize} ({dtype.itemsize} per element)")
    array = np.frombuffer(raw, dtype=dtype)
    if datatype == "BOOL":
        if (array > 1).any():
            raise InvalidInput(f"input '{name}': a BOOL element must be the byte 0 or 1")
        return array.astype(bool)
    return array


def split_bytes(name: str, raw: bytes) -> list[bytes]:
    """BYTES elements, each preceded by its length (4 bytes, little-endian); a length that runs past
    the data is a truncated tensor."""
    elements, offset, size = [], 0, len(raw)
    view = memoryview(raw)
    while offset < size:
        if offset + 4 > size:
            raise InvalidInput(f"input '{name}': its BYTES data is truncated: {size - offset} byte(s) left where a 4-byte length should be")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > size:
            raise InvalidInput(f"input '{name}': its BYTES data is truncated: element {len(elements)} says {length} bytes, "
                               f"{size - offset} remain")
        elements.append(bytes(view[offset:offset + length]))
        offset += length
    return elements


def decode_rest(body: bytes, header_length: str | None, model_name: str) -> InferRequest:
    """A v2 REST body, JSON or binary, as a KServe ``InferRequest`` (binary inputs as numpy arrays)."""
    from kserve.protocol.rest.v2_datamodels import InferenceRequest
    from pydantic import ValidationError

    raws: dict[int, bytes] = {}
    if header_length is None:
        document = parse_json(body)
    else:
        text = header_length.strip()
        if not text.isdigit():
            raise InvalidInput(f"header '{HEADER}' must be a whole number of bytes, got {text[:40]!r}")
        length = int(text)
        if not 0 < length <= len(body):
            raise InvalidInput(f"header '{HEADER}' says the JSON header is {length} bytes, but the body has {len(body)}")
        try:
            document = parse_json(body[:length])
        except InvalidInput as exc:
            raise InvalidInput(f"the first {length} bytes (header '{HEADER}') are not the request's JSON: {exc}") from None
        raws = _binary_parts(document, body, length)
    try:
        request = InferenceRequest.model_validate(document)
    except ValidationError as exc:
        raise InvalidInput(malformed(exc.errors())) from None
    infer_request = InferRequest.from_inference_request(request, model_name)
    for index, raw in raws.items():
        tensor = infer_request.inputs[index]
        tensor._data = decode_tensor(tensor.name, tensor.datatype, tensor.shape, raw)
    return infer_request


def _binary_parts(document: Any, body: bytes, offset: int) -> dict[int, bytes]:
    """Each binary input's bytes (by the input's index), cut from the body after the JSON header by
    the inputs' ``binary_data_size``; the sizes must account for the body exactly. A binary input
    gets an empty ``data`` in ``document`` (its values come from the bytes)."""
    if not isinstance(document, dict) or not isinstance(document.get("inputs"), list):
        raise InvalidInput('a v2 request must be a JSON object {"inputs": [...]}: field \'inputs\' is missing')
    parts: dict[int, bytes] = {}
    for index, tensor in enumerate(document["inputs"]):
        if not isinstance(tensor, dict):
            continue  # the request's own validation names it
        parameters = tensor.get("parameters")
        size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
        name = str(tensor.get("name", index))[:80]
        if size is None:
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidInput(f"input '{name}': parameter 'binary_data_size' must be a whole number of bytes, got {size!r}")
        if "data" in tensor:
            raise InvalidInput(f"input '{name}' has both 'data' and 'binary_data_size': send its values one way")
        if offset + size > len(body):
            raise InvalidInput(f"input '{name}': binary_data_size is {size}, but only {len(body) - offset} byte(s) of the body remain")
        parts[index] = body[offset:offset + size]
        tensor["data"] = []
        offset += size
    if offset != len(body):
        raise InvalidInput(f"the body has {len(body) - offset} byte(s) after the JSON header and the inputs' binary data "
                           f"(their binary_data_size values account for {sum(map(len, parts.values()))} byte(s)): "
                           f"the sizes disagree with the body")
    return parts


def decode_raw_inputs(request: InferRequest) -> None:
    """A gRPC request's ``raw_input_contents`` (one per input, in order), decoded and checked as
    REST's binary data is."""
    for tensor in request.inputs:
        raw = getattr(tensor, "_raw_data", None)
        if raw is not None:
            tensor._data = decode_tensor(tensor.name, tensor.datatype, tensor.shape, bytes(raw))


def malformed(errors: list[dict[str, Any]]) -> str:
    """A v2 body whose shape is not the protocol's, each problem by where it is."""
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err.get('loc', ()) if p != 'body') or 'body'}: {err.get('msg')}" for err in errors
    )
    return f"malformed request: {problems}"[:2000]
