"""TensorRT backend: the FP16 engines `python -m engines.build` made, run with cuda-python (no torch).

TensorRT demo/Diffusion's Engine lifecycle, kept inside the backend: the engine manifest is checked
when the backend opens (a stale or foreign engine is refused with the command that rebuilds it);
on first use a plan is verified (sha256) and deserialized (`_TrtPlan`: one deserialized plan, its
execution context and buffers); its device and pinned host buffers are allocated once, at the
largest shape its profiles allow, so tensor addresses never change; a call picks the plan and
profile for its shape, sets the input shapes, copies in, runs `execute_async_v3` (or replays the
CUDA graph captured for that profile and those shapes) and copies out, all on the backend's one
stream. `tensorrt` and `cuda` are imported inside functions: importing this module needs neither.

CUDA graphs: each plan keeps a small LRU cache of graphs keyed by (profile, input shapes), so
alternating shapes (a 4+2 batch split, compose mode, CLIP batches) replay rather than recapture.
A graph is captured after a plain run of its shapes (which applies TensorRT's deferred shape
updates), in `cudaStreamCaptureModeThreadLocal`, so another thread's CUDA calls (a threaded server)
neither break the capture nor are broken by it. A failed capture is retried after a growing number
of plain runs of that shape instead of turning graphs off for good.

LoRA (`set_weights`): engines built with `--refittable` are refitted in place (trt_refit.py), the
ones loaded now at once and the others when they load; a plan's captured graphs are dropped after
a refit, so that no replay can run the weights it was captured with.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import re
import threading
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from runtime.backends.base import BackendError, check_feeds
from runtime.backends.config import BackendConfig
from runtime.backends.loading import own_config
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
from runtime.backends.trt_refit import NotRefittable, refit
from runtime.backends.trt_shapes import (
    NoProfile,
    Shape,
    input_ranges,
    max_input_shapes,
    nbytes,
    plan_calls,
    profile_arguments,
)
from runtime.bundle import Bundle
from runtime.lora import WeightSet
from runtime.lora.graph import read_initializers
from runtime.specs import ModelSpec

if TYPE_CHECKING:
    import tensorrt as trt

log = logging.getLogger(__name__)

LOG_TAIL = 30  # TensorRT log lines kept for an error report
GRAPH_CACHE_SIZE = 8  # CUDA graphs kept per plan: (profile, shapes) keys, least recently used dropped
CAPTURE_RETRY_AFTER = 4  # plain runs of a shape before its failed capture is tried again ...
CAPTURE_RETRY_MAX = 256  # ... doubling after each failure, up to this many


class TensorRTUnavailable(BackendError):
    """TensorRT, cuda-python or a CUDA device is missing: the TensorRT path cannot run here."""


class StalePlan(BackendError):
    """A plan that a rebuild repairs: corrupt, undeserializable, or not what the bundle expects."""


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


def native_handle(obj: Any) -> int:
    """The address behind a cuda-python handle (stream, graph): `int(obj)` is deprecated in favour
    of `cuda.bindings.utils.get_cuda_native_handle` (cuda-bindings >= 12.8); older bindings lack it."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(obj)
    return int(get_cuda_native_handle(obj))


def _is_null(handle: Any) -> bool:
    return handle is None or native_handle(handle) == 0


def cuda_version(value: int) -> str:
    """CUDA's integer versions (12080) as '12.8'."""
    return f"{value // 1000}.{value % 1000 // 10}"


_TENSORRT_WHEEL = re.compile(r"tensorrt[-_.]cu(\d+)(?:[-_.](?:libs|bindings))?")


def cuda_variant(distributions: Iterable[str]) -> str | None:
    """'cu13' from the names of the wheels that installed TensorRT (`tensorrt_cu13_libs`,
    `tensorrt-cu13-bindings`...); None if none carries a CUDA suffix. Wheels for two CUDA majors
    install the same files over each other: refused."""
    majors = sorted({m.group(1) for d in distributions if (m := _TENSORRT_WHEEL.fullmatch(d.lower()))})
    if len(majors) > 1:
        raise TensorRTUnavailable(
            f"TensorRT wheels for CUDA {' and '.join(majors)} are installed together and overwrite each "
            "other's files: uninstall all but the one matching the driver (see scripts/gpu_check.sh)"
        )
    return f"cu{majors[0]}" if majors else None


def cudart_paths(maps: str) -> list[str]:
    """Paths of the libcudart mapped into a process, from its /proc/<pid>/maps text."""
    found = re.findall(r"\s(/\S*/libcudart\.so[.\d]*)$", maps, flags=re.MULTILINE)
    return list(dict.fromkeys(found))


