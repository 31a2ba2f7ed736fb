"""Every bad parameter is refused up front with a message naming it and the allowed range."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from runtime.bundle import Bundle
from runtime.cli import size_argument
from runtime.errors import RequestError
from runtime.generate import main
from runtime.options import GenerateOptions, ResolvedOptions, options_from, parse_size, validate


@pytest.fixture(scope="module")
def bundle(fake_bundle):
    return Bundle.open(fake_bundle)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"prompts": ()}, "prompts must be a non-empty list"),
        ({"negative_prompts": ("a", "b", "c")}, r"negative prompts: give 0, 1 or 2 \(one per prompt\)"),
        ({"prompts": ("cat", "a\ud800")}, r"prompt must be valid UTF-8 text; character 1 is not"),
        ({"negative_prompts": (b"x",)}, "negative prompt must be text; got bytes"),
        ({"mode": "compose", "prompts": (",,,",)}, "at least one non-empty comma-separated piece"),
        ({"normalize": "yes"}, "normalize must be true or false"),
        ({"steps": 0}, "steps must be an integer from 1 to 999"),
        ({"steps": 100000}, "steps must be an integer from 1 to 999"),
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
        ({"height": 100}, "height must be a multiple of 8 from 32 to 128"),
        ({"height": 136}, "height must be a multiple of 8 from 32 to 128"),
        ({"width": 2048}, "width must be a multiple of 8 from 32 to 128"),
        ({"mode": "compose", "long_prompt": "chunk"}, "long_prompt 'chunk' works with mode 'standard' only"),
        (
            {"latents": np.zeros((1, 4, 8, 8), np.float32)},
            r"latents must be finite with shape \(2, 4, 16, 16\)",
        ),
    ],
)
def test_bad_options_are_named(bundle, changes, message):
    options = GenerateOptions(**{"prompts": ("cat", "dog"), "height": 128, "width": 128, **changes})
    with pytest.raises(RequestError, match=message):
        validate(options, bundle)


def test_defaults_fill_the_bundle_size(bundle):
    o = validate(GenerateOptions(prompts=("cat",)), bundle)
    h, w = bundle.image_size_range()
    assert (o.height, o.width) == (h.opt, w.opt)


def test_validation_resolves_sizes_and_one_negative_per_prompt(bundle):
    o = validate(GenerateOptions(prompts=("cat", "dog"), negative_prompts=("blurry",), guidance=7), bundle)
    assert isinstance(o, ResolvedOptions)
    assert o.negative_prompts == ("blurry", "blurry")
    assert isinstance(o.guidance, float) and isinstance(o.height, int)
    assert validate(o, bundle) is o  # already resolved: not checked twice
    latents = o.initial_latents(bundle.latent_channels, bundle.vae_scale_factor)
    assert latents.shape == (2, 4, o.height // 8, o.width // 8)
    again = o.initial_latents(bundle.latent_channels, bundle.vae_scale_factor)
    np.testing.assert_array_equal(latents, again)  # seeded: image i uses seed + i
    assert not np.array_equal(latents[0], latents[1])


@pytest.mark.parametrize(("text", "size"), [("512x768", (512, 768)), ("64X128", (64, 128))])
def test_parse_size_is_width_by_height(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["big", "512", "512x", "x512", "1x2x3", "5.5x8", ""])
def test_parse_size_names_the_parameter_and_the_form(text):
    with pytest.raises(RequestError, match=r"^size must look like 512x512 \(WIDTHxHEIGHT\); got "):
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


def test_cli_reports_errors_without_a_traceback(fake_bundle, tmp_path, caplog, capsys):
    assert main(["cat", "--bundle", str(fake_bundle), "--steps", "0", "--out", str(tmp_path / "x.png")]) == 2
    assert "steps must be an integer from 1 to 999" in caplog.text
    assert not (tmp_path / "x.png").exists()
    assert main(["cat", "--bundle", str(tmp_path / "nope")]) == 2
    with pytest.raises(SystemExit):
        main(["cat", "--size", "big"])
    err = capsys.readouterr().err
    assert "argument --size: --size must look like 512x512 (WIDTHxHEIGHT); got 'big'" in err


def test_cli_writes_png_with_parameters(fake_bundle, tmp_path):
    from PIL import Image

    out = tmp_path / "cat.png"
    assert (
        main(
            [
                "cat maid",
                "--negative",
                "blurry",
                "--bundle",
                str(fake_bundle),
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
