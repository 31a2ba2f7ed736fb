"""TensorRT backend: the FP16 engines `python -m engines.build` made, run with cuda-python (no torch).

TensorRT demo/Diffusion's Engine lifecycle, kept inside the backend: the engine manifest is checked
when the backend opens (a stale or foreign engine is refused with the command that rebuilds it);
on first use a plan is verified (sha256) and deserialized; its device and pinned host buffers are
allocated once, at the largest shape its profiles allow, so tensor addresses never change; a call
picks the engine and profile for its shape, sets the input shapes, copies in, runs
`execute_async_v3` (or replays the CUDA graph captured for that shape) and copies out, all on the
backend's one stream. `tensorrt` and `cuda` are imported inside functions: importing this module
needs neither.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import threading
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from runtime.backends.base import BackendError, check_feeds
from runtime.backends.trt_manifest import (
    DEFAULT_DIR,
    PRECISION,
    EngineEntry,
    EngineManifestError,
    GpuEnvironment,
    build_command,
    read_manifest,
    source_onnx,
    stale_reasons,
)
from runtime.backends.trt_shapes import (
    NoProfile,
    Shape,
    input_ranges,
    max_input_shapes,
    nbytes,
    plan_calls,
)
from runtime.bundle import Bundle
from runtime.specs import ModelSpec

if TYPE_CHECKING:
    import tensorrt as trt

log = logging.getLogger(__name__)


class TensorRTUnavailable(BackendError):
    """TensorRT, cuda-python or a CUDA device is missing: the TensorRT path cannot run here."""


def require_tensorrt() -> str:
    """Fail with an explanation unless the real TensorRT imports; returns its version.

    `tensorrt-stubs` alone leaves an importable but empty `tensorrt` namespace package behind.
    """
    advice = "install the gpu extra on an NVIDIA GPU host (scripts/gpu_check.sh)"
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailable(f"TensorRT is not installed ({exc}): {advice}") from exc
    version = getattr(trt, "__version__", None)
    if not isinstance(version, str) or not hasattr(trt, "Runtime"):
        raise TensorRTUnavailable(f"only TensorRT's type stubs are installed, not TensorRT: {advice}")
    return version


def cudart() -> Any:
    """cuda-python's runtime API module (untyped: it ships no stubs)."""
    try:
        from cuda.bindings import runtime
    except ImportError as exc:
        raise TensorRTUnavailable(f"cuda-python is not installed ({exc}): install the gpu extra") from exc
    return runtime


def cuda_call(result: Any, what: str) -> Any:
    """cuda-python returns (error, value...) tuples: raise on error, else return the value."""
    rt = cudart()
    err, *values = result
    if err != rt.cudaError_t.cudaSuccess:
        message = rt.cudaGetErrorString(err)[1]
        raise BackendError(f"CUDA {what} failed: {err!r}: {message.decode(errors='replace')}")
    return values[0] if len(values) == 1 else None


def cuda_version(value: int) -> str:
    """CUDA's integer versions (12080) as '12.8'."""
    return f"{value // 1000}.{value % 1000 // 10}"


