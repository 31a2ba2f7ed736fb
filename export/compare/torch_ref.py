"""The PyTorch side: the same weights the bundle was exported from, run in fp32 (the oracle) and
optionally under bfloat16 autocast (what a PyTorch CPU user would reach for to go faster).

Components run through the very wrappers the exporter traced (export.build.torch_module), so
both sides share one I/O contract. End to end runs diffusers' StableDiffusionPipeline the way
export.reference.ReferencePipeline.generate does, plus a `callback_on_step_end` that records the
latents after every step (ReferencePipeline.generate does not expose the callback).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from torch import nn

from export.build import INIT_FROM_CLIP, deprojector_module, model_spec, torch_module
from export.compare.settings import Settings
from export.models import SDComponents, load_model
from export.reference import ReferencePipeline, diffusers_scheduler
from runtime.manifest import DeprojectorManifest, Manifest


@dataclass
class TorchRun:
    image: np.ndarray  # (H, W, 3) float in [0, 1]
    steps: np.ndarray  # (S, 1, 4, h, w) latents after each step
    timesteps: list[float]
    timings: dict[str, float]  # text / denoise / decode seconds


class TorchReference:
    """Loaded PyTorch models plus how the deprojector was obtained (for the report)."""

    def __init__(self, s: Settings, manifest: Manifest):
        projection = Path(s.projection) if s.projection else None
        self.components: SDComponents = load_model(s.model, s.seed_weights, projection)
        self.deprojector, self.deprojector_note = _deprojector(
            self.components, s.bundle, manifest.deprojector
        )
        self.reference = ReferencePipeline(self.components, self.deprojector)
        c = self.components
        self.pipe: Any = cast(Any, StableDiffusionPipeline)(  # diffusers' lazy imports defeat mypy
            vae=c.vae,
            text_encoder=c.text_encoder,
            tokenizer=self.reference.tokenizer,
            unet=c.unet,
            scheduler=diffusers_scheduler(s.scheduler, c.scheduler_config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        self.pipe.set_progress_bar_config(disable=True)
        names = ["clip", "unet", "vae_decoder"] + (["deprojector"] if self.deprojector is not None else [])
        self.modules: dict[str, nn.Module] = {n: torch_module(n, c, self.deprojector) for n in names}
        self.settings = s

    def run_component(
        self, name: str, feeds: dict[str, np.ndarray], bf16: bool = False
    ) -> dict[str, np.ndarray]:
        """One component on the bundle's named inputs -> its named outputs (float32 numpy)."""
        spec = model_spec(name, self.components)
        args = [torch.from_numpy(feeds[n]) for n in spec.input_names]
        if name == "clip":
            args = [args[0].long()]
        with torch.no_grad(), autocast(bf16):
            out = self.modules[name](*args)
        out = out if isinstance(out, tuple) else (out,)
        return {n: t.float().numpy() for n, t in zip(spec.output_names, out, strict=True)}

    def generate(self, latents: np.ndarray, bf16: bool = False) -> TorchRun:
        """diffusers' loop from `latents`, recording the latents after every step and stage times."""
        s, ref = self.settings, self.reference
        steps: list[np.ndarray] = []
        timesteps: list[float] = []
        marks: dict[str, float] = {}

        def on_step(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            steps.append(kwargs["latents"].float().numpy().copy())
            timesteps.append(float(t))
            marks["denoised"] = time.perf_counter()
            return kwargs

        with torch.no_grad(), autocast(bf16):
            start = time.perf_counter()
            cond = ref.prompt_states(s.prompt, s.mode)
            uncond = ref.encode([s.negative]).last_hidden_state
            encoded = time.perf_counter()
            images = self.pipe(
                prompt_embeds=cond,
                negative_prompt_embeds=uncond,
                num_inference_steps=s.steps,
                guidance_scale=s.guidance,
                height=s.height,
                width=s.width,
                generator=torch.Generator().manual_seed(s.seed),
                latents=torch.from_numpy(latents),
                output_type="np",
                callback_on_step_end=on_step,
            ).images
            end = time.perf_counter()
        timings = {
            "text": encoded - start,
            "denoise": marks["denoised"] - encoded,
            "decode": end - marks["denoised"],
        }
        return TorchRun(np.asarray(images[0], np.float32), np.stack(steps), timesteps, timings)


def autocast(bf16: bool) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 autocast on CPU, or nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def bf16_support() -> dict[str, Any]:
    """Whether CPU bf16 works at all and whether the CPU has native bf16 instructions."""
    try:
        with torch.no_grad(), autocast(True):
            ok = torch.ones(4, 4) @ torch.ones(4, 4)
        works = ok.dtype == torch.bfloat16
    except RuntimeError:
        works = False
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: None)()
    return {"available": works, "native_bf16_instructions": native}


