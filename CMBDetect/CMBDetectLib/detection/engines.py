"""Inference engines: what runs the 2.5D U-Net (and the candidate classifier), behind one interface.

An engine takes a batch of 2.5D inputs (n, 3, h, w) float32 and returns the centre slices'
probabilities (n, h, w) float32. h and w may change from call to call (the head's bounding
box differs per slice), so every engine accepts any size that is a multiple of the
network's `alignment`.

- `torch`: PyTorch eager, the reference and the fallback. channels_last on CPU (1.3-1.6x
  faster there); bf16 (CPU, CUDA) and fp16 (CUDA) by autocast.
- `onnxruntime`: the same network exported to ONNX (TorchScript exporter, dynamic batch,
  height and width) and run by ONNX Runtime's CPU provider with the process's share of the
  cores (threads.py). Measured on this project's 2-core CPU it runs the network at 90-98 % of
  the fp32 matrix-multiply peak, against about half for eager (../shared/reference/cpu-cost.md
  and `cmbdetect benchmark`), so `auto` takes it on CPU for fp32; int8 is its static
  quantisation (quantize.py). The exports are cached on disk (onnx_cache.py): a process whose
  model is in the cache never imports torch.

Which engine runs which precision on which device: precision.py's table. This module imports
torch only where torch runs or exports something.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from . import onnx_cache
from .precision import engine_for
from .threads import apply_to_torch, cpu_cores, intra_op_threads

if TYPE_CHECKING:
    from ..models import LoadedModel
    from .network import ResUNet

log = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "onnxruntime")
ONNX_OPSET = 17


class Engine(Protocol):
    name: str
    device: Any  # .type is "cpu" or "cuda"
    alignment: int  # input height and width must be multiples of this (the U-Net's pooling)
    precision: str
    threads: int

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """(n, 3, h, w) float32 inputs -> (n, h, w) float32 probabilities of the centre slices."""
        ...


class CpuDevice:
    """What an engine that runs without torch reports as its device (torch.device-like)."""

    type = "cpu"

    def __str__(self) -> str:
        return "cpu"

    def __repr__(self) -> str:
        return "device(type='cpu')"

    def __eq__(self, other: object) -> bool:
        return str(other) == "cpu"

    def __hash__(self) -> int:
        return hash("cpu")


def alignment_of(network_or_config) -> int:
    """Crops must start and end on multiples of this, so pooling sees the dense pass's grid."""
    config = getattr(network_or_config, "config", network_or_config)
    return 2 ** (config.levels - 1)


def cpu_threads() -> int:
    """Cores this process may use."""
    return cpu_cores()


def mixed_precision_dtype(device):
    """The autocast dtype `auto` takes on `device`: fp16 on CUDA; None (fp32) on CPU."""
    import torch

    return torch.float16 if torch.device(str(device)).type == "cuda" else None


_AUTOCAST = {"bf16": "bfloat16", "fp16": "float16"}


class TorchEngine:
    """PyTorch eager; the reference every other engine is compared with."""

    name = "torch"

    def __init__(self, network: "ResUNet", device, precision: str | None = None) -> None:
        import torch

        apply_to_torch()
        self.device = torch.device(str(device))
        self.alignment = alignment_of(network)
        self.memory_format = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format
        self.network = network.to(self.device).eval().to(memory_format=self.memory_format)
        # None: fp16 on CUDA, fp32 on CPU (precision.py's `auto` without bf16 flags).
        self.precision = precision or ("fp16" if self.device.type == "cuda" else "fp32")
        self.autocast_dtype = getattr(torch, _AUTOCAST[self.precision]) if self.precision in _AUTOCAST else None
        self.threads = torch.get_num_threads()
        from .network import Probability

        self._probability = Probability(self.network)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device, non_blocking=True)
            x = x.contiguous(memory_format=self.memory_format)
            if self.autocast_dtype is not None:
                with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                    p = self._probability(x)
            else:
                p = self._probability(x)
            return p.float().cpu().numpy()


def _export(module, example, names: tuple[str, str], dynamic_axes: dict) -> bytes:
    import io
    import warnings

    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notices are not the user's business
        torch.onnx.export(
            module.eval(), (example,), buffer, dynamo=False, opset_version=ONNX_OPSET,
            input_names=[names[0]], output_names=[names[1]], dynamic_axes=dynamic_axes,
        )  # fmt: skip
    return buffer.getvalue()


def export_onnx(network: "ResUNet") -> bytes:
    """The network plus sigmoid as an ONNX model (bytes), batch, height and width dynamic.

    The TorchScript-based exporter (`dynamo=False`) works offline with torch alone; the
    newer torch.export-based one needs onnxscript.
    """
    import torch

    from .network import Probability

    example = torch.zeros(1, network.config.in_slices, 64, 64)
    axes = {"slices": {0: "n", 2: "h", 3: "w"}, "probability": {0: "n", 1: "h", 2: "w"}}
    return _export(Probability(network.cpu().eval()), example, ("slices", "probability"), axes)


def export_classifier_onnx(network) -> bytes:
    """The candidate classifier plus softmax as ONNX, batch dynamic."""
    import torch

    from .classifier import Verdicts

    c = network.config
    example = torch.zeros(1, c.in_channels, c.patch_size, c.patch_size, c.patch_size)
    return _export(Verdicts(network.cpu().eval()), example, ("patches", "verdicts"), {"patches": {0: "n"}, "verdicts": {0: "n"}})


