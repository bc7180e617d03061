"""Reading and writing hold up against damaged files, odd grids, full disks and bad case lists.

Everything here runs on real files. The disk-full cases mount a real tmpfs of a few hundred
KiB (root or CAP_SYS_ADMIN is needed; without it they are skipped and say why) and one test
uses a file-size limit in a child process instead (EFBIG, the same class of failure), which
works anywhere.
"""

from __future__ import annotations

import csv
import gzip
import os
import shutil
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import nibabel
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk

from CMBDetectLib.commands.detect import main as detect_main
from CMBDetectLib.detection.outputs import output_paths
from CMBDetectLib.errors import CaseError
from CMBDetectLib.io import Geometry, read_volume, write_volume
from handmade import phantom, save_dark_spot_model

FLAT = Geometry((0.5, 0.5, 2.0), (0.0, 0.0, 0.0))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(save_dark_spot_model(tmp_path_factory.mktemp("model") / "dark-spot.safetensors", base_channels=2))


def good_case(path: Path, shape=(6, 120, 140), seed: int = 0) -> np.ndarray:
    array, _, _ = phantom(shape=shape, geometry=FLAT, seed=seed)
    write_volume(array, FLAT, path)
    return array


def table(out: Path) -> dict[str, dict]:
    with open(out / "cmbdetect_batch.csv", newline="") as f:
        return {r["case"]: r for r in csv.DictReader(f)}


