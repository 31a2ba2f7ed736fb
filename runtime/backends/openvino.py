"""OpenVINO backend (CPU): the bundle's fp32 ONNX graphs, computed in fp32 or in bf16, or its int8 UNet.

Why a second CPU engine: on processors with bf16 instructions (AVX512_BF16, AMX) OpenVINO's bf16
kernels run the SD 1.5 UNet about twice as fast as fp32 ONNX Runtime, and its fp32 kernels are
faster too. Precision "bf16" computes the UNet and the VAE decoder in bf16 (~99 % of the time);
CLIP and the deprojector stay fp32, since their errors would reach every later step for ~1 % of
the time. "fp32" matches ONNX Runtime to float rounding. "int8" runs the bundle's int8 models
(OpenVINO IR written by `python -m export --int8`, see export/int8.py: the UNet, and as exported the
step-caching pair and the VAE decoder) with their remaining ops in fp32, and every other model in fp32.
"int8-bf16" composes the two on a bf16 CPU: the same int8 models with their remaining ops in bf16, the
models without int8 files as "bf16" runs them (README "int8 and bf16 together").

Each ONNX graph is converted once to OpenVINO IR and cached beside the bundle (`.ov_cache/`), keyed
by model, precision, OpenVINO version and the source's sha256. OpenVINO memory-maps an IR's
weights, so a start reads only what it runs; for bf16 they are stored as fp16 (half the pages).
A read-only bundle compiles straight from the ONNX graph (slower start, more memory).

With `static_shapes`, each model is compiled per request shape (`reshape` to the exact input
shapes, then compile; a few shapes kept per model, see loading.ShapeCache): the first call at a new
shape pays the compile, later ones run the shape-specialised kernels. A shape that fails to
compile runs on the dynamic model, compiled only then.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends.base import BackendError
from runtime.backends.config import (
    BF16_PRECISIONS,
    INT8_PRECISIONS,
    BackendConfig,
    bundle_files,
    check_bundle_precision,
)
from runtime.backends.loading import (
    BackgroundLoads,
    ShapeCache,
    Shapes,
    cache_intact,
    checked_entry,
    derived_path,
    drop_mapped_pages,
    input_shapes,
    own_config,
    seal_cache,
    writable,
)
from runtime.bundle import Bundle
from runtime.cpu import cpu_flags, int8_dot_instructions, is_x86
from runtime.lora import WeightSet
from runtime.lora.variant import LoraGraph, lora_graph
from runtime.manifest import FileEntry
from runtime.specs import DEEPCACHE_FULL, DEEPCACHE_SHALLOW

log = logging.getLogger(__name__)

# Where the time goes (the UNet and its step-caching halves, the VAE); the rest stays fp32.
BF16_MODELS = frozenset({"unet", DEEPCACHE_FULL, DEEPCACHE_SHALLOW, "vae_encoder", "vae_decoder"})
# One conversion at a time: each holds a whole fp32 graph in memory (3.4 GB for the SD 1.5 UNet),
# and convert_model sets the root logger's level (restoring it only when it succeeds), which two at
# once would garble.
_CONVERT_LOCK = threading.Lock()


def _openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise BackendError(f"OpenVINO is not installed ({exc}): pip install 'sdrt[openvino]'") from exc
    return openvino


def cpu_has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin has native bf16 kernels on this machine."""
    capabilities = _openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "BF16" in capabilities


def int8_saturation_warning(bundle: Bundle, flags: frozenset[str]) -> str | None:
    """Why the bundle's int8 models lose accuracy on a CPU with these flags, or None. Quantized with
    8-bit weights past the first layer (NNCF's default overflow fix, and every bundle made before
    the choice was recorded), their int8 convolutions saturate on an x86 CPU without VNNI or AMX."""
    record = bundle.manifest.int8
    if record is None or record.overflow_fix != "first_layer_only":
        return None
    if not is_x86(flags) or int8_dot_instructions(flags):
        return None
    return (
        "this bundle's int8 models keep 8-bit weights (overflow fix first_layer_only), which saturate "
        'on a CPU without VNNI or AMX like this one and lose accuracy (README "int8"); quantize them '
        f"for it: run the bundle's `python -m export ... --out {bundle.root}` again with --int8 "
        "--int8-overflow-fix enable"
    )


