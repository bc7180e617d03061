"""Detection in a child process, as the Slicer module runs it, against slicer-core's real scene.

A real `python -m CMBDetectLib.detection.worker` is started for each test (the venv's Python
stands in for PythonSlicer), with the hand-wired dark-spot model of handmade.py on small
phantoms. What is checked: the stages and progress arrive; nothing touches the scene until
`finish()`; a Cancel at each stage (model load, preprocessing, inference, lesion extraction)
kills the process and leaves the scene exactly as it was; an input deleted during the run
ends it quietly without writing anything.

To cancel "during" a stage on a volume small enough for a fast test, the worker is told
(environment variable CMBDETECT_WORKER_HOLD) to stay in that stage until it is killed: the
process, the protocol and the kill are the real ones, only the stage's duration is not.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest

pytest.importorskip("slicer_core", reason="slicer-core (the Qt-free MRML engine) is not installed")

import slicer  # noqa: E402
import slicer.util  # noqa: E402

from CMBDetectLib.mrml.job import DetectionJob, InputGone  # noqa: E402
from CMBDetectLib.mrml.nodes import REJECTED_ROLE, SUMMARY_ATTRIBUTE, geometry_of_node, summary_of  # noqa: E402
from CMBDetectLib.mrml.results import probability_of, write_result  # noqa: E402
from CMBDetectLib.detection.lesions import extract_lesions  # noqa: E402
from CMBDetectLib.detection.rethreshold import LesionMap  # noqa: E402
from CMBDetectLib.detection.runner import CANCELLED, FAILED, RUNNING, SUCCEEDED, parse_line  # noqa: E402
from CMBDetectLib.detection.worker import HOLD_ENV, STAGES  # noqa: E402
from handmade import constant_classifier, phantom, save_dark_spot_model  # noqa: E402

STAGE_TIMEOUT_S = 180  # generous: the machine is shared; a hang fails instead of blocking

# Slicer's PythonSlicer is a CTKAppLauncher: it sets up the environment and starts the real
# interpreter (python-real) as its own child, then waits for it. This script does the same, so
# that a Cancel is tested against a launcher with the worker as its grandchild.
LAUNCHER = """#!{python}
import subprocess, sys
sys.exit(subprocess.call([{python!r}, *sys.argv[1:]]))
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(save_dark_spot_model(tmp_path_factory.mktemp("model") / "dark-spot.safetensors"))


def scene_state(scene) -> dict:
    """Everything a run could change: node ids and names, and the content of the outputs."""
    state = {"nodes": [(n.GetID(), n.GetName()) for n in slicer.util.getNodes("*").values()]}
    for node in slicer.util.getNodesByClass("vtkMRMLSegmentationNode"):
        segmentation = node.GetSegmentation()
        state[node.GetID()] = (
            [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())],
            node.GetAttribute(SUMMARY_ATTRIBUTE),
        )
    for node in slicer.util.getNodesByClass("vtkMRMLTableNode"):
        state[node.GetID()] = node.GetNumberOfRows()
    for node in slicer.util.getNodesByClass("vtkMRMLMarkupsFiducialNode"):
        state[node.GetID()] = node.GetNumberOfControlPoints()
    return state


def phantom_node(shape, name="phantom", spheres_mm=None):
    array, geometry, spheres = phantom(shape=shape, spheres_mm=spheres_mm)
    return slicer.util.addVolumeFromArray(array, geometry.ijk_to_ras(), name), spheres


def test_protocol_lines():
    assert parse_line("PROGRESS 0.4200 slice 10/40\n").__dict__ == {"kind": "PROGRESS", "fraction": 0.42, "text": "slice 10/40"}
    assert parse_line("STAGE inference").text == "inference"
    assert parse_line("PROGRESS 7 x").fraction == 1.0  # clamped
    assert parse_line("PROGRESS nan? x").kind in ("PROGRESS", "LOG")
    assert parse_line("PROGRESS abc").kind == "LOG"
    assert parse_line("Traceback (most recent call last):").kind == "LOG"


