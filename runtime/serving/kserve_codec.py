"""KServe v2 / Triton HTTP tensor encoding: JSON `data` or the binary tensor data extension.

A binary request body is a JSON header (its length in the `Inference-Header-Content-Length`
header) followed by raw tensors in input order, each input naming its byte count in
`parameters.binary_data_size`. BYTES elements are a 4-byte little-endian length, then the bytes.
Responses use the same layout for outputs that asked for binary data.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from runtime.errors import RequestError

NUMPY_TYPES: dict[str, np.dtype] = {
    name: np.dtype(t).newbyteorder("<")
    for name, t in {
        "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
        "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
        "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
    }.items()
}  # fmt: skip
HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_DATA_DEPTH = 32  # nesting of an input's JSON `data` (a tensor's rank; real ones have a few)


class CodecError(RequestError):
    """The request is not a well-formed v2 inference request (400); the message says which part.

    A well-formed request whose values are wrong (unreadable text, steps out of range) is a plain
    RequestError instead: 422, as /v1 answers it."""


class InferTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[Any] | None = None


class RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[InferTensor]
    outputs: list[RequestedOutput] | None = None


Tensor = np.ndarray | list[bytes]  # numeric array, or the elements of a BYTES tensor


@dataclass(frozen=True)
class Output:
    name: str
    datatype: str
    shape: tuple[int, ...]
    value: Tensor


def _flatten(data: list[Any], name: str) -> list[Any]:
    """Row-major elements of nested lists; iterative, so no depth can exhaust the stack."""
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            if len(stack) >= MAX_DATA_DEPTH:
                raise CodecError(f"input {name}: data is nested deeper than {MAX_DATA_DEPTH} levels")
            stack.append(iter(item))
        else:
            flat.append(item)
    return flat


_END = object()


def _utf8(text: str, name: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate, from a JSON escape such as "\ud800"
        raise RequestError(
            f"input {name} must be valid UTF-8 text; character {exc.start} is not ({text[exc.start]!r})"
        ) from None


def _split_bytes(blob: bytes, name: str) -> list[bytes]:
    items, offset = [], 0
    while offset < len(blob):
        if offset + 4 > len(blob):
            raise CodecError(f"input {name}: BYTES element length prefix is cut off")
        (size,) = struct.unpack_from("<I", blob, offset)
        offset += 4
        if offset + size > len(blob):
            raise CodecError(f"input {name}: BYTES element of {size} bytes runs past the tensor's data")
        items.append(blob[offset : offset + size])
        offset += size
    return items


def _decode_tensor(t: InferTensor, binary: memoryview, offset: int) -> tuple[Tensor, int]:
    if t.datatype != "BYTES" and t.datatype not in NUMPY_TYPES:
        raise CodecError(f"input {t.name}: unknown datatype {t.datatype!r}")
    if any(d < 0 for d in t.shape):
        raise CodecError(f"input {t.name}: shape {t.shape} has a negative dimension")
    count = math.prod(t.shape)
    size = t.parameters.get("binary_data_size")
    value: Tensor
    if size is not None:
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise CodecError(f"input {t.name}: binary_data_size {size!r} does not fit the request body")
        blob = bytes(binary[offset : offset + size])
        offset += size
        if t.datatype == "BYTES":
            value = _split_bytes(blob, t.name)
        else:
            dtype = NUMPY_TYPES[t.datatype]
            if size != count * dtype.itemsize:
                raise CodecError(f"input {t.name}: {size} bytes is not {count} x {t.datatype}")
            value = np.frombuffer(blob, dtype=dtype)
    elif t.data is not None:
        flat = _flatten(t.data, t.name)
        if t.datatype == "BYTES":
            if not all(isinstance(v, str) for v in flat):
                raise CodecError(f"input {t.name}: BYTES data must be strings")
            value = [_utf8(v, t.name) for v in flat]
        else:
            try:
                value = np.asarray(flat, dtype=NUMPY_TYPES[t.datatype])
            except (TypeError, ValueError, OverflowError) as exc:
                raise CodecError(f"input {t.name}: data is not {t.datatype}: {exc}") from None
    else:
        raise CodecError(f"input {t.name}: no data (give 'data' or parameters.binary_data_size)")
    if len(value) != count:
        raise CodecError(f"input {t.name}: shape {t.shape} needs {count} elements; got {len(value)}")
    return value, offset


Decoded = tuple[InferRequest, dict[str, InferTensor], dict[str, Tensor]]


def decode_request(body: bytes, header_length: str | None) -> Decoded:
    """Body -> (request, input specs by name, input values by name); CodecError when malformed."""
    try:
        split = len(body) if header_length is None else int(header_length)
    except ValueError:
        raise CodecError(f"{HEADER_LENGTH} must be an integer; got {header_length!r}") from None
    if not 0 <= split <= len(body):
        raise CodecError(f"{HEADER_LENGTH} {split} is outside the body's {len(body)} bytes")
    try:
        request = InferRequest.model_validate(json.loads(body[:split]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CodecError(f"malformed JSON inference header: {exc}") from None
    except RecursionError:  # the same 400 as /v1 gives such a body
        raise CodecError("malformed JSON inference header: nested too deeply") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "request"
        raise CodecError(f"invalid inference request: {where}: {first['msg']}") from None
    binary, offset = memoryview(body)[split:], 0
    specs, values = {}, {}
    for tensor in request.inputs:
        if tensor.name in values:
            raise CodecError(f"input {tensor.name} is given twice")
        values[tensor.name], offset = _decode_tensor(tensor, binary, offset)
        specs[tensor.name] = tensor
    if offset != len(binary):
        raise CodecError(f"{len(binary) - offset} bytes of binary data belong to no input")
    return request, specs, values


def _raw(output: Output) -> bytes:
    if output.datatype == "BYTES":
        assert isinstance(output.value, list)
        return b"".join(struct.pack("<I", len(v)) + v for v in output.value)
    assert isinstance(output.value, np.ndarray)
    return np.ascontiguousarray(output.value, dtype=NUMPY_TYPES[output.datatype]).tobytes()


def _json_data(output: Output) -> list[Any]:
    if output.datatype == "BYTES":
        assert isinstance(output.value, list)
        return [v.decode("utf-8", errors="replace") for v in output.value]
    assert isinstance(output.value, np.ndarray)
    return output.value.reshape(-1).tolist()


def encode_response(
    model: str, version: str, request_id: str | None, outputs: list[Output], binary: set[str]
) -> tuple[bytes, str, dict[str, str]]:
    """(body, media type, headers); outputs named in `binary` travel as raw bytes after the JSON header."""
    described, blobs = [], []
    for output in outputs:
        entry: dict[str, Any] = {
            "name": output.name,
            "datatype": output.datatype,
            "shape": list(output.shape),
        }
        if output.name in binary:
            raw = _raw(output)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = _json_data(output)
        described.append(entry)
    response: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": described}
    if request_id is not None:
        response["id"] = request_id
    header = json.dumps(response).encode()
    if not blobs:
        return header, "application/json", {}
    return header + b"".join(blobs), "application/octet-stream", {HEADER_LENGTH: str(len(header))}
