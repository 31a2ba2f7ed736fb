"""The LoRA request surface without a LoRA run: A1111's `<lora:name:weight>` tags, `--lora` /
`--lora-dir` on the command line, and the `Lora hashes` infotext field. Torch-free and fast; the
CLI cases stop before any model runs (a refused request), on the fake bundle."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from runtime.errors import RequestError
from runtime.generate import main
from runtime.lora import LoraRef
from runtime.lora.cli import cli_loras, parse_lora
from runtime.lora.infotext import lora_hashes, prompt_with_tags, short_hash
from runtime.lora.prompt_tags import FORM, check_name, prompt_loras, split_tags


def write_lora(path: Path, seed: int = 0, metadata: dict[str, str] | None = None) -> Path:
    """A small safetensors file (content irrelevant here: nothing reads it as a LoRA)."""
    rng = np.random.default_rng(seed)
    save_file({"lora_unet_x.lora_down.weight": rng.standard_normal((4, 8), dtype=np.float32)}, str(path),
              metadata=metadata)  # fmt: skip
    return path


@pytest.fixture
def lora_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "loras"
    folder.mkdir()
    for seed, name in enumerate(("style", "detail tweaker")):
        write_lora(folder / f"{name}.safetensors", seed)
    (folder / "notes.txt").write_text("not a LoRA")
    return folder


@pytest.mark.parametrize(
    ("prompt", "rest", "tags"),
    [
        ("a cat <lora:style:0.8>, hat", "a cat , hat", [("style", 0.8)]),
        ("<lora:style>a cat", "a cat", [("style", 1.0)]),
        (
            "a <lora:style:-0.5> b <lora:detail tweaker: 1.25 >",
            "a  b ",
            [("style", -0.5), ("detail tweaker", 1.25)],
        ),
        ("no tags, (maid:1.3), a < b", "no tags, (maid:1.3), a < b", []),
    ],
)
def test_split_tags_strips_them_as_a1111(prompt: str, rest: str, tags: list[tuple[str, float]]) -> None:
    text, found = split_tags(prompt)
    assert text == rest
    assert [(t.name, t.scale) for t in found] == tags


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a <lora:>", "malformed LoRA tag"),
        ("a <lora:style:0.5", "malformed LoRA tag"),
        ("a <lora:style:strong>", "is not a number"),
        ("a <lora:style:inf>", "must be finite"),
        ("a <lora:style:0.5:0.3>", "separate text-encoder / UNet weights"),
        ("a <lora:style:te=0.5>", "named arguments"),
        ("a <hypernet:anime:1>", "only LoRA tags are supported"),
        ("a <lora:../secret:1>", "not a plain file name"),
        ("a <lora:sub/style:1>", "not a plain file name"),
        ("a <lora:.hidden:1>", "not a plain file name"),
        ("a <lora: :1>", "non-empty"),
    ],
)
def test_malformed_tags_are_refused_with_the_form(prompt: str, expected: str) -> None:
    with pytest.raises(RequestError, match="^prompt: ") as caught:
        split_tags(prompt)
    assert expected in str(caught.value)
    if expected in (
        "malformed LoRA tag",
        "is not a number",
        "only LoRA tags are supported",
        "named arguments",
    ):
        assert FORM in str(caught.value)


@pytest.mark.parametrize("name", ["..", "a/b", "a\\b", "nul\x00byte", "tab\tname", " padded", ".env", ""])
def test_names_never_leave_the_folder(name: str) -> None:
    with pytest.raises(RequestError, match="^loras\\[0\\]"):
        check_name(name, "loras[0]")


def test_prompt_loras_resolves_in_the_folder(lora_dir: Path) -> None:
    texts, refs = prompt_loras(["a cat <lora:style:0.5>", "a dog<lora:style:0.5>"], lora_dir, "--lora-dir")
    assert texts == ("a cat ", "a dog")
    assert refs == (LoraRef(lora_dir / "style.safetensors", 0.5),)
    assert prompt_loras(["plain"], None, "--lora-dir") == (("plain",), ())


def test_prompt_loras_refusals(lora_dir: Path) -> None:
    with pytest.raises(RequestError, match=r"no LoRA named 'missing'.*available: detail tweaker, style$"):
        prompt_loras(["<lora:missing:1>"], lora_dir, "--lora-dir")
    with pytest.raises(RequestError, match=r"no LoRA folder is set \(--lora-dir\)"):
        prompt_loras(["<lora:style:1>"], None, "--lora-dir")
    with pytest.raises(RequestError, match="different <lora:...> sets"):
        prompt_loras(["a <lora:style:1>", "b <lora:style:0.5>"], lora_dir, "--lora-dir")
    with pytest.raises(RequestError, match="different <lora:...> sets"):
        prompt_loras(["a <lora:style:1>", "b"], lora_dir, "--lora-dir")
    with pytest.raises(RequestError, match="no LoRA named 'notes'"):  # only .safetensors files count
        prompt_loras(["<lora:notes>"], lora_dir, "--lora-dir")


@pytest.mark.parametrize(
    ("text", "path", "scale"),
    [
        ("style.safetensors", "style.safetensors", 1.0),
        ("dir/style.safetensors:0.75", "dir/style.safetensors", 0.75),
        ("c:/x/style.safetensors:-1", "c:/x/style.safetensors", -1.0),
        ("odd:name.safetensors", "odd:name.safetensors", 1.0),
    ],
)
def test_parse_lora(text: str, path: str, scale: float) -> None:
    assert parse_lora(text) == LoraRef(Path(path), scale)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("s.safetensors:high", "not a number"), ("s.safetensors:nan", "finite"), ("", "PATH")],
)
def test_parse_lora_refusals(text: str, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        parse_lora(text)


def test_cli_loras_orders_tags_then_flags(lora_dir: Path, tmp_path: Path) -> None:
    extra = write_lora(tmp_path / "extra.safetensors", 5)
    texts, refs = cli_loras(["a <lora:style:0.5>"], [LoraRef(extra, 2.0)], lora_dir)
    assert texts == ("a ",)
    assert refs == (LoraRef(lora_dir / "style.safetensors", 0.5), LoraRef(extra, 2.0))
    with pytest.raises(RequestError, match="^--lora: lora .*nope.safetensors: no such file"):
        cli_loras(["a"], [LoraRef(tmp_path / "nope.safetensors", 1.0)], None)
    with pytest.raises(RequestError, match="^--lora-dir: .* is not a folder"):
        cli_loras(["a"], [], extra)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--lora", "{tmp}/nope.safetensors"], "--lora: lora"),
        (["--lora", "{tmp}/notes.txt"], "--lora: lora"),
        (["--lora", "{dir}/style.safetensors:99"], "scale must be a finite number from -10 to 10"),
        (["--lora-dir", "{tmp}/nowhere"], "--lora-dir:"),
        (["--prompt-tag"], "no LoRA folder is set (--lora-dir)"),
        (["--prompt-tag", "--lora-dir", "{dir}"], "no LoRA named 'gone'"),
    ],
)
def test_cli_refuses_with_exit_2_naming_the_flag(
    fake_bundle: Path, lora_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, args: list[str],
    expected: str,
) -> None:  # fmt: skip
    (tmp_path / "notes.txt").write_text("x")
    prompt = "a cat <lora:gone:1>" if "--prompt-tag" in args else "a cat"
    argv = [a.format(tmp=tmp_path, dir=lora_dir) for a in args if a != "--prompt-tag"]
    out = tmp_path / "out.png"
    with caplog.at_level(logging.ERROR, logger="sdrt"):
        code = main([prompt, "--bundle", str(fake_bundle), "--steps", "1", "--out", str(out), *argv])
    assert code == 2
    assert expected in caplog.text
    assert not out.exists()


def test_cli_malformed_lora_flag_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["a cat", "--lora", "style.safetensors:strong"])
    assert caught.value.code == 2
    assert "argument --lora: SCALE 'strong'" in capsys.readouterr().err


def _addnet(path: Path) -> str:
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + size :]).hexdigest()[:12]


def test_short_hash_is_a1111s_addnet_hash(tmp_path: Path) -> None:
    """sha256 of the tensor data (after the header), 12 digits: metadata does not change it."""
    plain = write_lora(tmp_path / "a.safetensors", 1)
    tagged = write_lora(tmp_path / "b.safetensors", 1, metadata={"ss_output_name": "b"})
    assert short_hash(plain) == _addnet(plain) == short_hash(tagged)
    assert short_hash(plain) != hashlib.sha256(plain.read_bytes()).hexdigest()[:12]
    given = write_lora(tmp_path / "c.safetensors", 1, metadata={"sshs_model_hash": "0123456789abcdef" * 4})
    assert short_hash(given) == "0123456789ab"  # A1111 prefers the hash the trainer recorded


def test_short_hash_follows_a_replaced_file(tmp_path: Path) -> None:
    path = write_lora(tmp_path / "a.safetensors", 1)
    first = short_hash(path)
    write_lora(path, 2)
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse file systems
    assert short_hash(path) == _addnet(path) != first


def test_short_hash_refuses_a_non_safetensors_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 16)
    with pytest.raises(RequestError, match="not a safetensors file"):
        short_hash(bad)


def test_infotext_fields_as_a1111_writes_them(lora_dir: Path) -> None:
    style, detail = lora_dir / "style.safetensors", lora_dir / "detail tweaker.safetensors"
    refs = (LoraRef(style, 0.8), LoraRef(detail, 1.0))
    assert prompt_with_tags("a cat", refs) == "a cat<lora:style:0.8><lora:detail tweaker:1.0>"
    text = lora_hashes(refs)
    assert json.loads(text) == f"style: {_addnet(style)}, detail tweaker: {_addnet(detail)}"
    assert text.startswith('"') and text.endswith('"')  # A1111 quotes values with ':' or ','
    # read back as A1111 does: the tags parse to the same set
    assert [(t.name, t.scale) for t in split_tags(prompt_with_tags("a cat", refs))[1]] == [
        ("style", 0.8),
        ("detail tweaker", 1.0),
    ]


def test_cli_flag_and_tag_give_the_same_image_with_a1111s_infotext(
    tiny_bundle: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Integration (a LoRA that fits the tiny bundle): `--lora FILE:0.8` and `<lora:NAME:0.8>` with
    `--lora-dir` are the same request; the PNG says so the way A1111 does; without it, another image."""
    from PIL import Image

    from export.models import build_preset
    from tests.test_lora_parity import write_kohya

    components = build_preset("tiny", cache_dir=tmp_path_factory.mktemp("cache"), with_vision=False)
    (tmp_path / "loras").mkdir()
    lora = write_kohya(tmp_path / "loras" / "style.safetensors", components, seed=1)
    common = ["--bundle", str(tiny_bundle), "--steps", "2", "--scheduler", "ddim", "--seed", "3"]
    runs = {
        "flag": ["a cat maid", "--lora", f"{lora}:0.8"],
        "tag": ["a cat maid <lora:style:0.8>", "--lora-dir", str(lora.parent)],
        "none": ["a cat maid"],
    }
    images, texts = {}, {}
    for name, argv in runs.items():
        out = tmp_path / f"{name}.png"
        assert main([*argv, *common, "--out", str(out)]) == 0
        with Image.open(out) as png:
            images[name], texts[name] = np.asarray(png.convert("RGB")), png.text["parameters"]
    np.testing.assert_array_equal(images["flag"], images["tag"])
    assert not np.array_equal(images["flag"], images["none"])
    expected = f'Lora hashes: "style: {_addnet(lora)}"'
    assert texts["flag"].startswith("a cat maid<lora:style:0.8>\n") and expected in texts["flag"]
    assert texts["tag"].startswith("a cat maid <lora:style:0.8>\n") and expected in texts["tag"]
    assert "Lora hashes" not in texts["none"] and "<lora:" not in texts["none"]
