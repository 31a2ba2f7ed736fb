"""int8 UNet by tool (issue #16): OpenVINO + NNCF (the bundle's int8 IR, `python -m export --int8`,
export/int8.py) against ONNX Runtime static QDQ (`onnxruntime.quantization.quantize_static`, built
here in a work directory, never in the bundle), each beside its engine's fp32: which is faster on
this CPU, at what quality, for what quantization cost.

Why one script: the tool was chosen for OpenVINO without an ORT int8 UNet ever built; a fair
comparison needs both quantizers on the same calibration data, the runtime's own backends (so the
numbers are what users get), and the engines timed on the same machine at the same time.

- Calibration: export/int8.py's `record_calibration` with the options the bundle's int8 record names
  (captions, size, steps, seed), so ORT sees exactly the NNCF path's data; its sha256 is checked
  against the manifest's. Quality: noise_pred of the held-out caption's calls (never calibrated on)
  against the fp32 output recorded with them (OpenVINO fp32, as export/int8.py measures).
- Cost: each quantizer runs in its own process on those inputs (NNCF again, result discarded), so its
  seconds and peak RSS are its own; the recording and the timing run in their own processes too.
- Time: one UNet call on the first held-out input (a CFG batch of 2 at the calibration size, 77
  tokens). The timing process holds every engine at once (two fp32 UNets, the int8 ones about a
  quarter of one each) and calls them interleaved, A B C D, A B C D, ..., after a warm-up, so a
  neighbour's load shifts all engines alike; medians are reported.

    python scripts/bench_int8_tools.py --bundle bundles/sd15 --json out/int8_tools.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from bench_e2e import cpu_info

from export.compare.cpu import cpu_summary
from runtime.cpu import int8_dot_instructions

MODEL = "unet"
OUTPUT = "noise_pred"
ORT_FP32, OV_FP32, OV_INT8 = "ort_fp32", "ov_fp32", "ov_int8"
ORT_INT8 = "ort_int8_"  # + a variant name


@dataclass(frozen=True)
class QdqVariant:
    """One ONNX Runtime static QDQ recipe: which op types get int8 weights and activations, from
    which of the bundle's fp32 graphs."""

    op_types: tuple[str, ...]
    source: str  # "ort": the graph ORT fp32 runs (attention fused, when the bundle has it); "standard"
    note: str


VARIANTS = {
    "qdq": QdqVariant(("Conv", "MatMul"), "ort", "every conv and weighted matmul int8 (NNCF 'full')"),
    "qdq_conv": QdqVariant(
        ("Conv",), "ort", "convolutions only int8 (NNCF 'hybrid' minus weight-only matmuls)"
    ),
    "qdq_standard": QdqVariant(
        ("Conv", "MatMul"), "standard", "as qdq, from unet.onnx: attention unfused, its matmuls int8 too"
    ),
}
SOURCES = ("ort", "standard")
# ORT's advice for x86-64 with VNNI (quantize_static's docstring, ORT >= 1.11): QDQ format, uint8
# activations, int8 weights, no reduce_range (VNNI / AMX accumulate without the VPMADDUBSW
# saturation that reduce_range works around). Per-channel weights, as NNCF's. MinMax calibration
# (ReduceMin/ReduceMax per tensor: no more memory than one UNet call; the histogram methods keep
# whole activations), its activation ranges by --ranges:
#   mean    the mean over calibration calls of each call's min / max (ORT's CalibMovingAverage
#           within one collect_data): NNCF's MEAN_MINMAX for per-tensor activations. On tiny,
#           held-out cosine 0.992 (conv_in excluded), vs 0.977 with
#   minmax  the min / max over all calls (ORT's default).
# Without VNNI/AMX (runtime.cpu.INT8_DOT_FLAGS), the same docstring's advice is reduce_range: 7-bit
# weights, so AVX2's u8 x s8 pair sums cannot saturate int16 (NNCF's overflow fix, export/int8.py).
# --reduce-range auto follows the CPU.
REDUCE_RANGE = ("auto", "on", "off")
ACTIVATIONS = ("QUInt8", "QInt8")
WEIGHTS = "QInt8"
RANGES = {"mean": {"CalibMovingAverage": True}, "minmax": {}}


@dataclass(frozen=True)
class RecordJob:
    bundle: str
    work: str
    threads: int | None


