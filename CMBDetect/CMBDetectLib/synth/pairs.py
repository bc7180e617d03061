"""Baseline / follow-up pairs of one synthetic subject, with the truth of what is new
(`cmbdetect synth --pairs N`; docs/synth.md, "Pairs").

Pair i is subject (seed, i): the baseline is that subject's case; the follow-up is a second
visit (followup.py): the head moved by a known rigid motion, the same anatomy and baseline
bleeds, 0-15 new bleeds, optionally another protocol. The number of new bleeds is drawn so that
every ARIA-H grade occurs: pairs come in blocks of four, one of each grade in a shuffled order
(none 0, mild 1-4, moderate 5-9, severe 10-15). A bleed placement can fall short on a small slab,
so the truth records the new bleeds actually labelled, and its grade from them.

Layout of OUT (besides the images/, labels/, mimics/, meta/ and cases.csv of single cases, one
entry per scan): pairs.csv (case, baseline, followup: paths relative to OUT, usable as-is by
`cmbdetect longitudinal --pairs-csv`; then the truth's new_microbleeds, aria_h, protocol) and
truth/<case>.json per pair.
"""

from __future__ import annotations

import csv
import io as _stdio
import json
from pathlib import Path

import numpy as np

from ..longitudinal.grade import GRADES, aria_h_grade
from .case import SynthCase, generate_case
from .followup import MAX_ROTATION_DEG, MAX_SHIFT_MM, Visit, carried_bleeds, sample_motion
from .writer import SUFFIX, update_index, write_case, write_text

PROTOCOLS = ("same", "other", "mixed")
PAIR_COLUMNS = ("case", "baseline", "followup", "new_microbleeds", "aria_h", "protocol")
NEW_RANGES = {"none": (0, 0), "mild": (1, 4), "moderate": (5, 9), "severe": (10, 15)}
STREAM_GRADES, STREAM_COUNT, STREAM_MOTION = 101, 102, 103
GRADE_SOURCE = ("ARIA-H radiographic severity, lecanemab/donanemab prescribing information: "
                "mild 1-4, moderate 5-9, severe >= 10 new microbleeds")


def pair_names(seed: int, index: int) -> tuple[str, str, str]:
    """(pair case, baseline case, follow-up case)."""
    case = f"synth-s{seed}-pair-{index:03d}"
    return case, f"{case}-baseline", f"{case}-followup"


