"""Private copies of the shared test bundles: a test that writes into a bundle works on its own copy."""

from __future__ import annotations

import shutil
from pathlib import Path

DERIVED = (".ort_cache", ".ov_cache", ".sdrt-*")  # what the runtime writes beside a bundle's files


def copy_bundle(bundle: Path, to: Path, *also_skip: str) -> Path:
    """`bundle` copied to `to` without the caches and stamps its users write (nor `also_skip`)."""
    shutil.copytree(bundle, to, ignore=shutil.ignore_patterns(*DERIVED, *also_skip))
    return to
