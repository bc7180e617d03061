"""`cmbdetect benchmark`: how far detection is from the CPU's compute floor, stage by stage.

One invocation measures, on this machine and in this run:
- the fp32 matrix-multiply peak (torch.mm, in every child run just before its case; median),
- the network's GFLOP per 384 x 384 slice (counted by torch.utils.flop_counter on the model),
- the dense compute floor of the case: slices x GFLOP / peak, the least time any dense pass
  of this network could take on this CPU,
- per variant (engine x dense or head-only pass x precision), the seconds of each stage (read,
  preprocess, network, any later stage the pipeline reports, restore, lesions, write), the
  seconds per case, peak memory, and the ratio per case / dense floor;
- per precision, the wall time of a whole fresh `cmbdetect detect` process on the same case
  (what a user waits for: imports, model load, engine set-up, the case, the files), with the
  ONNX cache warm (one untimed run first), and its ratio to the same dense floor.

The case is a synthetic head from the synth engine (or a file given with --case), written as
NIfTI and read back like a user's file. Each run is a fresh child process, so its peak memory is
its own; only the on-disk ONNX cache carries over, as it does for a user. The model load and
engine set-up are shown apart ("setup", paid once per process, not per case). Figures are medians of --repeats runs; variants run side
by side because this machine is shared and noisy: only figures taken together compare fairly.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HELP = "measure detection speed against this CPU's compute floor, by stage, on a synthetic case (prints figures; not a test)"

MATMUL_SIZE = 2048  # large enough to reach the BLAS peak, small enough to repeat in a second
MATMUL_REPEATS = 5
FIXED_STAGES = ("read", "preprocess", "head", "network", "restore", "lesions", "write")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", type=int, nargs=3, default=[100, 384, 384], metavar=("SLICES", "ROWS", "COLS"), help="synthetic case size (default 100 384 384)")
    p.add_argument("--case", type=Path, default=None, help="benchmark this volume file instead of a synthetic head")
    p.add_argument("--repeats", type=int, default=3, help="runs per variant; medians are reported (default 3)")
    p.add_argument("--engines", nargs="+", default=["torch", "onnxruntime"], choices=["torch", "onnxruntime", "auto"], help="engines to compare (default torch onnxruntime)")
    p.add_argument("--passes", nargs="+", default=["dense", "head"], choices=["dense", "head"], help="dense: every pixel of every slice; head: only the head's boxes (default both)")
    p.add_argument("--widths", type=int, nargs="+", default=None, help="U-Net widths to compare with random weights (default: the default model only)")
    p.add_argument("--batch-size", type=int, default=None, help="slices per forward pass (default: the pipeline's, 1 on CPU)")
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16", "int8", "fp16", "auto"],
                   help="precisions to compare (default fp32); each runs on the engines that have its kernels (README: Precision)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    p.add_argument("--matmul-size", type=int, default=MATMUL_SIZE, help=f"side of the square fp32 matrices timed for the peak (default {MATMUL_SIZE})")
    p.add_argument("--json", type=Path, default=None, help="also write every run's figures to this JSON file")


def matmul_gflops(size: int = MATMUL_SIZE, repeats: int = MATMUL_REPEATS) -> float:
    """fp32 torch.mm throughput of this process now, median of `repeats` timed products."""
    import time

    import torch

    a = torch.rand(size, size)
    b = torch.rand(size, size)
    torch.mm(a, b)  # warm-up: thread pool and BLAS buffers
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        rates.append(2.0 * size**3 / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def network_gflop(network, plane: int = 384) -> float:
    """GFLOP of one forward pass over one plane x plane slice (2 FLOP per multiply-add)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, network.config.in_slices, plane, plane)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        network.eval()(x)
    return counter.get_total_flops() / 1e9


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: on Linux ru_maxrss survives
    exec, so a child would report its parent's peak (here the synthetic case's generation)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _model_for(width: int | None, scratch: Path) -> str | None:
    if not width:
        return None
    from ..detection.network import NetworkConfig
    from ..models import save_model, untrained_network

    path = scratch / f"random-c{width}.safetensors"
    if not path.exists():
        save_model(untrained_network(NetworkConfig(base_channels=width)), path, {"id": f"random-c{width}", "version": "bench"})
    return str(path)


