"""`python -m export`: write (or reuse) an sdrt bundle directory.

python -m export --model tiny|sd15|PATH [--seed N] [--projection DIR]
                 [--deprojector CKPT|none] --out DIR [--precision fp32|fp16|both] [--deepcache]
                 [--clip-guidance]
                 [--int8 [--int8-scheme hybrid|full] [--int8-samples N] [--int8-size PX] [--int8-steps N]
                         [--int8-vae] [--int8-overflow-fix auto|enable|first_layer_only]]
                 [--force]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from export.build import PRECISION_CHOICES, ExportOptions, export_bundle
from export.int8 import OVERFLOW_FIXES, SCHEMES, Int8Options, add_int8
from export.models import DEFAULT_SEED, PRESETS, UnsupportedModel
from runtime.cli import positive_int
from runtime.errors import RequestError

_DIFFUSERS_PARTS = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", required=True, help=f"preset ({', '.join(PRESETS)}) or a diffusers SD 1.x folder"
    )
    p.add_argument("--seed", type=int, default=None, help=f"weight seed of a preset (default {DEFAULT_SEED})")
    p.add_argument("--projection", type=Path, help="folder with CLIP's text_projection (W_P)")
    p.add_argument(
        "--deprojector",
        help='deprojector checkpoint folder, or "none" (default: v1 initialised from the CLIP)',
    )
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    p.add_argument("--precision", choices=sorted(PRECISION_CHOICES), default="both")
    p.add_argument(
        "--deepcache",
        action="store_true",
        help="also write the step-caching UNets (`--cache-interval` at run time; one more UNet of files)",
    )
    p.add_argument(
        "--clip-guidance",
        action="store_true",
        help="also write CLIP guidance's gradient graph (`--clip-guidance SCALE` at run time; needs CLIP's "
        "image tower and text projection)",
    )
    int8 = p.add_argument_group("int8 UNet (OpenVINO; export/int8.py)")
    int8.add_argument(
        "--int8",
        action="store_true",
        help="also write an int8 UNet (`--backend openvino --precision int8`), calibrated through the "
        "bundle's own fp32 pipeline; added to an up-to-date bundle without re-exporting it",
    )
    defaults = Int8Options()
    int8.add_argument("--int8-scheme", choices=SCHEMES, default=defaults.scheme, help="what is quantized")
    int8.add_argument(
        "--int8-samples", type=positive_int, default=defaults.samples, help="UNet calls that calibrate"
    )
    int8.add_argument(
        "--int8-size", type=positive_int, default=defaults.size, help="calibration image side in pixels"
    )
    int8.add_argument(
        "--int8-steps", type=positive_int, default=defaults.steps, help="denoising steps per caption"
    )
    int8.add_argument(
        "--int8-vae",
        action=argparse.BooleanOptionalAction,
        default=defaults.vae,
        help='quantize the VAE decoder too (3x faster decoding, a larger image error: README "int8")',
    )
    int8.add_argument(
        "--int8-overflow-fix",
        choices=OVERFLOW_FIXES,
        default=defaults.overflow_fix,
        help="7-bit weights (NNCF): enable for CPUs without VNNI/AMX, first_layer_only for those with "
        "them; auto: as the exporting CPU",
    )
    p.add_argument("--force", action="store_true", help="re-export even if the bundle is up to date")
    return p


def _options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ExportOptions:
    """Validate flags before any model is loaded, naming the offending flag."""
    preset = args.model in PRESETS
    if not preset:
        folder = Path(args.model)
        if not folder.is_dir():
            parser.error(
                f"--model must be one of {', '.join(PRESETS)} or an existing folder; got {args.model!r}"
            )
        missing = [d for d in _DIFFUSERS_PARTS if not (folder / d).is_dir()]
        if missing:
            parser.error(f"--model {folder} is not a diffusers SD 1.x folder: missing {', '.join(missing)}/")
        if args.seed is not None:
            parser.error("--seed only applies to the presets (a folder's weights are fixed)")
    if args.seed is not None and args.seed < 0:
        parser.error(f"--seed must be >= 0; got {args.seed}")
    if args.projection is not None and not args.projection.is_dir():
        parser.error(f"--projection must be an existing folder; got {str(args.projection)!r}")
    if args.deprojector not in (None, "none") and not (Path(args.deprojector) / "config.json").is_file():
        parser.error(
            f'--deprojector must be "none" or a checkpoint folder with config.json; got {args.deprojector!r}'
        )
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out must be a directory; {str(args.out)!r} is a file")
    if args.precision == "fp16" and args.int8:
        parser.error("--int8 quantizes the fp32 UNet: use --precision fp32 or both")
    return ExportOptions(
        model=args.model,
        out=args.out,
        seed=DEFAULT_SEED if args.seed is None else args.seed,
        projection=args.projection,
        deprojector=args.deprojector,
        precision=args.precision,
        force=args.force,
        deepcache=args.deepcache,
        clip_guidance=args.clip_guidance,
    )


def _int8_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Int8Options | None:
    defaults = Int8Options()
    if not args.int8:
        given = [
            f"--int8-{name.replace('_', '-')}"
            for name in ("scheme", "samples", "size", "steps", "vae", "overflow_fix")
            if getattr(args, f"int8_{name}") != getattr(defaults, name)
        ]
        if given:
            parser.error(f"{', '.join(given)} only apply with --int8")
        return None
    opts = Int8Options(
        scheme=args.int8_scheme,
        samples=args.int8_samples,
        size=args.int8_size,
        steps=args.int8_steps,
        vae=args.int8_vae,
        overflow_fix=args.int8_overflow_fix,
    )
    try:
        return opts.validate()
    except ValueError as exc:
        parser.error(f"--int8-*: {exc}")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    opts, int8 = _options(args, parser), _int8_options(args, parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("onnxruntime").setLevel(logging.WARNING)  # the fp16 converter lists nodes at INFO
    with logging_redirect_tqdm():  # log lines above the progress bar, not through it
        try:
            result = export_bundle(opts)
        except UnsupportedModel as exc:
            parser.error(f"--model: {exc}")
    if result.reused:
        print(f"bundle {result.out} is up to date ({result.reason}): reused, nothing exported")
    else:
        print(
            f"bundle {result.out} written in {result.seconds:.1f} s, "
            f"peak RSS {result.peak_rss_bytes / 1e9:.2f} GB"
        )
    if int8 is not None:
        with logging_redirect_tqdm():
            try:
                quantized = add_int8(opts.out, int8, force=opts.force)
            except RequestError as exc:
                parser.error(str(exc))
        record = quantized.manifest.int8
        assert record is not None  # add_int8 just wrote or checked it
        made = f"{record.scheme}, overflow fix {record.overflow_fix}"
        state = "up to date, reused" if quantized.reused else made
        for model, q in quantized.quality.items():
            psnr = "" if q.image_psnr_db_min is None else f", image PSNR >= {q.image_psnr_db_min:.1f} dB"
            print(
                f"int8 {model} in {opts.out} ({state}): cosine to fp32 >= {q.cosine_min:.5f}{psnr} "
                f"on {q.holdout_calls} held-out calls"
            )
    for warning in result.manifest.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
