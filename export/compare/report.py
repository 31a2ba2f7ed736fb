"""report.json (every number, for machines and tests) and report.md (the same, for people).

The Markdown is rendered from the JSON dict alone, so the two can never disagree.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from export.compare.settings import IMAGE_STAGES

IMPLEMENTATIONS = ("pytorch_fp32", "pytorch_bf16", "runtime")
# what the runtime runs on for each CPU backend, as the report names it
_CPU_ENGINES = {"onnxruntime": "ONNX Runtime, CPU provider", "openvino": "OpenVINO, CPU plugin"}


def jsonable(value: Any) -> Any:
    """Strict JSON: inf / nan become the strings "inf" / "nan" (json.dumps would write Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def write(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    json_path, md_path = out / "report.json", out / "report.md"
    json_path.write_text(json.dumps(jsonable(report), indent=2, allow_nan=False) + "\n")
    md_path.write_text(markdown(report))
    return json_path, md_path


# -- formatting --


def _num(x: Any, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, str):
        return x
    if isinstance(x, float) and not math.isfinite(x):
        return "∞" if x > 0 else str(x)
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}g}" if x != 0 else "0"


def _cos(x: float) -> str:
    return f"{x:.8f}"


def _ms(stats: dict[str, Any] | None, key: str = "median_s") -> str:
    return "—" if stats is None else f"{stats[key] * 1e3:.1f}"


def _ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}x"


def _gib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**30:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _output_table(
    components: dict[str, dict[str, dict[str, Any]]],
    header: list[str],
    cells: Callable[[str, dict[str, Any], float], list[str]],
) -> list[str]:
    """A row per model output: `component.output`, then cells(label, metrics, cosine) under `header`.

    The cosine is the smallest per position where the metrics have one (the deprojector's 77),
    else the one over whole batch rows.
    """
    rows = []
    for component, outputs in components.items():
        for output, m in outputs.items():
            label = f"{component}.{output}"
            rows.append([f"`{label}`", *cells(label, m, m.get("min_position_cosine", m["cosine"]))])
    return _table(["output", *header], rows)


def _check_for(checks: list[dict[str, Any]], prefix: str) -> str:
    mine = [c for c in checks if c["name"].startswith(prefix)]
    if not mine:
        return "not gated"
    return "pass" if all(c["passed"] for c in mine) else "**FAIL**"


# -- sections --


def _header(r: dict[str, Any]) -> list[str]:
    s, setup = r["settings"], r["setup"]
    failed = [c for c in r["checks"] if not c["passed"]]
    verdict = "**PASS**" if r["passed"] else f"**FAIL** ({len(failed)} of {len(r['checks'])} checks failed)"
    lines = [
        f"# Runtime vs PyTorch: {setup['model_label']}, {s['backend']} {s['precision']}",
        "",
        f"Result: {verdict}",
        "",
    ]
    if failed:
        lines += [
            f"- failed: {c['name']} = {_num(c['value'], 6)} (gate {c['op']} {_num(c['limit'], 6)})"
            for c in failed
        ] + [""]
    lines += _table(
        ["setting", "value"],
        [
            ["model", setup["model_label"] + (" — **random weights**" if setup["random_weights"] else "")],
            ["bundle", f"`{s['bundle']}`"],
            ["deprojector", setup["deprojector"]],
            ["backend / precision", f"{s['backend']} / {s['precision']}"],
            [
                "image",
                f"{s['width']}x{s['height']}, {s['steps']} steps, {s['scheduler']}, "
                f"guidance {s['guidance']}, mode {s['mode']}, latent seed {s['seed']}",
            ],
            ["workload", _workload(r["workload"])],
            ["prompt / negative", f"{s['prompt']!r} / {s['negative']!r}"],
            [
                "machine",
                f"PyTorch on {setup['cpu']} ({s['threads']} threads), the runtime on the GPU (TensorRT)"
                if s["backend"] == "tensorrt"
                else f"{setup['cpu']}, {s['threads']} threads for PyTorch and for the runtime "
                f"({_CPU_ENGINES.get(s['backend'], s['backend'])})",
            ],
            [
                "timing",
                f"{s['runs']} timed runs after 1 warm-up run (PyTorch fp32 and the runtime: the accuracy "
                "run; bf16: a discarded run)",
            ],
            ["packages", ", ".join(f"{k} {v}" for k, v in setup["packages"].items())],
        ],
    )
    return lines + [""]


