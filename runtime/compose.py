"""Prompt composition in pooled-embedding space (numpy only; shared by runtime and reference).

A prompt is split on commas; each piece is encoded by CLIP on its own and the pooled vectors
are merged into one, which the deprojector turns back into 77 hidden states. Rules follow
upstream `PooledEncoding` (pipeline_layered_diffusion.py), plus per-piece weights:

  sum:        m = sum_i x_i              with x_i = w_i p_i
  diff_only:  m = b + sum_i x_i          with x_i = w_i (p_i - b),  b = pooled("")
  normalize:  m <- m * mean_i ||x_i|| / ||m||

For diff_only the norms averaged are those of the differences x_i, while the vector rescaled
is the whole m (b included): upstream rebinds its list to the differences before computing
the coefficient and then scales `merged_embeds`, which already holds + b.
"""

from __future__ import annotations

import math
import re

import numpy as np

MODES = ("sum", "diff_only")

_WEIGHTED = re.compile(r"\((?P<text>.*):(?P<weight>[^:()]*)\)", re.DOTALL)
_DANGLING = re.compile(r":\s*[-+]?[0-9.]+(?:[eE][-+]?[0-9]+)?\s*\)$")


def _parse_weight(piece: str, text: str, weight: str) -> tuple[str, float]:
    text = text.strip()
    if not text:
        raise ValueError(f"weighted prompt piece {piece!r} has no text before ':'")
    try:
        value = float(weight.strip())
    except ValueError:
        raise ValueError(f"malformed weight {weight.strip()!r} in prompt piece {piece!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"weight must be finite in prompt piece {piece!r}, got {value}")
    return text, value


def parse_prompt(prompt: str) -> list[tuple[str, float]]:
    """Split on commas into (text, weight) pieces; "(cat:1.3)" gives ("cat", 1.3), else 1.0.

    Pieces are stripped and empty ones dropped. Only a whole piece of the form
    "(text:number)" is weighted; other text, parentheses included, is kept as is. A piece
    that opens "(" with a ':' but never closes, or ends ":number)" without the opening "(",
    is reported as malformed (a comma inside a weighted group splits it, for example).
    """
    pieces: list[tuple[str, float]] = []
    for raw in prompt.split(","):
        piece = raw.strip()
        if not piece:
            continue
        match = _WEIGHTED.fullmatch(piece)
        if match:
            pieces.append(_parse_weight(piece, match["text"], match["weight"]))
        elif (piece.startswith("(") and ":" in piece) or _DANGLING.search(piece):
            raise ValueError(f"malformed weighted prompt piece {piece!r}: expected '(text:weight)'")
        else:
            pieces.append((piece, 1.0))
    return pieces


def compose(
    pieces: np.ndarray,
    weights: np.ndarray,
    empty: np.ndarray,
    mode: str = "sum",
    normalize: bool = False,
) -> np.ndarray:
    """Merge N pooled embeddings (N, D) with weights (N,) into one (D,); b = `empty` (D,).

    Defaults match upstream PooledEncoding (diff_only=False, normalize=False).

    Computed in float64, returned in the dtype of `pieces`. See the module docstring for the
    rules; `normalize` needs a non-zero merged vector.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    p = np.asarray(pieces)
    w = np.asarray(weights, dtype=np.float64)
    b = np.asarray(empty, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"pieces must be (N, D) with N >= 1, got shape {p.shape}")
    n, d = p.shape
    if w.shape != (n,):
        raise ValueError(f"weights must have shape ({n},), got {w.shape}")
    if b.shape != (d,):
        raise ValueError(f"empty must have shape ({d},), got {b.shape}")
    p64 = p.astype(np.float64)
    if mode == "sum":
        terms = w[:, None] * p64  # (N, D)
        merged = terms.sum(axis=0)
    else:
        terms = w[:, None] * (p64 - b)  # (N, D)
        merged = b + terms.sum(axis=0)
    if normalize:
        norm = float(np.linalg.norm(merged))
        if norm == 0.0:
            raise ValueError("cannot normalize: the merged embedding is zero")
        merged = merged * (float(np.linalg.norm(terms, axis=1).mean()) / norm)
    out_dtype = p.dtype if np.issubdtype(p.dtype, np.floating) else np.float64
    return merged.astype(out_dtype)
