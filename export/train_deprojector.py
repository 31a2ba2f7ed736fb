"""`python -m export.train_deprojector`: train a CLIP Text Deprojector from captions.

python -m export.train_deprojector --model tiny|sd15|PATH --captions FILE|builtin
    --variant v1|v2|v3|v4|v5|vicinity --out DIR [--steps N] [--batch N] [--lr LR] [--seed N]
    [--resume | --overwrite] [--holdout N] [--eval-every N] [--patience N] [--projection DIR]
    [--model-seed N] [--builtin-count N] [--cache DIR] [--encode-batch N] [--device cpu|cuda]
    [--threads N]

Writes DIR/deprojector (the checkpoint: `python -m export --deprojector DIR/deprojector`),
DIR/resume (state for --resume) and DIR/stamp.json (the run's numbers).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from export.captions import BUILTIN, DEFAULT_BUILTIN_COUNT
from export.models import DEFAULT_SEED, PRESETS
from export.training import TRAINABLE, TrainOptions, TrainResult, train, train_or_reuse

_DEFAULTS = TrainOptions(model="tiny", out=Path("."))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export.train_deprojector", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--model", required=True, help=f"preset ({', '.join(PRESETS)}) or a diffusers SD 1.x folder"
    )
    p.add_argument("--captions", required=True, help=f"text file, one caption per line, or {BUILTIN!r}")
    p.add_argument("--variant", required=True, choices=TRAINABLE)
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument(
        "--steps", type=int, default=_DEFAULTS.steps, help="total optimizer steps (default %(default)s)"
    )
    p.add_argument("--batch", type=int, default=_DEFAULTS.batch, help="pairs per step (default %(default)s)")
    p.add_argument("--lr", type=float, default=_DEFAULTS.lr, help="Adam learning rate (default %(default)s)")
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="augmentation, batch order, init")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    group.add_argument("--overwrite", action="store_true", help="discard a run saved in --out")
    group.add_argument(
        "--reuse",
        action="store_true",
        help="reuse a finished run in --out with the same inputs; else resume it or train afresh",
    )
    p.add_argument("--holdout", type=int, default=_DEFAULTS.holdout, help="held-out captions (the last N)")
    p.add_argument("--eval-every", type=int, help="steps between held-out evaluations (default: one epoch)")
    p.add_argument("--patience", type=int, default=_DEFAULTS.patience, help="evaluations without improvement")
    p.add_argument("--projection", type=Path, help="folder with CLIP's text_projection (W_P)")
    p.add_argument("--model-seed", type=int, default=DEFAULT_SEED, help="weight seed of a preset")
    p.add_argument(
        "--builtin-count", type=int, default=DEFAULT_BUILTIN_COUNT, help="size of the builtin corpus"
    )
    p.add_argument("--cache", type=Path, help="CLIP encoding cache (default ~/.cache/sdrt/clip_pairs)")
    p.add_argument("--encode-batch", type=int, default=_DEFAULTS.encode_batch, help="texts per CLIP call")
    p.add_argument("--device", default="cpu", help="torch device for CLIP and training (cpu, cuda)")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest for the tiny preset)")
    return p


def _options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> TrainOptions:
    """Validate flags before any model is loaded, naming the offending flag."""
    if args.model not in PRESETS and not (Path(args.model) / "text_encoder").is_dir():
        parser.error(f"--model must be one of {', '.join(PRESETS)} or a diffusers folder; got {args.model!r}")
    if args.captions != BUILTIN and not Path(args.captions).is_file():
        parser.error(f"--captions must be {BUILTIN!r} or an existing file; got {args.captions!r}")
    if args.projection is not None and not args.projection.is_dir():
        parser.error(f"--projection must be an existing folder; got {str(args.projection)!r}")
    try:
        return TrainOptions(
            model=args.model,
            out=args.out,
            captions=args.captions,
            variant=args.variant,
            steps=args.steps,
            batch=args.batch,
            lr=args.lr,
            seed=args.seed,
            model_seed=args.model_seed,
            projection=args.projection,
            builtin_count=args.builtin_count,
            holdout=args.holdout,
            eval_every=args.eval_every,
            patience=args.patience,
            cache_dir=args.cache,
            encode_batch=args.encode_batch,
            device=args.device,
            threads=args.threads,
            resume=args.resume,
            overwrite=args.overwrite,
        )
    except ValueError as err:
        parser.error(str(err))


def _report(result: TrainResult) -> str:
    s = result.summary
    first, best = s["initial"], s["best"]
    lines = [
        f"{s['variant']} deprojector: {s['train_pairs']} training pairs {s['augmentation']}, "
        f"{s['held_out_pairs']} held out (CLIP cache {'hit' if s['clip_cache_hit'] else 'written'})",
        f"steps {s['steps_run']}{' (early stop)' if s['early_stopped'] else ''}, best at {s['best_step']}, "
        f"{s['seconds']:.1f} s",
        "held-out            untrained    trained",
        f"free-running loss   {first['free_loss']:9.4f}  {best['free_loss']:9.4f}",
        f"teacher-forced loss {first['tf_loss']:9.4f}  {best['tf_loss']:9.4f}",
        f"free-running cosine {first['free_cosine']:9.4f}  {best['free_cosine']:9.4f}",
        f"checkpoint: {result.checkpoint}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    opts, reuse = _options(args, parser), args.reuse
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        with logging_redirect_tqdm():
            if reuse:
                fields = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)}
                for decided_by_reuse in ("model", "out", "resume", "overwrite"):
                    fields.pop(decided_by_reuse)
                print(f"checkpoint: {train_or_reuse(opts.model, opts.out, **fields)}")
                return 0
            result = train(opts)
    except (FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