def cut(path: Path, keep: float = 2 / 3) -> None:
    """Keep the first `keep` of the file's bytes, as an interrupted copy or download does."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def fully_readable(path: Path) -> bool:
    """Read every voxel with a reader other than ours: nibabel for NIfTI, pynrrd for NRRD."""
    try:
        if path.name.endswith((".nii", ".nii.gz")):
            np.asanyarray(nibabel.load(str(path)).dataobj)
        else:
            nrrd.read(str(path))
        return True
    except Exception:
        return False


# --- a small real disk ------------------------------------------------------------------------


@contextmanager
def small_disk(where: Path, size_kib: int):
    """A tmpfs of `size_kib` KiB mounted at `where`, or the test is skipped with the reason."""
    where.mkdir(parents=True, exist_ok=True)
    mount = shutil.which("mount")
    if mount is None:
        pytest.skip("no mount command: cannot make a small disk to fill")
    done = subprocess.run([mount, "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({done.stderr.strip() or done.returncode}); the file-size-limit test covers the same failure")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], capture_output=True)


def leave_free(disk: Path, free_bytes: int) -> None:
    """Fill `disk` until about `free_bytes` are left (tmpfs counts whole 4 KiB pages)."""
    filler = disk / "filler"
    filler.unlink(missing_ok=True)
    st = os.statvfs(disk)
    size = st.f_bavail * st.f_frsize - free_bytes
    if size > 0:
        with open(filler, "wb") as f:
            f.write(b"\0" * size)


# --- item 3: truncated files, every pixel type ------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha"])
def test_truncated_volume_is_refused_by_name(tmp_path, dtype, suffix):
    array = (np.random.default_rng(0).random((20, 64, 64)) * 200).astype(dtype)
    path = tmp_path / f"cut{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path), useCompression=suffix != ".nii")
    cut(path)
    with pytest.raises(CaseError, match=r"^cut: file is truncated: .* holds \d+ of the \d+ bytes"):
        read_volume(path)


def test_gzip_of_several_members_is_complete_and_read(tmp_path):
    """A .nii.gz made by a parallel gzip (bgzip, pigz -i) holds several gzip members: the
    trailer of the last one gives its own length only. It is complete and must be read."""
    array = (np.random.default_rng(1).random((10, 40, 50)) * 900).astype(np.int16)
    plain = tmp_path / "plain.nii"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(plain))
    data = plain.read_bytes()
    (tmp_path / "members.nii.gz").write_bytes(gzip.compress(data[:10000]) + gzip.compress(data[10000:]))
    np.testing.assert_array_equal(read_volume(tmp_path / "members.nii.gz").array, array.astype(np.float32))


# --- item 4: spacing --------------------------------------------------------------------------


@pytest.mark.parametrize("spacing, shown", [((0.01, 0.5, 0.5), "0.01 x 0.5 x 0.5"), ((0.5, 0.5, 25.0), "0.5 x 0.5 x 25")])
def test_spacing_outside_what_a_scanner_makes_is_refused(tmp_path, spacing, shown):
    write_volume(np.ones((4, 20, 20), np.float32), Geometry(spacing, (0, 0, 0)), tmp_path / "odd.nii.gz")
    with pytest.raises(CaseError, match=rf"^odd: voxel spacing {shown} mm .*0.05 to 20 mm"):
        read_volume(tmp_path / "odd.nii.gz")


def test_spacing_at_the_limits_is_read(tmp_path):
    write_volume(np.ones((4, 20, 20), np.float32), Geometry((0.05, 0.5, 20.0), (0, 0, 0)), tmp_path / "edge.nii.gz")
    assert read_volume(tmp_path / "edge.nii.gz").geometry.spacing == pytest.approx((0.05, 0.5, 20.0))


# --- item 5: direction ------------------------------------------------------------------------


def sheared_nrrd(path: Path, shear: float) -> None:
    header = (
        "NRRD0004\ntype: short\ndimension: 3\nsizes: 8 8 4\nencoding: raw\nendian: little\n"
        f"space: left-posterior-superior\nspace directions: (1,0,0) ({shear},1,0) (0,0,2)\nspace origin: (0,0,0)\n\n"
    )
    path.write_bytes(header.encode() + np.arange(256, dtype="<i2").tobytes())


def test_direction_that_is_not_orthonormal_is_refused(tmp_path):
    sheared_nrrd(tmp_path / "shear.nrrd", 0.3)
    with pytest.raises(CaseError, match=r"^shear: the direction matrix is not orthonormal"):
        read_volume(tmp_path / "shear.nrrd")


def test_direction_rounded_as_scanners_write_it_is_read(tmp_path):
    sheared_nrrd(tmp_path / "rounded.nrrd", 2e-6)  # rounding in the header, far below 1e-4
    assert read_volume(tmp_path / "rounded.nrrd").shape == (4, 8, 8)


# --- items 3 and 10: a batch with truncated files goes on --------------------------------------


def test_truncated_cases_fail_by_name_and_the_batch_goes_on(tmp_path, model):
    cases = tmp_path / "in"
    array = good_case(cases / "c_good.nii.gz")
    write_volume(array, FLAT, cases / "a_float.nii.gz")  # float32: nibabel's NaN check reads it too
    write_volume(array.astype(np.int16), FLAT, cases / "b_int.nii.gz")  # the usual scanner type
    cut(cases / "a_float.nii.gz")
    cut(cases / "b_int.nii.gz")
    out = tmp_path / "out"
    for _ in range(2):  # and a rerun does the same, rather than crashing at the same file
        assert detect_main([str(cases), "-o", str(out), "--model", model, "-q"]) == 1
        rows = table(out)
        assert rows["c_good"]["status"] in ("done", "skipped")
        for case in ("a_float", "b_int"):
            assert rows[case]["status"] == "failed" and rows[case]["error"].startswith(f"{case}: file is truncated")
            assert not any(out.glob(f"{case}*"))


# --- item 11: full disks ----------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha"])
def test_write_on_a_full_disk_fails_and_leaves_the_old_file(tmp_path, suffix):
    array = (np.random.default_rng(2).random((40, 100, 100)) * 1000).astype(np.int16)  # 800 kB
    with small_disk(tmp_path / "disk", 1024) as disk:
        target = disk / f"x{suffix}"
        target.write_bytes(b"the previous, complete version")
        leave_free(disk, 200 * 1024)
        with pytest.raises(OSError, match=f"x{suffix}"):
            write_volume(array, FLAT, target)
        assert sorted(p.name for p in disk.iterdir()) == ["filler", f"x{suffix}"]  # no temporary left
        assert target.read_bytes() == b"the previous, complete version"


CHILD_WRITE = textwrap.dedent(
    """
    import resource, signal, sys
    import numpy as np
    from CMBDetectLib.io import Geometry, write_volume
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit: EFBIG, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
    array = (np.random.default_rng(2).random((40, 100, 100)) * 1000).astype(np.int16)
    try:
        write_volume(array, Geometry((1, 1, 1), (0, 0, 0)), sys.argv[1])
    except OSError as exc:
        print("OSError:", exc)
        sys.exit(3)
    """
)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_write_past_a_file_size_limit_fails_and_leaves_nothing(tmp_path, suffix):
    target = tmp_path / f"limited{suffix}"
    done = subprocess.run([sys.executable, "-c", CHILD_WRITE, str(target)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stdout + done.stderr
    assert f"limited{suffix}" in done.stdout
    assert list(tmp_path.iterdir()) == []


def test_synth_on_a_full_disk_says_so_and_leaves_no_truncated_image(tmp_path):
    from CMBDetectLib.cli import main as cli_main

    with small_disk(tmp_path / "disk", 256) as disk:
        leave_free(disk, 48 * 1024)  # less than one compressed synthetic image
        code = cli_main(["synth", "--n", "1", "--controls", "0", "--matrix", "64x64", "--slices", "12", "--out", str(disk / "out"), "--quiet"])
        assert code == 2
        volumes = [p for p in (disk / "out").rglob("*") if p.is_file() and not p.name.startswith(".") and p.name.endswith(".nii.gz")]
        assert all(fully_readable(p) for p in volumes), [p.name for p in volumes if not fully_readable(p)]
        assert not any(p.name.startswith(".") for p in (disk / "out").rglob("*"))


def test_batch_table_is_replaced_whole_or_not_at_all(tmp_path, model, capsys):
    good_case(tmp_path / "in" / "c.nii.gz")
    with small_disk(tmp_path / "disk", 512) as disk:
        out = disk / "out"
        assert detect_main([str(tmp_path / "in"), "-o", str(out), "--model", model, "-q"]) == 0
        before = (out / "cmbdetect_batch.csv").read_bytes()
        leave_free(disk, 0)
        # The rerun skips c and lists 80 missing cases: a table of several pages, more than the
        # one page that truncating the old table in place would free.
        missing = [str(tmp_path / f"missing-{i:02d}.nii.gz") for i in range(80)]
        code = detect_main([str(tmp_path / "in"), *missing, "-o", str(out), "--model", model, "-q"])
        assert code == 1
        assert (out / "cmbdetect_batch.csv").read_bytes() == before
        assert "error: cannot write the batch table" in capsys.readouterr().err
        assert not any(p.name.startswith(".") for p in out.iterdir())


def test_cases_on_a_filling_disk_are_complete_or_failed_and_the_batch_goes_on(tmp_path, model):
    """Whichever write the disk fills up in, each case is complete or absent and reported."""
    for i in range(3):
        good_case(tmp_path / "in" / f"c{i}.nii.gz", shape=(4, 100, 120), seed=i)
    with small_disk(tmp_path / "disk", 512) as disk:
        for free_kib in (0, 4, 8, 12, 16, 24, 32, 48):
            out = disk / "out"
            shutil.rmtree(out, ignore_errors=True)
            (disk / "filler").unlink(missing_ok=True)
            out.mkdir()
            leave_free(disk, free_kib * 1024)
            code = detect_main([str(tmp_path / "in"), "-o", str(out), "--model", model, "-q"])  # never raises
            assert code in (0, 1)
            for i in range(3):
                paths = output_paths(out, f"c{i}")
                present = [p for p in paths.values() if p.exists()]
                if paths["summary"].exists():
                    assert all(fully_readable(paths[k]) for k in ("segmentation", "labels", "probability")), (free_kib, i)
                else:
                    assert present == [], (free_kib, i, present)
            assert not any(p.name.startswith(".") for p in out.iterdir()), free_kib


def test_nifti_write_error_message_only_for_a_write_that_fails(tmp_path, model, capfd):
    """niftilib (inside ITK's NIfTI writer) prints `** ERROR: NWAD: wrote only ...` when a write
    runs out of space, but returns as if it had succeeded. A case that completes must not print
    it, and a case whose write printed it must fail."""
    good_case(tmp_path / "in" / "big.nii.gz", shape=(16, 256, 256))  # a 2 MiB uncompressed uint16 map
    with small_disk(tmp_path / "disk", 1536) as disk:
        code = detect_main([str(tmp_path / "in"), "-o", str(disk / "out"), "--model", model, "-q"])
        err = capfd.readouterr().err
        assert code == 0 and table(disk / "out")["big"]["status"] == "done"
        assert "NWAD" not in err


# --- item 14: case lists, models, links -------------------------------------------------------


@pytest.mark.parametrize(
    "text, problem",
    [("", "is empty"), ("case,image\n", "has no rows"), ("case,scan\nx,x.nii.gz\n", "needs a column named image")],
)
def test_bad_case_list_is_an_error_line(tmp_path, model, capsys, text, problem):
    (tmp_path / "list.csv").write_text(text)
    assert detect_main([str(tmp_path / "list.csv"), "-o", str(tmp_path / "out"), "--model", model, "-q"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after the untrained model's warning
    assert last.startswith("error: ") and "list.csv" in last and problem in last
    assert not (tmp_path / "out").exists()


def test_missing_case_list_is_an_error_line(tmp_path, model, capsys):
    assert detect_main([str(tmp_path / "nowhere.csv"), "-o", str(tmp_path / "out"), "--model", model, "-q"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("error: ") and "nowhere.csv" in last


def test_corrupt_model_file_is_an_error_line(tmp_path, model, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01 not a safetensors file")
    shutil.copy(Path(model).with_suffix(".json"), bad.with_suffix(".json"))
    good_case(tmp_path / "c.nii.gz")
    assert detect_main([str(tmp_path / "c.nii.gz"), "-o", str(tmp_path / "out"), "--model", str(bad), "-q"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("error: ") and "bad.safetensors" in last


def test_empty_image_cell_is_refused_by_row_and_the_others_run(tmp_path, model):
    good_case(tmp_path / "data" / "x1.nii.gz")
    (tmp_path / "cases.csv").write_text("case,image\nsubject-1,data/x1.nii.gz\nsubject-2,\n")
    assert detect_main([str(tmp_path / "cases.csv"), "-o", str(tmp_path / "out"), "--model", model, "-q"]) == 1
    rows = table(tmp_path / "out")
    assert rows["subject-1"]["status"] == "done"
    assert rows["subject-2"]["status"] == "refused"
    assert "row 3" in rows["subject-2"]["error"] and "image cell is empty" in rows["subject-2"]["error"]


def test_dangling_and_looping_links_are_reported(tmp_path, model):
    cases = tmp_path / "in"
    good_case(cases / "good.nii.gz")
    (cases / "dangling.nii.gz").symlink_to(tmp_path / "moved-away.nii.gz")
    (cases / "loop.nii.gz").symlink_to(cases / "loop.nii.gz")
    assert detect_main([str(cases), "-o", str(tmp_path / "out"), "--model", model, "-q"]) == 1
    rows = table(tmp_path / "out")
    assert rows["good"]["status"] == "done"
    assert rows["dangling"]["status"] == "failed" and "symbolic link" in rows["dangling"]["error"] and "moved-away.nii.gz" in rows["dangling"]["error"]
    assert rows["loop"]["status"] == "failed" and "symbolic link" in rows["loop"]["error"] and "loop" in rows["loop"]["error"]
