"""The CPU's name and flags for a benchmark's output; what it can do natively is runtime.cpu's
(the PyTorch bf16 timing is only worth running where bf16 has instructions: elsewhere it is
emulated and takes many times fp32's)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from runtime.cpu import FAST_PATH_FLAGS, cpu_flags


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name ("AMD EPYC", ...); the platform's processor name where /proc lacks it."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_summary(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """One line for a benchmark's output: the CPU model, its cores, and which of the flags that
    pick a fast path (runtime.cpu.FAST_PATH_FLAGS) it has."""
    flags = cpu_flags(cpuinfo)
    have = " ".join(f for f in FAST_PATH_FLAGS if f in flags) or "none of them"
    return (
        f"CPU: {cpu_model(cpuinfo)}, {os.cpu_count()} cores; flags: {have} (of {', '.join(FAST_PATH_FLAGS)})"
    )
