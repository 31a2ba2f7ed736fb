"""How an image's parameters text names its LoRAs, as A1111 1.x writes it, so A1111 (and sites
that read its infotext, such as Civitai) recognise them.

A1111 keeps the `<lora:name:weight>` tags in the prompt line and adds `Lora hashes: "name: HASH, ..."`
(extensions-builtin/Lora/extra_networks_lora.py), HASH being the first 12 hex digits of the file's
`sshs_model_hash` metadata if it has one, else of kohya's "addnet" hash: sha256 of the file after
its safetensors header, i.e. of the tensor data alone (modules/hashes.py `addnet_hash_safetensors`),
so editing metadata does not change it. The tags are written here at the end of the prompt line,
whether the request gave them as tags or as `--lora` / `loras`: reading the text back gives the
same LoRA set either way.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from runtime.errors import RequestError
from runtime.lora import LoraRef

SHORT = 12  # hex digits A1111 shows
_CHUNK = 1 << 20
_MAX_HEADER = 100 << 20  # the safetensors format's own limit on its JSON header
_cache: dict[tuple[str, int, int, int], str] = {}  # (path, inode, size, mtime_ns) -> short hash
_lock = threading.Lock()


def _header(f: BinaryIO, path: Path) -> tuple[int, dict[str, object]]:
    """(bytes before the tensor data, the header's __metadata__) of an open safetensors file."""
    raw = f.read(8)
    if len(raw) != 8:
        raise RequestError(f"lora {path}: not a safetensors file (shorter than its 8-byte header length)")
    (size,) = struct.unpack("<Q", raw)
    if size > _MAX_HEADER:
        raise RequestError(f"lora {path}: not a safetensors file (header length {size})")
    try:
        header = json.loads(f.read(size))
    except ValueError as exc:
        raise RequestError(f"lora {path}: not a safetensors file (unreadable header: {exc})") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return 8 + size, metadata if isinstance(metadata, dict) else {}


def short_hash(path: Path) -> str:
    """A1111's short hash of a LoRA file, computed once per file version (path, inode, size, mtime)."""
    try:
        stat = os.stat(path)
        key = (str(Path(path).resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        with _lock:
            if key in _cache:
                return _cache[key]
        with open(path, "rb") as f:
            start, metadata = _header(f, path)
            given = metadata.get("sshs_model_hash")
            if isinstance(given, str) and given:
                value = given[:SHORT]
            else:
                f.seek(start)
                digest = hashlib.sha256()
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
                value = digest.hexdigest()[:SHORT]
    except OSError as exc:
        raise RequestError(f"lora {path}: cannot read it: {exc.strerror or exc}") from None
    with _lock:
        _cache[key] = value
    return value


def prompt_with_tags(prompt: str, loras: Sequence[LoraRef]) -> str:
    """The prompt with a `<lora:name:weight>` tag per LoRA appended (name: the file's stem)."""
    return prompt + "".join(f"<lora:{ref.path.stem}:{float(ref.scale)!r}>" for ref in loras)


def lora_hashes(loras: Sequence[LoraRef]) -> str:
    """The value of A1111's `Lora hashes` field, quoted as A1111 quotes a value with `:` or `,`."""
    names = [ref.path.stem.replace(":", "").replace(",", "") for ref in loras]
    text = ", ".join(f"{name}: {short_hash(ref.path)}" for name, ref in zip(names, loras, strict=True))
    return json.dumps(text, ensure_ascii=False)
