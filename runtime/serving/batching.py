"""Micro-batching: run requests of the same shape as one `Pipeline.generate` call.

Only requests whose merged run gives each of them exactly the images it would get alone are
merged: one prompt each; equal size, steps, guidance, scheduler, mode, compose settings and
cache interval, clip_score and LoRA set;
a deterministic scheduler (an ancestral one draws per-step noise from the call's seed + row,
which a merge would reassign); truncated prompts (chunked prompts pad to the longest in a call);
no caller-supplied latents, no init image. Each request's initial noise is drawn from its own seeds here, the
way the pipeline draws it, and passed in as `latents`.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import replace

import numpy as np

from runtime.bundle import Bundle
from runtime.options import ResolvedOptions
from runtime.pipeline import Result
from runtime.schedulers import make_scheduler


def batch_key(options: ResolvedOptions, bundle: Bundle) -> Hashable | None:
    """What merged requests must share; None: this request always runs alone. `options` are validated."""
    o = options
    if len(o.prompts) != 1 or o.latents is not None or o.long_prompt != "truncate":
        return None
    if o.init_image is not None:  # its latents come from its own image (and mask)
        return None
    if make_scheduler(o.scheduler, bundle.scheduler_config).stochastic:
        return None
    return (o.height, o.width, o.steps, o.cfg_scale, o.scheduler, o.mode, o.compose_mode, o.normalize,
            o.num_images, o.cache_interval, o.clip_score, o.loras, o.clip_guidance,
            o.clip_guidance_skip)  # fmt: skip


def merge(batch: list[ResolvedOptions], bundle: Bundle) -> ResolvedOptions:
    """One call for all: prompt k's rows are request k's images (the pipeline is prompt-major)."""
    first = batch[0]
    return replace(
        first,
        prompts=tuple(o.prompts[0] for o in batch),
        negative_prompts=tuple(o.negative_prompts[0] for o in batch),
        latents=np.concatenate(
            [o.initial_latents(bundle.latent_channels, bundle.vae_scale_factor) for o in batch]
        ),
    )


def split(result: Result, batch: list[ResolvedOptions]) -> list[Result]:
    """The merged result, cut back into one Result per request, with that request's seeds."""
    n = batch[0].num_images
    return [
        Result(
            images=result.images[k * n : (k + 1) * n],
            seeds=o.seeds,
            options=o,
            timings=dict(result.timings),
            clip_scores=None if result.clip_scores is None else result.clip_scores[k * n : (k + 1) * n],
        )
        for k, o in enumerate(batch)
    ]