def test_detection_in_a_child_process_touches_the_scene_only_when_finished(mrml, tmp_path, model):
    node, spheres = phantom_node((6, 120, 140), spheres_mm=[((3, 60, 40), 4.0), ((3, 60, 100), 7.0)])
    before = scene_state(mrml.scene)
    job = DetectionJob(node, tmp_path / "work", model=model, threshold=0.4)
    job.start()
    fractions = []
    while not job.run.finished:
        events = job.poll()
        fractions += [e.fraction for e in events if e.kind == "PROGRESS"]
        assert scene_state(mrml.scene) == before  # nothing written while the child runs
        time.sleep(0.05)
    assert job.run.state == SUCCEEDED, job.run.error + "\n" + "\n".join(job.run.log)
    assert job.run.stages_seen == list(STAGES)
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and np.all(np.diff(fractions) >= 0)
    assert scene_state(mrml.scene) == before
    # The child wrote only what the module reads: not the command line's file set (a gzipped
    # probability map, a .seg.nrrd, a label map, CSVs) that nobody would open.
    assert sorted(p.name for p in (tmp_path / "work" / "out").iterdir()) == ["probability.nrrd", "result.json"]

    result, seg, table, markups = job.finish()
    assert sorted(l.size_class for l in result.lesions) == ["large", "small"]  # the 4 and 7 mm spheres
    assert seg.GetSegmentation().GetNumberOfSegments() == 2 and table.GetNumberOfRows() == 2
    assert markups.GetNumberOfControlPoints() == 2
    kept = probability_of(seg)
    assert kept is not None and kept.shape == (6, 120, 140)
    labels, lesions = extract_lesions(kept, geometry_of_node(node), 0.4, 2.0, 10.0)
    np.testing.assert_array_equal(result.labels, labels)  # what a re-threshold at 0.4 would give
    summary = summary_of(seg)
    assert summary["model_id"] == "test-dark-spot" and summary["n_lesions"] == 2 and summary["seconds"] > 0
    job.cleanup()
    assert not (tmp_path / "work").exists()


def test_cancel_at_each_stage_kills_the_process_and_leaves_the_scene_as_it_was(mrml, tmp_path, model):
    """One run held in each stage, all four at once (a shorter test than one after another)."""
    node, _ = phantom_node((3, 60, 70), spheres_mm=[])
    # Earlier results in the scene, which a cancelled run must leave exactly as they are.
    probability = np.zeros((3, 60, 70), np.float32)
    probability[1, 20:26, 30:36] = 0.9
    geometry = geometry_of_node(node)
    labels, lesions = extract_lesions(probability, geometry, 0.4, 0.0, 10.0)
    seg, _, _ = write_result(LesionMap(probability, labels, lesions, geometry, 0.4, 0.0, 10.0), node)
    before = scene_state(mrml.scene)

    stages = ["model-load", "preprocessing", "inference", "lesion-extraction"]
    jobs = {}
    for stage in stages:
        env = {**os.environ, HOLD_ENV: stage, "OMP_NUM_THREADS": "1"}
        jobs[stage] = DetectionJob(node, tmp_path / stage, model=model, env=env)
        jobs[stage].start()
    deadline = time.monotonic() + STAGE_TIMEOUT_S
    while time.monotonic() < deadline and any(j.run.stage != s and not j.run.finished for s, j in jobs.items()):
        for job in jobs.values():
            job.poll()
        time.sleep(0.05)

    for stage, job in jobs.items():
        assert job.run.stage == stage and job.run.state == RUNNING and job.run.alive, job.run.error + "\n".join(job.run.log)
        assert job.run.stages_seen == list(STAGES[: STAGES.index(stage) + 1])
        job.cancel()
        assert job.run.state == CANCELLED and not job.run.alive, stage
        job.poll()
        assert job.run.state == CANCELLED  # the killed process's exit is not taken for a failure
        with pytest.raises(RuntimeError, match="cancelled"):
            job.finish(seg)
        assert scene_state(mrml.scene) == before, stage
        job.cleanup()
        assert not (tmp_path / stage).exists()


