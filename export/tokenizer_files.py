"""The real CLIP BPE tokenizer, built offline.

The merges ship inside the `open-clip-torch` wheel (`open_clip/bpe_simple_vocab_16e6.txt.gz`).
We locate that file with `importlib.util.find_spec`, which does not execute open_clip (it would
import torch and torchvision), and rebuild vocab.json / merges.txt exactly as OpenAI's
SimpleTokenizer does. transformers' CLIPTokenizer then loads the folder and writes the
`tokenizer.json` the torch-free runtime reads.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from runtime.files import write_atomic

VOCAB_SIZE = 49408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_N_MERGES = 49152 - 256 - 2  # as in open_clip's SimpleTokenizer


def find_bpe_file() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "open_clip's BPE file is needed to build the CLIP tokenizer offline: "
            "run `pip install --no-deps open-clip-torch` (scripts/bootstrap.sh does)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _BPE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the open-clip-torch install")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def write_clip_tokenizer_files(out_dir: Path, bpe_file: Path | None = None) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json for the 49,408-id CLIP BPE."""
    with gzip.open(bpe_file or find_bpe_file(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _N_MERGES + 1]]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [BOS, EOS]
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"built a vocabulary of {len(vocab)} ids, expected {VOCAB_SIZE}")
    # Atomic writes: the folder is a shared cache (~/.cache/sdrt), and another process (a second
    # export, a parallel test worker) may be reading these files while this one rewrites them.
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = {tok: i for i, tok in enumerate(vocab)}
    write_atomic(out_dir / "vocab.json", json.dumps(ids, ensure_ascii=False))
    write_atomic(out_dir / "merges.txt", "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
    }
    write_atomic(out_dir / "tokenizer_config.json", json.dumps(config, indent=2))
    return out_dir