def _child(spec: dict) -> dict:
    """One case, timed by stage, in this fresh process; the matmul peak measured just before."""
    import time

    from ..detection.outputs import write_case_outputs
    from ..detection.pipeline import DetectionParams, detect_volume, get_engine, get_model
    from ..detection.inference import select_device
    from ..io import read_volume

    peak = matmul_gflops(spec["matmul_size"])
    params = DetectionParams(
        device=spec["device"], batch_size=spec["batch"], model=spec["model"], engine=spec["engine"], head_only=spec["head_only"],
        precision=spec["precision"],
    )  # fmt: skip
    start = time.perf_counter()
    device = select_device(params.device)
    get_model(params.model, device)
    get_engine(params.model, device, params.engine, params.precision)
    setup = time.perf_counter() - start

    start = wall = time.perf_counter()
    volume = read_volume(spec["case"], "benchmark")
    read = time.perf_counter() - start
    result = detect_volume(volume, params, case="benchmark")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        write_case_outputs(result, Path(out), "benchmark")
    write = time.perf_counter() - start
    wall = time.perf_counter() - wall  # one stopwatch over the whole case: the stages must account for it

    stages = {"read": read, **{k: v for k, v in result.timings.items() if k != "model"}, "write": write}
    return {
        "matmul_gflops": peak,
        "setup_s": setup + result.timings.get("model", 0.0),
        "stages_s": stages,
        "case_s": sum(stages.values()),
        "wall_s": wall,
        "peak_rss_mb": peak_rss_mb(),
        "engine": result.engine,
        "precision": result.precision,
        "model": result.model_id,
        "n_lesions": len(result.lesions),
    }


def _synthetic_case(shape: list[int], folder: Path) -> tuple[Path, str]:
    from ..io import write_volume
    from ..synth.case import generate_case

    slices, rows, cols = shape
    # Pinned where the generator would otherwise draw (an oblique resampled grid changes the
    # shape asked for): a plain axial 3 T head, 1.5 mm slices, 211 mm field of view.
    case = generate_case(2022, 0, n_slices=slices, matrix=(rows, cols), oblique=False, slice_thickness_mm=1.5, fov_mm=211.0, field_strength_t=3.0)
    path = folder / "benchmark.nii.gz"
    write_volume(case.image.array, case.image.geometry, path)
    return path, f"synthetic head (synth seed 2022), spacing {tuple(round(s, 2) for s in case.image.geometry.spacing)} mm"


def _work_fraction(path: Path, alignment: int) -> tuple[int, float]:
    """Slices, and the share of the dense pass's pixels the head-only pass computes."""
    from ..detection.head import head_boxes, work_fraction
    from ..detection.preprocess import preprocess
    from ..io import read_volume

    stack, _ = preprocess(read_volume(path).array)
    return stack.shape[0], work_fraction(head_boxes(stack, alignment), stack.shape)


def runs_on(engine: str, precision: str, device: str) -> bool:
    """Whether `engine` has kernels for `precision` on `device` (precision.py's table)."""
    from ..detection.precision import engine_for, resolve_precision

    device_type = "cuda" if device == "cuda" else "cpu"
    try:
        engine_for(engine, device_type, resolve_precision(precision, device_type).name)
    except ValueError:
        return False
    return True


def process_seconds(case: Path, model: str | None, precision: str, device: str, out: Path) -> float:
    """Wall seconds of one fresh `cmbdetect detect` process on `case`, as a user starts it."""
    import time

    command = [sys.executable, "-m", "CMBDetectLib.cli", "detect", str(case), "-o", str(out), "-q", "--force",
               "--precision", precision, "--device", device, *(["--model", model] if model else [])]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"cmbdetect detect --precision {precision} failed:\n{done.stderr.strip()[-2000:]}")
    return seconds


