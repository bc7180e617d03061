"""Slice-by-slice 2.5D inference: every slice, in scan order, with its two neighbours.

"During the test, the entire image was input into the network in sequence according to the
scanning order" (Fan et al. 2022). Edge slices repeat themselves as their missing neighbour.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .network import ResUNet


class Cancelled(Exception):
    """The user cancelled a running detection."""


def select_device(device: str = "auto") -> torch.device:
    """'auto' takes CUDA when present, else the CPU; asking for CUDA without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUDA was requested but no CUDA device is available; use --device cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    return torch.device(device)


def default_batch_size(device: torch.device) -> int:
    # On CPU, batch 1 is fastest: bigger batches spill the activations out of the L3 cache
    # (measured in ../shared/reference/cpu-cost.md). GPUs want bigger batches.
    return 1 if device.type == "cpu" else 8


def neighbour_indices(n_slices: int) -> np.ndarray:
    """(n, 3) indices of slices i-1, i, i+1, replicated at the ends."""
    i = np.arange(n_slices)
    return np.stack([np.clip(i - 1, 0, n_slices - 1), i, np.clip(i + 1, 0, n_slices - 1)], axis=1)


def prepare_for_inference(model: ResUNet, device: torch.device) -> ResUNet:
    model = model.to(device).eval()
    if device.type == "cpu":
        # channels_last is 1.3-1.6x faster for these convolutions on x86 CPUs (cpu-cost.md).
        model = model.to(memory_format=torch.channels_last)
    return model


@torch.inference_mode()
def predict_stack(
    model: ResUNet,
    stack: np.ndarray,
    device: torch.device,
    batch_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> np.ndarray:
    """Probabilities (k, H, W) for a preprocessed (k, H, W) stack; the model must be in eval mode."""
    n = stack.shape[0]
    batch_size = batch_size or default_batch_size(device)
    memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    volume = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32))
    neighbours = torch.from_numpy(neighbour_indices(n))
    out = np.empty(stack.shape, dtype=np.float32)
    for start in range(0, n, batch_size):
        if cancel is not None and cancel():
            raise Cancelled("detection cancelled")
        idx = neighbours[start : start + batch_size]
        batch = volume[idx].to(device).contiguous(memory_format=memory_format)
        logits = model(batch)
        out[start : start + len(idx)] = torch.sigmoid(logits)[:, 0].float().cpu().numpy()
        if progress is not None:
            progress(min(start + batch_size, n), n)
    return out
