"""Does the candidate classifier know a bleed it was not trained on? Simple bleeds planted into
synthetic control brains, judged without phase.

    .venv/bin/python Testing/bench_planted.py SYNTH_FOLDER [CLASSIFIER ...] [--points 4] [--seed 1]

SYNTH_FOLDER: a `cmbdetect synth` output (images/, mimics/, meta/); its controls are used,
for example `cmbdetect synth --domain train --seed 9000 --n 12 --controls 8 --out heldout/train`.
CLASSIFIER: registry ids or .safetensors files (default: the default model's classifier).

At `--points` white-matter points per control (at least 12 mm from any mimic), bleeds of the
simplest kinds another simulator might draw are planted on the scan's own grid: spheres with
partial-volume edges (3^3 sub-samples per voxel) and Gaussian blobs, of 2, 3, 4 and 6 mm, with
50 % and 80 % signal loss at the core. Each is one candidate at its centre. Printed: for each
variant and classifier, the share kept as a microbleed (P(microbleed) >= keep_at) by the
candidate stage without phase (calcification counted as microbleed, candidates.without_phase)
and, in brackets, by the classifier's own P(microbleed); and the stage's verdicts for the
first classifier. The planted kinds resemble those of the training augmentation
(training/planted.py) but are drawn on the scan's grid, not the patch's, in held-out brains.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from CMBDetectLib.detection.candidates import classify_patches, sample_patches, scaled_magnitude, without_phase
from CMBDetectLib.detection.records import CLASSES, MICROBLEED
from CMBDetectLib.io import Geometry, read_volume
from CMBDetectLib.detection.candidates import load_candidate_classifier
from CMBDetectLib.models import read_registry

DIAMETERS_MM = (2.0, 3.0, 4.0, 6.0)
LOSSES = (0.5, 0.8)


def plant(array: np.ndarray, geometry: Geometry, centre_ijk: np.ndarray, diameter_mm: float, loss: float, kind: str) -> np.ndarray:
    """A copy of `array` with a dark sphere or Gaussian blob multiplied in around `centre_ijk`."""
    out = array.copy()
    reach = np.ceil((diameter_mm * (1.5 if kind == "gaussian" else 0.5) + 1.0) / np.asarray(geometry.spacing)).astype(int)
    lo = np.maximum(np.floor(centre_ijk).astype(int) - reach, 0)
    hi = np.minimum(np.floor(centre_ijk).astype(int) + reach + 1, np.array(array.shape[::-1]))
    sub = (np.arange(3) + 0.5) / 3 - 0.5
    m = geometry.ijk_to_lps()
    centre_lps = geometry.index_to_lps(centre_ijk)
    kk, jj, ii = np.mgrid[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]].astype(float)
    profile = np.zeros(kk.shape)
    for a, b, c in np.ndindex(3, 3, 3):
        lps = np.stack([ii + sub[a], jj + sub[b], kk + sub[c]], -1) @ m[:3, :3].T + m[:3, 3]
        r = np.linalg.norm(lps - centre_lps, axis=-1)
        profile += 2.0 ** (-((2 * r / diameter_mm) ** 2)) if kind == "gaussian" else (r <= diameter_mm / 2)
    out[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]] *= (1.0 - loss * profile / 27.0).astype(np.float32)
    return out


def white_matter_points(magnitude: np.ndarray, mimics: np.ndarray, geometry: Geometry, n: int, rng: np.random.Generator) -> np.ndarray:
    far = ndimage.distance_transform_edt(mimics == 0, sampling=geometry.spacing[::-1]) > 12.0
    inside = ndimage.binary_erosion(magnitude > 0.6, iterations=3)
    kji = np.argwhere((np.abs(magnitude - 1.0) < 0.1) & far & inside)
    kji = kji[(kji[:, 0] > 3) & (kji[:, 0] < magnitude.shape[0] - 4)]
    return kji[rng.choice(len(kji), min(n, len(kji)), replace=False)][:, ::-1].astype(float)  # (i, j, k)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("classifiers", nargs="*")
    p.add_argument("--points", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    if not args.classifiers:
        registry = read_registry()
        args.classifiers = [next(e for e in registry["models"] if e["id"] == registry["default"])["candidate_classifier"]]
    loaded = [load_candidate_classifier(c) for c in args.classifiers]
    rng = np.random.default_rng(args.seed)
    variants = [(kind, d, loss) for kind in ("sphere", "gaussian") for d in DIAMETERS_MM for loss in LOSSES]
    verdicts: dict[tuple, list[list[np.ndarray]]] = {v: [[] for _ in loaded] for v in variants}
    controls = sorted(f for f in (args.folder / "meta").glob("*.json") if json.loads(f.read_text()).get("control"))
    for meta in controls:
        image = next((args.folder / "images").glob(meta.stem + ".*"))
        volume = read_volume(image)
        mimics = read_volume(next((args.folder / "mimics").glob(meta.stem + ".*"))).array
        for ijk in white_matter_points(scaled_magnitude(volume.array), mimics, volume.geometry, args.points, rng):
            centre = volume.geometry.index_to_lps(ijk)[None]
            for v in variants:
                planted = scaled_magnitude(plant(volume.array, volume.geometry, ijk, v[1], v[2], v[0]))
                for n, clf in enumerate(loaded):
                    patch = sample_patches(planted, None, volume.geometry, centre, clf.network.config)
                    verdicts[v][n].append(classify_patches(clf.network, patch)[0])
    n_points = len(verdicts[variants[0]][0])
    print(f"{len(controls)} controls, {n_points} planted points per variant; kept without phase: by the stage (by the classifier alone)")
    names = [f"{c.id} {c.version}" for c in loaded]
    print("| variant | " + " | ".join(f"kept, {n}" for n in names) + f" | stage's verdicts, {names[0]} ({'/'.join(c[:5] for c in CLASSES)}) |")
    print("|---" * (len(names) + 2) + "|")

    def kept(probs: list[np.ndarray], keep_at: float) -> tuple[float, float]:
        raw = np.array(probs)
        return float(np.mean(without_phase(raw)[:, MICROBLEED] >= keep_at)), float(np.mean(raw[:, MICROBLEED] >= keep_at))

    for v in variants:
        cells = [kept(verdicts[v][n], clf.settings.keep_at) for n, clf in enumerate(loaded)]
        share = np.bincount(np.argmax(without_phase(np.array(verdicts[v][0])), axis=1), minlength=len(CLASSES)) / n_points
        print(f"| {v[0]} {v[1]:g} mm, loss {v[2]:g} | " + " | ".join(f"{a:.2f} ({b:.2f})" for a, b in cells) + " | " + " / ".join(f"{x:.2f}" for x in share) + " |")
    overall = [kept([p for v in variants for p in verdicts[v][n]], clf.settings.keep_at) for n, clf in enumerate(loaded)]
    print("| all | " + " | ".join(f"**{a:.2f}** ({b:.2f})" for a, b in overall) + " | |")

if __name__ == "__main__":
    main()