def test_input_deleted_during_the_run_ends_it_without_writing(mrml, tmp_path, model):
    node, _ = phantom_node((3, 60, 70))
    job = DetectionJob(node, tmp_path / "work", model=model)
    job.start()
    mrml.scene.RemoveNode(node)
    before = scene_state(mrml.scene)
    assert job.wait(STAGE_TIMEOUT_S) == SUCCEEDED, job.run.error
    with pytest.raises(InputGone):
        job.finish()
    assert scene_state(mrml.scene) == before
    job.cleanup()


def test_a_failing_worker_reports_its_error(mrml, tmp_path):
    node, _ = phantom_node((3, 60, 70))
    job = DetectionJob(node, tmp_path / "work", model=str(tmp_path / "no-such-model.safetensors"))
    job.start()
    assert job.wait(STAGE_TIMEOUT_S) == FAILED
    assert "no-such-model" in job.run.error and "FileNotFoundError" in job.run.error
    with pytest.raises(RuntimeError, match="failed"):
        job.finish()
    job.cleanup()


def test_a_phase_volume_reaches_the_candidate_stage_and_rejections_are_shown(mrml, tmp_path):
    """The module's optional phase input: a candidate the classifier calls a calcification is
    rejected with phase (and shown as a grey point named "calcification"), kept as a possible
    microbleed without it (magnitude cannot tell); a re-run empties the rejected points."""
    calc = constant_classifier(tmp_path / "calc.safetensors", keep_at=0.5, favourite="calcification")
    two_stage = str(save_dark_spot_model(tmp_path / "two-stage.safetensors", candidate_classifier=calc))
    node, spheres = phantom_node((6, 120, 140), spheres_mm=[((3, 60, 40), 4.0), ((3, 60, 100), 7.0)])
    geometry = geometry_of_node(node)
    phase = slicer.util.addVolumeFromArray(np.zeros((6, 120, 140), np.float32), geometry.ijk_to_ras(), "phase")

    def run(name, phase_node, segmentation=None):
        # phase_sign keep: a constant classifier gives `auto` no evidence for either sign.
        job = DetectionJob(node, tmp_path / name, model=two_stage, phase_volume_node=phase_node, phase_sign="keep")
        job.start()
        assert job.wait(STAGE_TIMEOUT_S) == SUCCEEDED, job.run.error + "\n" + "\n".join(job.run.log)
        try:
            return job.finish(segmentation)
        finally:
            job.cleanup()

    result, seg, _, _ = run("with phase", phase)
    summary = summary_of(seg)
    assert len(result.lesions) == 0 and seg.GetSegmentation().GetNumberOfSegments() == 0
    assert summary["candidate_stage"]["phase_used"] is True and summary["candidate_stage"]["n_rejected"] == 2
    rejected = seg.GetNodeReference(REJECTED_ROLE)
    assert rejected is not None and rejected.GetNumberOfControlPoints() == 2
    assert {rejected.GetNthControlPointLabel(i) for i in range(2)} == {"calcification"}
    sphere_ras = [geometry.ijk_to_ras() @ np.array([*centre[::-1], 1.0]) for centre, _ in spheres]
    for i in range(2):  # each grey point on one of the spheres
        point = np.array(rejected.GetNthControlPointPositionWorld(i))
        assert min(np.linalg.norm(point - c[:3]) for c in sphere_ras) < 1.0

    result, seg2, _, _ = run("magnitude only", None, seg)  # the same segmentation, reused
    assert seg2 is seg and len(result.lesions) == 2
    assert summary_of(seg)["candidate_stage"]["phase_used"] is False
    assert seg.GetNodeReference(REJECTED_ROLE) is rejected and rejected.GetNumberOfControlPoints() == 0


