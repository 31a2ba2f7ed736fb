"""End-to-end latency: the runtime (ONNX Runtime fp32, OpenVINO fp32, bf16, int8 and int8-bf16, each
with dynamic or static shapes) vs diffusers (fp32, bf16) and the peers of scripts/bench_peers.py (Optimum
ORT, optimum-intel OpenVINO fp32/bf16/hybrid int8, openvino-genai), on the same weights and workload
(DDIM or DPM++ 2M; `--cache-interval N` adds step caching to the runtime engines, which only they have).

Each engine runs in its own process, one after another, so peak RSS and time to first image are
its own; a worker that outlives --timeout is killed and reported. With `--interleave` the workers
stay loaded together and take turns, one timed image each per round (scripts/bench_interleave.py):
for comparisons closer than the drift between sequential runs. Prints the CPU (model, flags), a
table, each approximation's images against its own exact path (ours vs ONNX Runtime fp32,
optimum-intel int8 vs optimum-intel fp32: same latents; the bench prompt and `--quality-prompts`
more, made after the timed runs), the issues' targets as met / missed, and writes JSON. The
runtime workers also measure their own overhead: the wall time of each denoising step outside the
UNet backend call, as a share of the step, and with static shapes the compile of each new shape.

    python scripts/bench_e2e.py --bundle bundles/sd15 --size 256x256 --steps 10 --repeats 3

`--lora-rank R` loads a LoRA (random factors, rank R, on the UNet's attention projections, written
at the bundle's shapes by scripts/bench_e2e_lora.py) in the runtime engines and in diffusers (fused); the
runtime workers also report the LoRA switch cost (first time, LRU hit, same set as before). The
few-step LoRA workload of issue #21:

    python scripts/bench_e2e.py --bundle bundles/sd15 --size 256x256 --scheduler lcm --steps 4 \
        --guidance 1.0 --lora-rank 16 --engines runtime,runtime_openvino,diffusers_fp32

`--img2img S` makes the workload image-to-image at strength S (export/init_images.py's init image,
diffusers' StableDiffusionImg2ImgPipeline as the baseline; the peers are text-to-image only here and
are skipped): it reports the UNet calls per image and the VAE encoder's share of a generation.

The peers pin versions that cannot share .venv, so each runs from its own virtualenv, made with
the exported folder of the same weights by a setup script:
- `bash scripts/setup_optimum.sh BUNDLE`: --optimum-python .venv-optimum/bin/python
  --optimum-model BUNDLE-optimum
- `bash scripts/setup_openvino_peers.sh BUNDLE`: --ov-python .venv-ovpeers/bin/python
  --ov-model BUNDLE-openvino
A peer whose flags are not given is skipped with the reason, as are the int8 engines on a bundle
without its int8 UNet (`python -m export ... --int8`), and bf16 engines on a CPU without
bf16 instructions (diffusers bf16 is then emulated and takes tens of minutes; --force-bf16 runs
them anyway).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from bench_e2e_lora import fuse_into_diffusers, lora_files, lora_paths, switch_costs, timed
from bench_interleave import run_interleaved
from bench_peers import PEERS, timed_runs

from export.compare.cpu import cpu_model, cpu_summary
from export.init_images import init_image
from runtime.backends.config import BF16_PRECISIONS, INT8_PRECISIONS
from runtime.cli import size_argument
from runtime.cpu import BF16_FLAGS, FAST_PATH_FLAGS, cpu_flags

# runtime engines: (backend, precision, static shapes) of the runtime's BackendConfig
RUNTIME_ENGINES = {
    "runtime": ("onnxruntime", "fp32", False),
    "runtime_static": ("onnxruntime", "fp32", True),
    "runtime_openvino": ("openvino", "fp32", False),
    "runtime_openvino_static": ("openvino", "fp32", True),
    "runtime_openvino_bf16": ("openvino", "bf16", False),
    "runtime_openvino_bf16_static": ("openvino", "bf16", True),
    "runtime_openvino_int8": ("openvino", "int8", False),
    "runtime_openvino_int8_static": ("openvino", "int8", True),
    "runtime_openvino_int8_bf16": ("openvino", "int8-bf16", False),
    "runtime_openvino_int8_bf16_static": ("openvino", "int8-bf16", True),
}
FP32_RUNTIMES = tuple(e for e, (_, precision, _) in RUNTIME_ENGINES.items() if precision == "fp32")
INT8_RUNTIMES = tuple(e for e, (_, precision, _) in RUNTIME_ENGINES.items() if precision in INT8_PRECISIONS)
# Issue #16's targets are for a CPU without bf16: judged on the engines that compute no bf16.
NO_BF16_RUNTIMES = tuple(e for e, (_, p, _) in RUNTIME_ENGINES.items() if p not in BF16_PRECISIONS)
NO_BF16_INT8_RUNTIMES = tuple(e for e in INT8_RUNTIMES if e in NO_BF16_RUNTIMES)
ENGINES = (*RUNTIME_ENGINES, "diffusers_fp32", "diffusers_bf16", *PEERS)
OV_PEERS = tuple(p for p in PEERS if p != "optimum")  # run from --ov-python on --ov-model
INT8_PEERS = tuple(p for p in PEERS if "int8" in p)  # on --ov-int8-model
FP32_PEERS = tuple(p for p in PEERS if "int8" not in p and "bf16" not in p)
SCHEDULERS = ("ddim", "dpmpp_2m", "lcm")
DEFAULT_PROMPT = "cat maid"
# Image quality of an approximation is judged over the bench prompt and these (after the timed runs;
# --quality-prompts N takes the first N): one image can flatter or wrong a quantizer by a dB or more.
QUALITY_PROMPTS = (
    "a red vintage car parked on a rainy street at night",
    "portrait of an old fisherman, detailed, dramatic lighting",
    "a watercolor drawing of a fox in a snowy forest",
    "a bowl of fruit on a wooden table, still life painting",
    "a futuristic city skyline with flying cars",
)
# The targets, for the engine named by --ours (same run, same machine).
# speedup_vs_diffusers_fp32: the "i.e. >= 1.7x", derived from its own machine's figures.
TARGETS = {
    "vs_optimum": 0.77,
    "speedup_vs_diffusers_fp32": 1.7,
    "time_to_first_image_s": 30.0,
    "peak_rss_gib": 4.5,
    "step_overhead": 0.01,
}
# Issue #16, on a CPU without bf16 (same run): the fastest exact runtime engine no slower than the
# fastest fp32 peer; int8 at most 0.75x of it, and faster than optimum-intel's int8 at equal or
# better PSNR; with step caching (512x512, 25 DPM++ 2M steps, --cache-interval 3) at most 0.4x of
# Optimum ORT fp32.
TARGETS_16 = {
    "fp32_vs_fp32_peer": 1.0,
    "int8_vs_fp32_peer": 0.75,
    "int8_vs_peer_int8": 1.0,
    "cached_vs_optimum": 0.4,
}


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """The CPU model and which of the flags that decide the fast paths it has (Linux)."""
    flags = cpu_flags(cpuinfo)
    have = {f: f in flags for f in FAST_PATH_FLAGS}
    return {"model": cpu_model(cpuinfo), "cores": os.cpu_count(), "flags": have}


def _has_int8(bundle: Path) -> bool:
    from runtime.manifest import Manifest

    return "int8" in Manifest.loads((bundle / "manifest.json").read_bytes()).models["unet"].files


def _skip_reason(engine: str, args: argparse.Namespace, cpu: dict[str, Any]) -> str | None:
    """Why an engine is not run here (None: it runs)."""
    if args.img2img is not None and engine in PEERS:
        return "the peers run text-to-image only in this bench (--img2img)"
    if args.lora_rank and engine in PEERS:
        return "the peers run without LoRA in this bench (--lora-rank)"
    if args.scheduler == "lcm" and engine in PEERS:
        return "this bench runs the peers with DDIM or DPM++ 2M only"
    if engine in INT8_RUNTIMES and not _has_int8(args.bundle):
        return "the bundle has no int8 UNet (python -m export --model MODEL --out BUNDLE --int8)"
    if engine.startswith("openvino_genai") and args.scheduler != "ddim":
        return "this bench runs openvino-genai with DDIM only"
    if "bf16" in engine and not args.force_bf16 and not any(cpu["flags"][f] for f in BF16_FLAGS):
        return (
            "this CPU has no bf16 instructions (avx512_bf16 / amx_bf16): bf16 would be emulated, "
            "slower than fp32 (--force-bf16 runs it)"
        )
    if engine == "optimum" and not args.optimum_python:
        return "needs --optimum-python and --optimum-model (bash scripts/setup_optimum.sh BUNDLE)"
    if engine in OV_PEERS and not args.ov_python:
        return "needs --ov-python and --ov-model (bash scripts/setup_openvino_peers.sh BUNDLE)"
    if engine in INT8_PEERS and not args.ov_int8_model:
        return "needs --ov-int8-model (SDRT_OV_INT8=1 bash scripts/setup_openvino_peers.sh BUNDLE)"
    return None


def worker_runtime(
    args: argparse.Namespace, t0: float, backend_name: str, precision: str, static: bool
) -> dict[str, Any]:
    from runtime.backends import BackendConfig, open_backend
    from runtime.bundle import Bundle
    from runtime.lora import LoraRef
    from runtime.options import GenerateOptions
    from runtime.pipeline import Pipeline
    from runtime.specs import DEEPCACHE_FULL, DEEPCACHE_SHALLOW

    class TimedBackend:
        """Counts the time spent inside backend calls, per model."""

        def __init__(self, inner: Any):
            self.inner, self.device, self.precision = inner, inner.device, inner.precision
            self.seconds: dict[str, float] = {}
            self.calls: dict[str, list[float]] = {}  # per model: each call's seconds

        def run(self, model: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            start = time.perf_counter()
            out = self.inner.run(model, feeds)
            seconds = time.perf_counter() - start
            self.seconds[model] = self.seconds.get(model, 0.0) + seconds
            self.calls.setdefault(model, []).append(seconds)
            return out

        def prepare(self, models: Any) -> None:
            self.inner.prepare(models)

        def set_weights(self, model: str, weights: Any) -> None:
            start = time.perf_counter()
            self.inner.set_weights(model, weights)
            self.seconds["set_weights"] = self.seconds.get("set_weights", 0.0) + time.perf_counter() - start

        def close(self) -> None:
            self.inner.close()

    bundle = Bundle.open(args.bundle)
    config = BackendConfig(backend_name, precision=precision, threads=args.threads, static_shapes=static)
    backend = TimedBackend(open_backend(bundle, config))
    pipe = Pipeline(bundle, backend)
    width, height = args.size
    options = GenerateOptions(
        prompts=(args.prompt,),
        steps=args.steps,
        guidance=args.guidance,
        seed=0,
        height=height,
        width=width,
        scheduler=args.scheduler,
        cache_interval=args.cache_interval,
        init_image=None if args.img2img is None else init_image(width, height),
        strength=args.img2img,
    )
    lora_a, lora_b = (
        tuple((LoraRef(path, args.lora_scale),) for path in lora_paths(args.json.parent, args.lora_rank))
        if args.lora_rank
        else ((), ())
    )
    options = replace(options, loras=lora_a)
    overheads: list[float] = []
    images: list[np.ndarray] = []

    def unet_seconds() -> float:
        """Time inside the denoiser's calls so far: the UNet, or the step-caching pair."""
        return sum(backend.seconds.get(m, 0.0) for m in ("unet", DEEPCACHE_FULL, DEEPCACHE_SHALLOW))

    def run() -> None:
        marks = [time.perf_counter()]
        unet_at_marks = [unet_seconds()]

        def on_step(i: int, t: float, x: np.ndarray) -> None:
            marks.append(time.perf_counter())
            unet_at_marks.append(unet_seconds())

        images.append(pipe.generate(options, on_step=on_step).images[0])
        # step k spans marks[k]..marks[k+1]; the first starts after the text stage, so skip it
        for k in range(1, len(marks) - 1):
            wall = marks[k + 1] - marks[k]
            overheads.append((wall - (unet_at_marks[k + 1] - unet_at_marks[k])) / wall)

    def first() -> float:
        run()
        backend.calls.clear()  # per-call times from the timed runs only (no load, no compile)
        return time.perf_counter() - t0

    result = timed_runs(first, args.repeats, run, args.interleave)
    result["step_overhead_share"] = {"median": statistics.median(overheads), "max": max(overheads)}
    result["call_median_s"] = {model: statistics.median(c) for model, c in backend.calls.items()}
    result["unet_calls_per_image"] = pipe.denoising_steps(options)
    if args.lora_rank:  # after the timed runs (LoRA A loaded): alternate with B
        result["lora_switch"] = switch_costs(
            lambda loras: timed(lambda: pipe.generate(replace(options, loras=loras))),
            lora_a,
            lora_b,
            lambda: backend.seconds.get("set_weights", 0.0),
        )
    if args.img2img is not None:  # the encoder's median call against the median generation
        result["encoder_share"] = result["call_median_s"]["vae_encoder"] / result["median_s"]
    shape_cache = getattr(backend.inner, "static", None)
    if shape_cache is not None:  # each new shape's compile, paid once by the first image
        result["static_compiles"] = [
            {"model": c.model, "shapes": c.shapes, "seconds": c.seconds, "failed": c.failed}
            for c in shape_cache.compiles
        ]
    extra = [
        pipe.generate(replace(options, prompts=(prompt,))).images[0]
        for prompt in QUALITY_PROMPTS[: args.quality_prompts]
    ]
    np.save(_image_path(args.json, args.worker), np.stack([images[-1], *extra]))  # same seeds everywhere
    return result


