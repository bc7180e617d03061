"""A quick-look picture of one case's detections, for reviewing a batch without opening Slicer.

One tile per detected microbleed (the most probable first): the slice through its centroid,
a window of about 40 mm around it, the lesion outlined in its class colour. With the
candidate stage, the candidates it rejected follow, each outlined with a dashed grey line and
titled with its reason (the mimic it most resembles), so that a reader sees why a dark dot
was not called a bleed. Tiles are drawn with the voxel spacing's aspect ratio, so an
anisotropic scan is not stretched.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io import Geometry
from .lesions import CLASS_COLORS, Lesion

WINDOW_MM = 40.0
MAX_TILES = 24
MAX_REJECTED_TILES = 12
COLUMNS = 6
REJECTED_COLOR = (0.7, 0.7, 0.7)


def _score(lesion: Lesion) -> float:
    return float(getattr(lesion, "p_microbleed", lesion.max_probability))


def write_preview(
    image: np.ndarray,
    labels: np.ndarray,
    lesions: list[Lesion],
    geometry: Geometry,
    path: Path,
    case: str,
    rejected: list | None = None,
    rejected_labels: np.ndarray | None = None,
) -> None:
    """Write a PNG of the case's detections (or of its middle slice, saying none were found)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no Qt
    import matplotlib.pyplot as plt

    shown = sorted(lesions, key=lambda l: -_score(l))[:MAX_TILES]
    refused = sorted(rejected or [], key=lambda c: -c.p_microbleed)[:MAX_REJECTED_TILES] if rejected_labels is not None else []
    sx, sy = geometry.spacing[0], geometry.spacing[1]  # i (columns) and j (rows) spacing, mm
    n = max(1, len(shown) + len(refused))
    cols = min(COLUMNS, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows + 0.5), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    if not shown and not refused:
        k = image.shape[0] // 2
        _show(axes[0, 0], image[k], sx, sy)
        axes[0, 0].set_title(f"slice {k}: no microbleeds found", fontsize=8)
    tiles = [(lesion, labels, False) for lesion in shown] + [(c, rejected_labels, True) for c in refused]
    for ax, (lesion, label_map, is_rejected) in zip(axes.ravel(), tiles):
        i, j, k = (int(round(v)) for v in lesion.centroid_ijk)
        hi, hj = int(WINDOW_MM / 2 / sx), int(WINDOW_MM / 2 / sy)
        j0, j1 = max(0, j - hj), min(image.shape[1], j + hj + 1)
        i0, i1 = max(0, i - hi), min(image.shape[2], i + hi + 1)
        _show(ax, image[k], sx, sy, window=(j0, j1, i0, i1))
        outline = label_map[k, j0:j1, i0:i1] == lesion.id
        if is_rejected:
            if outline.any():
                ax.contour(outline, levels=[0.5], colors=[REJECTED_COLOR], linewidths=1.0, linestyles="dashed")
            ax.set_title(f"rejected: {lesion.reason}\nslice {k} · P(CMB) {lesion.p_microbleed:.2f}", fontsize=7, color="dimgray")
            continue
        if outline.any():
            ax.contour(outline, levels=[0.5], colors=[CLASS_COLORS[lesion.size_class]], linewidths=1.2)
        if hasattr(lesion, "p_microbleed"):
            detail = f"{lesion.certainty} · P(CMB) {lesion.p_microbleed:.2f}"
        else:
            detail = f"p {lesion.max_probability:.2f}"
        ax.set_title(f"{lesion.name} · {lesion.size_class} {lesion.diameter_mm:.1f} mm\nslice {k} · {detail}", fontsize=7)
    more = f" (the {MAX_TILES} most probable shown)" if len(lesions) > MAX_TILES else ""
    title = f"{case}: {len(lesions)} microbleeds{more}"
    if rejected is not None and rejected_labels is not None:
        extra = f", the {MAX_REJECTED_TILES} most probable shown" if len(rejected) > MAX_REJECTED_TILES else ""
        title += f"; {len(rejected)} candidates rejected (dashed grey{extra})"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90, format="png")
    plt.close(fig)


def _show(ax, plane: np.ndarray, sx: float, sy: float, window: tuple[int, int, int, int] | None = None) -> None:
    # Grey levels from the whole slice, so a tile's contrast does not depend on what it contains.
    low, high = np.percentile(plane, [1, 99.5]) if plane.size else (0.0, 1.0)
    if window:
        j0, j1, i0, i1 = window
        plane = plane[j0:j1, i0:i1]
    ax.imshow(plane, cmap="gray", vmin=low, vmax=max(high, low + 1e-6), aspect=sy / sx, interpolation="nearest")
