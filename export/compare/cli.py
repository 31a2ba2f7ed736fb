"""`python scripts/compare.py --bundle DIR ...`: the runtime against PyTorch, accuracy and speed.

Exit codes: 0 every check passed, 1 a check failed, 2 bad arguments or an unusable bundle /
backend, 3 an unexpected error while comparing.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from export.compare.settings import PRESETS, Settings, UsageError
from export.compare.thresholds import DEFAULTS, Thresholds
from export.init_images import init_image, init_mask
from runtime.backends import PRECISIONS, BackendConfig
from runtime.backends.config import THREADED, check_bundle_precision
from runtime.bundle import Bundle
from runtime.cli import positive_int, size_argument
from runtime.cpu import BF16_FLAGS, bf16_instructions
from runtime.errors import RequestError, SetupError
from runtime.options import options_from, validate
from runtime.specs import DEEPCACHE_FULL, DEEPCACHE_SHALLOW, INPAINT_CHANNELS

BACKEND_MODULES = {"onnxruntime": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt"}
# Ancestral samplers draw fresh noise every step from each side's own RNG: the runs could not match.
DETERMINISTIC_SCHEDULERS = ("pndm", "ddim", "euler", "dpmpp_2m", "dpmpp_2m_karras")
MODES = ("standard", "deproject", "compose")
_FLAGS = {
    "height": "--size",
    "width": "--size",
    "steps": "--steps",
    "guidance": "--guidance",
    "seed": "--seed",
    "mode": "--mode",
    "strength": "--img2img/--steps",  # strength x steps runs no step
    "init_image": "--img2img",
    "mask": "--mask",
    "clip_guidance": "--clip-guidance",
    "clip_guidance_skip": "--clip-guidance-skip",
}  # first word of a runtime.options.validate error -> our flag
DEFAULT_CACHE_INTERVALS = (2, 3, 5)


def _intervals(text: str) -> tuple[int, ...]:
    """'2,3,5' -> (2, 3, 5): step-caching intervals, each > 1; 'none' -> ()."""
    if text.lower() == "none":
        return ()
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must look like 2,3,5 or 'none'; got {text!r}") from None
    if not all(2 <= v <= 1000 for v in values):
        raise argparse.ArgumentTypeError(f"each interval must be from 2 to 1000; got {text!r}")
    return tuple(dict.fromkeys(values))


def _strength(text: str) -> float:
    """--img2img STRENGTH: a number with 0 < STRENGTH <= 1, as the runtime takes it."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a strength with 0 < STRENGTH <= 1; got {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= 1):
        raise argparse.ArgumentTypeError(f"must be a strength with 0 < STRENGTH <= 1; got {text!r}")
    return value


def _gate(low: float, high: float) -> Any:
    """A threshold value in [low, high], or "none" to turn that gate off."""

    def parse(text: str) -> float | None:
        if text.lower() == "none":
            return None
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number or 'none'; got {text!r}") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"must be from {low:g} to {high:g} (or 'none'); got {text!r}")
        return value

    return parse


