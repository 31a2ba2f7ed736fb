"""DeepCache-style step caching (Ma et al., CVPR 2024) for diffusers' SD 1.x UNet.

Adjacent denoising steps change the UNet's deep (low-resolution) features very little. So every
`cache_interval` calls the whole UNet runs and the feature entering one skip branch of its last
up block is kept; the calls in between run only the shallow part and take that feature instead
of computing everything below it.

The skip branch is the one the paper's SD 1.5 experiments use (`--layer 0 --block 0` in its
`experiments/generate.py`): the output of the first (resnet, attention) pair of the first down
block. A shallow call then runs conv_in, the time embedding, that first pair, and the last up
block from the resnet which consumes that branch (with the conv_in branch) on; the cached
feature is the hidden state entering that resnet, before its concatenation with the skip.
For SD 1.5 (2 layers per block) that is up_blocks[3].resnets[1:]; for a 1-layer UNet like the
tiny preset, all of the last up block.

The full step is diffusers' own forward with a hook reading the feature, so its noise
prediction is exactly the uncached one. The shallow step re-implements only the SD 1.x subset
of that forward (no class/added embeddings, no input centring); `check_supported` refuses other
configurations.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

BRANCH = 0  # which (resnet, attention) output of down_blocks[0] is the cached skip branch


def check_supported(unet: Any) -> None:
    """ValueError unless the shallow forward below computes what diffusers' forward would."""
    c = unet.config
    unsupported = {
        "class_embed_type": c.class_embed_type,
        "num_class_embeds": c.num_class_embeds,
        "addition_embed_type": c.addition_embed_type,
        "encoder_hid_dim": c.encoder_hid_dim,
        "time_embedding_act_fn": c.time_embedding_act_fn,
        "center_input_sample": c.center_input_sample or None,
    }
    used = {k: v for k, v in unsupported.items() if v is not None}
    if used:
        raise ValueError(f"step caching supports SD 1.x UNets only; this one sets {used}")
    layers = len(unet.down_blocks[0].resnets)
    if layers <= BRANCH or unet.up_blocks[-1].upsamplers is not None:
        raise ValueError(f"step caching needs > {BRANCH} layers in the first down block; got {layers}")


def _first_cached_resnet(unet: Any) -> int:
    """Index in the last up block of the resnet that consumes the cached branch."""
    return len(unet.down_blocks[0].resnets) - 1 - BRANCH


def feature_channels(unet: Any) -> int:
    """Channels of the cached feature: that resnet's input minus the skip it concatenates."""
    resnet = unet.up_blocks[-1].resnets[_first_cached_resnet(unet)]
    return int(resnet.in_channels) - int(unet.down_blocks[0].resnets[BRANCH].out_channels)


@contextmanager
def _capture(unet: Any, store: list[Tensor]) -> Iterator[None]:
    """Append the cached feature to `store` while diffusers' forward runs."""
    start = _first_cached_resnet(unet)
    up = unet.up_blocks[-1]
    if start == 0:  # the last up block's input: what the block before it returns
        module, pick = unet.up_blocks[-2], lambda out: out
    elif getattr(up, "attentions", None):
        module, pick = up.attentions[start - 1], lambda out: out[0]
    else:
        module, pick = up.resnets[start - 1], lambda out: out
    handle = module.register_forward_hook(lambda _m, _args, out: store.append(pick(out)))
    try:
        yield
    finally:
        handle.remove()


def full_forward(unet: Any, sample: Tensor, timestep: Tensor, states: Tensor) -> tuple[Tensor, Tensor]:
    """(noise_pred, cached feature): the uncached UNet call, also returning the feature."""
    store: list[Tensor] = []
    with _capture(unet, store):  # the class's forward: `cached_unet` may have replaced the instance's
        noise_pred: Tensor = type(unet).forward(unet, sample, timestep, states, return_dict=False)[0]
    if len(store) != 1:
        raise RuntimeError(f"the feature hook fired {len(store)} times in one UNet call")
    return noise_pred, store[0]


def _pair(resnet: nn.Module, attention: nn.Module | None, x: Tensor, temb: Tensor, states: Tensor) -> Tensor:
    x = resnet(x, temb)
    if attention is not None:
        x = attention(x, encoder_hidden_states=states, return_dict=False)[0]
    return x


def shallow_forward(unet: Any, sample: Tensor, timestep: Tensor, states: Tensor, feature: Tensor) -> Tensor:
    """noise_pred from the shallow part only, with the deep part's output given as `feature`."""
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    x = unet.conv_in(sample)
    skips = [x]
    down = unet.down_blocks[0]
    down_attentions = getattr(down, "attentions", None)
    for i in range(BRANCH + 1):
        x = _pair(down.resnets[i], down_attentions[i] if down_attentions else None, x, emb, states)
        skips.append(x)
    up = unet.up_blocks[-1]
    up_attentions = getattr(up, "attentions", None)
    x = feature
    for j in range(_first_cached_resnet(unet), len(up.resnets)):
        x = torch.cat([x, skips.pop()], dim=1)
        x = _pair(up.resnets[j], up_attentions[j] if up_attentions else None, x, emb, states)
    if unet.conv_norm_out is not None:
        x = unet.conv_act(unet.conv_norm_out(x))
    out: Tensor = unet.conv_out(x)
    return out


class FullWrapper(nn.Module):
    """sample, timestep [1], encoder_hidden_states -> noise_pred, deep_feature (specs.py contract)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        check_supported(unet)
        self.unet: Any = unet

    def forward(
        self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor
    ) -> tuple[Tensor, Tensor]:
        return full_forward(self.unet, sample, timestep, encoder_hidden_states)


class ShallowWrapper(nn.Module):
    """sample, timestep [1], encoder_hidden_states, deep_feature -> noise_pred."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        check_supported(unet)
        self.unet: Any = unet

    def forward(
        self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, deep_feature: Tensor
    ) -> Tensor:
        return shallow_forward(self.unet, sample, timestep, encoder_hidden_states, deep_feature)


def is_full_step(index: int, cache_interval: int) -> bool:
    """UNet call `index` (0-based, one per scheduler timestep) runs the whole UNet."""
    return index % cache_interval == 0


@contextmanager
def cached_unet(unet: nn.Module, cache_interval: int) -> Iterator[None]:
    """Make `unet`'s calls follow the caching schedule while inside (diffusers' pipeline calls it
    once per timestep); interval 1 leaves it untouched."""
    if cache_interval == 1:
        yield
        return
    check_supported(unet)
    state: dict[str, Any] = {"calls": 0, "feature": None}

    def forward(
        sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, **kwargs: Any
    ) -> tuple[Tensor]:
        extra = {k: v for k, v in kwargs.items() if v is not None and k != "return_dict"}
        if extra:
            raise ValueError(f"step caching does not support UNet arguments {sorted(extra)}")
        if is_full_step(state["calls"], cache_interval):
            noise_pred, state["feature"] = full_forward(unet, sample, timestep, encoder_hidden_states)
        else:
            noise_pred = shallow_forward(unet, sample, timestep, encoder_hidden_states, state["feature"])
        state["calls"] += 1
        return (noise_pred,)

    unet.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        del unet.forward
