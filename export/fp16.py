"""Mixed-precision fp16 graphs with float32 inputs and outputs.

TensorRT 11 builds strongly typed networks only, so the precision of every tensor lives in the
ONNX file. onnxruntime's `convert_float_to_float16` does the conversion (ModelOpt AutoCast ran
out of memory on the SD 1.5 UNet); it runs on the lean proto, so large weights are only
retyped here and converted while streaming to disk (see onnx_io).

Kept in float32:
- normalisations and softmax (reductions over many values; fp16 variance overflows);
- the UNet's timestep embedding (fp16 Sin/Cos of t near 999 was the largest error source);
- CLIP's causal mask: the Add applying a mask before a Softmax, and shape-derived tensors
  (a mask built at run time, size arithmetic) with the nodes that consume them.
The converter's output then needs repairs: it names the Cast it inserts per blocked consumer
after the tensor, so one tensor with two blocked consumers gets two identical Casts; it appends
nodes at the end (unsorted); and its value_info goes stale. Round trips fp32 -> fp16 -> fp32
between two blocked nodes are removed, as they only lose precision. It also reads every
converted initializer just to learn its shape; during conversion that helper is swapped for
one reading the tensor's dims, as the weights of a lean proto are on disk.
"""

from __future__ import annotations

from collections import defaultdict
from unittest import mock

import onnx
from onnx import ModelProto, NodeProto, TensorProto, ValueInfoProto, helper
from onnxruntime.transformers import float16
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

from export.graph import name_nodes

FP32_OPS = frozenset(
    {"LayerNormalization", "InstanceNormalization", "GroupNormalization", "Softmax", *DEFAULT_OP_BLOCK_LIST}
)
FP32_SCOPES = ("/time_proj/", "/time_embedding/")  # diffusers' timestep embedding modules
_SHAPE_OPS = frozenset({"Shape", "Size"})  # read only the shape: never worth a cast


