"""Cohorts: resume after a crash, local worker processes, a real Dask cluster, hostile case lists.

Small phantoms and the hand-wired dark-spot model keep each case well under a second, so the
cost here is starting processes: one 2-worker Dask LocalCluster for the module, one pool of
2 spawned processes, one killed command-line run.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from CMBDetectLib.cohort.batch import detect_batch
from CMBDetectLib.cohort.names import refuse_unsafe_and_duplicates, unsafe_name_reason
from CMBDetectLib.cohort.workers import DIE_ONCE_ENV, HOLD_ENV
from CMBDetectLib.commands.detect import main as detect_main
from CMBDetectLib.detection.records import every_output_path, output_paths
from CMBDetectLib.detection.pipeline import DetectionParams
from CMBDetectLib.io import Geometry, write_volume
from handmade import constant_classifier, phantom, save_dark_spot_model

CASES = ["c0", "c1", "c2", "c3"]
SHAPE = (3, 100, 120)
HOLD = 30.0  # seconds a held case waits before writing (test_workers_die_with_a_killed_parent...)
# Compared byte for byte: the label map, the probability map (same model, same input:
# deterministic) and the lesion table; the .seg.nrrd too, but for the date pynrrd writes
# into its header comment; the summary JSON with its timing masked.
EXACT = ("labels", "probability", "lesions_csv")


def make_case(path: Path, seed: int) -> None:
    g = Geometry((0.5, 0.5, 2.0), (float(seed), -3.0, 1.5))
    rows, cols = SHAPE[1:]
    spheres = [((1, rows // 2, cols // 2 - 25 + 3 * seed), 4.0), ((1, rows // 2 + 20, cols // 2 + 25), 6.0)]
    array, _, _ = phantom(shape=SHAPE, geometry=g, spheres_mm=spheres, seed=seed)
    write_volume(array, g, path)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Four cases and a junk file in `in/`, the model, and the serial run of them all."""
    root = tmp_path_factory.mktemp("cohort")
    for seed, case in enumerate(CASES):
        make_case(root / "in" / f"{case}.nii.gz", seed)
    (root / "in" / "junk.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    model = str(save_dark_spot_model(root / "model" / "dark-spot.safetensors", base_channels=2))
    code = detect_main([str(root / "in"), "-o", str(root / "serial"), "--model", model, "-q"])
    assert code == 1  # junk fails; the others are done
    return root, model


def table(out: Path) -> dict[str, dict]:
    return {r["case"]: r for r in csv.DictReader(open(out / "cmbdetect_batch.csv"))}


def masked_summary(path: Path) -> dict:
    summary = json.loads(path.read_text())
    summary.pop("seconds")
    return summary


def assert_same_outputs(a: Path, b: Path, case_a: str, case_b: str | None = None) -> None:
    pa, pb = output_paths(a, case_a), output_paths(b, case_b or case_a)
    for key in EXACT:
        assert pa[key].read_bytes() == pb[key].read_bytes(), f"{case_a}: {key} differs"
    undated = [b"".join(ln for ln in p["segmentation"].read_bytes().splitlines(True) if not ln.startswith(b"#")) for p in (pa, pb)]
    assert undated[0] == undated[1], f"{case_a}: segmentation differs"
    sa, sb = masked_summary(pa["summary"]), masked_summary(pb["summary"])
    if case_b:
        sa.pop("case"), sb.pop("case")
        sa.pop("files"), sb.pop("files")
    assert sa == sb


def no_debris(out: Path) -> bool:
    return not any(p.name.startswith(".") for p in out.iterdir())


# --- hostile names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, problem",
    [
        ("../../x", "path separator"), ("a\\b", "path separator"), ("..", ".."), ("x..y", ".."),
        (".hidden", "starts with a dot"), ("bell\x07", "control characters"), ("new\nline", "control characters"),
        ("", "empty"), ("   ", "empty"), (" pad", "white space"), ("C:x", "':'"), ("n" * 300, "longer"),
    ],
)  # fmt: skip
def test_unsafe_case_names_are_refused_with_their_reason(name, problem):
    reason = unsafe_name_reason(name)
    assert reason is not None and problem in reason


def test_ordinary_names_pass_and_duplicates_are_caught_ignoring_case():
    assert all(unsafe_name_reason(n) is None for n in ("sub-01_ses-2", "ADNI_002_S_0295", "café", "a.b"))
    assert refuse_unsafe_and_duplicates(["a", "b", "A", "c"]).keys() == {0, 2}


