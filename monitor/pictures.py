"""Pictures of a probe's last window (opt-in: ``CollapseMonitor(pictures=...)``).

A probe describes what to draw as a :class:`Picture` (plain tensors, no plotting library); this
module renders it with matplotlib, an optional dependency, into an ``(H, W, 3) uint8`` image that
sinks write (TensorBoard's image tab). Without matplotlib the monitor says so once and logs no
pictures; everything else works.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Picture:
    """What to draw.

    Attributes:
        kind: ``"heatmap"`` (``values`` 2-D), ``"bars"`` or ``"spectrum"`` (1-D, log y axis).
        values: the numbers, any float dtype/device.
        title, xlabel, ylabel: text.
        reference: heatmap: the ideal value (e.g. the simplex ETF's off-diagonal cosine), used
            as the colour scale's centre; bars/spectrum: a horizontal threshold line.
        labels: optional tick labels for the heatmap's rows.
    """

    kind: str
    values: torch.Tensor
    title: str
    xlabel: str = ""
    ylabel: str = ""
    reference: float | None = None
    labels: list[str] | None = None


def available() -> bool:
    """True when matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def render(pic: Picture, size: tuple[float, float] = (5.0, 4.0), dpi: int = 80) -> np.ndarray:
    """Draw ``pic``; returns ``(H, W, 3) uint8`` RGB."""
    # no pyplot: no global state, no display
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    v = pic.values.detach().to("cpu", torch.float64).numpy()
    if pic.kind == "heatmap":
        ref = 0.0 if pic.reference is None else pic.reference
        span = max(float(np.nanmax(np.abs(v - ref))) if v.size else 1.0, 1e-12)
        im = ax.imshow(v, cmap="coolwarm", vmin=ref - span, vmax=ref + span, aspect="auto")
        fig.colorbar(im, ax=ax)
        if v.shape[1] <= 32:  # heads, few classes: integer ticks
            ax.set_xticks(range(v.shape[1]))
        if pic.labels is not None:
            ax.set_yticks(range(len(pic.labels)), pic.labels, fontsize=7)
    elif pic.kind in ("bars", "spectrum"):
        x = np.arange(len(v))
        if pic.kind == "bars":
            if len(v) <= 50:
                ax.bar(x, v, width=0.8, color="tab:blue")
            else:  # one patch for all bars: a Rectangle per bar is slow for thousands of codes
                ax.stairs(v, np.arange(len(v) + 1) - 0.5, fill=True, color="tab:blue")
        else:
            ax.semilogy(x + 1, np.clip(v, 1e-300, None), ".-", color="tab:blue")
        if pic.reference is not None:
            ax.axhline(pic.reference, color="tab:red", linestyle="--", linewidth=1)
    else:
        raise ValueError(f"unknown picture kind {pic.kind!r}")
    ax.set_title(pic.title, fontsize=9)
    ax.set_xlabel(pic.xlabel)
    ax.set_ylabel(pic.ylabel)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