def _read_maps() -> str:
    try:
        return Path("/proc/self/maps").read_text()
    except OSError:
        return ""


def _cudart_version(path: str) -> str | None:
    """cudaRuntimeGetVersion of an already loaded libcudart (dlopen returns the same handle)."""
    try:
        lib = ctypes.CDLL(path)
        value = ctypes.c_int()
        if lib.cudaRuntimeGetVersion(ctypes.byref(value)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return cuda_version(value.value)


def tensorrt_cuda() -> tuple[str, str]:
    """(CUDA variant TensorRT was built for, CUDA runtime it uses), for the imported TensorRT.

    The variant comes from the wheels that provide `tensorrt_libs` / `tensorrt_bindings` (cu12 and
    cu13 builds share a version string); the runtime is the libcudart TensorRT loaded into this
    process (cuda-python links its own runtime statically, so its `cudaRuntimeGetVersion` says
    nothing about TensorRT's), else the version of the CUDA runtime wheel TensorRT's libs load.
    A TensorRT installed outside pip (a container's system package) gets the libcudart's major."""
    owners = metadata.packages_distributions()
    packages = ("tensorrt_libs", "tensorrt_bindings", "tensorrt")
    dists = [d for package in packages for d in owners.get(package, [])]
    variant = cuda_variant(dists)
    runtime = next(filter(None, map(_cudart_version, cudart_paths(_read_maps()))), None)
    if runtime is None and variant is not None:
        for wheel in (f"nvidia-cuda-runtime-{variant}", "nvidia-cuda-runtime"):
            try:
                version = metadata.version(wheel)
            except metadata.PackageNotFoundError:
                continue
            if version.split(".")[0] == variant[2:]:
                runtime = ".".join(version.split(".")[:2])
                break
    if variant is None and runtime is not None:
        variant = f"cu{runtime.split('.')[0]}"
    return variant or "unknown", runtime or "unknown"


def probe_environment(device: int = 0) -> GpuEnvironment:
    """What a plan's validity depends on (TensorRT and its CUDA variant, GPU architecture) plus
    what helps diagnose it (TensorRT's CUDA runtime, the driver's CUDA version, the GPU's name)."""
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
    variant, runtime = tensorrt_cuda()
    return GpuEnvironment(
        tensorrt=version,
        tensorrt_cuda=variant,
        cuda_runtime=runtime,
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


def _attempt(call: Any, what: str, *args: Any) -> list[str]:
    """Run one cleanup CUDA call; its failure as a message (cleanup goes on past it)."""
    try:
        cuda_call(call(*args), what)
    except BackendError as exc:
        return [str(exc)]
    return []


class _Buffer:
    """One I/O tensor's device memory and its pinned host staging area, allocated once."""

    def __init__(self, size: int) -> None:
        rt = cudart()
        self.size = size
        self.device = int(cuda_call(rt.cudaMalloc(size), "cudaMalloc"))
        try:
            self.host_ptr = int(cuda_call(rt.cudaMallocHost(size), "cudaMallocHost"))
        except BackendError:
            _attempt(rt.cudaFree, "cudaFree", self.device)  # the cudaMallocHost failure is the one to report
            raise
        self.host = np.ctypeslib.as_array((ctypes.c_ubyte * size).from_address(self.host_ptr))

    def free(self) -> list[str]:
        """Free both allocations, even if the first fails; returns what failed."""
        rt = cudart()
        return _attempt(rt.cudaFree, "cudaFree", self.device) + _attempt(
            rt.cudaFreeHost, "cudaFreeHost", self.host_ptr
        )


GraphKey = tuple[int, tuple[tuple[str, Shape], ...]]  # (profile, sorted input shapes)


@dataclass
class _Graph:
    graph: Any
    exec: Any

    def destroy(self) -> list[str]:
        rt = cudart()
        return _attempt(rt.cudaGraphExecDestroy, "cudaGraphExecDestroy", self.exec) + _attempt(
            rt.cudaGraphDestroy, "cudaGraphDestroy", self.graph
        )


class _TrtPlan:
    """One deserialized TensorRT plan (ICudaEngine): its execution context, I/O buffers and the
    CUDA graphs captured for the (profile, shapes) it has run."""

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

        self.spec, self.entry, self.stream = spec, entry, stream
        self.handle, self.cuda_graphs = native_handle(stream), cuda_graphs
        self.engine: Any = None
        self.context: Any = None
        self.profile = -1
        self.shapes: dict[str, Shape] = {}
        self.graphs: OrderedDict[GraphKey, _Graph] = OrderedDict()
        self.capture_waits: dict[GraphKey, tuple[int, int]] = {}  # key -> (failures, plain runs to wait)
        self.buffers: dict[str, _Buffer] = {}  # none yet while _buffer_sizes switches profiles
        self.lora_names: frozenset[str] = frozenset()  # weights refitted away from the plan's own

        data = plan.read_bytes()
        if hashlib.sha256(data).hexdigest() != entry.plan_sha256:
            raise StalePlan(f"plan {plan} is corrupt: its sha256 differs from the manifest's")
        self.engine = runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise StalePlan(
                f"TensorRT could not deserialize plan {plan} (corrupt, or built by another TensorRT build)"
            )
        engine = self.engine
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        expected = {t.name: t.dtype for t in (*spec.inputs, *spec.outputs)}
        if names != set(expected) or engine.num_optimization_profiles != len(entry.profiles):
            raise StalePlan(
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
                raise StalePlan(
                    f"plan {plan}: tensor {name} is {engine.get_tensor_dtype(name)}, expected {dtype}"
                )
        self.context = engine.create_execution_context()
        if self.context is None:
            raise BackendError(
                f"TensorRT could not create an execution context for {plan} (out of GPU memory?)"
            )
        try:
            for name, size in self._buffer_sizes().items():
                self.buffers[name] = _Buffer(size)
            self._bind()
        except BaseException:
            self.close()  # frees the buffers allocated so far
            raise

    def _bind(self) -> None:
        for name, buffer in self.buffers.items():
            if not self.context.set_tensor_address(name, buffer.device):
                raise BackendError(f"{self.entry.name}: TensorRT refused the address of tensor {name}")

    def _select(self, profile: int) -> None:
        """Switch the context to `profile`; tensor shapes and addresses are set again after it.
        Captured graphs stay: each is keyed by its profile and shapes."""
        if not self.context.set_optimization_profile_async(profile, self.handle):
            raise BackendError(f"{self.entry.name}: TensorRT refused optimisation profile {profile}")
        cuda_call(cudart().cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        self.profile, self.shapes = profile, {}
        self._bind()

    def _set_shapes(self, shapes: dict[str, Shape]) -> None:
        for name, shape in shapes.items():
            if not self.context.set_input_shape(name, shape):
                raise BackendError(
                    f"{self.entry.name}: shape {shape} of {name} is outside profile {self.profile}"
                )
        self.shapes = shapes

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
        self._execute((profile, tuple(sorted(shapes.items()))))
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

    def _execute(self, key: GraphKey) -> None:
        """Run once: replay the graph captured for `key`, else run plainly and (with CUDA graphs,
        when no failed capture of `key` is waiting out its back-off) capture one for next time.
        The context's profile and input shapes are `key`'s before this is called, as at capture."""
        graph = self.graphs.get(key)
        if graph is not None:
            err = cudart().cudaGraphLaunch(graph.exec, self.stream)[0]
            if err == cudart().cudaError_t.cudaSuccess:
                self.graphs.move_to_end(key)
                return
            name = self.entry.name
            log.warning("%s: replaying the CUDA graph for %s failed (%r); running plainly", name, key, err)
            self._forget(key, failed=True)
        self._enqueue()
        if not self.cuda_graphs:
            return
        failures, wait = self.capture_waits.get(key, (0, 0))
        if wait > 0:
            self.capture_waits[key] = (failures, wait - 1)
            return
        try:
            graph = self._capture()
        except BackendError as exc:
            wait = min(CAPTURE_RETRY_AFTER << failures, CAPTURE_RETRY_MAX)
            self.capture_waits[key] = (failures + 1, wait)
            log.warning(
                "%s: CUDA graph capture for %s failed, running without a graph (retried after %d runs): %s",
                self.entry.name,
                self.shapes,
                wait,
                exc,
            )
            return
        self.capture_waits.pop(key, None)
        self.graphs[key] = graph
        if len(self.graphs) > GRAPH_CACHE_SIZE:
            self._forget(next(iter(self.graphs)))
        log.debug("%s: captured a CUDA graph for profile %d, %s", self.entry.name, key[0], self.shapes)

    def forget_graphs(self) -> None:
        """Destroy every captured graph (after a refit), so the next runs capture afresh."""
        for key in list(self.graphs):
            self._forget(key)

    def _forget(self, key: GraphKey, failed: bool = False) -> None:
        """Destroy the graph cached for `key`; one whose replay failed is captured again only
        after the back-off a failed capture gets."""
        for problem in self.graphs.pop(key).destroy():
            log.warning("%s: %s", self.entry.name, problem)
        if failed:
            self.capture_waits[key] = (1, CAPTURE_RETRY_AFTER)

    def _capture(self) -> _Graph:
        """Record one `execute_async_v3` into a graph, after the plain run has finished (as
        NVIDIA's own runtimes do: TensorRT's lazy per-shape setup is done by then). Thread-local
        capture mode: only this thread's unsafe CUDA calls can invalidate the capture, and other
        threads' CUDA calls (a threaded server) are not refused meanwhile."""
        rt = cudart()
        cuda_call(rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        cuda_call(rt.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")
        try:
            enqueued, problem = bool(self.context.execute_async_v3(self.handle)), "it returned False"
        except Exception as exc:  # TensorRT raises its own error types; the capture must still end
            enqueued, problem = False, repr(exc)
        err, graph = rt.cudaStreamEndCapture(self.stream)
        if err != rt.cudaError_t.cudaSuccess or not enqueued:
            if not _is_null(graph):
                _attempt(rt.cudaGraphDestroy, "cudaGraphDestroy", graph)
            rt.cudaGetLastError()  # clear the capture's error so that the next CUDA call does not report it
            if err != rt.cudaError_t.cudaSuccess:
                message = rt.cudaGetErrorString(err)[1].decode(errors="replace")
                raise BackendError(f"CUDA cudaStreamEndCapture failed: {err!r}: {message}")
            raise BackendError(f"execute_async_v3 failed during capture ({problem})")
        try:
            graph_exec = cuda_call(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        except BackendError:
            _attempt(rt.cudaGraphDestroy, "cudaGraphDestroy", graph)
            raise
        return _Graph(graph, graph_exec)

    def close(self) -> list[str]:
        """Release graphs, buffers, context and engine, going on past failures; returns them."""
        problems: list[str] = []
        for graph in self.graphs.values():
            problems += graph.destroy()
        self.graphs.clear()
        for buffer in self.buffers.values():
            problems += buffer.free()
        self.buffers.clear()
        self.context = None  # the context before the engine it belongs to
        self.engine = None
        return problems


class TrtBackend:
    """Runs bundle models on prebuilt TensorRT engines. Thread-safe: one lock, one CUDA stream."""

    def __init__(self, bundle: Bundle, config: BackendConfig | None = None) -> None:
        config = own_config("tensorrt", config)
        self.bundle, self.config = bundle, config
        self.cuda_graphs, self.device_id = config.cuda_graphs, config.device_id
        self.engine_dir = config.engine_dir if config.engine_dir is not None else bundle.root / DEFAULT_DIR
        self.device, self.precision = f"cuda:{config.device_id}", PRECISION
        self.environment = probe_environment(config.device_id)
        self.entries = self._usable_entries()
        self._plans: dict[str, _TrtPlan] = {}
        self._lock = threading.Lock()
        self._stream: Any = None
        self._logger: trt.ILogger | None = None
        self._runtime: trt.Runtime | None = None
        self._log_tail: deque[str] = deque(maxlen=LOG_TAIL)
        self._weights: dict[str, WeightSet] = {}  # model -> the LoRA set its engines must hold
        self._originals: dict[str, dict[str, np.ndarray]] = {}  # model -> original weights read so far

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

    def _plan(self, entry: EngineEntry, spec: ModelSpec) -> _TrtPlan:
        if entry.name not in self._plans:
            import tensorrt as trt

            rt = cudart()
            if self._stream is None:
                self._stream = cuda_call(
                    rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreate"
                )
                self._logger = make_logger(self._log_tail)
                self._runtime = trt.Runtime(self._logger)
            assert self._runtime is not None
            try:
                self._plans[entry.name] = _TrtPlan(
                    entry, spec, self.engine_dir / entry.plan, self._runtime, self._stream, self.cuda_graphs
                )
            except StalePlan as exc:
                command = build_command(self.bundle.root, self.engine_dir, stale_only=True)
                raise StalePlan(f"{exc}\nrebuild it with: {command}") from exc
            log.info("loaded TensorRT engine %s", entry.name)
            if entry.model in self._weights:  # a LoRA set was chosen before this engine loaded
                self._refit(self._plans[entry.name])
        return self._plans[entry.name]

    def set_weights(self, model: str, weights: WeightSet | None) -> None:
        """Refit `model`'s engines to these merged weights (None or empty: the bundle's own).
        Engines built without `--refittable` refuse a LoRA set, naming the rebuild command."""
        if model not in self.entries:
            raise BackendError(f"bundle {self.bundle.root} has no {model} model")
        wanted = weights if weights is not None and weights.arrays else None
        if wanted is not None:
            plain = [e.name for e in self.entries[model] if not e.flags.get("refittable")]
            if plain:
                command = build_command(self.bundle.root, self.engine_dir, False, ["--refittable", "--force"])
                raise NotRefittable(
                    f"LoRA on TensorRT needs engines built with --refittable; {', '.join(plain)} "
                    f"{'was' if len(plain) == 1 else 'were'} built without it: rebuild with: {command}"
                )
        with self._lock:
            if wanted is None:
                self._weights.pop(model, None)
            else:
                self._weights[model] = wanted
            cuda_call(cudart().cudaSetDevice(self.device_id), "cudaSetDevice")
            for entry in self.entries[model]:
                plan = self._plans.get(entry.name)
                if plan is not None:
                    self._refit(plan)

    def _refit(self, plan: _TrtPlan) -> None:
        """Bring one loaded plan to its model's chosen LoRA set (under the lock). On failure every
        loaded plan of the model is dropped (loading one again gives the original weights) and the
        model is back to its own weights."""
        model = plan.entry.model
        chosen = self._weights.get(model)
        arrays = dict(chosen.arrays) if chosen is not None else {}
        restored = plan.lora_names - arrays.keys()
        if not arrays and not restored:
            return

        def originals(names: Iterable[str]) -> dict[str, np.ndarray]:
            return self._original(model, names)

        try:
            refit(plan.engine, plan.entry.name, arrays, restored, originals, self._logger, self._log_tail)
        except BackendError:
            self._weights.pop(model, None)
            for entry in self.entries[model]:
                dropped = self._plans.pop(entry.name, None)
                for problem in dropped.close() if dropped is not None else []:
                    log.warning("%s: %s", entry.name, problem)
            raise
        plan.lora_names = frozenset(arrays)
        plan.forget_graphs()
        log.info("refitted %s: %d LoRA weights, %d restored", plan.entry.name, len(arrays), len(restored))

    def _original(self, model: str, names: Iterable[str]) -> dict[str, np.ndarray]:
        """The bundle's own values of these weights, from the fp16 ONNX the engines were built from;
        copied to host memory once, so a later restore reads no file."""
        have = self._originals.setdefault(model, {})
        needed = [name for name in names if name not in have]
        if needed:
            path = self.bundle.verified_path(self.bundle.graph(model, PRECISION))
            try:
                read = read_initializers(path, needed)
            except KeyError as exc:
                raise BackendError(f"{path} has no initializer {exc} that the engine asks for") from None
            have.update({name: np.array(value) for name, value in read.items()})
        return {name: have[name] for name in names}

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
        except NoProfile as exc:  # a valid request the built engines cannot take: a SetupError
            extra = profile_arguments(exc.dims, exc.profiles, self.bundle.vae_scale_factor)
            command = build_command(self.bundle.root, self.engine_dir, stale_only=False, extra=extra)
            raise NoProfile(exc.model, exc.dims, exc.profiles, command) from None
        except ValueError as exc:
            raise BackendError(str(exc)) from exc
        batched = {t.name for t in spec.inputs if t.shape[0] == "batch"}
        parts = []
        with self._lock:
            cuda_call(cudart().cudaSetDevice(self.device_id), "cudaSetDevice")
            for index, rows in calls:
                entry, profile = choices[index]
                sub = {n: a[rows] if n in batched else a for n, a in feeds.items()}
                parts.append(self._plan(entry, spec).run(profile, sub))
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([p[name] for p in parts]) for name in spec.output_names}

    def prepare(self, models: Iterable[str]) -> None:
        """Nothing ahead of time: a model may have several engines (one per set of shape profiles)
        and only those a request's shapes select are loaded, on first use, so GPU memory holds
        no engine that is never run."""

    def close(self) -> None:
        """Free every plan's graphs, buffers and context, then the stream; a CUDA error does not stop
        the rest from being freed, and all of them are reported together afterwards."""
        with self._lock:
            if not self._plans and self._stream is None:
                return
            rt = cudart()
            problems = _attempt(rt.cudaSetDevice, "cudaSetDevice", self.device_id)
            for plan in self._plans.values():
                problems += plan.close()
            self._plans.clear()
            if self._stream is not None:
                problems += _attempt(rt.cudaStreamDestroy, "cudaStreamDestroy", self._stream)
            self._stream = self._runtime = self._logger = None
            self._originals.clear()  # a backend opened again reads them again
        if problems:
            raise BackendError("closing the TensorRT backend: " + "; ".join(problems))
