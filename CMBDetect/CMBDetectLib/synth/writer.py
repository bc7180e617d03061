"""Writing synthetic cases to disk: volumes, labels, mimic maps, metadata JSON and the cases.csv
index.

Every file is written atomically (a temporary file renamed into place), so an interrupted run
leaves only complete files; rerunning with the same seed rewrites identical bytes.
"""

from __future__ import annotations

import csv
import io as _stdio
import json
from pathlib import Path

import numpy as np

from ..io import atomic_path, write_volume
from .case import SynthCase, generate_case

# The columns of cases.csv, one row per case (paths relative to the output folder).
CSV_COLUMNS = (
    "case", "image", "label", "meta", "mimics", "control", "field_strength_t", "te_ms", "slice_thickness_mm",
    "n_lesions", "n_small", "n_large", "vendor", "scanner_model", "matrix", "n_slices", "snr", "seed", "index",
)

SUFFIX = {"nifti": ".nii.gz", "nrrd": ".nrrd"}


def _json_default(value: object) -> object:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def meta_json(meta: dict[str, object]) -> str:
    return json.dumps(meta, indent=1, default=_json_default) + "\n"


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_case(case: SynthCase, out: Path, fmt: str = "nifti", with_phase: bool = False) -> dict[str, object]:
    """Write one case under `out`; returns its cases.csv row."""
    if fmt not in SUFFIX:
        raise ValueError(f"format must be one of {sorted(SUFFIX)}, not {fmt!r}")
    suffix = SUFFIX[fmt]
    image = Path("images") / f"{case.name}{suffix}"
    label = Path("labels") / f"{case.name}{suffix}"
    meta = Path("meta") / f"{case.name}.json"
    mimics = Path("mimics") / f"{case.name}{suffix}"
    if case.mimics is None:
        raise ValueError(f"{case.name}: the case has no mimic map")
    write_volume(case.image.array.astype(np.float32, copy=False), case.image.geometry, out / image)
    write_volume(case.labels.astype(np.uint16, copy=False), case.image.geometry, out / label)
    write_volume(case.mimics.astype(np.uint8, copy=False), case.image.geometry, out / mimics)
    if with_phase:
        if "phase" not in case.maps:
            raise ValueError("the case was generated without keep_maps=True: no phase to write")
        write_volume(case.maps["phase"].astype(np.float32, copy=False), case.image.geometry,
                     out / "phase" / f"{case.name}{suffix}")
    write_text(out / meta, meta_json(case.meta))
    m = case.meta
    lesions = m["lesions"]  # type: ignore[index]
    return {
        "case": case.name,
        "image": image.as_posix(),
        "label": label.as_posix(),
        "meta": meta.as_posix(),
        "mimics": mimics.as_posix(),
        "control": int(bool(m["control"])),
        "field_strength_t": m["field_strength_t"],
        "te_ms": m["te_ms"],
        "slice_thickness_mm": m["slice_thickness_mm"],
        "n_lesions": m["n_lesions"],
        "n_small": sum(1 for x in lesions if x["size_class"] == "small"),  # type: ignore[index]
        "n_large": sum(1 for x in lesions if x["size_class"] == "large"),  # type: ignore[index]
        "vendor": m["vendor"],
        "scanner_model": m["acquisition"]["scanner_model"],  # type: ignore[index]
        # The written image's own size (a case resampled onto an oblique grid differs from its acquisition).
        "matrix": "x".join(str(v) for v in case.image.array.shape[1:]),
        "n_slices": case.image.array.shape[0],
        "snr": m["snr"],
        "seed": m["seed"],
        "index": m["index"],
    }


def update_index(out: Path, rows: list[dict[str, object]]) -> Path:
    """Merge rows into out/cases.csv (replacing rows of the same case), sorted by case name."""
    path = out / "cases.csv"
    merged: dict[str, dict[str, object]] = {}
    if path.exists():
        with path.open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                merged[row["case"]] = row
    for row in rows:
        merged[str(row["case"])] = row
    buffer = _stdio.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CSV_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for name in sorted(merged):
        writer.writerow(merged[name])
    write_text(path, buffer.getvalue())
    return path


def write_dataset(
    out: str | Path,
    n: int,
    controls: int,
    seed: int,
    start: int = 0,
    fmt: str = "nifti",
    overrides: dict[str, object] | None = None,
    with_phase: bool = False,
    montage: str | Path | None = None,
    stats: str | Path | None = None,
    progress: bool = True,
) -> list[dict[str, object]]:
    """Generate and write `n` lesion cases and `controls` control cases (indices start..)."""
    from tqdm import tqdm

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    overrides = dict(overrides or {})
    jobs = [(i, False) for i in range(start, start + n)] + [(i, True) for i in range(start, start + controls)]
    keep_maps = with_phase or stats is not None
    collector = None
    if montage is not None:
        from .montage import MontageCollector

        collector = MontageCollector()
    stat_rows: list[dict[str, object]] = []
    vein_rows: list[dict[str, object]] = []
    rows = []
    with tqdm(total=len(jobs), disable=not progress, unit="case", desc="synth") as bar:
        for index, control in jobs:
            case = generate_case(seed, index, control, keep_maps=keep_maps, **overrides)
            rows.append(write_case(case, out, fmt, with_phase))
            if stats is not None:
                from .stats import lesion_rows, vein_row

                stat_rows.extend(lesion_rows(case))
                vein_rows.append(vein_row(case))
            if collector is not None:
                collector.add(case)
            bar.set_postfix_str(f"{case.name}: {case.meta['n_lesions']} CMB")
            bar.update(1)
            del case
    update_index(out, rows)
    if collector is not None:
        collector.save(Path(montage))  # type: ignore[arg-type]
    if stats is not None:
        from .stats import summary_table, write_rows

        write_rows(Path(stats), stat_rows, vein_rows)
        print(summary_table(stat_rows, vein_rows))
    return rows