def _workload(w: dict[str, Any]) -> str:
    """The end-to-end workload in words: what is generated, from what, by which diffusers pipeline."""
    if w["strength"] is None:
        return f"text to image (diffusers' {w['pytorch_pipeline']})"
    what = "inpainting" if w["mask"] else "img2img"
    source = f"init image `{w['init_image']}`"
    if w["mask"]:
        source += f", mask `{w['mask_image']}` (mask mode {w['mask_mode']})"
    return (
        f"{what} at strength {w['strength']:g}: {w['steps_run']} steps run, {source} "
        f"(diffusers' {w['pytorch_pipeline']})"
    )


def _accuracy(r: dict[str, Any]) -> list[str]:
    acc, checks = r["accuracy"], r["checks"]
    lines = [
        "## Accuracy per component",
        "",
        "Same input arrays into the PyTorch module the exporter traced and into the runtime backend. "
        "Cosine: smallest over batch rows (flattened); deprojector: smallest over its 77 positions.",
        "",
    ]
    lines += _output_table(
        acc["components"],
        ["shape", "max abs", "mean abs", "cosine", "1 - cosine", "PyTorch max |x|", "gate"],
        lambda label, m, cosine: [
            "x".join(map(str, m["shape"])),
            _num(m["max_abs"]),
            _num(m["mean_abs"]),
            _cos(cosine),
            _num(1 - cosine, 2),
            _num(m["ref_max_abs"]),
            _check_for(checks, label + " "),
        ],
    )
    skipped = r["setup"].get("skipped_components", {})
    if skipped:
        lines += [""] + [f"Not compared: `{name}`: {why}." for name, why in skipped.items()]
    dep = acc["components"].get("deprojector", {}).get("hidden_states")
    if dep:
        worst = max(range(len(dep["per_position_max_abs"])), key=lambda i: dep["per_position_max_abs"][i])
        lines += [
            "",
            f"Deprojector per position: largest max abs {_num(dep['per_position_max_abs'][worst])} "
            f"at position {worst}; smallest cosine {_cos(dep['min_position_cosine'])}.",
            "",
            "![deprojector per position](deprojector_positions.png)",
        ]
    return lines + [""]


def _end_to_end(r: dict[str, Any]) -> list[str]:
    e2e, checks = r["accuracy"]["end_to_end"], r["checks"]
    image, drift, score = e2e["image"], e2e["latent_drift"], e2e["clip_score"]
    w = r["workload"]
    if w["strength"] is None:
        start = f"diffusers' {w['pytorch_pipeline']} from the same initial latents"
    else:
        start = f"diffusers' {w['pytorch_pipeline']} with the same random numbers ({w['random_numbers']})"
    lines = [
        "## End to end",
        "",
        f"The runtime's denoising loop and {start}, prompt states computed by each side, the same "
        "scheduler; latents captured after every step each side runs (runtime `on_step`, diffusers "
        "`callback_on_step_end`).",
        "",
    ]
    clip = (
        f"PyTorch {score['pytorch']:.2f}, runtime {score['runtime']:.2f} ({score['source']})"
        if "pytorch" in score
        else score["status"]
    )
    rows = [
        [
            "max pixel difference (of 255)",
            _num(image["max_pixel_diff"]),
            _check_for(checks, "image max pixel"),
        ],
        ["mean pixel difference (of 255)", _num(image["mean_pixel_diff"]), "not gated"],
        ["PSNR (dB)", _num(image["psnr_db"], 4), _check_for(checks, "image PSNR")],
        ["SSIM", _num(image["ssim"], 6), _check_for(checks, "image SSIM")],
        ["final latents max abs", _num(drift["max_abs"][-1] if drift["max_abs"] else None), "not gated"],
        ["final latents relative L2", _num(drift["rel_l2"][-1] if drift["rel_l2"] else None), "not gated"],
        ["CLIP score", clip, "not gated"],
    ]
    if not e2e["schedule_match"]:
        rows.append(
            [
                "schedule",
                f"runtime {e2e['runtime_timesteps']} vs diffusers {e2e['pytorch_timesteps']}",
                _check_for(checks, "schedule"),
            ]
        )
    lines += _table(["metric", "value", "gate"], rows)
    lines += [
        "",
        "![latent drift per step](latent_drift.png)",
        "",
        "PyTorch | runtime | |difference| x 10:",
        "",
        "![image grid](image_grid.png)",
        "",
    ]
    return lines


