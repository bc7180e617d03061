"""`cmbdetect adapt --study` in a child process, for CMBReview's "Adapt the model to this site".

As CMBDetect runs a detection (CMBDetectLib/detection/runner.py): a child Python with progress
lines on stdout, polled from a QTimer so that Slicer never freezes, and a Cancel that kills it
and everything it started. The child needs torch (the PyTorch extension, as CMBDetect's
detection does); this process imports none of it. The run succeeded when the child exited 0
and the new folder's card (written last) is there; a cancelled run leaves its output folder
for the user to remove (it is theirs: they chose it).
"""

from __future__ import annotations

import os
from pathlib import Path

from CMBDetectLib.detection.runner import WorkerJob, WorkerRun, library_root

DONE_FILE = "unet.json"  # adapt writes the U-Net's card last


def adapt_arguments(study: str | os.PathLike, out: str | os.PathLike, max_minutes: float, model: str | None = None) -> list[str]:
    args = ["--study", str(Path(study).resolve()), "-o", str(Path(out).resolve()), "--max-minutes", repr(float(max_minutes)), "--progress-lines"]
    if model:
        args += ["--model", model]
    return args


class AdaptJob(WorkerJob):
    """One `adapt --study` run: `start()`, `poll()` (never blocks), `cancel()`, then `out` holds
    the model when `run.state` is runner.SUCCEEDED (else `run.error` says why)."""

    def __init__(self, study: str | os.PathLike, out: str | os.PathLike, max_minutes: float = 20.0, model: str | None = None,
                 python: str | None = None, env: dict | None = None) -> None:  # fmt: skip
        if not max_minutes > 0:
            raise ValueError(f"the time budget must be positive, not {max_minutes} minutes")
        self.out = Path(out).resolve()
        env = dict(os.environ if env is None else env)
        # The child runs `-m CMBDetectLib.commands.adapt` from CMBDetectLib's folder; CMBReviewLib (this
        # package's folder) must be importable there too, wherever the two modules are installed.
        here = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, str(library_root()), env.get("PYTHONPATH", "")) if p)
        self.run = WorkerRun(adapt_arguments(study, self.out, max_minutes, model), self.out, python=python, env=env,
                             module="CMBDetectLib.commands.adapt", result_file=DONE_FILE)  # fmt: skip