def _float_tensors(model: ModelProto) -> set[str]:
    graph = model.graph
    typed = [*graph.input, *graph.output, *graph.value_info]
    names = {v.name for v in typed if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    names |= {t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT}
    return names


def fp32_nodes(model: ModelProto) -> set[str]:
    """Names of the nodes to keep in float32 (model must be shape-inferred and sorted)."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    blocked = {n.name for n in graph.node if n.op_type in FP32_OPS}

    # The timestep embedding and everything upstream of it (the timestep input path).
    stack = [n for n in graph.node if any(scope in n.name for scope in FP32_SCOPES)]
    upstream: set[str] = set()
    while stack:
        node = stack.pop()
        if node.name in upstream or node.op_type in _SHAPE_OPS:
            continue
        upstream.add(node.name)
        stack.extend(producer[i] for i in node.input if i in producer)
    blocked |= upstream

    # The attention-mask Add (scores + mask, the mask holding -inf) feeding a Softmax.
    for node in graph.node:
        source = producer.get(node.input[0]) if node.op_type == "Softmax" else None
        if source is not None and source.op_type == "Add":
            blocked.add(source.name)

    # Shape-derived nodes (computed from tensor shapes, not values), and data nodes applying
    # a shape-derived float tensor (the Add of an attention mask).
    floats = _float_tensors(model)
    data = {i.name for i in graph.input}
    shaped: set[str] = set()
    for node in graph.node:
        if node.op_type in _SHAPE_OPS:
            shaped.update(node.output)
        elif any(i in data for i in node.input):
            data.update(node.output)
            if any(i in shaped and i in floats for i in node.input):
                blocked.add(node.name)
        elif any(i in shaped for i in node.input):
            shaped.update(node.output)
            blocked.add(node.name)
    return blocked


def _drop_duplicate_nodes(nodes: list[NodeProto]) -> list[NodeProto]:
    seen: set[str] = set()
    kept = []
    for node in nodes:
        if node.name in seen:
            continue
        seen.add(node.name)
        kept.append(node)
    return kept


def _cast_to(node: NodeProto) -> int | None:
    if node.op_type != "Cast":
        return None
    return next(int(a.i) for a in node.attribute if a.name == "to")


def _remove_round_trips(model: ModelProto, nodes: list[NodeProto]) -> list[NodeProto]:
    """Cast(fp16) of a float32 tensor X followed by Cast(fp32): consumers read X directly."""
    was_float = _float_tensors(model)
    producer = {out: node for node in nodes for out in node.output}
    rename: dict[str, str] = {}
    for node in nodes:
        first = producer.get(node.input[0]) if node.input else None
        if (
            _cast_to(node) == TensorProto.FLOAT
            and first is not None
            and _cast_to(first) == TensorProto.FLOAT16
            and first.input[0] in was_float
        ):
            rename[node.output[0]] = first.input[0]
    outputs = {o.name for o in model.graph.output}
    kept = []
    for node in nodes:
        if node.output and node.output[0] in rename:
            if node.output[0] not in outputs:
                continue
            # A graph output keeps its name: read X through an Identity instead of the casts.
            node = helper.make_node(
                "Identity", [rename.pop(node.output[0])], [node.output[0]], name=node.name
            )
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
        kept.append(node)
    return kept


def _drop_dead_nodes(model: ModelProto, nodes: list[NodeProto]) -> list[NodeProto]:
    used = {o.name for o in model.graph.output}
    kept = []
    for node in reversed(nodes):
        if any(out in used for out in node.output):
            used.update(node.input)
            kept.append(node)
    return kept[::-1]


def toposort(model: ModelProto, nodes: list[NodeProto]) -> list[NodeProto]:
    """Kahn's order over `nodes`; raises if some input is never produced (a broken graph)."""
    available = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    waiting: dict[str, list[int]] = defaultdict(list)
    missing = []
    for idx, node in enumerate(nodes):
        need = {i for i in node.input if i not in available}
        missing.append(len(need))
        for name in need:
            waiting[name].append(idx)
    ready = [idx for idx, n in enumerate(missing) if n == 0]
    order: list[NodeProto] = []
    while ready:
        node = nodes[ready.pop()]
        order.append(node)
        for out in node.output:
            for idx in waiting.pop(out, []):
                missing[idx] -= 1
                if missing[idx] == 0:
                    ready.append(idx)
    if len(order) != len(nodes):
        stuck = sorted({name for name in waiting})[:5]
        raise ValueError(f"graph has a cycle or unproduced inputs, e.g. {stuck}")
    return order


def _replace_nodes(model: ModelProto, nodes: list[NodeProto]) -> None:
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _value_info_from_dims(tensor: TensorProto) -> ValueInfoProto:
    """The converter's `make_value_info_from_tensor` without reading the weights (often on disk)."""
    return helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))


def to_fp16(model: ModelProto) -> ModelProto:
    """A repaired fp16 copy of the shape-inferred lean fp32 `model`; inputs/outputs stay float32."""
    fp32 = ModelProto()
    fp32.CopyFrom(model)
    with mock.patch.object(float16, "make_value_info_from_tensor", _value_info_from_dims):
        converted: ModelProto = convert_float_to_float16(
            fp32, keep_io_types=True, node_block_list=sorted(fp32_nodes(fp32)), op_block_list=sorted(FP32_OPS)
        )
    del fp32
    _replace_nodes(converted, toposort(converted, _drop_duplicate_nodes(list(converted.graph.node))))
    converted = _reinfer(converted)  # fresh types tell which Casts start from float32
    _replace_nodes(
        converted, _drop_dead_nodes(converted, _remove_round_trips(converted, list(converted.graph.node)))
    )
    name_nodes(converted)
    return _reinfer(converted)


def _reinfer(model: ModelProto) -> ModelProto:
    """Shape inference from scratch: the converter's value_info is partly stale."""
    del model.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(model, data_prop=True)
