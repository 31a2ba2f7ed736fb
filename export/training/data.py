"""Captions -> augmented training and held-out pairs, through the CLIP cache."""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from transformers import CLIPTokenizer

from export.training.augment import Sample, plan_samples, texts_to_encode
from export.training.cache import load_or_encode
from export.training.encode import clip_encoder, token_fitter
from export.training.pairs import Pairs, build_pairs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairData:
    train: Pairs
    held_out: Pairs
    cache_hit: bool
    kinds: dict[str, int]  # training samples per augmentation kind


def plan_parts(
    captions: Sequence[str], holdout: int, seed: int, tokenizer: CLIPTokenizer
) -> tuple[list[Sample], list[Sample]]:
    """Training and held-out samples. The last `holdout` captions are held out (as upstream's
    last 100 of each part) and planned separately, so no combine crosses the boundary."""
    if not 1 <= holdout < len(captions):
        raise ValueError(
            f"holdout must be in [1, {len(captions) - 1}] for {len(captions)} captions, got {holdout}"
        )
    rng = random.Random(seed)
    fits = token_fitter(tokenizer)
    train = plan_samples(captions[:-holdout], rng, fits, add_empty=True)
    held_out = plan_samples(captions[-holdout:], rng, fits, add_empty=False)
    return train, held_out


def training_pairs(
    captions: Sequence[str],
    *,
    holdout: int,
    seed: int,
    text_encoder: nn.Module,
    tokenizer: CLIPTokenizer,
    model_signature: dict[str, Any],
    cache_dir: Path,
    encode_batch: int = 64,
    device: str = "cpu",
) -> PairData:
    """Plan the augmentation, encode every needed text once (or read the cache), build pairs."""
    train, held_out = plan_parts(captions, holdout, seed, tokenizer)
    texts, need_states = texts_to_encode([*train, *held_out])
    encode = clip_encoder(text_encoder.to(device), tokenizer, device)
    enc, hit = load_or_encode(cache_dir, model_signature, texts, need_states, encode, batch=encode_batch)
    kinds: dict[str, int] = dict(Counter[str](s.kind for s in train))
    log.info(
        "%d training pairs %s, %d held out; %d texts encoded", len(train), kinds, len(held_out), len(texts)
    )
    return PairData(build_pairs(train, enc), build_pairs(held_out, enc), hit, kinds)
