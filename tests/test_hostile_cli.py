"""Hostile input to the CLI and damaged bundles: every case ends in a one-line message naming the
parameter or file, exit 2 (bad request) or 3 (broken bundle or environment), no traceback, no file
left half-written; and the next valid run still succeeds. Torch-free: the fake bundle."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.backends import BackendConfig
from runtime.bundle import Bundle, BundleError
from runtime.errors import RequestError
from runtime.generate import main
from runtime.integrity import STAMP_NAME
from runtime.manifest import REEXPORT
from runtime.options import GenerateOptions
from runtime.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]


def run_cli(bundle: Path, *args: str, out: Path | None = None) -> int:
    argv = ["a cat", "--bundle", str(bundle), "--steps", "2", *args]
    if out is not None:
        argv += ["--out", str(out)]
    return main(argv)


def assert_clean(folder: Path) -> None:
    """Nothing half-written: no temporary or probe files anywhere below `folder`."""
    leftovers = [p for p in folder.rglob(".*") if p.suffix in (".tmp", ".probe")]
    assert not leftovers, leftovers


@pytest.fixture
def valid_run_after(fake_bundle: Path, tmp_path: Path) -> Callable[[], None]:
    """Call after a bad case: a good run on the shared bundle must still produce an image."""

    def check() -> None:
        out = tmp_path / "after.png"
        assert run_cli(fake_bundle, out=out) == 0
        assert Image.open(out).size == (64, 64)

    return check


CLI_REQUEST_ERRORS = [
    (["--steps", "0"], "steps must be an integer from 1 to 999"),
    (["--steps", "1001"], "steps must be an integer from 1 to 999"),
    # SD 1.5's leading spacing with steps_offset 1 would ask for timestep 1000 of 0..999
    (["--steps", "1000"], "steps must be an integer from 1 to 999"),
    (["--guidance", "nan"], "guidance must be a finite number"),
    (["--guidance", "-1"], "guidance must be a finite number >= 0"),
    (["--guidance", "inf"], "guidance must be a finite number"),
    (["--seed", "-1"], r"seed must be an integer from 0 to 2\*\*63-1"),
    (["--seed", str(2**63)], r"seed must be an integer from 0 to 2\*\*63-1"),
    (["--num-images", "0"], "num_images must be >= 1"),
    (["--num-images", "65"], "prompts x num_images <= 64"),
    (["--size", "10x10"], "height must be a multiple of 8 from 32 to 128"),
    (["--size", "4096x64"], "width must be a multiple of 8 from 32 to 128"),
    (["--negative", "a", "--negative", "b"], r"negative prompts: give at most 1 for 1 prompt\(s\); got 2"),
    (["--compose", "--long-prompt", "chunk"], "long_prompt 'chunk' works with mode 'standard' only"),
    (["--backend", "openvino", "--device", "cuda"], "device must be cpu for backend openvino"),
    (["--precision", "bf16"], "precision must be fp32 or fp16 for backend onnxruntime; got 'bf16'"),
    (["--backend", "tensorrt", "--threads", "2"], "threads applies to onnxruntime and openvino only"),
]


@pytest.mark.parametrize(("args", "message"), CLI_REQUEST_ERRORS)
def test_bad_arguments_exit_2_naming_the_parameter(
    fake_bundle, tmp_path, caplog, valid_run_after, args, message
) -> None:
    out = tmp_path / "x.png"
    with caplog.at_level(logging.ERROR):
        assert run_cli(fake_bundle, *args, out=out) == 2
    assert caplog.records[-1].getMessage().startswith("error: ")
    assert re.search(message, caplog.text), caplog.text
    assert "Traceback" not in caplog.text and not out.exists()
    assert_clean(tmp_path)
    valid_run_after()


@pytest.mark.parametrize(
    ("prompt", "args", "message"),
    [
        ("a \udcff cat", [], r"prompt must be valid UTF-8 text; character 2 is not"),
        ("a \ud800 cat", [], r"prompt must be valid UTF-8 text"),
        ("cat", ["--negative", "bad \udcfe"], r"negative prompt must be valid UTF-8 text"),
        (",,,", ["--compose"], "at least one non-empty comma-separated piece for mode compose"),
        ("(cat:abc), maid", ["--compose"], "prompt: "),
        ("(cat:1e999), maid", ["--compose"], "prompt: "),
    ],
)
def test_bad_prompts_exit_2(fake_bundle, tmp_path, caplog, valid_run_after, prompt, args, message) -> None:
    with caplog.at_level(logging.ERROR):
        code = main(
            [prompt, "--bundle", str(fake_bundle), "--steps", "1", "--out", str(tmp_path / "x.png"), *args]
        )
    assert code == 2, caplog.text
    assert re.search(message, caplog.text), caplog.text
    valid_run_after()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--threads", "0"], "argument --threads: must be an integer >= 1; got 0"),
        (["--threads", "-3"], "argument --threads: must be an integer >= 1; got -3"),
        (["--threads", "many"], "argument --threads: must be an integer >= 1; got 'many'"),
        (["--size", "big"], "argument --size: --size must look like 512x512"),
        (["--verify", "sometimes"], "argument --verify: invalid choice: 'sometimes'"),
        (["--scheduler", "lms"], "argument --scheduler: invalid choice: 'lms'"),
        (["--backend", "cuda"], "argument --backend: invalid choice: 'cuda'"),
    ],
)
def test_malformed_flags_are_argparse_errors(fake_bundle, capsys, args, message) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(fake_bundle, *args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("{tmp}", "is a directory; give a file name such as"),
        ("/proc/x.png", "--out: cannot write to /proc"),
        ("{tmp}/file.txt/x.png", "--out: cannot write to"),
        ("{tmp}/x.gif", "--out: cannot write '.gif' images"),
        ("{tmp}/x.PNG.bak", "--out: cannot write '.bak' images"),
    ],
)
def test_out_is_checked_before_any_model_loads(
    fake_bundle, tmp_path, caplog, monkeypatch, out, message
) -> None:
    (tmp_path / "file.txt").write_text("a file where a folder is expected")

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the bundle was opened before --out was checked")

    monkeypatch.setattr(Bundle, "open", no_load)
    with caplog.at_level(logging.ERROR):
        assert run_cli(fake_bundle, out=Path(out.format(tmp=tmp_path))) == 2
    assert message in caplog.text
    assert_clean(tmp_path)


@pytest.mark.parametrize(
    ("suffix", "magic"), [(".jpg", b"\xff\xd8\xff"), (".webp", b"RIFF"), (".png", b"\x89PNG")]
)
def test_out_extension_picks_the_format(fake_bundle, tmp_path, suffix, magic) -> None:
    out = tmp_path / f"cat{suffix}"
    assert run_cli(fake_bundle, "--num-images", "2", out=out) == 0
    for i in range(2):
        data = (tmp_path / f"cat-{i}{suffix}").read_bytes()
        assert data.startswith(magic)
        with Image.open(tmp_path / f"cat-{i}{suffix}") as image:
            assert image.size == (64, 64)
            text = (
                image.info.get("comment", b"").decode() if suffix == ".jpg" else image.info.get("parameters")
            )
            if suffix != ".webp":
                assert text.startswith("a cat\n") and f"Seed: {i}" in text


def test_undecodable_argv_bytes_exit_2_without_traceback(fake_bundle, tmp_path) -> None:
    """The shell passes `$'a \\xff cat'` as bytes; Python turns the bad byte into a lone surrogate."""
    argv = [sys.executable, "-m", "runtime.generate", b"a \xff cat", "--bundle", str(fake_bundle)]
    argv += ["--steps", "1", "--out", str(tmp_path / "x.png")]
    out = subprocess.run(argv, capture_output=True, cwd=ROOT, timeout=120)
    stderr = out.stderr.decode(errors="replace")
    assert out.returncode == 2, stderr
    assert "prompt must be valid UTF-8 text" in stderr and "Traceback" not in stderr


def test_mode_needing_a_deprojector_on_a_bundle_without_one(tmp_path, caplog) -> None:
    from tests.fake_bundle import write_fake_bundle

    bundle = write_fake_bundle(tmp_path / "plain", deprojector=False)
    with caplog.at_level(logging.ERROR):
        assert run_cli(bundle, "--deproject", out=tmp_path / "x.png") == 2
    assert "mode 'deproject' needs a bundle with a deprojector" in caplog.text


# --- damaged bundles ------------------------------------------------------------------------------


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def edit_manifest(bundle: Path, change: Callable[[dict], object]) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    change(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _drop(key: str) -> Callable[[dict], object]:
    return lambda m: m.pop(key)


def _set(value: object, *keys: str) -> Callable[[dict], None]:
    def change(m: dict) -> None:
        for key in keys[:-1]:
            m = m[key]
        m[keys[-1]] = value

    return change


BROKEN_MANIFESTS = [
    ("not JSON", lambda b: (b / "manifest.json").write_text("{ nope"), "manifest.json is not valid JSON"),
    (
        "not UTF-8",
        lambda b: (b / "manifest.json").write_bytes(b"\xff\xfe{}"),
        "manifest.json is not valid JSON",
    ),
    ("a list", lambda b: (b / "manifest.json").write_text("[1, 2]"), "manifest.json"),
    (
        "deeply nested",
        lambda b: (b / "manifest.json").write_text("[" * 100000 + "]" * 100000),
        "manifest.json",
    ),
    ("empty", lambda b: (b / "manifest.json").write_text(""), "manifest.json is not valid JSON"),
    (
        "format 1",
        lambda b: edit_manifest(b, _set(1, "format_version")),
        "this runtime reads 'sdrt-bundle' v2",
    ),
    ("foreign", lambda b: (b / "manifest.json").write_text('{"name": "other", "version": 3}'), "format None"),
    ("no unet", lambda b: edit_manifest(b, lambda m: m["models"].pop("unet")), "missing ['unet']"),
    ("unknown model", lambda b: edit_manifest(b, _set({}, "models", "refiner")), "models.refiner"),
    ("no latent_multiple", lambda b: edit_manifest(b, _drop("latent_multiple")), "latent_multiple"),
    ("hidden_size text", lambda b: edit_manifest(b, _set("768", "hidden_size")), "hidden_size"),
    (
        "path escape",
        lambda b: edit_manifest(b, _set("../../etc/passwd", "models", "unet", "files", "fp32", "file")),
        "models.unet.files.fp32.file",
    ),
    (
        "dims min > max",
        lambda b: edit_manifest(b, _set({"min": 9, "opt": 9, "max": 1}, "models", "unet", "dims", "batch")),
        "min <= opt <= max",
    ),
    (
        "bad sha256",
        lambda b: edit_manifest(b, _set("xyz", "models", "clip", "files", "fp32", "sha256")),
        "sha256",
    ),
    (
        "int8 fix unknown",
        lambda b: edit_manifest(b, _set({"scheme": "hybrid", "overflow_fix": "none"}, "export", "int8")),
        "export.int8.overflow_fix must be one of enable, first_layer_only",
    ),
    ("int8 no scheme", lambda b: edit_manifest(b, _set({}, "export", "int8")), "lacks export.int8.scheme"),
    ("tokenizer gone", lambda b: shutil.rmtree(b / "tokenizer"), "the tokenizer directory"),
    ("graph missing", lambda b: (b / "unet.onnx").unlink(), "unet.onnx is missing (manifest.json names it)"),
    (
        "graph truncated",
        lambda b: (b / "clip.onnx").write_bytes(b"\x08"),
        "clip.onnx has 1 bytes, manifest.json says",
    ),
    (
        "manifest is a folder",
        lambda b: ((b / "manifest.json").unlink(), (b / "manifest.json").mkdir()),
        "manifest.json",
    ),
]


@pytest.mark.parametrize(
    ("damage", "message"), [c[1:] for c in BROKEN_MANIFESTS], ids=[c[0] for c in BROKEN_MANIFESTS]
)
def test_broken_bundle_exits_3_naming_the_file(
    fake_bundle_copy, tmp_path, caplog, valid_run_after, damage, message
):
    damage(fake_bundle_copy)
    with pytest.raises(BundleError, match=re.escape(message)):
        Bundle.open(fake_bundle_copy)
    with caplog.at_level(logging.ERROR):
        assert run_cli(fake_bundle_copy, out=tmp_path / "x.png") == 3
    assert str(fake_bundle_copy) in caplog.text and "Traceback" not in caplog.text
    valid_run_after()


@pytest.mark.parametrize("path", ["missing", "file"])
def test_a_path_without_a_bundle_is_a_request_error(tmp_path, caplog, path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(RequestError, match="create one with `python -m export`"):
        Bundle.open(tmp_path / path)
    with caplog.at_level(logging.ERROR):
        assert run_cli(tmp_path / path, out=tmp_path / "x.png") == 2


@pytest.mark.parametrize(
    ("file", "where"),
    [
        ("unet.onnx", "graph"),
        ("unet.onnx", "weights"),
        ("vae_decoder.onnx", "weights"),
        ("clip.onnx", "graph"),
        ("tokenizer/tokenizer.json", "graph"),
    ],
)
def test_one_flipped_byte_is_named_with_the_repair(fake_bundle_copy, tmp_path, caplog, file, where) -> None:
    path = fake_bundle_copy / file
    flip_byte(path, 10 if where == "graph" else path.stat().st_size - 10)
    with caplog.at_level(logging.ERROR):
        assert run_cli(fake_bundle_copy, out=tmp_path / "x.png") == 3
    assert f"bundle file {path} is damaged" in caplog.text and REEXPORT in caplog.text
    assert not (tmp_path / "x.png").exists()


def test_damage_after_a_stamped_run_is_still_found(fake_bundle_copy, tmp_path, caplog) -> None:
    """The stamp vouches only for unchanged (size, mtime, ctime, inode): restoring mtime is not enough."""
    assert run_cli(fake_bundle_copy, out=tmp_path / "a.png") == 0
    stamp = json.loads((fake_bundle_copy / STAMP_NAME).read_text())
    assert str((fake_bundle_copy / "unet.onnx").resolve()) in json.dumps(stamp)
    unet = fake_bundle_copy / "unet.onnx"
    before = unet.stat()
    flip_byte(unet, unet.stat().st_size - 10)
    os.utime(unet, ns=(before.st_atime_ns, before.st_mtime_ns))
    with caplog.at_level(logging.ERROR):
        assert run_cli(fake_bundle_copy, out=tmp_path / "b.png") == 3
    assert "unet.onnx is damaged" in caplog.text


def test_stamp_makes_the_second_open_hash_nothing(fake_bundle_copy) -> None:
    options = GenerateOptions(prompts=("cat",), steps=1)
    first = Pipeline(Bundle.open(fake_bundle_copy), BackendConfig(cache_graphs=False))
    first.generate(options)
    assert first.bundle.verifier.hashed_bytes > 0
    second = Pipeline(Bundle.open(fake_bundle_copy), BackendConfig(cache_graphs=False))
    second.generate(options)
    assert second.bundle.verifier.hashed_bytes == 0
    full = Pipeline(Bundle.open(fake_bundle_copy, verify="full"), BackendConfig(cache_graphs=False))
    full.generate(options)
    assert full.bundle.verifier.hashed_bytes == first.bundle.verifier.hashed_bytes


def test_a_garbage_stamp_is_ignored_and_rewritten(fake_bundle_copy, tmp_path) -> None:
    assert run_cli(fake_bundle_copy, out=tmp_path / "a.png") == 0
    (fake_bundle_copy / STAMP_NAME).write_text("{{{ not json")
    assert run_cli(fake_bundle_copy, out=tmp_path / "b.png") == 0
    assert json.loads((fake_bundle_copy / STAMP_NAME).read_text())


def test_verify_off_trusts_the_files(fake_bundle_copy, tmp_path) -> None:
    """`--verify off` is for volumes checked elsewhere: a same-size change then goes unnoticed."""
    clip = fake_bundle_copy / "clip.onnx"
    flip_byte(clip, clip.stat().st_size // 2)  # inside the embedding table: the graph still loads
    assert run_cli(fake_bundle_copy, "--verify", "off", out=tmp_path / "x.png") == 0
    assert run_cli(fake_bundle_copy, out=tmp_path / "y.png") == 3


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_damaged_derived_caches_are_rebuilt_and_the_image_is_unchanged(fake_bundle_copy, backend) -> None:
    if backend == "openvino":
        pytest.importorskip("openvino")
    options = GenerateOptions(prompts=("cat",), steps=2)
    config = BackendConfig(backend)
    expected = Pipeline(fake_bundle_copy, config).generate(options).images
    folder = fake_bundle_copy / (".ort_cache" if backend == "onnxruntime" else ".ov_cache")
    cached = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".sha256"))
    assert cached, f"{backend} wrote no derived graph"
    for path in cached:
        flip_byte(path, path.stat().st_size // 2)
    got = Pipeline(fake_bundle_copy, config).generate(options).images
    np.testing.assert_array_equal(got, expected)
