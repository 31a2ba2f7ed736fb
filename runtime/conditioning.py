"""prompts -> (uncond, cond) hidden states for the UNet: CLIP, or compose -> deproject.

Every text of a request goes through CLIP in ONE batched call (negatives, prompts, and for
composition every comma piece plus ""), and the deprojector runs once for all prompts.
Negative prompts always use real CLIP states, never deprojected ones.

With `clip_score` or `clip_guidance`, the prompts' own `text_embeds` come along: from the same
CLIP call in the standard and deproject modes (a chunked prompt's first chunk is its truncated
text), from one more CLIP call of the prompt texts in compose mode (whose call encodes the pieces,
not the prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class PromptStates:
    uncond: np.ndarray  # (P, 77·k, D), one row per prompt
    cond: np.ndarray  # (P, 77·k, D)
    text_embeds: np.ndarray | None  # (P, projection): the prompts' own, with clip_score / clip_guidance


def prompt_states(backend: Backend, tokenizer: ClipTokenizer, options: ResolvedOptions) -> PromptStates:
    """(uncond, cond) states with one row per prompt, and the prompts' text_embeds when asked."""
    prompts, negatives = list(options.prompts), list(options.negative_prompts)
    n = len(prompts)
    embeds = "text_embeds" if options.clip_score or options.clip_guidance > 0 else None
    if options.mode == "standard":
        out = _clip(backend, tokenizer, negatives + prompts, options.long_prompt)
        states = out["last_hidden_state"]
        return PromptStates(states[:n], states[n:], None if embeds is None else out[embeds][n:])
    if options.mode == "deproject":
        out = _clip(backend, tokenizer, negatives + prompts, "truncate")
        pooled = out["pooled"][n:]  # (P, D)
        text_embeds = None if embeds is None else out[embeds][n:]
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
        text_embeds = None if embeds is None else _clip(backend, tokenizer, prompts, "truncate")[embeds]
    cond = backend.run("deprojector", {"pooled": pooled.astype(np.float32)})["hidden_states"]
    return PromptStates(out["last_hidden_state"][:n], cond, text_embeds)
