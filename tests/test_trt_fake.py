"""TrtBackend's CUDA work against fake `tensorrt` and `cuda.bindings.runtime` modules, so that the
parts a GPU host would otherwise be the first to run are exercised here: buffers, profile and shape
switches, the shape-keyed CUDA graph cache, thread-local capture and its retry, error paths in
allocation and cleanup, refused tensor addresses, undeserializable plans and `--rebuild-stale`.

The fakes keep real memory: "device" allocations are host buffers, so copies and the fake engine's
arithmetic (every output = 2 * its source input + 1) are checked for real. Stream and graph handles
are cuda-python's own handle types, so `native_handle` runs as on a GPU host.
"""

from __future__ import annotations

import ctypes
import enum
import hashlib
import json
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cuda.bindings import runtime as real_rt

from engines import build as build_cli
from engines.builder import plan_loads
from engines.cache import FLAGS, save_manifest
from engines.profiles import ProfileRequest, model_profiles, profile_label
from runtime.backends import BackendConfig, BackendError
from runtime.backends import tensorrt as trt_backend
from runtime.backends.trt_manifest import EngineEntry, cache_key, source_onnx
from runtime.bundle import Bundle

TRT_VERSION = "10.16.1.11"


class Err(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorStreamCaptureInvalidated = 901


class FakeCudart:
    """The subset of cuda.bindings.runtime TrtBackend calls, with failure injection (`fail`)."""

    cudaError_t = Err
    cudaStreamNonBlocking = 1
    cudaMemcpyKind = enum.IntEnum("cudaMemcpyKind", "cudaMemcpyHostToDevice cudaMemcpyDeviceToHost")
    cudaStreamCaptureMode = real_rt.cudaStreamCaptureMode

    def __init__(self) -> None:
        self.memory: dict[int, tuple[str, Any]] = {}  # address -> (kind, buffer): what is still allocated
        self.graphs: dict[int, list[Callable[[], None]]] = {}
        self.execs: dict[int, list[Callable[[], None]]] = {}
        self.streams: set[int] = set()
        self.capturing: dict[int, list[Callable[[], None]]] = {}  # stream -> work recorded so far
        self.capture_modes: list[Any] = []
        self.fail: dict[str, int] = {}  # function name -> how many of its next calls fail
        self.calls: list[str] = []
        self._next = 0x1000

    def _failing(self, name: str) -> bool:
        self.calls.append(name)
        if self.fail.get(name, 0) > 0:
            self.fail[name] -= 1
            return True
        return False

    def _id(self) -> int:
        self._next += 0x10
        return self._next

    def _allocate(self, name: str, kind: str, size: int) -> tuple[Err, int]:
        if self._failing(name):
            return Err.cudaErrorMemoryAllocation, 0
        buffer = ctypes.create_string_buffer(size)
        self.memory[ctypes.addressof(buffer)] = (kind, buffer)
        return Err.cudaSuccess, ctypes.addressof(buffer)

    def _release(self, name: str, kind: str, address: int) -> tuple[Err]:
        if self._failing(name):
            return (Err.cudaErrorInvalidValue,)
        assert self.memory.pop(address)[0] == kind
        return (Err.cudaSuccess,)

    def cudaGetErrorString(self, err: Err) -> tuple[Err, bytes]:
        return Err.cudaSuccess, err.name.encode()

    def cudaGetLastError(self) -> tuple[Err]:
        return (Err.cudaSuccess,)

    def cudaGetDeviceCount(self) -> tuple[Err, int]:
        return Err.cudaSuccess, 1

    def cudaGetDeviceProperties(self, device: int) -> tuple[Err, Any]:
        return Err.cudaSuccess, types.SimpleNamespace(name=b"NVIDIA H100 80GB HBM3\x00", major=9, minor=0)

    def cudaDriverGetVersion(self) -> tuple[Err, int]:
        return Err.cudaSuccess, 13010

    def cudaSetDevice(self, device: int) -> tuple[Err]:
        return (Err.cudaErrorInvalidValue,) if self._failing("cudaSetDevice") else (Err.cudaSuccess,)

    def cudaMalloc(self, size: int) -> tuple[Err, int]:
        return self._allocate("cudaMalloc", "device", size)

    def cudaMallocHost(self, size: int) -> tuple[Err, int]:
        return self._allocate("cudaMallocHost", "host", size)

    def cudaFree(self, address: int) -> tuple[Err]:
        return self._release("cudaFree", "device", address)

    def cudaFreeHost(self, address: int) -> tuple[Err]:
        return self._release("cudaFreeHost", "host", address)

    def cudaMemcpyAsync(self, dst: int, src: int, count: int, kind: Any, stream: Any) -> tuple[Err]:
        ctypes.memmove(dst, src, count)
        return (Err.cudaSuccess,)

    def cudaStreamCreateWithFlags(self, flags: int) -> tuple[Err, Any]:
        handle = self._id()
        self.streams.add(handle)
        return Err.cudaSuccess, real_rt.cudaStream_t(handle)

    def cudaStreamDestroy(self, stream: Any) -> tuple[Err]:
        if self._failing("cudaStreamDestroy"):
            return (Err.cudaErrorInvalidValue,)
        self.streams.remove(int(stream))
        return (Err.cudaSuccess,)

    def cudaStreamSynchronize(self, stream: Any) -> tuple[Err]:
        assert int(stream) not in self.capturing, "synchronize during capture invalidates it"
        self.calls.append("cudaStreamSynchronize")
        return (Err.cudaSuccess,)

    def cudaStreamBeginCapture(self, stream: Any, mode: Any) -> tuple[Err]:
        self.calls.append("cudaStreamBeginCapture")
        self.capture_modes.append(mode)
        self.capturing[int(stream)] = []
        return (Err.cudaSuccess,)

    def cudaStreamEndCapture(self, stream: Any) -> tuple[Err, Any]:
        work = self.capturing.pop(int(stream))
        if self._failing("cudaStreamEndCapture"):
            return Err.cudaErrorStreamCaptureInvalidated, None
        handle = self._id()
        self.graphs[handle] = work
        return Err.cudaSuccess, real_rt.cudaGraph_t(handle)

    def cudaGraphInstantiate(self, graph: Any, flags: int) -> tuple[Err, Any]:
        if self._failing("cudaGraphInstantiate"):
            return Err.cudaErrorInvalidValue, None
        handle = self._id()
        self.execs[handle] = self.graphs[int(graph)]
        return Err.cudaSuccess, real_rt.cudaGraphExec_t(handle)

    def cudaGraphLaunch(self, graph_exec: Any, stream: Any) -> tuple[Err]:
        if self._failing("cudaGraphLaunch"):
            return (Err.cudaErrorInvalidValue,)
        for work in self.execs[int(graph_exec)]:
            work()
        return (Err.cudaSuccess,)

    def cudaGraphExecDestroy(self, graph_exec: Any) -> tuple[Err]:
        del self.execs[int(graph_exec)]
        return (Err.cudaSuccess,)

    def cudaGraphDestroy(self, graph: Any) -> tuple[Err]:
        del self.graphs[int(graph)]
        return (Err.cudaSuccess,)

    def enqueue(self, stream: int, work: Callable[[], None]) -> None:
        """What a kernel launch does: run now, or be recorded by a capture of its stream."""
        if stream in self.capturing:
            self.capturing[stream].append(work)
        else:
            work()


def _array(address: int, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
    count = int(np.prod(shape)) * dtype.itemsize
    memory = memoryview((ctypes.c_char * count).from_address(address))
    return np.frombuffer(memory, dtype=dtype).reshape(shape)


class FakeContext:
    """An IExecutionContext whose engine computes each output as 2 * its source input + 1."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine, self.profile = engine, 0
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.refuse_addresses = False
        self.fail_execute = 0  # next N execute_async_v3 calls return False
        self.raise_in_capture = 0  # next N executions during a capture raise
        self.executions = 0  # plain runs and captures (replays are not executions)

    def set_optimization_profile_async(self, profile: int, stream: int) -> bool:
        self.profile = profile
        return profile < self.engine.num_optimization_profiles

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        source = self.engine.plan["outputs"].get(name)
        return self.shapes[source if source is not None else name]

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        return not self.refuse_addresses

    def execute_async_v3(self, stream: int) -> bool:
        cuda = self.engine.cuda
        if self.fail_execute > 0:
            self.fail_execute -= 1
            return False
        if stream in cuda.capturing and self.raise_in_capture > 0:
            self.raise_in_capture -= 1
            raise RuntimeError("TensorRT: operation not permitted when stream is capturing")
        assert set(self.addresses) == set(self.engine.dtypes), "every I/O tensor needs an address"
        cuda.calls.append("execute_async_v3")
        self.executions += 1
        work = []
        for out, source in self.engine.plan["outputs"].items():
            shape, dtype = self.shapes[source], np.dtype(self.engine.dtypes[source])
            src, dst = self.addresses[source], self.addresses[out]  # fixed at launch, as in a kernel

            def kernel(
                src: int = src, dst: int = dst, shape: tuple[int, ...] = shape, dtype: Any = dtype
            ) -> None:
                _array(dst, shape, np.dtype(np.float32))[...] = _array(src, shape, dtype) * 2 + 1

            work.append(kernel)
        for kernel in work:
            cuda.enqueue(stream, kernel)
        return True


class FakeEngine:
    def __init__(self, plan: dict[str, Any], cuda: FakeCudart, trt: Any) -> None:
        self.plan, self.cuda = plan, cuda
        self.dtypes: dict[str, str] = plan["dtypes"]
        self.num_io_tensors = len(self.dtypes)
        self.num_optimization_profiles = plan["profiles"]
        self._trt = trt
        self.contexts: list[FakeContext] = []

    def get_tensor_name(self, index: int) -> str:
        return list(self.dtypes)[index]

    def get_tensor_dtype(self, name: str) -> Any:
        types_ = {"float32": self._trt.DataType.FLOAT, "float16": self._trt.DataType.HALF}
        return types_.get(self.dtypes[name], self._trt.DataType.INT32)

    def create_execution_context(self) -> FakeContext:
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


def fake_tensorrt(cuda: FakeCudart) -> types.ModuleType:
    """A `tensorrt` module: Runtime deserializes the JSON plans `plan_bytes` writes."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = TRT_VERSION  # type: ignore[attr-defined]

    class ILogger:
        Severity = enum.Enum("Severity", "INTERNAL_ERROR ERROR WARNING INFO VERBOSE")

        def __init__(self) -> None:
            pass

    class Runtime:
        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, data: bytes) -> FakeEngine | None:
            try:
                plan = json.loads(data)
            except ValueError:
                self.logger.log(ILogger.Severity.ERROR, "IRuntime::deserializeCudaEngine: magic tag mismatch")
                return None
            trt.engines.append(FakeEngine(plan, cuda, trt))  # type: ignore[attr-defined]
            return trt.engines[-1]  # type: ignore[attr-defined,no-any-return]

    trt.ILogger = ILogger  # type: ignore[attr-defined]
    trt.Runtime = Runtime  # type: ignore[attr-defined]
    trt.DataType = enum.Enum("DataType", "FLOAT HALF INT32")  # type: ignore[attr-defined,misc]
    trt.engines = []  # type: ignore[attr-defined]
    return trt


@pytest.fixture
def cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCudart:
    """Fake TensorRT and CUDA in place of the real ones (TensorRT's CUDA build: cu13, 13.0)."""
    fake = FakeCudart()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(fake))
    monkeypatch.setattr(trt_backend, "cudart", lambda: fake)
    monkeypatch.setattr(trt_backend, "tensorrt_cuda", lambda: ("cu13", "13.0"))
    return fake