def test_hostile_case_list_writes_nothing_outside_the_output_folder(tmp_path, cohort):
    root, model = cohort
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(root / "in" / "c0.nii.gz", work / "vol.nii.gz")
    names = ["../escaped", "../../escaped2", "sub/dir", ".hidden", "bell\x07", "   ", "..", "dup", "DUP", "good"]
    with open(work / "cases.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "image"])
        w.writerows([n, "vol.nii.gz"] for n in names)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    code = detect_main([str(work / "cases.csv"), "-o", str(work / "out"), "--model", model, "-q"])
    assert code == 1
    after = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if "out" not in p.relative_to(tmp_path).parts[1:2])
    assert after == before, "something was written outside the output folder"
    outputs = sorted(p.name for p in (work / "out").iterdir())
    assert outputs == sorted([*(p.name for p in output_paths(work / "out", "good", registration=True).values()), "cmbdetect_batch.csv"])
    rows = list(csv.DictReader(open(work / "out" / "cmbdetect_batch.csv")))
    assert len(rows) == len(names)
    by_case = {r["case"]: r for r in rows}
    assert by_case["good"]["status"] == "done"
    expected = {
        "../escaped": "path separator", "../../escaped2": "path separator", "sub/dir": "path separator",
        ".hidden": "starts with a dot", "bell\\x07": "control characters", "   ": "empty", "..": "'..'",
        "dup": "used by 2 entries", "DUP": "used by 2 entries",
    }  # fmt: skip
    for case, problem in expected.items():
        row = by_case[case]
        assert row["status"] == "refused" and row["ok"] == "False", case
        assert "refused" in row["error"] and problem in row["error"], (case, row["error"])


# --- resume ----------------------------------------------------------------------------------


def test_rerun_skips_done_cases_and_redoes_failed_and_changed_ones(tmp_path, cohort):
    root, model = cohort
    inputs = [str(root / "in" / "c0.nii.gz"), str(root / "in" / "c1.nii.gz"), str(tmp_path / "c3.nii.gz")]
    out = tmp_path / "out"
    assert detect_main([*inputs, "-o", str(out), "--model", model, "-q"]) == 1  # c3 is missing: fails
    assert table(out)["c3"]["status"] == "failed"
    stamps = {c: output_paths(out, c)["summary"].stat().st_mtime_ns for c in ("c0", "c1")}

    shutil.copy(root / "in" / "c3.nii.gz", tmp_path / "c3.nii.gz")  # now there: the failed case is redone
    assert detect_main([*inputs, "-o", str(out), "--model", model, "-q"]) == 0
    rows = table(out)
    assert {c: rows[c]["status"] for c in ("c0", "c1", "c3")} == {"c0": "skipped", "c1": "skipped", "c3": "done"}
    assert rows["c0"]["n_lesions"] == str(json.loads(output_paths(out, "c0")["summary"].read_text())["n_lesions"])
    assert {c: output_paths(out, c)["summary"].stat().st_mtime_ns for c in ("c0", "c1")} == stamps  # untouched
    assert_same_outputs(out, root / "serial", "c3")

    # A changed parameter changes the fingerprint: the case is redone.
    one = [inputs[0], "-o", str(out), "--model", model, "-q", "--threshold", "0.6"]
    old = json.loads(output_paths(out, "c0")["summary"].read_text())["params_fingerprint"]
    assert detect_main(one) == 0 and table(out)["c0"]["status"] == "done"
    summary = json.loads(output_paths(out, "c0")["summary"].read_text())
    assert summary["params_fingerprint"] != old and summary["params_fingerprinted"]["threshold"] == 0.6
    # Asking for a preview redoes a case that has none; --force redoes everything.
    assert detect_main([*one, "--preview"]) == 0 and table(out)["c0"]["status"] == "done"
    assert detect_main(one) == 0 and table(out)["c0"]["status"] == "skipped"
    assert detect_main([*one, "--force"]) == 0 and table(out)["c0"]["status"] == "done"


