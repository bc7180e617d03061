"""Measure MARS region agreement, registration time, and QC on bad starts, on synthetic cases.
Run from the repository root (needs nilearn for the generator):

    PYTHONPATH=CMBDetect python docs/measure_regions.py --n 6 --matrix 160
    PYTHONPATH=CMBDetect python docs/measure_regions.py --n 30 --matrix 192     # the larger run

Cases: seed 11, indices 0..n-1, in turn axial, oblique and partial coverage (60-90 mm slabs);
the lesion centroids are the generator's (this measures registration and atlas, not detection).
For each case, besides the normal fit:
- a forced bad start (`initial`, no search): turned 90 degrees about one axis and shifted 80 mm.
  It must either recover or be flagged by QC;
- a hard header (the normal search): the same voxels with a header turned 90 degrees about one
  axis and an origin 80 mm off, which the moments start cannot undo. It should recover.
A fit has recovered when the lesions it maps into the template lie within RECOVERED_MM (mean)
of where the case's normal fit puts them (when that fit passed QC).
The generator's anatomy comes from the same template as the atlas: agreement here is
necessary, not sufficient.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import SimpleITK as sitk

from CMBDetectLib.anatomy.locate import locate_lesions
from CMBDetectLib.anatomy.register import register_to_template
from CMBDetectLib.io import Volume, geometry_of, to_sitk
from CMBDetectLib.synth.case import generate_case

RECOVERED_MM = 4.0
TURN_DEG = 90.0
SHIFT_MM = 80.0


def _turn(axis: int) -> np.ndarray:
    turn = sitk.Euler3DTransform()
    turn.SetRotation(*[np.radians(TURN_DEG) if a == axis else 0.0 for a in range(3)])
    return np.array(turn.GetMatrix()).reshape(3, 3)


def hard_header(volume: Volume, points: np.ndarray, axis: int) -> tuple[Volume, np.ndarray]:
    """The same voxels under a header turned about `axis` and moved SHIFT_MM along it; the
    lesions' positions in the new patient space."""
    image = to_sitk(volume.array, volume.geometry)
    turn = _turn(axis)
    origin = np.array(image.GetOrigin())
    shift = np.array([SHIFT_MM if a == axis else 0.0 for a in range(3)])
    image.SetDirection(tuple((turn @ np.array(image.GetDirection()).reshape(3, 3)).ravel()))
    image.SetOrigin(tuple(origin + shift))
    return Volume(volume.array, geometry_of(image)), (turn @ (points - origin).T).T + origin + shift


def bad_start(axis: int) -> sitk.Euler3DTransform:
    start = sitk.Euler3DTransform()
    start.SetRotation(*[np.radians(TURN_DEG) if a == axis else 0.0 for a in range(3)])
    start.SetTranslation(tuple(SHIFT_MM if a == axis else 0.0 for a in range(3)))
    return start


def agreement(result, lesions) -> tuple[int, int, int]:
    known = [(g, l) for g, l in zip(result.locations, lesions) if g.mars_region != "unknown"]
    return len(known), sum(g.mars_region == l["mars_region"] for g, l in known), sum(g.side == l["side"] for g, l in known)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=6)
    p.add_argument("--matrix", type=int, default=192)
    args = p.parse_args()
    rows, fits = [], []  # fits: (case, start, passed, recovered, head Dice, MI)
    for index in range(args.n):
        kind = ("axial", "oblique", "partial")[index % 3]
        space = {"p_oblique": 1.0 if kind == "oblique" else 0.0, "p_motion": 0.0,
                 "coverage_mm": (60.0, 90.0) if kind == "partial" else (140.0, 160.0)}  # fmt: skip
        case = generate_case(11, index, matrix=(args.matrix, args.matrix), space=space)
        lesions = case.meta["lesions"]
        points = np.array([l["centre_lps"] for l in lesions], float)
        start = time.perf_counter()
        good = locate_lesions(case.image, points)
        seconds = time.perf_counter() - start
        reference = good.registration.to_template(points) if good.ok and len(points) else None
        known, region, side = agreement(good, lesions)
        rows.append((case.name, kind, good.ok, len(lesions), known, region, side, seconds, good.registration.head_dice))
        print("%s %-7s qc=%s lesions=%d known=%d region_agree=%d side_agree=%d %.1f s dice %.2f" % rows[-1], flush=True)
        fits.append((case.name, "normal", good.ok, good.ok, good.registration.head_dice, good.registration.metric, known, region))
        axis = index % 3
        hard_volume, hard_points = hard_header(case.image, points, axis)
        for name, volume, pts, initial in (
            (f"forced start, turned about axis {axis}", case.image, points, bad_start(axis)),
            (f"header turned about axis {axis}", hard_volume, hard_points, None),
        ):
            fit = register_to_template(volume, initial=initial)
            result = locate_lesions(volume, pts, fit)
            moved = float(np.linalg.norm(fit.to_template(pts) - reference, axis=1).mean()) if reference is not None else float("nan")
            recovered = moved < RECOVERED_MM
            k, r, _ = agreement(result, lesions)
            fits.append((case.name, name, fit.ok, recovered, fit.head_dice, fit.metric, k, r))
            print(f"  {name}: QC {'passed' if fit.ok else 'flagged'}, {moved:.1f} mm from the normal fit "
                  f"({'recovered' if recovered else 'not recovered'}), head Dice {fit.head_dice:.3f}, MI {fit.metric:.3f}, "
                  f"regions {r}/{k}", flush=True)  # fmt: skip
    for kind in ("axial", "oblique", "partial", "all"):
        sel = [r for r in rows if kind in ("all", r[1])]
        known = sum(r[4] for r in sel)
        if sel:
            print(f"{kind}: {len(sel)} cases, QC passed {sum(r[2] for r in sel)}, lesions {sum(r[3] for r in sel)}, located {known}, "
                  f"region agreement {sum(r[5] for r in sel) / max(known, 1):.3f}, side {sum(r[6] for r in sel) / max(known, 1):.3f}, "
                  f"median seconds {np.median([r[7] for r in sel]):.1f}")
    bad = [f for f in fits if f[1] != "normal"]
    lost = [f for f in bad if not f[3]]
    print(f"bad starts and headers: {len(bad)}; recovered {len(bad) - len(lost)}; of the {len(lost)} not recovered, "
          f"QC flagged {sum(not f[2] for f in lost)}; of the recovered, QC passed {sum(f[2] for f in bad if f[3])}")
    for label, group in (("recovered or normal", [f for f in fits if f[3]]), ("not recovered", lost)):
        if group:
            dice, mi = np.array([f[4] for f in group]), np.array([f[5] for f in group])
            print(f"{label}: head Dice {dice.min():.3f}-{dice.max():.3f}, MI {mi.min():.3f}-{mi.max():.3f}")


if __name__ == "__main__":
    main()
