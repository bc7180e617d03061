"""`cmbdetect benchmark`: every figure it prints comes from this run's measurements."""

from __future__ import annotations

import json
import re
import statistics

import pytest
import torch

from CMBDetectLib.cli import main
from CMBDetectLib.detection.network import NetworkConfig, ResUNet
from CMBDetectLib.io import write_volume
from handmade import phantom


def conv_gflop(network, plane: int = 384) -> float:
    """Convolution FLOPs counted by hand from each layer's output size (2 per multiply-add)."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        kh, kw = module.kernel_size
        total += 2 * output.numel() * (module.in_channels // module.groups) * kh * kw

    handles = [m.register_forward_hook(hook) for m in network.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.inference_mode():
        network(torch.zeros(1, network.config.in_slices, plane, plane))
    for h in handles:
        h.remove()
    return total / 1e9


def test_benchmark_figures_come_from_measured_runs(tmp_path, capsys):
    out = tmp_path / "bench.json"
    array, geometry, _ = phantom((4, 48, 56))  # a file, as a user's case (the synthetic engine takes longer)
    write_volume(array, geometry, tmp_path / "case.nii.gz")
    args = ["--case", str(tmp_path / "case.nii.gz"), "--repeats", "1", "--engines", "torch", "--passes", "dense", "head", "--widths", "4", "--matmul-size", "512"]
    code = main(["benchmark", *args, "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    figures = json.loads(out.read_text())
    assert [v["pass"] for v in figures["variants"]] == ["dense", "head"]

    # The network's GFLOP per slice is the model's own convolution count, not a constant.
    gflop = conv_gflop(ResUNet(NetworkConfig(base_channels=4)))
    m = re.search(r"network (\S+): ([\d.]+) GFLOP per 384x384 slice.*floor (\d+) x ([\d.]+) / ([\d.]+) = ([\d.]+) s", printed)
    assert m, printed
    assert float(m.group(2)) == pytest.approx(gflop, abs=0.01)
    slices, per_slice, peak, floor = int(m.group(3)), float(m.group(4)), float(m.group(5)), float(m.group(6))
    assert slices == figures["slices"] == 4
    assert floor == pytest.approx(slices * per_slice / peak, abs=0.01)
    # The peak is the median of the matmul throughputs measured in the runs themselves.
    runs = [r for v in figures["variants"] for r in v["runs"]]
    assert peak == pytest.approx(statistics.median(r["matmul_gflops"] for r in runs), abs=0.05)
    assert all(r["matmul_gflops"] > 0 for r in runs)

    for v in figures["variants"]:
        run = v["runs"][0]
        stages = run["stages_s"]
        assert list(stages)[:2] == ["read", "preprocess"] and list(stages)[-1] == "write"
        assert {"network", "lesions", "restore"} <= stages.keys() and all(t >= 0 for t in stages.values())
        # The stages account for the whole case, timed by one stopwatch around it.
        assert sum(stages.values()) == pytest.approx(run["wall_s"], rel=0.05, abs=0.05)
        assert v["case_s"] == pytest.approx(run["case_s"])
        assert v["dense_floor_s"] == pytest.approx(slices * v["gflop_per_slice"] / v["matmul_gflops"])
        assert v["ratio_to_floor"] == pytest.approx(v["case_s"] / v["dense_floor_s"])
        assert v["peak_rss_mb"] > 50  # a process that imported torch and ran a case
        row = next(line for line in printed.splitlines() if line.split()[2:4] == [v["precision"], v["pass"]] and "torch" in line)
        assert f"{v['case_s']:.2f}" in row and f"{v['ratio_to_floor']:.2f}" in row

    # The whole `cmbdetect detect` process, per precision: its median wall time and the ratio to the same floor.
    (process,) = figures["processes"]
    assert process["precision"] == "fp32" and len(process["runs_s"]) == 1 and process["runs_s"][0] > 0
    # The same floor as the variants' (printed to 2 decimals above, so recomputed from the JSON's figures).
    exact_peak = statistics.median(r["matmul_gflops"] for r in runs)
    assert process["dense_floor_s"] == pytest.approx(slices * figures["variants"][0]["gflop_per_slice"] / exact_peak, rel=1e-6)
    assert process["dense_floor_s"] == pytest.approx(floor, abs=0.006)
    assert process["ratio_to_floor"] == pytest.approx(process["median_s"] / process["dense_floor_s"])
    assert f"ratio {process['ratio_to_floor']:.2f}" in printed
