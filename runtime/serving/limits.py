"""Server policy on top of `runtime.options.validate`: what one request may cost.

`validate` says what the bundle can do (steps up to 1000, any size its UNet accepts); a shared
server also has to bound what a single caller may ask for, so one request cannot hold a worker
for minutes or exhaust memory. These limits are configurable per deployment.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.options import GenerateOptions


@dataclass(frozen=True)
class Limits:
    max_steps: int = 150
    max_side: int | None = None  # pixels per image side; None: whatever the bundle allows
    max_images: int = 4  # images per request (prompts x num_images)
    max_prompt_chars: int = 2000  # per prompt and per negative prompt
    max_body_bytes: int = 1 << 20  # HTTP request bodies
    timeout_s: float = 300.0  # per-request deadline (queue wait + generation); requests may ask for less


def check_prompts(options: GenerateOptions, limits: Limits) -> None:
    """Cheap length check, run before anything tokenises a possibly huge string."""
    for name, texts in (("prompt", options.prompts), ("negative_prompt", options.negative_prompts)):
        for text in texts:
            if isinstance(text, str) and len(text) > limits.max_prompt_chars:
                raise ValueError(
                    f"{name} must be at most {limits.max_prompt_chars} characters on this server; "
                    f"got {len(text)}"
                )


def check_limits(options: GenerateOptions, limits: Limits) -> None:
    """Raise ValueError naming the parameter and the server's limit; `options` are validated."""
    check_prompts(options, limits)
    if options.steps > limits.max_steps:
        raise ValueError(f"steps must be from 1 to {limits.max_steps} on this server; got {options.steps}")
    if options.total_images > limits.max_images:
        raise ValueError(
            f"num_images must be from 1 to {limits.max_images} per request on this server; "
            f"got {options.total_images}"
        )
    if limits.max_side is not None:
        for name, value in (("width", options.width), ("height", options.height)):
            if value is not None and value > limits.max_side:
                raise ValueError(f"{name} must be at most {limits.max_side} on this server; got {value}")