class OvBackend:
    device = "cpu"

    def __init__(self, bundle: Bundle, config: BackendConfig | None = None):
        config = own_config("openvino", config)
        assert config.precision is not None
        precision = config.precision
        ov = _openvino()
        if precision in BF16_PRECISIONS and not cpu_has_bf16():
            instead = "int8" if precision in INT8_PRECISIONS else "fp32"
            raise BackendError(
                f"precision {precision} needs a CPU with bf16 instructions (AVX512_BF16 or AMX), which "
                f"this one lacks; use precision {instead}"
            )
        check_bundle_precision(bundle, precision)  # fail now, not mid-generation
        if precision in INT8_PRECISIONS and (warning := int8_saturation_warning(bundle, cpu_flags())):
            log.warning("%s", warning)
        self.bundle, self.config, self.precision = bundle, config, precision
        self.threads, self.cache_ir = config.threads, config.cache_graphs
        self._core = ov.Core()
        self._version = ov.get_version().split("-")[0]
        self._compiled = BackgroundLoads(bundle, self._compile, self._load_path)
        # static shapes: the IR (converted in the background by `prepare`), then a compile per shape
        self._ready = BackgroundLoads(bundle, self._ready_path, self._load_path)
        self.static: ShapeCache[_ShapeModel] | None = (
            ShapeCache(self._compile_shapes) if config.static_shapes else None
        )
        self._requests = threading.local()  # per thread: model -> InferRequest (not thread-safe)
        self._mapped: dict[str, list[Path]] = {}  # model -> the files its compiled model maps
        self._shapes_seen: set[tuple[object, ...]] = set()
        # LoRA (runtime/lora/variant.py): a model with a weight set runs its LoRA-capable graph
        self._weights: dict[str, WeightSet] = {}
        self._lora = BackgroundLoads(bundle, self._compile_lora, self._load_path)
        self._lora_requests = threading.local()  # per thread: model -> InferRequest of its LoRA graph

    def _in_bf16(self, model: str) -> bool:
        """Whether the model computes in bf16 (its int8 ops stay int8): CLIP and the deprojector never."""
        return self.precision in BF16_PRECISIONS and model in BF16_MODELS

    def _model_precision(self, model: str) -> str:
        """Which variant of the model is compiled (also the IR cache's key): int8, bf16 or fp32."""
        files = bundle_files(self.precision, model, self.bundle)
        return "bf16" if files == "fp32" and self._in_bf16(model) else files

    def _source(self, model: str) -> FileEntry:
        """The standard fp32 graph (OpenVINO fuses attention itself), or the bundle's int8 IR."""
        return self.bundle.graph(model, bundle_files(self.precision, model, self.bundle))

    def _bundle_ir(self, model: str) -> bool:
        """Whether the bundle holds this model as OpenVINO IR already (int8): nothing to convert."""
        return self._source(model).file.endswith(".xml")

    def _ir_path(self, model: str) -> Path:
        key = [model, self._model_precision(model), f"ov{self._version}"]
        return derived_path(self.bundle, ".ov_cache", key, self._source(model).sha256, ".xml")

    def _load_path(self, model: str) -> Path:
        """What a compile reads: the bundle's IR, the cached IR when there is one, else the ONNX graph."""
        ir = self._ir_path(model)
        if self._bundle_ir(model) or not (self.cache_ir and ir.is_file()):
            return self.bundle.root / self._source(model).file
        return ir

    def _write_ir(self, model: str, ir: Path) -> None:
        """ONNX -> IR under temp names, renamed into place (.bin first: an .xml means complete)."""
        ov = _openvino()
        tmp = ir.with_name(ir.stem + ".tmp.xml")
        try:
            with _CONVERT_LOCK:  # the level is read inside: another conversion may have set it
                root_level = logging.getLogger().level
                try:
                    graph = ov.convert_model(str(self.bundle.root / self._source(model).file))
                finally:  # a failed conversion leaves the root logger at ERROR: every warning lost
                    logging.getLogger().setLevel(root_level)
                ov.save_model(graph, str(tmp), compress_to_fp16=self._model_precision(model) == "bf16")
                del graph  # free its weights before the compile maps the IR's
            os.replace(tmp.with_suffix(".bin"), ir.with_suffix(".bin"))
            os.replace(tmp, ir)
        finally:
            for leftover in (tmp, tmp.with_suffix(".bin")):
                leftover.unlink(missing_ok=True)

    def _ready_path(self, model: str) -> Path:
        """Verify the source, write its IR if the cache lacks it; the path a compile reads."""
        self.bundle.verified_path(self._source(model))  # even when the IR cache is used
        if self._bundle_ir(model):  # int8: the bundle's own IR, nothing to convert or cache
            return self._load_path(model)
        ir = self._ir_path(model)
        if self.cache_ir and not cache_intact(self.bundle, ir) and writable(ir.parent):
            try:
                self._write_ir(model, ir)
            except Exception as exc:  # OpenVINO raises its own untyped errors
                raise BackendError(f"could not convert {model} to OpenVINO IR: {exc}") from exc
            seal_cache(ir)
        return self._load_path(model)

    def _compile_config(self, model: str) -> dict[str, Any]:
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": "bf16" if self._in_bf16(model) else "f32",
            "PERFORMANCE_HINT": "LATENCY",
            # Pinning would put the threads of every process on the same first cores: replicas
            # sharing a host (Ray Serve, several workers) would then share one core each.
            "ENABLE_CPU_PINNING": False,
        }
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        return config

    def _remember_mapped(self, model: str, path: Path) -> None:
        """What a compiled model keeps mapped: an IR's .bin, or the ONNX graph and its data."""
        ir = path.suffix == ".xml"
        self._mapped[model] = (
            [path.with_suffix(".bin")] if ir else [path, path.with_name(path.name + ".data")]
        )

    def _compile(self, model: str) -> Any:
        path = self._ready_path(model)
        config = self._compile_config(model)
        try:
            compiled = self._core.compile_model(str(path), "CPU", config)
        except Exception as exc:
            raise BackendError(f"could not load {model} ({self.precision}) from {path}: {exc}") from exc
        log.debug("compiled %s from %s (%s)", model, path, config)
        self._remember_mapped(model, path)
        return compiled

    def _compile_lora(self, model: str) -> tuple[Any, LoraGraph]:
        """The model's LoRA-capable graph (weights as inputs), converted from the fp32 or fp16 ONNX
        file in memory and compiled like the plain one; not cached (it converts in seconds)."""
        graph = lora_graph(model, self.bundle.verified_path(self._source(model)))
        ov = _openvino()
        try:
            with _CONVERT_LOCK:
                root_level = logging.getLogger().level
                try:
                    converted = ov.convert_model(io.BytesIO(graph.onnx))
                finally:
                    logging.getLogger().setLevel(root_level)
            compiled = self._core.compile_model(converted, "CPU", self._compile_config(model))
        except Exception as exc:
            raise BackendError(f"could not load the LoRA graph of {model} ({self.precision}): {exc}") from exc
        return compiled, graph

    def set_weights(self, model: str, weights: WeightSet | None) -> None:
        """Later runs of `model` use its LoRA graph fed these weights (None: the plain model)."""
        if weights is None or not weights.arrays:
            self._weights.pop(model, None)
            return
        if self._bundle_ir(model):
            raise BackendError(f"{model}: LoRA cannot change the weights of an int8 model; use fp32 or bf16")
        self._weights[model] = weights
        self._lora.start(model)

    def _lora_request(self, model: str) -> tuple[Any, LoraGraph]:
        if not hasattr(self._lora_requests, "by_model"):
            self._lora_requests.by_model = {}
        requests: dict[str, tuple[Any, LoraGraph]] = self._lora_requests.by_model
        if model not in requests:
            compiled, graph = self._lora.get(model)
            requests[model] = (compiled.create_infer_request(), graph)
        return requests[model]

    def _compile_shapes(self, model: str, shapes: Shapes) -> _ShapeModel:
        """Read the model (the cached IR: mapped, cheap), fix its inputs to `shapes`, compile."""
        path = self._ready.get(model)  # done: `run` waited for it
        graph = self._core.read_model(str(path))
        names = self.bundle.models[model].spec.input_names
        graph.reshape({name: list(shape) for name, shape in zip(names, shapes, strict=True)})
        compiled = self._core.compile_model(graph, "CPU", self._compile_config(model))
        self._remember_mapped(model, path)
        return _ShapeModel(compiled)

    def prepare(self, models: Iterable[str]) -> None:
        """Start compiling these models in background threads; `run` waits only if needed."""
        for model in models:
            (self._compiled if self.static is None else self._ready).start(model)

    def _request(self, model: str) -> Any:
        if not hasattr(self._requests, "by_model"):
            self._requests.by_model = {}
        requests: dict[str, Any] = self._requests.by_model
        if model not in requests:
            requests[model] = self._compiled.get(model).create_infer_request()
        return requests[model]

    def run(self, model: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        entry = checked_entry(self.bundle, model, feeds)
        static = None
        weights = self._weights.get(model)
        if weights is not None:
            request, graph = self._lora_request(model)
            feeds = graph.feeds(feeds, weights)
        elif self.static is not None:
            self._ready.get(model)  # its errors (integrity, conversion) are not a shape's failure
            static = self.static.get(model, input_shapes(entry, feeds))
        if weights is None:
            request = self._request(model) if static is None else static.request()
        try:
            # share_inputs: no copy of the feeds; outputs are copied out (the request reuses them)
            outputs = request.infer(feeds, share_inputs=True)
            result = {name: outputs[name] for name in entry.spec.output_names}
        except Exception as exc:
            shapes = {k: v.shape for k, v in feeds.items()}
            raise BackendError(f"{model} failed on inputs {shapes}: {exc}") from exc
        shape_key = (model, *(v.shape for v in feeds.values()))
        if weights is None and shape_key not in self._shapes_seen:  # a new shape may have repacked weights
            self._shapes_seen.add(shape_key)
            dropped = drop_mapped_pages(self._mapped[model])
            log.debug("%s: released %.2f GB of mapped weights", model, dropped / 1e9)
        return result

    def close(self) -> None:
        self._compiled.close()
        self._ready.close()
        self._lora.close()
        self._lora_requests = threading.local()
        if self.static is not None:
            self.static.clear()
        self._requests = threading.local()


class _ShapeModel:
    """A model compiled for one shape, with one infer request per calling thread; dropped with it
    when the shape cache evicts it."""

    def __init__(self, compiled: Any):
        self.compiled = compiled
        self._requests = threading.local()

    def request(self) -> Any:
        if not hasattr(self._requests, "request"):
            self._requests.request = self.compiled.create_infer_request()
        return self._requests.request
