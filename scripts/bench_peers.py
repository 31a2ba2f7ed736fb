"""The peers of scripts/bench_e2e.py, one per process, each run by the python of its own virtualenv:

    PEER_PYTHON scripts/bench_peers.py PEER '{"model": ..., "prompt": ..., "steps": ..., ...}'

prints one JSON line: the same timings as the runtime's workers (`timed_runs`, shared with
bench_e2e.py), and with "image" in the payload saves there (.npy, uint8 (K, H, W, 3)) the last timed
image and one more per "quality_prompts" entry (the diffusers-based peers use a generator seeded 0,
so a peer's fp32 and int8 runs start from the same latents and their images compare). Only numpy
is imported here at module level, so any peer venv can run it; each peer imports its own library.
Peers (all with the bench's scheduler, DDIM or DPM++ 2M, and its prompt, size, steps, guidance):
- optimum: Optimum's ORTStableDiffusionPipeline (ONNX Runtime, fp32), from `optimum-cli export onnx`
- optimum_intel[_bf16|_int8][_static]: optimum-intel's OVStableDiffusionPipeline, dynamic shapes
  or `reshape`d to the request (static), computed in fp32 (INFERENCE_PRECISION_HINT f32: on a bf16
  CPU OpenVINO would otherwise compute in bf16) or bf16; int8: its hybrid int8 folder
  (scripts/ov_hybrid_int8.py), the rest of the compute in fp32
- openvino_genai[_static]: openvino-genai's Text2ImagePipeline (C++), from the same IR folder
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

PEERS = (
    "optimum",
    "optimum_intel",
    "optimum_intel_static",
    "optimum_intel_bf16_static",
    "optimum_intel_int8",
    "optimum_intel_int8_static",
    "openvino_genai",
    "openvino_genai_static",
)


def await_turn(said: str) -> None:
    """Interleaved runs (bench_e2e.py --interleave): tell the coordinator `said` (READY after the
    first image, DONE after each timed one) on stdout, then wait for its "go" on stdin."""
    print(said, flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("interleaved bench: the coordinator went away")


def timed_runs(
    first: Callable[[], float], repeats: int, run: Callable[[], object], interleaved: bool = False
) -> dict[str, Any]:
    """first() -> seconds from process start to the first image; then `repeats` timed run() calls,
    each, when `interleaved`, only on the coordinator's turn (and the return too, after the last)."""
    ttfi = first()
    cpu, wall = 0.0, 0.0
    latencies = []
    for i in range(repeats):
        if interleaved:
            await_turn("READY" if i == 0 else "DONE")
        cpu0, start = time.process_time(), time.perf_counter()
        run()
        latencies.append(time.perf_counter() - start)
        cpu, wall = cpu + time.process_time() - cpu0, wall + latencies[-1]
    if interleaved:
        await_turn("DONE")
    ordered = sorted(latencies)
    return {
        "median_s": statistics.median(ordered),
        "p95_s": float(np.percentile(ordered, 95)),
        "latencies_s": latencies,
        "time_to_first_image_s": ttfi,
        "cpu_per_wall": cpu / wall,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def ov_properties(a: dict[str, Any], precision: str) -> dict[str, Any]:
    """The OpenVINO compile properties the runtime's OpenVINO backend uses, for a like-for-like run."""
    props: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
    if a.get("threads"):
        props["INFERENCE_NUM_THREADS"] = a["threads"]
    return props


def _scheduler(a: dict[str, Any], config: Any) -> Any:
    """The bench's scheduler as diffusers builds it (runtime.schedulers' parity twins)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if a.get("scheduler", "ddim") == "dpmpp_2m":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    return DDIMScheduler.from_config(config)


def _diffusers_call(pipe: Any, a: dict[str, Any]) -> Callable[..., object]:
    """One image (of the bench's prompt, or `prompt`) from a diffusers-style pipeline, from latents
    seeded 0; kept for "image"."""
    import torch

    def run(prompt: str | None = None) -> np.ndarray:
        image = pipe(prompt or a["prompt"], num_inference_steps=a["steps"], guidance_scale=a["guidance"],
                     height=a["height"], width=a["width"], output_type="np",
                     generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
        return np.clip(np.round(np.asarray(image) * 255), 0, 255).astype(np.uint8)

    return run


def optimum(a: dict[str, Any]) -> Callable[..., object]:
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    pipe = ORTStableDiffusionPipeline.from_pretrained(a["model"])
    pipe.scheduler = _scheduler(a, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return _diffusers_call(pipe, a)


def optimum_intel(a: dict[str, Any], static: bool, precision: str) -> Callable[..., object]:
    from optimum.intel import OVStableDiffusionPipeline

    pipe = OVStableDiffusionPipeline.from_pretrained(
        a["model"], ov_config=ov_properties(a, precision), compile=False
    )
    pipe.scheduler = _scheduler(a, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if static:
        pipe.reshape(batch_size=1, height=a["height"], width=a["width"], num_images_per_prompt=1)
    pipe.compile()
    return _diffusers_call(pipe, a)


def openvino_genai(a: dict[str, Any], static: bool) -> Callable[..., object]:
    import openvino_genai as ov_genai

    if a.get("scheduler", "ddim") != "ddim":
        raise SystemExit("openvino_genai: this bench runs it with DDIM only")
    pipe = ov_genai.Text2ImagePipeline(a["model"])
    config = f"{a['model']}/scheduler/scheduler_config.json"
    pipe.set_scheduler(ov_genai.Scheduler.from_config(config, ov_genai.Scheduler.Type.DDIM))
    if static:
        pipe.reshape(1, a["height"], a["width"], a["guidance"])
    pipe.compile("CPU", **ov_properties(a, "f32"))

    def run(prompt: str | None = None) -> object:
        return pipe.generate(prompt or a["prompt"], width=a["width"], height=a["height"], rng_seed=0,
                             num_inference_steps=a["steps"], guidance_scale=a["guidance"])  # fmt: skip

    return run


def build(peer: str, a: dict[str, Any]) -> Callable[..., object]:
    if peer == "optimum":
        return optimum(a)
    if peer.startswith("optimum_intel"):
        return optimum_intel(a, static="static" in peer, precision="bf16" if "bf16" in peer else "f32")
    return openvino_genai(a, static="static" in peer)


def main() -> int:
    t0 = time.perf_counter()
    if len(sys.argv) != 3 or sys.argv[1] not in PEERS:
        sys.exit(f"usage: bench_peers.py {{{','.join(PEERS)}}} JSON")
    peer, a = sys.argv[1], json.loads(sys.argv[2])
    build_run = build(peer, a)
    images: list[object] = []

    def run() -> None:
        images.append(build_run())

    def first() -> float:
        run()
        return time.perf_counter() - t0

    result = timed_runs(first, a["repeats"], run, interleaved=a.get("interleave", False))
    if a.get("image") and isinstance(images[-1], np.ndarray):
        extra = [np.asarray(build_run(prompt)) for prompt in a.get("quality_prompts", [])]
        np.save(a["image"], np.stack([images[-1], *extra]))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