def plan_bytes(bundle: Bundle, model: str, profiles: int, extra: dict[str, Any] | None = None) -> bytes:
    """A fake plan; `extra` fields are added for fakes that read more (tests/test_trt_refit_fake.py)."""
    spec = bundle.models[model].spec
    first = spec.inputs[0].name
    return json.dumps(
        {
            "dtypes": {t.name: t.dtype for t in (*spec.inputs, *spec.outputs)},
            "outputs": {t.name: first for t in spec.outputs},
            "profiles": profiles,
            **(extra or {}),
        }
    ).encode()


def build_engines(
    bundle: Bundle,
    engine_dir: Path,
    request: ProfileRequest,
    plan: bytes | None = None,
    flags: dict[str, Any] = FLAGS,
    extra: Callable[[str], dict[str, Any]] | None = None,
) -> None:
    """An engine manifest for every model, as `python -m engines.build` on the fake GPU writes it
    (with these build `flags`; `extra(model)`: more fields for its fake plan)."""
    engine_dir.mkdir(exist_ok=True)
    env = trt_backend.probe_environment()
    entries = {}
    for model in bundle.models:
        profiles = model_profiles(bundle, model, request)
        name = f"{model}.{profile_label(profiles, bundle.vae_scale_factor)}"
        fields = extra(model) if extra is not None else None
        data = plan_bytes(bundle, model, len(profiles), fields)
        if plan is not None and model == "unet":
            data = plan
        (engine_dir / f"{name}.plan").write_bytes(data)
        source = source_onnx(bundle, model)
        entries[name] = EngineEntry(
            name=name,
            model=model,
            plan=f"{name}.plan",
            plan_sha256=hashlib.sha256(data).hexdigest(),
            plan_bytes=len(data),
            source=source,
            profiles=profiles,
            flags=dict(flags),
            settings={"opt_level": None, "workspace_gb": None},
            environment=env,
            build_seconds=1.0,
            key=cache_key(source, env, profiles, flags),
        )
    save_manifest(engine_dir, entries)


