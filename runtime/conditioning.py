"""prompts -> (uncond, cond) hidden states for the UNet: CLIP, or compose -> deproject.

Every text of a request goes through CLIP in ONE batched call (negatives, prompts, and for
composition every comma piece plus ""), and the deprojector runs once for all prompts.
Negative prompts always use real CLIP states, never deprojected ones.
"""

from __future__ import annotations

import numpy as np

from runtime.backends.base import Backend
from runtime.compose import compose, parse_prompt
from runtime.options import ResolvedOptions
from runtime.tokenizer import ClipTokenizer


def _clip(
    backend: Backend, tokenizer: ClipTokenizer, texts: list[str], long_prompt: str
) -> dict[str, np.ndarray]:
    ids = tokenizer(texts, long_prompt=long_prompt).ids  # (B, 77·k)
    return backend.run("clip", {"input_ids": ids})


def prompt_states(
    backend: Backend, tokenizer: ClipTokenizer, options: ResolvedOptions
) -> tuple[np.ndarray, np.ndarray]:
    """(uncond, cond) states, each (P, 77·k, D) with one row per prompt."""
    prompts, negatives = list(options.prompts), list(options.negative_prompts)
    n = len(prompts)
    if options.mode == "standard":
        states = _clip(backend, tokenizer, negatives + prompts, options.long_prompt)["last_hidden_state"]
        return states[:n], states[n:]
    if options.mode == "deproject":
        out = _clip(backend, tokenizer, negatives + prompts, "truncate")
        pooled = out["pooled"][n:]  # (P, D)
    else:
        pieces = [parse_prompt(p) for p in prompts]
        texts = negatives + [""] + [text for prompt_pieces in pieces for text, _ in prompt_pieces]
        out = _clip(backend, tokenizer, texts, "truncate")
        empty, piece_pooled = out["pooled"][n], out["pooled"][n + 1 :].astype(np.float64)
        rows, start = [], 0
        for prompt_pieces in pieces:
            stop = start + len(prompt_pieces)
            weights = np.array([w for _, w in prompt_pieces])
            rows.append(
                compose(piece_pooled[start:stop], weights, empty, options.compose_mode, options.normalize)
            )
            start = stop
        pooled = np.stack(rows)
    cond = backend.run("deprojector", {"pooled": pooled.astype(np.float32)})["hidden_states"]
    return out["last_hidden_state"][:n], cond
