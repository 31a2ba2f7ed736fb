"""One comparison, start to finish: PyTorch in this process, the runtime in a torch-free child,
then metrics, checks and figures. Returns the report dict that report.py renders.

Order matters for attributable numbers: the PyTorch side computes every input (token ids, the
CLIP states the UNet reads, the latents the VAE decodes, the init image and mask) once, and the
child gets the very same arrays; PyTorch timings run while the child does not exist, and the
child's timings while this process only waits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import Image

from export.compare import figures, torch_ref
from export.compare.cpu import cpu_model
from export.compare.metrics import image_metrics, latent_drift, tensor_metrics, to_uint8
from export.compare.settings import COMPONENTS, PRESETS, Settings, UsageError
from export.compare.thresholds import Check, Thresholds, evaluate
from export.compare.timing import Stats, peak_rss_bytes, reset_peak_rss, rss_bytes, time_runs
from export.reference_guidance import Sampling, clip_guided
from runtime.bundle import Bundle
from runtime.init_image import to_unit
from runtime.specs import INPAINT_CHANNELS
from runtime.tokenizer import ClipTokenizer

REPO = Path(__file__).resolve().parents[2]
IMPLEMENTATIONS = ("pytorch_fp32", "pytorch_bf16", "runtime")
MEMORY_METHOD = (
    "PyTorch: this process, which never loads an ONNX session; peak RSS (Linux VmHWM) from loading the "
    "fp32 weights to the end of the fp32 timings, then reset (/proc/self/clear_refs) before the bf16 runs, "
    "so the bf16 peak still counts the resident fp32 weights. Runtime: a separate child process that does "
    "not import torch, peak over its whole run. Baseline: RSS with the libraries imported and no weights "
    "loaded, so peak - baseline is what the weights and activations cost."
)


@dataclass
class Reference:
    """What the PyTorch fp32 side produced: the shared inputs and its outputs."""

    feeds: dict[str, dict[str, np.ndarray]]  # component -> named inputs (both sides get these)
    outputs: dict[str, dict[str, np.ndarray]]  # component -> named PyTorch fp32 outputs
    latents: np.ndarray | None  # initial latents of a text-to-image run (img2img: drawn by each side)
    run: torch_ref.TorchRun  # the fp32 end-to-end run
    e2e: dict[str, np.ndarray]  # the end-to-end inputs the runtime gets: latents, or init image (+ mask)
    skipped: dict[str, str]  # component -> why it is not compared


def log(message: str) -> None:
    print(f"[compare] {message}", file=sys.stderr, flush=True)


def reference_outputs(s: Settings, bundle: Bundle, ref: torch_ref.TorchReference) -> Reference:
    """Inputs a real generation would see, and PyTorch fp32's outputs for them."""
    t = bundle.manifest.tokenizer
    tokenizer = ClipTokenizer(bundle.tokenizer_dir, t.bos_id, t.eos_id, t.pad_id)
    feeds: dict[str, dict[str, np.ndarray]] = {"clip": {"input_ids": tokenizer([s.negative, s.prompt]).ids}}
    outputs = {"clip": ref.run_component("clip", feeds["clip"])}
    if ref.deprojector is not None:
        feeds["deprojector"] = {"pooled": outputs["clip"]["pooled"][1:]}  # the prompt's row
    skipped = {}
    if "vae_encoder" in bundle.models:  # the init image, or a random one for text to image
        image = ref.init_image
        feeds["vae_encoder"] = {
            "image": to_unit(image)
            if image is not None
            else np.random.default_rng(s.seed).random((1, 3, s.height, s.width), dtype=np.float32)
        }
    else:
        skipped["vae_encoder"] = (
            "the bundle has no VAE encoder (exported before img2img support; re-export it with "
            "`python -m export --model MODEL --out BUNDLE` to compare it)"
        )
        log(f"no vae_encoder row: {skipped['vae_encoder']}")
    e2e: dict[str, np.ndarray] = {}
    latents = None
    if s.strength is None:
        f = bundle.vae_scale_factor
        shape = (1, bundle.latent_channels, s.height // f, s.width // f)
        latents = np.random.default_rng(s.seed).standard_normal(shape, dtype=np.float32)
        e2e["latents"] = latents
    else:
        assert ref.init_image is not None
        e2e["init_image"] = ref.init_image
        if ref.init_mask is not None:
            e2e["mask"] = ref.init_mask
    log(f"PyTorch fp32: end to end, {s.workload} (accuracy run)")
    run = ref.generate(latents, record_unet_call=True)
    feeds["unet"] = run.unet_call  # the loop's first UNet call, as diffusers made it
    feeds["vae_decoder"] = {"latent": run.steps[-1].astype(np.float32)}  # what the loop produced
    for name in feeds:
        if name != "clip":
            outputs[name] = ref.run_component(name, feeds[name])
    ordered = {name: feeds[name] for name in COMPONENTS if name in feeds}
    return Reference(ordered, outputs, latents, run, e2e, skipped)


def time_e2e(
    generate: Callable[[], dict[str, float]], runs: int, stage_names: tuple[str, ...]
) -> dict[str, Any]:
    """`runs` end-to-end generations (already warmed up): total and per-stage statistics."""
    totals: list[float] = []
    stages: dict[str, list[float]] = {stage: [] for stage in stage_names}
    for _ in range(runs):
        start = time.perf_counter()
        timings = generate()
        totals.append(time.perf_counter() - start)
        for stage in stage_names:
            stages[stage].append(timings[stage])
    return {
        "total": Stats(tuple(totals)).to_json(),
        "stages": {k: Stats(tuple(v)).to_json() for k, v in stages.items()},
    }


def time_pytorch(ref: torch_ref.TorchReference, r: Reference, runs: int, bf16: bool) -> dict[str, Any]:
    """Per-component and end-to-end timings plus peak RSS for one PyTorch precision (warmed up)."""
    components = {name: _time_component(ref, name, feeds, runs, bf16) for name, feeds in r.feeds.items()}
    e2e = time_e2e(lambda: ref.generate(r.latents, bf16).timings, runs, ref.settings.stages)
    return {"components": components, "e2e": e2e, "peak_bytes": peak_rss_bytes()}


def _time_component(
    ref: torch_ref.TorchReference, name: str, feeds: dict[str, np.ndarray], runs: int, bf16: bool
) -> dict[str, Any]:
    return time_runs(lambda: ref.run_component(name, feeds, bf16), runs).to_json()


def run_runtime(s: Settings, inputs: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The runtime side in a torch-free child process (export/compare/worker.py)."""
    with tempfile.TemporaryDirectory(prefix="sdrt-compare-") as tmp:
        job = Path(tmp)
        s.write(job / "settings.json")
        np.savez(job / "inputs.npz", **cast(dict[str, Any], inputs))
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path}
        subprocess.run([sys.executable, "-m", "export.compare.worker", str(job)], env=env, check=False)
        if not (job / "result.json").is_file():
            raise RuntimeError("the runtime worker died without a result (killed for memory?)")
        result = json.loads((job / "result.json").read_text())
        if "error" in result:
            error = result["error"]
            if error["type"] in ("BackendError", "BundleError", "ValueError"):
                raise UsageError(f"runtime ({s.backend} {s.precision}): {error['message']}")
            raise RuntimeError(f"runtime worker failed:\n{error['traceback']}")
        with np.load(job / "outputs.npz") as data:
            outputs = {k: data[k] for k in data.files}
    return result, outputs


def _speedup(reference: dict[str, Any] | None, ours: dict[str, Any]) -> float | None:
    return None if reference is None else reference["median_s"] / ours["median_s"]


def _metrics(expected: dict[str, dict[str, np.ndarray]], got: dict[str, np.ndarray]) -> dict[str, Any]:
    """{component: {output: tensor_metrics}}; `got` is keyed "component/output"."""
    return {
        name: {
            o: tensor_metrics(got[f"{name}/{o}"], v, per_position=name == "deprojector")
            for o, v in outs.items()
        }
        for name, outs in expected.items()
    }


def compare(s: Settings, bundle: Bundle, thresholds: Thresholds) -> dict[str, Any]:
    """Run both sides on the same inputs, measure, draw; returns the report dict."""
    torch_ref.set_threads(s.threads)
    baseline = rss_bytes()  # python + torch + diffusers imported, no weights yet
    reset_peak_rss()
    log(f"loading PyTorch model {s.model}")
    ref = torch_ref.TorchReference(s, bundle.manifest)
    if ref.components.hidden_size != bundle.hidden_size:
        raise UsageError(
            f"--model {s.model} has hidden size {ref.components.hidden_size} but the bundle's is "
            f"{bundle.hidden_size}: it is not the model the bundle was exported from"
        )
    r = reference_outputs(s, bundle, ref)

    log(f"PyTorch fp32: timing, {s.runs} runs")
    timed = {"pytorch_fp32": time_pytorch(ref, r, s.runs, bf16=False)}
    bf16_support = torch_ref.bf16_support()
    bf16_context = None
    bf16_run: torch_ref.TorchRun | None = None
    if s.bf16 and bf16_support["available"]:
        log(f"PyTorch bf16: warm-up and timing, {s.runs} runs")
        reset_peak_rss()
        bf16_outputs = {n: ref.run_component(n, f, bf16=True) for n, f in r.feeds.items()}  # warm-up
        bf16_run = ref.generate(r.latents, bf16=True)
        timed["pytorch_bf16"] = time_pytorch(ref, r, s.runs, bf16=True)
        flat = {f"{n}/{o}": v for n, outs in bf16_outputs.items() for o, v in outs.items()}
        bf16_context = {
            "components": _metrics(r.outputs, flat),
            "image": image_metrics(to_uint8(bf16_run.image), to_uint8(r.run.image)),
        }

    log(f"runtime ({s.backend} {s.precision}) in a child process")
    inputs = {f"{n}/{k}": v for n, feeds in r.feeds.items() for k, v in feeds.items()}
    worker, got = run_runtime(s, {**inputs, **{f"e2e/{k}": v for k, v in r.e2e.items()}})

    log("metrics and figures")
    components = _metrics(r.outputs, got)
    ours_image, ref_image = got["e2e/image"], to_uint8(r.run.image)
    image = image_metrics(ours_image, ref_image)
    runtime_timesteps = got["e2e/timesteps"].tolist()
    schedule_match = len(runtime_timesteps) == len(r.run.timesteps) and bool(
        np.allclose(runtime_timesteps, r.run.timesteps)
    )
    drift = {"timesteps": r.run.timesteps, **latent_drift(got["e2e/steps"], r.run.steps)}
    variants = variant_rows(r, got, worker, image, timed, bf16_context, bf16_run)
    checks = evaluate(components, image, thresholds)
    if not schedule_match:
        checks.append(Check("schedule: runtime timesteps == diffusers timesteps", 0.0, ">=", 1.0))

    speed = _speed(timed, worker)
    s.out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ref_image).save(s.out / "pytorch.png")
    Image.fromarray(ours_image).save(s.out / "runtime.png")
    figs = _figures(s.out, ref_image, ours_image, drift, speed["end_to_end"], components, s.stages)
    memory = {impl: {"baseline_bytes": baseline, "peak_bytes": t["peak_bytes"]} for impl, t in timed.items()}
    memory["runtime"] = {k: worker["rss"][k] for k in ("baseline_bytes", "peak_bytes")}
    note = (
        " **The runtime process imported torch**, so its numbers include it."
        if worker["torch_imported"]
        else ""
    )
    preset = s.model in PRESETS
    return {
        "passed": all(c.passed for c in checks),
        "settings": s.to_json(),
        "setup": {
            "model_label": f"{s.model} (preset, seed {s.seed_weights})" if preset else s.model,
            "random_weights": preset,
            "bundle_source": dict(bundle.manifest.source),
            "deprojector": ref.deprojector_note,
            "cpu": cpu_name(),
            "packages": packages(),
            "bf16": bf16_support,
            "skipped_components": r.skipped,
        },
        "workload": workload(s, bundle, ref.pipeline_name, len(r.run.timesteps)),
        "thresholds": thresholds.to_json(),
        "accuracy": {
            "components": components,
            "end_to_end": {
                "image": image,
                "latent_drift": drift,
                "schedule_match": schedule_match,
                "runtime_timesteps": runtime_timesteps,
                "pytorch_timesteps": r.run.timesteps,
                "clip_score": clip_score(ref, s, ref_image, ours_image),
            },
            "clip_guidance": guided_comparison(ref, s, r, got, worker, ref_image, ours_image),
            "pytorch_bf16_vs_fp32": bf16_context,
            "variants": variants,
        },
        "speed": speed,
        "memory": {
            "processes": memory,
            "peak_reset_supported": worker["rss"]["peak_reset"],
            "runtime_imported_torch": worker["torch_imported"],
            "method": MEMORY_METHOD + note,
        },
        "checks": [c.to_json() for c in checks],
        "figures": figs,
    }


def workload(s: Settings, bundle: Bundle, pipeline: str, steps_run: int) -> dict[str, Any]:
    """What the end-to-end run generates, and how both sides get the same random numbers."""
    out: dict[str, Any] = {
        "kind": s.workload,
        "strength": s.strength,
        "mask": s.mask,
        "pytorch_pipeline": pipeline,
        "steps_run": steps_run,  # img2img / inpainting run the last int(steps x strength) only
    }
    if s.strength is None:
        return {
            **out,
            "random_numbers": f"both sides start from the same latents, numpy default_rng({s.seed})",
        }
    inpainting_unet = bundle.unet_in_channels == INPAINT_CHANNELS
    return {
        **out,
        "init_image": f"export/init_images.py init_image({s.width}, {s.height})",
        "mask_image": f"export/init_images.py init_mask({s.width}, {s.height})" if s.mask else None,
        "mask_mode": None if not s.mask else "unet" if inpainting_unet else "blend",
        "random_numbers": f"numpy default_rng({s.seed}) on both sides, drawn in diffusers' order: the init "
        "image's latent sample, the start noise"
        + (", the masked image's latent sample" if s.mask else "")
        + " (diffusers' randn_tensor patched for the call)",
    }


def _variant_row(
    name: str,
    image: dict[str, Any],
    final: np.ndarray,
    ref_final: np.ndarray,
    median_s: float,
    exact_s: float,
) -> dict[str, Any]:
    drift = latent_drift(final[None], ref_final[None])
    return {
        "variant": name,
        "max_pixel_diff": image["max_pixel_diff"],
        "psnr_db": image["psnr_db"],
        "ssim": image["ssim"],
        "final_latent_max_abs": drift["max_abs"][0],
        "final_latent_rel_l2": drift["rel_l2"][0],
        "median_s": median_s,
        "speedup_vs_exact": exact_s / median_s,
    }


def variant_rows(
    r: Reference,
    got: dict[str, np.ndarray],
    worker: dict[str, Any],
    image: dict[str, Any],
    timed: dict[str, Any],
    bf16_context: dict[str, Any] | None,
    bf16_run: torch_ref.TorchRun | None,
) -> list[dict[str, Any]]:
    """One row per way of computing the image, each against the exact PyTorch fp32 one: the
    runtime as asked, PyTorch bf16 (when timed) and the runtime's step-caching variants."""
    ref_image, ref_final = to_uint8(r.run.image), r.run.steps[-1]
    exact_s = worker["e2e"]["total"]["median_s"]
    rows = [_variant_row("runtime", image, got["e2e/steps"][-1], ref_final, exact_s, exact_s)]
    if bf16_context is not None and bf16_run is not None:
        median = timed["pytorch_bf16"]["e2e"]["total"]["median_s"]
        bf16_image = bf16_context["image"]
        rows.append(_variant_row("pytorch bf16", bf16_image, bf16_run.steps[-1], ref_final, median, exact_s))
    for interval, timing in worker["variants"].items():
        ours = got[f"cache{interval}/image"]
        rows.append(
            _variant_row(
                f"runtime, cache interval {interval}",
                image_metrics(ours, ref_image),
                got[f"cache{interval}/final_latent"],
                ref_final,
                timing["total"]["median_s"],
                exact_s,
            )
        )
    return rows


def _speed(timed: dict[str, Any], worker: dict[str, Any]) -> dict[str, Any]:
    """Per-component and end-to-end statistics of every implementation, with runtime speed-ups."""
    fp32, bf16 = timed["pytorch_fp32"], timed.get("pytorch_bf16")
    components = {}
    for name, ours in worker["components"].items():
        theirs32, theirs16 = fp32["components"][name], bf16["components"][name] if bf16 else None
        components[name] = {
            "pytorch_fp32": theirs32,
            "pytorch_bf16": theirs16,
            "runtime": ours,
            "speedup_vs_fp32": _speedup(theirs32, ours),
            "speedup_vs_bf16": _speedup(theirs16, ours),
        }
    ours_e2e = worker["e2e"]
    end_to_end = {
        "pytorch_fp32": fp32["e2e"],
        "pytorch_bf16": bf16["e2e"] if bf16 else None,
        "runtime": ours_e2e,
        "speedup_vs_fp32": _speedup(fp32["e2e"]["total"], ours_e2e["total"]),
        "speedup_vs_bf16": _speedup(bf16["e2e"]["total"] if bf16 else None, ours_e2e["total"]),
    }
    warmup = "1 run before timing: the accuracy run (PyTorch fp32, runtime) or a discarded run (bf16)"
    return {"components": components, "end_to_end": end_to_end, "warmup": warmup}


def _figures(
    out: Path,
    ref_image: np.ndarray,
    ours_image: np.ndarray,
    drift: dict[str, Any],
    e2e: dict[str, Any],
    components: dict[str, Any],
    stages: tuple[str, ...],
) -> dict[str, str]:
    medians = {
        impl.replace("_", " "): {k: v["median_s"] for k, v in e2e[impl]["stages"].items()}
        for impl in IMPLEMENTATIONS
        if e2e[impl] is not None
    }
    paths = [
        figures.image_grid(ref_image, ours_image, out / "image_grid.png"),
        figures.latent_drift(drift["max_abs"], drift["rel_l2"], drift["timesteps"], out / "latent_drift.png"),
        figures.stage_times(medians, out / "stage_times.png", stages),
    ]
    if "deprojector" in components:
        dep = components["deprojector"]["hidden_states"]
        paths.append(
            figures.deprojector_positions(
                dep["per_position_max_abs"], dep["per_position_cosine"], out / "deprojector_positions.png"
            )
        )
    return {p.stem: p.name for p in paths}


def clip_score(
    ref: torch_ref.TorchReference, s: Settings, pytorch: np.ndarray, ours: np.ndarray
) -> dict[str, Any]:
    """CLIP score of both images with the model's own image tower (presets carry a random one)."""
    vision = ref.components.vision
    if vision is None:
        return {"status": "n/a (no vision tower: a diffusers folder needs image_encoder/ or safety_checker/)"}
    text_embeds = ref.reference.encode([s.prompt]).text_embeds
    if text_embeds is None:
        return {"status": "n/a (no text_projection: export with --projection to embed the prompt)"}
    if vision.projection_dim != text_embeds.shape[-1]:
        return {"status": f"n/a (the image tower's {vision.projection_dim}-d embeddings do not fit the "
                          f"text projection's {text_embeds.shape[-1]})"}  # fmt: skip
    scores = torch_ref.clip_scores(vision, [pytorch, ours], text_embeds)
    return {
        "pytorch": scores[0],
        "runtime": scores[1],
        "difference": scores[1] - scores[0],
        "source": vision.source,
    }


def guided_comparison(
    ref: torch_ref.TorchReference,
    s: Settings,
    r: Reference,
    got: dict[str, np.ndarray],
    worker: dict[str, Any],
    plain_pytorch: np.ndarray,
    plain_ours: np.ndarray,
) -> dict[str, Any] | None:
    """With --clip-guidance: both sides' guided image from the same latents (PyTorch:
    export/reference_guidance.py), their difference, and CLIP scores with and without guidance."""
    if s.clip_guidance <= 0:
        return None
    log(f"PyTorch CLIP guidance {s.clip_guidance:g} (skip {s.clip_guidance_skip})")
    start = time.perf_counter()
    latents = torch.from_numpy(r.latents)
    sampling = Sampling(s.steps, s.guidance, s.seed, s.height, s.width, s.scheduler, latents)
    guided = clip_guided(
        ref.reference, s.prompt, s.negative, clip_guidance=s.clip_guidance,
        clip_guidance_skip=s.clip_guidance_skip, sampling=sampling,
    )  # fmt: skip
    pytorch_s = time.perf_counter() - start
    pytorch, ours = to_uint8(guided[0]), got["guided/image"]
    s.out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pytorch).save(s.out / "pytorch-guided.png")
    Image.fromarray(ours).save(s.out / "runtime-guided.png")
    return {
        "scale": s.clip_guidance,
        "skip": s.clip_guidance_skip,
        "image": image_metrics(ours, pytorch),
        "clip_score": clip_score(ref, s, pytorch, ours),
        "clip_score_unguided": clip_score(ref, s, plain_pytorch, plain_ours),
        "pytorch_seconds": pytorch_s,
        "runtime": worker["clip_guidance"],
    }


def cpu_name() -> str:
    return f"{cpu_model()} ({os.cpu_count()} cores)"


def packages() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "diffusers", "transformers", "onnxruntime", "tensorrt", "numpy"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found