def new_bleed_count(seed: int, index: int) -> tuple[str, int]:
    """The target grade and number of new bleeds of pair `index`: each block of four pairs has
    one pair of each grade, in an order shuffled by the seed."""
    order = np.random.default_rng([seed, index // 4, STREAM_GRADES]).permutation(len(GRADES))
    grade = GRADES[int(order[index % 4])][0]
    lo, hi = NEW_RANGES[grade]
    return grade, int(np.random.default_rng([seed, index, STREAM_COUNT]).integers(lo, hi + 1))


def _protocol_changes(protocol: str, index: int) -> bool:
    if protocol not in PROTOCOLS:
        raise ValueError(f"follow-up protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
    return protocol == "other" or (protocol == "mixed" and index % 2 == 1)


def generate_pair(
    seed: int, index: int, protocol: str = "mixed", max_rotation_deg: float = MAX_ROTATION_DEG,
    max_shift_mm: float = MAX_SHIFT_MM, **overrides: object,
) -> tuple[SynthCase, SynthCase, dict[str, object]]:
    """Baseline, follow-up and the pair's truth (without file paths); a pure function of its
    arguments. `overrides` apply to both scans (generate_case's), as do the user's fixed sizes."""
    if not (0.0 <= max_rotation_deg <= 30.0 and 0.0 <= max_shift_mm <= 30.0):
        raise ValueError(f"motion limits must lie in 0-30 degrees and 0-30 mm, not {max_rotation_deg} and {max_shift_mm}")
    new_protocol = _protocol_changes(protocol, index)
    case, base_name, follow_name = pair_names(seed, index)
    target, n_new = new_bleed_count(seed, index)
    motion = sample_motion(np.random.default_rng([seed, index, STREAM_MOTION]), max_rotation_deg, max_shift_mm)
    baseline = generate_case(seed, index, **overrides)
    assert baseline.acquisition_geometry is not None
    visit = Visit(motion, carried_bleeds(baseline.bleeds, baseline.acquisition_geometry), n_new,
                  baseline.image.geometry, baseline.image.array.shape, new_protocol)  # type: ignore[arg-type]
    # Another protocol still covers the same part of the brain: the technologist plans the slab
    # on the same anatomy (on a small slab, another draw could miss the baseline's altogether).
    slab = {"slab_centre_mni_z": baseline.meta["acquisition"]["slab_centre_mni_z"]} if new_protocol else {}  # type: ignore[index]
    followup = generate_case(seed, index, visit=visit, **{**slab, **overrides})
    for scan, name, role in ((baseline, base_name, "baseline"), (followup, follow_name, "followup")):
        scan.name = name
        scan.meta["case"] = name
        scan.meta["pair"] = {"case": case, "role": role}
    return baseline, followup, _truth(case, baseline, followup, target, new_protocol)


def _truth(case: str, baseline: SynthCase, followup: SynthCase, target: str, new_protocol: bool) -> dict[str, object]:
    visit = followup.meta["visit"]  # type: ignore[index]
    follow_of_baseline: dict[int, int] = {}  # baseline label -> follow-up label
    lesions = []
    for lesion in followup.meta["lesions"]:  # type: ignore[union-attr]
        bleed = lesion["baseline_bleed"]
        base_label = None if bleed is None else baseline.label_of_bleed.get(int(bleed))
        if base_label is not None:
            follow_of_baseline[base_label] = int(lesion["id"])
        lesions.append({"label": int(lesion["id"]), "status": lesion["status"], "baseline_label": base_label,
                        "centre_lps": lesion["centre_lps"], "apparent_diameter_mm": lesion["apparent_diameter_mm"],
                        "size_class": lesion["size_class"], "region": lesion["region"]})
    not_labelled = visit["baseline_bleeds_not_labelled"]  # type: ignore[index]
    bleed_of_label = {v: k for k, v in baseline.label_of_bleed.items()}
    baseline_lesions = []
    for lesion in baseline.meta["lesions"]:  # type: ignore[union-attr]
        label = int(lesion["id"])
        entry = {"label": label, "centre_lps": lesion["centre_lps"], "followup_label": follow_of_baseline.get(label)}
        if entry["followup_label"] is None:
            entry["note"] = not_labelled.get(str(bleed_of_label.get(label)), "lost in the follow-up's resampling")
        baseline_lesions.append(entry)
    n_new = sum(1 for x in lesions if x["status"] == "new")
    return {
        "case": case, "baseline_case": baseline.name, "followup_case": followup.name,
        "new_microbleeds": n_new, "aria_h": aria_h_grade(n_new), "aria_h_source": GRADE_SOURCE,
        "target_grade": target, "new_requested": visit["new_requested"],  # type: ignore[index]
        "persisting_labelled": sum(1 for x in lesions if x["status"] == "persisting"),
        "motion": visit["motion"],  # type: ignore[index]
        "protocol": "other" if new_protocol else "same",
        "lesions": lesions,
        "baseline_lesions": baseline_lesions,
        "notes": [
            "lesions: the follow-up's label map (label = its value); status new = absent at baseline, "
            "persisting = the baseline's bleed, moved with the head (baseline_label: its value in the baseline's labels, "
            "null where the baseline's resampling lost its outline)",
            "bleeds persist: none disappears at follow-up; a baseline lesion without followup_label is there "
            "physically but outside the follow-up's slab or not outlined on its protocol (note)",
            "new bleeds lie inside the baseline's field of view",
        ],
    }  # fmt: skip


def _write_pairs_index(out: Path, rows: list[dict[str, object]]) -> Path:
    """Merge rows into OUT/pairs.csv (replacing rows of the same case), sorted by case."""
    path = out / "pairs.csv"
    merged: dict[str, dict[str, object]] = {}
    if path.exists():
        with path.open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                merged[row["case"]] = row
    for row in rows:
        merged[str(row["case"])] = row
    buffer = _stdio.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(PAIR_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for name in sorted(merged):
        writer.writerow(merged[name])
    write_text(path, buffer.getvalue())
    return path


def write_pairs(
    out: str | Path, n: int, seed: int, start: int = 0, fmt: str = "nifti", overrides: dict[str, object] | None = None,
    with_phase: bool = False, protocol: str = "mixed", max_rotation_deg: float = MAX_ROTATION_DEG,
    max_shift_mm: float = MAX_SHIFT_MM, progress: bool = True,
) -> list[dict[str, object]]:
    """Generate and write pairs start..start+n-1; returns their pairs.csv rows."""
    from tqdm import tqdm

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    _protocol_changes(protocol, 0)  # refuse a wrong name before any work
    if fmt not in SUFFIX:
        raise ValueError(f"format must be one of {sorted(SUFFIX)}, not {fmt!r}")
    overrides = {**(overrides or {}), "keep_maps": with_phase}
    rows, scan_rows = [], []
    with tqdm(total=n, disable=not progress, unit="pair", desc="synth pairs") as bar:
        for index in range(start, start + n):
            baseline, followup, truth = generate_pair(seed, index, protocol, max_rotation_deg, max_shift_mm, **overrides)
            for scan in (baseline, followup):
                scan_rows.append(write_case(scan, out, fmt, with_phase))
            paths = {role: f"images/{scan.name}{SUFFIX[fmt]}" for role, scan in (("baseline", baseline), ("followup", followup))}
            labels = {f"{role}_labels": f"labels/{scan.name}{SUFFIX[fmt]}" for role, scan in (("baseline", baseline), ("followup", followup))}
            truth = {**truth, **paths, **labels}
            write_text(out / "truth" / f"{truth['case']}.json", json.dumps(truth, indent=1) + "\n")
            rows.append({"case": truth["case"], **paths, "new_microbleeds": truth["new_microbleeds"],
                         "aria_h": truth["aria_h"], "protocol": truth["protocol"]})
            bar.set_postfix_str(f"{truth['case']}: {truth['new_microbleeds']} new")
            bar.update(1)
            del baseline, followup
    update_index(out, scan_rows)
    _write_pairs_index(out, rows)
    return rows
