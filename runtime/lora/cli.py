"""`--lora PATH[:SCALE]` and `--lora-dir DIR` of `python -m runtime.generate`: flags -> LoraRefs.

The command line may name any file (it is the user's own machine); prompt tags name files in
`--lora-dir` only (runtime/lora/prompt_tags.py). Errors name the flag (exit 2).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

from runtime.errors import RequestError
from runtime.lora import LoraRef, check_refs
from runtime.lora.prompt_tags import SUFFIX, prompt_loras


def parse_lora(text: str) -> LoraRef:
    """'style.safetensors:0.8' -> LoraRef; a path alone has scale 1.0. The scale is what follows
    the last ':' when that parses as a number, so a path with ':' in it needs no quoting."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            scale = float(tail)
        except ValueError:
            if path.endswith(SUFFIX):
                raise ValueError(f"SCALE {tail!r:.40} of {text!r:.80} is not a number") from None
        else:
            if not math.isfinite(scale):
                raise ValueError(f"SCALE of {text!r:.80} must be finite")
            return LoraRef(Path(path), scale)
    if not text:
        raise ValueError("give a file: PATH[:SCALE]")
    return LoraRef(Path(text), 1.0)


def lora_argument(text: str) -> LoraRef:
    """`parse_lora` as an argparse `type=` (exit 2, `argument --lora: ...`)."""
    try:
        return parse_lora(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cli_loras(
    prompts: Sequence[str], flags: Sequence[LoraRef], lora_dir: Path | None
) -> tuple[tuple[str, ...], tuple[LoraRef, ...]]:
    """(prompts without their <lora:...> tags, the tags' LoRAs then the --lora ones).

    Checked here so that the message names the flag; `validate` checks the whole set again."""
    if lora_dir is not None and not lora_dir.is_dir():
        raise RequestError(f"--lora-dir: {lora_dir} is not a folder")
    try:
        given = check_refs(tuple(flags))
    except RequestError as exc:
        raise RequestError(f"--lora: {exc}") from None
    texts, tagged = prompt_loras(prompts, lora_dir, "--lora-dir")
    return texts, tagged + given
