"""Split/combine augmentation: which texts make each training pair (upstream GenerateData).

The deprojector must also map *composed* embeddings (b + sum_i (p_i - b), see
runtime/compose.py) to sensible states, so besides plain pairs it is shown:
  split    a caption cut at a random word boundary; input = b + (p_1 - b) + (p_2 - b),
           target = the full caption's states
  combine  a caption joined with the next one; input = b + (p_1 - b) + (p_2 - b),
           target = the joined text's states; the next caption is then used up
with b = pooled(""). Shares per caption: 40% normal, 30% split, 30% combine. A caption that
truncates is always normal; a combine that would truncate falls back to split, and a split
of a one-word caption falls back to normal. The empty text is added once per part.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

Kind = Literal["normal", "split", "combine"]
NORMAL_SHARE = 0.4
SPLIT_SHARE = 0.3  # combine takes the rest


@dataclass(frozen=True)
class Sample:
    """One pair: input = b + sum(pooled(part) - b) over `parts`; target = states of `target`."""

    kind: Kind
    parts: tuple[str, ...]
    target: str


def split_at_word(text: str, rng: random.Random) -> tuple[str, str] | None:
    """The text cut at a uniformly chosen word boundary, or None for a single word."""
    words = text.split()
    if len(words) < 2:
        return None
    cut = rng.randint(1, len(words) - 1)
    return " ".join(words[:cut]), " ".join(words[cut:])


def _split_or_normal(text: str, rng: random.Random) -> Sample:
    halves = split_at_word(text, rng)
    if halves is None:
        return Sample("normal", (text,), text)
    return Sample("split", halves, text)


def plan_samples(
    captions: Sequence[str],
    rng: random.Random,
    fits: Callable[[str], bool],
    *,
    add_empty: bool = True,
) -> list[Sample]:
    """The pairs for one part of the corpus, in caption order.

    `fits(text)` says whether the text tokenizes into the context without truncation.
    """
    samples = [Sample("normal", ("",), "")] if add_empty else []
    i = 0
    while i < len(captions):
        text = captions[i]
        i += 1
        draw = rng.random()
        if draw < NORMAL_SHARE or not fits(text):
            samples.append(Sample("normal", (text,), text))
        elif draw < NORMAL_SHARE + SPLIT_SHARE:
            samples.append(_split_or_normal(text, rng))
        else:
            following = captions[i] if i < len(captions) else None
            joined = f"{text} {following}"
            if following is not None and fits(following) and fits(joined):
                samples.append(Sample("combine", (text, following), joined))
                i += 1  # the next caption was used up
            else:
                samples.append(_split_or_normal(text, rng))
    return samples


def texts_to_encode(samples: Sequence[Sample]) -> tuple[list[str], list[bool]]:
    """Every distinct text the samples need (first-seen order, "" always included) and, per
    text, whether its hidden states are needed (targets) or only its pooled vector (parts)."""
    needs: dict[str, bool] = {"": False}
    for s in samples:
        for part in s.parts:
            needs.setdefault(part, False)
        needs[s.target] = True
    return list(needs), list(needs.values())
