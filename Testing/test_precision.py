"""Precision (auto|fp32|bf16|int8), the on-disk ONNX cache, a detect start without torch, and
threads per worker (issue 23)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from CMBDetectLib.detection import onnx_cache
from CMBDetectLib.detection.precision import CPU_FLAGS_ENV, cpu_flags, engine_for, resolve_precision

AVX2_ONLY = frozenset({"fpu", "sse2", "avx", "avx2", "fma"})  # this project's EPYC
SAPPHIRE_RAPIDS = AVX2_ONLY | {"avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"}
ROOT = Path(__file__).resolve().parent.parent


# --- precision selection ------------------------------------------------------------------------


def test_auto_is_bf16_only_where_the_cpu_has_native_bf16_else_fp32():
    assert resolve_precision("auto", "cpu", AVX2_ONLY).name == "fp32"
    assert resolve_precision("auto", "cpu", frozenset()).name == "fp32"  # no flags at all (macOS, Windows): fp32
    assert resolve_precision("auto", "cpu", AVX2_ONLY | {"avx512_vnni"}).name == "fp32"  # int8 only when asked
    assert resolve_precision("auto", "cpu", SAPPHIRE_RAPIDS).name == "bf16"
    assert resolve_precision("auto", "cpu", AVX2_ONLY | {"amx_bf16"}).name == "bf16"
    assert resolve_precision("auto", "cuda", AVX2_ONLY).name == "fp16"


def test_asked_precision_without_the_instructions_runs_but_says_it_is_emulated():
    bf16 = resolve_precision("bf16", "cpu", AVX2_ONLY)
    assert bf16.name == "bf16" and bf16.emulated and "emulated" in bf16.warning
    int8 = resolve_precision("int8", "cpu", AVX2_ONLY)
    assert int8.name == "int8" and int8.emulated and "likely slower" in int8.warning
    native = resolve_precision("bf16", "cpu", SAPPHIRE_RAPIDS)
    assert not native.emulated and native.warning == ""
    assert not resolve_precision("fp32", "cpu", AVX2_ONLY).emulated


def test_impossible_combinations_are_refused_naming_what_would_run():
    with pytest.raises(ValueError, match="CUDA only"):
        resolve_precision("fp16", "cpu", AVX2_ONLY)
    with pytest.raises(ValueError, match="on the CPU"):
        resolve_precision("int8", "cuda")
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8", "cpu", AVX2_ONLY)
    with pytest.raises(ValueError, match="--engine onnxruntime has no bf16 kernels"):
        engine_for("onnxruntime", "cpu", "bf16")
    with pytest.raises(ValueError, match="--engine torch has no int8 kernels"):
        engine_for("torch", "cpu", "int8")
    assert engine_for("auto", "cpu", "fp32") == "onnxruntime"
    assert engine_for("auto", "cpu", "bf16") == "torch"
    assert engine_for("auto", "cpu", "int8") == "onnxruntime"


def test_cpu_flags_come_from_cpuinfo_or_the_override(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: test\nflags\t\t: fpu avx2 avx512_bf16 amx_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    monkeypatch.delenv(CPU_FLAGS_ENV, raising=False)
    assert cpu_flags(info) == {"fpu", "avx2", "avx512_bf16", "amx_bf16"}
    assert cpu_flags(tmp_path / "absent") == frozenset()
    monkeypatch.setenv(CPU_FLAGS_ENV, "avx2 AVX512_BF16")
    assert cpu_flags(info) == {"avx2", "avx512_bf16"}


# --- the ONNX cache -------------------------------------------------------------------------------


class Builds:
    """A build function that counts its calls and returns a real (tiny) ONNX model."""

    def __init__(self, scale: float = 2.0) -> None:
        self.calls, self.scale = 0, scale

    def __call__(self) -> bytes:
        from onnx import TensorProto, helper

        self.calls += 1
        graph = helper.make_graph(
            [helper.make_node("Mul", ["x", "s"], ["y"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
            [helper.make_tensor("s", TensorProto.FLOAT, [], [self.scale])],
        )  # fmt: skip
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def session(data: bytes):
    from CMBDetectLib.detection.engines import ort_session

    return ort_session(data, 1)


def run(s) -> float:
    return float(s.run(None, {"x": np.ones(1, np.float32)})[0][0])


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(onnx_cache.CACHE_ENV, str(folder))
    monkeypatch.setattr(onnx_cache, "_memory", {})  # a fresh process's memory: only the disk carries over
    monkeypatch.setattr(onnx_cache, "_warned", set())
    return folder


def entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.onnx")) if folder.is_dir() else []


def test_cache_is_keyed_by_weights_precision_and_calibration(cache, monkeypatch):
    build = Builds()
    fields = {"kind": "unet", "weights_sha256": "a" * 64, "precision": "fp32"}
    assert run(onnx_cache.cached(fields, build, session)) == 2.0
    onnx_cache._memory.clear()  # as a new process
    assert run(onnx_cache.cached(fields, build, session)) == 2.0
    assert build.calls == 1 and len(entries(cache)) == 1  # served from the disk
    for changed in ({"weights_sha256": "b" * 64}, {"precision": "int8", "calibration_sha256": "c" * 64}):
        onnx_cache.cached({**fields, **changed}, build, session)
    assert build.calls == 3 and len(entries(cache)) == 3
    # The runtime's versions are part of the key: another onnxruntime makes another entry.
    key, real = onnx_cache.entry_key(fields), onnx_cache.runtime_versions()
    assert set(real) == {"onnxruntime", "torch", "onnx"}
    monkeypatch.setattr(onnx_cache, "runtime_versions", lambda: {**real, "onnxruntime": "0.0.1"})
    assert onnx_cache.entry_key(fields) != key


def test_cache_entries_are_written_atomically_and_named_by_their_checksum(cache):
    import hashlib

    onnx_cache.cached({"kind": "unet", "weights_sha256": "a" * 64}, Builds(), session)
    (entry,) = entries(cache)
    assert entry.stem.split("-", 1)[1] == hashlib.sha256(entry.read_bytes()).hexdigest()
    assert [p.name for p in cache.iterdir()] == [entry.name]  # no temporary file left beside it


def test_a_corrupt_entry_is_rebuilt_never_trusted(cache, caplog):
    fields = {"kind": "unet", "weights_sha256": "d" * 64}
    build = Builds()
    onnx_cache.cached(fields, build, session)
    (entry,) = entries(cache)
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped bit: the checksum in its name no longer matches
    entry.write_bytes(bytes(data))
    onnx_cache._memory.clear()
    assert run(onnx_cache.cached(fields, build, session)) == 2.0 and build.calls == 2
    (entry,) = entries(cache)
    # Garbage that matches its name (written by a broken build): ONNX Runtime refuses it, so it is rebuilt.
    import hashlib

    junk = b"not an onnx model"
    entry.unlink()
    (cache / f"{entry.stem.split('-', 1)[0]}-{hashlib.sha256(junk).hexdigest()}.onnx").write_bytes(junk)
    onnx_cache._memory.clear()
    with caplog.at_level(logging.WARNING):
        assert run(onnx_cache.cached(fields, build, session)) == 2.0
    assert build.calls == 3 and "rebuilding" in caplog.text
    assert [p.read_bytes() != junk for p in entries(cache)] == [True]


def test_an_unwritable_cache_falls_back_to_memory_with_one_warning(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(onnx_cache.CACHE_ENV, str(blocker / "cache"))  # cannot be created, even by root
    monkeypatch.setattr(onnx_cache, "_memory", {})
    monkeypatch.setattr(onnx_cache, "_warned", set())
    build = Builds()
    with caplog.at_level(logging.WARNING):
        for precision in ("fp32", "fp32", "int8"):
            assert run(onnx_cache.cached({"kind": "unet", "precision": precision}, build, session)) == 2.0
    assert build.calls == 2  # the second fp32 came from memory
    assert caplog.text.count("cannot be written") == 1


def test_cache_folder_default_and_override(monkeypatch, tmp_path):
    monkeypatch.setenv(onnx_cache.CACHE_ENV, str(tmp_path / "x"))
    assert onnx_cache.cache_dir() == tmp_path / "x"
    monkeypatch.delenv(onnx_cache.CACHE_ENV)
    assert "cmbdetect" in str(onnx_cache.cache_dir()).lower()


# --- equal detections across precisions -----------------------------------------------------------


def calibrated_dark_spot_model(folder: Path, array: np.ndarray) -> str:
    """The hand-wired dark-spot model with int8 ranges calibrated on `array`, as `cmbdetect quantize` writes them."""
    from handmade import save_dark_spot_model

    from CMBDetectLib.detection.engines import alignment_of, export_onnx
    from CMBDetectLib.detection.quantize import calibrate, calibration_inputs, write_calibration
    from CMBDetectLib.models import load_model

    path = save_dark_spot_model(folder / "dark.safetensors", base_channels=4)
    model = load_model(str(path))
    calibration = calibrate(export_onnx(model.network), calibration_inputs([array], alignment_of(model.config), 4))
    write_calibration(model.path, model.card, calibration, model.sha256)
    return str(path)


def lesion_set(result) -> list[tuple[int, tuple]]:
    return sorted((l.n_voxels, tuple(round(c, 1) for c in l.centroid_ijk)) for l in result.lesions)


def test_fp32_bf16_and_int8_find_the_same_lesions_on_a_phantom(tmp_path):
    from handmade import oblique_geometry, phantom

    from CMBDetectLib.detection.pipeline import DetectionParams, detect_volume
    from CMBDetectLib.io import Volume

    array, geometry, _ = phantom((4, 110, 130), oblique_geometry((0.45, 0.6, 2.0)))
    model = calibrated_dark_spot_model(tmp_path, array)
    card = json.loads(Path(model).with_suffix(".json").read_text())
    assert card["int8_calibration"]["file"] == "dark.int8.json" and len(card["int8_calibration"]["sha256"]) == 64
    volume = Volume(array, geometry)
    results = {p: detect_volume(volume, DetectionParams(model=model, precision=p, device="cpu")) for p in ("fp32", "bf16", "int8")}
    assert {p: (r.engine, r.precision) for p, r in results.items()} == {
        "fp32": ("onnxruntime", "fp32"), "bf16": ("torch", "bf16"), "int8": ("onnxruntime", "int8")}  # fmt: skip
    assert len(results["fp32"].lesions) >= 1  # the phantom's spheres are found: there is something to compare
    # The stated tolerances: probabilities within 0.02 (bf16) and 0.05 (int8) of fp32, and no
    # lesion gained or lost, none moved, none grown or shrunk.
    for p, tolerance in (("bf16", 0.02), ("int8", 0.05)):
        assert np.abs(results[p].probability - results["fp32"].probability).max() < tolerance, p
        assert lesion_set(results[p]) == lesion_set(results["fp32"]), p
    assert results["int8"].summary()["precision"] == "int8"


def nearest(a: list, b: list) -> float:
    """The farthest any lesion of `a` lies from the nearest of `b`, voxels."""
    if not a:
        return 0.0
    return max(min(np.linalg.norm(np.subtract(x, y)) for y in b) if b else np.inf for x in a)


@pytest.mark.slow
def test_the_shipped_model_finds_the_same_lesions_at_int8_as_at_fp32():
    """The default model with its shipped calibration, on a small synthetic head with bleeds:
    the paper's single-stage pipeline finds the same lesions at int8, each within a voxel."""
    from CMBDetectLib.detection.pipeline import DetectionParams, detect_volume
    from CMBDetectLib.synth.case import generate_case

    case = generate_case(4242, 0, n_slices=12, matrix=(160, 160), oblique=False, n_microbleeds=8)
    results = {p: detect_volume(case.image, DetectionParams(precision=p, device="cpu", single_stage=True)) for p in ("fp32", "int8")}
    a, b = ([l.centroid_ijk for l in results[p].lesions] for p in ("fp32", "int8"))
    assert len(a) >= 3, "the case has bleeds the model finds: there is something to compare"
    assert len(a) == len(b) and nearest(a, b) <= 1.0 and nearest(b, a) <= 1.0


