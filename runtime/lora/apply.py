"""Put a request's LoRA set on the backend: prepare (LRU), then `set_weights` where it changed.

The pipeline wraps each generation in `LoraState.using(loras)`: the same set as the running or
previous generation costs nothing (no file read, no backend call); another set waits for the
running generations to finish (`WeightGate`), then switches.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from runtime.backends.base import Backend
from runtime.backends.config import bundle_files
from runtime.bundle import Bundle
from runtime.errors import RequestError
from runtime.lora import LoraRef, LoraSettings, WeightSet
from runtime.lora.prepare import Key, LoraWeights, WeightGate, lora_key, lora_models


class LoraState:
    """One pipeline's LoRA bookkeeping: prepared sets, what the backend holds, the gate."""

    def __init__(self, bundle: Bundle, backend: Backend, settings: LoraSettings | None = None):
        self.bundle, self.backend = bundle, backend
        self.weights = LoraWeights(bundle, settings)
        self._gate = WeightGate()
        self._applied: dict[str, Key] = {}  # model -> key of the set the backend runs; absent: base

    def graph_file(self, model: str) -> str:
        """The bundle file whose initializer names the backend's weights use (the standard graph
        of the file set it runs: fp32 for bf16, fp16 on TensorRT)."""
        file_set = bundle_files(self.backend.precision, model, self.bundle)
        entry = self.bundle.graph(model, file_set)
        if not entry.file.endswith(".onnx"):
            raise RequestError(
                f"loras: the {file_set} {model} of this bundle is not an ONNX graph whose weights LoRA can "
                "change; use precision fp32 (or bf16 on openvino)"
            )
        self.bundle.verified_path(entry)  # the merge reads its weights
        return entry.file

    def _switch(self, loras: tuple[LoraRef, ...], key: Key) -> None:
        sets: dict[str, WeightSet] = {}
        if loras:
            graphs = {model: self.graph_file(model) for model in lora_models(self.bundle)}
            sets = self.weights.weight_sets(loras, graphs)
        for model in lora_models(self.bundle):
            wanted = sets.get(model)
            new_key = key if wanted is not None and wanted.arrays else ()
            if self._applied.get(model, ()) != new_key:
                self._applied.pop(model, None)  # unknown until set_weights returns
                self.backend.set_weights(model, wanted if new_key else None)
                self._applied[model] = new_key

    @contextmanager
    def using(self, loras: tuple[LoraRef, ...]) -> Iterator[None]:
        """Run the body with these LoRAs on the backend's weights (none: the bundle's own)."""
        key = lora_key(loras)
        with self._gate.hold(key, lambda: self._switch(loras, key)):
            yield
