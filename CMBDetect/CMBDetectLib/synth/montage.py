"""A montage PNG of synthetic cases: for each, the slice with the most microbleed voxels, with
the label outlines (small bleeds orange, large ones red), and a 48 mm close-up with and without
outlines so the bleeds and the veins beside them can be judged by eye."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..io import atomic_path
from .case import SynthCase

MAX_LESION_PANELS = 5
CLOSE_UP_MM = 48.0
COLOURS = {"small": "#ff9900", "large": "#e3001b"}


@dataclass
class Panel:
    title: str
    image: np.ndarray
    labels: np.ndarray
    classes: dict[int, str]
    spacing: tuple[float, float]  # (row, column) mm
    centre: tuple[int, int]
    wm_level: float


def _panel(case: SynthCase) -> Panel:
    labels = case.labels
    meta = case.meta
    per_slice = (labels > 0).sum(axis=(1, 2))
    if per_slice.any():
        k = int(np.argmax(per_slice))
        ids, counts = np.unique(labels[k][labels[k] > 0], return_counts=True)
        biggest = int(ids[np.argmax(counts)])
        centre = tuple(int(round(v)) for v in ndimage.center_of_mass(labels[k] == biggest))
    else:
        k = int(labels.shape[0] * 0.6)
        # A close-up of the brain off the midline, where veins are.
        bright = case.image.array[k] > 0.6 * float(meta["vendor_curve"]["wm_level"])  # type: ignore[index]
        cj, ci = ndimage.center_of_mass(bright) if bright.any() else (labels.shape[1] / 2, labels.shape[2] / 2)
        centre = (int(cj), int(ci + labels.shape[2] * 0.12))
    classes = {int(x["id"]): str(x["size_class"]) for x in meta["lesions"]}  # type: ignore[union-attr]
    spacing = case.image.geometry.spacing
    kind = "control" if meta["control"] else f"{meta['n_lesions']} CMB"
    title = (f"{case.name} ({kind})\n{meta['vendor']} {meta['field_strength_t']} T, TE {meta['te_ms']:.0f} ms, "
             f"{meta['matrix'][0]}x{meta['matrix'][1]}, {meta['slice_thickness_mm']} mm")  # type: ignore[index]
    return Panel(title, case.image.array[k].copy(), labels[k].copy(), classes, (spacing[1], spacing[0]), centre,
                 float(meta["vendor_curve"]["wm_level"]))  # type: ignore[index]


class MontageCollector:
    """Keeps one slice of the first few lesion cases and of the first control."""

    def __init__(self) -> None:
        self.panels: list[Panel] = []
        self.control: Panel | None = None

    def add(self, case: SynthCase) -> None:
        if case.meta["control"]:
            if self.control is None:
                self.control = _panel(case)
        elif len(self.panels) < MAX_LESION_PANELS and case.meta["n_lesions"]:
            self.panels.append(_panel(case))

    def save(self, path: Path) -> None:
        panels = self.panels + ([self.control] if self.control is not None else [])
        if not panels:
            raise ValueError("no cases to put in the montage")
        save_montage(panels, path)


def _outline(ax, panel: Panel, labels: np.ndarray, extent=None) -> None:
    for lesion_id, size in panel.classes.items():
        mask = labels == lesion_id
        if mask.any():
            ax.contour(mask.astype(float), [0.5], colors=COLOURS[size], linewidths=0.9, extent=extent,
                       origin="upper" if extent is not None else None)


def save_montage(panels: list[Panel], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(panels), figsize=(3.3 * len(panels), 10.2), squeeze=False)
    for col, p in enumerate(panels):
        aspect = p.spacing[0] / p.spacing[1]
        vmax = 1.3 * p.wm_level
        ax = axes[0, col]
        ax.imshow(p.image, cmap="gray", vmin=0, vmax=vmax, aspect=aspect, interpolation="nearest")
        _outline(ax, p, p.labels)
        half_j = int(CLOSE_UP_MM / 2 / p.spacing[0])
        half_i = int(CLOSE_UP_MM / 2 / p.spacing[1])
        j0 = int(np.clip(p.centre[0] - half_j, 0, max(0, p.image.shape[0] - 2 * half_j)))
        i0 = int(np.clip(p.centre[1] - half_i, 0, max(0, p.image.shape[1] - 2 * half_i)))
        box = (slice(j0, j0 + 2 * half_j), slice(i0, i0 + 2 * half_i))
        ax.add_patch(plt.Rectangle((i0, j0), 2 * half_i, 2 * half_j, fill=False, ec="#33ccff", lw=0.8))
        ax.set_title(p.title, fontsize=7)
        for row in (1, 2):
            ax = axes[row, col]
            ax.imshow(p.image[box], cmap="gray", vmin=0, vmax=vmax, aspect=aspect, interpolation="nearest")
            if row == 2:
                _outline(ax, p, p.labels[box])
        axes[1, col].set_title(f"close-up {CLOSE_UP_MM:.0f} mm", fontsize=7)
        axes[2, col].set_title("labels: small orange, large red", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Synthetic SWI (cmbdetect synth): microbleeds, veins, calcifications, air-tissue edges", fontsize=10)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
