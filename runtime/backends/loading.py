"""What the CPU backends share: each model loaded once, in background threads, and the derived-graph
cache they keep beside the bundle (ONNX Runtime's optimised graphs, OpenVINO's IR)."""

from __future__ import annotations

import ctypes
import json
import logging
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
from runtime.backends.config import BackendConfig
from runtime.bundle import Bundle
from runtime.files import sha256_file, write_atomic
from runtime.manifest import ModelManifest

log = logging.getLogger(__name__)

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


def _seal_path(cached: Path) -> Path:
    return cached.with_name(cached.name + ".sha256")


def _cache_files(cached: Path) -> list[Path]:
    """A derived graph and its weights file, if any (ORT: `<name>.data`, OpenVINO IR: `.bin`)."""
    weights = (cached.with_name(cached.name + ".data"), cached.with_suffix(".bin"))
    return [cached, *(w for w in weights if w.is_file())]


def seal_cache(cached: Path) -> None:
    """Record the hashes of a derived graph just written, so a later load can tell it is intact."""
    digests = {f.name: sha256_file(f) for f in _cache_files(cached)}
    write_atomic(_seal_path(cached), json.dumps(digests))


def cache_intact(bundle: Bundle, cached: Path) -> bool:
    """Whether a derived graph exists and matches its seal; a damaged or unsealed one is deleted
    (the caller rebuilds it from the verified bundle file instead of trusting it)."""
    if not cached.is_file():
        return False
    try:
        digests = json.loads(_seal_path(cached).read_text())
        intact = isinstance(digests, dict) and set(digests) == {f.name for f in _cache_files(cached)} and all(
            bundle.verifier.matches(cached.with_name(name), str(digest)) for name, digest in digests.items()
        )
    except (OSError, ValueError):
        intact = False
    if not intact:
        log.warning("derived graph %s is damaged or unsealed: rebuilding it from the bundle", cached)
        for file in [*_cache_files(cached), _seal_path(cached)]:
            file.unlink(missing_ok=True)
    return intact


def checked_entry(bundle: Bundle, model: str, feeds: dict[str, np.ndarray]) -> ModelManifest:
    """The bundle's entry for `model`, once `feeds` match its spec (before an engine sees them)."""
    entry = bundle.models.get(model)
    if entry is None:
        raise BackendError(f"bundle {bundle.root} has no {model} model")
    check_feeds(entry.spec, feeds)
    return entry


def own_config(backend: str, config: BackendConfig | None) -> BackendConfig:
    """`config` validated, defaulting to this backend's own; refuses one meant for another backend."""
    config = (config or BackendConfig(backend=backend)).validate()
    if config.backend != backend:
        raise BackendError(f"a {config.backend} config cannot open the {backend} backend")
    return config


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
