"""The UNet loop, as a generator of per-step latents; callers own progress, timing and cancel.

Step caching (`cache_interval` N > 1, export/deepcache.py): UNet call i runs the full graph,
which also returns the deep feature, when i % N == 0, and the shallow graph fed the last
full call's feature otherwise. N = 1 runs the plain `unet` graph on every call.

img2img and inpainting start part-way (`Start.begin`, runtime/start_latents.py); an inpainting UNet
reads the mask and masked-image latents beside the latents, and latent blending re-imposes the
unmasked area after every step.

CLIP guidance's second pass (runtime/clip_guidance.py) passes `correct`, which adjusts the CFG
prediction before the scheduler steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from runtime.backends.base import Backend
from runtime.clip_guidance import Correction
from runtime.guidance import combine, unet_batch
from runtime.schedulers.base import Scheduler
from runtime.specs import DEEP_FEATURE, DEEPCACHE_FULL, DEEPCACHE_SHALLOW
from runtime.start_latents import Start


def unet_models(cache_interval: int) -> list[str]:
    """The bundle models the loop runs."""
    return ["unet"] if cache_interval == 1 else [DEEPCACHE_FULL, DEEPCACHE_SHALLOW]


def denoise(
    backend: Backend,
    scheduler: Scheduler,
    timesteps: np.ndarray,
    start: Start,
    states: np.ndarray,  # (2N or N, 77·k, D): [uncond; cond] when guiding
    guidance: float,
    noise: Callable[[], np.ndarray] | None = None,  # fresh (N, 4, h, w) noise for ancestral steps
    cache_interval: int = 1,
    correct: Correction | None = None,
) -> Iterator[tuple[int, float, np.ndarray]]:
    """Yield (step index, timestep, latents after that step) for steps start.begin, ..., last."""
    feature: np.ndarray | None = None  # the deep feature of the last full call
    latents = start.latents
    extra = None if start.conditioning is None else unet_batch(start.conditioning, guidance)
    for i in range(start.begin, len(timesteps)):
        t = timesteps[i]
        model_input = scheduler.scale_model_input(unet_batch(latents, guidance), i)
        if extra is not None:
            model_input = np.concatenate([model_input, extra], axis=1)
        feeds = {
            "sample": model_input.astype(np.float32, copy=False),
            "timestep": np.array([t], dtype=np.float32),
            "encoder_hidden_states": states,
        }
        if cache_interval == 1:
            prediction = backend.run("unet", feeds)["noise_pred"]
        elif (i - start.begin) % cache_interval == 0:
            outputs = backend.run(DEEPCACHE_FULL, feeds)
            prediction, feature = outputs["noise_pred"], outputs[DEEP_FEATURE]
        else:
            assert feature is not None, "the first call is always a full one"
            prediction = backend.run(DEEPCACHE_SHALLOW, {**feeds, DEEP_FEATURE: feature})["noise_pred"]
        noise_pred = combine(prediction, guidance)
        if correct is not None:
            noise_pred = correct(i, noise_pred, latents)
        latents = scheduler.step(noise_pred, i, latents, noise=noise() if noise else None)
        if start.blend is not None:
            latents = start.blend(scheduler, latents, i)
        yield i, float(t), latents
