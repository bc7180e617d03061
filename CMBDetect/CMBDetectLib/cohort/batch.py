"""Detection over many cases: files, folders, DICOM series folders or a CSV list.

A batch, in order:
1. the inputs become cases (name, path, DICOM series if one was chosen); unsafe and duplicated names, and case-list rows
   without an image, are refused, each with its reason, before any case runs (names.py); a
   case list that cannot be read at all stops the batch before anything is written;
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

from ..errors import InputError
from ..io import atomic_path, case_name, is_volume_file
from ..detection.outputs import prepare_output_folder
from ..detection.pipeline import DetectionParams
from ..errors import BatchError
from .names import printable, refuse_unsafe_and_duplicates
from .resume import done_summary, fingerprint, fingerprint_fields, remove_case_outputs, remove_staging_debris
from .workers import REGION_COLUMNS, CaseOutcome, CaseTask, region_columns, run_case, run_in_processes

__all__ = ["CaseInput", "CaseOutcome", "detect_batch", "exit_code", "expand_inputs", "write_batch_table"]


class CaseInput(NamedTuple):
    name: str
    path: Path
    series: str | None = None  # the Series Instance UID to read from a DICOM folder of several


# The columns a case list may name its images by, in order of preference.
IMAGE_COLUMNS = ("image", "path", "input", "file")


def _cases_from_csv(path: Path) -> tuple[list[CaseInput], dict[int, str]]:
    """The list's (case, path, series) entries, and for each row that names no image, why it is refused.

    Raises InputError when the list as a whole cannot be used (missing, unreadable, empty,
    no image column): no case of it could run.
    """
    try:
        # utf-8-sig: a spreadsheet's byte-order mark must not become part of the first column's name.
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = reader.fieldnames
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read the case list {path}: {exc}") from None
    if not columns:
        raise InputError(f"case list {path} is empty: it needs a header row with an image column and a row per case")
    if not rows:
        raise InputError(f"case list {path} has no rows below its header")
    column = next((c for c in IMAGE_COLUMNS if c in columns), None)
    if column is None:
        raise InputError(f"case list {path} needs a column named {', '.join(IMAGE_COLUMNS[:-1])} or {IMAGE_COLUMNS[-1]} (has: {', '.join(columns)})")
    cases: list[CaseInput] = []
    problems: dict[int, str] = {}
    for number, row in enumerate(rows, start=2):  # row 1 is the header, as a spreadsheet counts
        cell = (row.get(column) or "").strip()
        if not cell:
            # Path("") is the current folder: the list's own folder would be read as a DICOM series.
            problems[len(cases)] = f"row {number} of {path.name}: the {column} cell is empty"
            cases.append(CaseInput(row.get("case") or "", path))
            continue
        p = Path(cell)
        if not p.is_absolute():
            p = path.parent / p  # paths in a case list are relative to the list
        # No case column, or an empty cell: the file's name. An empty series cell chooses nothing.
        cases.append(CaseInput(row.get("case") or case_name(p), p, (row.get("series") or "").strip() or None))
    return cases, problems


def _folder_entries(folder: Path) -> list[CaseInput]:
    """The cases of a folder: its volume files and its subfolders (each a DICOM series), or the
    folder itself (one DICOM series); then its links that lead nowhere (dangling or looping),
    which would otherwise vanish without a word: read_volume reports each by name."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    volumes = [CaseInput(case_name(p), p) for p in entries if p.is_file() and is_volume_file(p)]
    subdirs = [CaseInput(p.name, p) for p in entries if p.is_dir()]
    broken = [CaseInput(case_name(p), p) for p in entries if p.is_symlink() and not p.exists()]
    return (volumes + subdirs or [CaseInput(folder.name, folder)]) + broken


def expand_inputs(inputs: list[str | Path]) -> tuple[list[CaseInput], dict[int, str]]:
    """(case name, path, series) for every case named by the inputs, in a stable order; and, by
    position, the reason each entry that cannot run is refused (a case-list row without image).

    Raises InputError for an input that cannot be listed at all (a missing or empty case list).
    """
    cases: list[CaseInput] = []
    problems: dict[int, str] = {}
    for item in map(Path, inputs):
        if item.suffix.lower() == ".csv":
            listed, refused = _cases_from_csv(item)
            problems.update({len(cases) + i: reason for i, reason in refused.items()})
            cases += listed
        elif item.is_dir():
            cases += _folder_entries(item)
        else:
            cases.append(CaseInput(case_name(item), item))  # read_volume says if it is missing or unreadable
    return cases, problems


def _absolute_model(spec: str | None) -> str | None:
    """A model file named by a relative path, made absolute: workers may start elsewhere."""
    if spec and (spec.endswith(".safetensors") or "/" in spec or "\\" in spec):
        return str(Path(spec).absolute())
    return spec


def _run_fingerprint(params: DetectionParams, phase_given: bool) -> tuple[str, dict]:
    """`params.precision` is resolved already: the fingerprint records what runs, so a run that
    resolves `auto` otherwise (another CPU) does not take this one's results as its own."""
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
    log: TextIO | None = None,
    on_case: Callable[[CaseOutcome], None] | None = None,
    preview: bool = False,
    *,
    force: bool = False,
    workers: int = 1,
    scheduler=None,
    phase: str | Path | None = None,
    series: str | None = None,
    dicom_out: str | Path | None = None,
    progress: Callable[[str, float, str], None] | None = None,
) -> list[CaseOutcome]:
    """Detect every case; returns one outcome per case, in input order.

    `phase`: a phase image (one case) or a folder of `<case>.*` phase images, for the candidate
    stage. `series`: the Series Instance UID to read, for one case whose DICOM folder holds
    several (a case list gives it per case in a `series` column). `dicom_out`: a folder for the
    DICOM Segmentation and measurement report of each case read from a DICOM series.
    `progress(case, fraction, message)`: each case's own progress, when cases run in this process.
    `workers` > 1 runs cases in that many local processes; `scheduler` (a Dask scheduler
    address, or a `distributed.Client`) sends them to a Dask cluster instead. Raises BatchError,
    before any case runs, when an output folder cannot be written, or one phase image or one
    series is given for several cases.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    log = log or sys.stderr  # looked up now: the stream may have been replaced since import
    params = params or DetectionParams()
    # `auto` resolved once, here, from this machine's CPU: every case of the batch, wherever it
    # runs (a worker, a cluster of mixed CPUs), runs and records that one precision.
    from ..detection.pipeline import resolved_precision

    params = replace(params, model=_absolute_model(params.model), precision=resolved_precision(params).name)
    cases, problems = expand_inputs(inputs)
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

    refused = {**refuse_unsafe_and_duplicates([c.name for c in cases]), **problems}
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
                regions=region_columns(summary.get("regions")),
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

                    def case_progress(fraction: float, message: str) -> None:
                        inner.n = int(round(100 * fraction))
                        inner.set_postfix_str(message, refresh=True)
                        if progress:
                            progress(task.case, fraction, message)

                    done(run_case(task, case_progress))
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
    """The batch table, replaced whole or not at all (a full disk leaves the previous one)."""
    fields = ["case", "source", "status", "ok", "n_lesions", "n_small", "n_large", *REGION_COLUMNS, "registration_qc", "seconds", "error"]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for o in outcomes:
            writer.writerow({**o.__dict__, **o.regions, "seconds": round(o.seconds, 2)})
