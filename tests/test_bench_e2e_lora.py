"""scripts/bench_e2e.py's few-step LoRA workload (`--scheduler lcm --lora-rank R`, scripts/bench_e2e_lora.py):
the random LoRA files fit the bundle's attention layers, the switch-cost bookkeeping, and one run
on the tiny bundle (runtime vs diffusers, one repeat) reporting every field. Timings not asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.scripts import import_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_lora() -> ModuleType:
    return import_script("bench_e2e_lora")


def test_switch_costs_bookkeeping(bench_lora: ModuleType) -> None:
    """Extra seconds are each kind's median over the same-set median; set_weights seconds per run."""
    a, b = ("A",), ("B",)
    clock = {"set": 0.0}
    costs = {("same_as_previous", a): 1.0, ("first_time", b): 3.0, ("lru_hit", a): 1.5, ("lru_hit", b): 1.5,
             ("same_as_previous", b): 1.0}  # fmt: skip
    seen: list[tuple[str, ...]] = []

    def generate(loras: tuple[str, ...]) -> float:
        seen.append(loras)
        first = loras == b and loras not in seen[:-1]
        switched = len(seen) > 1 and seen[-2] != loras
        clock["set"] += 0.25 if switched else 0.0
        kind = "first_time" if first else "lru_hit" if switched else "same_as_previous"
        return costs[(kind, loras)]

    out = bench_lora.switch_costs(generate, a, b, lambda: clock["set"])
    assert seen == [a, b, a, b, b]
    assert out["same_as_previous"] == {"generate_s": [1.0, 1.0], "extra_s": 0.0, "set_weights_s": 0.0}
    assert out["first_time"] == {"generate_s": [3.0], "extra_s": 2.0, "set_weights_s": 0.25}
    assert out["lru_hit"] == {"generate_s": [1.5, 1.5], "extra_s": 0.5, "set_weights_s": 0.25}


def test_random_loras_fit_the_attention_layers(
    bench_lora: ModuleType, tiny_bundle: Path, tmp_path: Path
) -> None:
    targets = bench_lora.attention_targets(tiny_bundle)
    assert targets and all(m.endswith(bench_lora.ATTENTION_LEAVES) for m in targets)
    assert any(".attn2.to_k" in m for m in targets)  # cross-attention: in = the text width
    a, b = bench_lora.lora_files(tiny_bundle, tmp_path, rank=4)
    assert (a, b) == bench_lora.lora_paths(tmp_path, 4)
    first, second = load_file(str(a)), load_file(str(b))
    assert len(first) == 3 * len(targets) and set(first) == set(second)
    for module, (out, inp) in targets.items():
        key = "lora_unet_" + module.replace(".", "_")
        assert first[f"{key}.lora_down.weight"].shape == (4, inp)
        assert first[f"{key}.lora_up.weight"].shape == (out, 4)
        assert first[f"{key}.alpha"] == 4
    assert not np.array_equal(first[f"{key}.lora_up.weight"], second[f"{key}.lora_up.weight"])
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.integration  # runs the bench in subprocesses, diffusers among them
def test_bench_few_step_lora_workload(tiny_bundle: Path, tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "scripts/bench_e2e.py"), "--bundle", str(tiny_bundle),
           "--engines", "runtime,diffusers_fp32,optimum", "--size", "64x64", "--scheduler", "lcm",
           "--steps", "4", "--guidance", "1.0", "--lora-rank", "4", "--repeats", "1", "--threads", "1",
           "--quality-prompts", "0", "--json", str(report)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(report.read_text())
    assert data["workload"]["scheduler"] == "lcm" and data["workload"]["lora_rank"] == 4
    assert [Path(p).name for p in data["workload"]["lora_files"]] == [
        "bench_lora_a_r4.safetensors",
        "bench_lora_b_r4.safetensors",
    ]
    runtime, theirs = data["results"]["runtime"], data["results"]["diffusers_fp32"]
    assert runtime["unet_calls_per_image"] == 4 and runtime["median_s"] > 0 and theirs["median_s"] > 0
    switch = runtime["lora_switch"]
    assert set(switch) == {"same_as_previous", "first_time", "lru_hit"}
    assert switch["same_as_previous"]["set_weights_s"] == 0  # the same set: no backend call at all
    assert switch["first_time"]["set_weights_s"] > 0 and switch["lru_hit"]["set_weights_s"] > 0
    assert "fuse_lora" in theirs["lora_fused_by"]
    assert data["results"]["optimum"] == {"skipped": "the peers run without LoRA in this bench (--lora-rank)"}
    assert "runtime LoRA switch, first_time: +" in out.stdout