def test_a_changed_candidate_classifier_redoes_the_case(tmp_path, cohort):
    """The classifier decides the result as much as the detector: its weights are fingerprinted
    by sha256, also when its card records none (the file's own sha256 then)."""
    from CMBDetectLib.detection.outputs import output_paths as paths_of

    root, model = cohort
    clf = tmp_path / "clf" / "c.safetensors"
    constant_classifier(clf, keep_at=0.5, favourite="microbleed")
    one = [str(root / "in" / "c0.nii.gz"), "-o", str(tmp_path / "out"), "--model", model, "--candidate-model", str(clf), "-q"]
    assert detect_main(one) == 0 and table(tmp_path / "out")["c0"]["status"] == "done"
    assert detect_main(one) == 0 and table(tmp_path / "out")["c0"]["status"] == "skipped"
    rejected = paths_of(tmp_path / "out", "c0", rejected=True)["rejected_csv"]
    assert list(csv.DictReader(open(rejected))) == []

    constant_classifier(clf, keep_at=0.5, favourite="vein")  # same path, id and version; other weights
    assert detect_main(one) == 0 and table(tmp_path / "out")["c0"]["status"] == "done"
    assert {r["reason"] for r in csv.DictReader(open(rejected))} == {"vein"}

    card = json.loads(clf.with_suffix(".json").read_text())
    del card["sha256"]  # a hand-made card: the weights are fingerprinted by the file itself
    clf.with_suffix(".json").write_text(json.dumps(card))
    assert detect_main(one) == 0 and table(tmp_path / "out")["c0"]["status"] == "skipped"
    constant_classifier(clf, keep_at=0.5, favourite="microbleed")
    clf.with_suffix(".json").write_text(json.dumps(card))
    assert detect_main(one) == 0 and table(tmp_path / "out")["c0"]["status"] == "done"
    assert list(csv.DictReader(open(rejected))) == []


def test_a_redo_leaves_no_file_of_the_earlier_run(tmp_path, cohort):
    """A case redone with other options keeps none of the files the earlier run wrote and this
    one does not (a stale `_rejected.csv` beside a single-stage result, say)."""
    root, model = cohort
    out = tmp_path / "out"
    clf = constant_classifier(tmp_path / "veins.safetensors", keep_at=0.5, favourite="vein")
    case = [str(root / "in" / "c0.nii.gz"), "-o", str(out), "--model", model, "-q"]
    assert detect_main([*case, "--candidate-model", str(clf), "--preview"]) == 0
    everything = every_output_path(out, "c0")  # the one list that clearing a case reads: nothing missing
    assert sorted(p.name for p in out.iterdir()) == sorted([*(p.name for p in everything.values()), "cmbdetect_batch.csv"])

    assert detect_main([*case, "--single-stage"]) == 0 and table(out)["c0"]["status"] == "done"
    now = output_paths(out, "c0", registration=True)
    assert sorted(p.name for p in out.iterdir()) == sorted([*(p.name for p in now.values()), "cmbdetect_batch.csv"])
    assert set(json.loads(now["summary"].read_text())["files"].values()) == {p.name for p in now.values()}


def test_debris_and_partial_outputs_of_a_killed_case_are_cleared(tmp_path, cohort):
    root, model = cohort
    out = tmp_path / "out"
    shutil.copytree(root / "serial", out)
    # As a run killed while writing c1 leaves it: its staging folder, and files moved before the summary.
    (out / ".cmbdetect-c1-k2j4x9ab").mkdir()
    (out / ".cmbdetect-c1-k2j4x9ab" / "c1_prob.nii.gz").write_bytes(b"half")
    output_paths(out, "c1")["summary"].unlink()
    output_paths(out, "c1")["lesions_csv"].write_text("torn")
    (out / ".cmbdetect-other-k2j4x9ab").mkdir()  # another batch's case, maybe being written now: not ours
    assert detect_main([str(root / "in" / f"{c}.nii.gz") for c in CASES] + ["-o", str(out), "--model", model, "-q"]) == 0
    rows = table(out)
    assert rows["c1"]["status"] == "done" and {rows[c]["status"] for c in ("c0", "c2", "c3")} == {"skipped"}
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".cmbdetect-other-k2j4x9ab"]
    assert_same_outputs(out, root / "serial", "c1")


