"""Contrast statistics of synthetic cases: how dark microbleeds and veins are against the tissue
around them, by size class, field strength, echo time and slice thickness.

Definitions (on the written SWI image, noise included):
- background B: median SWI of a shell 2-4 voxels in-plane (and one slice above and below)
  around the object, leaving out other labels and any voxel with venous blood;
- contrast = 1 - mean(object) / B (0: invisible, 1: black);
- contrast index CI = mean(object) / white-matter level (Nandigam et al. 2009 normalise lesion
  intensity to normal-appearing white matter the same way);
- CNR = (B - mean(object)) / noise SD, the noise SD taken from the simulation (the complex
  noise, carried through the vendor's intensity curve at white matter).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..io import atomic_path
from .case import SynthCase

IN_PLANE = np.zeros((3, 3, 3), bool)
IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)
LESION_COLUMNS = (
    "case", "lesion", "field_strength_t", "te_ms", "te_bin", "slice_thickness_mm", "thickness_bin", "vendor",
    "size_class", "region", "true_diameter_mm", "apparent_diameter_mm", "bloom_ratio", "susceptibility_ppm",
    "background_relative", "contrast", "darkest_contrast", "contrast_index", "cnr",
)
VEIN_COLUMNS = ("case", "field_strength_t", "te_ms", "te_bin", "slice_thickness_mm", "n_voxels", "contrast", "cnr")


def te_bin(field_strength_t: float, te_ms: float) -> str:
    """Shorter or longer than the middle of the TE range we draw at that field strength."""
    middle = 23.0 if field_strength_t > 2 else 40.0
    return "short" if te_ms < middle else "long"


def thickness_bin(mm: float) -> str:
    return "<=1.5 mm" if mm <= 1.5 else ("1.6-2.4 mm" if mm < 2.5 else ">=2.5 mm")


def noise_sd(meta: dict) -> float:
    acq = meta["acquisition"]
    curve = meta["vendor_curve"]
    # The curve's slope at white matter scales the noise there; the k-space window filtered it.
    return float(curve["wm_level"] * curve["slope_at_wm"] * acq["noise_sigma_relative"] / acq["wm_signal_relative"]
                 * acq.get("noise_sd_factor_kspace", 1.0))


def _shell(mask: np.ndarray, inner: int, outer: int) -> np.ndarray:
    grown = ndimage.binary_dilation(mask, IN_PLANE, iterations=outer)
    grown = ndimage.binary_dilation(grown, np.ones((3, 1, 1), bool))
    return grown & ~ndimage.binary_dilation(mask, IN_PLANE, iterations=inner)


def lesion_rows(case: SynthCase) -> list[dict[str, object]]:
    meta = case.meta
    image, labels = case.image.array, case.labels
    veins = case.maps.get("vein_fraction")
    sd = noise_sd(meta)
    wm = float(meta["vendor_curve"]["wm_level"])  # type: ignore[index]
    b0, te, thick = meta["field_strength_t"], meta["te_ms"], meta["slice_thickness_mm"]
    rows = []
    boxes = ndimage.find_objects(labels)
    for lesion in meta["lesions"]:  # type: ignore[union-attr]
        box = boxes[lesion["id"] - 1]
        if box is None:
            continue
        grow = (2, 6, 6)
        sl = tuple(slice(max(0, s.start - g), min(n, s.stop + g)) for s, g, n in zip(box, grow, labels.shape))
        mask = labels[sl] == lesion["id"]
        ring = _shell(mask, 2, 4) & (labels[sl] == 0)
        if veins is not None:
            ring &= veins[sl] <= 0.0
        values = image[sl]
        if ring.sum() < 5:
            continue
        background = float(np.median(values[ring]))
        inside = float(values[mask].mean())
        rows.append({
            "case": case.name, "lesion": lesion["id"], "field_strength_t": b0, "te_ms": te, "te_bin": te_bin(b0, te),
            "slice_thickness_mm": thick, "thickness_bin": thickness_bin(thick), "vendor": meta["vendor"],
            "size_class": lesion["size_class"], "region": lesion["region"],
            "true_diameter_mm": lesion["true_diameter_mm"], "apparent_diameter_mm": lesion["apparent_diameter_mm"],
            "bloom_ratio": round(lesion["apparent_diameter_mm"] / lesion["true_diameter_mm"], 4),
            "susceptibility_ppm": lesion["susceptibility_ppm"],
            "background_relative": round(background / wm, 4),
            "contrast": round(1.0 - inside / background, 4),
            "darkest_contrast": round(1.0 - float(values[mask].min()) / background, 4),
            "contrast_index": round(inside / wm, 4),
            "cnr": round((background - inside) / sd, 3),
        })
    return rows


def vein_row(case: SynthCase) -> dict[str, object]:
    """Median contrast of voxels at least half filled with venous blood, away from bleeds."""
    meta = case.meta
    veins = case.maps.get("vein_fraction")
    b0, te = meta["field_strength_t"], meta["te_ms"]
    row: dict[str, object] = {"case": case.name, "field_strength_t": b0, "te_ms": te, "te_bin": te_bin(b0, te),
                              "slice_thickness_mm": meta["slice_thickness_mm"], "n_voxels": 0,
                              "contrast": float("nan"), "cnr": float("nan")}
    if veins is None:
        return row
    wm = float(meta["vendor_curve"]["wm_level"])  # type: ignore[index]
    image = case.image.array
    vessel = veins >= 0.5
    vessel &= ~ndimage.binary_dilation(case.labels > 0, iterations=2)
    ring = _shell(vessel, 2, 4) & (veins <= 0.0) & (case.labels == 0)
    # Keep tissue, not CSF, bone or air, in the background.
    ring &= (image > 0.5 * wm) & (image < 1.5 * wm)
    if vessel.sum() < 10 or ring.sum() < 10:
        return row
    inside = float(np.median(image[vessel]))
    background = float(np.median(image[ring]))
    row.update(n_voxels=int(vessel.sum()), contrast=round(1.0 - inside / background, 4),
               cnr=round((background - inside) / noise_sd(meta), 3))
    return row


def write_rows(path: Path, lesions: list[dict[str, object]], veins: list[dict[str, object]]) -> None:
    """One CSV: a row per microbleed (object = microbleed) and a row per case for its veins
    (object = veins), with the union of the columns."""
    columns = ["object"] + list(LESION_COLUMNS) + [c for c in VEIN_COLUMNS if c not in LESION_COLUMNS]
    with atomic_path(path) as tmp:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows({"object": "microbleed", **row} for row in lesions)
            writer.writerows({"object": "veins", **row} for row in veins)


def _median_iqr(values: list[float]) -> str:
    if not values:
        return "-"
    q1, q2, q3 = np.percentile(values, [25, 50, 75])
    return f"{q2:.2f} ({q1:.2f}-{q3:.2f})"


def summary_table(lesions: list[dict[str, object]], veins: list[dict[str, object]]) -> str:
    """Markdown tables: bleeds by field strength, TE and size class; by slice thickness; veins.
    Bleeds whose surroundings are not tissue-bright (background under half the white-matter
    level: next to CSF spaces, bone or the darkest iron-rich nuclei) are counted apart."""
    everything = lesions
    n_all = len(lesions)
    lesions = [r for r in lesions if float(r["background_relative"]) >= 0.5]
    lines = [
        f"{n_all} microbleeds, {n_all - len(lesions)} of them on a background darker than half the white-matter "
        "level, left out of the tables below.",
        "",
        "Microbleeds by field strength, echo time and size class (median, IQR):",
        "",
        "| B0 | TE | class | n | contrast | CNR | contrast index | apparent/true diameter |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict[str, object]]] = defaultdict(list)
    for row in lesions:
        groups[(row["field_strength_t"], row["te_bin"], row["size_class"])].append(row)
    for key in sorted(groups, key=lambda k: (-float(k[0]), k[1] != "short", k[2] != "small")):
        g = groups[key]
        te_values = [float(r["te_ms"]) for r in g]
        lines.append(
            f"| {key[0]} T | {key[1]} ({min(te_values):.0f}-{max(te_values):.0f} ms) | {key[2]} | {len(g)} "
            f"| {_median_iqr([float(r['contrast']) for r in g])} | {_median_iqr([float(r['cnr']) for r in g])} "
            f"| {_median_iqr([float(r['contrast_index']) for r in g])} "
            f"| {_median_iqr([float(r['bloom_ratio']) for r in g])} |"
        )
    lines += ["", "Microbleeds by field strength and slice thickness:", "",
              "| B0 | slice thickness | n | contrast | CNR | contrast index | apparent diameter (mm) |",
              "|---|---|---|---|---|---|---|"]
    by_thick: dict[tuple, list[dict[str, object]]] = defaultdict(list)
    for row in lesions:
        by_thick[(row["field_strength_t"], row["thickness_bin"])].append(row)
    order = ["<=1.5 mm", "1.6-2.4 mm", ">=2.5 mm"]
    for key in sorted(by_thick, key=lambda k: (-float(k[0]), order.index(str(k[1])))):
        g = by_thick[key]
        lines.append(f"| {key[0]} T | {key[1]} | {len(g)} | {_median_iqr([float(r['contrast']) for r in g])} "
                     f"| {_median_iqr([float(r['cnr']) for r in g])} "
                     f"| {_median_iqr([float(r['contrast_index']) for r in g])} "
                     f"| {_median_iqr([float(r['apparent_diameter_mm']) for r in g])} |")
    n_small = sum(1 for r in everything if r["size_class"] == "small")
    if everything:
        lines += ["", f"Size mix of all {n_all}: {n_small} small, {n_all - n_small} large "
                      f"({100.0 * n_small / n_all:.1f} % small; the paper's Table 2: 89.2 %)."]
        for b0 in sorted({float(r["field_strength_t"]) for r in everything}, reverse=True):  # type: ignore[arg-type]
            at = [r for r in everything if float(r["field_strength_t"]) == b0]  # type: ignore[arg-type]
            small = sum(1 for r in at if r["size_class"] == "small")
            lines.append(f"At {b0} T: {len(at)} bleeds, {100.0 * small / len(at):.1f} % small, median apparent "
                         f"diameter {np.median([float(r['apparent_diameter_mm']) for r in at]):.2f} mm.")
    lines += ["", "Veins (voxels at least half venous blood), per case:", "",
              "| B0 | n cases | contrast | CNR |", "|---|---|---|---|"]
    by_b0: dict[float, list[dict[str, object]]] = defaultdict(list)
    for row in veins:
        if row["n_voxels"]:
            by_b0[float(row["field_strength_t"])].append(row)  # type: ignore[arg-type]
    for b0 in sorted(by_b0, reverse=True):
        g = by_b0[b0]
        lines.append(f"| {b0} T | {len(g)} | {_median_iqr([float(r['contrast']) for r in g])} "
                     f"| {_median_iqr([float(r['cnr']) for r in g])} |")
    return "\n".join(lines)


def read_rows(path: Path) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """The microbleed rows and the vein rows of a CSV written by `write_rows`, numbers parsed."""
    text_columns = {"object", "case", "te_bin", "thickness_bin", "vendor", "size_class", "region"}
    lesions: list[dict[str, object]] = []
    veins: list[dict[str, object]] = []
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            parsed: dict[str, object] = {}
            for key, value in row.items():
                if key in text_columns or value == "":
                    parsed[key] = value
                else:
                    parsed[key] = float(value)
            (lesions if row["object"] == "microbleed" else veins).append(parsed)
    return lesions, veins


def blooming_table(diameters=(1.0, 2.0, 3.0), chi_ppm: float = 0.8) -> str:
    """Apparent (labelled) diameter of the same spherical source at 1.5 and 3 T, short and long
    TE, thin and thick voxels: a controlled view of blooming, noise-free, straight from the
    sub-voxel simulation and the label rule."""
    from ..detection.lesions import equivalent_diameter_mm
    from .microbleeds import outline
    from .susceptibility import Source, simulate_source, visibility

    voxels = {"0.5x0.5x1.5 mm": (1.5, 0.5, 0.5), "0.9x0.9x3 mm": (3.0, 0.9, 0.9)}
    protocols = [(1.5, 25.0), (1.5, 40.0), (3.0, 20.0), (3.0, 30.0)]
    head = "| true diameter | voxel | " + " | ".join(f"{b} T, TE {te:.0f} ms" for b, te in protocols) + " |"
    lines = [head, "|" + "---|" * (2 + len(protocols))]
    for d in diameters:
        for name, spacing in voxels.items():
            cells = []
            for b0, te in protocols:
                source = Source((d / 2,) * 3, np.eye(3), chi_ppm)
                patch = simulate_source(source, np.array([20.0, 30.0, 30.0]), spacing, b0, te)
                result = outline(visibility(patch.factor, 4), spacing)
                if result is None:
                    cells.append("not visible")
                else:
                    n = int(result[0].sum())
                    cells.append(f"{float(equivalent_diameter_mm(n, spacing[::-1])):.1f} mm")
            lines.append(f"| {d:.1f} mm | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """python -m CMBDetectLib.synth.stats summary STATS.csv | blooming"""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["summary"] and len(args) == 2:
        print(summary_table(*read_rows(Path(args[1]))))
        return 0
    if args == ["blooming"]:
        print(blooming_table())
        return 0
    print("usage: python -m CMBDetectLib.synth.stats summary STATS.csv | blooming", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
