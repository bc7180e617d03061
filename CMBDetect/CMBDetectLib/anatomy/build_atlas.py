"""Build the shipped atlas (a developer's step, run once; run time never needs nilearn):

    python -m CMBDetectLib.anatomy.build_atlas CMBDetect/Resources/Atlas

From the MNI ICBM152 2009a (symmetric) template that nilearn installs (1 mm, skull-stripped T1
and grey/white-matter maps, read with SimpleITK as synth/anatomy.py does), it writes, on one
2 mm grid in MNI space:
- `template_head_2mm.nii.gz`: the registration target, uint8. Inside the brain the template's
  T1; around it the generator's stylised head (CSF, skull with diploe, scalp: synth/anatomy.py),
  because nilearn's copy has no skull and an SWI does, and an affine fit of a bare brain to a
  whole head stretches the brain over the scalp.
- `structures_2mm.nii.gz`: the MARS structure labels (structures.py), uint8.
- `atlas.json`: every label (structure, MARS category, side), the grid, and the files' sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .atlas import ATLAS_JSON, HEAD_FILE, LABELS_FILE, STEP_MM
from .structures import label_table, structure_map

ATLAS_VERSION = "1"


def _padded_image(array: np.ndarray, reference: sitk.Image, pad: int) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(reference.GetSpacing())
    image.SetDirection(reference.GetDirection())
    direction = np.array(reference.GetDirection()).reshape(3, 3)
    image.SetOrigin(tuple(np.array(reference.GetOrigin()) + direction @ np.array([0.0, 0.0, -pad])))
    return image


def build(out: Path) -> dict[str, object]:
    from ..synth.anatomy import PAD_INFERIOR, TEMPLATE_FILES, load_template, template_dir

    template = load_template()
    reference = sitk.ReadImage(str(template_dir() / TEMPLATE_FILES["t1"]), sitk.sitkFloat32)
    t1 = sitk.GetArrayFromImage(reference)
    t1 = np.concatenate([np.repeat(t1[:1], PAD_INFERIOR, axis=0), t1], axis=0)  # as load_template pads
    brain = t1 > 0
    white = float(np.percentile(t1[brain], 90))
    channel = lambda name: template.channel(name).astype(np.float32) / 255.0  # noqa: E731
    # T1-like intensities outside the brain: CSF dark, compact bone dark, marrow and scalp (fat) bright.
    head = np.clip(t1 / white, 0.0, 1.25) * brain + 0.15 * channel("csf") * ~brain + 0.9 * channel("marrow") + 0.6 * channel("scalp")
    head_image = _padded_image((np.clip(head / 1.25, 0, 1) * 255).astype(np.float32), reference, PAD_INFERIOR)
    # The 2 mm grid keeps every other 1 mm voxel centre, MNI x = 0 among them, so that left and
    # right are sampled alike and labels are read at voxel centres, never between two.
    grid = sitk.Image([int(np.ceil(n / STEP_MM)) for n in head_image.GetSize()], sitk.sitkUInt8)
    grid.SetSpacing([STEP_MM] * 3)
    grid.SetOrigin(head_image.GetOrigin())
    grid.SetDirection(head_image.GetDirection())
    smooth = sitk.SmoothingRecursiveGaussian(head_image, STEP_MM / 2.0)
    head_2mm = sitk.Resample(smooth, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkUInt8)

    gm, wm = channel("gm"), channel("wm")
    labels = _padded_image(structure_map(template.region, gm, wm), reference, PAD_INFERIOR)
    labels_2mm = sitk.Resample(labels, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)

    out.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(head_2mm, str(out / HEAD_FILE), useCompression=True)
    sitk.WriteImage(labels_2mm, str(out / LABELS_FILE), useCompression=True)
    counts = np.bincount(sitk.GetArrayViewFromImage(labels_2mm).ravel(), minlength=len(label_table()) + 1)
    card = {
        "name": "CMBDetect MARS atlas",
        "version": ATLAS_VERSION,
        "template": "MNI ICBM152 2009a nonlinear symmetric (nilearn's copy: mni_icbm152_*_tal_nlin_sym_09a_converted)",
        "space": "MNI mm; files in LPS as every NIfTI read by ITK",
        "spacing_mm": STEP_MM,
        "head": "T1 inside the brain; outside, the generator's stylised CSF, skull, diploe and scalp (synth/anatomy.py)",
        "regions": "MARS categories from the generator's region map; structures by plane and distance rules (anatomy/structures.py)",
        "labels": [{**row, "voxels": int(counts[int(row["value"])])} for row in label_table()],
        "files": {
            name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in (HEAD_FILE, LABELS_FILE)
        },
        "licence": "LICENSE.txt (ICBM 2009 copyright and permission notice)",
    }
    (out / ATLAS_JSON).write_text(json.dumps(card, indent=1) + "\n")
    return card


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m CMBDetectLib.anatomy.build_atlas", description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path, help="the atlas folder, e.g. CMBDetect/Resources/Atlas")
    args = p.parse_args(argv)
    try:
        card = build(args.out)
    except RuntimeError as exc:  # nilearn or its template files missing
        print(f"error: {exc}", file=sys.stderr)
        return 2
    empty = [f"{r['structure']}/{r['side']}" for r in card["labels"] if not r["voxels"]]  # type: ignore[index]
    print(f"atlas written to {args.out}: {len(card['labels'])} labels" + (f"; empty: {', '.join(empty)}" if empty else ""))  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
