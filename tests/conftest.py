"""Shared fixtures. `tiny_bundle`: the tiny preset exported once per session (fp32 + fp16)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a complete tiny bundle (seed 0, deprojector initialised from CLIP). Do not modify it."""
    from export.build import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export_bundle(ExportOptions(model="tiny", out=out, precision="both"))
    return out