def ort_session(model: bytes, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    # The process's share of the cores (cohort workers: cores / N); every session taking all
    # the cores made N workers fight over them.
    options.intra_op_num_threads = threads or intra_op_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: no chatter on stderr
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


class OnnxRuntimeEngine:
    """ONNX Runtime, CPU execution provider, the process's share of the cores."""

    name = "onnxruntime"

    def __init__(self, source: "ResUNet | bytes", threads: int | None = None, alignment: int | None = None,
                 precision: str = "fp32", session=None) -> None:  # fmt: skip
        """`source`: a network (exported here, in memory) or an ONNX model's bytes (with its `alignment`)."""
        import onnxruntime  # noqa: F401 - optional dependency: ImportError tells `auto` to fall back

        self.device = CpuDevice()
        self.precision = precision
        if isinstance(source, (bytes, bytearray)):
            if alignment is None:
                raise ValueError("an ONNX model given as bytes needs its alignment")
            self.alignment = alignment
        else:
            self.alignment = alignment_of(source)
            source = export_onnx(source)
        self.session = session or ort_session(source, threads)
        self.threads = self.session.get_session_options().intra_op_num_threads
        self._input = self.session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        return self.session.run(None, {self._input: x})[0]


def resolve_engine_name(name: str, device, precision: str = "fp32") -> str:
    device_type = getattr(device, "type", str(device))
    if name not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {name!r}")
    if name == "onnxruntime" and device_type != "cpu":
        raise ValueError("the onnxruntime engine runs on the CPU here; use --engine torch (or auto) with --device cuda")
    return engine_for(name, device_type, precision)


def unet_cache_fields(model: "LoadedModel", precision: str) -> dict:
    """What decides the ONNX bytes of `model` at `precision` (onnx_cache.py adds the versions)."""
    fields = {"kind": "unet", "weights_sha256": model.sha256, "precision": precision, "opset": ONNX_OPSET}
    if precision == "int8":
        fields["calibration_sha256"] = model.int8_calibration()[1]
    return fields


def unet_onnx(model: "LoadedModel", precision: str = "fp32") -> bytes:
    """The ONNX bytes of `model` at `precision` (fp32 or int8), from the cache or built into it."""
    if precision == "int8":
        from .quantize import quantize_with_ranges

        ranges, _ = model.int8_calibration()
        return onnx_cache.cached_bytes(unet_cache_fields(model, "int8"), lambda: quantize_with_ranges(unet_onnx(model, "fp32"), ranges))
    return onnx_cache.cached_bytes(unet_cache_fields(model, "fp32"), lambda: export_onnx(model.network))


def _onnxruntime_engine(model: "LoadedModel | ResUNet", precision: str) -> OnnxRuntimeEngine:
    if not hasattr(model, "sha256") or not model.sha256:  # a bare network: exported in memory, not cached
        network = getattr(model, "network", model)
        if precision == "int8":
            raise ValueError("int8 needs a model with its calibration (a model card naming its int8 ranges)")
        return OnnxRuntimeEngine(network, precision=precision)
    alignment = alignment_of(model.config)
    if precision == "int8":
        from .quantize import quantize_with_ranges

        ranges, _ = model.int8_calibration()  # a model without one: a ValueError naming it, before any export
        fields = unet_cache_fields(model, "int8")
        build = lambda: quantize_with_ranges(unet_onnx(model, "fp32"), ranges)  # noqa: E731
    else:
        fields, build = unet_cache_fields(model, "fp32"), lambda: export_onnx(model.network)
    return onnx_cache.cached(fields, build, lambda data: OnnxRuntimeEngine(data, alignment=alignment, precision=precision))


def make_engine(model: "LoadedModel | ResUNet", device, name: str = "auto", precision: str = "fp32") -> Engine:
    """Build the engine `name` for this model, device and (resolved) precision; `auto` falls
    back to torch, saying why, where ONNX Runtime is missing or fails (fp32 only: int8 has no
    other engine)."""
    wanted = resolve_engine_name(name, device, precision)
    if wanted == "onnxruntime":
        try:
            return _onnxruntime_engine(model, precision)
        except ImportError:
            if name != "auto" or precision == "int8":
                raise RuntimeError(f"the onnxruntime engine{' (int8)' if precision == 'int8' else ''} needs the onnxruntime package: pip install onnxruntime") from None
            log.warning("onnxruntime is not installed: running the network with PyTorch eager (about half as fast on CPU)")
        except Exception as exc:  # an export or session failure must not stop detection under `auto`
            if name != "auto" or precision == "int8":
                raise
            log.warning("ONNX export or session failed (%s): running the network with PyTorch eager", exc)
    return TorchEngine(getattr(model, "network", model), device, precision)


class ClassifierEngine:
    """The candidate classifier, fp32: (n, 3, S, S, S) patches -> (n, classes) softmax.

    ONNX Runtime from the cache when installed (no torch), torch otherwise."""

    def __init__(self, classifier) -> None:
        self.name = "torch"
        self._run = None
        try:
            fields = {"kind": "candidate-classifier", "weights_sha256": classifier.sha256, "precision": "fp32", "opset": ONNX_OPSET}
            session = onnx_cache.cached(fields, lambda: export_classifier_onnx(classifier.network), ort_session)
            name = session.get_inputs()[0].name
            self._run = lambda x: session.run(None, {name: x})[0]
            self.name = "onnxruntime"
        except ImportError:
            pass
        except Exception as exc:  # noqa: BLE001 - torch gives the same verdicts
            log.warning("candidate classifier on ONNX Runtime failed (%s): running it with PyTorch", exc)
        if self._run is None:
            from .candidates import classify_patches

            network = classifier.network
            self._run = lambda x: classify_patches(network, x)

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        return np.asarray(self._run(np.ascontiguousarray(patches, dtype=np.float32)), np.float32)