GATES = {  # option -> (Thresholds field, component or None, range)
    "min_cosine": ("min_cosine", None, (-1.0, 1.0)),
    "max_abs_clip": ("max_abs", "clip", (0.0, math.inf)),
    "max_abs_deprojector": ("max_abs", "deprojector", (0.0, math.inf)),
    "max_abs_unet": ("max_abs", "unet", (0.0, math.inf)),
    "max_abs_vae": ("max_abs", "vae_decoder", (0.0, math.inf)),
    "max_abs_vae_encoder": ("max_abs", "vae_encoder", (0.0, math.inf)),
    "max_pixel_diff": ("max_pixel_diff", None, (0.0, 255.0)),
    "min_psnr": ("min_psnr", None, (0.0, math.inf)),
    "min_ssim": ("min_ssim", None, (-1.0, 1.0)),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python scripts/compare.py",
        description="Compare the runtime (a bundle on a backend) with PyTorch: accuracy per component and "
        "end to end, speed and peak memory; writes report.md, report.json and PNG figures.",
        epilog="Gates default per precision (see export/compare/thresholds.py); pass 'none' to turn one off. "
        "Exit codes: 0 pass, 1 a check failed, 2 bad arguments, 3 unexpected error.",
    )
    p.add_argument("--bundle", type=Path, required=True, help="bundle directory from `python -m export`")
    p.add_argument(
        "--model", help="PyTorch side: tiny, sd15 or a diffusers folder (default: the bundle's source)"
    )
    p.add_argument("--backend", choices=tuple(BACKEND_MODULES), default="onnxruntime")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="what the runtime runs (default: fp32 on onnxruntime and openvino, fp16 on tensorrt); "
        "bf16: the fp32 files computed in bf16, openvino only; int8: the bundle's int8 UNet, openvino only; "
        "int8-bf16: both",
    )
    p.add_argument(
        "--size", type=size_argument, help="WIDTHxHEIGHT in pixels (default: the bundle's preferred size)"
    )
    p.add_argument("--steps", type=positive_int, default=20, help="denoising steps (default 20)")
    p.add_argument("--runs", type=positive_int, default=5, help="timed runs after one warm-up (default 5)")
    p.add_argument(
        "--out", type=Path, default=Path("out/compare"), help="report folder (default out/compare)"
    )
    p.add_argument("--prompt", default="a photo of a cat maid, watercolor")
    p.add_argument("--negative", default="blurry")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial latents (default 0)")
    p.add_argument("--scheduler", choices=DETERMINISTIC_SCHEDULERS, default="pndm")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument(
        "--mode", choices=MODES, default="standard", help="how the prompt conditions the UNet end to end"
    )
    p.add_argument(
        "--img2img",
        type=_strength,
        default=None,
        metavar="STRENGTH",
        help="end to end: img2img at this strength (0 < STRENGTH <= 1) from export/init_images.py's init "
        "image at --size, diffusers' StableDiffusionImg2ImgPipeline on the PyTorch side (default: text to "
        "image); needs a bundle with the VAE encoder",
    )
    p.add_argument(
        "--mask",
        dest="inpaint",
        action="store_true",
        help="with --img2img: inpainting with export/init_images.py's mask (StableDiffusionInpaintPipeline); "
        "required for a bundle with an inpainting UNet",
    )
    p.add_argument(
        "--clip-guidance",
        type=float,
        default=0.0,
        metavar="SCALE",
        help="also run one CLIP-guided generation on both sides (export/reference_guidance.py for "
        "PyTorch) and report its image difference and both CLIP scores; text to image, mode standard, "
        "a bundle exported with --clip-guidance",
    )
    p.add_argument(
        "--clip-guidance-skip",
        type=int,
        default=10,
        metavar="K",
        help="steps run unguided first (default 10)",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=os.cpu_count() or 1,
        help="intra-op threads for PyTorch and ONNX Runtime alike (default: all cores)",
    )
    bf16 = p.add_mutually_exclusive_group()
    bf16.add_argument(
        "--bf16",
        dest="bf16",
        action="store_const",
        const=True,
        help=f"time PyTorch bf16 even on a CPU without {'/'.join(BF16_FLAGS)} (emulated: very slow)",
    )
    bf16.add_argument(
        "--no-bf16",
        dest="bf16",
        action="store_const",
        const=False,
        help="skip the PyTorch bf16 timings (default: skipped on CPUs without native bf16)",
    )
    p.add_argument(
        "--cache-intervals",
        type=_intervals,
        default=None,
        metavar="N,N",
        help="step-caching variants the runtime also runs, each compared with the exact PyTorch fp32 "
        "image (default 2,3,5 when the bundle has the step-caching graphs; 'none' skips them)",
    )
    gates = p.add_argument_group("thresholds (default per --precision; 'none' turns a gate off)")
    for option, (_, component, (low, high)) in GATES.items():
        what = f"{component} " if component else ""
        gates.add_argument(
            f"--{option.replace('_', '-')}",
            type=_gate(low, high),
            default=argparse.SUPPRESS,
            metavar="X",
            help=f"{what}{option.split('_', 1)[0]} gate",
        )
    return p


def thresholds_from(args: argparse.Namespace, precision: str) -> Thresholds:
    """The precision's defaults, overridden by any gate given on the command line."""
    t = DEFAULTS[precision]
    max_abs = dict(t.max_abs)
    for option, (field, component, _) in GATES.items():
        if option not in vars(args):
            continue
        value = getattr(args, option)
        if component is not None:
            max_abs[component] = value
        else:
            t = replace(t, **{field: value})
    return replace(t, max_abs=max_abs)


def _model_source(source: Mapping[str, Any], model: str | None) -> tuple[str, int, str | None]:
    """(model, preset seed, projection) for the PyTorch side; default: what the bundle was built from."""
    projection = source.get("projection")
    if model is None:
        if source.get("kind") == "preset":
            return source["preset"], int(source.get("seed", 0)), projection
        if source.get("kind") == "diffusers_folder":
            return source["path"], 0, projection
        raise UsageError("the bundle's manifest does not name its source model: pass --model")
    if model not in PRESETS and not Path(model).is_dir():
        raise UsageError(f"--model must be one of {', '.join(PRESETS)} or a diffusers folder; got {model!r}")
    seed = int(source.get("seed", 0)) if source.get("preset") == model else 0
    return model, seed, projection


