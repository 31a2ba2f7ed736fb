"""Build FP16 TensorRT engines from a bundle, in-process with the TensorRT Python API.

The library behind `python -m engines.build BUNDLE ...` (the command is engines/build.py, which
imports this module; nothing here imports it back). Per engine: parse the fp16 ONNX
(parse_from_file, so external weights load beside it), create a strongly typed network (the flag
on TensorRT 10; TensorRT 11 has nothing else), add one optimisation profile per requested shape,
build with the shared timing cache, then write the plan and the manifest entry atomically. A
failure raises EngineBuildError carrying TensorRT's last log lines.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engines.cache import BuildJob, save_manifest
from runtime.backends.tensorrt import make_logger
from runtime.backends.trt_manifest import EngineEntry, GpuEnvironment
from runtime.backends.trt_shapes import input_ranges
from runtime.bundle import Bundle
from runtime.files import write_atomic

if TYPE_CHECKING:
    import tensorrt as trt

log = logging.getLogger(__name__)
LOG_TAIL = 30  # TensorRT log lines kept for an error report
PROGRESS_EVERY = 10.0  # seconds between progress lines of one phase


class EngineBuildError(RuntimeError):
    """TensorRT could not parse or build a model; the message ends with TensorRT's last log lines."""

    def __init__(self, name: str, what: str, log_tail: list[str]) -> None:
        tail = "\n".join(f"    {line}" for line in log_tail) or "    (TensorRT logged nothing)"
        super().__init__(f"{name}: {what}\n  TensorRT log tail:\n{tail}")
        self.name, self.log_tail = name, log_tail


@dataclass
class Built:
    name: str
    status: str  # "built" or "up to date"
    seconds: float
    plan_bytes: int


def network_flags(tensorrt_version: str, strongly_typed_bit: int) -> int:
    """create_network flags: STRONGLY_TYPED on TensorRT 10; 0 on 11+, where every network is."""
    return 0 if int(tensorrt_version.split(".")[0]) >= 11 else 1 << strongly_typed_bit


def _progress_monitor(name: str) -> trt.IProgressMonitor | None:
    """An IProgressMonitor that logs top-level build phases (None if this TensorRT lacks it)."""
    import tensorrt as trt

    if not hasattr(trt, "IProgressMonitor"):
        return None

    class Progress(trt.IProgressMonitor):  # type: ignore[misc, unused-ignore]  # Any without the stubs
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.steps: dict[str, int] = {}
            self.last = 0.0

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self.steps[phase_name] = num_steps
            if parent_phase is None:
                log.info("%s: %s (%d steps)", name, phase_name, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            now = time.monotonic()
            if now - self.last >= PROGRESS_EVERY:
                self.last = now
                log.info("%s: %s %d/%d", name, phase_name, step + 1, self.steps.get(phase_name, 0))
            return True

        def phase_finish(self, phase_name: str) -> None:
            self.steps.pop(phase_name, None)

    return Progress()


def build_plan(job: BuildJob, bundle: Bundle, timing_cache: bytes) -> tuple[memoryview, bytes]:
    """(serialized plan, updated timing cache) for one job. Raises EngineBuildError."""
    import tensorrt as trt

    tail: deque[str] = deque(maxlen=LOG_TAIL)
    logger = make_logger(tail)
    builder = trt.Builder(logger)
    network = builder.create_network(
        network_flags(trt.__version__, int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    )
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(job.onnx)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(job.name, f"could not parse {job.onnx}", errors + list(tail))
    spec = bundle.models[job.model].spec
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    if inputs != set(spec.input_names):
        raise EngineBuildError(
            job.name, f"{job.onnx} has inputs {sorted(inputs)}, the bundle says {spec.input_names}", []
        )

    config = builder.create_builder_config()
    if job.settings.get("workspace_gb") is not None:
        config.set_memory_pool_limit(
            trt.MemoryPoolType.WORKSPACE, int(job.settings["workspace_gb"] * (1 << 30))
        )
    if job.settings.get("opt_level") is not None:
        config.builder_optimization_level = int(job.settings["opt_level"])
    if job.flags.get("refittable"):  # every weight refittable by its ONNX initializer's name
        config.set_flag(trt.BuilderFlag.REFIT)
    cache = config.create_timing_cache(timing_cache)
    if not config.set_timing_cache(cache, False):
        log.warning("%s: the timing cache is from another GPU or TensorRT; starting a new one", job.name)
        config.set_timing_cache(config.create_timing_cache(b""), False)
    monitor = _progress_monitor(job.name)
    if monitor is not None:
        config.progress_monitor = monitor
    for profile in job.profiles:
        p = builder.create_optimization_profile()
        for name, (low, opt, high) in input_ranges(spec, profile).items():
            p.set_shape(name, trt.Dims(list(low)), trt.Dims(list(opt)), trt.Dims(list(high)))
        config.add_optimization_profile(p)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(job.name, "TensorRT failed to build the engine", list(tail))
    return memoryview(plan), bytes(memoryview(config.get_timing_cache().serialize()))


def run_jobs(
    jobs: list[BuildJob],
    bundle: Bundle,
    engine_dir: Path,
    entries: dict[str, EngineEntry],
    env: GpuEnvironment,
    timing_cache_path: Path,
) -> list[Built]:
    """Build each job, saving its plan, the manifest and the timing cache after each one, so an
    interrupted run keeps what it finished."""
    engine_dir.mkdir(parents=True, exist_ok=True)
    timing_cache = timing_cache_path.read_bytes() if timing_cache_path.is_file() else b""
    results = []
    for number, job in enumerate(jobs, 1):
        log.info(
            "[%d/%d] building %s (%d profiles) from %s: %s",
            number,
            len(jobs),
            job.name,
            len(job.profiles),
            job.onnx.name,
            job.reason,
        )
        start = time.perf_counter()
        plan, timing_cache = build_plan(job, bundle, timing_cache)
        seconds = time.perf_counter() - start
        plan_name = f"{job.name}.plan"
        write_atomic(engine_dir / plan_name, plan)
        write_atomic(timing_cache_path, timing_cache)
        entries[job.name] = EngineEntry(
            name=job.name,
            model=job.model,
            plan=plan_name,
            plan_sha256=hashlib.sha256(plan).hexdigest(),
            plan_bytes=plan.nbytes,
            source=job.source,
            profiles=job.profiles,
            flags=dict(job.flags),
            settings=job.settings,
            environment=env,
            build_seconds=round(seconds, 1),
            key=job.key,
        )
        save_manifest(engine_dir, entries)
        log.info("built %s in %.1f s (%.1f MB)", job.name, seconds, plan.nbytes / 1e6)
        results.append(Built(job.name, "built", seconds, plan.nbytes))
    return results


def plan_loads(plan: Path) -> str | None:
    """Why this process's TensorRT cannot deserialize `plan` (None if it can). A plan whose key
    and sha256 match can still fail to load (a TensorRT build whose version string matches but
    whose libraries differ): `--rebuild-stale` asks TensorRT itself, so that the rebuild the
    backend advises for an undeserializable plan actually happens."""
    import tensorrt as trt

    tail: deque[str] = deque(maxlen=LOG_TAIL)
    runtime = trt.Runtime(make_logger(tail))
    engine = runtime.deserialize_cuda_engine(plan.read_bytes())
    if engine is None:
        detail = f": {tail[-1]}" if tail else ""
        return f"TensorRT cannot deserialize its plan{detail}"
    del engine, runtime  # frees the plan's GPU memory before the next check or build
    return None
