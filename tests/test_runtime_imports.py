"""runtime/ (its CLI, the HTTP server, the Ray app) must load with torch, diffusers and transformers
made unimportable: each case runs in a fresh interpreter whose import system refuses them."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'torch', 'diffusers', 'transformers'}:
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
"""
CHECK = "\nassert not any(m.split('.')[0] in {'torch', 'diffusers', 'transformers'} for m in sys.modules)\n"

CASES = {
    "runtime": "import runtime.pipeline, runtime.generate, runtime.backends.onnxruntime, runtime.compose\n"
    "import runtime.schedulers",
    "cli": "import runtime.generate as g; g.parse_args(['x'])",
    # The HTTP layer (FastAPI, uvicorn, prometheus, the v2 codec) must not drag torch in either.
    "server": "import uvicorn, runtime.serve, runtime.serving.app; runtime.serve.parse_args([])",
    "ray": "import ray, ray.serve, runtime.serve_ray as s; s.deployment(s.parse_args([])[0])",
}
NEEDS = {"ray": "ray"}  # optional extras: the case is skipped where the extra is not installed


@pytest.mark.parametrize("case", list(CASES))
def test_imports_without_torch(case: str) -> None:
    if case in NEEDS and importlib.util.find_spec(NEEDS[case]) is None:
        pytest.skip(f"{NEEDS[case]} is not installed")
    code = BLOCKER + CASES[case] + CHECK + "print('ok')\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
