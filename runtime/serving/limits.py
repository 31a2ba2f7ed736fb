"""Server policy on top of `runtime.options.validate`: what one request may cost.

`validate` says what the bundle can do (steps up to 1000, any size its UNet accepts); a shared
server also has to bound what a single caller may ask for, so one request cannot hold a worker
for minutes or exhaust memory. These limits are configurable per deployment.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.errors import RequestError
from runtime.options import MAX_IMAGES, MAX_STEPS, GenerateOptions, ResolvedOptions
from runtime.serving.checks import int_in, number_in


@dataclass(frozen=True)
class Limits:
    max_steps: int = 150
    max_side: int | None = None  # pixels per image side; None: whatever the bundle allows
    max_images: int = 4  # images per request (prompts x num_images)
    max_prompt_chars: int = 2000  # per prompt and per negative prompt
    # HTTP request bodies. 16 MiB: room for an init image and a mask as base64 in JSON (4/3 of the
    # files' size; a 1024x1024 photo is 2-3 MB as PNG). A deployment without images can lower it.
    max_body_bytes: int = 16 << 20
    timeout_s: float = 300.0  # per-request deadline (queue wait + generation); requests may ask for less
    read_timeout_s: float = 15.0  # a request's headers, then its body, must each arrive within this

    def validate(self) -> Limits:
        """These limits, or RequestError naming the setting (as the CLIs spell it) and its range."""
        int_in("max_steps", self.max_steps, 1, MAX_STEPS)
        if self.max_side is not None:
            int_in("max_side", self.max_side, 8, 16384)
        int_in("max_images", self.max_images, 1, MAX_IMAGES)
        int_in("max_prompt_chars", self.max_prompt_chars, 1, 1 << 20)
        int_in("max_body_bytes", self.max_body_bytes, 1, 1 << 30)
        number_in("timeout", self.timeout_s, 0.001, 86_400, " seconds")
        number_in("read_timeout", self.read_timeout_s, 0.01, 3600, " seconds")
        return self


def check_prompts(options: GenerateOptions | ResolvedOptions, limits: Limits) -> None:
    """Cheap length check, run before anything tokenises a possibly huge string."""
    for name, texts in (("prompt", options.prompts), ("negative_prompt", options.negative_prompts)):
        for text in texts:
            if isinstance(text, str) and len(text) > limits.max_prompt_chars:
                raise RequestError(
                    f"{name} must be at most {limits.max_prompt_chars} characters on this server; "
                    f"got {len(text)}"
                )


def check_limits(options: ResolvedOptions, limits: Limits) -> None:
    """Raise RequestError naming the parameter and the server's limit."""
    check_prompts(options, limits)
    if options.steps > limits.max_steps:
        raise RequestError(f"steps must be from 1 to {limits.max_steps} on this server; got {options.steps}")
    if options.total_images > limits.max_images:
        raise RequestError(
            f"num_images must be from 1 to {limits.max_images} per request on this server; "
            f"got {options.total_images}"
        )
    if limits.max_side is not None:
        for name, value in (("width", options.width), ("height", options.height)):
            if value > limits.max_side:
                raise RequestError(f"{name} must be at most {limits.max_side} on this server; got {value}")