@dataclass(frozen=True)
class Recorded:
    """What the calibration recording produced (arrays are in the work directory)."""

    sha256: str
    manifest_sha256: str | None  # the bundle's int8 record: equal means NNCF saw the same data
    samples: int
    holdout_calls: int
    shapes: dict[str, list[int]]  # of the timed input
    options: dict[str, Any]
    seconds: float
    peak_rss_gib: float


@dataclass(frozen=True)
class QuantJob:
    tool: str  # "qdq" or "nncf"
    bundle: str
    work: str
    variant: str | None = None  # qdq: a VARIANTS name
    activations: str = ACTIVATIONS[0]
    ranges: str = "mean"  # qdq: a RANGES name
    reduce_range: bool = False  # qdq: 7-bit weights
    output: str | None = None  # qdq: the quantized graph
    calibration_sha256: str = ""  # what it calibrates on (a kept result is reused for the same only)


@dataclass(frozen=True)
class QuantCost:
    seconds: float
    peak_rss_gib: float
    file_bytes: int | None  # qdq: graph + weights written; nncf: None (the bundle's IR is timed)
    kept_fp32: tuple[str, ...]  # nodes excluded on purpose (conv_in)
    settings: dict[str, Any]


@dataclass(frozen=True)
class EngineSpec:
    name: str
    kind: str  # "ort_fp32", "ov_fp32", "ov_int8" or "ort_qdq"
    path: str | None = None  # ort_qdq: its graph


@dataclass(frozen=True)
class TimeJob:
    bundle: str
    work: str
    engines: tuple[EngineSpec, ...]
    warmup: int
    repeats: int
    threads: int | None
    static_shapes: bool


@dataclass(frozen=True)
class EngineRun:
    """One engine in the timing process: each timed call, and noise_pred against fp32 (held out)."""

    seconds: tuple[float, ...]
    cosine_min: float
    max_abs: float
    load_seconds: float


@dataclass(frozen=True)
class Timed:
    runs: dict[str, EngineRun]
    errors: dict[str, str]
    peak_rss_gib: float
    load_average: tuple[float, float] = (0.0, 0.0)  # 1-min, before and after the timed rounds: others' load


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    engine: str
    median_s: float | None
    vs_ort_fp32: float | None
    vs_ov_fp32: float | None
    cosine_min: float | None
    max_abs: float | None
    quant_seconds: float | None
    quant_peak_rss_gib: float | None
    file_bytes: int | None
    calls: int
    error: str | None = None


# --- pure logic -------------------------------------------------------------------------------


def interleaved(engines: Sequence[str], rounds: int) -> Iterator[str]:
    """A B C D, A B C D, ...: every round calls each engine once, in the same order."""
    for _ in range(rounds):
        yield from engines


def input_convolution(nodes: Sequence[Any]) -> str:
    """The first Conv in graph (topological) order: conv_in, which reads the noisy latents and
    stays fp32 in the NNCF path (export/int8.py)."""
    return next(n.name for n in nodes if n.op_type == "Conv")


def free_dims(spec_shapes: Sequence[Sequence[int | str]], shapes: Sequence[Sequence[int]]) -> dict[str, int]:
    """Each symbolic dim of a spec's inputs fixed by the actual input shapes (ORT free-dimension
    overrides: the runtime's static shapes)."""
    dims: dict[str, int] = {}
    for spec, shape in zip(spec_shapes, shapes, strict=True):
        for dim, value in zip(spec, shape, strict=True):
            if isinstance(dim, str) and dims.setdefault(dim, value) != value:
                raise ValueError(f"dim {dim} is {dims[dim]} in one input and {value} in another")
    return dims


def summarize(
    timed: Timed,
    costs: Mapping[str, QuantCost | str],
    sizes: Mapping[str, int | None],
    order: Sequence[str],
) -> list[Row]:
    """Rows in `order`: median call, ratios to ORT fp32 and OpenVINO fp32 (when they ran), quality,
    the quantizer's cost (`costs`: a QuantCost, or the error that stopped it)."""

    def median(engine: str) -> float | None:
        run = timed.runs.get(engine)
        return statistics.median(run.seconds) if run and run.seconds else None

    base_ort, base_ov = median(ORT_FP32), median(OV_FP32)
    rows = []
    for engine in order:
        run, cost, m = timed.runs.get(engine), costs.get(engine), median(engine)
        error = timed.errors.get(engine) or (cost if isinstance(cost, str) else None)
        spent = cost if isinstance(cost, QuantCost) else None
        rows.append(
            Row(
                engine=engine,
                median_s=m,
                vs_ort_fp32=m / base_ort if m is not None and base_ort else None,
                vs_ov_fp32=m / base_ov if m is not None and base_ov else None,
                cosine_min=run.cosine_min if run else None,
                max_abs=run.max_abs if run else None,
                quant_seconds=spent.seconds if spent else None,
                quant_peak_rss_gib=spent.peak_rss_gib if spent else None,
                file_bytes=sizes.get(engine),
                calls=len(run.seconds) if run else 0,
                error=error,
            )
        )
    return rows


