"""`<case>_registration.png`: the registration's QC picture. Three slices of the SWI (on the 2 mm
working grid) side by side, the template's head outlined in yellow and its brain in red where the
registration put them, framed green when QC passed and red when it failed (the summary says why).

Drawn with numpy and written by SimpleITK, so that it needs nothing Slicer lacks (matplotlib)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .register import TemplateRegistration

ZOOM = 2  # pixels per working-grid voxel
FRAME = 4
YELLOW, RED, GREEN = (255, 220, 0), (230, 30, 30), (40, 190, 60)


def _outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def registration_picture(registration: TemplateRegistration) -> np.ndarray:
    """The picture as an RGB uint8 array (rows, columns, 3)."""
    pic = registration.picture
    sx, sy = pic["spacing"][0], pic["spacing"][1]
    tiles = []
    for plane, head, brain in zip(pic["image"], pic["head"], pic["brain"]):
        low, high = np.percentile(plane, [1, 99.5]) if plane.size else (0.0, 1.0)
        grey = (np.clip((plane - low) / max(high - low, 1e-6), 0, 1) * 255).astype(np.uint8)
        rgb = np.repeat(grey[..., None], 3, axis=2)
        rgb[_outline(head)] = YELLOW
        rgb[_outline(brain)] = RED
        # Square pixels in millimetres, then ZOOM: a 2 x 3 mm grid is not drawn squashed.
        ry, rx = max(1, int(round(ZOOM * sy / min(sx, sy)))), max(1, int(round(ZOOM * sx / min(sx, sy))))
        tiles.append(np.repeat(np.repeat(rgb, ry, axis=0), rx, axis=1))  # rows anterior first, columns right first (radiological)
    height = max(t.shape[0] for t in tiles)
    row = np.concatenate([np.pad(t, ((0, height - t.shape[0]), (0, 2), (0, 0))) for t in tiles], axis=1)
    framed = np.empty((row.shape[0] + 2 * FRAME, row.shape[1] + 2 * FRAME, 3), np.uint8)
    framed[...] = GREEN if registration.ok else RED
    framed[FRAME:-FRAME, FRAME:-FRAME] = row
    return framed


def write_registration_picture(registration: TemplateRegistration, path: Path, case: str = "") -> None:
    image = sitk.GetImageFromArray(registration_picture(registration), isVector=True)
    sitk.WriteImage(image, str(path), imageIO="PNGImageIO")
