"""Read and rewrite ONNX files without the `onnx` package: the runtime needs only a few fields.

An ONNX file is one protobuf message (ModelProto). This walks its wire format (varints and
length-delimited fields) over a memory map: the nodes (name, op type, inputs) and the
initializers (name, dtype, shape, and where their bytes are: inside the file or in an external
data file), without reading any weight. `lora_variant` writes the same graph with chosen
initializers turned into graph inputs, which is how a LoRA-capable session takes merged weights.

Field numbers from onnx/onnx.proto: ModelProto.graph = 7; GraphProto.node = 1, initializer = 5,
input = 11; NodeProto.input = 1, output = 2, name = 3, op_type = 4; TensorProto.dims = 1,
data_type = 2, name = 8, raw_data = 9, external_data = 13, data_location = 14.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DTYPES: dict[int, np.dtype] = {1: np.dtype(np.float32), 10: np.dtype(np.float16), 11: np.dtype(np.float64)}
_LEN = 2


class GraphFormatError(ValueError):
    """The file is not an ONNX protobuf this reader understands (the message says where)."""


def _varint(buf: memoryview | bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise GraphFormatError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, value or payload start, payload end, field start) of one message."""
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value, pos, field_start
        elif wire == _LEN:
            length, pos = _varint(buf, pos)
            yield number, wire, pos, pos + length, field_start
            pos += length
        elif wire == 1:
            yield number, wire, pos, pos + 8, field_start
            pos += 8
        elif wire == 5:
            yield number, wire, pos, pos + 4, field_start
            pos += 4
        else:
            raise GraphFormatError(f"unsupported wire type {wire} at byte {field_start}")
    if pos != end:
        raise GraphFormatError(f"message overruns its end at byte {end}")


@dataclass(frozen=True)
class Node:
    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attributes: dict[str, int]  # the integer ones (AttributeProto.i), e.g. Gemm's transB


@dataclass(frozen=True)
class Initializer:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    span: tuple[int, int]  # the whole GraphProto.initializer field in the file (key included)
    raw: tuple[int, int] | None  # raw_data's bytes in the file
    external: tuple[str, int, int] | None  # (location, offset, length) in an external data file


@dataclass(frozen=True)
class GraphFile:
    path: Path
    nodes: tuple[Node, ...]
    initializers: dict[str, Initializer]
    graph_span: tuple[int, int]  # the ModelProto.graph field (key included)
    graph_payload: tuple[int, int]

    def consumers(self) -> dict[str, list[Node]]:
        """Tensor name -> the nodes that read it."""
        readers: dict[str, list[Node]] = {}
        for node in self.nodes:
            for name in node.inputs:
                readers.setdefault(name, []).append(node)
        return readers

    def array(self, name: str) -> np.ndarray:
        """One initializer's value, read-only: a memory map of the file that holds its bytes."""
        init = self.initializers[name]
        if init.external is not None:
            location, offset, length = init.external
            file, start = self.path.parent / location, offset
        elif init.raw is not None:
            file, start = self.path, init.raw[0]
            length = init.raw[1] - init.raw[0]
        else:
            raise GraphFormatError(f"{self.path}: initializer {name} keeps its values outside raw_data")
        count = int(np.prod(init.shape, dtype=np.int64))
        if length != count * init.dtype.itemsize:
            raise GraphFormatError(
                f"{self.path}: initializer {name} has {length} bytes for shape {init.shape}"
            )
        return np.memmap(file, dtype=init.dtype, mode="r", offset=start, shape=init.shape)


def _text(buf: memoryview, start: int, end: int) -> str:
    return bytes(buf[start:end]).decode("utf-8")


def _node(buf: memoryview, start: int, end: int) -> Node:
    name = op = ""
    inputs: list[str] = []
    outputs: list[str] = []
    attributes: dict[str, int] = {}
    for number, _, a, b, _ in _fields(buf, start, end):
        if number == 1:
            inputs.append(_text(buf, a, b))
        elif number == 2:
            outputs.append(_text(buf, a, b))
        elif number == 3:
            name = _text(buf, a, b)
        elif number == 4:
            op = _text(buf, a, b)
        elif number == 5:
            attribute = dict(_attribute(buf, a, b))
            if "i" in attribute:
                attributes[str(attribute["name"])] = int(attribute["i"])
    return Node(name, op, tuple(inputs), tuple(outputs), attributes)


def _attribute(buf: memoryview, start: int, end: int) -> Iterator[tuple[str, str | int]]:
    """AttributeProto's name (1) and integer value (3)."""
    for number, wire, a, b, _ in _fields(buf, start, end):
        if number == 1 and wire == _LEN:
            yield "name", _text(buf, a, b)
        elif number == 3 and wire == 0:
            yield "i", a


