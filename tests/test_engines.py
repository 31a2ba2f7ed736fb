"""The TensorRT path's pure logic, without TensorRT or a GPU: CLI parsing, profiles, routing,
cache keys, staleness, the manifest and atomic writes. The GPU half is tests/test_engines_gpu.py."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from engines.build import EngineBuildError, network_flags
from engines.cache import FLAGS, plan_jobs, rebuild_reason, save_manifest
from engines.cli import main, parse_args
from engines.profiles import (
    ProfileRequest,
    model_profiles,
    parse_batch,
    parse_dynamic,
    parse_shapes,
    profile_label,
)
from runtime.backends import BackendError, open_backend
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
    request_dims,
)
from runtime.bundle import Bundle, DimRange
from runtime.files import sha256_file, write_atomic
from runtime.specs import clip_spec, deprojector_spec, unet_spec, vae_decoder_spec

ENV = GpuEnvironment("10.13.0.35", "12.8", "12.9", "NVIDIA L4", "8.9")
BATCH = {"min": 1, "opt": 2, "max": 8}
LATENT = {"min": 8, "opt": 64, "max": 128}
TOKENS = {"min": 77, "opt": 77, "max": 231}


def _tensor(t):
    return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}


@pytest.fixture
def bundle(tmp_path: Path) -> Bundle:
    """A bundle directory shaped like `python -m export` writes (empty ONNX files, real manifest)."""
    root = tmp_path / "bundle"
    root.mkdir()
    specs = {
        "clip": clip_spec(64, 64),
        "deprojector": deprojector_spec(64),
        "unet": unet_spec(64),
        "vae_decoder": vae_decoder_spec(),
    }
    dims = {
        "clip": {"batch": BATCH, "tokens": TOKENS},
        "deprojector": {"batch": BATCH},
        "unet": {"batch": BATCH, "height": LATENT, "width": LATENT, "tokens": TOKENS},
        "vae_decoder": {"batch": {**BATCH, "opt": 1}, "height": LATENT, "width": LATENT},
    }
    models = {}
    for name, spec in specs.items():
        files = {}
        for precision, suffix in (("fp32", ".onnx"), ("fp16", ".fp16.onnx")):
            (root / f"{name}{suffix}").write_bytes(b"")
            files[precision] = {
                "file": f"{name}{suffix}",
                "sha256": f"{name}-{precision}-sha",
                "bytes": 0,
                "external_data": None,
            }
        models[name] = {
            "inputs": [_tensor(t) for t in spec.inputs],
            "outputs": [_tensor(t) for t in spec.outputs],
            "dims": dims[name],
            "opset": 18,
            "files": files,
        }
    manifest = {
        "format": "sdrt-bundle",
        "format_version": 1,
        "hidden_size": 64,
        "latent_channels": 4,
        "vae_scale_factor": 8,
        "latent_multiple": 2,
        "scheduler": {"_class_name": "PNDMScheduler"},
        "tokenizer": {"dir": "tokenizer", "bos_id": 49406, "eos_id": 49407, "pad_id": 49407},
        "models": models,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
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
        cache_key(source, env.tensorrt, env.compute_capability, profiles, FLAGS),
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


def test_cache_key_covers_every_field(bundle):
    entry = _entry(bundle)
    base = (entry.source, ENV.tensorrt, ENV.compute_capability, entry.profiles, FLAGS)
    keys = {
        cache_key(*base),
        cache_key(replace(entry.source, sha256="other"), *base[1:]),
        cache_key(replace(entry.source, external_data_sha256="weights"), *base[1:]),
        cache_key(base[0], "11.4.0", *base[2:]),
        cache_key(*base[:2], "9.0", *base[3:]),
        cache_key(*base[:3], _entry(bundle, shapes=((768, 768),)).profiles, FLAGS),
        cache_key(*base[:4], {**FLAGS, "precision": "fp8"}),
    }
    assert len(keys) == 7
    assert cache_key(*base) == entry.key == entry_key(entry, ENV, source_onnx(bundle, "unet"))


def test_stale_reasons_say_why(bundle):
    entry = _entry(bundle)
    source = source_onnx(bundle, "unet")
    assert stale_reasons(entry, ENV, source) == []
    assert stale_reasons(entry, replace(ENV, gpu="NVIDIA A10G (other model, same arch)"), source) == []
    (reason,) = stale_reasons(entry, replace(ENV, tensorrt="11.4.0"), source)
    assert reason == "built with TensorRT 10.13.0.35, this process has 11.4.0"
    (reason,) = stale_reasons(entry, replace(ENV, compute_capability="8.6", gpu="NVIDIA A10G"), source)
    assert "compute capability 8.9 (NVIDIA L4), this GPU is 8.6 (NVIDIA A10G)" in reason
    (reason,) = stale_reasons(entry, ENV, replace(source, external_data_sha256="new weights"))
    assert "unet.fp16.onnx or its weights changed" in reason
    (reason,) = stale_reasons(replace(entry, key="edited"), ENV, source)
    assert "manifest.json was edited" in reason


def test_build_command_is_exact(tmp_path):
    root = tmp_path / "my bundle"
    assert build_command(root, root / "engines", stale_only=True) == (
        f"python -m engines.build '{root}' --rebuild-stale"
    )
    assert build_command(root, tmp_path / "e", stale_only=False) == (
        f"python -m engines.build '{root}' --engine-dir {tmp_path / 'e'}"
    )


def test_manifest_round_trip_and_bad_files(bundle, tmp_path):
    entries = {e.name: e for e in (_entry(bundle), _entry(bundle, "clip"))}
    assert read_manifest(tmp_path) == {}
    save_manifest(tmp_path, entries)
    assert read_manifest(tmp_path) == entries
    assert json.loads(manifest_text(entries))["engines"]["clip.b1-8"]["profiles"][0]["tokens"]["max"] == 231
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(EngineManifestError, match="unreadable"):
        read_manifest(tmp_path)
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
    ]
    assert {j.reason for j in jobs} == {"new"} and not current
    assert jobs[0].onnx.name.endswith(".fp16.onnx")

    entries = _built(bundle, tmp_path)
    jobs, current = plan_jobs(bundle, ProfileRequest(), settings, ENV, entries, tmp_path, rebuild_stale=False)
    assert not jobs and len(current) == 4

    upgraded = replace(ENV, tensorrt="11.4.0")
    jobs, _ = plan_jobs(bundle, ProfileRequest(), settings, upgraded, entries, tmp_path, rebuild_stale=False)
    assert {j.reason for j in jobs} == {"built with TensorRT 10.13.0.35, this process has 11.4.0"}

    # whatever the backend would refuse is rebuilt, even if the recorded key was left as it was
    moved = {n: replace(e, environment=replace(ENV, compute_capability="8.0")) for n, e in entries.items()}
    jobs, _ = plan_jobs(bundle, ProfileRequest(), settings, ENV, moved, tmp_path, rebuild_stale=False)
    assert len(jobs) == 4 and all("compute capability 8.0" in j.reason for j in jobs)


def test_rebuild_stale_alone_rebuilds_only_stale_engines_with_their_own_profiles(bundle, tmp_path):
    entries = _built(bundle, tmp_path) | _built(bundle, tmp_path, shapes=((768, 768),))
    assert len(entries) == 6  # clip and deprojector engines are shared by both requests
    (tmp_path / "unet.b1-8.768x768.plan").write_bytes(b"bit rot")
    jobs, current = plan_jobs(bundle, None, {}, ENV, entries, tmp_path, rebuild_stale=True)
    assert [(j.name, j.reason) for j in jobs] == [("unet.b1-8.768x768", "plan file corrupt")]
    assert jobs[0].profiles == entries["unet.b1-8.768x768"].profiles and len(current) == 5


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
    with pytest.raises(ValueError, match="precision must be 'fp16'"):
        trt_backend.TrtBackend(bundle, precision="fp32")


def test_backend_and_cli_explain_a_missing_tensorrt(bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as on a machine without it
    with pytest.raises(trt_backend.TensorRTUnavailable, match="gpu extra"):
        open_backend("tensorrt", bundle, device="cpu", threads=2)
    assert main([str(bundle.root)]) == 3
    assert main([str(bundle.root / "missing")]) == 2


@pytest.fixture
def gpu_here(monkeypatch):
    """Pretend this process runs on ENV's GPU (for the checks that need no CUDA call)."""
    monkeypatch.setattr(trt_backend, "probe_environment", lambda device=0: ENV)


