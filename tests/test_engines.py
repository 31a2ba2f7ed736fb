"""The TensorRT path's pure logic, without TensorRT or a GPU: CLI parsing, profiles, routing,
cache keys, staleness, the manifest and atomic writes. The backend's CUDA work runs against fake
TensorRT and CUDA modules in tests/test_trt_fake.py; the GPU half is tests/test_engines_gpu.py."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from engines.build import main, parse_args
from engines.builder import EngineBuildError, network_flags
from engines.cache import FLAGS, plan_jobs, rebuild_reason, save_manifest
from engines.profiles import (
    ProfileRequest,
    model_profiles,
    parse_batch,
    parse_dynamic,
    parse_shapes,
    profile_label,
)
from runtime.backends import BackendConfig, BackendError, open_backend
from runtime.backends import tensorrt as trt_backend
from runtime.backends.trt_manifest import (
    EngineEntry,
    EngineManifestError,
    GpuEnvironment,
    build_command,
    cache_key,
    entry_key,
    manifest_text,
    read_manifest,
    source_onnx,
    stale_reasons,
)
from runtime.backends.trt_shapes import (
    NoProfile,
    input_ranges,
    max_input_shapes,
    nbytes,
    pick_profile,
    plan_calls,
    profile_arguments,
    request_dims,
)
from runtime.bundle import Bundle, DimRange
from runtime.errors import RequestError, SetupError
from runtime.files import sha256_file, write_atomic
from runtime.manifest import DeprojectorManifest, FileEntry, Manifest, ModelManifest, TokenizerManifest
from runtime.schedulers import SD15_SCHEDULER
from runtime.specs import clip_spec, deprojector_spec, unet_spec, vae_decoder_spec, vae_encoder_spec

ENV = GpuEnvironment("10.16.1.11", "cu13", "13.0", "13.1", "NVIDIA H100 80GB HBM3", "9.0")
BATCH = DimRange(1, 2, 8)
LATENT = DimRange(8, 64, 128)
TOKENS = DimRange(77, 77, 231)
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


@pytest.fixture
def bundle(tmp_path: Path) -> Bundle:
    """A bundle with SD 1.5's shape ranges (512 px default, 64-1024 px) whose ONNX files are empty
    (nothing here parses them)."""
    root = tmp_path / "bundle"
    for folder in ("tokenizer", "deprojector_checkpoint"):
        (root / folder).mkdir(parents=True)
    specs = {
        "clip": clip_spec(64, 64),
        "deprojector": deprojector_spec(64),
        "unet": unet_spec(64),
        "vae_decoder": vae_decoder_spec(),
        "vae_encoder": vae_encoder_spec(),
    }
    pixels = DimRange(LATENT.min * 8, LATENT.opt * 8, LATENT.max * 8)
    dims = {
        "clip": {"batch": BATCH, "tokens": TOKENS},
        "deprojector": {"batch": BATCH},
        "unet": {"batch": BATCH, "height": LATENT, "width": LATENT, "tokens": TOKENS},
        "vae_decoder": {"batch": replace(BATCH, opt=1), "height": LATENT, "width": LATENT},
        "vae_encoder": {"batch": replace(BATCH, opt=1), "image_height": pixels, "image_width": pixels},
    }
    models = {}
    for name, spec in specs.items():
        files = {}
        for precision, suffix in (("fp32", ".onnx"), ("fp16", ".fp16.onnx")):
            (root / f"{name}{suffix}").write_bytes(b"")
            files[precision] = FileEntry(f"{name}{suffix}", EMPTY_SHA256, 0)
        models[name] = ModelManifest(spec=spec, dims=dims[name], opset=18, files=files)
    manifest = Manifest(
        hidden_size=64,
        projection_dim=64,
        latent_channels=4,
        vae_scale_factor=8,
        vae_scaling=0.18215,
        sample_size=64,
        latent_multiple=2,
        scheduler=SD15_SCHEDULER,
        tokenizer=TokenizerManifest("tokenizer", 77, 49406, 49407, 49407, {}),
        deprojector=DeprojectorManifest("fake", "fake", "pooled", "deprojector_checkpoint", {}),
        models=models,
    )
    (root / "manifest.json").write_text(manifest.dumps())
    return Bundle.open(root)


def _entry(bundle: Bundle, model: str = "unet", env: GpuEnvironment = ENV, **request: object) -> EngineEntry:
    profiles = model_profiles(bundle, model, ProfileRequest(**request))  # type: ignore[arg-type]
    source = source_onnx(bundle, model)
    name = f"{model}.{profile_label(profiles, 8)}"
    return EngineEntry(
        name,
        model,
        f"{name}.plan",
        "0" * 64,
        0,
        source,
        profiles,
        dict(FLAGS),
        {"opt_level": None, "workspace_gb": None},
        env,
        1.0,
        cache_key(source, env, profiles, FLAGS),
    )


# --- command-line values -------------------------------------------------------------------------


def test_parse_shapes_is_width_by_height_and_deduplicated():
    assert parse_shapes("512x512, 768X512,512x512") == ((512, 512), (768, 512))


@pytest.mark.parametrize("text", ["512", "512x", "ax512", "0x512", "512x-8"])
def test_parse_shapes_rejects_malformed(text):
    with pytest.raises(ValueError, match="--shapes"):
        parse_shapes(text)


def test_parse_ranges():
    assert parse_batch("1-4") == (1, 4)
    assert parse_batch("2") == (2, 2)
    assert parse_dynamic("256-1024") == (256, 1024)
    for bad in ("4-1", "x", "0-2", ""):
        with pytest.raises(ValueError):
            parse_batch(bad)


def test_cli_rejects_bad_values_with_status_2():
    with pytest.raises(SystemExit) as exc:
        parse_args(["b", "--shapes", "512"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        parse_args(["b", "--opt-level", "9"])
    args = parse_args(
        ["b", "--shapes", "512x768", "--batch", "1-4", "--dynamic", "256-512", "--rebuild-stale"]
    )
    assert args.shapes == ((512, 768),) and args.batch == (1, 4) and args.dynamic == (256, 512)


# --- profiles ------------------------------------------------------------------------------------


def test_default_profile_is_the_bundles_size_and_ranges(bundle):
    (unet,) = model_profiles(bundle, "unet", ProfileRequest())
    assert unet["height"] == unet["width"] == DimRange(64, 64, 64)
    assert unet["batch"] == DimRange(1, 2, 8) and unet["tokens"] == DimRange(77, 77, 231)
    assert model_profiles(bundle, "clip", ProfileRequest()) == (
        {"batch": DimRange(1, 2, 8), "tokens": DimRange(77, 77, 231)},
    )


def test_shapes_batch_and_dynamic_profiles(bundle):
    request = ProfileRequest(shapes=((512, 512), (768, 512)), batch=(1, 4), dynamic=(256, 1024))
    static_a, static_b, ranged = model_profiles(bundle, "unet", request)
    assert (static_b["width"], static_b["height"]) == (DimRange(96, 96, 96), DimRange(64, 64, 64))
    assert static_a["batch"] == DimRange(1, 2, 4)
    assert ranged["height"] == ranged["width"] == DimRange(32, 64, 128)
    # models without spatial dims get one profile, whatever the sizes
    assert len(model_profiles(bundle, "clip", request)) == 1
    assert profile_label((static_a, static_b, ranged), 8) == "b1-4.512x512+768x512+dyn256-1024"
    assert profile_label(model_profiles(bundle, "clip", ProfileRequest(batch=(2, 2))), 8) == "b2"


def test_vae_encoder_profiles_are_in_pixels(bundle):
    """Its input is the image: the same --shapes and --dynamic, applied to pixel dims."""
    (default,) = model_profiles(bundle, "vae_encoder", ProfileRequest())
    assert default["image_height"] == default["image_width"] == DimRange(512, 512, 512)
    request = ProfileRequest(shapes=((768, 512),), dynamic=(256, 1024))
    static, ranged = model_profiles(bundle, "vae_encoder", request)
    assert (static["image_width"], static["image_height"]) == (
        DimRange(768, 768, 768),
        DimRange(512, 512, 512),
    )
    assert ranged["image_height"] == DimRange(256, 512, 1024)
    assert profile_label((static, ranged), 8) == "b1-8.768x512+dyn256-1024"
    with pytest.raises(ValueError, match="multiple of 8"):
        model_profiles(bundle, "vae_encoder", ProfileRequest(shapes=((500, 512),)))
    args = profile_arguments({"batch": 1, "image_height": 512, "image_width": 640}, (static,), 8)
    assert args == ["--shapes", "640x512"]


@pytest.mark.parametrize(
    "request_, match",
    [
        (ProfileRequest(shapes=((500, 512),)), "multiple of 8"),
        (ProfileRequest(shapes=((2048, 512),)), "outside the bundle's range 64-1024"),
        (ProfileRequest(dynamic=(32, 512)), "outside"),
        (ProfileRequest(batch=(1, 16)), "--batch"),
    ],
)
def test_profiles_outside_the_bundle_are_refused(bundle, request_, match):
    with pytest.raises(ValueError, match=match):
        model_profiles(bundle, "unet", request_)


def test_input_ranges_and_buffer_shapes(bundle):
    spec = bundle.models["unet"].spec
    profiles = model_profiles(
        bundle, "unet", ProfileRequest(shapes=((512, 512),), dynamic=(256, 768), batch=(1, 4))
    )
    ranges = input_ranges(spec, profiles[0])
    assert ranges["sample"] == ((1, 4, 64, 64), (2, 4, 64, 64), (4, 4, 64, 64))
    assert ranges["encoder_hidden_states"][2] == (4, 231, 64)
    assert "timestep" not in ranges  # static inputs need no profile
    largest = max_input_shapes(spec, profiles)
    assert largest["sample"] == (4, 4, 96, 96) and largest["timestep"] == (1,)
    assert nbytes(largest["sample"], 4) == 4 * 4 * 96 * 96 * 4


# --- routing -------------------------------------------------------------------------------------


def _unet_shapes(batch: int, h: int, w: int, tokens: int = 77) -> dict[str, tuple[int, ...]]:
    return {"sample": (batch, 4, h, w), "timestep": (1,), "encoder_hidden_states": (batch, tokens, 64)}


def test_request_dims_must_agree(bundle):
    spec = bundle.models["unet"].spec
    assert request_dims(spec, _unet_shapes(2, 64, 48)) == {
        "batch": 2,
        "height": 64,
        "width": 48,
        "tokens": 77,
    }
    with pytest.raises(ValueError, match="'batch' is 2 in one input and 3"):
        request_dims(spec, {**_unet_shapes(2, 64, 64), "encoder_hidden_states": (3, 77, 64)})


def test_static_profile_wins_over_a_ranged_one(bundle):
    profiles = model_profiles(bundle, "unet", ProfileRequest(shapes=((512, 512),), dynamic=(256, 1024)))
    dims = {"batch": 2, "height": 64, "width": 64, "tokens": 77}
    assert pick_profile(profiles, dims) == 0
    assert pick_profile(profiles, {**dims, "width": 80}) == 1
    assert pick_profile(profiles, {**dims, "width": 136}) is None


def test_plan_calls_splits_batches_larger_than_any_profile(bundle):
    spec = bundle.models["unet"].spec
    profiles = model_profiles(bundle, "unet", ProfileRequest(batch=(1, 4)))
    assert plan_calls(spec, profiles, _unet_shapes(3, 64, 64)) == [(0, slice(0, 3))]
    assert plan_calls(spec, profiles, _unet_shapes(6, 64, 64, tokens=154)) == [
        (0, slice(0, 4)),
        (0, slice(4, 6)),
    ]


def test_plan_calls_names_what_no_profile_accepts(bundle):
    spec = bundle.models["unet"].spec
    profiles = model_profiles(bundle, "unet", ProfileRequest(batch=(2, 4)))
    with pytest.raises(NoProfile, match="height 96") as exc:
        plan_calls(spec, profiles, _unet_shapes(2, 96, 64))
    assert exc.value.dims["height"] == 96
    with pytest.raises(NoProfile, match="batch 1"):  # below every profile's minimum
        plan_calls(spec, profiles, _unet_shapes(1, 64, 64))


# --- cache keys, staleness, manifest -------------------------------------------------------------


def test_cache_key_covers_every_field_but_diagnostics(bundle):
    entry = _entry(bundle)
    base = (entry.source, ENV, entry.profiles, FLAGS)
    keys = {
        cache_key(*base),
        cache_key(replace(entry.source, sha256="other"), *base[1:]),
        cache_key(replace(entry.source, external_data_sha256="weights"), *base[1:]),
        cache_key(base[0], replace(ENV, tensorrt="11.4.0.106"), *base[2:]),
        cache_key(base[0], replace(ENV, tensorrt_cuda="cu12"), *base[2:]),  # same version string
        cache_key(base[0], replace(ENV, compute_capability="10.0"), *base[2:]),
        cache_key(*base[:2], _entry(bundle, shapes=((768, 768),)).profiles, FLAGS),
        cache_key(*base[:3], {**FLAGS, "precision": "fp8"}),
    }
    assert len(keys) == 8
    assert cache_key(*base) == entry.key == entry_key(entry, ENV, source_onnx(bundle, "unet"))
    # recorded for diagnosis, but a plan does not depend on them
    diagnostics = replace(ENV, cuda_runtime="13.1", cuda_driver="13.2", gpu="NVIDIA H200")
    assert cache_key(base[0], diagnostics, *base[2:]) == entry.key


def test_stale_reasons_say_why(bundle):
    entry = _entry(bundle)
    source = source_onnx(bundle, "unet")
    assert stale_reasons(entry, ENV, source) == []
    assert stale_reasons(entry, replace(ENV, gpu="NVIDIA A10G (other model, same arch)"), source) == []
    (reason,) = stale_reasons(entry, replace(ENV, tensorrt="11.4.0"), source)
    assert reason == "built with TensorRT 10.16.1.11, this process has 11.4.0"
    (reason,) = stale_reasons(entry, replace(ENV, tensorrt_cuda="cu12"), source)
    assert reason == "built with TensorRT 10.16.1.11 for cu13, this process has its cu12 build"
    (reason,) = stale_reasons(entry, replace(ENV, compute_capability="8.6", gpu="NVIDIA A10G"), source)
    assert "compute capability 9.0 (NVIDIA H100 80GB HBM3), this GPU is 8.6 (NVIDIA A10G)" in reason
    (reason,) = stale_reasons(entry, ENV, replace(source, external_data_sha256="new weights"))
    assert "unet.fp16.onnx or its weights changed" in reason
    (reason,) = stale_reasons(replace(entry, key="edited"), ENV, source)
    assert "manifest.json was edited" in reason


def test_manifest_without_the_cuda_variant_is_stale_until_rebuilt(bundle, tmp_path):
    """Manifests written before the variant was recorded load, and ask for a rebuild."""
    entry = _entry(bundle)
    data = json.loads(manifest_text({entry.name: entry}))
    del data["engines"][entry.name]["environment"]["tensorrt_cuda"]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    old = read_manifest(tmp_path)[entry.name]
    assert old.environment.tensorrt_cuda == ""
    (reason,) = stale_reasons(old, ENV, source_onnx(bundle, "unet"))
    assert reason == (
        "built with TensorRT 10.16.1.11 for an unrecorded CUDA variant, this process has its cu13 build"
    )


def test_build_command_is_exact(tmp_path):
    root = tmp_path / "my bundle"
    assert build_command(root, root / "engines", stale_only=True) == (
        f"python -m engines.build '{root}' --rebuild-stale"
    )
    assert build_command(root, tmp_path / "e", stale_only=False, extra=["--shapes", "640x512"]) == (
        f"python -m engines.build '{root}' --engine-dir {tmp_path / 'e'} --shapes 640x512"
    )


def test_manifest_round_trip_and_bad_files(bundle, tmp_path):
    entries = {e.name: e for e in (_entry(bundle), _entry(bundle, "clip"))}
    assert read_manifest(tmp_path) == {}
    save_manifest(tmp_path, entries)
    assert read_manifest(tmp_path) == entries
    assert json.loads(manifest_text(entries))["engines"]["clip.b1-8"]["profiles"][0]["tokens"]["max"] == 231
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(EngineManifestError, match="unreadable") as exc:
        read_manifest(tmp_path)
    assert isinstance(exc.value, SetupError) and not isinstance(exc.value, ValueError)
    (tmp_path / "manifest.json").write_text(
        json.dumps({"format": "sdrt-engines", "format_version": 1, "engines": {"x": {"model": "unet"}}})
    )
    with pytest.raises(EngineManifestError, match="malformed"):
        read_manifest(tmp_path)


def test_write_atomic_never_leaves_partial_files(tmp_path, monkeypatch):
    target = tmp_path / "a.plan"
    write_atomic(target, b"old")

    def disk_full(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("runtime.files.os.fsync", disk_full)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, b"new plan")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.plan"]


def test_rebuild_reason(bundle, tmp_path):
    entry = replace(_entry(bundle), plan_bytes=3)
    settings = entry.settings
    assert rebuild_reason(None, entry.key, settings, tmp_path) == "new"
    assert rebuild_reason(entry, "other", settings, tmp_path) == "profiles or flags changed"
    assert "settings changed" in rebuild_reason(entry, entry.key, {**settings, "opt_level": 5}, tmp_path)
    assert rebuild_reason(entry, entry.key, settings, tmp_path) == "plan file missing"
    (tmp_path / entry.plan).write_bytes(b"abc")
    assert rebuild_reason(entry, entry.key, settings, tmp_path) == "plan file corrupt"
    entry = replace(entry, plan_sha256=sha256_file(tmp_path / entry.plan))
    assert rebuild_reason(entry, entry.key, settings, tmp_path) is None


def _built(
    bundle: Bundle, engine_dir: Path, env: GpuEnvironment = ENV, **request: object
) -> dict[str, EngineEntry]:
    """Entries as if every model had been built with `request` (plans written)."""
    entries = {}
    for model in bundle.models:
        entry = _entry(bundle, model, env, **request)
        (engine_dir / entry.plan).write_bytes(model.encode())
        entries[entry.name] = replace(
            entry, plan_bytes=len(model), plan_sha256=sha256_file(engine_dir / entry.plan)
        )
    return entries


def test_plan_jobs_builds_what_is_missing_or_stale(bundle, tmp_path):
    settings = {"opt_level": None, "workspace_gb": None}
    jobs, current = plan_jobs(bundle, ProfileRequest(), settings, ENV, {}, tmp_path, rebuild_stale=False)
    assert sorted(j.name for j in jobs) == [
        "clip.b1-8",
        "deprojector.b1-8",
        "unet.b1-8.512x512",
        "vae_decoder.b1-8.512x512",
        "vae_encoder.b1-8.512x512",
    ]
    assert {j.reason for j in jobs} == {"new"} and not current
    assert jobs[0].onnx.name.endswith(".fp16.onnx")

    entries = _built(bundle, tmp_path)
    jobs, current = plan_jobs(bundle, ProfileRequest(), settings, ENV, entries, tmp_path, rebuild_stale=False)
    assert not jobs and len(current) == 5

    upgraded = replace(ENV, tensorrt="11.4.0")
    jobs, _ = plan_jobs(bundle, ProfileRequest(), settings, upgraded, entries, tmp_path, rebuild_stale=False)
    assert {j.reason for j in jobs} == {"built with TensorRT 10.16.1.11, this process has 11.4.0"}
    other_variant = replace(ENV, tensorrt_cuda="cu12")
    jobs, _ = plan_jobs(bundle, ProfileRequest(), settings, other_variant, entries, tmp_path, False)
    assert len(jobs) == 5 and all("its cu12 build" in j.reason for j in jobs)

    # whatever the backend would refuse is rebuilt, even if the recorded key was left as it was
    moved = {n: replace(e, environment=replace(ENV, compute_capability="8.0")) for n, e in entries.items()}
    jobs, _ = plan_jobs(bundle, ProfileRequest(), settings, ENV, moved, tmp_path, rebuild_stale=False)
    assert len(jobs) == 5 and all("compute capability 8.0" in j.reason for j in jobs)


def test_rebuild_stale_alone_rebuilds_only_stale_engines_with_their_own_profiles(bundle, tmp_path):
    entries = _built(bundle, tmp_path) | _built(bundle, tmp_path, shapes=((768, 768),))
    assert len(entries) == 8  # clip and deprojector engines are shared by both requests
    (tmp_path / "unet.b1-8.768x768.plan").write_bytes(b"bit rot")
    jobs, current = plan_jobs(bundle, None, {}, ENV, entries, tmp_path, rebuild_stale=True)
    assert [(j.name, j.reason) for j in jobs] == [("unet.b1-8.768x768", "plan file corrupt")]
    assert jobs[0].profiles == entries["unet.b1-8.768x768"].profiles and len(current) == 7


def test_rebuild_stale_rebuilds_plans_this_tensorrt_cannot_load(bundle, tmp_path):
    """A plan whose key and sha256 match but that TensorRT refuses (the backend's "rebuild it with
    --rebuild-stale" advice) is rebuilt: plan_jobs asks `check_plan`, only for up-to-date plans."""
    entries = _built(bundle, tmp_path)
    asked: list[str] = []

    def check_plan(plan: Path) -> str | None:
        asked.append(plan.name)
        return "TensorRT cannot deserialize its plan" if plan.name.startswith("unet.") else None

    jobs, current = plan_jobs(bundle, None, {}, ENV, entries, tmp_path, True, check_plan=check_plan)
    assert [(j.name, j.reason) for j in jobs] == [
        ("unet.b1-8.512x512", "TensorRT cannot deserialize its plan")
    ]
    assert jobs[0].profiles == entries["unet.b1-8.512x512"].profiles and len(current) == 4
    assert sorted(asked) == sorted(e.plan for e in entries.values())
    (tmp_path / "clip.b1-8.plan").write_bytes(b"bit rot")  # known bad without asking TensorRT
    asked.clear()
    jobs, _ = plan_jobs(bundle, None, {}, ENV, entries, tmp_path, True, check_plan=check_plan)
    assert "clip.b1-8.plan" not in asked and {j.name for j in jobs} == {"clip.b1-8", "unet.b1-8.512x512"}


def test_force_rebuilds_up_to_date_engines(bundle, tmp_path):
    entries = _built(bundle, tmp_path)
    settings = {"opt_level": None, "workspace_gb": None}
    jobs, current = plan_jobs(bundle, ProfileRequest(), settings, ENV, entries, tmp_path, False, force=True)
    assert len(jobs) == 5 and {j.reason for j in jobs} == {"--force"} and not current
    jobs, _ = plan_jobs(bundle, None, settings, ENV, entries, tmp_path, rebuild_stale=True, force=True)
    assert sorted(j.name for j in jobs) == sorted(entries)  # --rebuild-stale --force: every engine
    args = parse_args(["b", "--rebuild-stale", "--force"])
    assert args.force and args.rebuild_stale


def test_network_flags_set_strong_typing_only_where_it_is_a_choice():
    assert network_flags("10.13.0.35", strongly_typed_bit=1) == 2
    assert network_flags("11.4.0.106", strongly_typed_bit=0) == 0


def test_build_error_carries_the_log_tail():
    error = EngineBuildError("unet.b1-8", "TensorRT failed to build the engine", ["[ERROR] out of memory"])
    assert "unet.b1-8: TensorRT failed" in str(error) and "[ERROR] out of memory" in str(error)


# --- the backend and CLI on a machine without TensorRT -------------------------------------------


def test_cuda_versions_read_like_nvidia_smi():
    assert trt_backend.cuda_version(12080) == "12.8"
    assert trt_backend.cuda_version(13000) == "13.0"


def test_backend_refuses_other_precisions_before_touching_cuda(bundle):
    with pytest.raises(RequestError, match="precision must be fp16 for backend tensorrt"):
        trt_backend.TrtBackend(bundle, BackendConfig(backend="tensorrt", precision="fp32"))


def test_backend_and_cli_explain_a_missing_tensorrt(bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as on a machine without it
    with pytest.raises(trt_backend.TensorRTUnavailable, match="gpu extra") as exc:
        open_backend(bundle, BackendConfig(backend="tensorrt"))
    assert isinstance(exc.value, SetupError)
    assert main([str(bundle.root)]) == 3
    assert main([str(bundle.root / "missing")]) == 2


def test_cli_exit_codes_for_a_broken_engine_manifest(bundle, monkeypatch):
    monkeypatch.setattr("engines.build.probe_environment", lambda device=0: ENV)
    engine_dir = bundle.root / "engines"
    engine_dir.mkdir()
    (engine_dir / "manifest.json").write_text("{not json")
    assert main([str(bundle.root)]) == 2
    assert main([str(bundle.root), "--shapes", "2048x512"]) == 2  # outside the bundle's range


def test_cuda_variant_comes_from_tensorrts_wheels():
    assert trt_backend.cuda_variant(["tensorrt_cu13_libs", "tensorrt-cu13-bindings", "tensorrt"]) == "cu13"
    assert trt_backend.cuda_variant(["tensorrt-cu12"]) == "cu12"
    assert trt_backend.cuda_variant(["tensorrt", "tensorrt-libs"]) is None  # a container's own build
    with pytest.raises(trt_backend.TensorRTUnavailable, match="CUDA 12 and 13 are installed together"):
        trt_backend.cuda_variant(["tensorrt_cu12_libs", "tensorrt_cu13_bindings"])


def test_cudart_paths_lists_each_mapped_runtime_once():
    maps = (
        "7f00-7f10 r-xp 00000000 08:01 1 /venv/site-packages/nvidia/cu13/lib/libcudart.so.13\n"
        "7f10-7f20 r--p 00010000 08:01 1 /venv/site-packages/nvidia/cu13/lib/libcudart.so.13\n"
        "7f20-7f30 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libcuda.so.580.65.06\n"
        "7f30-7f40 rw-p 00000000 00:00 0 \n"
    )
    assert trt_backend.cudart_paths(maps) == ["/venv/site-packages/nvidia/cu13/lib/libcudart.so.13"]


def test_tensorrt_cuda_records_tensorrts_own_runtime(monkeypatch):
    """The manifest's cuda_runtime is the libcudart TensorRT loaded (or, when it links its own,
    the CUDA runtime wheel of its variant), never cuda-python's statically linked one."""
    owners = {"tensorrt_libs": ["tensorrt_cu13_libs"], "tensorrt_bindings": ["tensorrt_cu13_bindings"]}
    monkeypatch.setattr(trt_backend.metadata, "packages_distributions", lambda: owners)
    monkeypatch.setattr(trt_backend, "_read_maps", lambda: " /opt/lib/libcudart.so.13\n")
    monkeypatch.setattr(trt_backend, "_cudart_version", lambda path: "13.0")
    assert trt_backend.tensorrt_cuda() == ("cu13", "13.0")

    monkeypatch.setattr(trt_backend, "_read_maps", lambda: "")  # no libcudart mapped: the wheel's
    versions = {"nvidia-cuda-runtime": "13.1.80", "nvidia-cuda-runtime-cu12": "12.9.79"}

    def version(name: str) -> str:
        if name not in versions:
            raise trt_backend.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(trt_backend.metadata, "version", version)
    assert trt_backend.tensorrt_cuda() == ("cu13", "13.1")
    owners["tensorrt_libs"] = ["tensorrt_cu12_libs"]
    owners["tensorrt_bindings"] = ["tensorrt_cu12_bindings"]
    assert trt_backend.tensorrt_cuda() == ("cu12", "12.9")

    monkeypatch.setattr(trt_backend.metadata, "packages_distributions", lambda: {"tensorrt": ["tensorrt"]})
    monkeypatch.setattr(trt_backend, "_read_maps", lambda: " /usr/lib/libcudart.so.12\n")
    monkeypatch.setattr(trt_backend, "_cudart_version", lambda path: "12.8")
    assert trt_backend.tensorrt_cuda() == ("cu12", "12.8")  # a container's TensorRT: its libcudart's major


@pytest.fixture
def gpu_here(monkeypatch):
    """Pretend this process runs on ENV's GPU (for the checks that need no CUDA call)."""
    monkeypatch.setattr(trt_backend, "probe_environment", lambda device=0: ENV)


TRT = BackendConfig(backend="tensorrt")


def test_backend_refuses_stale_and_missing_engines_with_the_command(bundle, gpu_here):
    engine_dir = bundle.root / "engines"
    engine_dir.mkdir()
    entries = _built(bundle, engine_dir)
    del entries["deprojector.b1-8"]
    save_manifest(engine_dir, entries)
    with pytest.raises(BackendError, match="no engine for deprojector") as exc:
        trt_backend.TrtBackend(bundle, TRT)
    assert str(exc.value).endswith(f"rebuild them with: python -m engines.build {bundle.root}")

    entries = _built(bundle, engine_dir, replace(ENV, compute_capability="8.0", gpu="NVIDIA A100"))
    save_manifest(engine_dir, entries)
    with pytest.raises(BackendError) as exc:
        trt_backend.TrtBackend(bundle, TRT)
    message = str(exc.value)
    assert "unet.b1-8.512x512: built for compute capability 8.0 (NVIDIA A100), this GPU is 9.0" in message
    assert message.endswith(f"python -m engines.build {bundle.root} --rebuild-stale")


def test_backend_routes_and_reports_shapes_no_engine_accepts(bundle, gpu_here):
    engine_dir = bundle.root / "engines"
    engine_dir.mkdir()
    save_manifest(engine_dir, _built(bundle, engine_dir, batch=(2, 4)))
    backend = trt_backend.TrtBackend(bundle, TRT)
    feeds = {
        "sample": np.zeros((2, 4, 64, 80), np.float32),
        "timestep": np.zeros(1, np.float32),
        "encoder_hidden_states": np.zeros((2, 77, 64), np.float32),
    }
    # a valid request the built engines cannot take: the installation's fault (5xx), with the fix
    add = r"add one with: python -m engines.build .* --shapes 640x512$"
    with pytest.raises(NoProfile, match=rf"width 80,.*{add}"):
        backend.run("unet", feeds)
    small = {n: a[:1] if n != "timestep" else a for n, a in feeds.items()}
    small["sample"] = np.zeros((1, 4, 64, 64), np.float32)
    with pytest.raises(NoProfile, match=r"batch 1,.*--shapes 512x512 --batch 1-4$") as exc:
        backend.run("unet", small)
    assert isinstance(exc.value, SetupError) and not isinstance(exc.value, ValueError)
    with pytest.raises(BackendError, match="inputs must be"):
        backend.run("unet", {"sample": feeds["sample"]})


def test_profile_arguments_name_the_size_and_a_batch_range_that_takes_it(bundle):
    profiles = model_profiles(bundle, "unet", ProfileRequest(batch=(2, 4)))
    assert profile_arguments({"batch": 2, "height": 64, "width": 80}, profiles, 8) == ["--shapes", "640x512"]
    assert profile_arguments({"batch": 6, "height": 64, "width": 64}, profiles, 8) == [
        "--shapes",
        "512x512",
        "--batch",
        "2-6",
    ]
    clip = model_profiles(bundle, "clip", ProfileRequest(batch=(2, 4)))
    assert profile_arguments({"batch": 1, "tokens": 77}, clip, 8) == ["--batch", "1-4"]


def test_modules_import_without_tensorrt_cuda_or_torch():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'torch', 'tensorrt', 'cuda'}:\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import runtime.backends.tensorrt, engines.build, engines.builder, engines.cache, engines.profiles\n"
        "assert not any(m.split('.')[0] in {'torch', 'tensorrt', 'cuda'} for m in sys.modules)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_the_builder_library_never_imports_the_command():
    """engines/build.py (the command) imports engines/builder.py (the library), never the reverse."""
    code = "import sys, engines.builder, engines.cache; print('engines.build' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    help_text = subprocess.run(
        [sys.executable, "-m", "engines.build", "--help"], capture_output=True, text=True, timeout=120
    )
    assert help_text.returncode == 0 and "usage: python -m engines.build" in help_text.stdout