@pytest.fixture
def bundle(fake_bundle_copy: Path) -> Bundle:
    return Bundle.open(fake_bundle_copy)


# Static 64x64 px (latent 8) plus a ranged 32-128 px profile, batches 1-4: the 4+2 split of 6 rows.
REQUEST = ProfileRequest(shapes=((64, 64),), batch=(1, 4), dynamic=(32, 128))


@pytest.fixture
def backend(bundle: Bundle, cuda: FakeCudart) -> trt_backend.TrtBackend:
    build_engines(bundle, bundle.root / "engines", REQUEST)
    return trt_backend.TrtBackend(bundle, BackendConfig(backend="tensorrt"))


def unet_feeds(batch: int, side: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "sample": rng.standard_normal((batch, 4, side, side), dtype=np.float32),
        "timestep": np.array([500.0], np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, 77, 32), dtype=np.float32),
    }


def unet(backend: trt_backend.TrtBackend, batch: int, side: int = 8, seed: int = 0) -> None:
    feeds = unet_feeds(batch, side, seed)
    np.testing.assert_array_equal(backend.run("unet", feeds)["noise_pred"], feeds["sample"] * 2 + 1)


def the_unet_context(cuda: FakeCudart) -> FakeContext:
    (engine,) = [e for e in sys.modules["tensorrt"].engines if "noise_pred" in e.dtypes]  # type: ignore[attr-defined]
    (context,) = engine.contexts
    return context


