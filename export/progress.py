"""Stage timing and peak memory, shown as one tqdm line per stage.

Peak memory is `ru_maxrss`. Linux lets a process reset its high-water mark (write "5" to
/proc/self/clear_refs), so each stage reports its own peak rather than the running maximum;
where that is not allowed, the figure is the process peak so far.
"""

from __future__ import annotations

import ctypes
import gc
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm import tqdm


@dataclass
class StageRecord:
    name: str
    seconds: float
    peak_rss_bytes: int


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """Peak resident set size since the last reset (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so the next stage starts small."""
    gc.collect()
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class Progress:
    """Runs named stages, printing `stage  seconds  peak RSS` as each one finishes."""

    total: int
    records: list[StageRecord] = field(default_factory=list)
    bar: tqdm | None = None

    def __post_init__(self) -> None:
        self.bar = tqdm(total=self.total, unit="stage", leave=False, dynamic_ncols=True, disable=None)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        assert self.bar is not None
        self.bar.set_description(name)
        _reset_peak()
        start = time.perf_counter()
        yield
        record = StageRecord(name, time.perf_counter() - start, peak_rss_bytes())
        self.records.append(record)
        self.bar.write(f"{name:<28} {record.seconds:7.1f} s   peak RSS {record.peak_rss_bytes / 1e9:6.2f} GB")
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    @property
    def peak_rss_bytes(self) -> int:
        return max((r.peak_rss_bytes for r in self.records), default=peak_rss_bytes())

    def as_json(self) -> list[dict[str, Any]]:
        return [{**asdict(r), "seconds": round(r.seconds, 2)} for r in self.records]
