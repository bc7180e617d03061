"""Run worker.py in a child process: launch, read its progress, cancel it, collect its result.

The Slicer module runs detection this way, as SlicerMONAIAuto3DSeg does, so that the GUI
stays responsive and a Cancel works at every stage (model load, preprocessing, inference,
lesion extraction), including those that are a single long library call. This module knows
neither Qt nor MRML: the widget polls `poll()` from a QTimer, scripts and tests call
`wait()`, and mrml/job.py turns a finished run into nodes.

A reader thread moves the child's stdout lines into a queue, so that `poll()` never blocks
on a pipe; stderr is merged into stdout, so a traceback ends up in `log`.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io import Volume, read_volume
from .lesions import DEFAULT_THRESHOLD, MAX_DIAMETER_MM, MIN_DIAMETER_MM
from .worker import PROBABILITY_FILE, RESULT_FILE

# States of a run.
NOT_STARTED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "not started", "running", "succeeded", "failed", "cancelled"
LOG_LINES = 200  # the tail of the child's output kept for error messages


@dataclass
class Event:
    """One line of the worker's protocol: kind is STAGE, PROGRESS, DONE, ERROR or LOG."""

    kind: str
    fraction: float | None = None
    text: str = ""


def parse_line(line: str) -> Event:
    """A line of the worker's stdout as an Event (anything unknown is LOG text)."""
    line = line.rstrip("\r\n")
    head, _, rest = line.partition(" ")
    if head == "PROGRESS":
        number, _, message = rest.partition(" ")
        try:
            return Event("PROGRESS", min(1.0, max(0.0, float(number))), message)
        except ValueError:
            return Event("LOG", text=line)
    if head in ("STAGE", "DONE", "ERROR"):
        return Event(head, text=rest)
    return Event("LOG", text=line)


def worker_arguments(
    input_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    case: str = "input",
    threshold: float = DEFAULT_THRESHOLD,
    min_diameter_mm: float = MIN_DIAMETER_MM,
    max_diameter_mm: float = MAX_DIAMETER_MM,
    device: str = "cpu",
    model: str | None = None,
    batch_size: int | None = None,
    phase_path: str | os.PathLike | None = None,
    for_slicer: bool = False,
    operating_point: str | None = None,
    phase_sign: str = "auto",
    precision: str = "auto",
    regions: bool = True,
) -> list[str]:
    args = ["--input", str(input_path), "--out", str(out_dir), "--case", case, "--threshold", repr(float(threshold)),
            "--min-size", repr(float(min_diameter_mm)), "--max-size", repr(float(max_diameter_mm)), "--device", device]  # fmt: skip
    if model:
        args += ["--model", str(model)]
    if batch_size:
        args += ["--batch-size", str(int(batch_size))]
    if phase_path:
        args += ["--phase", str(phase_path)]
    if for_slicer:
        args.append("--for-slicer")
    if operating_point:
        args += ["--operating-point", operating_point]
    if phase_sign != "auto":
        args += ["--phase-sign", phase_sign]
    if precision != "auto":
        args += ["--precision", precision]
    if not regions:
        args.append("--no-regions")
    return args


def library_root() -> Path:
    """The folder that holds CMBDetectLib (the module folder inside Slicer)."""
    return Path(__file__).resolve().parent.parent.parent


@dataclass
class WorkerOutput:
    probability: Volume
    summary: dict[str, Any]
    out_dir: Path


