"""Measure MARS region agreement and registration time on synthetic cases, and how often QC flags
deliberately bad starts. Run from the repository root (needs nilearn for the generator's truth):

    PYTHONPATH=CMBDetect python docs/measure_regions.py --n 6 --bad 5
    PYTHONPATH=CMBDetect python docs/measure_regions.py --n 50 --bad 20     # the larger run

Cases: seed 11, indices 0..n-1, a third forced oblique and a third partial coverage (60-90 mm
slabs); the lesion centroids are the generator's (so this measures registration and atlas, not
detection). Bad starts: a rotation of 90 degrees and an 80 mm shift in place of the moments
initialiser. The generator's anatomy comes from the same template as the atlas: agreement here
is necessary, not sufficient.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import SimpleITK as sitk

from CMBDetectLib.anatomy.locate import locate_lesions
from CMBDetectLib.anatomy.register import register_to_template
from CMBDetectLib.synth.case import generate_case


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=6)
    p.add_argument("--bad", type=int, default=5)
    p.add_argument("--matrix", type=int, default=192)
    args = p.parse_args()
    rows = []
    for index in range(args.n):
        kind = ("axial", "oblique", "partial")[index % 3]
        space = {"p_oblique": 1.0 if kind == "oblique" else 0.0, "p_motion": 0.0,
                 "coverage_mm": (60.0, 90.0) if kind == "partial" else (140.0, 160.0)}  # fmt: skip
        case = generate_case(11, index, matrix=(args.matrix, args.matrix), space=space)
        lesions = case.meta["lesions"]
        start = time.perf_counter()
        result = locate_lesions(case.image, [l["centre_lps"] for l in lesions])
        seconds = time.perf_counter() - start
        known = [(g, l) for g, l in zip(result.locations, lesions) if g.mars_region != "unknown"]
        rows.append((case.name, kind, result.ok, len(lesions), len(known), sum(g.mars_region == l["mars_region"] for g, l in known),
                     sum(g.side == l["side"] for g, l in known), seconds, result.registration.head_dice))  # fmt: skip
        print("%s %-7s qc=%s lesions=%d known=%d region_agree=%d side_agree=%d %.1f s dice %.2f" % rows[-1], flush=True)
    for kind in ("axial", "oblique", "partial", "all"):
        sel = [r for r in rows if kind in ("all", r[1])]
        known = sum(r[4] for r in sel)
        if sel:
            print(f"{kind}: {len(sel)} cases, QC passed {sum(r[2] for r in sel)}, lesions {sum(r[3] for r in sel)}, located {known}, "
                  f"region agreement {sum(r[5] for r in sel) / max(known, 1):.3f}, side {sum(r[6] for r in sel) / max(known, 1):.3f}, "
                  f"median seconds {np.median([r[7] for r in sel]):.1f}")
    flagged = 0
    for index in range(args.bad):
        case = generate_case(11, index, matrix=(args.matrix, args.matrix), space={"p_oblique": 0.0, "coverage_mm": (140.0, 160.0)})
        start = sitk.Euler3DTransform()
        start.SetRotation(*(np.roll([np.pi / 2, 0.0, 0.0], index)))
        start.SetTranslation(tuple(np.roll([80.0, 0.0, 0.0], index)))
        result = register_to_template(case.image, initial=start)
        flagged += not result.ok
        print(f"bad start {index}: rotation axis {index % 3}, QC {'flagged' if not result.ok else 'passed'} ({result.reason or result.qc()})")
    print(f"QC flagged {flagged} of {args.bad} bad starts")


if __name__ == "__main__":
    main()
