"""Wall-clock statistics and peak-RSS probes. No torch: the runtime's child process uses it too."""

from __future__ import annotations

import re
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class Stats:
    """Seconds of N timed runs; median and p95 (linear interpolation, so ~max when N < 20)."""

    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return float(np.median(self.seconds))

    @property
    def p95(self) -> float:
        return float(np.percentile(self.seconds, 95))

    def to_json(self) -> dict[str, Any]:
        return {
            "median_s": self.median,
            "p95_s": self.p95,
            "runs": len(self.seconds),
            "seconds": list(self.seconds),
        }


def time_runs(fn: Callable[[], object], runs: int) -> Stats:
    """Time `fn` `runs` times; the caller has already warmed it up (sessions, caches, allocator)."""
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return Stats(tuple(seconds))


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def rss_bytes() -> int:
    """Resident set size of this process now."""
    kib = _status_kib("VmRSS")
    return (kib or 0) * 1024


def peak_rss_bytes() -> int:
    """Peak RSS of this process since start or since the last `reset_peak_rss()` (Linux VmHWM)."""
    kib = _status_kib("VmHWM")
    if kib is None:  # not Linux: ru_maxrss is the lifetime peak (KiB on Linux, bytes on macOS)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return kib * 1024


def reset_peak_rss() -> bool:
    """Restart peak tracking from the current RSS (Linux: write 5 to clear_refs); False if not possible."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True
