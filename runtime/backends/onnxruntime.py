"""ONNX Runtime backend: CPU by default, CUDA / TensorRT execution providers when present.

Sessions are created on first use (a pipeline that never deprojects never loads that model),
or ahead of it in background threads when the pipeline calls `prepare` (the UNet then loads while
CLIP runs, the VAE during the denoising loop). The optimised graph is cached beside the bundle,
keyed by source hash, provider and ORT version, so the second start skips ORT's graph
optimisation (10-20 s for the SD 1.5 UNet).

On CUDA, ORT runs fp32 MatMul/Conv in TF32 by default (Ampere and newer): faster, but ~1e-3 off
fp32. `OrtBackend(..., tf32=False)` sets the CUDA provider's `use_tf32=0` for parity runs.

With `static_shapes` (CPU), each model gets a session per request shape, its symbolic dims fixed by
free-dimension overrides before ORT optimises the graph (a few shapes kept per model, see
loading.ShapeCache). A shape whose session fails runs on the dynamic session, created only then.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime.backends.base import BackendError
from runtime.backends.config import BackendConfig, check_bundle_precision
from runtime.backends.loading import (
    BackgroundLoads,
    ShapeCache,
    Shapes,
    cache_intact,
    checked_entry,
    derived_path,
    input_shapes,
    own_config,
    seal_cache,
    writable,
)
from runtime.bundle import Bundle
from runtime.lora import WeightSet
from runtime.lora.variant import LoraGraph, lora_graph
from runtime.manifest import FileEntry

log = logging.getLogger(__name__)

_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
_EXTERNAL_DATA_THRESHOLD = 1024  # bytes; keeps > 2 GB optimised graphs saveable


_GPU_ADVICE = (
    "install onnxruntime-gpu with the CUDA libraries for the driver's CUDA major "
    "(onnxruntime-gpu[cuda,cudnn]: >=1.27 for CUDA 13, <1.27 for CUDA 12; see scripts/gpu_check.sh)"
)


@functools.cache
def preload_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries of the nvidia-* wheels (onnxruntime-gpu's [cuda,cudnn]
    extras) before the first CUDA session, once per process: ORT itself looks only on the system
    library path. A no-op on ORT's CPU build; ORT < 1.21 lacks it (then the system path it is)."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception as exc:  # the provider check after session creation reports what is missing
        log.warning("onnxruntime.preload_dlls failed: %s", exc)


def check_provider(session: ort.InferenceSession, wanted: str, model: str) -> None:
    """Refuse a session that silently fell back: `get_available_providers()` lists what ORT was
    compiled with, not what could load, so without this a missing CUDA library means CPU compute
    and then a confusing failure on the first device-bound input."""
    active = session.get_providers()
    if not active or active[0] != wanted:
        raise BackendError(
            f"{model}: ONNX Runtime could not start {wanted} (the session would run on "
            f"{', '.join(active) or 'nothing'}): its libraries are missing or do not match the driver; "
            f"{_GPU_ADVICE}"
        )


class OrtBackend:
    def __init__(self, bundle: Bundle, config: BackendConfig | None = None, *, tf32: bool = True):
        config = own_config("onnxruntime", config)
        assert config.device is not None and config.precision is not None
        available = ort.get_available_providers()
        if _PROVIDERS[config.device][0] not in available:
            raise BackendError(
                f"device {config.device!r} needs {_PROVIDERS[config.device][0]}, which this onnxruntime "
                f"lacks (available: {', '.join(available)}); {_GPU_ADVICE}, or use device 'cpu'"
            )
        check_bundle_precision(bundle, config.precision)  # fail now, not mid-generation
        if config.device != "cpu":
            preload_cuda_libraries()
        self.bundle, self.config, self.tf32 = bundle, config, tf32
        self.precision, self.device = config.precision, config.device
        self.threads, self.cache_optimized = config.threads, config.cache_graphs
        self._sessions = BackgroundLoads(bundle, self._create, self._load_path)
        # static shapes: the verified source (checked in the background by `prepare`), then a
        # session per shape
        self._ready = BackgroundLoads(bundle, self._verified_source, self._source_path)
        self.static: ShapeCache[ort.InferenceSession] | None = (
            ShapeCache(self._create_static) if config.static_shapes else None
        )
        self._resident = threading.local()  # per thread: (model, input) -> (array, device copy)
        # LoRA (runtime/lora/variant.py): a model with a weight set runs its LoRA-capable session
        self._weights: dict[str, WeightSet] = {}
        self._lora = BackgroundLoads(bundle, self._create_lora, self._source_path)

    def _provider_options(self) -> list[tuple[str, dict[str, str]]]:
        cache = str(self.bundle.root / ".trt_cache")
        options: dict[str, dict[str, str]] = {
            "TensorrtExecutionProvider": {
                # Off for both precisions: the EP then builds a strongly typed network that obeys
                # the types in the ONNX (fp16 bundle files keep Sin/Cos and softmax in fp32); on, it
                # builds weakly typed and may run those in fp16 too. TensorRT 11 removed the flag.
                "trt_fp16_enable": "False",
                "trt_engine_cache_enable": "True",
                "trt_engine_cache_path": cache,
                "trt_timing_cache_enable": "True",
                "trt_timing_cache_path": cache,
            },
            "CUDAExecutionProvider": {"use_tf32": "1" if self.tf32 else "0"},
        }
        return [(p, options.get(p, {})) for p in _PROVIDERS[self.device]]

    def _source(self, model: str) -> FileEntry:
        """The graph to load: the ORT-fused variant unless TensorRT runs it (its parser lacks ORT's
        contrib ops, which would push those nodes back to CUDA)."""
        return self.bundle.graph(model, self.precision, fused=self.device != "tensorrt")

    def _cache_path(self, model: str) -> Path:
        key = [model, self.precision, self.device, f"ort{ort.__version__}"]
        return derived_path(self.bundle, ".ort_cache", key, self._source(model).sha256, ".onnx")

    def _caches(self) -> bool:
        return self.cache_optimized and self.device == "cpu"

    def _session_options(self) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if self.threads:
            opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # The CPU arena keeps each session's peak activations reserved between calls; without it
        # the SD 1.5 UNet's resident memory drops ~0.2 GiB at no measurable cost per step.
        opts.enable_cpu_mem_arena = self.device != "cpu"
        return opts

    def _source_path(self, model: str) -> Path:
        return self.bundle.root / self._source(model).file

    def _verified_source(self, model: str) -> Path:
        return self.bundle.verified_path(self._source(model))

    def _create_static(self, model: str, shapes: Shapes) -> ort.InferenceSession:
        """A session for exactly `shapes`: every symbolic input dim overridden by its value, then
        the full graph optimisation (which may then fold shape computations)."""
        spec = self.bundle.models[model].spec
        dims: dict[str, int] = {}
        for tensor, shape in zip(spec.inputs, shapes, strict=True):
            for dim, value in zip(tensor.shape, shape, strict=True):
                if isinstance(dim, str) and dims.setdefault(dim, value) != value:
                    raise ValueError(f"dim {dim} is {dims[dim]} in one input and {value} in {tensor.name}")
        opts = self._session_options()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        for dim, value in dims.items():
            opts.add_free_dimension_override_by_name(dim, value)
        path = self._ready.get(model)  # done: `run` waited for it
        return ort.InferenceSession(str(path), opts, providers=self._provider_options())

    def _create(self, model: str) -> ort.InferenceSession:
        opts = self._session_options()
        source = self.bundle.verified_path(self._source(model))  # even when the cache is used
        cached = self._cache_path(model)
        if self._caches() and cache_intact(self.bundle, cached):
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            path = cached
        else:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            path = source
            if self._caches() and writable(cached.parent):
                # ORT writes the optimised graph while creating the session: give it a temp name
                # and rename afterwards, so a crash never leaves a half-written cache entry.
                opts.optimized_model_filepath = str(cached.with_suffix(".tmp"))
                opts.add_session_config_entry(
                    "session.optimized_model_external_initializers_file_name", cached.name + ".data"
                )
                opts.add_session_config_entry(
                    "session.optimized_model_external_initializers_min_size_in_bytes",
                    str(_EXTERNAL_DATA_THRESHOLD),
                )
        try:
            session = ort.InferenceSession(str(path), opts, providers=self._provider_options())
        except Exception as exc:  # ORT raises its own untyped errors
            raise BackendError(f"could not load {model} ({self.precision}) from {path}: {exc}") from exc
        check_provider(session, _PROVIDERS[self.device][0], model)
        if opts.optimized_model_filepath and Path(opts.optimized_model_filepath).is_file():
            os.replace(opts.optimized_model_filepath, cached)
            seal_cache(cached)
        log.debug("loaded %s from %s", model, path)
        return session

    def _create_lora(self, model: str) -> tuple[ort.InferenceSession, LoraGraph]:
        """The model's LoRA-capable session: its weights are inputs (fully optimised, not cached)."""
        graph = lora_graph(model, self._verified_source(model))
        opts = self._session_options()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            session = ort.InferenceSession(graph.onnx, opts, providers=self._provider_options())
        except Exception as exc:
            raise BackendError(f"could not load the LoRA graph of {model} ({self.precision}): {exc}") from exc
        check_provider(session, _PROVIDERS[self.device][0], model)
        return session, graph

    def set_weights(self, model: str, weights: WeightSet | None) -> None:
        """Later runs of `model` use its LoRA session fed these weights (None: the plain session)."""
        if weights is None or not weights.arrays:
            self._weights.pop(model, None)
            return
        self._weights[model] = weights
        self._lora.start(model)

    def _load_path(self, model: str) -> Path:
        cached = self._cache_path(model)
        return cached if self._caches() and cached.is_file() else self.bundle.root / self._source(model).file

    def prepare(self, models: Iterable[str]) -> None:
        """Start loading these models in background threads; `run` waits for a model only if its
        load has not finished. A failed load is reported by the first `run` of that model."""
        for model in models:
            (self._sessions if self.static is None else self._ready).start(model)

    def session(self, model: str) -> ort.InferenceSession:
        return self._sessions.get(model)

    def run(self, model: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        entry = checked_entry(self.bundle, model, feeds)
        session = None
        weights = self._weights.get(model)
        if weights is not None:
            session, graph = self._lora.get(model)
            feeds = graph.feeds(feeds, weights)
        elif self.static is not None:
            self._ready.get(model)  # its errors (integrity) are not a shape's failure
            session = self.static.get(model, input_shapes(entry, feeds))
        if session is None:
            session = self.session(model)
        try:
            if self.device == "cpu":
                outputs = session.run(entry.spec.output_names, feeds)
            else:
                outputs = self._run_bound(session, model, entry.spec.output_names, feeds)
        except Exception as exc:
            shapes = {k: v.shape for k, v in feeds.items()}
            raise BackendError(f"{model} failed on inputs {shapes}: {exc}") from exc
        return dict(zip(entry.spec.output_names, outputs, strict=True))

    def _run_bound(
        self, session: ort.InferenceSession, model: str, outputs: list[str], feeds: dict[str, np.ndarray]
    ) -> list[np.ndarray]:
        """IO binding on the GPU: outputs are allocated on the device and copied back once, and an
        input passed again as the same array (the text states, every denoising step) stays on the
        device instead of being uploaded per call."""
        if not hasattr(self._resident, "values"):
            self._resident.values = {}
        resident: dict[tuple[str, str], tuple[np.ndarray, ort.OrtValue]] = self._resident.values
        binding = session.io_binding()
        for name, array in feeds.items():
            key = (model, name)
            if key not in resident or resident[key][0] is not array:
                value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", 0)
                resident[key] = (array, value)
            binding.bind_ortvalue_input(name, resident[key][1])
        for name in outputs:
            binding.bind_output(name, "cuda", 0)
        session.run_with_iobinding(binding)
        return list(binding.copy_outputs_to_cpu())

    def close(self) -> None:
        self._sessions.close()
        self._ready.close()
        self._lora.close()
        if self.static is not None:
            self.static.clear()
        self._resident = threading.local()
