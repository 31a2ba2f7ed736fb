"""Wire the stages in data-flow order: prompt -> tokens -> CLIP -> (compose -> deproject)
-> start latents (noise, or init image -> VAE encoder -> noised) -> UNet loop with CFG -> VAE
decoder -> images (-> CLIP score, when asked). CLIP guidance runs the loop twice: plain CFG to x̂₀,
then again from the same noise with the correction (runtime/clip_guidance.py). No torch; the
backend does the model math."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime import start_latents
from runtime.backends import Backend, BackendConfig, open_backend
from runtime.bundle import Bundle
from runtime.clip_guidance import Guide
from runtime.clip_score import clip_scores
from runtime.conditioning import prompt_states
from runtime.denoise import denoise, unet_models
from runtime.guidance import uses_uncond
from runtime.lora import LoraSettings
from runtime.lora.apply import LoraState
from runtime.options import GenerateOptions, ResolvedOptions, validate
from runtime.schedulers import make_scheduler
from runtime.schedulers.base import Scheduler
from runtime.specs import CLIP_GUIDANCE, CLIP_VISION, INPAINT_CHANNELS
from runtime.start_latents import Start, begin_index
from runtime.tokenizer import ClipTokenizer
from runtime.vae import decode

StepCallback = Callable[[int, float, np.ndarray], None]


class Cancelled(RuntimeError):
    """The cancel hook asked the generation to stop; nothing was decoded."""


@dataclass
class Result:
    images: np.ndarray  # (N, H, W, 3) uint8, prompt-major: prompt p's images are rows p*n .. p*n+n-1
    seeds: list[int]  # per image: seed + index, so image i alone reproduces with that seed
    options: ResolvedOptions
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    # per image, with options.clip_score: 100 * max(cos(image, prompt), 0) (runtime/clip_score.py)
    clip_scores: list[float] | None = None


class Pipeline:
    """One loaded bundle and backend. Thread-safe for concurrent `generate` calls if the backend is."""

    def __init__(
        self,
        bundle: Bundle | str | Path,
        backend: Backend | BackendConfig | None = None,
        lora: LoraSettings | None = None,
    ):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        if backend is None or isinstance(backend, BackendConfig):
            backend = open_backend(self.bundle, backend)
        self.backend = backend
        t = self.bundle.manifest.tokenizer
        self.tokenizer = ClipTokenizer(self.bundle.tokenizer_dir, t.bos_id, t.eos_id, t.pad_id)
        self.lora = LoraState(self.bundle, self.backend, lora)

    def denoising_steps(self, options: GenerateOptions | ResolvedOptions) -> int:
        """UNet calls per image: PNDM makes one more than `steps` (its PLMS warm-up); img2img and
        inpainting skip the first steps (diffusers' rule, `begin_index`)."""
        o = validate(options, self.bundle)
        planned = len(make_scheduler(o.scheduler, self.bundle.scheduler_config).set_timesteps(o.steps))
        calls = planned - (0 if o.strength is None else begin_index(o.steps, o.strength))
        return 2 * calls if o.clip_guidance > 0 else calls  # CLIP guidance: two passes

    @staticmethod
    def models_for(options: GenerateOptions | ResolvedOptions) -> list[str]:
        """The bundle models a generation runs, in the order it first needs them."""
        text = ["clip"] if options.mode == "standard" else ["clip", "deprojector"]
        encoder = [] if options.init_image is None else ["vae_encoder"]
        score = [CLIP_VISION] if options.clip_score else []
        guide = [CLIP_GUIDANCE] if options.clip_guidance > 0 else []
        return [*text, *encoder, *unet_models(options.cache_interval), *guide, "vae_decoder", *score]

    def _scheduler(self, o: ResolvedOptions) -> tuple[Scheduler, np.ndarray]:
        scheduler = make_scheduler(o.scheduler, self.bundle.scheduler_config)
        return scheduler, scheduler.set_timesteps(o.steps)

    def generate(
        self,
        options: GenerateOptions | ResolvedOptions,
        on_step: StepCallback | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> Result:
        o = validate(options, self.bundle)
        clock = time.perf_counter()
        with self.lora.using(o.loras):  # a LoRA set stays fixed for the whole generation
            waited = time.perf_counter() - clock  # preparing and switching, or waiting for another set
            result = self._generate(o, on_step, cancel)
        if o.loras:
            result.timings["lora"] = waited
        return result

    def _generate(
        self, o: ResolvedOptions, on_step: StepCallback | None, cancel: Callable[[], bool] | None
    ) -> Result:
        self.backend.prepare(self.models_for(o))
        timings: dict[str, float] = {}
        clock = time.perf_counter()
        prompts = prompt_states(self.backend, self.tokenizer, o)  # (P, 77·k, D) each
        uncond, cond = (np.repeat(s, o.num_images, axis=0) for s in (prompts.uncond, prompts.cond))
        timings["text"] = time.perf_counter() - clock

        clock = time.perf_counter()
        rngs = o.rngs()
        begin = start_latents.start(
            self.backend, self._scheduler(o)[0], o, rngs, self.bundle.latent_channels,
            self.bundle.vae_scale_factor, self.bundle.unet_in_channels == INPAINT_CHANNELS,
        )  # fmt: skip
        if o.init_image is not None:
            timings["encode"] = time.perf_counter() - clock
        per_call = max(
            1, self.bundle.models["unet"].dims["batch"].max // (2 if uses_uncond(o.cfg_scale) else 1)
        )

        clock = time.perf_counter()
        finished, guided = [], 0.0
        for row in range(0, o.total_images, per_call):
            rows = slice(row, row + per_call)
            start, states, row_rngs = begin.rows(rows), (uncond[rows], cond[rows]), rngs[rows]
            if o.clip_guidance > 0:
                again = copy.deepcopy(row_rngs)  # pass 2 draws pass 1's step noise again
                x0 = self._denoise(o, start, *states, row_rngs, on_step, cancel)
                assert prompts.text_embeds is not None, "validate checked the bundle"
                text = np.repeat(prompts.text_embeds, o.num_images, axis=0)[rows]  # (n, P)
                guide_clock = time.perf_counter()
                guide = self._guide(o, x0, text)
                finished.append(self._denoise(o, start, *states, again, on_step, cancel, guide))
                guided += time.perf_counter() - guide_clock
            else:
                finished.append(self._denoise(o, start, *states, row_rngs, on_step, cancel))
        timings["denoise"] = time.perf_counter() - clock - guided
        if o.clip_guidance > 0:
            timings["clip_guidance"] = guided  # the second pass, gradients included

        clock = time.perf_counter()
        images = decode(self.backend, np.concatenate(finished))
        timings["decode"] = time.perf_counter() - clock
        scores = None
        if o.clip_score:
            clock = time.perf_counter()
            vision = self.bundle.manifest.vision
            assert vision is not None and prompts.text_embeds is not None, "validate checked the bundle"
            text = np.repeat(prompts.text_embeds, o.num_images, axis=0)  # (N, P), prompt-major
            scores = clip_scores(self.backend, vision, images, text)
            timings["clip_score"] = time.perf_counter() - clock
        return Result(images, o.seeds, o, timings, scores)

    def _denoise(
        self,
        o: ResolvedOptions,
        start: Start,
        uncond: np.ndarray,
        cond: np.ndarray,
        rngs: list[np.random.Generator],
        on_step: StepCallback | None,
        cancel: Callable[[], bool] | None,
        guide: Guide | None = None,
    ) -> np.ndarray:
        scheduler, timesteps = self._scheduler(o)
        scheduler.set_begin_index(start.begin)
        states = np.concatenate([uncond, cond]) if uses_uncond(o.cfg_scale) else cond
        shape = start.latents.shape[1:]

        def noise() -> np.ndarray:
            return np.stack([rng.standard_normal(shape, dtype=np.float32) for rng in rngs])

        x = start.latents
        steps = denoise(
            self.backend,
            scheduler,
            timesteps,
            start,
            states,
            o.cfg_scale,
            noise if scheduler.stochastic else None,
            o.cache_interval,
            None if guide is None else guide.correction(self.backend, scheduler, timesteps, start.begin),
        )
        for i, t, x in steps:
            if on_step is not None:
                on_step(i, t, x)
            if cancel is not None and cancel():
                raise Cancelled(
                    f"cancelled after step {i + 1 - start.begin} of {len(timesteps) - start.begin}"
                )
        return x

    def _guide(self, o: ResolvedOptions, x0: np.ndarray, text_embeds: np.ndarray) -> Guide:
        vision = self.bundle.manifest.vision
        assert vision is not None, "validate checked the bundle"
        return Guide(x0, text_embeds, o.clip_guidance, o.clip_guidance_skip, vision.image_size,
                     self.bundle.vae_scale_factor)  # fmt: skip

    def close(self) -> None:
        self.backend.close()