def test_staging_folders_are_recognised_by_case(tmp_path, monkeypatch):
    """The debris rule reads the case from the staging folder's name, as outputs.py makes it."""
    import numpy as np
    import tempfile

    from CMBDetectLib.cohort.resume import staging_case
    from CMBDetectLib.detection import outputs
    from CMBDetectLib.detection.pipeline import DetectionResult

    made = []
    real = tempfile.mkdtemp
    monkeypatch.setattr(outputs.tempfile, "mkdtemp", lambda *a, **kw: made.append(real(*a, **kw)) or made[-1])
    g = Geometry((0.5, 0.5, 2.0), (0.0, 0.0, 0.0))
    empty = DetectionResult(np.zeros((3, 8, 8), np.float32), np.zeros((3, 8, 8), np.uint16), [], g, "m", "1", False, 0.0)
    outputs.write_case_outputs(empty, tmp_path, "sub-01_ses-2")
    staged = [p for p in made if Path(p).parent == tmp_path]  # not the scratch folders inside it
    assert [staging_case(Path(p).name) for p in staged] == ["sub-01_ses-2"]
    assert staging_case(".cmbdetect-x") is None and staging_case("sub-01_summary.json") is None


def test_a_batch_killed_half_way_finishes_only_the_missing_cases(tmp_path, cohort):
    root, model = cohort
    out = tmp_path / "out"
    cases = CASES[:3]
    inputs = [str(root / "in" / f"{c}.nii.gz") for c in cases]
    command = [sys.executable, "-m", "CMBDetectLib.cli", "detect", *inputs, "-o", str(out), "--model", model, "-q"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Kill as soon as the first case is complete: while a later case runs or is being staged.
        while not any(output_paths(out, c)["summary"].exists() for c in cases) and proc.poll() is None:
            time.sleep(0.005)

        def staging_or_second_case() -> bool:
            names = [p.name for p in out.iterdir()]
            return any(n.startswith(".cmbdetect-") for n in names) or sum(n.endswith("_summary.json") for n in names) >= 2

        while proc.poll() is None and not staging_or_second_case():
            time.sleep(0.001)  # the next case's staging folder, so the kill leaves debris (usually)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the batch finished before it could be killed"
    done_before = {c for c in cases if output_paths(out, c)["summary"].exists()}
    assert 1 <= len(done_before) < len(cases)
    stamps = {c: output_paths(out, c)["summary"].stat().st_mtime_ns for c in done_before}

    assert detect_main([*inputs, "-o", str(out), "--model", model, "-q"]) == 0
    rows = table(out)
    assert {c for c in cases if rows[c]["status"] == "skipped"} == done_before
    assert {c for c in cases if rows[c]["status"] == "done"} == set(cases) - done_before
    assert {c: output_paths(out, c)["summary"].stat().st_mtime_ns for c in done_before} == stamps
    assert no_debris(out), sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    for case in cases:
        assert_same_outputs(out, root / "serial", case)


# --- local worker processes -------------------------------------------------------------------


def test_local_workers_match_the_serial_run_and_survive_a_dead_worker(tmp_path, cohort, monkeypatch):
    root, model = cohort
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("c0.nii.gz", "c1.nii.gz", "junk.nii.gz"):
        shutil.copy(root / "in" / name, inputs / name)
    shutil.copy(root / "in" / "c2.nii.gz", inputs / "victim.nii.gz")
    marker = tmp_path / "victim-died"
    monkeypatch.setenv(DIE_ONCE_ENV, f"victim:{marker}")  # spawned workers inherit the environment
    out = tmp_path / "out"
    assert detect_main([str(inputs), "-o", str(out), "--model", model, "-q", "--workers", "2"]) == 1
    assert marker.exists(), "the worker running victim did not die"
    rows = table(out)
    assert rows["junk"]["status"] == "failed"
    assert {rows[c]["status"] for c in ("c0", "c1", "victim")} == {"done"}
    for case in ("c0", "c1"):
        assert_same_outputs(out, root / "serial", case)
    assert_same_outputs(out, root / "serial", "victim", "c2")
    assert no_debris(out), sorted(p.name for p in out.iterdir() if p.name.startswith("."))


def test_workers_die_with_a_killed_parent_and_write_nothing_after(tmp_path, cohort):
    """SIGKILL the parent of `--workers 2` while both workers are in the middle of a case (each
    holds for HOLD seconds before writing): the workers go at once, not when their case is
    done, and none of those cases' files appears."""
    psutil = pytest.importorskip("psutil")
    root, model = cohort
    held, out = tmp_path / "held", tmp_path / "out"
    held.mkdir()
    inputs = [str(root / "in" / f"{c}.nii.gz") for c in CASES[:3]]
    env = {**os.environ, HOLD_ENV: f"{HOLD}:{held}"}
    command = [sys.executable, "-m", "CMBDetectLib.cli", "detect", *inputs, "-o", str(out), "--model", model, "-q", "--workers", "2"]
    parent = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    descendants = []
    try:
        deadline = time.monotonic() + 120  # two spawned workers import torch and load the model
        while len(list(held.iterdir())) < 2 and parent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(list(held.iterdir())) == 2, "the workers never started their cases"
        descendants = psutil.Process(parent.pid).children(recursive=True)
        workers = {int(p.read_text()) for p in held.iterdir()}
        assert workers <= {p.pid for p in descendants}
        parent.send_signal(signal.SIGKILL)
        parent.wait()

        def alive() -> list:
            left = []
            for p in descendants:
                try:
                    if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                        left.append(p)
                except psutil.NoSuchProcess:
                    pass
            return left

        deadline = time.monotonic() + HOLD / 3  # well before any held case could go on to write
        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(), f"still running after their parent was killed: {[p.pid for p in alive()]}"
        time.sleep(1.0)
        assert not any(p.name.endswith("_summary.json") for p in out.iterdir()), sorted(p.name for p in out.iterdir())
    finally:
        for p in descendants:  # a failing run must not leave them behind
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


# --- a real Dask cluster ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    distributed = pytest.importorskip("distributed")
    marker = tmp_path_factory.mktemp("marker") / "victim-died"
    old = os.environ.get(DIE_ONCE_ENV)
    os.environ[DIE_ONCE_ENV] = f"victim:{marker}"  # the two worker processes inherit it as they start
    try:
        local = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=40)
    finally:  # then gone again: nothing in this process may die of it
        if old is None:
            os.environ.pop(DIE_ONCE_ENV, None)
        else:
            os.environ[DIE_ONCE_ENV] = old
    with local, distributed.Client(local) as client:
        yield client, marker


