"""On-disk cache of CLIP encodings, so epochs, resumed runs and re-runs never re-run CLIP.

One directory per key = sha256(model signature, the list of texts and which of them need
hidden states). It holds safetensors shards (`pooled` (n, D), `lengths` (n,), and `states`
(m, L, D) for the m texts of the shard that need them) and `index.json`. Shards are written
into `<key>.partial/` one at a time (each atomically), so an interrupted encoding resumes at
the next shard; the finished directory is renamed into place, and only then is it a hit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from export.training.encode import EncodedBatch

log = logging.getLogger(__name__)

FORMAT = 1
SHARD_TEXTS = 1024
INDEX = "index.json"
PARTIAL_META = "partial.json"


@dataclass(frozen=True)
class Encodings:
    """CLIP outputs for a list of texts; `states` only for the texts flagged as targets."""

    texts: list[str]
    pooled: Tensor  # (N, D)
    lengths: Tensor  # (N,) int64
    states: Tensor  # (M, L, D), M = number of flagged texts, in text order
    row: dict[str, int]  # text -> row of pooled/lengths
    state_row: dict[str, int]  # flagged text -> row of states


def cache_key(model: dict[str, Any], texts: Sequence[str], need_states: Sequence[bool]) -> str:
    """Identity of an encoding job: the CLIP model's signature and exactly what is encoded."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": FORMAT, "model": model}, sort_keys=True).encode())
    for text, flag in zip(texts, need_states, strict=True):
        digest.update(f"{int(flag)}{text}\0".encode())
    return digest.hexdigest()[:32]


def _shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


def _assemble(texts: list[str], need_states: Sequence[bool], shards: list[dict[str, Tensor]]) -> Encodings:
    pooled = torch.cat([s["pooled"] for s in shards])
    lengths = torch.cat([s["lengths"] for s in shards])
    states = torch.cat([s["states"] for s in shards])
    flagged = [t for t, f in zip(texts, need_states, strict=True) if f]
    if pooled.shape[0] != len(texts) or states.shape[0] != len(flagged):
        raise ValueError("CLIP cache shards do not match their index (delete the cache directory)")
    return Encodings(
        texts=texts,
        pooled=pooled,
        lengths=lengths,
        states=states,
        row={t: i for i, t in enumerate(texts)},
        state_row={t: i for i, t in enumerate(flagged)},
    )


def _prepare_partial(partial: Path, shard_texts: int) -> int:
    """Shards already done in `partial` (0 after resetting it when the shard size changed)."""
    meta = partial / PARTIAL_META
    if partial.is_dir() and meta.is_file() and json.loads(meta.read_text()) == {"shard_texts": shard_texts}:
        done = 0
        while (partial / _shard_name(done)).is_file():
            done += 1
        return done
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    meta.write_text(json.dumps({"shard_texts": shard_texts}))
    return 0


def _encode_shard(
    texts: list[str], flags: Sequence[bool], encode: Callable[[list[str]], EncodedBatch], batch: int
) -> dict[str, Tensor]:
    parts = [encode(texts[i : i + batch]) for i in range(0, len(texts), batch)]
    states = torch.cat([p.states for p in parts])
    keep = torch.tensor(list(flags), dtype=torch.bool)
    return {
        "pooled": torch.cat([p.pooled for p in parts]).contiguous(),
        "lengths": torch.cat([p.lengths for p in parts]).contiguous(),
        "states": states[keep].contiguous(),
    }


def load_or_encode(
    cache_dir: Path,
    model: dict[str, Any],
    texts: list[str],
    need_states: Sequence[bool],
    encode: Callable[[list[str]], EncodedBatch],
    *,
    batch: int = 64,
    shard_texts: int = SHARD_TEXTS,
) -> tuple[Encodings, bool]:
    """The encodings of `texts`, from the cache when present (then `encode` is never called).

    Returns (encodings, hit).
    """
    key = cache_key(model, texts, need_states)
    final = cache_dir / key
    if (final / INDEX).is_file():
        index = json.loads((final / INDEX).read_text())
        log.info("CLIP cache hit: %s (%d texts)", final, len(texts))
        return _assemble(texts, need_states, [load_file(final / n) for n in index["shards"]]), True
    partial = cache_dir / f"{key}.partial"
    done = _prepare_partial(partial, shard_texts)
    starts = list(range(0, len(texts), shard_texts))
    with tqdm(total=len(texts), initial=min(done * shard_texts, len(texts)), unit="text", desc="CLIP") as bar:
        for i, start in enumerate(starts[done:], start=done):
            stop = start + shard_texts
            shard = _encode_shard(texts[start:stop], need_states[start:stop], encode, batch)
            tmp = partial / f".{_shard_name(i)}.tmp"
            save_file(shard, str(tmp))
            os.replace(tmp, partial / _shard_name(i))
            bar.update(len(texts[start:stop]))
    names = [_shard_name(i) for i in range(len(starts))]
    index = {"format": FORMAT, "model": model, "count": len(texts), "shards": names}
    (partial / INDEX).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    (partial / PARTIAL_META).unlink()
    if final.exists():  # another process finished the same job first
        shutil.rmtree(partial, ignore_errors=True)
    else:
        os.replace(partial, final)
    log.info("CLIP encodings cached in %s", final)
    return _assemble(texts, need_states, [load_file(final / n) for n in names]), False