# --- environment ---------------------------------------------------------------------------------


def test_probe_records_tensorrt_its_cuda_build_and_the_driver(cuda):
    env = trt_backend.probe_environment()
    assert env == trt_backend.GpuEnvironment(
        TRT_VERSION, "cu13", "13.0", "13.1", "NVIDIA H100 80GB HBM3", "9.0"
    )


# --- running, and the shape-keyed CUDA graph cache ------------------------------------------------


def test_runs_split_batches_and_both_profiles_with_correct_outputs(backend, cuda):
    unet(backend, 6)  # 4 + 2 rows on the static profile
    unet(backend, 2, side=12)  # the ranged profile
    unet(backend, 3)
    assert backend.run("clip", {"input_ids": np.ones((2, 77), np.int32)})["last_hidden_state"].shape == (
        2,
        77,
    )
    backend.close()
    assert not cuda.memory and not cuda.graphs and not cuda.execs and not cuda.streams  # all freed


def test_alternating_shapes_replay_their_own_graphs(backend, cuda):
    """A 4+2 batch split and a second image size alternate every call: each (profile, shapes) keeps
    its graph, so after one capture each, every call replays (no TensorRT execution at all)."""
    unet(backend, 6)
    unet(backend, 2, side=12)
    context = the_unet_context(cuda)
    captured = context.executions
    assert captured == 6  # per shape: one plain run, one capture
    for seed in range(1, 4):
        unet(backend, 6, seed=seed)
        unet(backend, 2, side=12, seed=seed)
    assert context.executions == captured and len(cuda.execs) == 3
    backend.close()


def test_capture_is_thread_local_and_after_the_plain_run(backend, cuda):
    unet(backend, 2)
    assert cuda.capture_modes == [real_rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal]
    first = cuda.calls.index("execute_async_v3")
    assert cuda.calls[first : first + 5] == [
        "execute_async_v3",  # the plain run
        "cudaStreamSynchronize",  # ... finished
        "cudaStreamBeginCapture",
        "execute_async_v3",  # recorded, not run
        "cudaStreamEndCapture",
    ]
    backend.close()


def test_the_graph_cache_is_bounded_and_drops_the_least_recently_used(backend, cuda):
    shapes = [(b, s) for s in (4, 6, 10, 12, 14) for b in (1, 2)]  # ten shapes, one profile
    assert len(shapes) > trt_backend.GRAPH_CACHE_SIZE
    for batch, side in shapes:
        unet(backend, batch, side)
    plan = next(iter(backend._plans.values()))
    assert len(plan.graphs) == len(cuda.execs) == trt_backend.GRAPH_CACHE_SIZE
    assert len(cuda.graphs) == trt_backend.GRAPH_CACHE_SIZE  # the dropped graphs were destroyed
    context = the_unet_context(cuda)
    before = context.executions
    unet(backend, *shapes[-1])  # still cached: replayed
    assert context.executions == before
    unet(backend, *shapes[0])  # dropped: runs plainly and is captured again
    assert context.executions == before + 2
    backend.close()


