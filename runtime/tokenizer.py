"""prompt -> int32 ids (B, 77·k), identical to transformers' CLIPTokenizer.

Reads the bundle's `tokenizer.json` with the `tokenizers` library (no transformers). Padding
and truncation are done here, not by the tokenizer file, because long prompts are either
truncated (with a warning naming the dropped text) or split into 75-token chunks, each wrapped
in BOS/EOS, as A1111 does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from runtime.specs import CONTEXT_LENGTH

log = logging.getLogger(__name__)

LONG_PROMPT_MODES = ("truncate", "chunk")
_BODY = CONTEXT_LENGTH - 2  # tokens between BOS and EOS


@dataclass(frozen=True)
class TokenizedPrompts:
    ids: np.ndarray  # (B, 77·k) int32
    truncated: tuple[str, ...]  # per prompt: the text that was dropped ("" when none)


class ClipTokenizer:
    def __init__(self, tokenizer_dir: Path, bos_id: int, eos_id: int, pad_id: int):
        self._tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
        self._tok.no_padding()
        self._tok.no_truncation()
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id

    def _body(self, prompt: str) -> list[int]:
        """Token ids without BOS/EOS."""
        ids = self._tok.encode(prompt).ids
        return [i for i in ids if i not in (self.bos_id, self.eos_id)]

    def _decode(self, ids: list[int]) -> str:
        """Ids -> text; CLIP marks word ends with '</w>', which the byte-level decoder keeps."""
        return self._tok.decode(ids).replace("</w>", " ").strip() if ids else ""

    def _window(self, body: list[int]) -> list[int]:
        ids = [self.bos_id, *body[:_BODY], self.eos_id]
        return ids + [self.pad_id] * (CONTEXT_LENGTH - len(ids))

    def __call__(
        self, prompts: list[str], long_prompt: str = "truncate", max_chunks: int = 3
    ) -> TokenizedPrompts:
        if long_prompt not in LONG_PROMPT_MODES:
            raise ValueError(
                f"long_prompt must be one of {', '.join(LONG_PROMPT_MODES)}; got {long_prompt!r}"
            )
        bodies = [self._body(p) for p in prompts]
        if long_prompt == "chunk":
            chunks = max(1, *(-(-len(b) // _BODY) for b in bodies))
            chunks = min(chunks, max_chunks)
        else:
            chunks = 1
        rows, dropped = [], []
        for body in bodies:
            keep = chunks * _BODY
            windows = [self._window(body[i * _BODY : (i + 1) * _BODY]) for i in range(chunks)]
            rows.append([i for w in windows for i in w])
            lost = self._decode(body[keep:])
            if lost:
                log.warning("prompt is longer than %d tokens; dropped: %r", keep, lost)
            dropped.append(lost)
        return TokenizedPrompts(np.asarray(rows, dtype=np.int32), tuple(dropped))
