"""The whole Slicer-side run. `DetectionJob` (what the module uses) writes the input node to a
file, starts the worker in a child process (detection/runner.py) and, only when the run
succeeded and the input is still in the scene, turns its probability map into nodes; a
cancelled or failed run, or one whose input was deleted meanwhile, leaves the scene as it was.
`ComparisonJob` does the same for "Compare with baseline" (longitudinal/worker.py, then
longitudinal.show_comparison). `run_detection` detects in this process, for scripts that
already hold torch."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..detection.lesions import DEFAULT_THRESHOLD, MAX_DIAMETER_MM, MIN_DIAMETER_MM
from ..detection.phase import check_phase
from ..detection.records import candidate_from_record
from ..detection.runner import WorkerJob
from ..detection.rethreshold import LesionMap, lesions_from_probability, stage_cut
from ..io import write_volume
from .nodes import geometry_of_node, volume_from_node
from .results import write_result

def run_detection(
    input_volume_node: Any,
    params: Any = None,
    segmentation_node: Any = None,
    table_node: Any = None,
    markups_node: Any = None,
    progress: Any = None,
    cancel: Any = None,
) -> tuple[Any, Any, Any, Any]:
    """Detect microbleeds in a volume node and write the outputs into nodes.

    In this process (for scripts that already hold torch; the Slicer module uses DetectionJob,
    a child process): node -> Volume -> pipeline.detect_volume -> write_result. The nodes are
    only touched after detection succeeded, so a cancelled or failed run leaves the previous
    outputs as they were. Returns (result, seg, table, markups); raises pipeline.Cancelled if
    `cancel()` turned true.
    """
    from ..detection.pipeline import detect_volume  # torch is imported only when detection is asked for

    volume = volume_from_node(input_volume_node)
    result = detect_volume(volume, params, progress=progress, cancel=cancel, case=input_volume_node.GetName())
    nodes = write_result(result, input_volume_node, segmentation_node, table_node, markups_node)
    return (result, *nodes)


class InputGone(Exception):
    """The input volume left the scene (deleted, or the scene closed) while its detection ran."""


class DetectionJob(WorkerJob):
    """One detection of a volume node in a child process: the MRML side of runner.WorkerRun.

    `__init__` copies the node's voxels and grid to `work_dir/input.nrrd` (the child never sees
    the scene; it writes back only the probability map and the summary, worker --for-slicer); `start()` launches the worker; `poll()` and `cancel()` are the runner's;
    `finish()` loads the result into nodes, only after success and only if the input is still
    in its scene. Nothing in the scene changes before `finish()`. `cleanup()` removes the files.
    """

    def __init__(
        self,
        input_volume_node: Any,
        work_dir: str | Path | None = None,
        python: str | None = None,
        env: dict | None = None,
        threshold: float = DEFAULT_THRESHOLD,
        min_diameter_mm: float = MIN_DIAMETER_MM,
        max_diameter_mm: float = MAX_DIAMETER_MM,
        device: str = "cpu",
        model: str | None = None,
        batch_size: int | None = None,
        phase_volume_node: Any = None,
        temp_dir: str | Path | None = None,
        operating_point: str | None = None,
        phase_sign: str = "auto",
    ) -> None:
        from ..detection.runner import WorkerRun, worker_arguments

        volume = volume_from_node(input_volume_node)
        if input_volume_node.GetScene() is None:
            raise ValueError(f"volume '{input_volume_node.GetName()}' is not in a scene")
        phase = None
        if phase_volume_node is not None:
            if phase_volume_node is input_volume_node:
                raise ValueError(f"volume '{input_volume_node.GetName()}' is both the SWI and the phase image")
            phase = volume_from_node(phase_volume_node)
            if phase.shape != volume.shape or not phase.geometry.matches(volume.geometry):
                raise ValueError(
                    f"phase volume '{phase_volume_node.GetName()}' is not on the grid of '{input_volume_node.GetName()}' "
                    f"(shape {phase.shape} vs {volume.shape}, or spacing, origin or direction differ); "
                    "the candidate stage needs the phase of the same acquisition"
                )
            try:
                check_phase(phase.array, volume.shape)  # here, not after the whole network in the child
            except ValueError as exc:
                raise ValueError(f"phase volume '{phase_volume_node.GetName()}': {exc}") from None
        self.input_volume_node = input_volume_node
        self.input_id = input_volume_node.GetID()
        self.scene = input_volume_node.GetScene()
        self.threshold, self.min_diameter_mm, self.max_diameter_mm = threshold, min_diameter_mm, max_diameter_mm
        # Without work_dir, a folder of its own inside temp_dir (Slicer's temporary folder), which
        # cleanup() removes: runs leave nothing behind.
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="CMBDetect-", dir=temp_dir))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        input_path = self.work_dir / "input.nrrd"
        write_volume(volume.array, volume.geometry, input_path, compress=False)  # fast; read at once
        phase_path = None
        if phase is not None:
            phase_path = self.work_dir / "phase.nrrd"
            write_volume(phase.array, phase.geometry, phase_path, compress=False)
        arguments = worker_arguments(
            input_path, self.work_dir / "out", "input", threshold, min_diameter_mm, max_diameter_mm, device, model, batch_size,
            phase_path, for_slicer=True, operating_point=operating_point, phase_sign=phase_sign,
        )
        self.run = WorkerRun(arguments, self.work_dir / "out", python=python, env=env)

    def uses(self, node: Any) -> bool:
        return node is self.input_volume_node

    def input_present(self) -> bool:
        return self.scene.GetNodeByID(self.input_id) is self.input_volume_node

    def finish(self, segmentation_node: Any = None, reuse_foreign: bool = False) -> tuple[LesionMap, Any, Any, Any]:
        """Nodes from a successful run: (lesion map, segmentation, table, markups).

        Raises RuntimeError if the run failed or was cancelled (the worker's error message),
        InputGone if the input left the scene meanwhile. The probability map is re-read here
        and its lesions extracted with this run's threshold (with the candidate stage: the
        stage's own cut on P(microbleed)) and size range: the same code as `rethreshold`, so
        the segments of a run and of a re-threshold at the same threshold never differ.
        """
        from ..detection.runner import SUCCEEDED

        if self.run.state != SUCCEEDED:
            raise RuntimeError(f"microbleed detection {self.run.state}: {self.run.error}")
        if not self.input_present():
            raise InputGone(f"volume {self.input_id} left the scene during its detection")
        output = self.run.output()
        geometry = geometry_of_node(self.input_volume_node)
        if not output.probability.geometry.matches(geometry):
            raise ValueError(f"volume '{self.input_volume_node.GetName()}' changed its grid during the detection")
        run = {k: v for k, v in output.summary.items() if k not in ("case", "candidates")}
        records_ = output.summary.get("candidates")
        candidates = None if records_ is None else [candidate_from_record(r) for r in records_]
        # With the candidate stage, the stage's own cut on P(microbleed), as on the command line;
        # this job's threshold is the paper pipeline's cut on the network's probability.
        cut = stage_cut(run)
        result = lesions_from_probability(
            output.probability.array, geometry, self.threshold if cut is None else cut, self.min_diameter_mm,
            self.max_diameter_mm, run, candidates,
        )  # fmt: skip
        nodes = write_result(result, self.input_volume_node, segmentation_node, reuse_foreign=reuse_foreign)
        return (result, *nodes)

    def cleanup(self) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)


class ComparisonJob(WorkerJob):
    """"Compare with baseline": `cmbdetect longitudinal` on two volume nodes in a child process
    (longitudinal/worker.py, the same library call as the command line), then its outputs into
    the scene through longitudinal.show_comparison.

    As DetectionJob: `__init__` copies both nodes' voxels and grids to files (the child never sees
    the scene), `start()`, `poll()`, `wait()`, `cancel()` are the runner's, and nothing in the
    scene changes before `finish()`, which runs only after success and only while both inputs are
    still in their scene. `cleanup()` removes the files.
    """

    def __init__(
        self,
        baseline_volume_node: Any,
        followup_volume_node: Any,
        work_dir: str | Path | None = None,
        python: str | None = None,
        env: dict | None = None,
        device: str = "cpu",
        model: str | None = None,
        operating_point: str | None = None,
        temp_dir: str | Path | None = None,
    ) -> None:
        from ..detection.runner import WorkerRun
        from ..longitudinal.worker import CASE, summary_file

        if baseline_volume_node is None:
            raise ValueError("no baseline volume selected")
        if baseline_volume_node is followup_volume_node:
            raise ValueError(f"volume '{baseline_volume_node.GetName()}' is both the baseline and the follow-up: choose the earlier scan as baseline")
        volumes = {role: volume_from_node(node) for role, node in (("baseline", baseline_volume_node), ("followup", followup_volume_node))}
        for node in (baseline_volume_node, followup_volume_node):
            if node.GetScene() is None:
                raise ValueError(f"volume '{node.GetName()}' is not in a scene")
        self.input_volume_node, self.baseline_volume_node = followup_volume_node, baseline_volume_node
        self.scene = followup_volume_node.GetScene()
        self.ids = {role: node.GetID() for role, node in (("baseline", baseline_volume_node), ("followup", followup_volume_node))}
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="CMBDetect-", dir=temp_dir))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        paths = {}
        for role, volume in volumes.items():
            paths[role] = self.work_dir / f"{role}.nrrd"  # the file names are the scans' case names in the outputs
            write_volume(volume.array, volume.geometry, paths[role], compress=False)
        self.case = CASE
        self.out_dir = self.work_dir / "out"
        arguments = ["--baseline", str(paths["baseline"]), "--followup", str(paths["followup"]), "--out", str(self.out_dir),
                     "--case", self.case, "--device", device, "--operating-point", operating_point or "count"]  # fmt: skip
        if model:
            arguments += ["--model", str(model)]
        self.run = WorkerRun(arguments, self.out_dir, python=python, env=env, module="CMBDetectLib.longitudinal.worker",
                             result_file=summary_file(self.case))  # fmt: skip

    def uses(self, node: Any) -> bool:
        return node is self.input_volume_node or node is self.baseline_volume_node

    def input_present(self) -> bool:
        return (self.scene.GetNodeByID(self.ids["followup"]) is self.input_volume_node
                and self.scene.GetNodeByID(self.ids["baseline"]) is self.baseline_volume_node)  # fmt: skip

    def outputs(self) -> tuple[dict, list[dict]]:
        """The pair's summary and the rows of its changes CSV, as `cmbdetect longitudinal` wrote them."""
        import csv
        import json

        summary = json.loads((self.out_dir / f"{self.case}_summary.json").read_text())
        with open(self.out_dir / summary["files"]["changes_csv"], newline="") as f:
            return summary, list(csv.DictReader(f))

    def finish(self, link_views: bool = True) -> Any:
        """The comparison in the scene (longitudinal.Comparison), named after the follow-up node.
        Raises RuntimeError if the run failed or was cancelled (the worker's message, e.g. a
        follow-up that does not register), InputGone if either input left the scene meanwhile."""
        from ..detection.runner import SUCCEEDED
        from .longitudinal import show_comparison

        if self.run.state != SUCCEEDED:
            raise RuntimeError(f"comparison with the baseline {self.run.state}: {self.run.error}")
        if not self.input_present():
            raise InputGone("a volume of the pair left the scene during its comparison")
        summary, changes = self.outputs()
        summary = {**summary, "case": self.input_volume_node.GetName()}  # the files' case is the job's own name
        return show_comparison(self.baseline_volume_node, self.input_volume_node, summary, changes, self.scene, link_views)

    def cleanup(self) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)
