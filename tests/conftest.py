"""Shared fixtures and the unit/integration split.

- `fake_bundle`: a torch-free bundle of tiny hand-built graphs (tests/fake_bundle.py), written in
  a fraction of a second; runtime unit tests use it.
- `tiny_bundle`: the tiny preset exported with torch once per session (fp32 + fp16). Every test
  that uses it is marked `integration` here, so `pytest -m "not integration"` never exports.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.bundles import copy_bundle
from tests.fake_bundle import write_fake_bundle

if TYPE_CHECKING:
    from export.build import ExportOptions

_INTEGRATION_MODULE = "pytestmark = pytest.mark.integration"
# integration fixtures
EXPORTED_BUNDLES = ("tiny_bundle", "tiny_inpaint_bundle", "tiny_guidance_bundle", "tiny_deepcache_bundle")


def _unit_run(config: pytest.Config) -> bool:
    return "not integration" in (config.getoption("markexpr") or "")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """In a unit run, skip whole integration modules without importing them (they import torch)."""
    path = collection_path
    if not (_unit_run(config) and path.suffix == ".py" and path.name.startswith("test_")):
        return None
    return any(line.startswith(_INTEGRATION_MODULE) for line in path.read_text().splitlines()) or None


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The unit run's promise: no torch. A module that imports it must be marked integration."""
    if _unit_run(session.config) and "torch" in sys.modules:
        print("\nerror: torch was imported by a unit run; mark the importing test module integration")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if set(EXPORTED_BUNDLES) & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a complete tiny bundle (seed 0, deprojector initialised from CLIP). Do not modify it.

    Exported once per run: under pytest-xdist the workers share one export (the first one to
    take the lock writes it, the others find it complete: the exporter commits atomically)."""
    from filelock import FileLock

    from export.build import ExportOptions, export_bundle

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # workers: a common parent
    out = shared / "tiny-bundle"
    with FileLock(str(shared / "tiny-bundle.lock")):
        if not (out / "manifest.json").is_file():
            export_bundle(ExportOptions(model="tiny", out=out, precision="both"))
    return out


@pytest.fixture(scope="session")
def tiny_inpaint_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny-inpaint preset (a 9-channel inpainting UNet), fp32, exported once like `tiny_bundle`."""
    from export.build import ExportOptions

    return _export_once(
        tmp_path_factory,
        "tiny-inpaint-bundle",
        lambda out: ExportOptions(model="tiny-inpaint", out=out, precision="fp32", deprojector="none"),
    )


@pytest.fixture(scope="session")
def tiny_guidance_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset with CLIP guidance's gradient graph (`--clip-guidance`), fp32 and fp16, no
    deprojector; exported once like `tiny_bundle` (its own bundle: the gradient's export takes a minute)."""
    from export.build import ExportOptions

    return _export_once(
        tmp_path_factory,
        "tiny-guidance-bundle",
        lambda out: ExportOptions(model="tiny", out=out, deprojector="none", clip_guidance=True),
    )


@pytest.fixture(scope="session")
def tiny_deepcache_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset with the step-caching UNets (`--deepcache`), fp32 and fp16; exported once like
    `tiny_bundle` (the step-caching and the int8 tests share it). Do not modify it: copy it."""
    from export.build import ExportOptions

    return _export_once(
        tmp_path_factory,
        "tiny-deepcache-bundle",
        lambda out: ExportOptions(model="tiny", out=out, precision="both", deepcache=True),
    )


def _export_once(
    tmp_path_factory: pytest.TempPathFactory, name: str, options: Callable[[Path], ExportOptions]
) -> Path:
    """Export `name` once per run, shared by pytest-xdist workers under a file lock (the exporter
    commits atomically, so a complete manifest means a complete bundle)."""
    from filelock import FileLock

    from export.build import export_bundle

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = shared / name
    with FileLock(str(shared / f"{name}.lock")):
        if not (out / "manifest.json").is_file():
            export_bundle(options(out))
    return out


@pytest.fixture(scope="session")
def fake_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a shared torch-free bundle. Do not modify it: copy it with `fake_bundle_copy`."""
    return write_fake_bundle(tmp_path_factory.mktemp("fake") / "bundle")


@pytest.fixture
def fake_bundle_copy(fake_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the fake bundle (no caches, no stamp) that a test may damage."""
    return copy_bundle(fake_bundle, tmp_path / "bundle")