def settings_from(args: argparse.Namespace) -> tuple[Settings, Bundle]:
    """Validate everything that can be checked before a model loads; UsageError names the flag."""
    if args.inpaint and args.img2img is None:
        raise UsageError("--mask needs --img2img STRENGTH: inpainting repaints part of the init image")
    if args.clip_guidance > 0 and (args.img2img is not None or args.mode != "standard"):
        raise UsageError("--clip-guidance: the PyTorch reference guides text to image in mode standard only")
    try:
        bundle = Bundle.open(args.bundle)
    except (RequestError, SetupError) as exc:
        raise UsageError(f"--bundle: {exc}") from None
    _check_workload(args, bundle)
    try:
        threads = args.threads if args.backend in THREADED else None
        backend = BackendConfig(args.backend, precision=args.precision, threads=threads).validate()
        assert backend.precision is not None
        precision = backend.precision
        check_bundle_precision(bundle, precision)
    except RequestError as exc:
        raise UsageError(f"--precision/--threads: {exc}") from None
    if importlib.util.find_spec(BACKEND_MODULES[args.backend]) is None:
        raise UsageError(
            f"--backend {args.backend}: the {BACKEND_MODULES[args.backend]} package is not installed"
        )
    request = options_from(
        vars(args), prompts=(args.prompt,), negative_prompts=(args.negative,), **_image_request(args, bundle)
    )
    try:  # the runtime's own checks, so the tool accepts exactly what the runtime accepts
        resolved = validate(request, bundle)
    except RequestError as exc:
        flag = _FLAGS.get(str(exc).split(" ", 1)[0], "--size/--steps/--guidance/--seed/--mode")
        raise UsageError(f"{flag}: {exc}") from None
    width, height = resolved.width, resolved.height
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out must be a directory; {str(args.out)!r} is a file")
    model, seed_weights, projection = _model_source(bundle.manifest.source, args.model)
    s = Settings(
        bundle=bundle.root.resolve(),
        model=model,
        seed_weights=seed_weights,
        projection=projection,
        backend=args.backend,
        precision=precision,
        width=width,
        height=height,
        steps=args.steps,
        runs=args.runs,
        prompt=args.prompt,
        negative=args.negative,
        seed=args.seed,
        scheduler=args.scheduler,
        guidance=args.guidance,
        mode=args.mode,
        threads=args.threads,
        bf16=_bf16_default() if args.bf16 is None else args.bf16,
        out=args.out.resolve(),
        cache_intervals=_cache_intervals(args.cache_intervals, bundle),
        strength=args.img2img,
        mask=args.inpaint,
        clip_guidance=resolved.clip_guidance,
        clip_guidance_skip=resolved.clip_guidance_skip,
    )
    return s, bundle


def _reexport(bundle: Bundle) -> str:
    """The command that re-exports `bundle` from its source model."""
    source = bundle.manifest.source
    model = {"preset": source.get("preset"), "diffusers_folder": source.get("path")}.get(
        source.get("kind", "")
    )
    seed = f" --seed {source['seed']}" if source.get("kind") == "preset" and source.get("seed") else ""
    return f"python -m export --model {model or 'MODEL'}{seed} --out {bundle.root}"


def _check_workload(args: argparse.Namespace, bundle: Bundle) -> None:
    """--img2img / --mask against what the bundle can run."""
    if args.img2img is not None and "vae_encoder" not in bundle.models:
        raise UsageError(
            f"--img2img: {bundle.root} has no VAE encoder (exported before img2img support); re-export it "
            f"with `{_reexport(bundle)}`, or leave --img2img out for text to image"
        )
    if bundle.unet_in_channels == INPAINT_CHANNELS and not args.inpaint:
        raise UsageError(
            f"--mask: {bundle.root} has an inpainting UNet ({INPAINT_CHANNELS} input channels), which only "
            "inpaints: pass --img2img STRENGTH --mask"
        )


def _image_request(args: argparse.Namespace, bundle: Bundle) -> dict[str, Any]:
    """The init image / mask / strength fields of the runtime request the tool validates: the run's
    size spelled out (an init image would otherwise pick it), the images made only for a size the
    bundle can take (validate names the bad size otherwise)."""
    h_range, w_range = bundle.image_size_range()
    width, height = args.size if args.size is not None else (w_range.opt, h_range.opt)
    fields: dict[str, Any] = {"width": width, "height": height}
    if args.img2img is None or not (0 < width <= w_range.max and 0 < height <= h_range.max):
        return fields
    fields.update(init_image=init_image(width, height), strength=args.img2img)
    if args.inpaint:
        fields["mask"] = init_mask(width, height)
    return fields


