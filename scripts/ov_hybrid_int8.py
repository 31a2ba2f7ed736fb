"""optimum-intel's hybrid int8 quantization of an OpenVINO SD folder, for scripts/bench_e2e.py's
`optimum_intel_int8*` peers (run by the python of .venv-ovpeers, see setup_openvino_peers.sh):

    .venv-ovpeers/bin/python scripts/ov_hybrid_int8.py FP32_FOLDER OUT_FOLDER [SAMPLES] [SIZE] [STEPS]

Hybrid = the UNet fully quantized (int8 weights and activations, NNCF post-training with
SmoothQuant) on calibration inputs collected by running the pipeline; the other models get int8
weights only. Its own default collects 200 UNet inputs at 512x512 with 50 steps per prompt, about
an hour on a 2-core CPU; here SAMPLES UNet inputs (default 30) are collected at the bench's
workload (SIZE pixels square, default 256; STEPS steps per prompt with the folder's scheduler,
default 10) from fixed captions, so the result is deterministic and calibrated where it is measured.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

# Calibration captions: none is the bench's prompt or one of its quality prompts (bench_e2e.py
# QUALITY_PROMPTS; tests/test_bench_e2e.py checks), so the peer is not judged on what it calibrated on.
CAPTIONS = [
    "a mountain lake at sunrise with mist over the water",
    "an astronaut riding a horse on the moon",
    "a cozy kitchen with copper pots and morning light",
    "a lighthouse on a rocky coast during a storm",
    "a child flying a kite on a windy beach",
    "an ancient library with tall wooden shelves",
    "a plate of sushi on a black slate board",
    "a mountain village at dusk with warm lights in the windows",
]


def main(source: Path, out: Path, samples: int, size: int, steps: int) -> int:
    from optimum.intel import OVStableDiffusionPipeline, OVWeightQuantizationConfig

    tmp = out.with_name(out.name + ".src")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    unet_config = tmp / "unet" / "config.json"
    config = json.loads(unet_config.read_text())
    config["sample_size"] = size // 8  # optimum-intel calibrates at sample_size x VAE factor pixels
    unet_config.write_text(json.dumps(config, indent=2))

    call = OVStableDiffusionPipeline.__call__

    @functools.wraps(call)
    def calibrate_call(self: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("num_inference_steps", steps)
        return call(self, *args, **kwargs)

    OVStableDiffusionPipeline.__call__ = calibrate_call  # type: ignore[method-assign]
    try:
        quantization = OVWeightQuantizationConfig(bits=8, dataset=CAPTIONS, num_samples=samples)
        pipe = OVStableDiffusionPipeline.from_pretrained(tmp, quantization_config=quantization, compile=False)
    finally:
        OVStableDiffusionPipeline.__call__ = call  # type: ignore[method-assign]
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging)
    os.replace(staging, out)
    shutil.rmtree(tmp)
    return 0


if __name__ == "__main__":
    if not 3 <= len(sys.argv) <= 6:
        sys.exit(__doc__)
    numbers = [int(x) for x in sys.argv[3:]]
    defaults = [30, 256, 10]
    samples, size, steps = numbers + defaults[len(numbers) :]
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2]), samples, size, steps))