# --- resume does not mix precisions -------------------------------------------------------------


def test_a_run_that_resolves_auto_otherwise_does_not_resume_another_precisions_results(tmp_path, monkeypatch):
    from handmade import phantom, save_dark_spot_model

    from CMBDetectLib.cohort.batch import detect_batch
    from CMBDetectLib.detection.pipeline import DetectionParams
    from CMBDetectLib.io import Geometry, write_volume

    g = Geometry((0.5, 0.5, 2.0), (0.0, 0.0, 0.0))
    array, _, _ = phantom((3, 100, 120), g, [((1, 50, 40), 4.0)])
    write_volume(array, g, tmp_path / "in" / "c0.nii.gz")
    params = DetectionParams(model=str(save_dark_spot_model(tmp_path / "dark.safetensors", base_channels=2)))
    out = tmp_path / "out"

    def batch(flags: str) -> tuple[str, str]:
        monkeypatch.setenv(CPU_FLAGS_ENV, flags)
        (outcome,) = detect_batch([tmp_path / "in"], out, params, show_progress=False)
        summary = json.loads((out / "c0_summary.json").read_text())
        assert summary["precision"] == summary["params_fingerprinted"]["precision"]
        return outcome.status, summary["precision"]

    assert batch("avx2") == ("done", "fp32")
    assert batch("avx2 fma") == ("skipped", "fp32")  # resolves as before: resumed
    assert batch("avx2 avx512_bf16") == ("done", "bf16")  # another CPU: auto is bf16, the fp32 results are not its own
    assert batch("avx2 amx_bf16") == ("skipped", "bf16")
    assert batch("avx2") == ("done", "fp32")


