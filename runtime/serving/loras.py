"""A request's LoRAs (the `loras` field, `<lora:name:weight>` tags) -> LoraRefs in the server's folder.

A client names LoRAs the server offers, never a path: each name must be a plain file name
(prompt_tags.check_name) and is looked up only in `--lora-dir`; a server without one refuses
LoRAs. Scales and duplicates are checked here, so that a 422 names the request's field and the
LoRA's name, not the file's place on the server.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from runtime.errors import RequestError
from runtime.lora import MAX_SCALE, LoraRef
from runtime.lora.prompt_tags import lora_path, prompt_loras

MAX_LORAS = 8  # per request: each one is merged into every targeted weight
DIR_FLAG = "the server was started without --lora-dir"


def _scale(value: object, what: str) -> float:
    number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    if math.isfinite(number) and abs(number) <= MAX_SCALE:
        return number
    raise RequestError(
        f"{what} must be a finite number from {-MAX_SCALE:g} to {MAX_SCALE:g}; got {value!r:.40}"
    )


def request_loras(
    prompt: str, named: Sequence[tuple[str, float]], lora_dir: Path | None, field: str = "loras"
) -> tuple[str, tuple[LoraRef, ...]]:
    """(the prompt without its tags, its tags' LoRAs then `named`'s), resolved in `lora_dir`.

    `named`: (name, scale) pairs of the request's `field`; RequestError naming the entry otherwise."""
    texts, tagged = prompt_loras((prompt,), lora_dir, DIR_FLAG)
    if len(tagged) + len(named) > MAX_LORAS:  # before any file is looked up
        raise RequestError(
            f"{field}: at most {MAX_LORAS} LoRAs per request (tags included); got {len(tagged) + len(named)}"
        )
    for ref in tagged:
        _scale(ref.scale, f"prompt: <lora:{ref.path.stem}:...> weight")
    refs = list(tagged)
    if named:
        if lora_dir is None:
            raise RequestError(f"{field}: this server offers no LoRAs ({DIR_FLAG})")
        for i, (name, scale) in enumerate(named):
            what = f"{field}[{i}]"
            refs.append(LoraRef(lora_path(lora_dir, name, f"{what}.name"), _scale(scale, f"{what}.scale")))
    names = [ref.path.stem for ref in refs]
    twice = next((name for k, name in enumerate(names) if name in names[:k]), None)
    if twice is not None:
        raise RequestError(
            f"{field}: LoRA {twice!r} is given twice (tags and {field} count together); give it once "
            "with the summed scale"
        )
    return texts[0], tuple(refs)
