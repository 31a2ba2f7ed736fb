"""The UNet loop, as a generator of per-step latents; callers own progress, timing and cancel."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from runtime.backends.base import Backend
from runtime.guidance import combine, unet_batch
from runtime.schedulers.base import Scheduler


def denoise(
    backend: Backend,
    scheduler: Scheduler,
    timesteps: np.ndarray,
    latents: np.ndarray,  # (N, 4, h, w), already scaled by init_noise_sigma
    states: np.ndarray,  # (2N or N, 77·k, D): [uncond; cond] when guiding
    guidance: float,
    noise: Callable[[], np.ndarray] | None = None,  # fresh (N, 4, h, w) noise for ancestral steps
) -> Iterator[tuple[int, float, np.ndarray]]:
    """Yield (step index, timestep, latents after that step)."""
    for i, t in enumerate(timesteps):
        model_input = scheduler.scale_model_input(unet_batch(latents, guidance), i)
        feeds = {
            "sample": model_input.astype(np.float32, copy=False),
            "timestep": np.array([t], dtype=np.float32),
            "encoder_hidden_states": states,
        }
        noise_pred = combine(backend.run("unet", feeds)["noise_pred"], guidance)
        latents = scheduler.step(noise_pred, i, latents, noise=noise() if noise else None)
        yield i, float(t), latents
