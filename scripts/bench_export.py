"""Time the full export (all four models, fp32 + fp16) and report seconds and peak RSS per stage.

    python scripts/bench_export.py [--model sd15] [--out bundles/sd15] [--json out/bench_export.json]

Targets for sd15 on a 2-core, 24 GiB machine: <= 10 min in total and <= 12 GB peak RSS.
Always re-exports (reuse is disabled), so the numbers measure the export itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.build import ExportOptions, export_bundle  # noqa: E402

TARGET_SECONDS, TARGET_RSS = 600.0, 12e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sd15")
    p.add_argument("--out", type=Path, default=Path("bundles/sd15"))
    p.add_argument("--json", type=Path, default=Path("out/bench_export.json"))
    p.add_argument("--precision", default="both", choices=("fp32", "fp16", "both"))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    start = time.perf_counter()
    result = export_bundle(
        ExportOptions(model=args.model, out=args.out, precision=args.precision, force=True)
    )
    wall = time.perf_counter() - start

    print(f"\n{'stage':<28} {'seconds':>8} {'peak RSS GB':>12}")
    for r in result.stages:
        print(f"{r.name:<28} {r.seconds:8.1f} {r.peak_rss_bytes / 1e9:12.2f}")
    peak = result.peak_rss_bytes
    print(f"{'total':<28} {wall:8.1f} {peak / 1e9:12.2f}")
    sizes = {
        entry.file: entry.bytes + (entry.external_data_bytes or 0)
        for model in result.manifest.models.values()
        for entry in model.files.values()
    }
    report = {
        "model": args.model,
        "precision": args.precision,
        "wall_seconds": round(wall, 1),
        "peak_rss_bytes": peak,
        "within_targets": wall <= TARGET_SECONDS and peak <= TARGET_RSS,
        "stages": [
            {"name": r.name, "seconds": round(r.seconds, 2), "peak_rss_bytes": r.peak_rss_bytes}
            for r in result.stages
        ],
        "file_bytes": sizes,
        "warnings": list(result.manifest.warnings),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"targets (<= {TARGET_SECONDS:.0f} s, <= {TARGET_RSS / 1e9:.0f} GB): "
        f"{'met' if report['within_targets'] else 'MISSED'}; wrote {args.json}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
