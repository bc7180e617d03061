"""Detection over many cases: files, folders, DICOM series folders or a CSV list.

A case that fails is reported with its name and the problem and the batch goes on; the
exit code says whether every case succeeded.
"""

from __future__ import annotations

import csv
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

import numpy as np
from tqdm import tqdm

from ..errors import CaseError
from ..io import case_name, is_volume_file, read_volume
from ..detection.outputs import write_case_outputs
from ..detection.pipeline import DetectionParams, detect_volume


@dataclass
class CaseOutcome:
    case: str
    source: str
    ok: bool
    n_lesions: int = 0
    n_small: int = 0
    n_large: int = 0
    seconds: float = 0.0
    error: str = ""
    model_trained: bool = True


def _cases_from_csv(path: Path) -> list[tuple[str, Path]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"case list {path} has no rows")
    columns = rows[0].keys()
    column = next((c for c in ("image", "path", "input", "file") if c in columns), None)
    if column is None:
        raise ValueError(f"case list {path} needs a column named image, path, input or file (has: {', '.join(columns)})")
    cases = []
    for row in rows:
        p = Path(row[column])
        if not p.is_absolute():
            p = path.parent / p  # paths in a case list are relative to the list
        cases.append((row.get("case") or case_name(p), p))
    return cases


def expand_inputs(inputs: list[str | Path]) -> list[tuple[str, Path]]:
    """(case name, path) for every case named by the inputs, in a stable order."""
    cases: list[tuple[str, Path]] = []
    for item in map(Path, inputs):
        if item.suffix.lower() == ".csv":
            cases += _cases_from_csv(item)
        elif item.is_dir():
            volumes = sorted(p for p in item.iterdir() if p.is_file() and is_volume_file(p))
            subdirs = sorted(p for p in item.iterdir() if p.is_dir() and not p.name.startswith("."))
            if volumes or subdirs:
                cases += [(case_name(p), p) for p in volumes]
                cases += [(p.name, p) for p in subdirs]  # each subfolder a DICOM series
            else:
                cases.append((item.name, item))  # the folder itself holds one DICOM series
        else:
            cases.append((case_name(item), item))  # read_volume says if it is missing or unreadable
    return cases


def read_phase(phase: str | Path, case: str, volume) -> "np.ndarray":
    """The case's phase image (a file, or `<case>.*` in a folder), on the SWI image's grid."""
    phase = Path(phase)
    if phase.is_dir():
        found = sorted(p for p in phase.iterdir() if p.is_file() and is_volume_file(p) and case_name(p) == case)
        if not found:
            raise CaseError(case, f"no phase image for this case in {phase} (expected {case}.nii.gz or similar)")
        phase = found[0]
    image = read_volume(phase, case)
    if image.shape != volume.shape or not image.geometry.matches(volume.geometry):
        raise CaseError(case, f"phase image {phase.name} is not on the SWI image's grid (shape {image.shape} vs {volume.shape}, or spacing/origin/direction differ)")
    return image.array


def detect_batch(
    inputs: list[str | Path],
    output_dir: str | Path,
    params: DetectionParams | None = None,
    show_progress: bool = True,
    log: TextIO = sys.stderr,
    on_case: Callable[[CaseOutcome], None] | None = None,
    preview: bool = False,
    phase: str | Path | None = None,
) -> list[CaseOutcome]:
    params = params or DetectionParams()
    cases = expand_inputs(inputs)
    seen: dict[str, Path] = {}
    outcomes: list[CaseOutcome] = []
    bar = tqdm(cases, desc="cases", unit="case", disable=not show_progress or len(cases) < 2, file=log)
    for case, path in bar:
        bar.set_postfix_str(case)
        start = time.perf_counter()
        try:
            if case in seen:
                raise CaseError(case, f"two inputs have this case name ({seen[case]} and {path}); outputs would collide")
            seen[case] = path
            volume = read_volume(path, case)
            phase_array = read_phase(phase, case, volume) if phase is not None else None
            with tqdm(total=100, desc=case, unit="%", leave=False, disable=not show_progress, file=log) as inner:
                def progress(fraction: float, message: str) -> None:
                    inner.n = int(round(100 * fraction))
                    inner.set_postfix_str(message, refresh=True)

                result = detect_volume(volume, params, progress=progress, case=case, phase=phase_array)
            write_case_outputs(result, Path(output_dir), case, image=volume.array if preview else None)
            s = result.summary()
            outcome = CaseOutcome(
                case, str(path), True, s["n_lesions"], s["n_small"], s["n_large"],
                time.perf_counter() - start, model_trained=result.model_trained,
            )  # fmt: skip
        except CaseError as exc:
            outcome = CaseOutcome(case, str(path), False, seconds=time.perf_counter() - start, error=str(exc))
        except (MemoryError, RuntimeError, OSError, ValueError) as exc:
            # Unexpected, but one case must not stop a cohort: report it in full and go on.
            detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
            outcome = CaseOutcome(case, str(path), False, seconds=time.perf_counter() - start, error=f"{case}: {detail}")
        if not outcome.ok:
            tqdm.write(f"FAILED {outcome.error}", file=log)
        outcomes.append(outcome)
        if on_case:
            on_case(outcome)
    return outcomes


def exit_code(outcomes: list[CaseOutcome]) -> int:
    return 0 if outcomes and all(o.ok for o in outcomes) else 1


def write_batch_table(path: Path, outcomes: list[CaseOutcome]) -> None:
    fields = ["case", "source", "ok", "n_lesions", "n_small", "n_large", "seconds", "error"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for o in outcomes:
            writer.writerow({**o.__dict__, "seconds": round(o.seconds, 2)})
