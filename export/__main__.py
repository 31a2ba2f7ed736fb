"""`python -m export`: write (or reuse) an sdrt bundle directory.

python -m export --model tiny|sd15|PATH [--seed N] [--projection DIR]
                 [--deprojector CKPT|none] --out DIR [--precision fp32|fp16|both] [--deepcache] [--force]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from export.build import PRECISION_CHOICES, ExportOptions, export_bundle
from export.models import DEFAULT_SEED, PRESETS

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
    return ExportOptions(
        model=args.model,
        out=args.out,
        seed=DEFAULT_SEED if args.seed is None else args.seed,
        projection=args.projection,
        deprojector=args.deprojector,
        precision=args.precision,
        force=args.force,
        deepcache=args.deepcache,
    )


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    opts = _options(parser.parse_args(argv), parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("onnxruntime").setLevel(logging.WARNING)  # the fp16 converter lists nodes at INFO
    with logging_redirect_tqdm():  # log lines above the progress bar, not through it
        result = export_bundle(opts)
    if result.reused:
        print(f"bundle {result.out} is up to date ({result.reason}): reused, nothing exported")
    else:
        print(
            f"bundle {result.out} written in {result.seconds:.1f} s, "
            f"peak RSS {result.peak_rss_bytes / 1e9:.2f} GB"
        )
    for warning in result.manifest.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
