"""End-to-end latency: the runtime (ONNX Runtime fp32, OpenVINO fp32 and bf16) vs diffusers
(fp32, bf16) and optionally Optimum, on the same weights and workload.

Each engine runs in its own process, one after another, so peak RSS and time to first image are
its own. Prints a table, the issue's targets as met / missed, and writes JSON. The runtime
workers also measure their own overhead: the wall time of each denoising step outside the UNet
backend call, as a share of the step.

    python scripts/bench_e2e.py --bundle bundles/sd15 --size 256x256 --steps 10 --repeats 3

Optimum's ORTStableDiffusionPipeline pins transformers<4.58, so it can only run from its own
virtualenv: `bash scripts/setup_optimum.sh BUNDLE` makes it and the exported folder of the same
weights, then pass --optimum-python .venv-optimum/bin/python --optimum-model BUNDLE-optimum.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from runtime.cli import size_argument

# runtime engines: (backend, precision) of `python -m runtime.generate --backend --precision`
RUNTIME_ENGINES = {
    "runtime": ("onnxruntime", "fp32"),
    "runtime_openvino": ("openvino", "fp32"),
    "runtime_openvino_bf16": ("openvino", "bf16"),
}
ENGINES = (*RUNTIME_ENGINES, "diffusers_fp32", "diffusers_bf16")
# The targets, for the engine named by --ours (same run, same machine).
# speedup_vs_diffusers_fp32: the "i.e. >= 1.7x", derived from its own machine's figures.
TARGETS = {
    "vs_optimum": 0.77,
    "speedup_vs_diffusers_fp32": 1.7,
    "time_to_first_image_s": 30.0,
    "peak_rss_gib": 4.5,
    "step_overhead": 0.01,
}


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {"median_s": statistics.median(ordered), "p95_s": float(np.percentile(ordered, 95))}


def _timed_runs(first: Any, repeats: int, run: Any) -> dict[str, Any]:
    """first() -> seconds from process start to the first image; then `repeats` timed run() calls."""
    ttfi = first()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    latencies = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        latencies.append(time.perf_counter() - start)
    cpu_ratio = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    return {
        **_summary(latencies),
        "latencies_s": latencies,
        "time_to_first_image_s": ttfi,
        "cpu_per_wall": cpu_ratio,
        "peak_rss_gib": _peak_rss_gib(),
    }


def worker_runtime(args: argparse.Namespace, t0: float, backend_name: str, precision: str) -> dict[str, Any]:
    from runtime.backends import BackendConfig, open_backend
    from runtime.bundle import Bundle
    from runtime.options import GenerateOptions
    from runtime.pipeline import Pipeline

    class TimedBackend:
        """Counts the time spent inside backend calls, per model."""

        def __init__(self, inner: Any):
            self.inner, self.device, self.precision = inner, inner.device, inner.precision
            self.seconds: dict[str, float] = {}

        def run(self, model: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            start = time.perf_counter()
            out = self.inner.run(model, feeds)
            self.seconds[model] = self.seconds.get(model, 0.0) + time.perf_counter() - start
            return out

        def prepare(self, models: Any) -> None:
            self.inner.prepare(models)

        def close(self) -> None:
            self.inner.close()

    bundle = Bundle.open(args.bundle)
    backend = TimedBackend(
        open_backend(bundle, BackendConfig(backend_name, precision=precision, threads=args.threads))
    )
    pipe = Pipeline(bundle, backend)
    width, height = args.size
    options = GenerateOptions(
        prompts=(args.prompt,),
        steps=args.steps,
        guidance=args.guidance,
        seed=0,
        height=height,
        width=width,
        scheduler="ddim",
    )
    overheads: list[float] = []
    images: list[np.ndarray] = []

    def run() -> None:
        marks = [time.perf_counter()]
        unet_at_marks = [backend.seconds.get("unet", 0.0)]

        def on_step(i: int, t: float, x: np.ndarray) -> None:
            marks.append(time.perf_counter())
            unet_at_marks.append(backend.seconds.get("unet", 0.0))

        images.append(pipe.generate(options, on_step=on_step).images[0])
        # step k spans marks[k]..marks[k+1]; the first starts after the text stage, so skip it
        for k in range(1, len(marks) - 1):
            wall = marks[k + 1] - marks[k]
            overheads.append((wall - (unet_at_marks[k + 1] - unet_at_marks[k])) / wall)

    def first() -> float:
        run()
        return time.perf_counter() - t0

    result = _timed_runs(first, args.repeats, run)
    result["step_overhead_share"] = {"median": statistics.median(overheads), "max": max(overheads)}
    np.save(_image_path(args.json, args.worker), images[-1])  # same seed in every runtime engine
    return result


def _image_path(report: Path, engine: str) -> Path:
    return report.with_name(f"{report.stem}.{engine}.npy")


def _image_parity(report: Path, engines: list[str]) -> dict[str, dict[str, Any]]:
    """Each runtime engine's image vs ONNX Runtime fp32's (same seed, same latents): the
    tolerance a reduced precision costs, measured in the same run (the compare tool's metrics)."""
    from export.compare.metrics import image_metrics

    reference = _image_path(report, "runtime")
    if "runtime" not in engines or not reference.is_file():
        return {}
    base = np.load(reference)
    others = [e for e in engines if e in RUNTIME_ENGINES and e != "runtime"]
    return {e: image_metrics(np.load(p), base) for e in others if (p := _image_path(report, e)).is_file()}


def worker_diffusers(args: argparse.Namespace, t0: float, dtype_name: str) -> dict[str, Any]:
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from export.models import load_model
    from runtime.bundle import Bundle

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    source = Bundle.open(args.bundle).manifest.source
    model = source["preset"] if source["kind"] == "preset" else source["path"]
    c = load_model(model, seed=source.get("seed", 0))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    pipe = StableDiffusionPipeline(
        vae=c.vae,
        text_encoder=c.text_encoder,
        tokenizer=c.tokenizer(),
        unet=c.unet,
        scheduler=DDIMScheduler.from_config(c.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    width, height = args.size

    @torch.inference_mode()
    def run() -> None:
        pipe(
            args.prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            height=height,
            width=width,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        )

    def first() -> float:
        run()
        return time.perf_counter() - t0

    return _timed_runs(first, args.repeats, run)


OPTIMUM_WORKER = """
import json, resource, statistics, sys, time
import numpy as np
t0 = time.perf_counter()
from optimum.onnxruntime import ORTStableDiffusionPipeline
from diffusers import DDIMScheduler
a = json.loads(sys.argv[1])
pipe = ORTStableDiffusionPipeline.from_pretrained(a["model"])
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
run = lambda: pipe(a["prompt"], num_inference_steps=a["steps"], guidance_scale=a["guidance"],
                   height=a["height"], width=a["width"], output_type="np")
run(); ttfi = time.perf_counter() - t0
lat = []
cpu0, wall0 = time.process_time(), time.perf_counter()
for _ in range(a["repeats"]):
    s = time.perf_counter(); run(); lat.append(time.perf_counter() - s)
print(json.dumps({"median_s": statistics.median(lat), "p95_s": float(np.percentile(lat, 95)),
                  "latencies_s": lat, "time_to_first_image_s": ttfi,
                  "cpu_per_wall": (time.process_time() - cpu0) / (time.perf_counter() - wall0),
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def _without_option(argv: list[str], option: str) -> list[str]:
    """argv minus `option VALUE` / `option=VALUE` (the workers get every other flag as given)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def _spawn(cmd: list[str]) -> dict[str, Any]:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fastest_runtime(results: dict[str, Any]) -> str | None:
    ran = [e for e in RUNTIME_ENGINES if "median_s" in results.get(e, {})]
    return min(ran, key=lambda e: results[e]["median_s"]) if ran else None


def _print_table(results: dict[str, Any], ours: str | None) -> None:
    base = results[ours]["median_s"] if ours else None
    columns = ("median s", "p95 s", "first img s", "peak GiB", "cpu/wall", f"vs {ours or '-'}")
    print(f"{'engine':22} " + " ".join(f"{c:>11}" for c in columns))
    for name, r in results.items():
        if "error" in r:
            print(f"{name:22} error: {r['error']}")
            continue
        ratio = f"{r['median_s'] / base:10.2f}x" if base else f"{'-':>11}"
        cpu = f"{r['cpu_per_wall']:11.2f}" if r.get("cpu_per_wall") is not None else f"{'-':>11}"
        print(
            f"{name:22} {r['median_s']:11.2f} {r['p95_s']:11.2f} {r['time_to_first_image_s']:11.2f} "
            f"{r['peak_rss_gib']:11.2f} {cpu} {ratio}"
        )
    for name, r in results.items():
        if "step_overhead_share" in r:
            share = r["step_overhead_share"]
            print(f"{name}: overhead outside the UNet call: median {share['median']:.3%}, "
                  f"max {share['max']:.3%} of a step")  # fmt: skip


def _targets(results: dict[str, Any], ours: str) -> dict[str, dict[str, Any]]:
    """The issue's targets for `ours`: value, limit, met. Ratios only against engines that ran."""
    r = results[ours]
    out: dict[str, dict[str, Any]] = {}

    def check(name: str, value: float, limit: float, at_most: bool = True) -> None:
        out[name] = {"value": value, "limit": limit, "met": value <= limit if at_most else value >= limit}

    if "median_s" in results.get("optimum", {}):
        check("median_vs_optimum", r["median_s"] / results["optimum"]["median_s"], TARGETS["vs_optimum"])
    if "median_s" in results.get("diffusers_fp32", {}):
        speedup = results["diffusers_fp32"]["median_s"] / r["median_s"]
        check("speedup_vs_diffusers_fp32", speedup, TARGETS["speedup_vs_diffusers_fp32"], at_most=False)
    check("time_to_first_image_s", r["time_to_first_image_s"], TARGETS["time_to_first_image_s"])
    check("peak_rss_gib", r["peak_rss_gib"], TARGETS["peak_rss_gib"])
    check("step_overhead_median", r["step_overhead_share"]["median"], TARGETS["step_overhead"])
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--prompt", default="cat maid")
    p.add_argument("--size", type=size_argument, default=(256, 256))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {', '.join(ENGINES)}")
    p.add_argument("--ours", default=None, help="the runtime engine ratios and targets refer to "
                   "(default: the fastest runtime engine of this run)")  # fmt: skip
    p.add_argument("--optimum-python", type=Path, help="python of a venv with optimum[onnxruntime]")
    p.add_argument("--optimum-model", type=Path, help="optimum-exported ONNX SD folder of the same weights")
    p.add_argument("--json", type=Path, default=Path("out/bench_e2e.json"))
    p.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        t0 = time.perf_counter()
        result = (
            worker_runtime(args, t0, *RUNTIME_ENGINES[args.worker])
            if args.worker in RUNTIME_ENGINES
            else worker_diffusers(args, t0, args.worker.split("_")[1])
        )
        print(json.dumps(result))
        return 0

    engines = args.engines.split(",")
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        p.error(f"--engines must be a comma list of {', '.join(ENGINES)}; unknown: {', '.join(unknown)}")
    if not (args.bundle / "manifest.json").is_file():
        p.error(f"--bundle {args.bundle} has no manifest.json (create it with python -m export)")
    if bool(args.optimum_python) != bool(args.optimum_model):
        p.error("--optimum-python and --optimum-model go together")
    if args.ours is not None and args.ours not in set(engines) & set(RUNTIME_ENGINES):
        run = ", ".join(e for e in engines if e in RUNTIME_ENGINES)
        p.error(f"--ours must be one of the runtime engines run: {run}")
    forwarded = _without_option(sys.argv[1:], "--engines")
    results: dict[str, Any] = {}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    for engine in engines:
        _image_path(args.json, engine).unlink(missing_ok=True)  # never compare a stale image
        print(f"running {engine} ...", file=sys.stderr, flush=True)
        results[engine] = _spawn([sys.executable, __file__, *forwarded, "--worker", engine])
    if args.optimum_python:
        payload = json.dumps(
            {
                "model": str(args.optimum_model),
                "prompt": args.prompt,
                "steps": args.steps,
                "guidance": args.guidance,
                "width": args.size[0],
                "height": args.size[1],
                "repeats": args.repeats,
            }
        )
        results["optimum"] = _spawn([str(args.optimum_python), "-c", OPTIMUM_WORKER, payload])

    ours = args.ours or _fastest_runtime(results)
    _print_table(results, ours)
    targets = _targets(results, ours) if ours else {}
    parity = _image_parity(args.json, engines)
    for name, q in parity.items():
        max_diff, psnr = q["max_pixel_diff"], q["psnr_db"]
        print(f"{name} image vs runtime (onnxruntime fp32): max {max_diff}/255, {psnr:.1f} dB")
    for name, t in targets.items():
        verdict = "met" if t["met"] else "MISSED"
        print(f"target {name}: {t['value']:.3f} (limit {t['limit']:g}) {verdict}")
    workload = {
        "prompt": args.prompt,
        "size": list(args.size),
        "steps": args.steps,
        "guidance": args.guidance,
        "scheduler": "ddim",
        "repeats": args.repeats,
        "bundle": str(args.bundle),
        "threads": args.threads,
    }
    tmp = args.json.with_suffix(".tmp")
    report = {
        "workload": workload,
        "ours": ours,
        "targets": targets,
        "image_parity": parity,
        "results": results,
    }
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, args.json)
    print(f"wrote {args.json}")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
