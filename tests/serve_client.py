"""An in-process server for tests: one real engine on a bundle (workers=1, no warm-up) and
TestClients for it with given limits. Torch-free; needs the `serve` extra."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fastapi.testclient import TestClient

from runtime.backends.config import BackendConfig
from runtime.serving import Engine, EngineConfig, Limits
from runtime.serving.app import create_app
from runtime.serving.options import ServerOptions


@contextmanager
def open_engine(bundle: Path, max_batch: int = 1) -> Iterator[Engine]:
    config = EngineConfig(workers=1, warmup=False, max_batch=max_batch, max_wait_s=0.05)
    with Engine.open(bundle, BackendConfig(threads=1), config) as engine:
        engine.start()
        yield engine


def client_for(engine: Engine, limits: Limits | None = None, lora_dir: Path | None = None) -> TestClient:
    """`limits` None: the server's defaults; `lora_dir`: its --lora-dir."""
    options = ServerOptions(limits=limits or Limits(), lora_dir=lora_dir)
    return TestClient(create_app(engine, options, manage_engine=False))


@contextmanager
def open_client(bundle: Path, limits: Limits | None = None, max_batch: int = 1) -> Iterator[TestClient]:
    with open_engine(bundle, max_batch) as engine:
        yield client_for(engine, limits)