class WorkerRun:
    """One detection in a child Python: `start()`, then `poll()` or `wait()`, `cancel()` any time.

    `module` and `result_file` let another long command speak the same protocol in a child
    (`cmbdetect adapt --progress-lines`, which CMBReview runs): the run succeeded when the child
    exited 0 and `out_dir/result_file` (written last) is there."""

    def __init__(
        self, arguments: list[str], out_dir: str | os.PathLike, python: str | None = None, env: dict | None = None,
        module: str = "CMBDetectLib.detection.worker", result_file: str = RESULT_FILE,
    ) -> None:  # fmt: skip
        self.arguments = list(arguments)
        self.module, self.result_file = module, result_file
        self.out_dir = Path(out_dir)
        self.python = python or sys.executable
        self.env = dict(os.environ if env is None else env)
        self.state = NOT_STARTED
        self.stage = ""
        self.fraction = 0.0
        self.message = ""
        self.error = ""
        self.log: list[str] = []
        self.stages_seen: list[str] = []
        self._process: subprocess.Popen | None = None
        self._lines: queue.Queue = queue.Queue()
        self._reader: threading.Thread | None = None
        self._done = False

    @property
    def command(self) -> list[str]:
        return [self.python, "-u", "-m", self.module, *self.arguments]

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def alive(self) -> bool:
        """Whether the child process still runs."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        if self.state != NOT_STARTED:
            raise RuntimeError("a worker run starts once")
        self.env["PYTHONUNBUFFERED"] = "1"
        # `-m` puts the working folder first on sys.path: the child finds this CMBDetectLib
        # whatever PYTHONPATH the launcher (PythonSlicer) sets.
        self._process = subprocess.Popen(
            self.command,
            cwd=str(library_root()),
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            # No console window flashing up on Windows (as slicer.util.launchConsoleProcess).
            creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),
            # Its own process group on POSIX: the launcher and everything it starts can be
            # killed as one, even a child started after the tree was listed.
            start_new_session=os.name == "posix",
        )
        self.state = RUNNING
        self._reader = threading.Thread(target=self._read, args=(self._process.stdout,), daemon=True)
        self._reader.start()

    def _read(self, stream) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)  # end of output

    def poll(self) -> list[Event]:
        """Take the lines that arrived; update stage, fraction, message and state. Never blocks."""
        events: list[Event] = []
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._done = True
                continue
            event = parse_line(line)
            events.append(event)
            if event.kind == "STAGE":
                self.stage = event.text
                self.stages_seen.append(event.text)
            elif event.kind == "PROGRESS":
                self.fraction, self.message = event.fraction, event.text
            elif event.kind == "ERROR":
                self.error = event.text
            elif event.kind == "LOG":
                self.log = (self.log + [event.text])[-LOG_LINES:]
        if self.state == RUNNING and self._done and self._process is not None and self._process.poll() is not None:
            code = self._process.returncode
            complete = code == 0 and (self.out_dir / self.result_file).is_file()
            self.state = SUCCEEDED if complete else FAILED
            if not complete and not self.error:
                tail = [line for line in self.log if line.strip()][-1:]
                self.error = f"the process ended with exit status {code}" + (f": {tail[0]}" if tail else "")
        return events

    @property
    def finished(self) -> bool:
        return self.state in (SUCCEEDED, FAILED, CANCELLED)

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> str:
        """Poll until the run ends (or `timeout` seconds pass); returns the state."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            self.poll()
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(interval)
        return self.state

    def cancel(self) -> None:
        """Kill the child (and anything it started) at once, whatever it is doing. Idempotent."""
        if self._process is None or self.finished:
            if self.state == NOT_STARTED:
                self.state = CANCELLED
            return
        _kill_tree(self._process)
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # pragma: no cover - a process that ignores SIGKILL
            pass
        self.state = CANCELLED  # the reader thread ends on its own: the pipe closed with the child

    def output(self) -> WorkerOutput:
        """The probability map and the summary of a successful run."""
        if self.state != SUCCEEDED:
            raise RuntimeError(f"the detection did not succeed ({self.state}): {self.error}")
        summary = json.loads((self.out_dir / RESULT_FILE).read_text())
        probability = read_volume(self.out_dir / PROBABILITY_FILE, summary.get("case"))
        return WorkerOutput(probability, summary, self.out_dir)


class WorkerJob:
    """A module's job that is one child process (`self.run`, set by the subclass): what the
    module's timer and buttons call, the same for a detection, a comparison and an adaptation."""

    run: WorkerRun

    def start(self) -> None:
        self.run.start()

    def poll(self) -> list:
        return self.run.poll()

    def wait(self, timeout: float | None = None) -> str:
        return self.run.wait(timeout)

    def cancel(self) -> None:
        self.run.cancel()


def _kill_tree(process: subprocess.Popen) -> None:
    """Kill the child and everything under it, now.

    The child is usually a launcher: PythonSlicer (CTKAppLauncher) starts the real interpreter
    as its own child, so killing the child alone would leave the computation running and
    writing. psutil lists the tree on every platform; the launcher is suspended first so that it
    cannot start another process meanwhile. On POSIX the child's process group is killed as
    well; without psutil (it is a requirement, but a Slicer could lack it), Windows falls back
    to `taskkill /T`.
    """
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            root = psutil.Process(process.pid)
            root.suspend()
            tree = root.children(recursive=True)
        except psutil.Error:
            tree = []
        for member in reversed(tree):  # deepest first: nothing is left without a parent to kill it
            try:
                member.kill()
            except psutil.Error:
                pass
    elif os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, check=False,
                       creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))  # fmt: skip
    if os.name == "posix":
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the group it leads (start_new_session)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        process.kill()
    except ProcessLookupError:
        pass
