"""What the CPU can do natively, from /proc/cpuinfo: the PyTorch bf16 timing is only worth
running where bf16 has instructions (elsewhere it is emulated and takes many times fp32's)."""

from __future__ import annotations

import platform
from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16")


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


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name ("AMD EPYC", ...); the platform's processor name where /proc lacks it."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bf16_instructions(flags: frozenset[str] | None = None) -> list[str]:
    """The native bf16 instruction sets among `flags` (this CPU's by default)."""
    have = cpu_flags() if flags is None else flags
    return [f for f in BF16_FLAGS if f in have]


def cpu_summary() -> str:
    """One line for a benchmark's output: the CPU model and its vector / matrix flags."""
    flags = " ".join(sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma")))) or "none"
    return f"CPU: {cpu_model()}; flags: {flags}"
