"""The LoRA-capable twin of a model's graph, for ONNX Runtime and OpenVINO.

Every LoRA-targetable weight (targets.py: the Linear and Conv weights of CLIP or a UNet) is a graph
input instead of an initializer; each run feeds the merged array where a LoRA touched the weight
and the bundle's own array (a read-only memory map of the bundle file: no copy) everywhere else.
So a switch between LoRA sets costs the merge only: the session is created once per model, not per
LoRA set. Requests without LoRA never touch this graph: they run the plain session as before, so
their results stay bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.lora import WeightSet
from runtime.lora.graph import lora_variant, read_graph
from runtime.lora.targets import weight_ops


@dataclass(frozen=True)
class LoraGraph:
    model: str
    onnx: bytes  # the variant graph (the rest of its initializers inline)
    base: dict[str, np.ndarray]  # every weight input's bundle value (memory maps)

    def feeds(self, feeds: dict[str, np.ndarray], weights: WeightSet) -> dict[str, np.ndarray]:
        """The model's own inputs plus every weight input: merged where `weights` has it."""
        unknown = set(weights.arrays) - set(self.base)
        if unknown:  # a WeightSet prepared from another graph file: a bug, not a bad request
            raise ValueError(f"{self.model}: weights {sorted(unknown)[:3]} are not inputs of its LoRA graph")
        return {**feeds, **self.base, **weights.arrays}


def lora_graph(model: str, source: Path) -> LoraGraph:
    """The LoRA-capable graph of the (verified) ONNX file `source`: every Linear and Conv weight an input."""
    graph = read_graph(source)
    names = sorted({name for _, name, _ in weight_ops(graph)})
    return LoraGraph(model, lora_variant(graph, names), {name: graph.array(name) for name in names})