def _deprojector(
    components: SDComponents, bundle: Path, entry: DeprojectorManifest | None
) -> tuple[nn.Module | None, str]:
    """Rebuild the bundle's deprojector the way export/build.py built it; a note says how."""
    if entry is None:
        return None, "none (the bundle has no deprojector)"
    folder = bundle / entry.dir
    if (folder / "config.json").is_file():  # the exact weights deprojector.onnx was traced from
        built = deprojector_module(components, str(folder))
        assert built is not None
        origin = f"{entry.checkpoint} variant {entry.variant}"  # the manifest's words
        return built[0], f"{origin}, loaded from the weights shipped in the bundle ({entry.dir}/)"
    if entry.checkpoint == INIT_FROM_CLIP:
        built = deprojector_module(components, None)
        assert built is not None
        if built[1]["variant"] != entry.variant:
            raise ValueError(
                f"the bundle's deprojector is {INIT_FROM_CLIP} variant {entry.variant!r}, but this "
                f"exporter builds variant {built[1]['variant']!r}: re-export the bundle"
            )
        return built[0], f"{INIT_FROM_CLIP} variant {entry.variant}, rebuilt from the PyTorch CLIP"
    checkpoint = Path(entry.checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise ValueError(f"the bundle's deprojector checkpoint {checkpoint} is not there any more")
    built = deprojector_module(components, str(checkpoint))
    assert built is not None
    return built[0], f"checkpoint {checkpoint}, variant {built[1]['variant']}"


# -- CLIP score: only with a CLIP vision tower of the same CLIP model (presets have none) --

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])
ImageEmbedder = Callable[[torch.Tensor], torch.Tensor]


def vision_tower(model: str) -> tuple[ImageEmbedder | None, int, str]:
    """(pixel_values -> image embeds, input size, note) from a diffusers folder's `image_encoder/`
    (CLIPVisionModelWithProjection) or `safety_checker/` (SD 1.x ships ViT-L/14's vision half there)."""
    folder = Path(model)
    if (folder / "image_encoder").is_dir():
        from transformers import CLIPVisionModelWithProjection

        encoder = CLIPVisionModelWithProjection.from_pretrained(
            folder / "image_encoder", local_files_only=True
        ).eval()
        return (
            (lambda px: encoder(pixel_values=px).image_embeds),
            int(encoder.config.image_size),
            "image_encoder/",
        )
    if (folder / "safety_checker").is_dir():
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

        checker = StableDiffusionSafetyChecker.from_pretrained(
            folder / "safety_checker", local_files_only=True
        ).eval()
        size = int(checker.vision_model.config.image_size)
        return (
            (lambda px: checker.visual_projection(checker.vision_model(px).pooler_output)),
            size,
            "safety_checker/",
        )
    return None, 0, "n/a (no vision tower)"


def clip_pixels(images: list[np.ndarray], size: int) -> torch.Tensor:
    """uint8 (H, W, 3) -> CLIP pixel_values: shortest side to `size` (bicubic), centre crop, normalise."""
    from PIL import Image

    rows = []
    for image in images:
        pil = Image.fromarray(image)
        scale = size / min(pil.size)
        pil = pil.resize(
            (max(size, round(pil.width * scale)), max(size, round(pil.height * scale))),
            Image.Resampling.BICUBIC,
        )
        left, top = (pil.width - size) // 2, (pil.height - size) // 2
        x = np.asarray(pil.crop((left, top, left + size, top + size)), np.float64) / 255.0
        rows.append(((x - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(rows)).float()


def clip_scores(
    embed: ImageEmbedder, size: int, images: list[np.ndarray], text_embeds: torch.Tensor
) -> list[float]:
    """100 x cosine(image embeds, text embeds) per image, the usual CLIP score (not clipped at 0)."""
    with torch.no_grad():
        image_embeds = embed(clip_pixels(images, size)).double()
    text = text_embeds.double().reshape(1, -1)
    return (100 * torch.nn.functional.cosine_similarity(image_embeds, text, dim=-1)).tolist()


def set_threads(n: int) -> None:
    """PyTorch intra-op threads = the runtime's, so the speed comparison is like for like."""
    torch.set_num_threads(n)
