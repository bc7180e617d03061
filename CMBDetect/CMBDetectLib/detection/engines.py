"""Inference engines: what runs the 2.5D U-Net, behind one interface.

An engine takes a batch of 2.5D inputs (n, 3, h, w) float32 and returns the centre slices'
probabilities (n, h, w) float32. h and w may change from call to call (the head's bounding
box differs per slice), so every engine accepts any size that is a multiple of the
network's `alignment`.

- `torch`: PyTorch eager, the reference and the fallback. channels_last on CPU (1.3-1.6x
  faster there); on CUDA, mixed precision (bf16 where the GPU has it, else fp16) by autocast.
- `onnxruntime`: the same network exported to ONNX in memory (TorchScript exporter, dynamic
  batch, height and width) and run by ONNX Runtime's CPU provider with one intra-op thread
  per core. Measured on this project's 2-core CPU it runs the network at 90-98 % of the
  fp32 matrix-multiply peak, against about half for eager (../shared/reference/cpu-cost.md
  and `cmbdetect benchmark`), so `auto` takes it on CPU.

`auto` picks onnxruntime on CPU when it is installed and the export works, torch otherwise
(with a log line saying why), and torch with mixed precision on CUDA.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from typing import Protocol

import numpy as np
import torch
from torch import nn

from .network import ResUNet

log = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "onnxruntime")
ONNX_OPSET = 17


class Engine(Protocol):
    name: str
    device: torch.device
    alignment: int  # input height and width must be multiples of this (the U-Net's pooling)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """(n, 3, h, w) float32 inputs -> (n, h, w) float32 probabilities of the centre slices."""
        ...


def alignment_of(network: ResUNet) -> int:
    """Crops must start and end on multiples of this, so pooling sees the dense pass's grid."""
    return 2 ** (network.config.levels - 1)


def cpu_threads() -> int:
    """Cores this process may use: one intra-op thread each."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def mixed_precision_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on GPUs that have it, else fp16; None (fp32) on CPU, where bf16 is ~140x slower
    without AVX512-BF16/AMX (cpu-cost.md)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class _Probability(nn.Module):
    """The network followed by the sigmoid, centre channel only: what every engine returns."""

    def __init__(self, network: ResUNet) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.network(x).float())[:, 0]


class TorchEngine:
    """PyTorch eager; the reference every other engine is compared with."""

    name = "torch"

    def __init__(self, network: ResUNet, device: torch.device, mixed_precision: bool | None = None) -> None:
        self.device = torch.device(device)
        self.alignment = alignment_of(network)
        self.memory_format = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format
        self.network = network.to(self.device).eval().to(memory_format=self.memory_format)
        # Mixed precision is on by default on CUDA only; fp32 everywhere else.
        use_amp = self.device.type == "cuda" if mixed_precision is None else mixed_precision
        self.autocast_dtype = mixed_precision_dtype(self.device) if use_amp else None
        if self.autocast_dtype is not None:
            self.name = f"torch-{str(self.autocast_dtype).removeprefix('torch.')}"
        self._probability = _Probability(self.network)

    @torch.inference_mode()
    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device, non_blocking=True)
        x = x.contiguous(memory_format=self.memory_format)
        if self.autocast_dtype is not None:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                p = self._probability(x)
        else:
            p = self._probability(x)
        return p.float().cpu().numpy()


def export_onnx(network: ResUNet) -> bytes:
    """The network plus sigmoid as an ONNX model (bytes), batch, height and width dynamic.

    The TorchScript-based exporter (`dynamo=False`) works offline with torch alone; the
    newer torch.export-based one needs onnxscript. Exported in memory, never to disk.
    """
    module = _Probability(network.cpu().eval()).eval()
    example = torch.zeros(1, network.config.in_slices, 64, 64)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notices are not the user's business
        torch.onnx.export(
            module,
            (example,),
            buffer,
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=["slices"],
            output_names=["probability"],
            dynamic_axes={"slices": {0: "n", 2: "h", 3: "w"}, "probability": {0: "n", 1: "h", 2: "w"}},
        )
    return buffer.getvalue()


class OnnxRuntimeEngine:
    """ONNX Runtime, CPU execution provider, as many intra-op threads as torch has (the process's share of the cores)."""

    name = "onnxruntime"

    def __init__(self, network: ResUNet, threads: int | None = None) -> None:
        import onnxruntime as ort  # optional dependency: ImportError tells `auto` to fall back

        self.device = torch.device("cpu")
        self.alignment = alignment_of(network)
        options = ort.SessionOptions()
        # The process's share of the cores, as torch was told it (cohort workers: cores / N);
        # every ORT session taking all the cores made N workers fight over them.
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: no chatter on stderr
        self.session = ort.InferenceSession(export_onnx(network), options, providers=["CPUExecutionProvider"])

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        return self.session.run(None, {"slices": x})[0]


def resolve_engine_name(name: str, device: torch.device) -> str:
    if name not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {name!r}")
    if name == "onnxruntime" and device.type != "cpu":
        raise ValueError("the onnxruntime engine runs on the CPU here; use --engine torch (or auto) with --device cuda")
    if name == "auto":
        return "torch" if device.type == "cuda" else "onnxruntime"
    return name


def make_engine(network: ResUNet, device: torch.device, name: str = "auto") -> Engine:
    """Build the engine `name` for this network and device; `auto` falls back to torch, saying why."""
    wanted = resolve_engine_name(name, device)
    if wanted == "onnxruntime":
        try:
            return OnnxRuntimeEngine(network)
        except ImportError:
            if name != "auto":
                raise RuntimeError("the onnxruntime engine needs the onnxruntime package: pip install onnxruntime") from None
            log.warning("onnxruntime is not installed: running the network with PyTorch eager (about half as fast on CPU)")
        except Exception as exc:  # an export or session failure must not stop detection under `auto`
            if name != "auto":
                raise
            log.warning("ONNX export or session failed (%s): running the network with PyTorch eager", exc)
    return TorchEngine(network, device)
