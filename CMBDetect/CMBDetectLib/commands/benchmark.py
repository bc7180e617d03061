"""`cmbdetect benchmark`: seconds per case and peak memory of detection, medians of several runs.

Each run is a fresh child process, so its peak resident memory is its own and no cache
carries over. Variants (widths, batch sizes) run side by side in one invocation, because
this machine is shared and noisy: only figures taken together compare fairly.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

HELP = "measure detection speed and peak memory on a synthetic case (prints figures; not a test)"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", type=int, nargs=3, default=[120, 384, 384], metavar=("SLICES", "ROWS", "COLS"), help="case size (default 120 384 384)")
    p.add_argument("--repeats", type=int, default=3, help="runs per variant; the median is reported (default 3)")
    p.add_argument("--widths", type=int, nargs="+", default=None, help="U-Net widths to compare with random weights (default: the default model only)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1], help="slices per forward pass to compare (default 1)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")


def _child(spec: dict) -> dict:
    """One timed detection in this process; returns seconds and peak RSS."""
    import resource
    import tempfile
    import time

    import numpy as np

    from ..io import Geometry, Volume
    from ..detection.pipeline import DetectionParams, detect_volume

    model = spec["model"]
    if spec.get("width"):
        from ..models import save_model, untrained_network
        from ..detection.network import NetworkConfig

        model = f"{tempfile.mkdtemp()}/w{spec['width']}.safetensors"
        save_model(untrained_network(NetworkConfig(base_channels=spec["width"])), model, {"id": f"random-c{spec['width']}", "version": "bench"})
    rng = np.random.default_rng(0)
    k, r, c = spec["shape"]
    yy, xx = np.mgrid[0:r, 0:c]
    head = ((yy - r / 2) / (0.42 * r)) ** 2 + ((xx - c / 2) / (0.4 * c)) ** 2 < 1
    array = np.where(head, 450.0, 10.0)[None] + rng.normal(0, 15, (k, r, c))
    volume = Volume(np.abs(array).astype(np.float32), Geometry((0.6, 0.6, 2.0), (0.0, 0.0, 0.0)))
    params = DetectionParams(device=spec["device"], batch_size=spec["batch"], model=model)
    start = time.perf_counter()
    result = detect_volume(volume, params)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "model": result.model_id,
    }


def run(args: argparse.Namespace) -> int:
    widths = args.widths or [None]
    print(f"case {args.shape[0]}x{args.shape[1]}x{args.shape[2]} (slices x rows x cols), device {args.device}, {args.repeats} runs each")
    print(f"{'model':<28} {'batch':>5} {'s/case (median)':>16} {'s/slice':>8} {'peak RSS MB':>12}  runs (s)")
    for width in widths:
        for batch in args.batch_sizes:
            spec = {"shape": args.shape, "device": args.device, "batch": batch, "model": None, "width": width}
            runs = []
            for _ in range(args.repeats):
                out = subprocess.run(
                    [sys.executable, "-m", "CMBDetectLib.commands.benchmark", json.dumps(spec)],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            secs = [r["seconds"] for r in runs]
            med = statistics.median(secs)
            rss = statistics.median(r["peak_rss_mb"] for r in runs)
            name = runs[0]["model"]
            print(f"{name:<28} {batch:>5} {med:>16.1f} {med / args.shape[0]:>8.3f} {rss:>12.0f}  {', '.join(f'{s:.1f}' for s in secs)}")
    return 0


if __name__ == "__main__":  # a child run: `python -m CMBDetectLib.commands.benchmark SPEC_JSON`
    print(json.dumps(_child(json.loads(sys.argv[1]))))
