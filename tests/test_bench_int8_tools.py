"""scripts/bench_int8_tools.py's pure logic, without models: the interleaved timing order, which
convolution stays fp32, static-shape dims, the recorded calls' round trip, and the table's medians,
ratios and errors. The bench itself runs minutes on real UNets; its numbers live in its own output."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest

from tests.scripts import import_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return import_script("bench_int8_tools")


def test_interleaved_calls_every_engine_once_per_round(bench: ModuleType) -> None:
    assert list(bench.interleaved(["a", "b", "c"], 2)) == ["a", "b", "c", "a", "b", "c"]


def test_input_convolution_is_the_first_conv(bench: ModuleType) -> None:
    nodes = [SimpleNamespace(name=n, op_type=t) for n, t in
             [("t", "Sin"), ("/conv_in/Conv", "Conv"), ("/down/Conv", "Conv")]]  # fmt: skip
    assert bench.input_convolution(nodes) == "/conv_in/Conv"


def test_free_dims_fix_symbolic_dims_and_refuse_conflicts(bench: ModuleType) -> None:
    spec = [["batch", 4, "height", "width"], [1], ["batch", "tokens", 768]]
    shapes = [(2, 4, 32, 32), (1,), (2, 77, 768)]
    assert bench.free_dims(spec, shapes) == {"batch": 2, "height": 32, "width": 32, "tokens": 77}
    with pytest.raises(ValueError, match="batch"):
        bench.free_dims(spec, [(2, 4, 32, 32), (1,), (1, 77, 768)])


def test_calls_round_trip_in_order(bench: ModuleType, tmp_path: Path) -> None:
    calls = [{"sample": np.full((2, 4), i, np.float32), "out/noise_pred": np.ones(3) * i} for i in range(12)]
    bench._save_calls(tmp_path / "c.npz", calls)
    loaded = bench.load_calls(tmp_path / "c.npz")
    assert [c["sample"][0, 0] for c in loaded] == list(range(12))  # 10 after 9, not after 1
    assert set(loaded[0]) == {"sample", "out/noise_pred"}


def test_summarize_medians_ratios_costs_and_errors(bench: ModuleType) -> None:
    run = bench.EngineRun
    timed = bench.Timed(
        runs={
            "ort_fp32": run((4.0, 1.0, 2.0), 1.0, 0.0, 9.0),
            "ort_int8_qdq": run((1.0, 1.5, 9.0), 0.99, 0.2, 3.0),
            "ov_fp32": run((1.0, 1.0, 1.0), 1.0, 0.0, 5.0),
        },
        errors={"ov_int8": "RuntimeError: boom"},
        peak_rss_gib=1.0,
    )
    cost = bench.QuantCost(60.0, 9.5, 1000, ("/conv_in/Conv",), {})
    costs = {"ort_int8_qdq": cost, "ort_int8_qdq_conv": "exit -9 (killed: out of memory?)"}
    order = ["ort_fp32", "ort_int8_qdq", "ort_int8_qdq_conv", "ov_fp32", "ov_int8"]
    rows = {r.engine: r for r in bench.summarize(timed, costs, {"ort_int8_qdq": 1000}, order)}
    assert list(rows) == order
    qdq = rows["ort_int8_qdq"]
    assert (qdq.median_s, qdq.vs_ort_fp32, qdq.vs_ov_fp32) == (1.5, 0.75, 1.5)
    assert (qdq.quant_seconds, qdq.quant_peak_rss_gib, qdq.file_bytes, qdq.calls) == (60.0, 9.5, 1000, 3)
    assert rows["ort_int8_qdq_conv"].error == "exit -9 (killed: out of memory?)"
    assert rows["ort_int8_qdq_conv"].median_s is None
    assert rows["ov_int8"].error == "RuntimeError: boom"
    table = bench.format_table(list(rows.values()))
    assert "ov_int8                error: RuntimeError: boom" in table
    assert "0.75x" in table and "1.50x" in table


def test_summarize_without_baselines_has_no_ratios(bench: ModuleType) -> None:
    timed = bench.Timed({"ov_int8": bench.EngineRun((2.0, 2.0, 2.0), 0.99, 0.1, 1.0)}, {}, 1.0)
    (row,) = bench.summarize(timed, {}, {}, ["ov_int8"])
    assert row.median_s == 2.0 and row.vs_ort_fp32 is None and row.vs_ov_fp32 is None
