"""`<case>_registration.png`: the registration's QC picture, the template's head (yellow) and brain
(red) outlined on three slices of the SWI as the registration left them, with the QC verdict."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .register import TemplateRegistration


def write_registration_picture(registration: TemplateRegistration, path: Path, case: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no Qt
    import matplotlib.pyplot as plt

    pic = registration.picture
    slices = pic["slices"]
    sx, sy = pic["spacing"][0], pic["spacing"][1]
    fig, axes = plt.subplots(1, len(slices), figsize=(3.2 * len(slices), 3.6), squeeze=False)
    for ax, n in zip(axes[0], range(len(slices))):
        plane = pic["image"][n]
        low, high = np.percentile(plane, [1, 99.5]) if plane.size else (0.0, 1.0)
        ax.imshow(plane, cmap="gray", vmin=low, vmax=max(high, low + 1e-6), aspect=sy / sx, interpolation="nearest")
        for mask, colour in ((pic["head"][n], "yellow"), (pic["brain"][n], "red")):
            if mask.any() and not mask.all():
                ax.contour(mask.astype(np.uint8), levels=[0.5], colors=[colour], linewidths=0.8)
        ax.set_title(f"slice {slices[n]} (of the 2 mm working grid)", fontsize=7)
        ax.axis("off")
    qc = registration.qc()
    verdict = "QC passed" if registration.ok else f"QC FAILED: {registration.reason}; every region is unknown"
    fig.suptitle(f"{case}: template head (yellow) and brain (red) after registration\n"
                 f"{verdict} (head Dice {qc['head_dice']}, Mattes MI {qc['mattes_mi']})", fontsize=8)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=80, format="png")
    plt.close(fig)
