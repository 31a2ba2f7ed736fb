"""Which ONNX initializer holds which diffusers module's weight, read from the graph itself.

The exporter (TorchScript, export/onnx_export.py) names every node by its module scope, e.g.
`/unet/down_blocks.0/attentions.0/transformer_blocks.0/attn1/to_q/MatMul`; from the model's first
top-level module on (`down_blocks.0`, CLIP's `encoder`) that is the diffusers module path. What
comes before it depends on the wrapper (`/unet/`, nothing for the step-caching UNets, which call
the blocks directly), so the path starts at the first known top-level name. CLIP's scope skips
CLIPTextModel's `text_model` level, which LoRA files name, so it is put back. A Linear becomes a
MatMul on a transposed initializer (`onnx::MatMul_1234`, stored (in, out)) or a Gemm (transB=1:
stored (out, in)); a Conv keeps its (out, in, kh, kw) weight. Where the initializer carries the
parameter's own name (`unet.conv_in.weight`), it must agree with the scope, or the node is left out.

Deduplication at export (export/graph.py) can make two modules read one initializer; a LoRA on
such a module would change the other one too, so merge.match refuses it by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.lora.graph import GraphFile, Node, read_graph

_WEIGHT_OPS = ("MatMul", "Gemm", "Conv")
# The top-level modules of diffusers' UNet2DConditionModel and of CLIPTextModel.text_model.
_UNET_ROOTS = (
    "time_embedding",
    "conv_in",
    "down_blocks",
    "mid_block",
    "up_blocks",
    "conv_norm_out",
    "conv_out",
)
_ROOTS = {"clip": ("text_model", "embeddings", "encoder", "final_layer_norm")}
_CLIP_ROOT = "text_model"


@dataclass(frozen=True)
class Target:
    module: str  # diffusers module path, e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    initializer: str
    transposed: bool  # stored (in, out): the Linear weight (out, in) transposed
    shape: tuple[int, ...]  # as stored
    dtype: np.dtype
    shared_with: tuple[str, ...]  # other modules reading the same initializer (deduplicated)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The torch layout: (out, in) or (out, in, kh, kw)."""
        return self.shape[::-1] if self.transposed else self.shape


def _module(node: Node, model: str) -> str | None:
    """The diffusers module path of a weight op, or None when its scope names no known module."""
    parts = node.name.strip("/").split("/")[:-1]  # the last part is the op's own name
    roots = _ROOTS.get(model, _UNET_ROOTS)
    start = next((i for i, part in enumerate(parts) if part.split(".")[0] in roots), None)
    if start is None or start == len(parts):
        return None
    module = ".".join(parts[start:])
    if model == "clip" and parts[start] != _CLIP_ROOT:
        module = f"{_CLIP_ROOT}.{module}"
    weight = node.inputs[1]
    named = not weight.startswith("onnx::") and weight.endswith(".weight")
    if named and not weight.removesuffix(".weight").endswith(module.removeprefix(f"{_CLIP_ROOT}.")):
        return None  # the parameter's own name disagrees with the scope: do not guess
    return module


def _gemm_transposed(node: Node) -> bool | None:
    """Whether a Gemm's B is stored (in, out); None if it transposes A (not a Linear)."""
    if node.attributes.get("transA", 0):
        return None
    return not node.attributes.get("transB", 0)


def weight_ops(graph: GraphFile) -> list[tuple[Node, str, bool]]:
    """(node, weight initializer, stored transposed) of every Linear / Conv op with a float weight."""
    ops = []
    for node in graph.nodes:
        if (
            node.op_type not in _WEIGHT_OPS
            or len(node.inputs) < 2
            or node.inputs[1] not in graph.initializers
        ):
            continue
        init = graph.initializers[node.inputs[1]]
        transposed = node.op_type == "MatMul" or (node.op_type == "Gemm" and _gemm_transposed(node))
        if transposed is None or init.dtype not in (np.float32, np.float16) or len(init.shape) not in (2, 4):
            continue
        ops.append((node, node.inputs[1], bool(transposed)))
    return ops


def _fingerprint(graph: GraphFile, name: str) -> tuple[object, ...]:
    """Shape, dtype and a strided sample of the values: tells weights apart without reading them all."""
    array = graph.array(name).reshape(-1)
    sample = array[:: max(1, array.size // 4096)]
    return (graph.initializers[name].shape, str(array.dtype), sample.tobytes(), array[-64:].tobytes())


@dataclass(frozen=True)
class Targets:
    """The LoRA-targetable weights of one graph file, by diffusers module path."""

    path: Path
    by_module: dict[str, Target]
    unmapped: tuple[str, ...]  # Linear / Conv weights no module was found for

    @classmethod
    def of(cls, graph: GraphFile, model: str) -> Targets:
        """From the node scopes (the UNet and CLIP graphs)."""
        found: dict[str, tuple[str, bool]] = {}
        for node, name, transposed in weight_ops(graph):
            module = _module(node, model)
            if module is None:
                continue
            # one module, two weight ops: not a plain Linear/Conv; leave it out
            found[module] = ("", False) if module in found else (name, transposed)
        return cls._build(graph, {m: v for m, v in found.items() if v[0]})

    @classmethod
    def matched(cls, graph: GraphFile, reference: GraphFile, model: str) -> Targets:
        """By content, against the standard UNet graph of the same file set: the step-caching
        UNets call the blocks directly, and their scopes lose the block names (`/resnets.0/…`),
        but they hold the same parameters. Weights equal in several modules are left out (they
        would be shared anyway)."""
        known = cls.of(reference, model)
        by_print: dict[tuple[object, ...], list[Target]] = {}
        for target in known.by_module.values():
            by_print.setdefault(_fingerprint(reference, target.initializer), []).append(target)
        found: dict[str, tuple[str, bool]] = {}
        for _, name, transposed in weight_ops(graph):
            candidates = by_print.get(_fingerprint(graph, name), [])
            if len({t.module for t in candidates}) != 1 or candidates[0].transposed != transposed:
                continue
            if np.array_equal(graph.array(name), reference.array(candidates[0].initializer)):
                found[candidates[0].module] = (name, transposed)
        return cls._build(graph, found)

    @classmethod
    def _build(cls, graph: GraphFile, found: dict[str, tuple[str, bool]]) -> Targets:
        readers: dict[str, list[str]] = {}
        for module, (name, _) in found.items():
            readers.setdefault(name, []).append(module)
        by_module = {}
        for module, (name, transposed) in found.items():
            init = graph.initializers[name]
            others = tuple(m for m in readers[name] if m != module)
            by_module[module] = Target(module, name, transposed, init.shape, init.dtype, others)
        mapped = {name for name, _ in found.values()}
        unmapped = sorted({name for _, name, _ in weight_ops(graph)} - mapped)
        return cls(graph.path, by_module, tuple(unmapped))

    @classmethod
    def read(cls, path: Path, model: str) -> Targets:
        return cls.of(read_graph(path), model)

    def underscored(self) -> dict[str, str]:
        """kohya name (dots written as underscores) -> module path, for names without collisions."""
        names: dict[str, list[str]] = {}
        for module in self.by_module:
            names.setdefault(module.replace(".", "_"), []).append(module)
        return {k: v[0] for k, v in names.items() if len(v) == 1}
