"""scripts/bench_e2e.py end to end on the tiny bundle (two runtime engines, one repeat): every
engine reports, the image comparison is computed from the images the workers made, the targets
are judged. Its timings are not asserted: speed lives in the benchmark's own output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # runs the bench in subprocesses

ROOT = Path(__file__).resolve().parents[1]


def test_bench_reports_engines_parity_and_targets(tiny_bundle: Path, tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    report = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "scripts/bench_e2e.py"), "--bundle", str(tiny_bundle),
           "--engines", "runtime,runtime_openvino", "--size", "64x64", "--steps", "2", "--repeats", "1",
           "--threads", "1", "--json", str(report)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(report.read_text())
    assert set(data["results"]) == {"runtime", "runtime_openvino"}
    for result in data["results"].values():
        assert len(result["latencies_s"]) == 1 and result["peak_rss_gib"] > 0
        assert 0 <= result["step_overhead_share"]["median"] < 1
    assert data["ours"] in data["results"]
    # OpenVINO fp32 and ONNX Runtime fp32 make the same image (same seed) to float rounding
    assert data["image_parity"]["runtime_openvino"]["max_pixel_diff"] <= 2
    assert {"time_to_first_image_s", "peak_rss_gib", "step_overhead_median"} <= set(data["targets"])
    assert "target peak_rss_gib" in out.stdout


def test_bench_rejects_unknown_engines(tiny_bundle: Path) -> None:
    script = str(ROOT / "scripts/bench_e2e.py")
    cmd = [sys.executable, script, "--bundle", str(tiny_bundle), "--engines", "nope"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2 and "--engines must be a comma list of" in out.stderr
    ours = [*cmd[:-1], "runtime", "--ours", "diffusers_fp32"]
    out = subprocess.run(ours, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2 and "--ours must be one of the runtime engines run: runtime" in out.stderr
