"""What this CPU can do natively, from /proc/cpuinfo: the runtime and the exporter both decide by it
(bf16 timings, how int8 weights are quantized), and neither may need torch to ask."""

from __future__ import annotations

from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# int8 dot products into int32. Without one, x86 int8 kernels multiply-add u8 x s8 pairs into int16
# (AVX2's vpmaddubsw), which saturates unless the weights keep to 7 bits (export/int8.py).
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
# The flags that pick a fast path somewhere in the stack: what a benchmark prints about its CPU.
FAST_PATH_FLAGS = ("avx2", "fma", "avx512f", *INT8_DOT_FLAGS, *BF16_FLAGS, "amx_tile")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first processor's feature flags; empty where /proc/cpuinfo is missing (not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):  # x86 / arm64
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def bf16_instructions(flags: frozenset[str] | None = None) -> list[str]:
    """The native bf16 instruction sets among `flags` (this CPU's by default)."""
    have = cpu_flags() if flags is None else flags
    return [f for f in BF16_FLAGS if f in have]


def int8_dot_instructions(flags: frozenset[str] | None = None) -> list[str]:
    """The int8 dot-product instruction sets among `flags` (this CPU's by default)."""
    have = cpu_flags() if flags is None else flags
    return [f for f in INT8_DOT_FLAGS if f in have]


def is_x86(flags: frozenset[str]) -> bool:
    """Whether `flags` are an x86-64 CPU's (every one has SSE2); arm64 lists other names."""
    return "sse2" in flags
