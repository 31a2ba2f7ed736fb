"""The PyTorch side: the same weights the bundle was exported from, run in fp32 (the oracle) and
optionally under bfloat16 autocast (what a PyTorch CPU user would reach for to go faster).

Components run through the very wrappers the exporter traced (export.build.torch_module), so
both sides share one I/O contract. End to end runs diffusers' StableDiffusionPipeline (text to
image), StableDiffusionImg2ImgPipeline (img2img) or StableDiffusionInpaintPipeline (inpainting) the
way export.reference.ReferencePipeline.generate does, plus a `callback_on_step_end` that records the
latents after every step (ReferencePipeline.generate does not expose the callback).

With an init image, diffusers' random tensors (the VAE's latent samples, the start noise) come from
numpy's default_rng(seed), the generator the runtime draws one image's numbers from, in the order
both draw them (`numpy_draws`, patched in for the call only), as tests/test_img2img_parity.py does.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from unittest import mock

import diffusers.models.autoencoders.vae as vae_module
import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as img2img_module
import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as inpaint_module
import numpy as np
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline
from PIL import Image
from torch import nn

from export.build import INIT_FROM_CLIP, deprojector_module, model_spec, torch_module
from export.compare.settings import Settings
from export.init_images import init_image, init_mask
from export.models import SDComponents, VisionTower, load_model
from export.reference import ReferencePipeline, diffusers_scheduler
from runtime.clip_score import preprocess, scores
from runtime.manifest import DeprojectorManifest, Manifest, VisionManifest


@dataclass
class TorchRun:
    image: np.ndarray  # (H, W, 3) float in [0, 1]
    steps: np.ndarray  # (S, 1, 4, h, w) latents after each step
    timesteps: list[float]
    timings: dict[str, float]  # Settings.stages: text / (encode) / denoise / decode seconds
    # the loop's first UNet call as diffusers made it (sample, timestep, encoder_hidden_states),
    # when `generate` was asked to record it
    unet_call: dict[str, np.ndarray] = field(default_factory=dict)


# where diffusers' img2img / inpainting path draws its random tensors (tests/test_img2img_parity.py)
RANDN_MODULES = (vae_module, img2img_module, inpaint_module)


@contextlib.contextmanager
def numpy_draws(seed: int) -> Iterator[None]:
    """While open, diffusers' `randn_tensor` in RANDN_MODULES draws from np.random.default_rng(seed),
    as the runtime's generator for image 0 does: the same numbers in the same call order."""
    rng = np.random.default_rng(seed)

    def draw(shape: Any, generator: Any = None, device: Any = None, dtype: Any = None, **_: Any) -> Any:
        shape = tuple(shape)
        if shape[0] != 1:
            raise ValueError(f"numpy_draws makes one image's numbers; asked for a batch of {shape[0]}")
        noise = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
        return noise if dtype is None else noise.to(dtype)

    with contextlib.ExitStack() as stack:
        for module in RANDN_MODULES:
            stack.enter_context(mock.patch.object(module, "randn_tensor", draw))
        yield


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
        # img2img / inpainting: the init image (and mask) at the run's size, the same uint8 arrays
        # the runtime gets, and diffusers' pipeline for the workload sharing the modules above
        self.init_image: np.ndarray | None = None
        self.init_mask: np.ndarray | None = None
        if s.strength is not None:
            self.init_image = init_image(s.width, s.height)
            self.init_mask = init_mask(s.width, s.height) if s.mask else None
            pipeline = StableDiffusionInpaintPipeline if s.mask else StableDiffusionImg2ImgPipeline
            self.pipe = cast(Any, pipeline)(**self.pipe.components)
            self.pipe.set_progress_bar_config(disable=True)
        names = ["clip", "unet", "vae_decoder"] + (["deprojector"] if self.deprojector is not None else [])
        if "vae_encoder" in manifest.models:
            names.append("vae_encoder")
        self.modules: dict[str, nn.Module] = {n: torch_module(n, c, self.deprojector) for n in names}
        self.settings = s

    @property
    def pipeline_name(self) -> str:
        """The diffusers pipeline class the end-to-end run uses."""
        return type(self.pipe).__name__

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

    def generate(
        self, latents: np.ndarray | None = None, bf16: bool = False, record_unet_call: bool = False
    ) -> TorchRun:
        """diffusers' loop, recording the latents after every step and stage times. Text to image
        starts from `latents`; img2img / inpainting from the init image, drawing from numpy_draws."""
        s, ref = self.settings, self.reference
        steps: list[np.ndarray] = []
        timesteps: list[float] = []
        marks: dict[str, float] = {}
        unet_call: dict[str, np.ndarray] = {}

        def on_step(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            steps.append(kwargs["latents"].float().numpy().copy())
            timesteps.append(float(t))
            marks["denoised"] = time.perf_counter()
            return kwargs

        def before_unet(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if "loop" in marks:
                return
            marks["loop"] = time.perf_counter()  # the loop's first UNet call: everything before is set up
            if record_unet_call:
                sample = args[0] if args else kwargs["sample"]
                t = args[1] if len(args) > 1 else kwargs["timestep"]
                states = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
                unet_call.update(
                    sample=sample.float().numpy().copy(),
                    timestep=np.array([float(t)], np.float32),
                    encoder_hidden_states=states.float().numpy().copy(),
                )

        if s.strength is None:
            if latents is None:
                raise ValueError("text to image starts from the caller's latents; none were given")
            workload: dict[str, Any] = {"height": s.height, "width": s.width}
            workload["latents"] = torch.from_numpy(latents)
            draws: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        else:
            assert self.init_image is not None
            workload = {"image": Image.fromarray(self.init_image), "strength": s.strength}
            if self.init_mask is not None:
                workload.update(mask_image=Image.fromarray(self.init_mask), height=s.height, width=s.width)
            draws = numpy_draws(s.seed)
        hook = self.components.unet.register_forward_pre_hook(before_unet, with_kwargs=True)
        try:
            with torch.no_grad(), autocast(bf16), draws:
                start = time.perf_counter()
                cond = ref.prompt_states(s.prompt, s.mode)
                uncond = ref.encode([s.negative]).last_hidden_state
                encoded = time.perf_counter()
                images = self.pipe(
                    prompt_embeds=cond,
                    negative_prompt_embeds=uncond,
                    num_inference_steps=s.steps,
                    guidance_scale=s.guidance,
                    generator=torch.Generator().manual_seed(s.seed),
                    output_type="np",
                    callback_on_step_end=on_step,
                    **workload,
                ).images
                end = time.perf_counter()
        finally:
            hook.remove()
        timings = {"text": encoded - start}
        if s.strength is None:
            timings["denoise"] = marks["denoised"] - encoded
        else:  # the runtime's "encode": from the prompt states to the loop's start latents
            timings["encode"] = marks["loop"] - encoded
            timings["denoise"] = marks["denoised"] - marks["loop"]
        timings["decode"] = end - marks["denoised"]
        run = TorchRun(np.asarray(images[0], np.float32), np.stack(steps), timesteps, timings, unet_call)
        return run


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


def clip_scores(vision: VisionTower, images: list[np.ndarray], text_embeds: torch.Tensor) -> list[float]:
    """CLIPScore (100 x max(cos, 0)) of each image with PyTorch's image tower, on the runtime's
    preprocessing (runtime/clip_score.py, bit-exact to CLIPImageProcessor's): the tower is the
    comparison here, not the resizing."""
    manifest = VisionManifest(vision.image_size, vision.mean, vision.std, vision.source)
    pixels = torch.from_numpy(preprocess(images, manifest))
    with torch.no_grad():
        image_embeds = vision.visual_projection(vision.vision_model(pixel_values=pixels).pooler_output)
    text = text_embeds.double().reshape(1, -1).expand(len(images), -1)
    return scores(image_embeds.double().numpy(), text.numpy())


def set_threads(n: int) -> None:
    """PyTorch intra-op threads = the runtime's, so the speed comparison is like for like."""
    torch.set_num_threads(n)
