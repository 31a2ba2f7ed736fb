"""What the CPU backends share: each model loaded once, in background threads, and the derived-graph
cache they keep beside the bundle (ONNX Runtime's optimised graphs, OpenVINO's IR)."""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np

from runtime.backends.base import BackendError, check_feeds
from runtime.bundle import Bundle, ModelEntry

T = TypeVar("T")


def read_ahead(path: Path) -> None:
    """Ask the kernel to start reading a model's files now. Both engines map external weights
    lazily, so on a cold page cache the first call would otherwise fault in the SD 1.5 UNet's
    gigabytes at disk speed."""
    if not hasattr(os, "posix_fadvise"):
        return
    for file in (path, path.with_name(path.name + ".data"), path.with_suffix(".bin")):
        try:
            fd = os.open(file, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


def drop_mapped_pages(files: list[Path]) -> int:
    """Release this process's resident pages of read-only mappings of `files`; returns the bytes.

    OpenVINO maps an IR's weights, repacks them into its own layout on a model's first call, and
    keeps the mapping for later shapes. The mapped pages stay resident (1.6 GB for the SD 1.5
    UNet) though no longer read. MADV_DONTNEED on a read-only file mapping only drops them from
    this process: a later read faults them back from the page cache or the file, unchanged."""
    if sys.platform != "linux" or not hasattr(mmap, "MADV_DONTNEED"):
        return 0
    names = {str(f.resolve()) for f in files}
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    dropped = 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or fields[5].strip() not in names or "w" in fields[1]:
                continue
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if libc.madvise(low, high - low, mmap.MADV_DONTNEED) == 0:
                dropped += high - low
    return dropped


def derived_path(bundle: Bundle, folder: str, key: list[str], source_sha256: str, suffix: str) -> Path:
    """BUNDLE/<folder>/<key...>.<sha prefix><suffix>: a graph derived from a bundle file, named by
    everything it depends on, so a changed source, engine version or setting never reuses it."""
    return bundle.root / folder / f"{'.'.join([*key, source_sha256[:16]])}{suffix}"


def checked_entry(bundle: Bundle, model: str, feeds: dict[str, np.ndarray]) -> ModelEntry:
    """The bundle's entry for `model`, once `feeds` match its spec (before an engine sees them)."""
    entry = bundle.models.get(model)
    if entry is None:
        raise BackendError(f"bundle {bundle.root} has no {model} model")
    check_feeds(entry.spec, feeds)
    return entry


def writable(directory: Path) -> bool:
    """A read-only bundle (a mounted volume, say) just runs without the derived-graph cache."""
    try:
        directory.mkdir(exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK)


class BackgroundLoads(Generic[T]):
    """Loads each bundle model at most once, in background threads (ONNX Runtime's session
    creation and OpenVINO's compile release the GIL): the UNet loads while CLIP runs, the VAE
    during the denoising loop. `get` waits only for a load that has not finished, and raises a
    failed load's error."""

    def __init__(self, bundle: Bundle, load: Callable[[str], T], files: Callable[[str], Path]):
        self._bundle, self._load, self._files = bundle, load, files
        self._futures: dict[str, Future[T]] = {}
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sdrt-load")
        self._lock = threading.Lock()

    def start(self, model: str) -> Future[T]:
        if model not in self._bundle.models:
            raise BackendError(f"bundle {self._bundle.root} has no {model} model")
        with self._lock:
            if model not in self._futures:
                read_ahead(self._files(model))
                self._futures[model] = self._pool.submit(self._load, model)
            return self._futures[model]

    def get(self, model: str) -> T:
        return self.start(model).result()

    @property
    def started(self) -> dict[str, Future[T]]:
        with self._lock:
            return dict(self._futures)

    def close(self) -> None:
        """Drop every loaded model; a load still running is waited for (it would hold its memory)."""
        with self._lock:
            loads = list(self._futures.values())
            self._futures.clear()
        for load in loads:
            if not load.cancel():
                load.exception()
