"""Training pairs as tensors: planned samples + cached CLIP encodings -> inputs, targets, weights."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from export.training.augment import Sample
from export.training.cache import Encodings
from export.training.loss import token_weights


@dataclass(frozen=True)
class Pairs:
    inputs: Tensor  # (N, D) pooled-space input b + sum_i (p_i - b)
    targets: Tensor  # (N, L, D) CLIP last_hidden_state of the target text
    weights: Tensor  # (N, L) loss weights

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def take(self, index: Tensor | slice) -> Pairs:
        return Pairs(self.inputs[index], self.targets[index], self.weights[index])


def build_pairs(samples: Sequence[Sample], enc: Encodings) -> Pairs:
    """Stack the samples' inputs (summed in float64) and targets."""
    if not samples:
        raise ValueError("no training samples")
    pooled = enc.pooled.double()
    base = pooled[enc.row[""]]
    inputs = torch.stack(
        [base + sum((pooled[enc.row[p]] - base for p in s.parts), torch.zeros_like(base)) for s in samples]
    )
    targets = enc.states[[enc.state_row[s.target] for s in samples]]
    lengths = enc.lengths[[enc.row[s.target] for s in samples]]
    return Pairs(inputs.float(), targets, token_weights(lengths, targets.shape[1]))
