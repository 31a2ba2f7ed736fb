"""`python scripts/bench_lora.py --bundle DIR`: what LoRA at run time costs on a CPU backend.

Writes two random kohya LoRAs shaped for the bundle (rank 16 on every attention, feed-forward and
projection layer of the UNet and on CLIP's, as typical SD 1.5 LoRAs are), then, in one process:
1. a generation without LoRA (untimed warm-up: loads the plain sessions), then timed ones;
2. the first generation with LoRA A: merging, and creating the LoRA-capable sessions (once per process);
3. alternating A, B, A, B with a prepared-set cache of 1 (every switch merges again) and of 2 (the
   LRU keeps both: a switch is a lookup);
4. the same set twice in a row (no work at all);
and prints per-step seconds of the plain and the LoRA-capable UNet, and the switch costs, with the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from export.compare.cpu import cpu_summary
from runtime.backends import BACKENDS, BackendConfig
from runtime.bundle import Bundle
from runtime.cli import positive_int, size_argument
from runtime.lora import LoraRef, LoraSettings
from runtime.lora.targets import Targets
from runtime.options import GenerateOptions
from runtime.pipeline import Pipeline, Result

LEAVES = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TEXT_LEAVES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def write_lora(bundle: Bundle, path: Path, seed: int, rank: int = 16) -> Path:
    """A random kohya LoRA for this bundle's UNet and text encoder (small updates: images stay sane)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for model, prefix, leaves in (("unet", "lora_unet_", LEAVES), ("clip", "lora_te_", TEXT_LEAVES)):
        targets = Targets.read(bundle.root / bundle.graph(model, "fp32").file, model)
        for module, target in targets.by_module.items():
            if not module.endswith(leaves):
                continue
            out, rest = target.weight_shape[0], target.weight_shape[1:]
            key = prefix + module.replace(".", "_")
            down = rng.standard_normal((rank, *rest)) / np.sqrt(np.prod(rest))
            up = rng.standard_normal((out, rank, *([1] * (len(rest) - 1)))) * 0.01
            tensors[f"{key}.lora_down.weight"] = down.astype(np.float16)
            tensors[f"{key}.lora_up.weight"] = up.astype(np.float16)
            tensors[f"{key}.alpha"] = np.array(rank / 2, np.float16)
    save_file(tensors, str(path))
    return path


def per_step(result: Result, steps: int) -> float:
    return result.timings["denoise"] / steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/bench_lora.py", description=__doc__)
    p.add_argument("--bundle", type=Path, default=Path("bundles/tiny"))
    p.add_argument("--backend", choices=BACKENDS[:2], default="onnxruntime")
    p.add_argument("--precision", default=None)
    p.add_argument("--size", type=size_argument, default=None, help="WIDTHxHEIGHT (default: the bundle's)")
    p.add_argument("--steps", type=positive_int, default=4)
    p.add_argument("--threads", type=positive_int, default=None)
    args = p.parse_args(argv)
    bundle = Bundle.open(args.bundle)
    width, height = args.size or (None, None)
    base = GenerateOptions(prompts=("a cat maid, watercolor",), steps=args.steps, seed=1, scheduler="ddim",
                           guidance=1.0, width=width, height=height)  # fmt: skip
    config = BackendConfig(args.backend, precision=args.precision, threads=args.threads)
    with tempfile.TemporaryDirectory() as folder:
        a = LoraRef(write_lora(bundle, Path(folder) / "a.safetensors", 1))
        b = LoraRef(write_lora(bundle, Path(folder) / "b.safetensors", 2))
        size = a.path.stat().st_size / 1e6
        print(f"bundle {args.bundle}, {args.backend} {config.validate().precision}, {args.steps} DDIM steps, "
              f"guidance 1 (batch 1), {size:.1f} MB LoRA files (rank 16, fp16)")  # fmt: skip
        print(cpu_summary())
        for cache in (1, 2):
            pipeline = Pipeline(bundle, config, LoraSettings(cache_size=cache))
            try:
                pipeline.generate(base)  # warm-up: plain sessions
                plain = [per_step(pipeline.generate(base), args.steps) for _ in range(2)]
                start = time.perf_counter()
                first = pipeline.generate(replace(base, loras=(a,)))
                first_total = time.perf_counter() - start
                switches, lora_steps = [], [per_step(first, args.steps)]
                for ref in (b, a, b, a):
                    result = pipeline.generate(replace(base, loras=(ref,)))
                    switches.append(result.timings["lora"])
                    lora_steps.append(per_step(result, args.steps))
                same = pipeline.generate(replace(base, loras=(a,))).timings["lora"]
                unload = time.perf_counter()
                pipeline.generate(base)
                unload_total = time.perf_counter() - unload
            finally:
                pipeline.close()
            print(f"[LRU of {cache}] plain UNet step {statistics.median(plain):.3f} s; LoRA-capable step "
                  f"{statistics.median(lora_steps):.3f} s; first LoRA request {first_total:.2f} s (merge "
                  f"{first.timings['lora']:.2f} s + LoRA sessions); switch A<->B median "
                  f"{statistics.median(switches):.3f} s (each: {', '.join(f'{s:.3f}' for s in switches)}); "
                  f"same set again {same:.4f} s; next request without LoRA {unload_total:.2f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
