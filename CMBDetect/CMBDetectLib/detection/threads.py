"""How many threads this process's networks use: its share of the cores.

A cohort's N worker processes on one machine each take cores / N (cohort/workers.py), so that
they share the CPU instead of fighting over it. The share is kept here, torch-free, and handed to
ONNX Runtime's intra-op pool and, if and when torch is imported, to torch's.
"""

from __future__ import annotations

import os
import sys

_share: int | None = None


def cpu_cores() -> int:
    """The cores this process may use (cgroups, taskset, SLURM), else all of them."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def share_threads(n_sharing: int) -> int:
    """Take 1/`n_sharing` of the cores for this process's networks; returns the thread count."""
    global _share
    _share = max(1, cpu_cores() // max(1, n_sharing))
    apply_to_torch()
    return _share


def apply_to_torch() -> None:
    """Give torch the share, if one was taken and torch is loaded (never imports torch)."""
    torch = sys.modules.get("torch")
    if _share is not None and torch is not None:
        torch.set_num_threads(_share)


def intra_op_threads() -> int:
    """The threads a network engine should use: the share, or torch's setting, or every core."""
    if _share is not None:
        return _share
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else cpu_cores()
