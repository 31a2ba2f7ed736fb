"""A1111's `<lora:name:weight>` prompt syntax: tags out of the prompt, names resolved in a LoRA folder.

As A1111 (modules/extra_networks.py, extensions-builtin/Lora): a tag is `<lora:NAME>` or
`<lora:NAME:WEIGHT>` (weight 1.0 when left out), it is removed from the prompt text (the rest of
the prompt is kept as written) and `NAME` is a file name without `.safetensors` in the LoRA folder.
Also as A1111, only the positive prompt is read: a tag in a negative prompt is plain text there.
Stricter than A1111, which ignores what it cannot use: a malformed tag, another extra-network type
(`<hypernet:...>`), separate text-encoder / UNet weights (`<lora:name:0.8:0.5>`, `te=`, `unet=`) and
prompts naming different LoRA sets in one run (A1111 silently takes the first prompt's) are refused
with the allowed form, and so is a name with a path in it: a name never leaves the folder.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import RequestError
from runtime.lora import LoraRef

SUFFIX = ".safetensors"
FORM = "<lora:NAME> or <lora:NAME:WEIGHT> (WEIGHT a number, 1.0 when left out)"
_TAG = re.compile(r"<(\w+):([^>]+)>")  # A1111's re_extra_net: any extra network, `<type:args>`
_OPENING = re.compile(r"<lora:", re.IGNORECASE)  # where a tag was meant, parsed or not
MAX_NAME = 255  # bytes of one file name, less the suffix, on common file systems
MAX_LISTED = 20  # names shown when one is missing


@dataclass(frozen=True)
class LoraTag:
    """One `<lora:...>` tag of a prompt: the LoRA's name in the folder and its weight."""

    name: str
    scale: float
    text: str  # as written, for messages


def check_name(name: str, what: str) -> str:
    """`name` if it can only mean a file directly in the LoRA folder; RequestError naming `what`.

    No path separators, no `..` or hidden names, no NUL or control characters: a client of the
    server names a LoRA the server offers, never a path on it."""
    if not isinstance(name, str) or not name:
        raise RequestError(f"{what}: a LoRA name must be non-empty text; got {name!r:.60}")
    bad = next((c for c in name if c in "/\\" or ord(c) < 32 or ord(c) == 127), None)
    if bad is not None or name.startswith(".") or name != name.strip():
        why = f"character {bad!r}" if bad is not None else "leading/trailing space or dot"
        raise RequestError(
            f"{what}: LoRA name {name!r:.60} is not a plain file name ({why}); give the file's name "
            f"without {SUFFIX}, as listed in the LoRA folder"
        )
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME:
        raise RequestError(f"{what}: LoRA name is longer than {MAX_NAME} bytes")
    return name


def _weight(text: str, tag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise RequestError(f"prompt: {tag!r:.80}: weight {text!r:.40} is not a number; use {FORM}") from None
    if not math.isfinite(value):
        raise RequestError(f"prompt: {tag!r:.80}: weight must be finite; got {text!r:.40}")
    return value


def _tag(match: re.Match[str]) -> LoraTag:
    text, kind, args = match.group(0), match.group(1), match.group(2)
    if kind != "lora":
        raise RequestError(f"prompt: {text!r:.80}: only LoRA tags are supported, written {FORM}")
    items = [item.strip() for item in args.split(":")]
    if len(items) > 2 or any("=" in item for item in items[1:]):
        raise RequestError(
            f"prompt: {text!r:.80}: separate text-encoder / UNet weights and named arguments (te=, "
            f"unet=, dyn=) are not supported; use {FORM}"
        )
    name = check_name(items[0], f"prompt: {text!r:.80}")
    return LoraTag(name, _weight(items[1], text) if len(items) == 2 else 1.0, text)


def split_tags(prompt: str) -> tuple[str, tuple[LoraTag, ...]]:
    """(the prompt without its tags, the tags in prompt order); RequestError for a malformed tag.

    The text around a tag stays as it is, as A1111 leaves it ("a cat, <lora:x:1>, hat" -> "a cat, , hat")."""
    tags = tuple(_tag(m) for m in _TAG.finditer(prompt))
    rest = _TAG.sub("", prompt)
    leftover = _OPENING.search(rest)
    if leftover is not None:
        fragment = rest[leftover.start() : leftover.start() + 60]
        raise RequestError(f"prompt: malformed LoRA tag {fragment!r}; use {FORM}")
    return rest, tags


def lora_path(lora_dir: Path, name: str, what: str) -> Path:
    """`<lora_dir>/<name>.safetensors`, which must exist; RequestError naming `what` and listing
    what the folder has otherwise."""
    path = lora_dir / f"{check_name(name, what)}{SUFFIX}"
    if not path.is_file():
        names = available(lora_dir)
        listed = ", ".join(names[:MAX_LISTED]) + (", ..." if len(names) > MAX_LISTED else "")
        raise RequestError(
            f"{what}: no LoRA named {name!r:.60} (no file {path.name!r:.80} in the LoRA folder); "
            f"available: {listed or 'none'}"
        )
    return path


def available(lora_dir: Path) -> list[str]:
    """The LoRA names the folder offers (its .safetensors files' stems), sorted."""
    try:
        return sorted(p.stem for p in lora_dir.iterdir() if p.suffix == SUFFIX and p.is_file())
    except OSError:
        return []


def prompt_loras(
    prompts: Sequence[str], lora_dir: Path | None, dir_setting: str
) -> tuple[tuple[str, ...], tuple[LoraRef, ...]]:
    """(prompts without their tags, the LoRAs the tags name, resolved in `lora_dir`).

    One generation runs one LoRA set, so every prompt must name the same tags (or none may have
    any); `dir_setting` names where the folder is set (`--lora-dir`) for the message when it is not."""
    split = [split_tags(p) for p in prompts]
    texts = tuple(text for text, _ in split)
    sets = {tuple((t.name, t.scale) for t in tags) for _, tags in split}
    if len(sets) > 1:
        raise RequestError(
            "prompt: the prompts name different <lora:...> sets; one run applies one set to every "
            "prompt: give the same tags in each prompt, or run them separately"
        )
    tags = split[0][1] if split else ()
    if not tags:
        return texts, ()
    if lora_dir is None:
        raise RequestError(
            f"prompt: {tags[0].text!r:.80} names a LoRA, but no LoRA folder is set ({dir_setting})"
        )
    return texts, tuple(
        LoraRef(lora_path(lora_dir, t.name, f"prompt: {t.text!r:.80}"), t.scale) for t in tags
    )
