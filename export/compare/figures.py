"""The report's PNG figures. Headless (Agg), one function per figure, each returns its path."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from export.compare.settings import STAGES  # noqa: E402

DIFF_GAIN = 10  # |difference| is amplified so that 1/255 errors are visible


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


LOG_FLOOR = 1e-16  # where exact zeros are drawn on log axes


def _log_safe(values: list[float] | np.ndarray) -> np.ndarray:
    """Zeros cannot be drawn on a log axis; draw them at LOG_FLOOR (the axis label says so)."""
    return np.maximum(np.asarray(values, np.float64), LOG_FLOOR)


def deprojector_positions(max_abs: list[float], cosine: list[float], path: Path) -> Path:
    """Error per sequence position: the deprojector generates positions one after another."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    positions = np.arange(len(max_abs))
    top.semilogy(positions, _log_safe(max_abs), marker=".")
    top.set_ylabel("max abs")
    top.set_title(f"Deprojector: runtime vs PyTorch per position (0 drawn at {LOG_FLOOR:g})")
    bottom.semilogy(positions, _log_safe(1 - np.asarray(cosine, np.float64)), marker=".", color="tab:orange")
    bottom.set_ylabel("1 - cosine")
    bottom.set_xlabel("position (0 = BOS)")
    return _save(fig, path)


def latent_drift(max_abs: list[float], rel_l2: list[float], timesteps: list[float], path: Path) -> Path:
    """How far the runtime's latents are from diffusers' after each denoising step."""
    fig, ax = plt.subplots(figsize=(8, 4))
    steps = np.arange(1, len(max_abs) + 1)
    ax.semilogy(steps, _log_safe(max_abs), marker="o", label="max abs")
    ax.semilogy(steps, _log_safe(rel_l2), marker="s", label="relative L2")
    ax.set_xlabel("denoising step (timestep below)")
    ax.set_xticks(steps, [f"{i}\n{t:g}" for i, t in zip(steps, timesteps, strict=True)], fontsize=7)
    ax.set_ylabel("latent difference")
    ax.set_title("Latent drift per step: runtime vs diffusers (same start, same random numbers)")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def stage_times(medians: dict[str, dict[str, float]], path: Path, stages: tuple[str, ...] = STAGES) -> Path:
    """Stacked median seconds per end-to-end stage, one bar per implementation."""
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = list(medians)
    bottom = np.zeros(len(labels))
    for stage in stages:
        values = np.array([medians[label].get(stage, 0.0) for label in labels])
        ax.bar(labels, values, bottom=bottom, label=stage)
        bottom += values
    for x, total in enumerate(bottom):
        ax.text(x, total, f"{total:.2f} s", ha="center", va="bottom")
    ax.set_ylabel("seconds (median)")
    ax.set_title("End-to-end time per stage")
    ax.legend()
    return _save(fig, path)


def image_grid(reference: np.ndarray, ours: np.ndarray, path: Path) -> Path:
    """PyTorch | runtime | |difference| x DIFF_GAIN, uint8 (H, W, 3) images."""
    diff = np.abs(reference.astype(np.int16) - ours.astype(np.int16))
    amplified = np.clip(diff * DIFF_GAIN, 0, 255).astype(np.uint8)
    height, width = reference.shape[:2]
    fig, axes = plt.subplots(1, 3, figsize=(3 * max(width, 192) / 80, max(height, 192) / 80 + 0.6))
    titles = ("PyTorch (diffusers)", "runtime", f"|difference| x {DIFF_GAIN} (max {int(diff.max())}/255)")
    for ax, image, title in zip(axes, (reference, ours, amplified), titles, strict=True):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    return _save(fig, path)
