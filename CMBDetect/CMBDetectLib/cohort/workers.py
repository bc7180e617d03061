"""One case, start to finish, as a self-contained task; and running tasks in local processes.

`run_case` is what every way of running a batch executes (in this process, in a local
worker process, or on a Dask worker on another machine): read the volume, detect, write the
case's outputs all-or-nothing into the output folder, return a `CaseOutcome`. It takes
only plain, picklable values, loads the model through the pipeline's per-process cache (so
once per worker), and never raises for a bad case: the outcome says what went wrong.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterable

from ..detection.pipeline import DetectionParams
from ..detection.threads import cpu_cores, share_threads  # noqa: F401 - a worker's share of the cores
from ..errors import CaseError
from ..io import read_volume

# Test-only hook: "CASE:MARKER" makes the worker that starts CASE die at once (os._exit)
# the first time, leaving MARKER behind so that the rerun elsewhere succeeds. It lets the
# tests kill a worker in the middle of a case for real; nothing else reads it.
DIE_ONCE_ENV = "CMBDETECT_TEST_DIE_ONCE"
# Test-only hook: "SECONDS:FOLDER" makes every case, once detected, leave FOLDER/<case>.held
# (holding the pid) and wait SECONDS before writing its outputs, so that a test can kill the
# parent while its workers are in the middle of cases. Nothing else reads it.
HOLD_ENV = "CMBDETECT_TEST_HOLD_BEFORE_WRITE"
# How often a worker looks for its parent, and how it ends when the parent is gone.
PARENT_POLL_S = 0.5
EXIT_ORPHANED = 75


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
    status: str = ""  # "done", "skipped" (done by an earlier run), "refused" or "failed"
    cpu_seconds: float = 0.0  # CPU time of the worker process for this case, all its threads
    threads: int = 0  # the network engine's intra-op threads in the process that ran the case
    regions: dict = field(default_factory=dict)  # the batch table's MARS columns (region_columns)

    def __post_init__(self) -> None:
        self.status = self.status or ("done" if self.ok else "failed")


@dataclass
class CaseTask:
    """Everything a worker needs for one case; paths absolute (workers may run elsewhere)."""

    case: str
    source: str
    out_dir: str
    params: DetectionParams
    preview: bool = False
    fingerprint: str = ""
    fingerprint_of: dict = field(default_factory=dict)
    phase: str | None = None  # a phase image, or a folder of `<case>.*` phase images
    series: str | None = None  # the Series Instance UID to read from a DICOM folder of several
    dicom_out: str | None = None  # the folder for the DICOM SEG and SR of a case read from DICOM




def _die_if_asked(case: str) -> None:
    spec = os.environ.get(DIE_ONCE_ENV, "")
    if not spec or ":" not in spec:
        return
    name, marker = spec.split(":", 1)
    if name == case and not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os._exit(17)  # no cleanup, no exception: as a killed process


def _hold_if_asked(case: str) -> None:
    spec = os.environ.get(HOLD_ENV, "")
    if not spec or ":" not in spec:
        return
    seconds, folder = spec.split(":", 1)
    Path(folder, f"{case}.held").write_text(str(os.getpid()))
    time.sleep(float(seconds))


def run_case(task: CaseTask, progress: Callable[[float, str], None] | None = None) -> CaseOutcome:
    """Detect and write one case; a bad case comes back as a failed outcome, never as an exception."""
    from ..io import dicom_series, read_phase
    from ..detection.outputs import write_case_outputs
    from ..detection.pipeline import detect_volume
    from .names import inside, unsafe_name_reason
    from .resume import FingerprintedResult

    case, start, cpu_start = task.case, time.perf_counter(), time.process_time()
    try:
        reason = unsafe_name_reason(case)
        if reason or not inside(Path(task.out_dir), case):  # checked before, checked again where it is written
            raise CaseError(case, reason or "its outputs would land outside the output folder")
        _die_if_asked(case)
        source = Path(task.source)
        series = dicom_series(source, case, task.series) if source.is_dir() else None
        volume = read_volume(source, case, series.uid if series else task.series)
        # What the DICOM input gave us travels beside the volume: detection never sees it.
        dicom = _dicom_export(task, series, volume.shape) if series and task.dicom_out else None
        phase = read_phase(task.phase, case, volume) if task.phase else None
        result = detect_volume(volume, task.params, progress=progress, case=case, phase=phase)
        if task.fingerprint:
            result = FingerprintedResult.of(result, task.fingerprint, task.fingerprint_of)
        _hold_if_asked(case)
        write_case_outputs(
            result, Path(task.out_dir), case, image=volume.array if task.preview else None,
            dicom_source=_source_summary(series) if series else None, dicom=dicom,
        )  # fmt: skip
        s = result.summary()
        return CaseOutcome(
            case, task.source, True, s["n_lesions"], s["n_small"], s["n_large"], time.perf_counter() - start,
            model_trained=result.model_trained, cpu_seconds=time.process_time() - cpu_start, threads=result.threads,
            regions=region_columns(s.get("regions")),
        )  # fmt: skip
    except CaseError as exc:
        return CaseOutcome(case, task.source, False, seconds=time.perf_counter() - start, error=str(exc))
    except Exception as exc:
        # Unexpected (a library's own error class: nibabel's, zlib's, EOFError), but one case
        # must not stop a cohort: report it in full and go on.
        detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return CaseOutcome(case, task.source, False, seconds=time.perf_counter() - start, error=f"{case}: {detail}")


REGION_COLUMNS = ("n_lobar", "n_deep", "n_infratentorial", "n_region_unknown", "n_left", "n_right", "n_midline", "pattern")


def region_columns(regions: object) -> dict[str, object]:
    """A summary's "regions" block as the batch table's columns; none with --no-regions."""
    if not isinstance(regions, dict):
        return {}
    qc = regions.get("registration")
    passed = qc.get("passed") if isinstance(qc, dict) else None
    return {**{k: regions.get(k, "") for k in REGION_COLUMNS},
            "registration_qc": "" if passed is None else ("passed" if passed else "failed")}  # fmt: skip


def _source_summary(series) -> dict[str, str]:
    return {
        "study_instance_uid": series.study_uid, "series_instance_uid": series.uid,
        "series_description": series.description, "frame_of_reference_uid": series.frame_of_reference_uid,
    }  # fmt: skip


def _dicom_export(task: CaseTask, series, shape: tuple[int, int, int]):
    """The series' headers, read before detection so that a series the writers cannot
    reference fails at once, not after minutes of work."""
    from ..export import DicomExport, check_available, read_dicom_source

    check_available()  # checked by the command too, but a cluster's worker may lack highdicom
    return DicomExport(Path(task.dicom_out), read_dicom_source(series, task.case, shape))


def died(task: CaseTask, attempts: int, where: str) -> CaseOutcome:
    return CaseOutcome(
        task.case, task.source, False,
        error=f"{task.case}: the {where} running this case died ({attempts} attempts); nothing was written",
    )  # fmt: skip


def die_with_parent(parent_pid: int, poll_s: float = PARENT_POLL_S) -> None:
    """End this process (os._exit, at once, mid-case) as soon as `parent_pid` is gone.

    A pool's worker outlives a killed parent until its case is done and written, minutes
    later, into a batch nobody runs any more. A daemon thread watches the parent: psutil's
    is_running() compares the start time, so a reused pid is not mistaken for it (Linux, macOS,
    Windows); on POSIX a changed os.getppid() (reparented) says it at once, even while the dead
    parent is still a zombie. What the case staged is left for the next run to clear, as after
    any kill. (Linux's PR_SET_PDEATHSIG is not used: it fires when the *thread* that started
    the worker ends, which need not be the parent's end.)
    """
    try:
        import psutil
    except ImportError:  # a declared dependency; without it, POSIX still has getppid
        psutil = None
    parent = None
    if psutil is not None:
        try:
            parent = psutil.Process(parent_pid)
        except psutil.NoSuchProcess:
            os._exit(EXIT_ORPHANED)
    reparenting = os.name == "posix" and os.getppid() == parent_pid  # a direct child, as spawn makes it

    def parent_gone() -> bool:
        if reparenting and os.getppid() != parent_pid:
            return True
        if parent is None:
            return False
        try:
            return not parent.is_running() or parent.status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            return True

    def watch() -> None:
        while not parent_gone():
            time.sleep(poll_s)
        os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="cmbdetect-parent-watch", daemon=True).start()


def _start_worker(parent_pid: int, n_workers: int, model: str | None, device: str) -> None:
    """Each local worker process: dies with its parent, takes its share of the cores, and loads
    the model once, up front."""
    from ..detection.inference import select_device
    from ..detection.pipeline import get_model

    die_with_parent(parent_pid)
    share_threads(n_workers)
    get_model(model, select_device(device))


def run_in_processes(tasks: Iterable[CaseTask], n_workers: int, on_done: Callable[[CaseOutcome], None]) -> None:
    """Run tasks in `n_workers` spawned processes; a case whose process dies is run once more.

    When a process dies, the pool is broken and every unfinished case comes back; they are
    run again in a fresh pool, and a case that has now been in two broken pools is reported
    failed (the one that kills its worker cannot stop the batch).
    """
    pending = list(tasks)
    attempts: dict[str, int] = {}
    while pending:
        if attempts:
            # The broken pool terminated its other workers mid-case: their staging folders are
            # dead now (the pool has shut down), and the retried cases must not inherit them.
            from .resume import remove_staging_debris

            for folder in {d for t in pending for d in (t.out_dir, t.dicom_out) if d}:
                remove_staging_debris(Path(folder), {t.case for t in pending if folder in (t.out_dir, t.dicom_out)})
        first = pending[0]
        ctx = get_context("spawn")  # fork would copy torch's thread pools and locks: unsafe
        with ProcessPoolExecutor(
            n_workers, mp_context=ctx, initializer=_start_worker,
            initargs=(os.getpid(), n_workers, first.params.model, first.params.device),
        ) as pool:  # fmt: skip
            futures: dict[Future, CaseTask] = {pool.submit(run_case, t): t for t in pending}
            pending = []
            remaining = set(futures)
            while remaining:
                finished, remaining = wait(remaining, return_when=FIRST_COMPLETED)
                for future in finished:
                    task = futures[future]
                    try:
                        on_done(future.result())
                    except BrokenProcessPool:
                        attempts[task.case] = attempts.get(task.case, 0) + 1
                        if attempts[task.case] >= 2:
                            on_done(died(task, attempts[task.case], "worker process"))
                        else:
                            pending.append(task)
