"""python -m engines.build BUNDLE: build, or bring up to date, the bundle's TensorRT engines.

The command only: parsing, reporting, exit codes. What it runs lives in engines/cache.py (which
engines to build) and engines/builder.py (building them with TensorRT).

Exit codes: 0 done; 2 bad arguments, bundle or engine manifest; 3 TensorRT, cuda-python or a CUDA
GPU unavailable (or a CUDA call failed); 4 TensorRT failed to build an engine; 5 a file could not
be read or written.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from engines.builder import Built, EngineBuildError, plan_loads, run_jobs
from engines.cache import build_flags, plan_jobs
from engines.profiles import ProfileRequest, parse_batch, parse_dynamic, parse_shapes
from runtime.backends.base import BackendError
from runtime.backends.tensorrt import probe_environment
from runtime.backends.trt_manifest import DEFAULT_DIR, read_manifest
from runtime.bundle import Bundle
from runtime.errors import SetupError

log = logging.getLogger(__name__)
T = TypeVar("T")
TIMING_CACHE = "timing.cache"


def _arg(parse: Callable[[str], T]) -> Callable[[str], T]:
    def wrapped(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return wrapped


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m engines.build",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("bundle", type=Path, help="bundle directory from `python -m export` (with *.fp16.onnx)")
    p.add_argument(
        "--engine-dir", type=Path, default=None, help=f"plans + manifest.json (default: BUNDLE/{DEFAULT_DIR})"
    )
    p.add_argument(
        "--shapes",
        type=_arg(parse_shapes),
        default=(),
        help="WIDTHxHEIGHT[,...]: one static profile per image size (default: the bundle's size)",
    )
    p.add_argument(
        "--batch",
        type=_arg(parse_batch),
        default=None,
        help="MIN-MAX rows per engine call (UNet rows = 2 x images with CFG; default: the bundle's)",
    )
    p.add_argument(
        "--dynamic",
        type=_arg(parse_dynamic),
        default=None,
        help="MIN-MAX pixels: one ranged profile for any height and width in it",
    )
    p.add_argument("--timing-cache", type=Path, default=None, help=f"default: ENGINE_DIR/{TIMING_CACHE}")
    p.add_argument(
        "--opt-level",
        type=int,
        choices=range(6),
        default=None,
        help="builder optimisation level (TensorRT's default: 3)",
    )
    p.add_argument("--workspace", type=float, default=None, help="workspace memory limit in GB")
    p.add_argument(
        "--refittable",
        action="store_true",
        help="build engines whose weights can be replaced in place (trt.Refitter), which LoRAs on "
        "TensorRT need; may run slower (not measured here: see the README); recorded in the manifest",
    )
    p.add_argument(
        "--rebuild-stale",
        action="store_true",
        help="also rebuild every engine in the manifest that is stale, corrupt, or that this TensorRT "
        "cannot deserialize (alone: only those)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="rebuild the engines this command names even if they look up to date (with --rebuild-stale "
        "alone: every engine in the manifest)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def _request(args: argparse.Namespace) -> ProfileRequest | None:
    if args.rebuild_stale and not (args.shapes or args.batch or args.dynamic):
        return None
    return ProfileRequest(shapes=args.shapes, batch=args.batch, dynamic=args.dynamic)


def _table(results: list[Built]) -> str:
    width = max([len("engine"), *(len(r.name) for r in results)])
    rows = [f"{'engine':<{width}}  {'status':<10}  {'seconds':>8}  {'MB':>8}"]
    rows += [
        f"{r.name:<{width}}  {r.status:<10}  {r.seconds:8.1f}  {r.plan_bytes / 1e6:8.1f}" for r in results
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        bundle = Bundle.open(args.bundle)
        engine_dir = args.engine_dir or bundle.root / DEFAULT_DIR
        env = probe_environment()
        log.info(
            "TensorRT %s (%s) on %s (compute capability %s), CUDA runtime %s, driver %s",
            env.tensorrt,
            env.tensorrt_cuda,
            env.gpu,
            env.compute_capability,
            env.cuda_runtime,
            env.cuda_driver,
        )
        entries = read_manifest(engine_dir)
        settings = {"opt_level": args.opt_level, "workspace_gb": args.workspace}
        jobs, current = plan_jobs(
            bundle,
            _request(args),
            settings,
            env,
            entries,
            engine_dir,
            args.rebuild_stale,
            force=args.force,
            check_plan=plan_loads if args.rebuild_stale else None,
            flags=build_flags(args.refittable),
        )
        results = [Built(name, "up to date", 0.0, entries[name].plan_bytes) for name in current]
        timing_cache = args.timing_cache or engine_dir / TIMING_CACHE
        results += run_jobs(jobs, bundle, engine_dir, entries, env, timing_cache)
    except BackendError as exc:  # TensorRTUnavailable, or a CUDA call failing
        log.error("error: %s", exc)
        return 3
    except (ValueError, SetupError) as exc:  # arguments; the bundle, its files, the engine manifest
        log.error("error: %s", exc)
        return 2
    except EngineBuildError as exc:
        log.error("error: %s", exc)
        return 4
    except OSError as exc:
        log.error("error: %s", exc)
        return 5
    print(_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