def test_a_failed_capture_is_retried_later_not_given_up(backend, cuda, caplog):
    cuda.fail["cudaStreamEndCapture"] = 1
    unet(backend, 2)
    assert "capture for" in caplog.text and not cuda.execs
    for _ in range(trt_backend.CAPTURE_RETRY_AFTER):  # the back-off: plain runs, no capture
        unet(backend, 2)
    assert len(cuda.capture_modes) == 1 and not cuda.execs
    unet(backend, 2)  # tried again, and it works
    assert len(cuda.capture_modes) == 2 and len(cuda.execs) == 1
    context = the_unet_context(cuda)
    before = context.executions
    unet(backend, 2)
    assert context.executions == before  # replayed
    backend.close()


def test_the_retry_back_off_grows_and_other_shapes_still_capture(backend, cuda):
    cuda.fail["cudaGraphInstantiate"] = 2
    unet(backend, 2)  # fails: wait 4 runs
    for _ in range(trt_backend.CAPTURE_RETRY_AFTER):
        unet(backend, 2)
    unet(backend, 2)  # fails again: wait 8 runs
    plan = next(iter(backend._plans.values()))
    (waits,) = plan.capture_waits.values()
    assert waits == (2, 2 * trt_backend.CAPTURE_RETRY_AFTER)
    unet(backend, 1)  # another shape is not held back by this one's failures
    assert len(cuda.execs) == 1
    assert not cuda.graphs.keys() - {int(g.graph) for g in plan.graphs.values()}  # failed graphs destroyed
    backend.close()


def test_an_exception_inside_capture_still_ends_it(backend, cuda):
    unet(backend, 2)  # creates the plan, captures one graph
    context = the_unet_context(cuda)
    context.raise_in_capture = 1
    unet(backend, 3)  # plain run ok; its capture raises inside TensorRT
    assert not cuda.capturing  # the stream is not left capturing
    unet(backend, 3)  # and the next call works (plain run, waiting out the back-off)
    backend.close()


def test_a_failed_replay_falls_back_to_a_plain_run(backend, cuda, caplog):
    unet(backend, 2)
    cuda.fail["cudaGraphLaunch"] = 1
    unet(backend, 2)  # correct output all the same
    assert "replaying the CUDA graph" in caplog.text and not cuda.execs
    backend.close()


def test_cuda_graphs_off_never_captures(bundle, cuda):
    build_engines(bundle, bundle.root / "engines", REQUEST)
    backend = trt_backend.TrtBackend(bundle, BackendConfig(backend="tensorrt", cuda_graphs=False))
    for _ in range(3):
        unet(backend, 2)
    assert not cuda.capture_modes
    backend.close()


def test_the_stream_handle_is_the_native_one(backend, cuda):
    unet(backend, 2)
    plan = next(iter(backend._plans.values()))
    assert plan.handle == int(backend._stream) and plan.handle in cuda.streams
    backend.close()


# --- error paths -----------------------------------------------------------------------------------


def test_buffer_frees_its_device_memory_when_pinned_memory_fails(cuda):
    cuda.fail["cudaMallocHost"] = 1
    with pytest.raises(BackendError, match="cudaMallocHost failed"):
        trt_backend._Buffer(1024)
    assert not cuda.memory


def test_a_plan_that_fails_mid_allocation_frees_what_it_allocated(bundle, cuda):
    build_engines(bundle, bundle.root / "engines", REQUEST)
    backend = trt_backend.TrtBackend(bundle, BackendConfig(backend="tensorrt"))
    cuda.fail["cudaMalloc"] = 0
    allocated = []
    original = cuda.cudaMalloc

    def third_fails(size: int) -> tuple[Err, int]:
        allocated.append(size)
        return (Err.cudaErrorMemoryAllocation, 0) if len(allocated) == 3 else original(size)

    cuda.cudaMalloc = third_fails  # type: ignore[method-assign]
    with pytest.raises(BackendError, match="cudaMalloc failed"):
        backend.run("unet", unet_feeds(2))
    assert not cuda.memory
    backend.close()


