"""VAE: latents -> decoder -> uint8 images (N, H, W, 3); an init image -> encoder -> its latent
distribution. Scaling, the [-1, 1] mapping and clamping live in the graphs."""

from __future__ import annotations

import numpy as np

from runtime.backends.base import Backend


def decode(backend: Backend, latents: np.ndarray) -> np.ndarray:
    """One image at a time: the decoder's activations at 512x512 are large (GBs per image)."""
    images = [
        backend.run("vae_decoder", {"latent": latents[i : i + 1]})["image"] for i in range(len(latents))
    ]
    image = np.concatenate(images)  # (N, 3, H, W) in [0, 1]
    return (image.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)


def encode(backend: Backend, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 (1, 3, H, W) in [0, 1] -> the latent distribution's (mean, std), each (1, 4, h, w) and
    already multiplied by the VAE's scaling factor."""
    out = backend.run("vae_encoder", {"image": image})
    return out["latent_mean"], out["latent_std"]