def test_backend_refuses_stale_and_missing_engines_with_the_command(bundle, gpu_here):
    engine_dir = bundle.root / "engines"
    engine_dir.mkdir()
    entries = _built(bundle, engine_dir)
    del entries["deprojector.b1-8"]
    save_manifest(engine_dir, entries)
    with pytest.raises(BackendError, match="no engine for deprojector") as exc:
        trt_backend.TrtBackend(bundle)
    assert str(exc.value).endswith(f"rebuild them with: python -m engines.build {bundle.root}")

    entries = _built(bundle, engine_dir, replace(ENV, compute_capability="8.0", gpu="NVIDIA A100"))
    save_manifest(engine_dir, entries)
    with pytest.raises(BackendError) as exc:
        trt_backend.TrtBackend(bundle)
    message = str(exc.value)
    assert "unet.b1-8.512x512: built for compute capability 8.0 (NVIDIA A100), this GPU is 8.9" in message
    assert message.endswith(f"python -m engines.build {bundle.root} --rebuild-stale")


def test_backend_routes_and_reports_shapes_no_engine_accepts(bundle, gpu_here):
    engine_dir = bundle.root / "engines"
    engine_dir.mkdir()
    save_manifest(engine_dir, _built(bundle, engine_dir, batch=(1, 4)))
    backend = trt_backend.TrtBackend(bundle)
    feeds = {
        "sample": np.zeros((2, 4, 64, 80), np.float32),
        "timestep": np.zeros(1, np.float32),
        "encoder_hidden_states": np.zeros((2, 77, 64), np.float32),
    }
    with pytest.raises(BackendError, match=r"width 80,.*build one with: .* --shapes 640x512$"):
        backend.run("unet", feeds)
    with pytest.raises(BackendError, match="inputs must be"):
        backend.run("unet", {"sample": feeds["sample"]})


def test_modules_import_without_tensorrt_cuda_or_torch():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'torch', 'tensorrt', 'cuda'}:\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import runtime.backends.tensorrt, engines.build, engines.cli, engines.cache, engines.profiles\n"
        "assert not any(m.split('.')[0] in {'torch', 'tensorrt', 'cuda'} for m in sys.modules)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