def test_close_frees_everything_despite_errors_and_reports_them(backend, cuda):
    unet(backend, 2)
    backend.run("clip", {"input_ids": np.ones((1, 77), np.int32)})  # a second plan
    cuda.fail["cudaFree"] = 1
    cuda.fail["cudaStreamDestroy"] = 1
    with pytest.raises(BackendError, match=r"cudaFree failed.*cudaStreamDestroy failed"):
        backend.close()
    device = [a for a, (kind, _) in cuda.memory.items() if kind == "device"]
    assert len(device) == 1 and not [k for k, _ in cuda.memory.values() if k == "host"]  # only the failed one
    assert not cuda.graphs and not cuda.execs and not backend._plans and backend._stream is None


def test_a_refused_tensor_address_is_an_error(bundle, cuda, monkeypatch):
    build_engines(bundle, bundle.root / "engines", REQUEST)
    backend = trt_backend.TrtBackend(bundle, BackendConfig(backend="tensorrt"))
    monkeypatch.setattr(FakeContext, "set_tensor_address", lambda self, name, address: False)
    with pytest.raises(BackendError, match="TensorRT refused the address of tensor"):
        backend.run("unet", unet_feeds(2))
    assert not cuda.memory  # the buffers of the plan that failed are freed
    backend.close()


def test_a_failed_execution_names_the_engine_and_shapes(backend, cuda):
    unet(backend, 2)
    the_unet_context(cuda).fail_execute = 1
    with pytest.raises(BackendError, match=r"unet\.b1-4\..*TensorRT execution failed for shapes"):
        unet(backend, 3)
    backend.close()


# --- plans TensorRT cannot load, and --rebuild-stale ------------------------------------------------


def test_an_undeserializable_plan_is_refused_with_the_rebuild_command(bundle, cuda):
    build_engines(bundle, bundle.root / "engines", REQUEST, plan=b"a plan for another TensorRT build")
    backend = trt_backend.TrtBackend(bundle, BackendConfig(backend="tensorrt"))  # key and sha256 match
    with pytest.raises(trt_backend.StalePlan, match=r"(?s)could not deserialize .*--rebuild-stale$"):
        backend.run("unet", unet_feeds(2))
    latent = np.ones((1, 4, 8, 8), np.float32)
    np.testing.assert_array_equal(
        backend.run("vae_decoder", {"latent": latent})["image"], latent * 2 + 1
    )  # others run
    backend.close()


def test_plan_loads_asks_tensorrt(bundle, cuda, tmp_path):
    good, bad = tmp_path / "good.plan", tmp_path / "bad.plan"
    good.write_bytes(plan_bytes(bundle, "unet", 1))
    bad.write_bytes(b"\x00garbage")
    assert plan_loads(good) is None
    assert (
        plan_loads(bad)
        == "TensorRT cannot deserialize its plan: [ERROR] IRuntime::deserializeCudaEngine: magic tag mismatch"
    )


def test_rebuild_stale_rebuilds_what_the_backend_refused(bundle, cuda, monkeypatch):
    """The backend's advice for an undeserializable plan, `--rebuild-stale`, rebuilds exactly it
    (its key and sha256 match, so only asking TensorRT finds it)."""
    build_engines(bundle, bundle.root / "engines", REQUEST, plan=b"a plan for another TensorRT build")
    built: list[tuple[str, str]] = []

    def run_jobs(jobs: list[Any], *args: object) -> list[Any]:
        built.extend((j.name, j.reason) for j in jobs)
        return []

    monkeypatch.setattr(build_cli, "run_jobs", run_jobs)
    same = [str(bundle.root), "--shapes", "64x64", "--batch", "1-4", "--dynamic", "32-128"]
    assert build_cli.main(same) == 0
    assert built == []  # a plain build trusts matching keys and hashes
    assert build_cli.main([str(bundle.root), "--rebuild-stale"]) == 0
    reason = (
        "TensorRT cannot deserialize its plan: [ERROR] IRuntime::deserializeCudaEngine: magic tag mismatch"
    )
    assert built == [("unet.b1-4.64x64+dyn32-128", reason)]


def test_a_manifest_from_another_cuda_variant_is_refused(bundle, cuda, monkeypatch):
    build_engines(bundle, bundle.root / "engines", REQUEST)
    monkeypatch.setattr(trt_backend, "tensorrt_cuda", lambda: ("cu12", "12.9"))
    with pytest.raises(
        BackendError, match=r"(?s)for cu13, this process has its cu12 build.*--rebuild-stale$"
    ):
        trt_backend.TrtBackend(bundle, BackendConfig(backend="tensorrt"))
