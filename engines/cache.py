"""The engine directory: which engines need (re)building, and atomic writes of plans and manifest.

An engine is up to date only if its manifest entry has the key this GPU, TensorRT and ONNX would
give it, was built with the same settings, and its plan file still has the recorded sha256.
Everything is written to a temp file in the same directory and renamed, so a crash never leaves
a half-written plan or manifest behind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines.profiles import ProfileRequest, model_profiles, profile_label
from runtime.backends.trt_manifest import (
    MANIFEST,
    PRECISION,
    EngineEntry,
    GpuEnvironment,
    SourceOnnx,
    cache_key,
    manifest_text,
    source_onnx,
    stale_reasons,
)
from runtime.backends.trt_shapes import Profile
from runtime.bundle import Bundle
from runtime.files import sha256_file, write_atomic

FLAGS = {"precision": PRECISION, "strongly_typed": True}  # what TensorRT 11 builds, set explicitly on 10
# `--refittable`: every weight can be replaced after the build (trt.Refitter), which is how LoRAs
# reach a TensorRT engine (runtime/backends/trt_refit.py); it may cost speed, so it is opt-in.
# Only set when asked, so that the keys of engines built without it stay what they were.
REFITTABLE = {**FLAGS, "refittable": True}


def build_flags(refittable: bool) -> dict[str, Any]:
    return dict(REFITTABLE if refittable else FLAGS)


@dataclass(frozen=True)
class BuildJob:
    name: str
    model: str
    onnx: Path
    source: SourceOnnx
    profiles: tuple[Profile, ...]
    settings: dict[str, Any]  # opt_level, workspace_gb
    key: str
    reason: str  # why it is built: "new", or what made the old engine stale
    flags: dict[str, Any] = field(default_factory=lambda: dict(FLAGS))  # part of the key


def save_manifest(engine_dir: Path, entries: dict[str, EngineEntry]) -> None:
    write_atomic(engine_dir / MANIFEST, manifest_text(entries))


def rebuild_reason(
    entry: EngineEntry | None, job_key: str, settings: dict[str, Any], engine_dir: Path
) -> str | None:
    """Why the engine must be built, or None if `entry` is up to date."""
    if entry is None:
        return "new"
    if entry.key != job_key:
        return "profiles or flags changed"
    if entry.settings != settings:
        return f"build settings changed ({entry.settings} -> {settings})"
    plan = engine_dir / entry.plan
    if not plan.is_file():
        return "plan file missing"
    if plan.stat().st_size != entry.plan_bytes or sha256_file(plan) != entry.plan_sha256:
        return "plan file corrupt"
    return None


def plan_jobs(
    bundle: Bundle,
    request: ProfileRequest | None,
    settings: dict[str, Any],
    env: GpuEnvironment,
    entries: dict[str, EngineEntry],
    engine_dir: Path,
    rebuild_stale: bool,
    force: bool = False,
    check_plan: Callable[[Path], str | None] | None = None,
    flags: dict[str, Any] | None = None,
) -> tuple[list[BuildJob], list[str]]:
    """(jobs to build, names already up to date). `request` asks for one engine per bundle model;
    `rebuild_stale` also rebuilds every existing engine that is stale or corrupt here, with its
    own profiles and settings. `force` rebuilds whatever is asked for even if it is up to date;
    `check_plan(path)` says why an up-to-date-looking plan cannot load here (None if it can).
    `flags` (default FLAGS) are those of the requested engines; a stale one keeps its own."""
    asked = dict(FLAGS if flags is None else flags)
    wanted: list[tuple[str, tuple[Profile, ...], dict[str, Any], dict[str, Any]]] = []
    if request is not None:
        wanted += [(m, model_profiles(bundle, m, request), settings, asked) for m in bundle.models]
    if rebuild_stale:
        wanted += [
            (e.model, e.profiles, e.settings, e.flags) for e in entries.values() if e.model in bundle.models
        ]
    jobs: dict[str, BuildJob] = {}
    current: list[str] = []
    for model, profiles, job_settings, job_flags in wanted:
        name = f"{model}.{profile_label(profiles, bundle.vae_scale_factor)}"
        if name in jobs or name in current:
            continue
        source = source_onnx(bundle, model)
        key = cache_key(source, env, profiles, job_flags)
        old = entries.get(name)
        stale = stale_reasons(old, env, source) if old is not None else []  # what the backend refuses
        reason = "; ".join(stale) or rebuild_reason(old, key, job_settings, engine_dir)
        if reason is None and force:
            reason = "--force"
        if reason is None and check_plan is not None and old is not None:
            reason = check_plan(engine_dir / old.plan)
        if reason is None:
            current.append(name)
            continue
        onnx = bundle.verified_path(bundle.graph(model, PRECISION))
        jobs[name] = BuildJob(name, model, onnx, source, profiles, job_settings, key, reason, dict(job_flags))
    return list(jobs.values()), current
