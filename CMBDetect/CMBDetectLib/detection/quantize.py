"""int8: ONNX Runtime's static quantisation of the U-Net, calibrated when the model is built.

`calibrate` (run by `cmbdetect quantize`, once per model) feeds the fp32 export the 2.5D inputs
of a few synthetic heads, as detection would (preprocessed, cut to each slice's head box), and
records each activation's range (MinMax, or a histogram percentile) in a small JSON beside the
weights: tensor name -> [low, high]. The card names that file with its sha256.

`quantize_with_ranges` builds the int8 model from the fp32 export and those ranges alone, with
no data: QDQ format, int8 weights per output channel, int8 activations (ONNX Runtime's advice
for QDQ on x86-64 and ARM), convolutions only (they are the network's cost; the additions,
concatenations, upsampling and the sigmoid stay fp32), and of those neither the first (its input
is the image, whose wide range int8 resolves coarsely) nor the last (the logits): on a synthetic
head that cut the pixels changing side of 0.15 from 97 to 24 of 974, the max change of
probability from 0.98 to 0.38. engines.py caches the result.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

RANGES_FORMAT = "cmbdetect-int8-ranges/1"


@contextlib.contextmanager
def _quiet_quantizer():
    """ONNX Runtime's quantisation tools log advice at WARNING on the root logger (pre-processing,
    biases it folds itself): not the user's business, and they would reach stderr."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)

QUANTIZED_OPS = ["Conv"]
METHODS = ("minmax", "percentile")


def calibration_inputs(cases: Iterable[np.ndarray], alignment: int, slices_per_case: int) -> Iterator[np.ndarray]:
    """(1, 3, h, w) inputs as detection builds them: each case preprocessed, its slices spread
    evenly through the head, each cut to its head box."""
    from .head import HALO_PX, head_boxes
    from .inference import neighbour_indices
    from .preprocess import preprocess

    for array in cases:
        stack, _ = preprocess(array, "calibration")
        boxes = head_boxes(stack, alignment, HALO_PX)
        inside = [i for i, b in enumerate(boxes) if b is not None]
        chosen = [inside[int(j)] for j in np.linspace(0, len(inside) - 1, min(slices_per_case, len(inside)))] if inside else []
        neighbours = neighbour_indices(stack.shape[0])
        for i in chosen:
            b = boxes[i]
            yield np.ascontiguousarray(stack[neighbours[i], b.r0 : b.r1, b.c0 : b.c1][None], dtype=np.float32)


def calibrate(fp32_model: bytes, inputs: Iterable[np.ndarray], method: str = "minmax", percentile: float = 99.999) -> dict:
    """Each activation's [low, high] over `inputs`, by ONNX Runtime's calibrator."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator

    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {', '.join(METHODS)}, not {method!r}")
    inputs = list(inputs)
    if not inputs:
        raise ValueError("no calibration inputs: the synthetic cases have no head slices")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(inputs)

        def get_next(self):
            x = next(self._it, None)
            return None if x is None else {"slices": x}

    with tempfile.TemporaryDirectory(prefix="cmbdetect-calibrate-") as tmp:
        model_path = Path(tmp) / "fp32.onnx"
        model_path.write_bytes(fp32_model)
        ort_method = CalibrationMethod.MinMax if method == "minmax" else CalibrationMethod.Percentile
        extra = {"percentile": percentile} if method == "percentile" else {}
        with _quiet_quantizer():
            calibrator = create_calibrator(model_path, QUANTIZED_OPS, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                           calibrate_method=ort_method, extra_options=extra)  # fmt: skip
            calibrator.collect_data(Reader())
            data = calibrator.compute_data()
    ranges = {name: [float(np.ravel(t.range_value[0])[0]), float(np.ravel(t.range_value[1])[0])] for name, t in data.data.items()}
    return {"format": RANGES_FORMAT, "method": method, **({"percentile": percentile} if method == "percentile" else {}),
            "n_inputs": len(inputs), "ranges": dict(sorted(ranges.items()))}  # fmt: skip


def quantize_with_ranges(fp32_model: bytes, calibration: dict) -> bytes:
    """The int8 (QDQ) model built from the fp32 export and the shipped ranges; no data."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantType
    from onnxruntime.quantization.calibrate import TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.quant_utils import save_and_reload_model_with_shape_infer

    if calibration.get("format") != RANGES_FORMAT:
        raise ValueError(f"int8 calibration of an unknown format {calibration.get('format')!r} (this version reads {RANGES_FORMAT})")
    model = save_and_reload_model_with_shape_infer(onnx.load_model_from_string(fp32_model))
    ranges = calibration["ranges"]
    convs = [node for node in model.graph.node if node.op_type in QUANTIZED_OPS]
    kept_fp32 = [convs[0].name, convs[-1].name] if len(convs) > 2 else []  # the graph is in topological order
    quantized = [node for node in convs if node.name not in kept_fp32]
    needed = {i for node in quantized for i in node.input[:1]} | {o for node in quantized for o in node.output}
    missing = sorted(needed - set(ranges))
    if missing:
        raise ValueError(f"the int8 calibration has no range for {len(missing)} activation(s) of this export "
                         f"(e.g. {missing[0]}): it was made with another exporter; run `cmbdetect quantize` again")  # fmt: skip
    tensors = TensorsData(CalibrationMethod.MinMax, {k: (np.float32(lo), np.float32(hi)) for k, (lo, hi) in ranges.items()})
    quantizer = QDQQuantizer(model, True, False, QuantType.QInt8, QuantType.QInt8, tensors, [], kept_fp32, QUANTIZED_OPS, {})
    with _quiet_quantizer():
        quantizer.quantize_model()
    return quantizer.model.model.SerializeToString()


def write_calibration(model_path: Path, card: dict, calibration: dict, weights_sha256: str) -> tuple[Path, dict]:
    """The ranges as `<weights>.int8.json` beside the weights, and the card naming them (sha256),
    each written to a temporary file and renamed into place, the card last."""
    import os

    from ..io import atomic_path, sha256_of

    path = model_path.with_name(model_path.stem + ".int8.json")
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(calibration, indent=1) + "\n")
    os.chmod(path, 0o644)
    card = dict(card)
    card["int8_calibration"] = {
        "file": path.name, "sha256": sha256_of(path), "weights_sha256": weights_sha256, "method": calibration["method"],
        "inputs": calibration["n_inputs"], "quantized_ops": QUANTIZED_OPS, "scheme": "QDQ, int8 weights per channel, int8 activations; every convolution but the first and the last",
        "source": calibration.get("source", ""),
    }  # fmt: skip
    card_file = model_path.with_suffix(".json")
    with atomic_path(card_file) as tmp:
        Path(tmp).write_text(json.dumps(card, indent=2) + "\n")
    os.chmod(card_file, 0o644)
    return path, card

