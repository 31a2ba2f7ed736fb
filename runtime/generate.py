"""`python -m runtime.generate "cat maid" --bundle DIR --out cat.png`: prompt in, PNG out."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm

from runtime.backends import BACKENDS, PRECISIONS, BackendError
from runtime.bundle import BundleError
from runtime.image import infotext, save_png
from runtime.options import COMPOSE_MODES, DEFAULT_SEED, options_from, size_argument
from runtime.pipeline import Pipeline
from runtime.schedulers import SCHEDULERS
from runtime.tokenizer import LONG_PROMPT_MODES

log = logging.getLogger("sdrt")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runtime.generate", description=__doc__)
    p.add_argument("prompt", nargs="+", help="one or more prompts (one image set per prompt)")
    p.add_argument(
        "--negative", action="append", default=[], help="negative prompt (once, or once per prompt)"
    )
    p.add_argument(
        "--bundle", type=Path, default=Path("bundles/tiny"), help="bundle directory from `python -m export`"
    )
    p.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
    p.add_argument("--device", default="cpu", help="onnxruntime device: cpu, cuda or tensorrt")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="default: the backend's own (onnxruntime, openvino: fp32; tensorrt: fp16); bf16: openvino",
    )
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="image i of a run uses seed + i")
    p.add_argument(
        "--size", type=size_argument, default=None, help="WIDTHxHEIGHT in pixels (default: the bundle's)"
    )
    p.add_argument("--scheduler", choices=SCHEDULERS, default="pndm")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--deproject",
        action="store_const",
        dest="mode",
        const="deproject",
        help="condition on states deprojected from the prompt's pooled CLIP embedding",
    )
    mode.add_argument(
        "--compose",
        action="store_const",
        dest="mode",
        const="compose",
        help="compose comma-separated pieces ('cat, (maid:1.3)') in embedding space, then deproject",
    )
    p.add_argument("--compose-mode", choices=COMPOSE_MODES, default="sum")
    p.add_argument(
        "--normalize", action="store_true", help="rescale the composed embedding to the pieces' mean norm"
    )
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--long-prompt", choices=LONG_PROMPT_MODES, default="truncate")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("out/image.png"),
        help="PNG path; several images get -0, -1, ... before the suffix",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(mode="standard")
    return p.parse_args(argv)


def _out_paths(out: Path, count: int) -> list[Path]:
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(count)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    options = options_from(vars(args), prompts=tuple(args.prompt), negative_prompts=tuple(args.negative))
    try:
        start = time.perf_counter()
        pipeline = Pipeline(
            args.bundle, args.backend, precision=args.precision, device=args.device, threads=args.threads
        )
        load_s = time.perf_counter() - start
        with tqdm(
            total=pipeline.denoising_steps(options) * options.total_images, unit="step", disable=None
        ) as bar:
            result = pipeline.generate(options, on_step=lambda i, t, x: bar.update(len(x)))
    except (ValueError, BundleError, BackendError) as exc:
        log.error("error: %s", exc)
        return 2
    paths = _out_paths(args.out, len(result.images))
    model = args.bundle.resolve().name
    for k, (image, path) in enumerate(zip(result.images, paths, strict=True)):
        save_png(image, path, infotext(result, k, args.backend, pipeline.backend.precision, model))
        log.info("wrote %s", path)
    timings = {"load": load_s, **result.timings}
    log.info("%-8s %8s", "stage", "seconds")
    for stage, seconds in timings.items():
        log.info("%-8s %8.3f", stage, seconds)
    log.info("%-8s %8.3f", "total", sum(timings.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