def measure(args: argparse.Namespace, scratch: Path) -> dict:
    """Every variant's runs and the figures derived from them (what `run` prints)."""
    from ..detection.engines import alignment_of
    from ..models import load_model

    case, description = (args.case, f"file {args.case.name}") if args.case else _synthetic_case(args.shape, scratch)
    slices, fraction = _work_fraction(case, alignment_of(load_model(_model_for((args.widths or [None])[0], scratch)).network))
    specs = []
    for width in args.widths or [None]:
        model = _model_for(width, scratch)
        gflop = network_gflop(load_model(model).network)
        for precision in args.precision:
            for engine in args.engines:
                if not runs_on(engine, precision, args.device):
                    continue  # e.g. torch has no int8 kernels here, ONNX Runtime's CPU provider no bf16 ones
                for name in args.passes:
                    spec = {
                        "case": str(case), "device": args.device, "batch": args.batch_size, "model": model,
                        "engine": engine, "head_only": name == "head", "matmul_size": args.matmul_size, "precision": precision,
                    }  # fmt: skip
                    specs.append((spec, gflop, name, width, []))
    if not specs:
        raise ValueError("no engine given runs the precisions given (int8: onnxruntime; bf16 on CPU: torch)")
    # The whole process, per width and precision: one untimed run first fills the ONNX cache.
    processes = []
    for width in args.widths or [None]:
        model = _model_for(width, scratch)
        for precision in args.precision:
            process_seconds(case, model, precision, args.device, scratch / "process-out")
            processes.append({"width": width, "model": model, "precision": precision, "runs_s": []})
    # Round robin, repeat by repeat: a change in the machine's load touches every variant alike.
    for _ in range(args.repeats):
        for spec, _, name, _, runs in specs:
            out = subprocess.run([sys.executable, "-m", "CMBDetectLib.commands.benchmark", json.dumps(spec)], capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"benchmark run failed ({spec['engine']}, {name}):\n{out.stderr.strip()[-2000:]}")
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        for p in processes:
            p["runs_s"].append(process_seconds(case, p["model"], p["precision"], args.device, scratch / "process-out"))
    variants = [summarise(runs, gflop, slices, name, width) for _, gflop, name, width, runs in specs]
    peak = statistics.median(r["matmul_gflops"] for v in variants for r in v["runs"])
    for p in processes:
        gflop = next(v["gflop_per_slice"] for v in variants if v["width"] == p["width"])
        p["median_s"] = statistics.median(p["runs_s"])
        p["dense_floor_s"] = slices * gflop / peak  # fp32, this run's peak: the same floor for every precision
        p["ratio_to_floor"] = p["median_s"] / p["dense_floor_s"]
        p.pop("model")
    return {"case": description, "shape": list(args.shape) if not args.case else None, "slices": slices,
            "head_work_fraction": fraction, "variants": variants, "processes": processes}  # fmt: skip


def summarise(runs: list[dict], gflop: float, slices: int, pass_name: str, width: int | None) -> dict:
    """Medians over runs, and the floor and ratio computed from this variant's own measurements."""
    stages = list(dict.fromkeys(k for r in runs for k in r["stages_s"]))
    peak = statistics.median(r["matmul_gflops"] for r in runs)
    floor = slices * gflop / peak
    case_s = statistics.median(r["case_s"] for r in runs)
    return {
        "model": runs[0]["model"],
        "width": width,
        "engine": runs[0]["engine"],
        "precision": runs[0].get("precision", "fp32"),
        "pass": pass_name,
        "gflop_per_slice": gflop,
        "matmul_gflops": peak,
        "dense_floor_s": floor,
        "stages_s": {k: statistics.median(r["stages_s"].get(k, 0.0) for r in runs) for k in stages},
        "case_s": case_s,
        "setup_s": statistics.median(r["setup_s"] for r in runs),
        "ratio_to_floor": case_s / floor,
        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
        "runs": runs,
    }


