"""Detection over many cases: files, folders, DICOM series folders or a CSV list.

A batch, in order:
1. the inputs become (case name, path) pairs; unsafe and duplicated names are refused,
   each with its reason, before any case runs (names.py);
2. staging folders left by a killed run are removed, and every case already done with the
   same model and parameters (its summary says so) is skipped unless `force` (resume.py);
3. the remaining cases run here one after another, in `workers` local processes
   (workers.py), or on a Dask cluster (distributed.py): the same `run_case` everywhere.

A case that fails is reported with its name and the problem and the batch goes on; the
exit code says whether every case succeeded. The batch table lists every case: done,
skipped, refused or failed.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable, NamedTuple, TextIO

from tqdm import tqdm

from ..io import case_name, is_volume_file
from ..detection.outputs import prepare_output_folder
from ..detection.pipeline import DetectionParams
from ..errors import BatchError
from .names import printable, refuse_unsafe_and_duplicates
from .resume import done_summary, fingerprint, fingerprint_fields, remove_case_outputs, remove_staging_debris
from .workers import CaseOutcome, CaseTask, run_case, run_in_processes

__all__ = ["CaseInput", "CaseOutcome", "detect_batch", "exit_code", "expand_inputs", "write_batch_table"]


class CaseInput(NamedTuple):
    name: str
    path: Path
    series: str | None = None  # the Series Instance UID to read from a DICOM folder of several


def _cases_from_csv(path: Path) -> list[CaseInput]:
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
        p = Path(row[column] or "")
        if not p.is_absolute():
            p = path.parent / p  # paths in a case list are relative to the list
        # No case column, or an empty cell: the file's name. An empty series cell chooses nothing.
        cases.append(CaseInput(row.get("case") or case_name(p), p, (row.get("series") or "").strip() or None))
    return cases


def expand_inputs(inputs: list[str | Path]) -> list[CaseInput]:
    """(case name, path, series) for every case named by the inputs, in a stable order."""
    cases: list[CaseInput] = []
    for item in map(Path, inputs):
        if item.suffix.lower() == ".csv":
            cases += _cases_from_csv(item)
        elif item.is_dir():
            volumes = sorted(p for p in item.iterdir() if p.is_file() and is_volume_file(p))
            subdirs = sorted(p for p in item.iterdir() if p.is_dir() and not p.name.startswith("."))
            if volumes or subdirs:
                cases += [CaseInput(case_name(p), p) for p in volumes]
                cases += [CaseInput(p.name, p) for p in subdirs]  # each subfolder a DICOM series
            else:
                cases.append(CaseInput(item.name, item))  # the folder itself holds one DICOM series
        else:
            cases.append(CaseInput(case_name(item), item))  # read_volume says if it is missing or unreadable
    return cases


def _absolute_model(spec: str | None) -> str | None:
    """A model file named by a relative path, made absolute: workers may start elsewhere."""
    if spec and (spec.endswith(".safetensors") or "/" in spec or "\\" in spec):
        return str(Path(spec).absolute())
    return spec


def _run_fingerprint(params: DetectionParams, phase_given: bool) -> tuple[str, dict]:
    from ..detection.inference import select_device
    from ..detection.pipeline import get_model, stage_two_classifier

    model = get_model(params.model, select_device(params.device))  # cached: the command loaded it already
    described = fingerprint_fields(params, model, stage_two_classifier(params, model))
    described["phase_given"] = phase_given  # the candidate stage decides with the phase when it has one
    return fingerprint(described), described


def _refuse_unrunnable(
    cases: list[CaseInput], out_dir: Path, phase: str | Path | None, series: str | None, dicom_dir: Path | None
) -> None:
    """BatchError for a batch that cannot run as asked, before any case starts."""
    if phase is not None and not Path(phase).is_dir() and len(cases) > 1:
        raise BatchError(
            f"the phase image {phase} is one file, and the inputs name {len(cases)} cases: it would be "
            "taken as every case's phase. For a batch, give a folder of <case>.* phase images"
        )
    if series is not None and len(cases) > 1:
        raise BatchError(
            f"--series {series} chooses the series of one case, and the inputs name {len(cases)} cases. "
            "For a batch, give a case list (CSV) with a 'series' column"
        )
    prepare_output_folder(out_dir)
    if dicom_dir is not None:
        prepare_output_folder(dicom_dir)


def detect_batch(
    inputs: list[str | Path],
    output_dir: str | Path,
    params: DetectionParams | None = None,
    show_progress: bool = True,
    log: TextIO = sys.stderr,
    on_case: Callable[[CaseOutcome], None] | None = None,
    preview: bool = False,
    *,
    force: bool = False,
    workers: int = 1,
    scheduler=None,
    phase: str | Path | None = None,
    series: str | None = None,
    dicom_out: str | Path | None = None,
) -> list[CaseOutcome]:
    """Detect every case; returns one outcome per case, in input order.

    `phase`: a phase image (one case) or a folder of `<case>.*` phase images, for the candidate
    stage. `series`: the Series Instance UID to read, for one case whose DICOM folder holds
    several (a case list gives it per case in a `series` column). `dicom_out`: a folder for the
    DICOM Segmentation and measurement report of each case read from a DICOM series.
    `workers` > 1 runs cases in that many local processes; `scheduler` (a Dask scheduler
    address, or a `distributed.Client`) sends them to a Dask cluster instead. Raises BatchError,
    before any case runs, when an output folder cannot be written, or one phase image or one
    series is given for several cases.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    params = params or DetectionParams()
    params = replace(params, model=_absolute_model(params.model))
    cases = expand_inputs(inputs)
    out_dir = Path(output_dir).absolute()
    dicom_dir = Path(dicom_out).absolute() if dicom_out is not None else None
    series = (series or "").strip() or None
    if cases:
        _refuse_unrunnable(cases, out_dir, phase, series, dicom_dir)
    if series is not None:
        cases = [c._replace(series=series) for c in cases]
    outcomes: dict[int, CaseOutcome] = {}

    def finish(i: int, outcome: CaseOutcome) -> None:
        outcome.source = str(cases[i].path)  # as the user named it (tasks carry absolute paths)
        outcomes[i] = outcome
        if not outcome.ok:
            tqdm.write(f"{outcome.status.upper()} {outcome.error}", file=log)
        if on_case:
            on_case(outcome)

    refused = refuse_unsafe_and_duplicates([c.name for c in cases])
    for i, reason in refused.items():
        shown = printable(cases[i].name)
        finish(i, CaseOutcome(shown, str(cases[i].path), False, error=f"{shown or '(empty)'}: refused: {reason}", status="refused"))
    accepted = [i for i in range(len(cases)) if i not in refused]
    if not accepted:
        return [outcomes[i] for i in sorted(outcomes)]

    names = {cases[i].name for i in accepted}
    debris = remove_staging_debris(out_dir, names) + (remove_staging_debris(dicom_dir, names) if dicom_dir else [])
    if debris:
        tqdm.write(f"removed {len(debris)} staging folder(s) left by an interrupted run", file=log)
    fp, described = _run_fingerprint(params, phase is not None)
    tasks: dict[int, CaseTask] = {}
    for i in accepted:
        case, path, case_series = cases[i]
        summary = None if force else done_summary(out_dir, case, fp, preview, case_series, dicom_dir)
        if summary is not None:
            finish(i, CaseOutcome(
                case, str(path), True, int(summary.get("n_lesions", 0)), int(summary.get("n_small", 0)),
                int(summary.get("n_large", 0)), model_trained=bool(summary.get("model_trained", True)), status="skipped",
            ))  # fmt: skip
            continue
        remove_case_outputs(out_dir, case, dicom_dir)  # failed, changed or interrupted: start clean
        phase_path = str(Path(phase).absolute()) if phase is not None else None
        tasks[i] = CaseTask(
            case, str(Path(path).absolute()), str(out_dir), params, preview, fp, described, phase_path,
            case_series, str(dicom_dir) if dicom_dir else None,
        )  # fmt: skip

    index = {task.case: i for i, task in tasks.items()}
    bar = tqdm(total=len(tasks), desc="cases", unit="case", disable=not show_progress or len(tasks) < 2, file=log)

    def done(outcome: CaseOutcome) -> None:
        finish(index[outcome.case], outcome)
        bar.update(1)

    with bar:
        if not tasks:
            pass  # every case done earlier: no need to reach a cluster or start processes
        elif scheduler is not None:
            _run_on_cluster(list(tasks.values()), scheduler, done)
        elif workers > 1 and len(tasks) > 1:
            run_in_processes(tasks.values(), min(workers, len(tasks)), done)
        else:
            for task in tasks.values():
                bar.set_postfix_str(task.case)
                with tqdm(total=100, desc=task.case, unit="%", leave=False, disable=not show_progress, file=log) as inner:

                    def progress(fraction: float, message: str) -> None:
                        inner.n = int(round(100 * fraction))
                        inner.set_postfix_str(message, refresh=True)

                    done(run_case(task, progress))
    return [outcomes[i] for i in sorted(outcomes)]


def _run_on_cluster(tasks: list[CaseTask], scheduler, done: Callable[[CaseOutcome], None]) -> None:
    from .distributed import import_distributed, run_on_dask

    if isinstance(scheduler, str):
        distributed = import_distributed()
        with distributed.Client(scheduler) as client:
            run_on_dask(tasks, client, done)
    else:
        run_on_dask(tasks, scheduler, done)


def exit_code(outcomes: list[CaseOutcome]) -> int:
    return 0 if outcomes and all(o.ok for o in outcomes) else 1


def write_batch_table(path: Path, outcomes: list[CaseOutcome]) -> None:
    fields = ["case", "source", "status", "ok", "n_lesions", "n_small", "n_large", "seconds", "error"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for o in outcomes:
            writer.writerow({**o.__dict__, "seconds": round(o.seconds, 2)})