def _score(score: dict[str, Any]) -> tuple[str, str]:
    """(PyTorch, runtime) CLIP scores, or the reason there are none in both cells."""
    if "pytorch" not in score:
        return score["status"], score["status"]
    return f"{score['pytorch']:.2f}", f"{score['runtime']:.2f}"


def _clip_guidance(r: dict[str, Any]) -> list[str]:
    """--clip-guidance: the guided images of both sides and the CLIP scores with and without."""
    g = r["accuracy"].get("clip_guidance")
    if g is None:
        return []
    image, runtime = g["image"], g["runtime"]
    plain = r["speed"]["end_to_end"]["runtime"]["total"]["median_s"]
    lines = [
        "## CLIP guidance",
        "",
        f"Scale {g['scale']:g}, the first {g['skip']} steps unguided; both sides from the same latents "
        "(PyTorch: export/reference_guidance.py, autograd through the VAE decoder and the image tower; "
        "runtime: the bundle's clip_guidance graph). Not gated.",
        "",
    ]
    lines += _table(
        ["", "PyTorch", "runtime"],
        [
            ["CLIP score, unguided", *_score(g["clip_score_unguided"])],
            ["CLIP score, guided", *_score(g["clip_score"])],
            ["seconds for the guided image (one run)", _num(g["pytorch_seconds"]), _num(runtime["total_s"])],
        ],
    )
    lines += [
        "",
        f"Guided images: max pixel difference {_num(image['max_pixel_diff'])} of 255, PSNR "
        f"{_num(image['psnr_db'], 4)} dB (`pytorch-guided.png`, `runtime-guided.png`)."
        + f" The runtime's unguided run: median {_num(plain)} s.",
        "",
    ]
    return lines


def _speed(r: dict[str, Any]) -> list[str]:
    sp = r["speed"]
    lines = [
        "## Speed",
        "",
        "Milliseconds, median and p95 over the timed runs (p95 interpolates linearly, so with few runs it is "
        "close to the slowest). Speed-up = PyTorch median / runtime median (> 1: the runtime is faster).",
        "",
    ]
    rows = []
    for component, c in sp["components"].items():
        rows.append(
            [
                f"`{component}`",
                _ms(c["pytorch_fp32"]),
                _ms(c["pytorch_fp32"], "p95_s"),
                _ms(c["pytorch_bf16"]),
                _ms(c["pytorch_bf16"], "p95_s"),
                _ms(c["runtime"]),
                _ms(c["runtime"], "p95_s"),
                _ratio(c["speedup_vs_fp32"]),
                _ratio(c["speedup_vs_bf16"]),
                f"{c['runtime']['cold_s']:.2f} s",
            ]
        )
    lines += _table(
        [
            "component",
            "PyTorch fp32",
            "p95",
            "PyTorch bf16",
            "p95",
            "runtime",
            "p95",
            "vs fp32",
            "vs bf16",
            "runtime first call (load)",
        ],
        rows,
    )
    e = sp["end_to_end"]
    stages = [stage for stage in IMAGE_STAGES if stage in e["runtime"]["stages"]]
    encode = " + init image encoding (VAE encoder, start latents)" if "encode" in stages else ""
    lines += ["", f"End to end (text encoding{encode} + denoising loop + VAE decode, one image):", ""]
    rows = []
    for impl in IMPLEMENTATIONS:
        run = e.get(impl)
        if run is None:
            rows.append([impl, "—", "—"] + ["—"] * len(stages))
            continue
        rows.append(
            [impl, _ms(run["total"]), _ms(run["total"], "p95_s")]
            + [_ms(run["stages"][stage]) for stage in stages]
        )
    lines += _table(["implementation", "total", "p95"] + [f"{stage} (median)" for stage in stages], rows)
    lines += [
        "",
        f"Runtime speed-up end to end: {_ratio(e['speedup_vs_fp32'])} vs PyTorch fp32, "
        f"{_ratio(e['speedup_vs_bf16'])} vs PyTorch bf16.",
        "",
        "![time per stage](stage_times.png)",
        "",
    ]
    mem = r["memory"]
    rows = [
        [impl, _gib(m["baseline_bytes"]), _gib(m["peak_bytes"]), _gib(m["peak_bytes"] - m["baseline_bytes"])]
        for impl, m in mem["processes"].items()
        if m is not None
    ]
    lines += ["### Peak memory (RSS, GiB)", ""] + _table(
        ["measured", "baseline (libraries loaded)", "peak", "peak - baseline"], rows
    )
    lines += ["", mem["method"], ""]
    return lines