def test_a_phase_volume_on_another_grid_is_refused_before_anything_runs(mrml, tmp_path, model):
    node, _ = phantom_node((3, 60, 70), name="swi")
    other = slicer.util.addVolumeFromArray(np.zeros((3, 60, 71), np.float32), geometry_of_node(node).ijk_to_ras(), "phase")
    before = scene_state(mrml.scene)
    with pytest.raises(ValueError, match=r"phase volume 'phase' is not on the grid of 'swi'"):
        DetectionJob(node, tmp_path / "work", model=model, phase_volume_node=other)
    with pytest.raises(ValueError, match="both the SWI and the phase"):
        DetectionJob(node, tmp_path / "work2", model=model, phase_volume_node=node)
    assert scene_state(mrml.scene) == before and not (tmp_path / "work").exists()


def scanner_units_phase(shape) -> np.ndarray:
    return np.random.default_rng(0).uniform(-4096, 4096, shape).astype(np.float32)


def test_a_phase_in_scanner_units_is_refused_before_anything_runs(mrml, tmp_path, model):
    """The module already holds the phase array: it is checked before the input is written and
    before the child starts, and the message names the phase volume."""
    node, _ = phantom_node((3, 60, 70), name="swi")
    phase = slicer.util.addVolumeFromArray(scanner_units_phase((3, 60, 70)), geometry_of_node(node).ijk_to_ras(), "raw phase")
    before = scene_state(mrml.scene)
    with pytest.raises(ValueError, match=r"phase volume 'raw phase'.*radians"):
        DetectionJob(node, tmp_path / "work", model=model, phase_volume_node=phase)
    assert scene_state(mrml.scene) == before and not (tmp_path / "work").exists()


def test_the_worker_refuses_a_phase_in_scanner_units_before_the_network_runs(tmp_path, model):
    """The worker on its own (as a script would start it): the run fails naming the phase
    problem, and the stage markers show that it never reached inference."""
    from CMBDetectLib.detection.runner import WorkerRun, worker_arguments
    from CMBDetectLib.io import write_volume

    array, geometry, _ = phantom(shape=(3, 60, 70))
    write_volume(array, geometry, tmp_path / "input.nrrd", compress=False)
    write_volume(scanner_units_phase(array.shape), geometry, tmp_path / "phase.nrrd", compress=False)
    calc = constant_classifier(tmp_path / "calc.safetensors", keep_at=0.5)
    two_stage = str(save_dark_spot_model(tmp_path / "two-stage.safetensors", candidate_classifier=calc))
    arguments = worker_arguments(tmp_path / "input.nrrd", tmp_path / "out", "input", model=two_stage, phase_path=tmp_path / "phase.nrrd")
    run = WorkerRun(arguments, tmp_path / "out")
    run.start()
    assert run.wait(STAGE_TIMEOUT_S) == FAILED
    assert "radians" in run.error and "4096" in run.error
    assert "inference" not in run.stages_seen, run.stages_seen
    assert not (tmp_path / "out").exists()


def launcher(tmp_path) -> str:
    path = tmp_path / "PythonSlicer"
    path.write_text(LAUNCHER.format(python=sys.executable))
    path.chmod(0o755)
    return str(path)