# --- a start that does not wait for torch ---------------------------------------------------------


def torch_free_run(code: str, env: dict) -> subprocess.CompletedProcess:
    """`code` in a fresh Python that reports, last, whether torch was ever imported."""
    probe = f"import sys\ntry:\n    rc = ({code})\nfinally:\n    print('TORCH-IMPORTED' if 'torch' in sys.modules else 'NO-TORCH')\nsys.exit(rc)\n"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


@pytest.mark.slow
def test_detect_and_the_slicer_worker_import_no_torch_when_the_cache_is_warm(tmp_path):
    from handmade import phantom, save_dark_spot_model, shipped_classifier

    from CMBDetectLib.io import Geometry, write_volume

    g = Geometry((0.5, 0.5, 2.0), (0.0, 0.0, 0.0))
    array, _, _ = phantom((3, 100, 120), g, [((1, 50, 40), 4.0), ((1, 60, 80), 6.0)])
    write_volume(array, g, tmp_path / "case.nii.gz")
    # A detector whose card names the shipped candidate classifier: both networks go through the cache.
    model = save_dark_spot_model(tmp_path / "m" / "dark.safetensors", base_channels=2, candidate_classifier=shipped_classifier().path)
    env = {**os.environ, onnx_cache.CACHE_ENV: str(tmp_path / "cache")}
    detect = f"__import__('CMBDetectLib.cli', fromlist=['main']).main(['detect', {str(tmp_path / 'case.nii.gz')!r}, '-o', {{out!r}}, '-q', '--model', {str(model)!r}])"
    cold = torch_free_run(detect.format(out=str(tmp_path / "cold")), env)
    assert cold.returncode == 0, cold.stderr
    assert cold.stdout.strip().endswith("TORCH-IMPORTED")  # the first run exports both networks with torch
    summary = json.loads((tmp_path / "cold" / "case_summary.json").read_text())
    assert summary["engine"] == "onnxruntime" and summary["candidate_stage"]["n_candidates"] >= 1  # the classifier ran too
    warm = torch_free_run(detect.format(out=str(tmp_path / "warm")), env)
    assert warm.returncode == 0, warm.stderr
    assert warm.stdout.strip().endswith("NO-TORCH"), warm.stdout
    assert "network: onnxruntime, fp32" in warm.stderr
    assert (tmp_path / "warm" / "case_lesions.csv").read_bytes() == (tmp_path / "cold" / "case_lesions.csv").read_bytes()
    worker = (f"__import__('CMBDetectLib.detection.worker', fromlist=['main']).main(['--input', {str(tmp_path / 'case.nii.gz')!r}, "
              f"'--out', {str(tmp_path / 'worker')!r}, '--model', {str(model)!r}, '--for-slicer'])")  # fmt: skip
    slicer = torch_free_run(worker, env)
    assert slicer.returncode == 0, slicer.stdout
    assert "DONE" in slicer.stdout and slicer.stdout.strip().endswith("NO-TORCH"), slicer.stdout[-2000:]


