"""Slice-by-slice 2.5D inference: every head slice, in scan order, with its two neighbours.

"During the test, the entire image was input into the network in sequence according to the
scanning order" (Fan et al. 2022). Edge slices repeat themselves as their missing neighbour.
The network runs through an engine (engines.py), over each slice's head box (head.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from .engines import CpuDevice, Engine, TorchEngine
from .head import Box, dense_boxes, union

if TYPE_CHECKING:
    import torch

    from .network import ResUNet


class Cancelled(Exception):
    """The user cancelled a running detection."""


def cuda_possible() -> bool:
    """Whether this machine may have a CUDA GPU, asked without importing torch: an NVIDIA
    driver (Linux: /proc/driver/nvidia; Windows: nvcuda.dll); never on macOS. Only then is
    torch imported to ask it."""
    if "torch" in sys.modules:
        return True  # already paid for: let torch answer
    if sys.platform == "darwin":
        return False
    if sys.platform == "win32":
        return (Path(os.environ.get("SystemRoot", r"C:\Windows")) / "System32" / "nvcuda.dll").is_file()
    return Path("/proc/driver/nvidia").exists() or Path("/dev/nvidiactl").exists()


def select_device(device: str = "auto"):
    """'auto' takes CUDA when present, else the CPU; asking for CUDA without one is an error.

    The CPU is a torch-free device object (`.type` "cpu"); CUDA is a torch.device."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    if device == "cpu" or (device == "auto" and not cuda_possible()):
        return CpuDevice()
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    if device == "cuda":
        raise RuntimeError("CUDA was requested but no CUDA device is available; use --device cpu")
    return CpuDevice()


def default_batch_size(device) -> int:
    # On CPU, batch 1 is fastest: bigger batches spill the activations out of the L3 cache
    # (measured in ../shared/reference/cpu-cost.md). GPUs want bigger batches.
    return 1 if device.type == "cpu" else 8


def neighbour_indices(n_slices: int) -> np.ndarray:
    """(n, 3) indices of slices i-1, i, i+1, replicated at the ends."""
    i = np.arange(n_slices)
    return np.stack([np.clip(i - 1, 0, n_slices - 1), i, np.clip(i + 1, 0, n_slices - 1)], axis=1)


def prepare_for_inference(model: "ResUNet", device) -> "ResUNet":
    import torch

    model = model.to(str(device)).eval()
    if device.type == "cpu":
        # channels_last is 1.3-1.6x faster for these convolutions on x86 CPUs (cpu-cost.md).
        model = model.to(memory_format=torch.channels_last)
    return model


def _as_engine(model: "ResUNet | Engine", device) -> "Engine":
    if hasattr(model, "state_dict"):  # a bare network: PyTorch eager, fp32
        return TorchEngine(model, device, "fp32")
    return model


def _groups(boxes: Sequence[Box | None], batch_size: int) -> list[tuple[list[int], Box]]:
    """Consecutive slices to run together (at most batch_size), each group with the union of its boxes."""
    groups: list[tuple[list[int], Box]] = []
    current: list[int] = []
    for i, box in enumerate(boxes):
        if box is None:
            continue
        if current and (len(current) == batch_size or current[-1] != i - 1):
            groups.append((current, union([boxes[j] for j in current])))  # type: ignore[misc]
            current = []
        current.append(i)
    if current:
        groups.append((current, union([boxes[j] for j in current])))  # type: ignore[misc]
    return groups


def predict_stack(
    model: "ResUNet | Engine",
    stack: np.ndarray,
    device,
    batch_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    boxes: Sequence[Box | None] | None = None,
) -> np.ndarray:
    """Probabilities (k, H, W) for a preprocessed (k, H, W) stack.

    `model` is an engine (engines.py) or a ResUNet in eval mode (run by PyTorch eager, fp32).
    With `boxes` (head.py), slice i is computed only inside boxes[i] and is 0 elsewhere; a
    None box skips the slice. Without, every pixel of every slice is computed (the dense pass).
    """
    engine = _as_engine(model, device)
    n = stack.shape[0]
    batch_size = batch_size or default_batch_size(engine.device)
    if boxes is None:
        boxes = dense_boxes(stack.shape)
    if len(boxes) != n:
        raise ValueError(f"{len(boxes)} boxes for {n} slices")
    volume = np.ascontiguousarray(stack, dtype=np.float32)
    neighbours = neighbour_indices(n)
    out = np.zeros(stack.shape, dtype=np.float32)
    groups = _groups(boxes, batch_size)
    total = sum(len(g) for g, _ in groups)
    done = 0
    for members, box in groups:
        if cancel is not None and cancel():
            raise Cancelled("detection cancelled")
        idx = neighbours[members].ravel()
        batch = volume[idx, box.r0 : box.r1, box.c0 : box.c1].reshape(len(members), 3, box.r1 - box.r0, box.c1 - box.c0)
        out[members[0] : members[-1] + 1, box.r0 : box.r1, box.c0 : box.c1] = engine(batch)
        done += len(members)
        if progress is not None:
            progress(done, total)
    return out
