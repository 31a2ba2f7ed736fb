"""`python scripts/bench_clip_score.py --bundle DIR`: what a CLIP score adds to a generation.

Runs the same generation with clip_score on (after one untimed run that loads every model) and
reports the median seconds of its clip_score stage (preprocessing, the one clip_vision call, the
cosines) against the whole generation's, in the same run, with the CPU it ran on.
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
    clip_score_s: float  # median seconds of the clip_score stage
    generation_s: float  # median seconds of the whole generation, score included

    @property
    def fraction(self) -> float:
        return self.clip_score_s / self.generation_s


def measure_cost(
    bundle: str | Path, options: GenerateOptions, runs: int = 3, backend: BackendConfig | None = None
) -> Cost:
    """What a CLIP score costs: median seconds of the clip_score stage and of the whole generation
    (the same options with clip_score on), after one untimed run that loads every model."""
    pipeline = Pipeline(bundle, backend)
    try:
        options = replace(options, clip_score=True)
        pipeline.generate(options)
        stage, total = [], []
        for _ in range(runs):
            start = time.perf_counter()
            result = pipeline.generate(options)
            total.append(time.perf_counter() - start)
            stage.append(result.timings["clip_score"])
    finally:
        pipeline.close()
    return Cost(statistics.median(stage), statistics.median(total))


def main(argv: list[str] | None = None) -> int:
    """Exit 0, or 2 / 3 for a bad request / broken bundle, as `runtime.generate`."""
    p = argparse.ArgumentParser(prog="python scripts/bench_clip_score.py", description=__doc__)
    p.add_argument("--bundle", type=Path, default=Path("bundles/tiny"))
    p.add_argument("--size", type=size_argument, default=None, help="WIDTHxHEIGHT (default: the bundle's)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--runs", type=positive_int, default=3)
    p.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
    p.add_argument("--precision", default=None)
    p.add_argument("--threads", type=positive_int, default=None)
    args = p.parse_args(argv)
    width, height = args.size or (None, None)
    options = GenerateOptions(prompts=("a photo of a cat",), steps=args.steps, num_images=args.num_images,
                              width=width, height=height)  # fmt: skip
    try:
        backend = BackendConfig(args.backend, precision=args.precision, threads=args.threads).validate()
        cost = measure_cost(args.bundle, options, args.runs, backend)
    except (RequestError, SetupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_status(exc)
    print(cpu_summary())
    print(f"clip_score {cost.clip_score_s:.4f} s of {cost.generation_s:.3f} s per generation "
          f"({100 * cost.fraction:.2f} %): {args.num_images} image(s), {args.steps} steps, "
          f"{args.backend}, median of {args.runs}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