# --- threads per worker ---------------------------------------------------------------------------


def two_cases(folder: Path) -> str:
    from handmade import phantom, save_dark_spot_model

    from CMBDetectLib.io import Geometry, write_volume

    g = Geometry((0.5, 0.5, 2.0), (0.0, 0.0, 0.0))
    for i in range(2):
        array, _, _ = phantom((3, 100, 120), g, [((1, 50, 40 + 5 * i), 4.0)], seed=i)
        write_volume(array, g, folder / "in" / f"c{i}.nii.gz")
    return str(save_dark_spot_model(folder / "dark.safetensors", base_channels=2))


def test_each_local_worker_runs_cores_over_n_threads(tmp_path):
    from CMBDetectLib.cohort.batch import detect_batch
    from CMBDetectLib.detection.pipeline import DetectionParams
    from CMBDetectLib.detection.threads import cpu_cores

    model = two_cases(tmp_path)
    outcomes = detect_batch([tmp_path / "in"], tmp_path / "out", DetectionParams(model=model), show_progress=False, workers=2)
    assert [o.status for o in outcomes] == ["done", "done"]
    assert [o.threads for o in outcomes] == [max(1, cpu_cores() // 2)] * 2


def test_each_dask_worker_runs_its_share_of_the_hosts_cores(tmp_path):
    distributed = pytest.importorskip("distributed")
    from CMBDetectLib.cohort.batch import detect_batch
    from CMBDetectLib.detection.pipeline import DetectionParams
    from CMBDetectLib.detection.threads import cpu_cores

    model = two_cases(tmp_path)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=40) as cluster:
        with distributed.Client(cluster) as client:
            outcomes = detect_batch([tmp_path / "in"], tmp_path / "out", DetectionParams(model=model), show_progress=False, scheduler=client)
    assert [o.status for o in outcomes] == ["done", "done"]
    assert [o.threads for o in outcomes] == [max(1, cpu_cores() // 2)] * 2  # 2 workers of 1 thread on this host
