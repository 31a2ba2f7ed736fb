"""`python -m runtime.generate "cat maid" --bundle DIR --out cat.png`: prompt in, image out.

Exit status: 0 done; 2 a bad argument or request (the message names it); 3 a broken bundle,
backend or environment (the message names the file or library and how to repair it).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm

from runtime.backends import BACKENDS, PRECISIONS, BackendConfig
from runtime.bundle import VERIFY_MODES, Bundle
from runtime.cli import positive_int, report, size_argument
from runtime.clip_guidance import DEFAULT_SKIP
from runtime.errors import EXIT_SETUP, RequestError, SetupError
from runtime.guidance import CFG_CONVENTIONS
from runtime.image import IMAGE_FORMATS, check_writable, infotext, save_image
from runtime.init_image import RESIZE_MODES, read_image_file
from runtime.lora.cli import cli_loras, lora_argument
from runtime.options import (
    COMPOSE_MODES,
    DEFAULT_SEED,
    DEFAULT_STRENGTH,
    MASK_MODES,
    MAX_MASK_BLUR,
    GenerateOptions,
    options_from,
    validate,
)
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
    p.add_argument("--device", default=None, help="onnxruntime device: cpu (default), cuda or tensorrt")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="default: the backend's own (onnxruntime, openvino: fp32; tensorrt: fp16); bf16, int8 "
        "(the bundle's int8 UNet, `python -m export --int8`) and int8-bf16 (both): openvino",
    )
    p.add_argument("--threads", type=positive_int, default=None, help="intra-op threads (default: all cores)")
    p.add_argument(
        "--static-shapes",
        action="store_true",
        help="compile each model for the request's exact shapes, cached (openvino, onnxruntime on cpu)",
    )
    p.add_argument(
        "--verify",
        choices=VERIFY_MODES,
        default="stamp",
        help="bundle integrity: stamp (hash once, then trust unchanged size/mtime/inode), "
        "full (hash every run), off",
    )
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (>= 0)")
    p.add_argument(
        "--cfg-convention",
        choices=CFG_CONVENTIONS,
        default="1-based",
        help="how --guidance is written: 1-based eps_u + s(eps_c - eps_u) (diffusers, A1111), or "
        "0-based eps_c + s(eps_c - eps_u), the same guidance as 1-based s + 1",
    )
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
        "--cache-interval",
        type=int,
        default=1,
        help="step caching: the whole UNet every N-th step, its shallow part in between "
        "(faster, approximate; needs a bundle exported with --deepcache); 1 = off (default)",
    )
    img2img = p.add_argument_group("img2img and inpainting (a bundle with the VAE encoder)")
    img2img.add_argument(
        "--init-image", type=Path, default=None, help="start from this image (RGB or grayscale)"
    )
    img2img.add_argument(
        "--strength",
        type=float,
        default=None,
        help=f"0 < S <= 1: how far from the init image (default {DEFAULT_STRENGTH}); of --steps, the last "
        "int(steps x S) run",
    )
    img2img.add_argument(
        "--mask", type=Path, default=None, help="inpainting mask (white = repaint), the init image's size"
    )
    img2img.add_argument(
        "--mask-blur", type=int, default=0, help=f"Gaussian blur of the mask in pixels (0-{MAX_MASK_BLUR})"
    )
    img2img.add_argument(
        "--mask-mode",
        choices=MASK_MODES,
        default="auto",
        help="unet: an inpainting UNet reads the mask; blend: keep the unmasked latents (any UNet); "
        "auto: unet if the bundle's UNet is an inpainting one",
    )
    img2img.add_argument(
        "--resize-mode",
        choices=RESIZE_MODES,
        default="just_resize",
        help="fitting an init image of another size: stretch, crop to fill, or fit and pad with its edges",
    )
    lora = p.add_argument_group("LoRA (safetensors, kohya/A1111 or diffusers/PEFT layout)")
    lora.add_argument(
        "--lora",
        type=lora_argument,
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="apply this LoRA file with this strength (default 1.0); repeat for several",
    )
    lora.add_argument(
        "--lora-dir",
        type=Path,
        default=None,
        help="folder of NAME.safetensors files that the prompt's <lora:NAME:WEIGHT> tags name (A1111's "
        "syntax, read from the prompt only, as A1111 does)",
    )
    p.add_argument(
        "--clip-score",
        action="store_true",
        help="score each image against its prompt (100 x cosine of CLIP's image and text embeddings, "
        "0-100): logged and written to the image's parameters; needs a bundle with CLIP's image tower",
    )
    p.add_argument(
        "--clip-guidance",
        type=float,
        default=0.0,
        metavar="SCALE",
        help="UPainting-style CLIP guidance: a second pass that corrects the prediction toward the "
        "prompt's CLIP embedding (twice the steps, plus a gradient per step); 0 = off; needs a bundle "
        "exported with --clip-guidance",
    )
    p.add_argument(
        "--clip-guidance-skip",
        type=int,
        default=DEFAULT_SKIP,
        metavar="K",
        help=f"steps run without the correction first (default {DEFAULT_SKIP})",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("out/image.png"),
        help=f"image path ({', '.join(IMAGE_FORMATS)}); several images get -0, -1, ... before the suffix",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(mode="standard")
    return p.parse_args(argv)


def _out_paths(out: Path, count: int) -> list[Path]:
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def _options(args: argparse.Namespace) -> GenerateOptions:
    """The request, init image and mask read from their files (RequestError naming the flag)."""
    prompts, loras = cli_loras(tuple(args.prompt), args.lora, args.lora_dir)
    init_image = None if args.init_image is None else read_image_file(args.init_image, "--init-image")
    mask = None if args.mask is None else read_image_file(args.mask, "--mask", mask=True)
    return options_from(
        vars(args),
        prompts=prompts,
        negative_prompts=tuple(args.negative),
        init_image=init_image,
        mask=mask,
        loras=loras,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    config = BackendConfig(
        args.backend, args.device, args.precision, args.threads, static_shapes=args.static_shapes
    )
    try:
        start = time.perf_counter()
        request = _options(args)
        paths = _out_paths(args.out, request.total_images)
        check_writable(paths)  # before minutes of loading and denoising, not after
        bundle = Bundle.open(args.bundle, verify=args.verify)
        options = validate(request, bundle)
        pipeline = Pipeline(bundle, config.validate())
        load_s = time.perf_counter() - start
        with tqdm(
            total=pipeline.denoising_steps(options) * options.total_images, unit="step", disable=None
        ) as bar:
            result = pipeline.generate(options, on_step=lambda i, t, x: bar.update(len(x)))
        model = bundle.root.name
        for k, (image, path) in enumerate(zip(result.images, paths, strict=True)):
            save_image(image, path, infotext(result, k, config.backend, pipeline.backend.precision, model))
            if result.clip_scores is None:
                log.info("wrote %s", path)
            else:
                log.info("wrote %s (CLIP score %.2f)", path, result.clip_scores[k])
    except (RequestError, SetupError) as exc:
        return report(log, exc)
    except OSError as exc:  # the disk filled up or the folder vanished while generating
        log.error("error: cannot write the image: %s", exc)
        return EXIT_SETUP
    timings = {"load": load_s, **result.timings}
    log.info("%-10s %8s", "stage", "seconds")
    for stage, seconds in timings.items():
        log.info("%-10s %8.3f", stage, seconds)
    log.info("%-10s %8.3f", "total", sum(timings.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
