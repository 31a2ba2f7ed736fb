"""The LoRA part of scripts/bench_e2e.py (`--lora-rank R`): random LoRA files at the bundle's own
shapes, the runtime's switch cost between two of them, and diffusers running the same file.

The files are kohya/A1111 layout (`lora_unet_<module>.lora_down/.lora_up/.alpha`) on the UNet's
attention projections (to_q, to_k, to_v, to_out.0 of every attn1 / attn2), the layers style LoRAs
train, with random factors (rank R, alpha = R). Their module names and shapes come from the
bundle's UNet graph (runtime/lora/targets.py), so writing them needs no torch and no model.
(scripts/bench_lora.py is the runtime-only LoRA cost tool: more layers, two cache sizes.)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

ATTENTION_LEAVES = (".to_q", ".to_k", ".to_v", ".to_out.0")
KOHYA_UNET = "lora_unet_"


def attention_targets(bundle: Path) -> dict[str, tuple[int, int]]:
    """UNet attention projection -> its weight's (out, in), from the bundle's fp32 UNet graph."""
    from runtime.bundle import Bundle
    from runtime.lora.targets import Targets

    b = Bundle.open(bundle)
    targets = Targets.read(b.root / b.graph("unet", "fp32").file, "unet")
    return {
        module: (t.weight_shape[0], t.weight_shape[1])
        for module, t in sorted(targets.by_module.items())
        if "attentions" in module and module.endswith(ATTENTION_LEAVES) and not t.shared_with
    }


def write_random_lora(path: Path, targets: dict[str, tuple[int, int]], rank: int, seed: int) -> Path:
    """A kohya-layout LoRA with random factors whose update is a few percent of a unit-scale weight."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for module, (out, inp) in targets.items():
        key = KOHYA_UNET + module.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = (rng.standard_normal((rank, inp)) / np.sqrt(inp)).astype(
            np.float32
        )
        tensors[f"{key}.lora_up.weight"] = (rng.standard_normal((out, rank)) * 0.02).astype(np.float32)
        tensors[f"{key}.alpha"] = np.array(float(rank), np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)
    return path


def lora_paths(folder: Path, rank: int) -> tuple[Path, Path]:
    """Where the two bench LoRAs (A, B) of this rank are: the parent writes them, workers read them."""
    return folder / f"bench_lora_a_r{rank}.safetensors", folder / f"bench_lora_b_r{rank}.safetensors"


def lora_files(bundle: Path, folder: Path, rank: int) -> tuple[Path, Path]:
    """Two different random LoRAs (A, B) for the same layers: the switch measurement alternates them."""
    targets = attention_targets(bundle)
    if not targets:
        raise ValueError(f"{bundle}: no UNet attention projections found to put a LoRA on")
    a, b = lora_paths(folder, rank)
    return write_random_lora(a, targets, rank, 1), write_random_lora(b, targets, rank, 2)


def switch_costs(
    generate: Callable[[tuple[Any, ...]], float],
    a: tuple[Any, ...],
    b: tuple[Any, ...],
    set_weights_s: Callable[[], float],
) -> dict[str, Any]:
    """Generation seconds after each kind of switch, and the extra over the same set as before.

    `generate(loras)` runs one timed generation; A is loaded on entry (the timed runs used it).
    Order: A (same as the previous request), B (first time: read + merge + set), A (LRU hit:
    set only), B (LRU hit), B again (same as previous). `set_weights_s()`: seconds the backend
    has spent in set_weights so far."""
    steps = [
        ("same_as_previous", a),
        ("first_time", b),
        ("lru_hit", a),
        ("lru_hit", b),
        ("same_as_previous", b),
    ]
    runs: dict[str, list[tuple[float, float]]] = {}
    for kind, loras in steps:
        before = set_weights_s()
        seconds = generate(loras)
        runs.setdefault(kind, []).append((seconds, set_weights_s() - before))
    base = statistics.median(s for s, _ in runs["same_as_previous"])
    return {
        kind: {
            "generate_s": [s for s, _ in values],
            "extra_s": statistics.median(s for s, _ in values) - base,
            "set_weights_s": statistics.median(w for _, w in values),
        }
        for kind, values in runs.items()
    }


def fuse_into_diffusers(pipe: Any, path: Path, scale: float) -> str:
    """The LoRA fused into a diffusers pipeline's UNet; returns how. With `peft` installed that is
    diffusers' own `load_lora_weights` + `fuse_lora`; without it (diffusers needs peft to load LoRAs)
    the same update, W += scale * (alpha / r) * up @ down, is added here, which is what fuse_lora
    computes, so the timed UNet is the same either way."""
    import torch
    from safetensors.torch import load_file

    try:
        import peft  # noqa: F401
    except ImportError:
        modules = {name.replace(".", "_"): m for name, m in pipe.unet.named_modules()}
        tensors = load_file(str(path))
        with torch.no_grad():
            for key, down in tensors.items():
                if not key.endswith(".lora_down.weight"):
                    continue
                stem = key.removesuffix(".lora_down.weight")
                up, alpha = tensors[f"{stem}.lora_up.weight"], float(tensors[f"{stem}.alpha"])
                weight = modules[stem.removeprefix(KOHYA_UNET)].weight
                weight += (scale * alpha / down.shape[0] * (up @ down)).to(weight.dtype)
        return "bench (diffusers' fuse_lora formula; peft is not installed)"
    pipe.load_lora_weights(str(path), adapter_name="bench")
    pipe.fuse_lora(lora_scale=scale, adapter_names=["bench"])
    return "diffusers load_lora_weights + fuse_lora"


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start
