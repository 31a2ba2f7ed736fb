"""runtime/ (and its CLI) must load with torch, diffusers and transformers made unimportable."""

from __future__ import annotations

import subprocess
import sys

BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'torch', 'diffusers', 'transformers'}:
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import runtime.pipeline, runtime.generate, runtime.backends.onnxruntime, runtime.compose, runtime.serve
import runtime.schedulers
assert not any(m.split('.')[0] in {'torch', 'diffusers', 'transformers'} for m in sys.modules)
print('ok')
"""


def test_runtime_imports_without_torch():
    out = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_cli_help_runs_without_torch():
    code = BLOCKER.replace("print('ok')", "import runtime.generate as g; g.parse_args(['x']); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
