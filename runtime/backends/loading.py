"""What the CPU backends share: each model loaded once, in background threads, the derived-graph
cache they keep beside the bundle (ONNX Runtime's optimised graphs, OpenVINO's IR), and with static
shapes the per-shape compiles (ShapeCache)."""

from __future__ import annotations

import ctypes
import json
import logging
import mmap
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
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
        intact = (
            isinstance(digests, dict)
            and set(digests) == {f.name for f in _cache_files(cached)}
            and all(
                bundle.verifier.matches(cached.with_name(name), str(digest))
                for name, digest in digests.items()
            )
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


Shapes = tuple[tuple[int, ...], ...]  # one request's input shapes, in the model spec's input order
STATIC_SHAPES_PER_MODEL = 2  # compiled shapes kept per model: each holds its own packed weights


def input_shapes(entry: ModelManifest, feeds: dict[str, np.ndarray]) -> Shapes:
    """The key of a static compile: every input's shape, in the spec's order."""
    return tuple(tuple(int(d) for d in feeds[name].shape) for name in entry.spec.input_names)


@dataclass(frozen=True)
class ShapeCompile:
    """One first call at a new shape: what compiled, for which shapes, in how long, and whether it
    failed (then that shape runs on the dynamic model)."""

    model: str
    shapes: Shapes
    seconds: float
    failed: bool = False


class ShapeCache(Generic[T]):
    """Models compiled for one exact input shape each, `capacity` per model, least recently used
    dropped first. The first call at a shape compiles (every caller of that shape waits for the one
    compile), is logged with its time and recorded in `compiles`. A failed compile is logged and
    remembered, and `get` returns None for that shape from then on: the caller runs its dynamic
    model instead."""

    def __init__(self, build: Callable[[str, Shapes], T], capacity: int = STATIC_SHAPES_PER_MODEL):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1; got {capacity}")
        self._build, self.capacity = build, capacity
        self._entries: OrderedDict[tuple[str, Shapes], T] = OrderedDict()
        self._pending: dict[tuple[str, Shapes], Future[T | None]] = {}
        self._failed: set[tuple[str, Shapes]] = set()
        self._lock = threading.Lock()
        self.compiles: list[ShapeCompile] = []
        self.hits = self.evictions = 0

    def get(self, model: str, shapes: Shapes) -> T | None:
        key = (model, shapes)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key]
            if key in self._failed:
                return None
            waiting = self._pending.get(key)
            if waiting is None:
                self._pending[key] = Future()
        if waiting is not None:
            return waiting.result()
        return self._compile(key)

    def _compile(self, key: tuple[str, Shapes]) -> T | None:
        model, shapes = key
        start = time.perf_counter()
        value: T | None
        try:
            value = self._build(model, shapes)
        except Exception as exc:  # engines raise their own untyped errors; the dynamic model remains
            value = None
            log.warning("static shapes: %s could not compile for %s (%s); it runs with dynamic shapes",
                        model, shapes, exc)  # fmt: skip
        seconds = time.perf_counter() - start
        with self._lock:
            self.compiles.append(ShapeCompile(model, shapes, seconds, failed=value is None))
            if value is None:
                self._failed.add(key)
            else:
                self._entries[key] = value
                self._evict(model)
            self._pending.pop(key).set_result(value)
        if value is not None:
            log.info("static shapes: compiled %s for new shapes %s in %.2f s", model, shapes, seconds)
        return value

    def _evict(self, model: str) -> None:
        mine = [k for k in self._entries if k[0] == model]  # least recently used first
        for key in mine[: max(0, len(mine) - self.capacity)]:
            del self._entries[key]
            self.evictions += 1

    def cached(self) -> list[tuple[str, Shapes]]:
        """The compiled (model, shapes), least recently used first."""
        with self._lock:
            return list(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
