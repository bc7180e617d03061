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
from typing import Callable, TextIO

from tqdm import tqdm

from ..io import atomic_path, case_name, is_volume_file, sha256_of
from ..detection.pipeline import DetectionParams
from .names import printable, refuse_unsafe_and_duplicates
from .resume import done_summary, fingerprint, fingerprint_fields, remove_case_outputs, remove_staging_debris
from .workers import CaseOutcome, CaseTask, run_case, run_in_processes

__all__ = ["CaseOutcome", "detect_batch", "exit_code", "expand_inputs", "write_batch_table"]


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
        p = Path(row[column] or "")
        if not p.is_absolute():
            p = path.parent / p  # paths in a case list are relative to the list
        cases.append((row.get("case") or case_name(p), p))  # no case column, or an empty cell: the file's name
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


def _absolute_model(spec: str | None) -> str | None:
    """A model file named by a relative path, made absolute: workers may start elsewhere."""
    if spec and (spec.endswith(".safetensors") or "/" in spec or "\\" in spec):
        return str(Path(spec).absolute())
    return spec


def _run_fingerprint(params: DetectionParams, phase_given: bool) -> tuple[str, dict]:
    from ..detection.inference import select_device
    from ..detection.pipeline import get_model

    model = get_model(params.model, select_device(params.device))  # cached: the command loaded it already
    described = fingerprint_fields(params, model.id, model.version, sha256_of(model.path))
    described["phase_given"] = phase_given  # the candidate stage decides with the phase when it has one
    return fingerprint(described), described


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
) -> list[CaseOutcome]:
    """Detect every case; returns one outcome per case, in input order.

    `phase`: a phase image (one case) or a folder of `<case>.*` phase images, for the candidate
    stage. `workers` > 1 runs cases in that many local processes; `scheduler` (a Dask scheduler
    address, or a `distributed.Client`) sends them to a Dask cluster instead.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    log = log or sys.stderr  # looked up now: the stream may have been replaced since import
    params = params or DetectionParams()
    params = replace(params, model=_absolute_model(params.model))
    cases = expand_inputs(inputs)
    out_dir = Path(output_dir).absolute()
    outcomes: dict[int, CaseOutcome] = {}

    def finish(i: int, outcome: CaseOutcome) -> None:
        outcome.source = str(cases[i][1])  # as the user named it (tasks carry absolute paths)
        outcomes[i] = outcome
        if not outcome.ok:
            tqdm.write(f"{outcome.status.upper()} {outcome.error}", file=log)
        if on_case:
            on_case(outcome)

    refused = refuse_unsafe_and_duplicates([case for case, _ in cases])
    for i, reason in refused.items():
        shown = printable(cases[i][0])
        finish(i, CaseOutcome(shown, str(cases[i][1]), False, error=f"{shown or '(empty)'}: refused: {reason}", status="refused"))
    accepted = [i for i in range(len(cases)) if i not in refused]
    if not accepted:
        return [outcomes[i] for i in sorted(outcomes)]

    out_dir.mkdir(parents=True, exist_ok=True)
    debris = remove_staging_debris(out_dir, {cases[i][0] for i in accepted})
    if debris:
        tqdm.write(f"removed {len(debris)} staging folder(s) left by an interrupted run", file=log)
    fp, described = _run_fingerprint(params, phase is not None)
    tasks: dict[int, CaseTask] = {}
    for i in accepted:
        case, path = cases[i]
        summary = None if force else done_summary(out_dir, case, fp, preview)
        if summary is not None:
            finish(i, CaseOutcome(
                case, str(path), True, int(summary.get("n_lesions", 0)), int(summary.get("n_small", 0)),
                int(summary.get("n_large", 0)), model_trained=bool(summary.get("model_trained", True)), status="skipped",
            ))  # fmt: skip
            continue
        remove_case_outputs(out_dir, case)  # failed, changed or interrupted: start clean
        phase_path = str(Path(phase).absolute()) if phase is not None else None
        tasks[i] = CaseTask(case, str(Path(path).absolute()), str(out_dir), params, preview, fp, described, phase_path)

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
    """The batch table, replaced whole or not at all (a full disk leaves the previous one)."""
    fields = ["case", "source", "status", "ok", "n_lesions", "n_small", "n_large", "seconds", "error"]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for o in outcomes:
            writer.writerow({**o.__dict__, "seconds": round(o.seconds, 2)})