def format_table(rows: Sequence[Row]) -> str:
    columns = ("median s", "vs ORT32", "vs OV32", "cosine", "max abs", "quant s", "quant GiB", "file MB")
    lines = [f"{'engine':22} " + " ".join(f"{c:>10}" for c in columns)]

    def cell(value: float | None, fmt: str) -> str:
        return f"{value:{fmt}}" if value is not None else f"{'-':>10}"

    for r in rows:
        if r.error and r.median_s is None:
            lines.append(f"{r.engine:22} error: {r.error}")
            continue
        size = r.file_bytes / 1e6 if r.file_bytes is not None else None
        lines.append(
            f"{r.engine:22} {cell(r.median_s, '10.3f')} {cell(r.vs_ort_fp32, '9.2f')}x "
            f"{cell(r.vs_ov_fp32, '9.2f')}x {cell(r.cosine_min, '10.5f')} {cell(r.max_abs, '10.4f')} "
            f"{cell(r.quant_seconds, '10.0f')} {cell(r.quant_peak_rss_gib, '10.2f')} {cell(size, '10.0f')}"
        )
    return "\n".join(lines)


# --- workers (each in its own process) ---------------------------------------------------------


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # KiB on Linux


def _save_calls(path: Path, calls: Sequence[Mapping[str, np.ndarray]]) -> None:
    arrays: dict[str, Any] = {f"{i}/{name}": a for i, call in enumerate(calls) for name, a in call.items()}
    np.savez(path, **arrays)


def load_calls(path: Path) -> list[dict[str, np.ndarray]]:
    """The inverse of _save_calls: a list of {name: array}, in order."""
    with np.load(path) as data:
        calls: dict[int, dict[str, np.ndarray]] = {}
        for key in data.files:
            index, name = key.split("/", 1)
            calls.setdefault(int(index), {})[name] = data[key]
    return [calls[i] for i in sorted(calls)]


def record(job: RecordJob) -> Recorded:
    """The NNCF path's calibration inputs and held-out calls, recorded through the bundle's pipeline
    with the options its int8 record names."""
    from export.int8 import Int8Options, record_calibration
    from runtime.bundle import Bundle

    start = time.perf_counter()
    bundle = Bundle.open(job.bundle)
    int8 = bundle.manifest.export.get("int8") or {}
    recorded = dict(int8.get("fingerprint", {}).get("options", {}))
    opts = Int8Options(**recorded).validate() if recorded else Int8Options()
    calibration = record_calibration(bundle, opts, job.threads)
    work = Path(job.work)
    feeds = calibration.feeds[MODEL]
    holdout = calibration.holdout[MODEL]
    _save_calls(work / "calibration.npz", feeds)
    _save_calls(work / "holdout.npz", [{**f, f"out/{OUTPUT}": out[OUTPUT]} for f, out in holdout])
    return Recorded(
        sha256=calibration.sha256(),  # over every model the options quantize, as the manifest's
        manifest_sha256=int8.get("calibration", {}).get("sha256"),
        samples=len(feeds),
        holdout_calls=len(holdout),
        shapes={name: list(a.shape) for name, a in holdout[0][0].items()},
        options=asdict(opts),
        seconds=time.perf_counter() - start,
        peak_rss_gib=_peak_rss_gib(),
    )


def _graph_files(bundle: Any, source: str) -> list[Path]:
    """The fp32 UNet graph a QDQ variant starts from, and its external weights."""
    entry = bundle.graph(MODEL, "fp32", fused=source == "ort")
    bundle.verified_path(entry)
    return [bundle.root / name for name in entry.hashed_files()]