def probe_environment(device: int = 0) -> GpuEnvironment:
    """What a plan's validity depends on (TensorRT, GPU architecture) plus what helps diagnose it."""
    version = require_tensorrt()
    rt = cudart()
    err, count = rt.cudaGetDeviceCount()
    if err != rt.cudaError_t.cudaSuccess or count <= device:
        reason = (
            rt.cudaGetErrorString(err)[1].decode()
            if err != rt.cudaError_t.cudaSuccess
            else f"{count} devices"
        )
        raise TensorRTUnavailable(f"no CUDA device {device} ({reason})")
    prop = cuda_call(rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return GpuEnvironment(
        tensorrt=version,
        cuda_runtime=cuda_version(int(cuda_call(rt.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion"))),
        cuda_driver=cuda_version(int(cuda_call(rt.cudaDriverGetVersion(), "cudaDriverGetVersion"))),
        gpu=name.rstrip("\x00").strip(),
        compute_capability=f"{prop.major}.{prop.minor}",
    )


def make_logger(tail: deque[str] | None = None) -> trt.ILogger:
    """A TensorRT logger that forwards to `logging` and keeps recent messages for error reports."""
    import tensorrt as trt

    severity = trt.ILogger.Severity
    levels = {
        severity.INTERNAL_ERROR: logging.ERROR,
        severity.ERROR: logging.ERROR,
        severity.WARNING: logging.WARNING,
        severity.INFO: logging.DEBUG,
    }

    class Logger(trt.ILogger):  # type: ignore[misc, unused-ignore]  # Any when mypy lacks the stubs
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, level: trt.ILogger.Severity, msg: str) -> None:
            if level not in levels:  # VERBOSE
                return
            log.log(levels[level], "TensorRT: %s", msg)
            if tail is not None:
                tail.append(f"[{level.name}] {msg}")

    return Logger()


def _shape(dims: trt.Dims) -> Shape:
    return tuple(int(dims[i]) for i in range(len(dims)))


class _Buffer:
    """One I/O tensor's device memory and its pinned host staging area, allocated once."""

    def __init__(self, size: int) -> None:
        rt = cudart()
        self.size = size
        self.device = int(cuda_call(rt.cudaMalloc(size), "cudaMalloc"))
        self.host_ptr = int(cuda_call(rt.cudaMallocHost(size), "cudaMallocHost"))
        self.host = np.ctypeslib.as_array((ctypes.c_ubyte * size).from_address(self.host_ptr))

    def free(self) -> None:
        rt = cudart()
        cuda_call(rt.cudaFree(self.device), "cudaFree")
        cuda_call(rt.cudaFreeHost(self.host_ptr), "cudaFreeHost")


class _Engine:
    """One deserialized plan: its execution context, buffers and CUDA graph for the current shape."""

    def __init__(
        self,
        entry: EngineEntry,
        spec: ModelSpec,
        plan: Path,
        runtime: trt.Runtime,
        stream: Any,
        cuda_graphs: bool,
    ) -> None:
        import tensorrt as trt

        data = plan.read_bytes()
        if hashlib.sha256(data).hexdigest() != entry.plan_sha256:
            raise BackendError(f"plan {plan} is corrupt: its sha256 differs from the manifest's")
        engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise BackendError(
                f"TensorRT could not deserialize plan {plan} (corrupt or built by another version)"
            )
        context = engine.create_execution_context()
        if context is None:
            raise BackendError(
                f"TensorRT could not create an execution context for {plan} (out of GPU memory?)"
            )
        self.engine, self.context, self.spec, self.entry = engine, context, spec, entry
        self.stream, self.handle = stream, int(stream)
        self.cuda_graphs = cuda_graphs
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        expected = {t.name: t.dtype for t in (*spec.inputs, *spec.outputs)}
        if names != set(expected) or engine.num_optimization_profiles != len(entry.profiles):
            raise BackendError(
                f"plan {plan} has I/O {sorted(names)} and {engine.num_optimization_profiles} profiles; "
                f"the manifest and bundle expect {sorted(expected)} and {len(entry.profiles)}"
            )
        trt_dtypes = {
            "float32": trt.DataType.FLOAT,
            "float16": trt.DataType.HALF,
            "int32": trt.DataType.INT32,
        }
        for name, dtype in expected.items():
            if engine.get_tensor_dtype(name) != trt_dtypes.get(dtype):
                raise BackendError(
                    f"plan {plan}: tensor {name} is {engine.get_tensor_dtype(name)}, expected {dtype}"
                )
        self.profile = -1
        self.shapes: dict[str, Shape] = {}
        self.graph: Any = None
        self.graph_exec: Any = None
        self.buffers: dict[str, _Buffer] = {}  # none yet while _buffer_sizes switches profiles
        self.buffers = {name: _Buffer(size) for name, size in self._buffer_sizes().items()}
        self._bind()

    def _bind(self) -> None:
        for name, buffer in self.buffers.items():
            self.context.set_tensor_address(name, buffer.device)

    def _select(self, profile: int) -> None:
        """Switch the context to `profile`; tensor shapes and addresses are set again after it."""
        if not self.context.set_optimization_profile_async(profile, self.handle):
            raise BackendError(f"{self.entry.name}: TensorRT refused optimisation profile {profile}")
        cuda_call(cudart().cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        self.profile, self.shapes = profile, {}
        self._drop_graph()
        self._bind()

    def _set_shapes(self, shapes: dict[str, Shape]) -> None:
        for name, shape in shapes.items():
            if not self.context.set_input_shape(name, shape):
                raise BackendError(
                    f"{self.entry.name}: shape {shape} of {name} is outside profile {self.profile}"
                )
        self.shapes = shapes
        self._drop_graph()

    def _buffer_sizes(self) -> dict[str, int]:
        """Bytes per tensor at the largest shape any profile allows (outputs as TensorRT infers them)."""
        itemsize = {t.name: np.dtype(t.dtype).itemsize for t in (*self.spec.inputs, *self.spec.outputs)}
        sizes = {
            n: nbytes(s, itemsize[n]) for n, s in max_input_shapes(self.spec, self.entry.profiles).items()
        }
        for k, profile in enumerate(self.entry.profiles):
            self._select(k)
            self._set_shapes(
                {name: largest for name, (_, _, largest) in input_ranges(self.spec, profile).items()}
            )
            for name in self.spec.output_names:
                size = nbytes(_shape(self.context.get_tensor_shape(name)), itemsize[name])
                sizes[name] = max(sizes.get(name, 0), size)
        return sizes

    def run(self, profile: int, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rt = cudart()
        if profile != self.profile:
            self._select(profile)
        shapes = {
            name: tuple(feeds[name].shape) for name in input_ranges(self.spec, self.entry.profiles[profile])
        }
        if shapes != self.shapes:
            self._set_shapes(shapes)
        for name, array in feeds.items():
            buffer, data = self.buffers[name], np.ascontiguousarray(array).reshape(-1).view(np.uint8)
            buffer.host[: data.size] = data
            cuda_call(
                rt.cudaMemcpyAsync(
                    buffer.device,
                    buffer.host_ptr,
                    data.size,
                    rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
                    self.stream,
                ),
                "cudaMemcpyAsync",
            )
        self._execute()
        out_shapes = {name: _shape(self.context.get_tensor_shape(name)) for name in self.spec.output_names}
        dtypes = {t.name: np.dtype(t.dtype) for t in self.spec.outputs}
        for name, shape in out_shapes.items():
            buffer = self.buffers[name]
            cuda_call(
                rt.cudaMemcpyAsync(
                    buffer.host_ptr,
                    buffer.device,
                    nbytes(shape, dtypes[name].itemsize),
                    rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                    self.stream,
                ),
                "cudaMemcpyAsync",
            )
        cuda_call(rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return {
            name: self.buffers[name]
            .host[: nbytes(shape, dtypes[name].itemsize)]
            .view(dtypes[name])
            .reshape(shape)
            .copy()
            for name, shape in out_shapes.items()
        }

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.handle):
            raise BackendError(f"{self.entry.name}: TensorRT execution failed for shapes {self.shapes}")

    def _execute(self) -> None:
        """Run once; with CUDA graphs, replay the graph captured for the current shapes (capture it
        after a plain run, which also applies TensorRT's deferred shape updates capture can't record)."""
        if self.graph_exec is not None:
            cuda_call(cudart().cudaGraphLaunch(self.graph_exec, self.stream), "cudaGraphLaunch")
            return
        self._enqueue()
        if self.cuda_graphs:
            try:
                self._capture()
            except BackendError as exc:
                log.warning("%s: CUDA graph capture failed, running without graphs: %s", self.entry.name, exc)
                self._drop_graph()
                self.cuda_graphs = False

    def _capture(self) -> None:
        rt = cudart()
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
        cuda_call(rt.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")
        enqueued = self.context.execute_async_v3(self.handle)
        self.graph = cuda_call(rt.cudaStreamEndCapture(self.stream), "cudaStreamEndCapture")
        if not enqueued:
            raise BackendError("execute_async_v3 failed during capture")
        self.graph_exec = cuda_call(rt.cudaGraphInstantiate(self.graph, 0), "cudaGraphInstantiate")
        log.debug("%s: captured a CUDA graph for %s", self.entry.name, self.shapes)

    def _drop_graph(self) -> None:
        rt = cudart()
        if self.graph_exec is not None:
            cuda_call(rt.cudaGraphExecDestroy(self.graph_exec), "cudaGraphExecDestroy")
        if self.graph is not None:
            cuda_call(rt.cudaGraphDestroy(self.graph), "cudaGraphDestroy")
        self.graph = self.graph_exec = None

    def close(self) -> None:
        self._drop_graph()
        for buffer in self.buffers.values():
            buffer.free()
        self.buffers.clear()
        del self.context, self.engine


class TrtBackend:
    """Runs bundle models on prebuilt TensorRT engines. Thread-safe: one lock, one CUDA stream."""

    def __init__(
        self,
        bundle: Bundle,
        precision: str = PRECISION,
        engine_dir: str | Path | None = None,
        cuda_graphs: bool = True,
        device_id: int = 0,
    ) -> None:
        if precision != PRECISION:
            raise ValueError(
                f"TensorRT engines are built from the bundle's {PRECISION} ONNX: precision must be "
                f"{PRECISION!r}; got {precision!r}"
            )
        self.bundle, self.cuda_graphs, self.device_id = bundle, cuda_graphs, device_id
        self.engine_dir = Path(engine_dir) if engine_dir is not None else bundle.root / DEFAULT_DIR
        self.device, self.precision = f"cuda:{device_id}", precision
        self.environment = probe_environment(device_id)
        self.entries = self._usable_entries()
        self._engines: dict[str, _Engine] = {}
        self._lock = threading.Lock()
        self._stream: Any = None
        self._logger: trt.ILogger | None = None
        self._runtime: trt.Runtime | None = None

    def _usable_entries(self) -> dict[str, list[EngineEntry]]:
        """Engines per model; refuses (with the rebuild command) if any is missing, stale or foreign."""
        try:
            entries = read_manifest(self.engine_dir)
        except EngineManifestError as exc:
            raise BackendError(str(exc)) from exc
        by_model: dict[str, list[EngineEntry]] = {m: [] for m in self.bundle.models}
        stale: list[str] = []
        for entry in entries.values():
            if entry.model not in by_model or entry.flags.get("precision") != PRECISION:
                continue
            reasons = stale_reasons(entry, self.environment, source_onnx(self.bundle, entry.model))
            if not (self.engine_dir / entry.plan).is_file():
                reasons.append(f"its plan {entry.plan} is missing")
            if reasons:
                stale.append(f"{entry.name}: " + "; ".join(reasons))
            by_model[entry.model].append(entry)
            if entry.environment.gpu != self.environment.gpu and not reasons:
                log.warning(
                    "%s was built on %s, this is %s (same architecture): it runs, maybe not at its best",
                    entry.name,
                    entry.environment.gpu,
                    self.environment.gpu,
                )
        missing = [m for m, found in by_model.items() if not found]
        if missing or stale:
            problems = [f"no engine for {m}" for m in missing] + stale
            command = build_command(self.bundle.root, self.engine_dir, stale_only=not missing)
            raise BackendError(
                f"refusing the TensorRT engines in {self.engine_dir}:\n  - "
                + "\n  - ".join(problems)
                + f"\nrebuild them with: {command}"
            )
        return by_model

    def _engine(self, entry: EngineEntry, spec: ModelSpec) -> _Engine:
        if entry.name not in self._engines:
            import tensorrt as trt

            rt = cudart()
            if self._stream is None:
                self._stream = cuda_call(
                    rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreate"
                )
                self._logger = make_logger()
                self._runtime = trt.Runtime(self._logger)
            assert self._runtime is not None
            try:
                self._engines[entry.name] = _Engine(
                    entry, spec, self.engine_dir / entry.plan, self._runtime, self._stream, self.cuda_graphs
                )
            except BackendError as exc:
                command = build_command(self.bundle.root, self.engine_dir, stale_only=True)
                raise BackendError(f"{exc}\nrebuild it with: {command}") from exc
            log.info("loaded TensorRT engine %s", entry.name)
        return self._engines[entry.name]

    def run(self, model: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        model_entry = self.bundle.models.get(model)
        if model_entry is None:
            raise BackendError(f"bundle {self.bundle.root} has no {model} model")
        spec = model_entry.spec
        check_feeds(spec, feeds)
        choices = [(e, k) for e in self.entries[model] for k in range(len(e.profiles))]
        try:
            calls = plan_calls(
                spec, [e.profiles[k] for e, k in choices], {n: a.shape for n, a in feeds.items()}
            )
        except NoProfile as exc:
            command = build_command(self.bundle.root, self.engine_dir, stale_only=False)
            f, dims = self.bundle.vae_scale_factor, exc.dims
            hint = f" --shapes {dims['width'] * f}x{dims['height'] * f}" if "height" in dims else ""
            raise BackendError(f"{exc}; build one with: {command}{hint}") from exc
        except ValueError as exc:
            raise BackendError(str(exc)) from exc
        batched = {t.name for t in spec.inputs if t.shape[0] == "batch"}
        parts = []
        with self._lock:
            cuda_call(cudart().cudaSetDevice(self.device_id), "cudaSetDevice")
            for index, rows in calls:
                entry, profile = choices[index]
                sub = {n: a[rows] if n in batched else a for n, a in feeds.items()}
                parts.append(self._engine(entry, spec).run(profile, sub))
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([p[name] for p in parts]) for name in spec.output_names}

    def prepare(self, models: Iterable[str]) -> None:
        """Nothing ahead of time: a model may have several engines (one per set of shape profiles)
        and only those a request's shapes select are loaded, on first use, so GPU memory holds
        no engine that is never run."""

    def close(self) -> None:
        with self._lock:
            for engine in self._engines.values():
                engine.close()
            self._engines.clear()
            if self._stream is not None:
                cuda_call(cudart().cudaStreamDestroy(self._stream), "cudaStreamDestroy")
                self._stream = self._runtime = self._logger = None