def gone(pid: int) -> bool:
    """The process ended (a zombie waiting for its reaper has ended too: it runs nothing)."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_cancel_ends_the_worker_behind_a_launcher_and_it_writes_nothing(mrml, tmp_path, model):
    """Cancel kills the launcher and the interpreter it started: the grandchild holding the CPU
    (or GPU) must not run on and write its results into the work folder."""
    psutil = pytest.importorskip("psutil")
    node, _ = phantom_node((3, 60, 70))
    env = {**os.environ, HOLD_ENV: "inference", "OMP_NUM_THREADS": "1"}
    job = DetectionJob(node, tmp_path / "work", model=model, python=launcher(tmp_path), env=env)
    job.start()
    deadline = time.monotonic() + STAGE_TIMEOUT_S
    while job.run.stage != "inference" and not job.run.finished and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.05)
    assert job.run.stage == "inference", job.run.error + "\n".join(job.run.log)
    workers = psutil.Process(job.run.pid).children(recursive=True)
    assert [p.cmdline()[0] for p in workers] == [sys.executable]  # the launcher's child runs the worker
    worker = workers[0].pid

    job.cancel()
    deadline = time.monotonic() + STAGE_TIMEOUT_S
    while not gone(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(worker), "the worker behind the launcher is still running after Cancel"
    out = tmp_path / "work" / "out"
    assert not out.exists() or not any(out.iterdir())
    job.cleanup()


def test_the_worker_does_not_recreate_a_deleted_work_folder(tmp_path, model):
    """A second line of defence: a worker whose work folder was removed (the run was cancelled,
    the scene closed) fails instead of making the folder again and writing into it."""
    from CMBDetectLib.detection.runner import WorkerRun, worker_arguments
    from CMBDetectLib.io import write_volume

    array, geometry, _ = phantom(shape=(3, 60, 70))
    write_volume(array, geometry, tmp_path / "input.nrrd", compress=False)
    work = tmp_path / "work"  # never made, as if deleted by cleanup()
    run = WorkerRun(worker_arguments(tmp_path / "input.nrrd", work / "out", "input", model=model), work / "out")
    run.start()
    assert run.wait(STAGE_TIMEOUT_S) == FAILED
    assert not work.exists()


def test_a_two_stage_run_and_a_rethreshold_at_its_cut_give_the_command_lines_lesions(mrml, tmp_path):
    """The threshold names one quantity everywhere. With the candidate stage the command line
    keeps a candidate when P(microbleed) reaches the stage's cut; the module's run shows those
    lesions with their P(microbleed) and certainty (not a cut of the map at the slider's 0.4),
    its summary says so, and a re-threshold at that cut gives them back unchanged."""
    from CMBDetectLib.detection.pipeline import DetectionParams, detect_volume
    from CMBDetectLib.detection.rethreshold import BELOW_THRESHOLD
    from CMBDetectLib.mrml.nodes import volume_from_node
    from CMBDetectLib.mrml.results import rethreshold

    # Calcification favoured, no phase: both spheres kept, P(microbleed) about 0.84, "possible".
    calc = constant_classifier(tmp_path / "calc.safetensors", keep_at=0.5, favourite="calcification")
    two_stage = str(save_dark_spot_model(tmp_path / "two-stage.safetensors", candidate_classifier=calc))
    node, _ = phantom_node((6, 120, 140), spheres_mm=[((3, 60, 40), 4.0), ((3, 60, 100), 7.0)])
    cli = detect_volume(volume_from_node(node), DetectionParams(model=two_stage, device="cpu"), case="input")
    keep_at = cli.candidate_stage["keep_at"]
    assert cli.summary()["threshold"] == keep_at and cli.summary()["threshold_of"] == "p_microbleed"

    def verdicts(lesions):
        return [(l.id, l.n_voxels, l.size_class, l.centroid_ijk, round(l.p_microbleed, 6), l.certainty,
                 round(l.mean_probability, 6), round(l.max_probability, 6)) for l in lesions]  # fmt: skip

    job = DetectionJob(node, tmp_path / "work", model=two_stage, threshold=0.4)  # the slider's default
    job.start()
    assert job.wait(STAGE_TIMEOUT_S) == SUCCEEDED, job.run.error + "\n" + "\n".join(job.run.log)
    result, seg, table, _ = job.finish()
    assert sorted(p.name for p in job.run.out_dir.iterdir()) == ["probability.nrrd", "result.json"]  # the verdicts are in result.json
    job.cleanup()
    assert len(cli.lesions) == 2 and verdicts(result.lesions) == verdicts(cli.lesions)
    summary = summary_of(seg)
    assert (summary["threshold"], summary["threshold_of"], summary["n_lesions"]) == (keep_at, "p_microbleed", 2)
    columns = [table.GetTable().GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    shown = [(table.GetCellText(r, columns.index("p_microbleed")), table.GetCellText(r, columns.index("certainty"))) for r in range(2)]
    assert shown == [(str(round(l.p_microbleed, 4)), l.certainty) for l in cli.lesions]

    again, *_ = rethreshold(seg, keep_at, 2.0, 10.0)
    assert verdicts(again.lesions) == verdicts(cli.lesions) and summary_of(seg)["threshold"] == keep_at
    # Above both verdicts: no lesion, and both candidates are shown as rejected, saying why.
    above, *_ = rethreshold(seg, 0.9, 2.0, 10.0)
    rejected_points = seg.GetNodeReference(REJECTED_ROLE)
    assert above.lesions == [] and [c.reason for c in above.rejected] == [BELOW_THRESHOLD] * 2
    assert rejected_points.GetNumberOfControlPoints() == 2
    back, *_ = rethreshold(seg, keep_at, 2.0, 10.0)
    assert verdicts(back.lesions) == verdicts(cli.lesions) and rejected_points.GetNumberOfControlPoints() == 0
    # Below the candidate threshold the map is not P(microbleed): refused, the outputs unchanged.
    with pytest.raises(ValueError, match="P\\(microbleed\\)"):
        rethreshold(seg, cli.candidate_stage["candidate_threshold"] / 2, 2.0, 10.0)
    assert seg.GetSegmentation().GetNumberOfSegments() == 2


def test_a_job_in_a_temporary_folder_leaves_nothing_behind(mrml, tmp_path, model):
    """The module gives Slicer's temporary folder: each job makes its own folder there and
    removes it, so runs leave no empty folders behind."""
    node, _ = phantom_node((3, 60, 70))
    temporary = tmp_path / "slicer-temp"
    temporary.mkdir()
    job = DetectionJob(node, temp_dir=temporary, model=model)
    assert [p.parent for p in temporary.iterdir()] == [temporary] and job.work_dir.parent == temporary
    job.cleanup()
    assert list(temporary.iterdir()) == []


def test_the_operating_point_chosen_in_slicer_reaches_the_candidate_stage(mrml, tmp_path):
    """The module's Operating point combo (parameter node `operatingPoint`) goes to the worker:
    a classifier whose card keeps P >= 0.5 for review and 0.9 for count keeps its 0.84
    candidates at review only, and the segmentation's summary names the point."""
    import json

    from CMBDetectLib.mrml.job import DetectionJob

    calc = constant_classifier(tmp_path / "calc.safetensors", keep_at=0.5, favourite="calcification")
    card = json.loads(calc.with_suffix(".json").read_text())
    identity = {"x": [0.0, 1.0], "y": [0.0, 1.0]}
    card["calibration"] = {"no_phase": identity, "phase": identity}
    card["operating_points"] = {"default": "count", "review": {"no_phase": 0.5, "phase": 0.5}, "count": {"no_phase": 0.9, "phase": 0.9}}
    calc.with_suffix(".json").write_text(json.dumps(card))
    two_stage = str(save_dark_spot_model(tmp_path / "two-stage.safetensors", candidate_classifier=calc))
    node, _ = phantom_node((6, 120, 140), spheres_mm=[((3, 60, 40), 4.0), ((3, 60, 100), 7.0)])
    found = {}
    for point in ("review", "count"):
        job = DetectionJob(node, tmp_path / point, model=two_stage, operating_point=point)
        job.start()
        assert job.wait(STAGE_TIMEOUT_S) == SUCCEEDED, job.run.error + "\n" + "\n".join(job.run.log)
        result, seg, _, _ = job.finish()
        job.cleanup()
        stage = summary_of(seg)["candidate_stage"]
        assert (stage["operating_point"], stage["keep_at"]) == (point, 0.5 if point == "review" else 0.9)
        found[point] = len(result.lesions)
    assert found == {"review": 2, "count": 0}