def run(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        print("error: --repeats must be at least 1", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="cmbdetect-bench-") as scratch:
        try:
            figures = measure(args, Path(scratch))
        except (RuntimeError, ValueError, OSError) as exc:  # a failed run, a bad --shape or --case
            print(f"error: {exc}", file=sys.stderr)
            return 1
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    slices = figures["slices"]
    print(f"case: {figures['case']}, {slices} slices; the head's boxes hold {100 * figures['head_work_fraction']:.0f}% of the dense pass's pixels")
    print(f"device {args.device}; {args.repeats} fresh process(es) per variant; medians")
    peak = statistics.median(r["matmul_gflops"] for v in figures["variants"] for r in v["runs"])
    print(f"this machine: fp32 matmul peak {peak:.1f} GFLOP/s (torch.mm {args.matmul_size}x{args.matmul_size} in each run before its case; median of all runs)")
    for width in dict.fromkeys(v["width"] for v in figures["variants"]):
        v = next(v for v in figures["variants"] if v["width"] == width)
        print(
            f"network {v['model']}: {v['gflop_per_slice']:.2f} GFLOP per 384x384 slice (FlopCounterMode);"
            f" dense compute floor {slices} x {v['gflop_per_slice']:.2f} / {peak:.1f} = {slices * v['gflop_per_slice'] / peak:.2f} s"
        )
    stages = list(dict.fromkeys(k for v in figures["variants"] for k in v["stages_s"]))
    head = f"{'model':<22} {'engine':<12} {'prec':<5} {'pass':<5} " + " ".join(f"{s:>{max(7, len(s))}}" for s in stages)
    head += f" {'s/case':>7} {'GFLOP/s':>7} {'floor s':>7} {'ratio':>6} {'setup s':>7} {'peak MB':>8}  runs s/case"
    print(head)
    for v in figures["variants"]:
        row = f"{v['model']:<22} {v['engine']:<12} {v['precision']:<5} {v['pass']:<5} "
        row += " ".join(f"{v['stages_s'].get(s, 0.0):>{max(7, len(s))}.2f}" for s in stages)
        row += f" {v['case_s']:>7.2f} {v['matmul_gflops']:>7.1f} {v['dense_floor_s']:>7.2f} {v['ratio_to_floor']:>6.2f} {v['setup_s']:>7.2f} {v['peak_rss_mb']:>8.0f}  "
        row += ", ".join(f"{r['case_s']:.1f}" for r in v["runs"])
        print(row)
    print("s/case: read + preprocess + ... + write, per case; setup (model load, ONNX export) is paid once per process.")
    print("GFLOP/s: the matmul peak measured in this variant's runs; floor s = slices x GFLOP per slice / that peak,")
    print("the least time any dense pass of this network could take here; ratio = s/case / floor s (below 1: faster than any dense pass).")
    print(f"whole process: a fresh `cmbdetect detect` on the case (ONNX cache warm), wall seconds, median of {args.repeats}; ratio to the fp32 dense floor")
    for p in figures["processes"]:
        runs = ", ".join(f"{r:.1f}" for r in p["runs_s"])
        print(f"  {'default model' if p['width'] is None else 'width ' + str(p['width']):<14} {p['precision']:<5} {p['median_s']:>7.2f} s"
              f"  floor {p['dense_floor_s']:.2f} s  ratio {p['ratio_to_floor']:.2f}  runs {runs}")  # fmt: skip
    return 0


if __name__ == "__main__":  # a child run: `python -m CMBDetectLib.commands.benchmark SPEC_JSON`
    print(json.dumps(_child(json.loads(sys.argv[1]))))
