"""The runtime side of a comparison, run as `python -m export.compare.worker JOB_DIR`.

A child process, so its peak RSS is the runtime's alone (the parent holds PyTorch and its
weights) and so the numbers show what a torch-free deployment costs. It reads JOB_DIR/settings.json
and inputs.npz (the very arrays the PyTorch side used), and writes outputs.npz and result.json:
per-component outputs and timings, the end-to-end image, per-step latents and stage timings.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np

from export.compare.settings import COMPONENTS, Settings
from export.compare.timing import Stats, peak_rss_bytes, reset_peak_rss, rss_bytes, time_runs
from runtime.backends import BackendConfig, open_backend
from runtime.backends.config import THREADED
from runtime.bundle import Bundle
from runtime.options import GenerateOptions
from runtime.pipeline import Pipeline


def generate_options(s: Settings, e2e: dict[str, np.ndarray], cache_interval: int = 1) -> GenerateOptions:
    """The runtime request matching the PyTorch run (same latents or init image and mask, scheduler,
    guidance, mode). `e2e`: the parent's end-to-end inputs ("latents", or "init_image" and "mask")."""
    return GenerateOptions(
        prompts=(s.prompt,),
        negative_prompts=(s.negative,),
        steps=s.steps,
        guidance=s.guidance,
        seed=s.seed,
        height=s.height,
        width=s.width,
        scheduler=s.scheduler,
        mode=s.mode,
        latents=e2e.get("latents"),
        cache_interval=cache_interval,
        init_image=e2e.get("init_image"),
        mask=e2e.get("mask"),
        strength=s.strength,
    )


def time_e2e(
    pipeline: Pipeline, options: GenerateOptions, runs: int, stage_names: tuple[str, ...]
) -> dict[str, Any]:
    """`runs` end-to-end generations (already warmed up): total and per-stage statistics."""
    totals: list[float] = []
    stages: dict[str, list[float]] = {stage: [] for stage in stage_names}
    for _ in range(runs):
        start = time.perf_counter()
        timed = pipeline.generate(options)
        totals.append(time.perf_counter() - start)
        for stage in stage_names:
            stages[stage].append(timed.timings.get(stage, 0.0))
    return {
        "total": Stats(tuple(totals)).to_json(),
        "stages": {k: Stats(tuple(v)).to_json() for k, v in stages.items()},
    }


def run_variant(
    pipeline: Pipeline,
    s: Settings,
    e2e: dict[str, np.ndarray],
    interval: int,
    outputs: dict[str, np.ndarray],
) -> dict[str, Any]:
    """One step-caching variant: its image and final latent from a first run (which also loads
    its graphs), then its timings."""
    options = generate_options(s, e2e, interval)
    last: dict[str, np.ndarray] = {}

    def keep(i: int, t: float, x: np.ndarray) -> None:
        last["latent"] = x

    result = pipeline.generate(options, on_step=keep)
    outputs[f"cache{interval}/image"] = result.images[0]
    outputs[f"cache{interval}/final_latent"] = last["latent"]
    return time_e2e(pipeline, options, s.runs, s.stages)


def run(job: Path) -> dict[str, Any]:
    s = Settings.read(job / "settings.json")
    inputs = dict(np.load(job / "inputs.npz"))
    bundle = Bundle.open(s.bundle)
    threads = s.threads if s.backend in THREADED else None  # TensorRT refuses a thread count
    backend = open_backend(bundle, BackendConfig(s.backend, precision=s.precision, threads=threads))
    baseline = rss_bytes()  # interpreter, numpy, engine library; no model loaded yet
    peak_tracked = reset_peak_rss()
    outputs: dict[str, np.ndarray] = {}
    components: dict[str, Any] = {}
    for name in COMPONENTS:
        feeds = {k.split("/", 1)[1]: v for k, v in inputs.items() if k.startswith(f"{name}/")}
        if not feeds:
            continue
        start = time.perf_counter()
        out = backend.run(name, feeds)  # first call: session / engine load, doubles as the warm-up
        cold = time.perf_counter() - start
        outputs.update({f"{name}/{k}": v for k, v in out.items()})
        stats = time_runs(partial(backend.run, name, feeds), s.runs)
        components[name] = {"cold_s": cold, **stats.to_json()}

    pipeline = Pipeline(bundle, backend)
    e2e = {k.split("/", 1)[1]: v for k, v in inputs.items() if k.startswith("e2e/")}
    options = generate_options(s, e2e)
    steps: list[np.ndarray] = []
    timesteps: list[float] = []

    def capture(i: int, t: float, x: np.ndarray) -> None:
        steps.append(x.copy())
        timesteps.append(t)

    result = pipeline.generate(options, on_step=capture)  # the accuracy run, also the warm-up
    outputs["e2e/image"] = result.images[0]
    outputs["e2e/steps"] = np.stack(steps)
    outputs["e2e/timesteps"] = np.asarray(timesteps, dtype=np.float64)
    timed = time_e2e(pipeline, options, s.runs, s.stages)
    variants = {n: run_variant(pipeline, s, e2e, n, outputs) for n in s.cache_intervals}
    guided = None
    if s.clip_guidance > 0:  # one run: its image and stage times (pass 2 is "clip_guidance")
        guided_options = replace(
            options, clip_guidance=s.clip_guidance, clip_guidance_skip=s.clip_guidance_skip
        )
        start = time.perf_counter()
        guided_result = pipeline.generate(guided_options)
        guided = {"total_s": time.perf_counter() - start, "stages": guided_result.timings}
        outputs["guided/image"] = guided_result.images[0]
    np.savez(job / "outputs.npz", **cast(dict[str, Any], outputs))
    return {
        "components": components,
        "e2e": timed,
        "variants": {str(n): v for n, v in variants.items()},
        "clip_guidance": guided,
        "rss": {"baseline_bytes": baseline, "peak_bytes": peak_rss_bytes(), "peak_reset": peak_tracked},
        "torch_imported": "torch" in sys.modules,
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    job = Path(args[0])
    try:
        result = run(job)
    except Exception as exc:  # reported to the parent, which decides the exit code
        result = {
            "error": {"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}
        }
        (job / "result.json").write_text(json.dumps(result, indent=2))
        return 1
    (job / "result.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