def _initializer(buf: memoryview, start: int, end: int, span: tuple[int, int]) -> Initializer | None:
    """None for dtypes LoRA never targets (int64 shapes and the like)."""
    dims: list[int] = []
    dtype = 0
    name = ""
    raw = None
    external: dict[str, str] = {}
    for number, wire, a, b, _ in _fields(buf, start, end):
        if number == 1 and wire == 0:
            dims.append(a)
        elif number == 1:  # packed dims
            pos = a
            while pos < b:
                value, pos = _varint(buf, pos)
                dims.append(value)
        elif number == 2:
            dtype = a
        elif number == 8:
            name = _text(buf, a, b)
        elif number == 9:
            raw = (a, b)
        elif number == 13:  # StringStringEntryProto: key = 1, value = 2
            entry = {k: _text(buf, x, y) for k, _, x, y, _ in _fields(buf, a, b)}
            external[entry.get(1, "")] = entry.get(2, "")
    if dtype not in DTYPES:
        return None
    located = None
    if external:
        located = (external["location"], int(external.get("offset", 0)), int(external["length"]))
    return Initializer(name, DTYPES[dtype], tuple(dims), span, raw, located)


def read_graph(path: Path) -> GraphFile:
    """The nodes and float initializers of the ONNX file at `path` (GraphFormatError if it is not one)."""
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        buf = memoryview(mapped)
        try:
            return _read(path, buf)
        finally:
            buf.release()


def _read(path: Path, buf: memoryview) -> GraphFile:
    graph = None
    for number, wire, a, b, field_start in _fields(buf, 0, len(buf)):
        if number == 7 and wire == _LEN:
            graph = (field_start, b), (a, b)
    if graph is None:
        raise GraphFormatError(f"{path} holds no graph")
    nodes: list[Node] = []
    inits: dict[str, Initializer] = {}
    for number, _, a, b, field_start in _fields(buf, *graph[1]):
        if number == 1:
            nodes.append(_node(buf, a, b))
        elif number == 5:
            init = _initializer(buf, a, b, (field_start, b))
            if init is not None:
                inits[init.name] = init
    return GraphFile(path, tuple(nodes), inits, graph[0], graph[1])


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | _LEN) + _encode_varint(len(payload)) + payload


def _varint_field(number: int, value: int) -> bytes:
    return _encode_varint(number << 3) + _encode_varint(value)


_ONNX_TYPES = {dtype: code for code, dtype in DTYPES.items()}


def _tensor_input(init: Initializer) -> bytes:
    """ValueInfoProto{name, type: TypeProto{tensor_type: {elem_type, shape: {dim: [dim_value]}}}}."""
    dims = b"".join(_len_field(1, _varint_field(1, d)) for d in init.shape)
    tensor_type = _varint_field(1, _ONNX_TYPES[init.dtype]) + _len_field(2, dims)
    return _len_field(1, init.name.encode()) + _len_field(2, _len_field(1, tensor_type))


def _inline(graph: GraphFile, init: Initializer) -> bytes:
    """An external initializer as TensorProto{dims, data_type, name, raw_data}: the variant lives in
    a cache directory, where the bundle's relative external-data path would not resolve."""
    dims = b"".join(_varint_field(1, d) for d in init.shape)
    tensor = dims + _varint_field(2, _ONNX_TYPES[init.dtype]) + _len_field(8, init.name.encode())
    return _len_field(5, tensor + _len_field(9, graph.array(init.name).tobytes()))


def lora_variant(graph: GraphFile, targets: Iterable[str]) -> bytes:
    """The model with the initializers `targets` removed and declared as graph inputs instead
    (fed on every run), and every other external initializer stored inline."""
    wanted = set(targets)
    with graph.path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        buf = memoryview(mapped)
        try:
            by_span = {init.span[0]: init for init in graph.initializers.values()}
            parts: list[bytes] = []
            for number, _, _, b, field_start in _fields(buf, *graph.graph_payload):
                init = by_span.get(field_start) if number == 5 else None
                if init is not None and init.name in wanted:
                    continue
                if init is not None and init.external is not None:
                    parts.append(_inline(graph, init))
                else:
                    parts.append(bytes(buf[field_start:b]))
            parts += [_len_field(11, _tensor_input(graph.initializers[name])) for name in sorted(wanted)]
            start, end = graph.graph_span
            return bytes(buf[:start]) + _len_field(7, b"".join(parts)) + bytes(buf[end:])
        finally:
            buf.release()


def read_initializers(path: Path, names: Iterable[str]) -> dict[str, np.ndarray]:
    """{name: value} of these initializers of the ONNX file at `path` (memory maps, read-only)."""
    graph = read_graph(path)
    return {name: graph.array(name) for name in names}
