"""A request's LoRAs -> one WeightSet per bundle model, with a small LRU, and the switch between sets.

Preparing (read, check, match, merge) costs about as much as reading the touched base weights
once; the LRU keeps the last few prepared sets so a server alternating between two LoRA sets
does not redo it. Keys are the files' content hashes (cached per path, size and mtime) and scales.

`WeightGate` is the thread-safety rule: generations with the same LoRA set run concurrently;
one with another set waits until they finish, then switches the backend's weights and runs.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from runtime.bundle import Bundle
from runtime.lora import LoraRef, LoraSettings, WeightSet
from runtime.lora.files import read_lora
from runtime.lora.graph import GraphFile, read_graph
from runtime.lora.merge import COMPONENT_OF, merge
from runtime.lora.targets import Targets
from runtime.specs import DEEPCACHE_FULL, DEEPCACHE_SHALLOW

Key = tuple[tuple[str, float], ...]
UNET_MODELS = ("unet", DEEPCACHE_FULL, DEEPCACHE_SHALLOW)


def lora_models(bundle: Bundle) -> list[str]:
    """The bundle's models a LoRA changes: CLIP (text encoder) and every UNet graph."""
    return [m for m in ("clip", *UNET_MODELS) if m in bundle.models]


def component_of(model: str) -> str:
    return COMPONENT_OF["unet" if model in UNET_MODELS else model]


_digests: dict[tuple[str, int, int, int], str] = {}
_digests_lock = threading.Lock()


def file_digest(path: Path) -> str:
    """sha256 of a LoRA file, hashed once per (path, inode, size, mtime)."""
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    with _digests_lock:
        if key in _digests:
            return _digests[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    with _digests_lock:
        _digests[key] = digest.hexdigest()
    return _digests[key]


def lora_key(loras: tuple[LoraRef, ...]) -> Key:
    return tuple((file_digest(ref.path), ref.scale) for ref in loras)


class LoraWeights:
    """Prepared weight sets of one bundle, by (LoRA key, model, graph file), least recently used out."""

    def __init__(self, bundle: Bundle, settings: LoraSettings | None = None):
        self.bundle = bundle
        self.settings = (settings or LoraSettings()).validate()
        self._sets: OrderedDict[Key, dict[tuple[str, str], WeightSet]] = OrderedDict()
        self._targets: dict[str, Targets] = {}
        self._graphs: dict[str, GraphFile] = {}
        self._lock = threading.Lock()

    def targets(self, graph_file: str, model: str, unet_file: str) -> Targets:
        """The name map of one of the bundle's graph files (read once); the step-caching UNets'
        by content against `unet_file`, the standard UNet of the same file set."""
        with self._lock:
            if graph_file not in self._targets:
                graph = self.graph(graph_file)
                if model in (DEEPCACHE_FULL, DEEPCACHE_SHALLOW):
                    self._targets[graph_file] = Targets.matched(graph, self.graph(unet_file), "unet")
                else:
                    self._targets[graph_file] = Targets.of(graph, model)
            return self._targets[graph_file]

    def graph(self, graph_file: str) -> GraphFile:
        """A bundle graph's nodes and initializer locations (read once; its weights stay on disk)."""
        if graph_file not in self._graphs:
            self._graphs[graph_file] = read_graph(self.bundle.root / graph_file)
        return self._graphs[graph_file]

    def weight_sets(self, loras: tuple[LoraRef, ...], graphs: dict[str, str]) -> dict[str, WeightSet]:
        """model -> its WeightSet for these LoRAs, for the graph files `graphs` (model -> bundle file)."""
        key = lora_key(loras)
        with self._lock:
            cached = self._sets.get(key)
            if cached is not None:
                self._sets.move_to_end(key)
                if all((m, f) in cached for m, f in graphs.items()):
                    return {m: cached[(m, f)] for m, f in graphs.items()}
        files = [(read_lora(ref.path), ref.scale) for ref in loras]
        prepared: dict[tuple[str, str], WeightSet] = {}
        for model, graph_file in graphs.items():
            targets = self.targets(graph_file, model, graphs["unet"])
            graph = self._graphs[graph_file]
            partial = model in (DEEPCACHE_FULL, DEEPCACHE_SHALLOW)  # the UNet's own check is strict
            arrays = merge(files, component_of(model), targets, graph.array, partial)
            prepared[(model, graph_file)] = WeightSet(key, arrays)
        with self._lock:
            self._sets.setdefault(key, {}).update(prepared)
            self._sets.move_to_end(key)
            while len(self._sets) > self.settings.cache_size:
                self._sets.popitem(last=False)
        return {m: prepared[(m, f)] for m, f in graphs.items()}


class WeightGate:
    """Same LoRA key: run together; another key: wait for the running generations, then switch."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running = 0
        self._key: Key | None = ()

    @contextmanager
    def hold(self, key: Key, switch: Callable[[], None]) -> Iterator[None]:
        with self._cond:
            while self._running and self._key != key:
                self._cond.wait()
            if self._key != key:
                self._key = None  # a failed switch leaves the weights unknown: the next one switches
                switch()  # under the lock: a second request for the same key waits for it
                self._key = key
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()
