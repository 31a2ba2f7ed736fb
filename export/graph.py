"""Graph cleanup on lean protos: constant folding, shape inference, deduplication, checks.

Folding uses polygraphy's Python `fold_constants` on the lean proto (the sanitize CLI cannot
save above 2 GB and peaked at 17 GB). Deduplication matters for the deprojector, whose 76
unrolled steps share weights, and for random-init presets whose many zero biases and unit
norm weights the tracer writes out once per parameter.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from pathlib import Path

import onnx
import onnxruntime
from onnx import ModelProto, TensorProto
from polygraphy.backend.onnx import fold_constants
from polygraphy.logger import G_LOGGER

from export.onnx_io import tensor_array

log = logging.getLogger(__name__)

TRT_OPS_FILE = Path(__file__).with_name("trt_supported_ops.txt")


def name_nodes(model: ModelProto) -> None:
    """Give every node a unique name: the fp16 block list and error messages refer to nodes by name."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.name or node.op_type}__{i}"
        seen.add(node.name)


def dedupe_initializers(model: ModelProto) -> int:
    """Merge initializers with equal dtype, shape and bytes; returns how many were removed.

    Only tensors sharing dtype and shape with another one are read and hashed, so the
    large unique weights of a UNet are never loaded.
    """
    groups: dict[tuple[int, tuple[int, ...]], list[TensorProto]] = defaultdict(list)
    for tensor in model.graph.initializer:
        groups[(tensor.data_type, tuple(tensor.dims))].append(tensor)
    rename: dict[str, str] = {}
    for group in groups.values():
        if len(group) < 2:
            continue
        first_of: dict[str, str] = {}
        for tensor in group:
            digest = hashlib.sha256(tensor_array(tensor).tobytes()).hexdigest()
            rename[tensor.name] = first_of.setdefault(digest, tensor.name)
    rename = {old: new for old, new in rename.items() if old != new}
    if not rename:
        return 0
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    kept = [t for t in model.graph.initializer if t.name not in rename]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return len(rename)


def cleanup(model: ModelProto) -> ModelProto:
    """Fold constants (with shape inference), dedupe initializers, infer shapes, name nodes."""
    onnxruntime.set_default_logger_severity(3)  # folding sessions warn about every kept Unsqueeze
    with G_LOGGER.verbosity(G_LOGGER.WARNING):
        folded: ModelProto = fold_constants(model, do_shape_inference=True, error_ok=False)
    removed = dedupe_initializers(folded)
    if removed:
        log.info("merged %d duplicate initializers", removed)
    folded = onnx.shape_inference.infer_shapes(folded, data_prop=True)
    name_nodes(folded)
    return folded


def check(path: Path) -> None:
    """onnx.checker by path, so external data above 2 GB is fine."""
    onnx.checker.check_model(str(path), full_check=True)


def trt_supported_ops() -> frozenset[str]:
    lines = TRT_OPS_FILE.read_text().splitlines()
    return frozenset(line.strip() for line in lines if line.strip() and not line.startswith("#"))


def unsupported_trt_ops(model: ModelProto) -> list[str]:
    """Op types TensorRT's ONNX parser does not list as supported (custom domains included)."""
    supported = trt_supported_ops()
    used = {(n.domain or "", n.op_type) for n in model.graph.node}
    return sorted(
        f"{domain}::{op}" if domain not in ("", "ai.onnx") else op
        for domain, op in used
        if domain not in ("", "ai.onnx") or op not in supported
    )
