"""`python scripts/bench_clip_guidance.py --bundle DIR`: what CLIP guidance costs a generation.

In one process (after one short guided run that loads every model): the same generation without
and with `--clip-guidance`, the median seconds of each and the guided run's second pass
(`timings["clip_guidance"]`, its gradients included), with the CPU it ran on. The bundle must have
been exported with `--clip-guidance`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from export.compare.cpu import cpu_summary
from runtime.backends import BACKENDS, BackendConfig
from runtime.cli import positive_int, size_argument
from runtime.errors import RequestError, SetupError, exit_status
from runtime.options import GenerateOptions
from runtime.pipeline import Pipeline


@dataclass(frozen=True)
class Cost:
    unguided_s: float  # median seconds of the generation without guidance
    guided_s: float  # median seconds with it
    second_pass_s: float  # median seconds of the guided run's second pass

    @property
    def ratio(self) -> float:
        return self.guided_s / self.unguided_s


def measure_cost(
    bundle: str | Path,
    options: GenerateOptions,
    scale: float,
    skip: int,
    runs: int = 1,
    backend: BackendConfig | None = None,
) -> Cost:
    """Median seconds of `options` without and with guidance (scale, skip), `runs` each."""
    pipeline = Pipeline(bundle, backend)
    guided = replace(options, clip_guidance=scale, clip_guidance_skip=skip)
    try:
        pipeline.generate(replace(guided, steps=2, clip_guidance_skip=1))  # loads every model
        seconds: dict[str, list[float]] = {"unguided": [], "guided": [], "second_pass": []}
        for _ in range(runs):
            for name, o in (("unguided", options), ("guided", guided)):
                start = time.perf_counter()
                result = pipeline.generate(o)
                seconds[name].append(time.perf_counter() - start)
            seconds["second_pass"].append(result.timings["clip_guidance"])
    finally:
        pipeline.close()
    return Cost(*(statistics.median(seconds[k]) for k in ("unguided", "guided", "second_pass")))


def main(argv: list[str] | None = None) -> int:
    """Exit 0, or 2 / 3 for a bad request / broken bundle, as `runtime.generate`."""
    p = argparse.ArgumentParser(prog="python scripts/bench_clip_guidance.py", description=__doc__)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--size", type=size_argument, default=None, help="WIDTHxHEIGHT (default: the bundle's)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--clip-guidance", type=float, default=2000.0, metavar="SCALE")
    p.add_argument("--clip-guidance-skip", type=int, default=10, metavar="K")
    p.add_argument("--runs", type=positive_int, default=1)
    p.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
    p.add_argument("--precision", default=None)
    p.add_argument("--threads", type=positive_int, default=None)
    args = p.parse_args(argv)
    width, height = args.size or (None, None)
    options = GenerateOptions(
        prompts=("a photo of a cat maid, watercolor",),
        negative_prompts=("blurry",),
        steps=args.steps,
        scheduler=args.scheduler,
        width=width,
        height=height,
    )
    try:
        backend = BackendConfig(args.backend, precision=args.precision, threads=args.threads).validate()
        cost = measure_cost(
            args.bundle, options, args.clip_guidance, args.clip_guidance_skip, args.runs, backend
        )
    except (RequestError, SetupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_status(exc)
    print(cpu_summary())
    print(f"unguided {cost.unguided_s:.2f} s, guided {cost.guided_s:.2f} s ({cost.ratio:.2f}x; second pass "
          f"{cost.second_pass_s:.2f} s): {args.steps} {args.scheduler} steps, scale {args.clip_guidance:g}, "
          f"skip {args.clip_guidance_skip}, {args.backend}, median of {args.runs}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