def test_dask_cluster_gives_the_serial_outputs_and_a_failing_case_stops_nothing(tmp_path, cohort, cluster):
    root, model = cohort
    client, _ = cluster
    out = tmp_path / "out"
    address = client.scheduler.address  # as a user passes it: --scheduler tcp://host:port
    assert detect_main([str(root / "in"), "-o", str(out), "--model", model, "-q", "--scheduler", address]) == 1
    rows = list(csv.DictReader(open(out / "cmbdetect_batch.csv")))
    assert [r["case"] for r in rows] == ["c0", "c1", "c2", "c3", "junk"]  # input order, whatever the finishing order
    by_case = {r["case"]: r for r in rows}
    assert by_case["junk"]["status"] == "failed" and "cannot read" in by_case["junk"]["error"]
    assert all(by_case[c]["status"] == "done" for c in CASES)
    for case in CASES:
        assert_same_outputs(out, root / "serial", case)
    assert no_debris(out), sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    # The same batch again, through a client object: skipped from the summaries, junk tried again.
    again = detect_batch([root / "in"], out, DetectionParams(model=model), show_progress=False, scheduler=client)
    assert [o.status for o in again] == ["skipped"] * 4 + ["failed"]


def test_scheduler_without_dask_is_refused_clearly(tmp_path, cohort, monkeypatch, capsys):
    root, model = cohort
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if Dask were not installed
    code = detect_main([str(root / "in" / "c0.nii.gz"), "-o", str(tmp_path / "out"), "--model", model, "--scheduler", "tcp://x:1"])
    assert code == 2 and "pip install 'dask[distributed]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_dask_case_whose_worker_dies_is_rerun_on_another_and_completes(tmp_path, cohort, cluster):
    root, model = cohort
    client, marker = cluster
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(root / "in" / "c1.nii.gz", inputs / "victim.nii.gz")
    shutil.copy(root / "in" / "c3.nii.gz", inputs / "c3.nii.gz")
    out = tmp_path / "out"
    outcomes = detect_batch([inputs], out, DetectionParams(model=model), show_progress=False, scheduler=client)
    assert marker.exists(), "the worker running victim did not die"
    with pytest.raises(ProcessLookupError):
        os.kill(int(marker.read_text()), 0)  # that process is gone: the case completed in another
    assert [(o.case, o.status) for o in outcomes] == [("c3", "done"), ("victim", "done")]
    assert_same_outputs(out, root / "serial", "victim", "c1")
    assert_same_outputs(out, root / "serial", "c3")
    assert no_debris(out), sorted(p.name for p in out.iterdir() if p.name.startswith("."))
