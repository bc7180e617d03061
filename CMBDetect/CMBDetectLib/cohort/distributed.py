"""Cases on a Dask distributed cluster: one task per case, written by the worker that runs it.

Assumes a shared file system: every worker reads the inputs and the model at the paths the
client sees, and writes each case's outputs into the output folder (staged in a hidden
folder there and renamed into place, so a case appears whole or not at all). Only outcomes,
a few hundred bytes per case, travel back through the scheduler; volumes never do.

A case whose worker dies (killed, out of memory, node lost) is rerun by the scheduler on
another worker once; if that worker dies too, the case is reported failed and the batch goes
on. Dask is imported only here, so detection without --scheduler does not need it.
"""

from __future__ import annotations

import uuid
from typing import Callable, Iterable

from .workers import CaseOutcome, CaseTask, died, run_case, share_threads

INSTALL_HINT = "Dask is needed for --scheduler: pip install 'dask[distributed]' (or: pip install 'cmbdetect[cohort]')"
# The scheduler gives up on a task after its worker died this many times more than the
# first: one rerun elsewhere, as promised, rather than Dask's default of three.
ALLOWED_FAILURES = 1


def import_distributed():
    try:
        import distributed
    except ImportError as exc:
        raise RuntimeError(INSTALL_HINT) from exc
    return distributed


def _threads_per_host(client) -> dict[str, int]:
    """Host -> threads of all Dask workers on it, so that each task takes its share of the cores."""
    totals: dict[str, int] = {}
    for info in client.scheduler_info(n_workers=-1)["workers"].values():
        totals[info["host"]] = totals.get(info["host"], 0) + int(info.get("nthreads", 1))
    return totals


def _set_allowed_failures(dask_scheduler=None, n: int = ALLOWED_FAILURES) -> int:
    dask_scheduler.allowed_failures = n
    return n


def run_dask_case(task: CaseTask, threads_per_host: dict[str, int]) -> CaseOutcome:
    """On a Dask worker: take this worker's share of the host's cores, then run the case.

    A worker that joined after the batch was sent (an adaptive SLURM cluster growing) is not
    in `threads_per_host`: it keeps the threads its nanny gave it (OMP_NUM_THREADS=1 by
    Dask's default), which never oversubscribes the node.
    """
    from distributed import get_worker
    from distributed.comm import get_address_host

    total = threads_per_host.get(get_address_host(get_worker().address))
    if total:
        share_threads(total)
    return run_case(task)


def run_on_dask(
    tasks: Iterable[CaseTask],
    client,
    on_done: Callable[[CaseOutcome], None],
) -> None:
    """Submit every case to `client`'s cluster and report each outcome as it comes back."""
    distributed = import_distributed()
    tasks = list(tasks)
    if not tasks:
        return
    # The scheduler, not the client, decides when a worker's death fails a task.
    client.run_on_scheduler(_set_allowed_failures)
    hosts = _threads_per_host(client)
    batch = uuid.uuid4().hex[:8]  # keys unique across batches sent to one long-lived cluster
    futures = {}
    for i, task in enumerate(tasks):
        # pure=False: the same case run again (after --force) is new work, never a cached result.
        # retries=1: a task that raises (a worker-side surprise) gets one more try.
        future = client.submit(run_dask_case, task, hosts, key=f"cmbdetect-{batch}-{i}", pure=False, retries=1)
        futures[future] = task
    for future in distributed.as_completed(futures):
        task = futures[future]
        try:
            on_done(future.result())
        except distributed.KilledWorker:
            on_done(died(task, ALLOWED_FAILURES + 1, "Dask worker"))
        except Exception as exc:  # noqa: BLE001 - a case's surprise must not stop the others
            on_done(CaseOutcome(task.case, task.source, False, error=f"{task.case}: {type(exc).__name__}: {exc}"))