class _Feeds:
    """ORT's CalibrationDataReader over the recorded calibration inputs."""

    def __init__(self, calls: list[dict[str, np.ndarray]]):
        self.calls = calls
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.calls):
            return None
        self.position += 1
        return self.calls[self.position - 1]

    def __len__(self) -> int:
        return len(self.calls)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.calls, self.position = self.calls[start_index:end_index], 0


def quantize_qdq(job: QuantJob) -> QuantCost:
    """The bundle's fp32 UNet quantized by ONNX Runtime (static QDQ) into job.output. The source is
    copied into a temp dir first (onnx refuses symlinked or hard-linked weights): quantize_static
    writes a shape-inferred copy beside its input."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from runtime.bundle import Bundle

    assert job.variant is not None and job.output is not None
    variant = VARIANTS[job.variant]
    bundle = Bundle.open(job.bundle)
    files = _graph_files(bundle, variant.source)
    feeds = load_calls(Path(job.work) / "calibration.npz")
    output = Path(job.output)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".source.") as tmp:
        for file in files:
            shutil.copyfile(file, Path(tmp) / file.name)
        source = Path(tmp) / files[0].name
        graph = onnx.load(str(source), load_external_data=False)
        kept = (input_convolution(graph.graph.node),)
        del graph
        settings: dict[str, Any] = {
            "quant_format": "QDQ",
            "op_types_to_quantize": list(variant.op_types),
            "per_channel": True,
            "reduce_range": job.reduce_range,
            "activation_type": job.activations,
            "weight_type": WEIGHTS,
            "calibrate_method": "MinMax",
            "extra_options": RANGES[job.ranges],
            "nodes_to_exclude": list(kept),
            "source": files[0].name,
            "calibration_samples": len(feeds),
        }
        quantize_static(
            str(source),
            str(output),
            _Feeds(feeds),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(variant.op_types),
            per_channel=True,
            reduce_range=job.reduce_range,
            activation_type=QuantType[job.activations],
            weight_type=QuantType[WEIGHTS],
            nodes_to_exclude=list(kept),
            use_external_data_format=True,  # the SD 1.5 UNet is > 2 GB
            calibrate_method=CalibrationMethod.MinMax,
            extra_options=dict(RANGES[job.ranges]),
        )
    written = [p for p in output.parent.iterdir() if p.name.startswith(output.name)]
    return QuantCost(
        seconds=time.perf_counter() - start,
        peak_rss_gib=_peak_rss_gib(),
        file_bytes=sum(p.stat().st_size for p in written),
        kept_fp32=kept,
        settings=settings,
    )


def quantize_nncf(job: QuantJob) -> QuantCost:
    """NNCF again on the same inputs, with the bundle's scheme (export/int8.py's `quantize`): its
    seconds and peak RSS on this machine; the model is discarded (the bundle's IR is the one timed)."""
    from export.int8 import quantize
    from runtime.bundle import Bundle

    bundle = Bundle.open(job.bundle)
    source = bundle.verified_path(bundle.graph(MODEL, "fp32"))
    record = bundle.manifest.int8
    if record is None:
        raise SystemExit(f"--bundle {job.bundle} lacks export.int8: run `python -m export ... --int8`")
    scheme, overflow_fix = record.scheme, record.overflow_fix
    feeds = load_calls(Path(job.work) / "calibration.npz")
    start = time.perf_counter()
    model, kept = quantize(source, feeds, scheme, overflow_fix)
    seconds = time.perf_counter() - start
    del model
    settings = {
        "scheme": scheme,
        "overflow_fix": overflow_fix,
        "calibration_samples": len(feeds),
        "source": source.name,
    }
    return QuantCost(seconds, _peak_rss_gib(), None, tuple(kept), settings)


Engine = Callable[[dict[str, np.ndarray]], np.ndarray]


def _open_engine(spec: EngineSpec, job: TimeJob, bundle: Any, closers: list[Callable[[], None]]) -> Engine:
    """One engine's UNet call: the runtime's backends where they can run it (ORT fp32, OpenVINO
    fp32 and int8), else an ORT session with the runtime's own session options (the QDQ graphs)."""
    import onnxruntime as ort

    from runtime.backends import BackendConfig, open_backend
    from runtime.backends.onnxruntime import OrtBackend

    if spec.kind != "ort_qdq":
        backend_name, precision = {
            ORT_FP32: ("onnxruntime", "fp32"),
            OV_FP32: ("openvino", "fp32"),
            OV_INT8: ("openvino", "int8"),
        }[spec.kind]
        config = BackendConfig(
            backend_name, precision=precision, threads=job.threads, static_shapes=job.static_shapes
        )
        backend = open_backend(bundle, config)
        closers.append(backend.close)
        return lambda feeds: backend.run(MODEL, feeds)[OUTPUT]
    assert spec.path is not None
    runtime = OrtBackend(bundle, BackendConfig("onnxruntime", threads=job.threads))
    session_cache: dict[tuple[tuple[int, ...], ...], ort.InferenceSession] = {}
    spec_shapes = [t.shape for t in bundle.models[MODEL].spec.inputs]
    names = bundle.models[MODEL].spec.input_names

    def session(feeds: dict[str, np.ndarray]) -> ort.InferenceSession:
        shapes = tuple(tuple(feeds[n].shape) for n in names) if job.static_shapes else ()
        if shapes not in session_cache:
            opts = runtime._session_options()  # the runtime's: threads, no CPU arena, sequential
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # QDQ -> QLinear*
            if job.static_shapes:
                for dim, value in free_dims(spec_shapes, shapes).items():
                    opts.add_free_dimension_override_by_name(dim, value)
            session_cache[shapes] = ort.InferenceSession(spec.path, opts, providers=["CPUExecutionProvider"])
        return session_cache[shapes]

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        out: np.ndarray = session(feeds).run([OUTPUT], feeds)[0]
        return out

    closers.append(session_cache.clear)
    return run


def time_engines(job: TimeJob) -> Timed:
    """Load every engine, warm each up, then time them interleaved; then noise_pred vs fp32 on the
    held-out calls."""
    from export.compare.metrics import tensor_metrics
    from runtime.bundle import Bundle

    bundle = Bundle.open(job.bundle)
    holdout = load_calls(Path(job.work) / "holdout.npz")
    calls = [({k: v for k, v in c.items() if not k.startswith("out/")}, c[f"out/{OUTPUT}"]) for c in holdout]
    timed_input = calls[0][0]
    engines: dict[str, Engine] = {}
    loads: dict[str, float] = {}
    errors: dict[str, str] = {}
    closers: list[Callable[[], None]] = []
    for spec in job.engines:
        start = time.perf_counter()
        try:
            engine = _open_engine(spec, job, bundle, closers)
            for _ in range(job.warmup):  # the first call includes the load / the static compile
                engine(timed_input)
        except Exception as exc:
            errors[spec.name] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        engines[spec.name] = engine
        loads[spec.name] = time.perf_counter() - start
        print(f"loaded and warmed up {spec.name} in {loads[spec.name]:.1f} s", file=sys.stderr, flush=True)
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    load_before = os.getloadavg()[0]
    for name in interleaved(list(engines), job.repeats):
        start = time.perf_counter()
        engines[name](timed_input)
        seconds[name].append(time.perf_counter() - start)
    load = (load_before, os.getloadavg()[0])
    print("timed: " + ", ".join(f"{n} {statistics.median(s):.3f} s" for n, s in seconds.items()),
          file=sys.stderr, flush=True)  # fmt: skip
    runs = {}
    for name, engine in engines.items():
        metrics = [tensor_metrics(engine(feeds), ref) for feeds, ref in calls]
        runs[name] = EngineRun(
            seconds=tuple(seconds[name]),
            cosine_min=min(m["cosine"] for m in metrics),
            max_abs=max(m["max_abs"] for m in metrics),
            load_seconds=loads[name],
        )
    for close in closers:
        close()
    return Timed(runs, errors, _peak_rss_gib(), load)


def _as_json(value: Any) -> Any:
    return asdict(value) if hasattr(value, "__dataclass_fields__") else value


def _run_worker(kind: str, job_file: Path) -> int:
    """Run one worker's job (JSON from the parent) and print its result as one JSON line."""
    payload = json.loads(job_file.read_text())
    result: Any
    if kind == "record":
        result = record(RecordJob(**payload))
    elif kind == "quantize":
        job = QuantJob(**payload)
        result = quantize_qdq(job) if job.tool == "qdq" else quantize_nncf(job)
    else:
        engines = tuple(EngineSpec(**e) for e in payload.pop("engines"))
        result = time_engines(TimeJob(engines=engines, **payload))
    print(json.dumps(_as_json(result)))
    return 0


# --- the parent: runs the workers one after another ---------------------------------------------


def _spawn(
    kind: str, job: Any, work: Path, label: str, timeout: float, reuse: bool = False
) -> dict[str, Any] | str:
    """One worker's JSON result, or the error that stopped it (its log's last lines). With `reuse`,
    the result an earlier run kept in `work` for the same job (a kept --work-dir: re-timing without
    re-quantizing)."""
    job_file, log_file, kept = (work / f"{label}.{suffix}" for suffix in ("job.json", "log", "result.json"))
    if reuse and kept.is_file():
        earlier = json.loads(kept.read_text())
        if earlier["job"] == _as_json(job):
            print(f"{label}: reusing the result kept in {work}", file=sys.stderr, flush=True)
            reused: dict[str, Any] = earlier["result"]
            return reused
    job_file.write_text(json.dumps(_as_json(job)))
    cmd = [sys.executable, __file__, "--worker", kind, str(job_file)]
    print(f"{label} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with log_file.open("w") as log:
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"no result within --timeout {timeout:g} s: killed"
    if proc.returncode != 0:
        tail = [line for line in log_file.read_text().splitlines() if line.strip()][-3:]
        killed = " (killed: out of memory?)" if proc.returncode == -9 else ""
        return f"exit {proc.returncode}{killed}: " + " | ".join(tail)[-400:]
    print(f"{label} done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    kept.write_text(json.dumps({"job": _as_json(job), "result": result}))
    return result


def _cost(result: dict[str, Any] | str) -> QuantCost | str:
    if isinstance(result, str):
        return result
    return QuantCost(**{**result, "kept_fp32": tuple(result["kept_fp32"])})


def _timed(result: dict[str, Any] | str, engines: Sequence[str]) -> Timed:
    if isinstance(result, str):
        return Timed({}, {e: result for e in engines}, 0.0)
    runs = {n: EngineRun(**{**r, "seconds": tuple(r["seconds"])}) for n, r in result["runs"].items()}
    return Timed(runs, result["errors"], result["peak_rss_gib"], tuple(result["load_average"]))


def _bytes(root: Path, entry: Any) -> int:
    return sum((root / name).stat().st_size for name in entry.hashed_files())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, help="with fp32 ONNX and an int8 UNet (python -m export --int8)")
    p.add_argument("--variants", default="qdq,qdq_conv", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--activations", choices=ACTIVATIONS, default=ACTIVATIONS[0],
                   help="QDQ activation type (weights are QInt8)")  # fmt: skip
    p.add_argument("--ranges", choices=RANGES, default="mean", help="QDQ activation ranges (see RANGES)")
    p.add_argument("--reduce-range", choices=REDUCE_RANGE, default="auto",
                   help="QDQ 7-bit weights; auto: on without VNNI/AMX (see REDUCE_RANGE)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=5, help="timed calls per engine (interleaved rounds)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per engine after its load")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    p.add_argument("--static-shapes", action="store_true", help="every engine compiled for the input shape")
    p.add_argument("--no-nncf-cost", action="store_true", help="skip re-running NNCF for its cost")
    p.add_argument(
        "--work-dir", type=Path, help="keep the recorded inputs and QDQ graphs here (and reuse them)"
    )
    p.add_argument("--timeout", type=float, default=5400.0, help="seconds per worker before it is killed")
    p.add_argument("--json", type=Path, default=Path("out/bench_int8_tools.json"))
    p.add_argument("--worker", nargs=2, metavar=("KIND", "JOB"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return _run_worker(args.worker[0], Path(args.worker[1]))

    from runtime.bundle import Bundle

    if args.bundle is None:
        p.error("--bundle is required")
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        p.error(f"--variants must be a comma list of {', '.join(VARIANTS)}; unknown: {', '.join(unknown)}")
    if args.repeats < 3 or args.warmup < 1:
        p.error("--repeats must be >= 3 and --warmup >= 1 (medians of warmed-up calls)")
    bundle = Bundle.open(args.bundle)
    unet = bundle.models[MODEL]
    if "int8" not in unet.files or "fp32" not in unet.files:
        p.error(f"--bundle {args.bundle} needs fp32 and int8 UNets (python -m export ... --int8)")

    cpu = cpu_info()
    print(cpu_summary())
    reduce_range = args.reduce_range == "on" or (args.reduce_range == "auto" and not int8_dot_instructions())
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="sdrt-int8-tools-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        # a kept --work-dir's recording and quantizations are reused (same jobs), the timing never
        keep = args.work_dir is not None
        record_job = RecordJob(str(args.bundle.resolve()), str(work), args.threads)
        recorded = _spawn("record", record_job, work, "record", args.timeout, reuse=keep)
        if isinstance(recorded, str):
            print(f"recording the calibration failed: {recorded}", file=sys.stderr)
            return 1
        same = recorded["sha256"] == recorded["manifest_sha256"]
        print(f"calibration: {recorded['samples']} UNet inputs, {recorded['holdout_calls']} held out, "
              f"sha256 {recorded['sha256'][:12]} ({'same as' if same else 'DIFFERS from'} the bundle's "
              f"int8 record); timed input {recorded['shapes']}")  # fmt: skip

        costs: dict[str, QuantCost | str] = {}
        sizes: dict[str, int | None] = {
            ORT_FP32: _bytes(bundle.root, bundle.graph(MODEL, "fp32", fused=True)),
            OV_FP32: _bytes(bundle.root, bundle.graph(MODEL, "fp32")),
            OV_INT8: _bytes(bundle.root, bundle.graph(MODEL, "int8")),
        }
        specs = [EngineSpec(ORT_FP32, ORT_FP32)]
        for variant in variants:
            name, output = ORT_INT8 + variant, work / variant / f"{MODEL}.onnx"
            output.parent.mkdir(exist_ok=True)
            job = QuantJob("qdq", str(args.bundle), str(work), variant, args.activations, args.ranges,
                           reduce_range, str(output), recorded["sha256"])  # fmt: skip
            cost = costs[name] = _cost(
                _spawn("quantize", job, work, f"quantize_{variant}", args.timeout, keep)
            )
            if isinstance(cost, QuantCost):
                sizes[name] = cost.file_bytes
                specs.append(EngineSpec(name, "ort_qdq", str(output)))
        specs += [EngineSpec(OV_FP32, OV_FP32), EngineSpec(OV_INT8, OV_INT8)]
        if not args.no_nncf_cost:
            job = QuantJob("nncf", str(args.bundle), str(work), calibration_sha256=recorded["sha256"])
            costs[OV_INT8] = _cost(_spawn("quantize", job, work, "quantize_nncf", args.timeout, keep))

        time_job = TimeJob(str(args.bundle), str(work), tuple(specs), args.warmup, args.repeats, args.threads,
                           args.static_shapes)  # fmt: skip
        order = [s.name for s in specs]
        timed = _timed(_spawn("time", time_job, work, "time", args.timeout), order)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    rows = summarize(timed, costs, sizes, order)
    print(format_table(rows))
    print(f"per engine: median of {args.repeats} interleaved calls after {args.warmup} warm-up; "
          f"cosine/max abs: noise_pred vs the recorded OpenVINO fp32 output on "
          f"{recorded['holdout_calls']} held-out calls; "
          f"timing process peak RSS {timed.peak_rss_gib:.2f} GiB (all engines loaded); load average "
          f"{timed.load_average[0]:.1f} before the timed calls, {timed.load_average[1]:.1f} after "
          f"({os.cpu_count()} cores)")  # fmt: skip
    for name, cost in costs.items():
        if isinstance(cost, QuantCost):
            print(f"{name}: {cost.settings}; kept fp32: {', '.join(cost.kept_fp32)}")
    for name, error in timed.errors.items():
        print(f"{name}: {error}")
    report = {
        "cpu": cpu,
        "workload": {
            "bundle": str(args.bundle),
            "timed_input": recorded["shapes"],
            "repeats": args.repeats,
            "warmup": args.warmup,
            "threads": args.threads,
            "static_shapes": args.static_shapes,
            "activations": args.activations,
            "ranges": args.ranges,
            "weights": WEIGHTS,
        },
        "calibration": recorded,
        "variants": {v: asdict(VARIANTS[v]) for v in variants},
        "quantization": {
            n: _as_json(c) if isinstance(c, QuantCost) else {"error": c} for n, c in costs.items()
        },
        "timing_peak_rss_gib": timed.peak_rss_gib,
        "load_average": list(timed.load_average),
        "results": {r.engine: asdict(r) for r in rows},
        "calls_s": {n: list(r.seconds) for n, r in timed.runs.items()},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
