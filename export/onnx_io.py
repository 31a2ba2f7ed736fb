"""ONNX models too big to hold twice: lean protos whose large weights stay on disk.

SD 1.5's UNet is 3.4 GB of weights; loading it into a proto, copying it for fp16 conversion and
serialising it again is what took 16.8 GB. A *lean* proto keeps every initializer of at least
`INLINE_LIMIT` bytes as an external reference with an absolute path into the exporter's scratch
files, so graph passes (shape inference, folding, fp16 conversion) only touch the small graph.
`save` then streams each big tensor once into the final file.

Pending fp16 conversion: the fp16 pass only retypes an external initializer to FLOAT16 (the
converter cannot see its bytes); a tensor declared FLOAT16 whose external bytes are float32 is
converted, with the converter's own clamping, when read.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import onnx
from onnx import ModelProto, TensorProto, helper, numpy_helper
from onnx.external_data_helper import uses_external_data

INLINE_LIMIT = 1 << 20  # smaller initializers are loaded into the lean proto (shape tensors, biases)
# Inline weights of a trace under 2 GB from this size up are spilled to a side file; smaller ones
# stay, so constant folding can still evaluate lookups on them (a ViT's 1 MiB position table:
# ONNX Runtime refuses external data with absolute paths in the folding session).
SPILL_ABOVE = 1 << 22
EXTERNAL_ABOVE = 1 << 30  # saved models with more weight bytes get one `<name>.onnx.data` file
_EXTERNAL_MIN = 1024  # tensors smaller than this stay in the proto even in external mode
_ALIGN = 4096  # page-aligned offsets let ONNX Runtime mmap the weights
# The fp16 converter's clamping (convert_float_to_float16 defaults): magnitudes in (0, min) become
# min, finite magnitudes above max become max; zero, inf and NaN stay as they are.
FP16_MIN_POSITIVE, FP16_MAX_FINITE = 5.96e-08, 65504.0
_CHUNK = 1 << 22


def to_float16(array: np.ndarray) -> np.ndarray:
    """float32 -> float16 with the converter's clamping, chunked (its own version takes minutes
    and several full-size temporaries on the 860M UNet weights)."""
    out = np.empty(array.shape, np.float16)
    src, dst = array.reshape(-1), out.reshape(-1)
    for start in range(0, src.size, _CHUNK):
        x = src[start : start + _CHUNK].astype(np.float32)  # a copy, clamped in place
        magnitude = np.abs(x)
        tiny = (magnitude > 0) & (magnitude < FP16_MIN_POSITIVE)
        x[tiny] = np.copysign(np.float32(FP16_MIN_POSITIVE), x[tiny])
        huge = (magnitude > FP16_MAX_FINITE) & np.isfinite(x)
        x[huge] = np.copysign(np.float32(FP16_MAX_FINITE), x[huge])
        dst[start : start + _CHUNK] = x
    return out


def _external_info(tensor: TensorProto, base: Path | None = None) -> tuple[str, int, int]:
    """(location, offset, length); torch's one-file-per-tensor export omits length (= rest of file)."""
    info = {e.key: e.value for e in tensor.external_data}
    location = str(base / info["location"]) if base is not None else info["location"]
    offset = int(info.get("offset", 0))
    length = int(info["length"]) if "length" in info else os.path.getsize(location) - offset
    return location, offset, length


def _read(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise OSError(f"{path}: expected {length} bytes at offset {offset}, got {len(data)}")
    return data


def load_lean(path: Path) -> ModelProto:
    """Load `path` with small tensors inline and large ones referenced by absolute path.

    A trace under 2 GB holds its weights inline (CLIP's image tower: 1.2 GB); those are spilled
    once to `<path>.lean.data` beside it, since folding an inline 1.2 GB proto copies it several
    times (measured: 9.9 GB peak and 30 s, instead of 2.4 GB and 6 s spilled)."""
    model = onnx.load(str(path), load_external_data=False)
    base = path.resolve().parent
    spill_path = base / (path.name + ".lean.data")
    with ExitStack() as stack:
        spill = None
        for tensor in model.graph.initializer:
            if not uses_external_data(tensor):
                if len(tensor.raw_data) >= SPILL_ABOVE:
                    spill = spill or stack.enter_context(open(spill_path, "wb"))
                    offset = spill.tell()
                    spill.write(tensor.raw_data)
                    tensor.CopyFrom(_external_tensor(tensor, str(spill_path), offset, len(tensor.raw_data)))
                continue
            source, offset, length = _external_info(tensor, base)
            if length < INLINE_LIMIT:
                raw = _read(source, offset, length)
                del tensor.external_data[:]
                tensor.data_location = TensorProto.DEFAULT
                tensor.raw_data = raw
            else:
                tensor.CopyFrom(_external_tensor(tensor, source, offset, length))
    return model


def tensor_array(tensor: TensorProto) -> np.ndarray:
    """The values of an initializer, inline or external, applying a pending fp16 conversion."""
    if not uses_external_data(tensor):
        return numpy_helper.to_array(tensor)
    location, offset, length = _external_info(tensor)
    declared = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(np.prod(tensor.dims, dtype=np.int64))
    stored = (
        np.dtype(np.float32) if tensor.data_type == TensorProto.FLOAT16 and length == 4 * count else declared
    )
    array = np.fromfile(location, dtype=stored, count=count, offset=offset).reshape(tuple(tensor.dims))
    return to_float16(array) if stored != declared else array


def tensor_nbytes(tensor: TensorProto) -> int:
    """Size of a tensor once saved (declared dtype), without reading it."""
    itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def _external_tensor(tensor: TensorProto, location: str, offset: int, length: int) -> TensorProto:
    out = TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
    out.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = out.external_data.add()
        entry.key, entry.value = key, str(value)
    return out


def save(model: ModelProto, path: Path) -> str | None:
    """Write `model` to `path`, streaming weights; returns the external data file name or None.

    Models with more than `EXTERNAL_ABOVE` weight bytes get exactly one `<name>.onnx.data`
    file (never one file per tensor); smaller ones are a single self-contained file.
    `model` itself is not modified.
    """
    out = ModelProto()
    out.CopyFrom(model)
    external = sum(tensor_nbytes(t) for t in out.graph.initializer) > EXTERNAL_ABOVE
    data_name = path.name + ".data" if external else None
    with ExitStack() as stack:
        data = stack.enter_context(open(path.with_name(data_name), "wb")) if data_name else None
        for tensor in out.graph.initializer:
            to_file = data is not None and tensor_nbytes(tensor) >= _EXTERNAL_MIN
            if not (to_file or uses_external_data(tensor)):
                continue
            array = np.ascontiguousarray(tensor_array(tensor))
            if data is not None and data_name is not None and to_file:
                offset = (data.tell() + _ALIGN - 1) // _ALIGN * _ALIGN
                data.seek(offset)
                data.write(array.data)
                tensor.CopyFrom(_external_tensor(tensor, data_name, offset, array.nbytes))
            else:
                tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
            del array
    path.write_bytes(out.SerializeToString())
    return data_name
