"""Building blocks shared by the deprojector models.

Attention is written out with explicit matmul/softmax (no transformers attention-interface
indirection) so the legacy ONNX tracer sees plain ops. Submodule names mirror
`transformers`' CLIPEncoderLayer, so its state dict (and the published checkpoints) load as is.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.activations import ACT2FN


def activation(name: str) -> nn.Module:
    """The HF activation module for `name` (CLIP uses "quick_gelu"); clear error if unknown."""
    if name not in ACT2FN:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACT2FN.keys())}")
    act: nn.Module = ACT2FN[name]
    return act


class MLP(nn.Module):
    """fc1 -> act -> fc2, the CLIPMLP layout (keys `fc1.*`, `fc2.*`)."""

    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.activation_fn = activation(act)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


class SelfAttention(nn.Module):
    """Multi-head attention with CLIPAttention's parameter names, usable two ways.

    `full` is the ordinary masked pass over a whole sequence; `step` attends one new token
    to a growing K/V cache. In a one-layer causal model, K/V at position j depend only on the
    input at j, so caching them is exact.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} attention heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _heads(self, x: Tensor) -> Tensor:
        # (B, L, D) -> (B, H, L, d)
        return x.reshape(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """K and V of tokens x (B, L, D), each (B, H, L, d)."""
        return self._heads(self.k_proj(x)), self._heads(self.v_proj(x))

    def full(self, x: Tensor, mask: Tensor) -> Tensor:
        """x (B, L, D), additive mask (L, L) -> (B, L, D)."""
        q = self._heads(self.q_proj(x))  # (B, H, L, d)
        k, v = self.kv(x)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale + mask  # (B, H, L, L)
        out = torch.matmul(torch.softmax(scores, dim=-1), v)  # (B, H, L, d)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)  # (B, L, D)
        return self.out_proj(out)

    def step(self, x: Tensor, k_cache: Tensor, v_cache: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One new token x (B, D) against caches (B, H, T, d) -> (out (B, D), caches with T+1)."""
        x = x.unsqueeze(1)  # (B, 1, D)
        q = self._heads(self.q_proj(x))  # (B, H, 1, d)
        k, v = self.kv(x)
        k_cache = torch.cat([k_cache, k], dim=2)  # (B, H, T+1, d)
        v_cache = torch.cat([v_cache, v], dim=2)
        scores = torch.matmul(q, k_cache.transpose(-1, -2)) * self.scale  # (B, H, 1, T+1)
        out = torch.matmul(torch.softmax(scores, dim=-1), v_cache)  # (B, H, 1, d)
        out = out.reshape(out.shape[0], -1)  # (B, D)
        return self.out_proj(out), k_cache, v_cache


class EncoderLayer(nn.Module):
    """Pre-LN transformer layer, CLIPEncoderLayer's math and key names.

    h = x + Attn(LN1 x); y = h + MLP(LN2 h).
    """

    def __init__(self, dim: int, intermediate: int, num_heads: int, eps: float, act: str) -> None:
        super().__init__()
        self.self_attn = SelfAttention(dim, num_heads)
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, intermediate, act)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)

    def _ffn(self, h: Tensor) -> Tensor:
        return h + self.mlp(self.layer_norm2(h))

    def full(self, x: Tensor, mask: Tensor) -> Tensor:
        """x (B, L, D) with additive causal mask (L, L) -> (B, L, D)."""
        return self._ffn(x + self.self_attn.full(self.layer_norm1(x), mask))

    def prefill(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """K/V caches (B, H, L, d) for tokens x (B, L, D) whose outputs are not needed."""
        return self.self_attn.kv(self.layer_norm1(x))

    def step(self, x: Tensor, k_cache: Tensor, v_cache: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One token x (B, D) -> (y (B, D), grown caches)."""
        attn, k_cache, v_cache = self.self_attn.step(self.layer_norm1(x), k_cache, v_cache)
        return self._ffn(x + attn), k_cache, v_cache


class Affine(nn.Module):
    """y = x * scale + shift per channel: what an eval-mode BatchNorm1d is, once folded.

    Used where a BatchNorm cannot be merged into a Linear (a residual sits in between).
    """

    scale: Tensor
    shift: Tensor

    def __init__(self, scale: Tensor, shift: Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift


def causal_mask(length: int, dtype: torch.dtype, device: torch.device | None = None) -> Tensor:
    """(L, L) additive mask: 0 on and below the diagonal, finfo.min above (as upstream)."""
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device)
    return torch.triu(mask, diagonal=1)