def _image_path(report: Path, engine: str) -> Path:
    return report.with_name(f"{report.stem}.{engine}.npy")


def _exact_twin(engine: str) -> str | None:
    """Whose image an engine's is compared with: ONNX Runtime fp32 for the runtime's engines (same
    latents), a peer's own fp32 run for its bf16/int8 ones (same generator seed)."""
    if engine in RUNTIME_ENGINES:
        return "runtime" if engine != "runtime" else None
    if engine.startswith("optimum_intel_") and engine not in FP32_PEERS:
        return "optimum_intel_static" if engine.endswith("_static") else "optimum_intel"
    return None


def _image_parity(report: Path, engines: list[str]) -> dict[str, dict[str, Any]]:
    """Each approximate engine's image vs its exact twin's: the tolerance a reduced precision or
    step caching costs, measured in the same run (the compare tool's metrics)."""
    from export.compare.metrics import image_metrics

    out: dict[str, dict[str, Any]] = {}
    for engine in engines:
        twin = _exact_twin(engine)
        mine = _image_path(report, engine)
        if twin is None or not mine.is_file() or not _image_path(report, twin).is_file():
            continue
        ours, theirs = np.load(mine), np.load(_image_path(report, twin))
        each = [image_metrics(a, b) for a, b in zip(ours, theirs, strict=True)]
        mean_db = sum(min(m["psnr_db"], 100.0) for m in each) / len(each)  # identical images: 100 dB
        out[engine] = {"vs": twin, **each[0], "images": len(each), "psnr_db_mean": mean_db}
    return out


