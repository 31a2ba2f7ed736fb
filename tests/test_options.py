"""Every bad parameter is refused up front with a message naming it and the allowed range."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from runtime.bundle import Bundle, BundleError
from runtime.generate import main
from runtime.options import GenerateOptions, options_from, parse_size, size_argument, validate


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return Bundle.open(tiny_bundle)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"prompts": ()}, "prompts must be a non-empty list"),
        ({"negative_prompts": ("a", "b", "c")}, "negative_prompts must have 0, 1 or 2 entries"),
        ({"steps": 0}, "steps must be an integer from 1 to 1000"),
        ({"steps": 100000}, "steps must be an integer from 1 to 1000"),
        ({"steps": 2.5}, "steps must be an integer"),
        ({"guidance": float("nan")}, "guidance must be a finite number"),
        ({"guidance": -1.0}, "guidance must be a finite number >= 0"),
        ({"seed": -1}, "seed must be an integer from 0"),
        ({"num_images": 0}, "num_images must be >= 1"),
        ({"num_images": 40}, "prompts x num_images <= 64"),
        ({"scheduler": "lms"}, "scheduler must be one of ddim"),
        ({"mode": "magic"}, "mode must be one of standard, deproject, compose"),
        ({"compose_mode": "max"}, "compose_mode must be one of sum, diff_only"),
        ({"long_prompt": "wrap"}, "long_prompt must be one of truncate, chunk"),
        ({"height": 100}, "height must be a multiple of 16 from 64 to 1024"),
        ({"height": 136}, "height must be a multiple of 16 from 64 to 1024"),
        ({"width": 2048}, "width must be a multiple of 16 from 64 to 1024"),
        ({"mode": "compose", "long_prompt": "chunk"}, "long_prompt 'chunk' works with mode 'standard' only"),
        (
            {"latents": np.zeros((1, 4, 8, 8), np.float32)},
            r"latents must be finite with shape \(2, 4, 16, 16\)",
        ),
    ],
)
def test_bad_options_are_named(bundle, changes, message):
    options = GenerateOptions(**{"prompts": ("cat", "dog"), "height": 128, "width": 128, **changes})
    with pytest.raises(ValueError, match=message):
        validate(options, bundle)


def test_defaults_fill_the_bundle_size(bundle):
    o = validate(GenerateOptions(prompts=("cat",)), bundle)
    h, w = bundle.image_size_range()
    assert (o.height, o.width) == (h.opt, w.opt)


def test_missing_bundle_is_a_clear_error(tmp_path):
    with pytest.raises(BundleError, match="no manifest.json"):
        Bundle.open(tmp_path)


def test_manifest_without_latent_multiple_asks_for_a_re_export(tiny_bundle, tmp_path):
    """A bundle exported before `latent_multiple` existed fails at open, not with a KeyError later."""
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    del manifest["latent_multiple"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"lacks latent_multiple .*re-export it with `python -m export`"):
        Bundle.open(tmp_path)


@pytest.mark.parametrize(("text", "size"), [("512x768", (512, 768)), ("64X128", (64, 128))])
def test_parse_size_is_width_by_height(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["big", "512", "512x", "x512", "1x2x3", "5.5x8", ""])
def test_parse_size_names_the_parameter_and_the_form(text):
    with pytest.raises(ValueError, match=r"^size must look like 512x512 \(WIDTHxHEIGHT\); got "):
        parse_size(text)
    with pytest.raises(argparse.ArgumentTypeError, match=r"^--size must look like 512x512"):
        size_argument(text)


def test_options_from_a_flat_mapping():
    values = {"prompt": "cat", "steps": 3, "size": (128, 64), "scheduler": "ddim", "out": "x.png", "width": 1}
    assert options_from(values, prompts=("cat",), guidance=2.0) == GenerateOptions(
        prompts=("cat",), steps=3, guidance=2.0, width=128, height=64, scheduler="ddim"
    )
    assert options_from({"size": None, "width": 64}, prompts=("cat",)) == GenerateOptions(
        prompts=("cat",), width=64
    )


def test_cli_reports_errors_without_a_traceback(tiny_bundle, tmp_path, caplog, capsys):
    assert main(["cat", "--bundle", str(tiny_bundle), "--steps", "0", "--out", str(tmp_path / "x.png")]) == 2
    assert "steps must be an integer from 1 to 1000" in caplog.text
    assert not (tmp_path / "x.png").exists()
    assert main(["cat", "--bundle", str(tmp_path / "nope")]) == 2
    with pytest.raises(SystemExit):
        main(["cat", "--size", "big"])
    err = capsys.readouterr().err
    assert "argument --size: --size must look like 512x512 (WIDTHxHEIGHT); got 'big'" in err


def test_cli_writes_png_with_parameters(tiny_bundle, tmp_path):
    from PIL import Image

    out = tmp_path / "cat.png"
    assert (
        main(
            [
                "cat maid",
                "--negative",
                "blurry",
                "--bundle",
                str(tiny_bundle),
                "--steps",
                "2",
                "--size",
                "128x64",
                "--seed",
                "5",
                "--num-images",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    images = [Image.open(tmp_path / f"cat-{i}.png") for i in range(2)]
    assert images[0].size == (128, 64)
    text = images[1].text["parameters"]
    assert text.startswith("cat maid\nNegative prompt: blurry\n") and "Seed: 6" in text and "Steps: 2" in text
    assert not list(tmp_path.glob(".*.tmp"))
