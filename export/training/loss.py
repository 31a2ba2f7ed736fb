"""The training objective and the held-out measures.

Weighted MSE as upstream's later versions: position 0 (the fixed BOS state) gets weight 0,
positions 1..EOS (the real tokens) weight 5, padding weight 1, rescaled to mean 1 over the 77
positions, so the real tokens dominate without the padding tail being ignored.
"""

from __future__ import annotations

import torch
from torch import Tensor

TOKEN_WEIGHT = 5.0
PADDING_WEIGHT = 1.0


def token_weights(lengths: Tensor, context: int) -> Tensor:
    """(N,) token counts (BOS..EOS) -> (N, L) weights with w_0 = 0 and mean 1 per row."""
    positions = torch.arange(context).unsqueeze(0)  # (1, L)
    eos = (lengths.clamp(1, context) - 1).unsqueeze(1)  # (N, 1) index of EOS
    weights = torch.where(positions <= eos, TOKEN_WEIGHT, PADDING_WEIGHT).to(torch.float32)
    weights[:, 0] = 0.0
    return weights * (context / weights.sum(dim=1, keepdim=True))


def weighted_mse(pred: Tensor, target: Tensor, weights: Tensor) -> Tensor:
    """mean over (N, L, D) of w[n, l] * (pred - target)^2."""
    return ((pred - target).square() * weights.unsqueeze(-1)).mean()


def position_cosine(pred: Tensor, target: Tensor) -> Tensor:
    """Mean cosine similarity over samples and positions 1..L-1 (position 0 is fixed)."""
    return torch.nn.functional.cosine_similarity(pred[:, 1:], target[:, 1:], dim=-1).mean()