def worker_diffusers(args: argparse.Namespace, t0: float, dtype_name: str) -> dict[str, Any]:
    import torch
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        LCMScheduler,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionPipeline,
    )
    from PIL import Image

    from export.models import load_bundle_model

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    c = load_bundle_model(args.bundle)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    pipeline_class = StableDiffusionPipeline if args.img2img is None else StableDiffusionImg2ImgPipeline
    pipe = pipeline_class(
        vae=c.vae,
        text_encoder=c.text_encoder,
        tokenizer=c.tokenizer(),
        unet=c.unet,
        scheduler=DPMSolverMultistepScheduler.from_config(
            c.scheduler_config, algorithm_type="dpmsolver++", solver_order=2
        )
        if args.scheduler == "dpmpp_2m"
        else LCMScheduler.from_config(c.scheduler_config)
        if args.scheduler == "lcm"
        else DDIMScheduler.from_config(c.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    fused_by = None
    if args.lora_rank:
        fused_by = fuse_into_diffusers(pipe, lora_paths(args.json.parent, args.lora_rank)[0], args.lora_scale)
    width, height = args.size

    workload: dict[str, Any] = {"height": height, "width": width}
    if args.img2img is not None:
        workload = {"image": Image.fromarray(init_image(width, height)), "strength": args.img2img}

    @torch.inference_mode()
    def run() -> None:
        pipe(
            args.prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            **workload,
        )

    def first() -> float:
        run()
        return time.perf_counter() - t0

    result = timed_runs(first, args.repeats, run, args.interleave)
    if fused_by is not None:
        result["lora_fused_by"] = fused_by
    return result


def _peer_command(engine: str, args: argparse.Namespace) -> list[str]:
    python, model = (
        (args.optimum_python, args.optimum_model) if engine == "optimum" else (args.ov_python, args.ov_model)
    )
    if engine in INT8_PEERS:
        model = args.ov_int8_model
    payload = {
        "model": str(model),
        "prompt": args.prompt,
        "steps": args.steps,
        "guidance": args.guidance,
        "width": args.size[0],
        "height": args.size[1],
        "repeats": args.repeats,
        "threads": args.threads,
        "scheduler": args.scheduler,
        "image": str(_image_path(args.json, engine)),
        "quality_prompts": list(QUALITY_PROMPTS[: args.quality_prompts]),
        "interleave": args.interleave,
    }
    return [str(python), str(Path(__file__).with_name("bench_peers.py")), engine, json.dumps(payload)]


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


def _spawn(cmd: list[str], timeout: float) -> dict[str, Any]:
    """One worker's JSON line; {"error": ...} with its last stderr line, or the timeout it hit."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within --timeout {timeout:g} s: killed"}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _write_report(path: Path, report: dict[str, Any]) -> None:
    """Atomically; also after each engine ("partial": true), so a stopped run keeps what it measured."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, path)


def _print_table(results: dict[str, Any], ours: str | None) -> None:
    base = results[ours]["median_s"] if ours else None
    columns = ("median s", "p95 s", "first img s", "peak GiB", "cpu/wall", f"vs {ours or '-'}")
    print(f"{'engine':22} " + " ".join(f"{c:>11}" for c in columns))
    for name, r in results.items():
        if "error" in r or "skipped" in r:
            print(f"{name:22} " + (f"error: {r['error']}" if "error" in r else f"skipped: {r['skipped']}"))
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
        if "call_median_s" in r:
            calls = ", ".join(f"{m} {t:.3f} s" for m, t in r["call_median_s"].items())
            print(f"{name}: median per call: {calls}; {r['unet_calls_per_image']} UNet calls per image")
        if "encoder_share" in r:
            print(f"{name}: VAE encoder {r['encoder_share']:.2%} of a generation")
        for c in r.get("static_compiles", []):
            state = "FAILED, ran dynamic" if c["failed"] else "compiled"
            print(f"{name}: static {c['model']} {state} for its shape in {c['seconds']:.2f} s (first image)")


def _fastest(results: dict[str, Any], engines: tuple[str, ...]) -> str | None:
    ran = [e for e in engines if "median_s" in results.get(e, {})]
    return min(ran, key=lambda e: results[e]["median_s"]) if ran else None


def _targets_16(
    results: dict[str, Any], parity: dict[str, dict[str, Any]], cache_interval: int
) -> dict[str, dict[str, Any]]:
    """Issue #16's targets, from the engines that ran: value, limit, met, and what was compared."""
    out: dict[str, dict[str, Any]] = {}

    def ratio(name: str, ours: str | None, theirs: str | None, **psnr: float) -> None:
        """ours / theirs <= the limit; with PSNRs, ours must also be at least the peer's."""
        if ours and theirs:
            value = results[ours]["median_s"] / results[theirs]["median_s"]
            limit = TARGETS_16[name]
            met = value <= limit and (not psnr or psnr["psnr_db"] >= psnr["peer_psnr_db"])
            out[name] = {"value": value, "limit": limit, "met": met, "ours": ours, "theirs": theirs, **psnr}

    peer = _fastest(results, FP32_PEERS)
    if cache_interval > 1:
        ratio(
            "cached_vs_optimum",
            _fastest(results, NO_BF16_RUNTIMES),
            "optimum" if "median_s" in results.get("optimum", {}) else None,
        )
        return out
    ratio("fp32_vs_fp32_peer", _fastest(results, FP32_RUNTIMES), peer)
    int8 = _fastest(results, NO_BF16_INT8_RUNTIMES)
    ratio("int8_vs_fp32_peer", int8, peer)
    peer_int8 = _fastest(results, INT8_PEERS)
    if int8 and peer_int8 and int8 in parity and peer_int8 in parity:
        # mean PSNR over the bench prompt and the quality prompts
        psnr = {"psnr_db": parity[int8]["psnr_db_mean"], "peer_psnr_db": parity[peer_int8]["psnr_db_mean"]}
        ratio("int8_vs_peer_int8", int8, peer_int8, **psnr)
    return out


def _targets(results: dict[str, Any], ours: str) -> dict[str, dict[str, Any]]:
    """The earlier issue's targets for `ours`: value, limit, met. Ratios only against engines that ran."""
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
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--size", type=size_argument, default=(256, 256))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--scheduler", choices=SCHEDULERS, default="ddim")
    p.add_argument(
        "--quality-prompts",
        type=int,
        default=3,
        choices=range(len(QUALITY_PROMPTS) + 1),
        metavar=f"0..{len(QUALITY_PROMPTS)}",
        help="images of further prompts (after the timed runs) over which image parity is averaged",
    )
    p.add_argument(
        "--cache-interval", type=int, default=1, help="step caching for the runtime engines (1 = off)"
    )
    p.add_argument(
        "--img2img", type=float, default=None, metavar="STRENGTH",
        help="image-to-image at this strength (0 < S <= 1) instead of text-to-image",
    )  # fmt: skip
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument(
        "--lora-rank", type=int, default=0,
        help="load a random LoRA of this rank on the UNet's attention projections (0: none)",
    )  # fmt: skip
    p.add_argument("--lora-scale", type=float, default=1.0, help="its strength (with --lora-rank)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {', '.join(ENGINES)}")
    p.add_argument("--ours", default=None, help="the runtime engine ratios and targets refer to "
                   "(default: the fastest runtime engine of this run)")  # fmt: skip
    p.add_argument("--optimum-python", type=Path, help="python of a venv with optimum[onnxruntime]")
    p.add_argument("--optimum-model", type=Path, help="optimum-exported ONNX SD folder of the same weights")
    p.add_argument("--ov-python", type=Path, help="python of a venv with optimum-intel and openvino-genai")
    p.add_argument("--ov-model", type=Path, help="optimum-intel-exported OpenVINO folder of the same weights")
    p.add_argument("--ov-int8-model", type=Path, help="the same folder, hybrid int8 (ov_hybrid_int8.py)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per engine before it is killed")
    p.add_argument(
        "--interleave",
        action="store_true",
        help="keep every engine loaded and time them in turns (scripts/bench_interleave.py): drift of a "
        "shared machine falls on all alike; memory is the sum of the engines'",
    )
    p.add_argument("--force-bf16", action="store_true", help="run bf16 engines on a CPU without bf16")
    p.add_argument("--json", type=Path, default=Path("out/bench_e2e.json"))
    p.add_argument("--worker", choices=[e for e in ENGINES if e not in PEERS], help=argparse.SUPPRESS)
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
    if bool(args.ov_python) != bool(args.ov_model):
        p.error("--ov-python and --ov-model go together")
    if args.cache_interval < 1:
        p.error(f"--cache-interval must be >= 1; got {args.cache_interval}")
    if args.img2img is not None and not 0 < args.img2img <= 1:
        p.error(f"--img2img must be a strength with 0 < S <= 1; got {args.img2img:g}")
    if args.interleave and args.repeats < 1:
        p.error(f"--interleave needs --repeats >= 1; got {args.repeats}")
    if args.timeout <= 0:
        p.error(f"--timeout must be > 0 seconds; got {args.timeout:g}")
    if args.lora_rank < 0:
        p.error(f"--lora-rank must be >= 1 (0: no LoRA); got {args.lora_rank}")
    if args.ours is not None and args.ours not in set(engines) & set(RUNTIME_ENGINES):
        run = ", ".join(e for e in engines if e in RUNTIME_ENGINES)
        p.error(f"--ours must be one of the runtime engines run: {run}")
    forwarded = _without_option(sys.argv[1:], "--engines")
    cpu = cpu_info()
    print(cpu_summary())
    workload = {
        "prompt": args.prompt,
        "size": list(args.size),
        "steps": args.steps,
        "guidance": args.guidance,
        "scheduler": args.scheduler,
        "cache_interval": args.cache_interval,
        "img2img_strength": args.img2img,
        "lora_rank": args.lora_rank,
        "lora_scale": args.lora_scale if args.lora_rank else None,
        "repeats": args.repeats,
        "bundle": str(args.bundle),
        "threads": args.threads,
        "interleaved": args.interleave,
    }
    results: dict[str, Any] = {}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    if args.lora_rank:  # written once, read by every worker
        written = lora_files(args.bundle, args.json.parent, args.lora_rank)
        workload["lora_files"] = [str(path) for path in written]
    in_turns: dict[str, list[str]] = {}
    for engine in engines:
        _image_path(args.json, engine).unlink(missing_ok=True)  # never compare a stale image
        reason = _skip_reason(engine, args, cpu)
        if reason:
            print(f"skipping {engine}: {reason}", file=sys.stderr, flush=True)
            results[engine] = {"skipped": reason}
            continue
        if engine in PEERS:
            cmd = _peer_command(engine, args)
        else:
            cmd = [sys.executable, __file__, *forwarded, "--worker", engine]
        if args.interleave:
            in_turns[engine] = cmd
            continue
        print(f"running {engine} ...", file=sys.stderr, flush=True)
        results[engine] = _spawn(cmd, args.timeout)
        _write_report(args.json, {"cpu": cpu, "workload": workload, "partial": True, "results": results})
    if in_turns:
        results.update(run_interleaved(in_turns, args.repeats, args.timeout))
        results = {engine: results[engine] for engine in engines}

    ours = args.ours or _fastest(results, tuple(RUNTIME_ENGINES))
    _print_table(results, ours)
    for engine, r in results.items():
        for kind, cost in r.get("lora_switch", {}).items():
            print(f"{engine} LoRA switch, {kind}: +{cost['extra_s']:.3f} s per image over the same set "
                  f"(set_weights {cost['set_weights_s']:.3f} s)")  # fmt: skip
    targets = _targets(results, ours) if ours else {}
    parity = _image_parity(args.json, engines)
    for name, q in parity.items():
        max_diff, psnr, twin = q["max_pixel_diff"], q["psnr_db"], q["vs"]
        mean = f"; mean over {q['images']} prompts {q['psnr_db_mean']:.1f} dB" if q["images"] > 1 else ""
        print(f"{name} image vs {twin}: max {max_diff}/255, {psnr:.1f} dB{mean}")
    targets_16 = _targets_16(results, parity, args.cache_interval)
    for name, t in targets_16.items():
        verdict = "met" if t["met"] else "MISSED"
        psnr = f", PSNR {t['psnr_db']:.1f} vs {t['peer_psnr_db']:.1f} dB" if "psnr_db" in t else ""
        pair = f"{t['ours']} / {t['theirs']} = {t['value']:.3f}"
        print(f"target #16 {name}: {pair} (limit {t['limit']:g}{psnr}) {verdict}")
    for name, t in targets.items():
        verdict = "met" if t["met"] else "MISSED"
        print(f"target {name}: {t['value']:.3f} (limit {t['limit']:g}) {verdict}")
    report = {
        "cpu": cpu,
        "workload": workload,
        "ours": ours,
        "targets": targets,
        "targets_16": targets_16,
        "image_parity": parity,
        "results": results,
    }
    _write_report(args.json, report)
    print(f"wrote {args.json}")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
