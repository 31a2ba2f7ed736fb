"""Shape logic shared by the engine builder and TrtBackend; pure, so it is tested without a GPU.

A profile maps each symbolic dim of a model's spec ("batch", "height", "width", "tokens") to a
`DimRange`. The builder turns it into per-input (min, opt, max) shapes; the backend uses the same
profiles to route a request to the engine and profile that accept its shape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from runtime.bundle import DimRange
from runtime.errors import SetupError
from runtime.specs import ModelSpec

Profile = Mapping[str, DimRange]
Shape = tuple[int, ...]


def input_ranges(spec: ModelSpec, profile: Profile) -> dict[str, tuple[Shape, Shape, Shape]]:
    """(min, opt, max) shape of every input with a symbolic dim (static inputs need no profile)."""
    ranges = {}
    for t in spec.inputs:
        if all(isinstance(d, int) for d in t.shape):
            continue
        missing = [d for d in t.shape if isinstance(d, str) and d not in profile]
        if missing:
            raise ValueError(f"{spec.name}: profile has no range for {missing} of input {t.name}")
        pick = [
            tuple(d if isinstance(d, int) else getattr(profile[d], which) for d in t.shape)
            for which in ("min", "opt", "max")
        ]
        ranges[t.name] = (pick[0], pick[1], pick[2])
    return ranges


def max_input_shapes(spec: ModelSpec, profiles: Sequence[Profile]) -> dict[str, Shape]:
    """Largest shape of every input over all profiles: buffers of this size fit every request."""
    shapes = {t.name: tuple(d for d in t.shape if isinstance(d, int)) for t in spec.inputs}
    for profile in profiles:
        for name, (_, _, largest) in input_ranges(spec, profile).items():
            if len(shapes[name]) != len(largest) or math.prod(largest) > math.prod(shapes[name]):
                shapes[name] = largest
    return shapes


def request_dims(spec: ModelSpec, shapes: Mapping[str, Shape]) -> dict[str, int]:
    """Values of the symbolic dims in one request; a name used twice must have one size."""
    dims: dict[str, int] = {}
    for t in spec.inputs:
        for axis, dim in enumerate(t.shape):
            if isinstance(dim, str):
                size = shapes[t.name][axis]
                if dims.setdefault(dim, size) != size:
                    raise ValueError(
                        f"{spec.name}: dim {dim!r} is {dims[dim]} in one input and {size} in {t.name}"
                    )
    return dims


def covers(profile: Profile, dims: Mapping[str, int], ignore: str | None = None) -> bool:
    return all(profile[k].min <= v <= profile[k].max for k, v in dims.items() if k != ignore and k in profile)


def pick_profile(profiles: Sequence[Profile], dims: Mapping[str, int]) -> int | None:
    """Index of the tightest profile that accepts `dims`: a static profile beats a ranged one."""

    def slack(p: Profile) -> tuple[int, int]:
        return sum(r.max - r.min for r in p.values()), sum(
            abs(p[k].opt - v) for k, v in dims.items() if k in p
        )

    fits = [i for i, p in enumerate(profiles) if covers(p, dims)]
    return min(fits, key=lambda i: slack(profiles[i])) if fits else None


class NoProfile(SetupError):
    """No engine profile accepts a request's dims. The request passed the bundle's validation, so
    the engines are what is missing (the server's fault, not the caller's): a `SetupError` whose
    message, once the backend adds it (`command`), names the `python -m engines.build` command that
    builds a profile for these dims."""

    def __init__(
        self, model: str, dims: dict[str, int], profiles: Sequence[Profile], command: str | None = None
    ) -> None:
        wanted = ", ".join(f"{k} {v}" for k, v in dims.items())
        built = "; ".join(describe(p) for p in profiles) or "none"
        message = f"{model}: no engine profile accepts {wanted} (built: {built})"
        if command is not None:
            message += f"; add one with: {command}"
        super().__init__(message)
        self.model, self.dims, self.profiles, self.command = model, dims, tuple(profiles), command


def profile_arguments(dims: Mapping[str, int], profiles: Sequence[Profile], scale: int) -> list[str]:
    """`python -m engines.build` arguments whose engine accepts `dims`: `--shapes WxH` (pixels) for
    the request's image size, and `--batch LO-HI` when no built profile takes its batch size."""
    args = []
    if "height" in dims and "width" in dims:
        args += ["--shapes", f"{dims['width'] * scale}x{dims['height'] * scale}"]
    elif "image_height" in dims and "image_width" in dims:  # the VAE encoder: its input is pixels
        args += ["--shapes", f"{dims['image_width']}x{dims['image_height']}"]
    batch = dims.get("batch")
    built = [p["batch"] for p in profiles if "batch" in p]
    if batch is not None and not any(r.min <= batch <= r.max for r in built):
        low, high = min([batch, *(r.min for r in built)]), max([batch, *(r.max for r in built)])
        args += ["--batch", f"{low}-{high}"]
    return args


def plan_calls(
    spec: ModelSpec, profiles: Sequence[Profile], shapes: Mapping[str, Shape]
) -> list[tuple[int, slice]]:
    """Engine calls for one request: (profile index, rows of the batched inputs) each. A batch
    larger than any fitting profile takes is split; rows are independent in every SD model."""
    dims = request_dims(spec, shapes)
    limits = [p["batch"].max for p in profiles if covers(p, dims, ignore="batch")]
    if not limits:
        raise NoProfile(spec.name, dims, profiles)
    batch = dims["batch"]
    chunk = min(batch, max(limits))
    calls = []
    for start in range(0, batch, chunk):
        rows = min(chunk, batch - start)
        index = pick_profile(profiles, {**dims, "batch": rows})
        if index is None:
            raise NoProfile(spec.name, {**dims, "batch": rows}, profiles)
        calls.append((index, slice(start, start + rows)))
    return calls


def nbytes(shape: Shape, itemsize: int) -> int:
    return math.prod(shape) * itemsize


def describe(profile: Profile) -> str:
    """'batch 1-4, height 64, width 64' (ranges in the units of the spec: latents, tokens)."""
    parts = [f"{k} {r.min}" if r.min == r.max else f"{k} {r.min}-{r.max}" for k, r in profile.items()]
    return ", ".join(parts)
