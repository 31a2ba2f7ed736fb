"""CLIP text encoding for training pairs: pooled output, last_hidden_state and token count."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import CLIPTokenizer

CONTEXT = 77


@dataclass(frozen=True)
class EncodedBatch:
    pooled: Tensor  # (N, D) pooler_output: the EOS state after final_layer_norm
    states: Tensor  # (N, L, D) last_hidden_state
    lengths: Tensor  # (N,) int64 tokens through EOS (BOS and EOS included), capped at L


def token_fitter(tokenizer: CLIPTokenizer, context: int = CONTEXT) -> Callable[[str], bool]:
    """`fits(text)`: True when the text tokenizes (with BOS/EOS) into `context` tokens."""

    def fits(text: str) -> bool:
        return len(tokenizer(text, truncation=False)["input_ids"]) <= context

    return fits


def clip_encoder(
    text_encoder: nn.Module, tokenizer: CLIPTokenizer, device: str = "cpu", context: int = CONTEXT
) -> Callable[[list[str]], EncodedBatch]:
    """A function encoding a list of texts with the CLIP text model (padded/truncated to 77)."""

    def encode(texts: list[str]) -> EncodedBatch:
        tokens = tokenizer(
            texts, padding="max_length", max_length=context, truncation=True, return_tensors="pt"
        )
        with torch.no_grad():
            out = text_encoder(input_ids=tokens["input_ids"].to(device))
        return EncodedBatch(
            pooled=out.pooler_output.detach().float().cpu(),
            states=out.last_hidden_state.detach().float().cpu(),
            lengths=tokens["attention_mask"].sum(dim=1).to(torch.int64),
        )

    return encode