def _bf16_default() -> bool:
    """Time PyTorch bf16 only where the CPU has bf16 instructions; say why when skipping it."""
    if bf16_instructions():
        return True
    print(
        f"[compare] skipping the PyTorch bf16 timings: this CPU has none of {', '.join(BF16_FLAGS)}, so "
        "bf16 would be emulated (many times slower than fp32); --bf16 runs them anyway",
        file=sys.stderr,
    )
    return False


def _cache_intervals(asked: tuple[int, ...] | None, bundle: Bundle) -> tuple[int, ...]:
    """The variants to run: the default set when the bundle can, none (said why) when it cannot."""
    has_graphs = all(m in bundle.models for m in (DEEPCACHE_FULL, DEEPCACHE_SHALLOW))
    if has_graphs:
        return DEFAULT_CACHE_INTERVALS if asked is None else asked
    if asked:
        raise UsageError(
            f"--cache-intervals: {bundle.root} has no step-caching graphs; re-export it with "
            "`python -m export ... --deepcache`, or pass --cache-intervals none"
        )
    if asked is None:
        print(
            "[compare] no step-caching rows: the bundle was exported without --deepcache",
            file=sys.stderr,
        )
    return ()


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)  # exits 2 with a message on malformed flags
    try:
        s, bundle = settings_from(args)
        thresholds = thresholds_from(args, s.precision)
        from export.compare.run import compare  # imports torch: after the cheap checks

        report = compare(s, bundle, thresholds)
    except UsageError as exc:
        p.print_usage(sys.stderr)
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        import traceback

        traceback.print_exc()
        print(f"{p.prog}: unexpected error: {exc}", file=sys.stderr)
        return 3
    from export.compare import report as report_mod

    json_path, md_path = report_mod.write(report, s.out)
    _summary(report)
    print(f"wrote {md_path} and {json_path}")
    return 0 if report["passed"] else 1


def workload_label(w: dict[str, Any]) -> str:
    """'img2img, strength 0.5, 5 of 10 steps' and the like, from report["workload"]."""
    if w["strength"] is None:
        return f"{w['kind']} ({w['pytorch_pipeline']})"
    mask = f", mask mode {w['mask_mode']}" if w["mask"] else ""
    return (
        f"{w['kind']}, strength {w['strength']:g}{mask}, {w['steps_run']} steps run ({w['pytorch_pipeline']})"
    )


def _summary(r: dict[str, Any]) -> None:
    """A few lines on stdout: verdict, worst component, image and speed ratios."""
    e2e = r["speed"]["end_to_end"]
    image = r["accuracy"]["end_to_end"]["image"]
    failed = [c for c in r["checks"] if not c["passed"]]
    passed = len(r["checks"]) - len(failed)
    print(f"result: {'PASS' if r['passed'] else 'FAIL'} ({passed}/{len(r['checks'])} checks)")
    print(f"  workload     {workload_label(r['workload'])}")
    for c in failed:
        print(f"  failed: {c['name']} = {c['value']:.6g} (gate {c['op']} {c['limit']:.6g})")
    for component, outputs in r["accuracy"]["components"].items():
        worst = max(outputs.values(), key=lambda m: m["max_abs"])
        cosine = min(m.get("min_position_cosine", m["cosine"]) for m in outputs.values())
        print(f"  {component:<12} max abs {worst['max_abs']:.3g}  cosine {cosine:.8f}")
    print(
        f"  image        max pixel diff {image['max_pixel_diff']}/255  PSNR {image['psnr_db']:.4g} dB  "
        f"SSIM {image['ssim']:.6f}"
    )
    ratios = [f"{e2e['speedup_vs_fp32']:.2f}x vs PyTorch fp32"]
    if e2e["speedup_vs_bf16"] is not None:
        ratios.append(f"{e2e['speedup_vs_bf16']:.2f}x vs PyTorch bf16")
    median = e2e["runtime"]["total"]["median_s"]
    print(f"  speed        runtime end to end {median:.3f} s median: {', '.join(ratios)}")
    for row in r["accuracy"]["variants"]:
        speed = f"  {row['speedup_vs_exact']:.2f}x the exact runtime" if row["speedup_vs_exact"] else ""
        print(
            f"  {row['variant']:<24} max pixel diff {row['max_pixel_diff']}/255  "
            f"PSNR {row['psnr_db']:.4g} dB  SSIM {row['ssim']:.4f}  "
            f"final-latent rel L2 {row['final_latent_rel_l2']:.3g}{speed}"
        )


if __name__ == "__main__":
    sys.exit(main())
