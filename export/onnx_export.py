"""PyTorch modules with the bundle's I/O contract, traced to raw ONNX.

The wrappers put runtime/specs.py's names and layouts around the diffusers/transformers models,
so the graph does all the model-specific work (chunking long prompts, VAE scaling) and the
runtime only feeds arrays. Tracing uses the legacy TorchScript exporter (`dynamo=False`): 1 s
instead of 24 s for the tiny UNet and 7 s instead of minutes for the 76-step deprojector. It
specialises any example dim of size 1, so every example input has dims > 1.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import Tensor, nn
from transformers import CLIPTextModel

from runtime.specs import (
    CLIP_VISION,
    CONTEXT_LENGTH,
    DEEPCACHE_FULL,
    DEEPCACHE_SHALLOW,
    LATENT_CHANNELS,
    VAE_SCALE_FACTOR,
    ModelSpec,
)

OPSET = 18
BOS_ID, EOS_ID = 49406, 49407


class ClipWrapper(nn.Module):
    """input_ids [B, 77k] -> last_hidden_state [B, 77k, D], pooled [B, D] (+ text_embeds [B, P]).

    CLIP has 77 positions, so a long prompt runs as k chunks of 77 in the batch dimension.
    pooled is HF's pooler_output (state at the first EOS, after final_layer_norm) of the FIRST
    chunk; text_embeds = pooled @ W_P.T when a projection is known.
    """

    def __init__(self, text_encoder: CLIPTextModel, text_projection: Tensor | None) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.text_projection: Tensor | None
        self.register_buffer("text_projection", None if text_projection is None else text_projection.clone())

    def forward(self, input_ids: Tensor) -> tuple[Tensor, ...]:
        batch = input_ids.shape[0]
        out = self.text_encoder(input_ids=input_ids.reshape(-1, CONTEXT_LENGTH))
        hidden = out.last_hidden_state.shape[-1]
        states = out.last_hidden_state.reshape(batch, -1, hidden)
        pooled = out.pooler_output.reshape(batch, -1, hidden)[:, 0]
        if self.text_projection is None:
            return states, pooled
        return states, pooled, pooled @ self.text_projection.T


class UNetWrapper(nn.Module):
    """sample [B, 4, h, w], timestep [1], encoder_hidden_states [B, 77k, D] -> noise_pred."""

    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        self.unet: Any = unet  # diffusers' lazy imports defeat mypy

    def forward(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor) -> Tensor:
        noise_pred: Tensor = self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]
        return noise_pred


class VaeEncoderWrapper(nn.Module):
    """image [B, 3, H, W] in [0, 1] -> latent_mean, latent_std [B, 4, H/8, W/8], both scaled.

    The [-1, 1] mapping is in the graph (as unscaling is in the decoder's); the runtime samples
    mean + std · noise with its own generator, like diffusers' `latent_dist.sample(generator)`."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae: Any = vae
        self.scaling = float(vae.config.scaling_factor)  # type: ignore[attr-defined]

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        posterior = self.vae.encode(2.0 * image - 1.0).latent_dist
        return posterior.mean * self.scaling, posterior.std * self.scaling


class VaeDecoderWrapper(nn.Module):
    """latent [B, 4, h, w] -> image [B, 3, 8h, 8w] in [0, 1]: unscaling and clamping in the graph."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae: Any = vae
        self.scaling = float(vae.config.scaling_factor)  # type: ignore[attr-defined]

    def forward(self, latent: Tensor) -> Tensor:
        image: Tensor = self.vae.decode(latent / self.scaling, return_dict=False)[0]
        return ((image + 1) / 2).clamp(0, 1)


class ClipVisionWrapper(nn.Module):
    """pixel_values [B, 3, S, S] (CLIP-preprocessed) -> image_embeds [B, P].

    The vision model's pooled output (the class token after post_layernorm) through
    visual_projection, as CLIPVisionModelWithProjection's image_embeds and the safety checker's
    embedding; not normalized (the runtime normalizes before the CLIP score's cosine)."""

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module) -> None:
        super().__init__()
        self.vision_model: Any = vision_model
        self.visual_projection = visual_projection

    def forward(self, pixel_values: Tensor) -> Tensor:
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        image_embeds: Tensor = self.visual_projection(pooled)
        return image_embeds


def example_ids(batch: int, tokens: int, seed: int = 0) -> Tensor:
    """Plausible token ids: each 77-chunk is BOS, words, EOS, EOS padding (int32)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, tokens), EOS_ID, dtype=torch.int32)
    for chunk in range(0, tokens, CONTEXT_LENGTH):
        lengths = torch.randint(1, CONTEXT_LENGTH - 1, (batch,), generator=gen)
        for row, n in enumerate(lengths.tolist()):
            ids[row, chunk] = BOS_ID
            ids[row, chunk + 1 : chunk + 1 + n] = torch.randint(
                0, BOS_ID, (n,), generator=gen, dtype=torch.int32
            )
    return ids


def example_inputs(
    name: str,
    hidden: int,
    feature_channels: int = 0,
    unet_channels: int = LATENT_CHANNELS,
    image_size: int = 0,
) -> tuple[Tensor, ...]:
    """Trace inputs for model `name`: batch 2, two prompt chunks, a non-square 16x24 latent
    (`feature_channels`: the cached feature's, for the step-caching shallow UNet; `unet_channels`:
    the UNet's input channels, 9 for an inpainting UNet; `image_size`: the CLIP image tower's side)."""
    gen = torch.Generator().manual_seed(0)
    if name == CLIP_VISION:  # normalized pixels: roughly zero mean, unit spread
        return (torch.randn(2, 3, image_size, image_size, generator=gen),)
    if name == "clip":
        return (example_ids(2, 2 * CONTEXT_LENGTH),)
    if name == "deprojector":
        return (torch.randn(2, hidden, generator=gen),)
    if name == "vae_encoder":
        return (torch.rand(2, 3, 16 * VAE_SCALE_FACTOR, 24 * VAE_SCALE_FACTOR, generator=gen),)
    latent = torch.randn(2, LATENT_CHANNELS, 16, 24, generator=gen)
    sample = torch.randn(2, unet_channels, 16, 24, generator=gen)
    unet = sample, torch.tensor([999.0]), torch.randn(2, 2 * CONTEXT_LENGTH, hidden, generator=gen)
    if name in ("unet", DEEPCACHE_FULL):
        return unet
    if name == DEEPCACHE_SHALLOW:
        return (*unet, torch.randn(2, feature_channels, 16, 24, generator=gen))
    if name == "vae_decoder":
        return (latent,)
    raise ValueError(f"unknown model {name!r}")


def export_onnx(module: nn.Module, args: tuple[Tensor, ...], spec: ModelSpec, path: Path) -> None:
    """Trace `module` to `path` (opset 18) with the spec's names and symbolic dims.

    Above 2 GB the legacy exporter writes one file per tensor next to `path`; onnx_io.save
    later gathers them into a single data file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes(),
            do_constant_folding=True,
        )