def _bf16(r: dict[str, Any]) -> list[str]:
    ctx = r["accuracy"].get("pytorch_bf16_vs_fp32")
    if not ctx:
        return []
    lines = [
        "## Context: PyTorch bf16 vs PyTorch fp32 (not gated)",
        "",
        "How far PyTorch's own low-precision path is from fp32, on the same inputs.",
        "",
    ]
    lines += _output_table(
        ctx["components"], ["max abs", "cosine"], lambda label, m, cosine: [_num(m["max_abs"]), _cos(cosine)]
    )
    img = ctx["image"]
    lines += [
        "",
        f"Image: max pixel difference {img['max_pixel_diff']}, PSNR {_num(img['psnr_db'], 4)} dB, "
        f"SSIM {_num(img['ssim'], 6)}.",
        "",
    ]
    return lines


def _variants(r: dict[str, Any]) -> list[str]:
    rows = [
        [
            v["variant"],
            str(v["max_pixel_diff"]),
            _num(v["psnr_db"], 4),
            _num(v["ssim"], 4),
            _num(v["final_latent_max_abs"]),
            _num(v["final_latent_rel_l2"]),
            f"{v['median_s']:.3f}",
            _ratio(v["speedup_vs_exact"]),
        ]
        for v in r["accuracy"]["variants"]
    ]
    if len(rows) < 2:
        return []
    header = ["variant", "max pixel diff", "PSNR dB", "SSIM", "final latent max abs", "final latent rel L2",
              "end to end s (median)", "speed vs runtime"]  # fmt: skip
    return (
        [
            "## Variants vs the exact PyTorch fp32 image (not gated)",
            "",
            "Each way of computing the image from the same start, against PyTorch fp32. Step caching "
            "(cache interval N): the whole UNet every N-th step, its shallow part in between.",
            "",
        ]
        + _table(header, rows)
        + [""]
    )


def _checks(r: dict[str, Any]) -> list[str]:
    rows = [
        [
            c["name"],
            _num(c["value"], 6),
            f"{c['op']} {_num(c['limit'], 6)}",
            "pass" if c["passed"] else "**FAIL**",
        ]
        for c in r["checks"]
    ]
    return (
        ["## Checks", "", "Exit code 0 when every check passes, 1 otherwise.", ""]
        + _table(["check", "value", "gate", "result"], rows)
        + [""]
    )


def markdown(r: dict[str, Any]) -> str:
    sections = [
        _header(r), _accuracy(r), _end_to_end(r), _clip_guidance(r), _speed(r), _bf16(r), _variants(r),
        _checks(r),
    ]  # fmt: skip
    return "\n".join(line for section in sections for line in section)
