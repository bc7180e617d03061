"""Test volumes and a hand-wired model whose answer is known, for end-to-end pipeline tests.

The hand-wired "dark-spot" network is the paper's U-Net with weights set by hand so that
its output is a steep function of the centre slice's intensity: dark voxels get high
probability. Air is dark too, but it forms one huge component that the 2-10 mm size filter
drops, so what remains are the dark spheres placed in tissue. That lets the tests check the
plumbing (preprocessing, inverse, lesion sizing, outputs, geometry) against known answers
without pretending any trained model detects anything.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from CMBDetectLib.detection.candidates import save_classifier
from CMBDetectLib.detection.classifier import CandidateNet, ClassifierConfig
from CMBDetectLib.detection.records import CLASSES
from CMBDetectLib.io import Geometry
from CMBDetectLib.models import save_model
from CMBDetectLib.detection.network import NetworkConfig, ResUNet, ResidualBlock

DARK_GAIN = 40.0  # logit = DARK_BIAS - DARK_GAIN * intensity, intensity in [0, 1]
DARK_BIAS = 4.0  # probability >= 0.4 below an intensity of about 0.11


def dark_spot_network(base_channels: int = 4) -> ResUNet:
    net = ResUNet(NetworkConfig(base_channels=base_channels))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.zero_()
                if m.bias is not None:
                    m.bias.zero_()
        # Channel 0 carries the centre slice through the top level unchanged; every other
        # path is zero, and residual blocks with zero convolutions are identities.
        enc0 = net.encoder[0]
        enc0[0][0].weight[0, 1, 1, 1] = 1.0  # input channel 1 is slice i
        enc0[1][0].weight[0, 0, 1, 1] = 1.0
        dec0 = net.decoder[-1]
        dec0.fuse[0][0].weight[0, 0, 1, 1] = 1.0  # the skip comes first in the concatenation
        dec0.fuse[1][0].weight[0, 0, 1, 1] = 1.0
        net.head.weight[0, 0, 0, 0] = -DARK_GAIN
        net.head.bias[0] = DARK_BIAS
    assert any(isinstance(m, ResidualBlock) for m in net.modules())
    return net.eval()


def save_dark_spot_model(path: Path, base_channels: int = 4, candidate_classifier: Path | None = None) -> Path:
    card = {
        "id": "test-dark-spot",
        "version": "test",
        "trained": False,
        "description": "hand-wired test network: probability is high where the centre slice is dark",
    }
    if candidate_classifier is not None:
        card["candidate_classifier"] = str(candidate_classifier)
    save_model(dark_spot_network(base_channels), path, card)
    return path


def dark_spot_probability(array: np.ndarray) -> np.ndarray:
    """Stage 1 by the hand-wired dark-spot network: every dark voxel is a candidate, so what a
    test checks rests on the candidate classifier alone."""
    from CMBDetectLib.detection.inference import predict_stack
    from CMBDetectLib.detection.preprocess import preprocess, restore

    stack, info = preprocess(array, "phantom")
    return restore(predict_stack(dark_spot_network(), stack, torch.device("cpu")), info)


def shipped_classifier():
    """The candidate classifier the registry's default detector names."""
    from CMBDetectLib import models
    from CMBDetectLib.detection.candidates import load_candidate_classifier

    registry = models.read_registry()
    detector = next(e for e in registry["models"] if e["id"] == registry["default"])
    return load_candidate_classifier(detector["candidate_classifier"])


def constant_classifier(path: Path, keep_at: float, favourite: str | None = None) -> Path:
    """A classifier whose answer does not depend on the patch: all weights zero, the head's bias
    alone sets the softmax (uniform, or one class favoured). For plumbing tests only."""
    torch.manual_seed(0)
    net = CandidateNet(ClassifierConfig(width=4))
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        if favourite is not None:
            net.head.bias[CLASSES.index(favourite)] = 3.0
    save_classifier(net, path, {"id": "test-constant", "version": "test", "stage": {"keep_at": keep_at}})
    return path


def oblique_geometry(spacing=(0.45, 0.6, 2.0), angles_deg=(12.0, -8.0, 27.0), origin=(31.5, -12.25, 7.0)) -> Geometry:
    direction = Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix()
    return Geometry(tuple(map(float, spacing)), tuple(map(float, origin)), tuple(float(v) for v in direction.ravel()))


def phantom(
    shape=(12, 200, 240),
    geometry: Geometry | None = None,
    spheres_mm: list[tuple[tuple[int, int, int], float]] | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, Geometry, list[tuple[tuple[int, int, int], float]]]:
    """An SWI-like head: dark air, bright elliptical tissue with noise, dark spheres.

    spheres_mm: ((k, j, i) centre, diameter mm). Returns the array (k, j, i), geometry, spheres.
    """
    geometry = geometry or oblique_geometry()
    rng = np.random.default_rng(seed)
    k, rows, cols = shape
    jj, ii = np.mgrid[0:rows, 0:cols]
    head = ((jj - rows / 2) / (0.45 * rows)) ** 2 + ((ii - cols / 2) / (0.45 * cols)) ** 2 < 1
    array = np.where(head, 420.0, 8.0)[None].repeat(k, axis=0).astype(np.float32)
    array += rng.normal(0, 6, array.shape).astype(np.float32)
    if spheres_mm is None:
        spheres_mm = [((k // 2, rows // 2, cols // 2 - 40), 4.0), ((k // 2 - 1, rows // 2 + 30, cols // 2 + 45), 7.0)]
    sx, sy, sz = geometry.spacing
    kk, jj3, ii3 = np.mgrid[0:k, 0:rows, 0:cols]
    for (ck, cj, ci), diameter in spheres_mm:
        r2 = ((kk - ck) * sz) ** 2 + ((jj3 - cj) * sy) ** 2 + ((ii3 - ci) * sx) ** 2
        array[r2 <= (diameter / 2) ** 2] = 10.0
    return np.abs(array), geometry, spheres_mm


def write_dicom_series(
    folder: Path,
    array: np.ndarray,
    geometry: Geometry,
    series_uid: str,
    study_uid: str = "1.2.826.0.1.3680043.8.498.10",
    frame_uid: str = "1.2.826.0.1.3680043.8.498.11",
    description: str = "SWI magnitude",
) -> list[Path]:
    """A single-frame MR series as GDCM writes it through SimpleITK (one ImageFileWriter per
    slice, SimpleITK's own recipe: its ImageSeriesWriter refuses DICOM), with the tags a scanner
    sets: study, series and frame-of-reference UIDs, position and orientation per slice, pixel
    spacing, slice thickness, modality MR. GDCM fills in the rest (pixel spacing from the
    image, and a Spacing Between Slices of 1, whatever the slices' spacing: a 2D slice has no
    third spacing).

    GDCM's writer leaves the process in the C locale (LC_ALL=C, so that open() then reads
    ASCII, not UTF-8): the locale is restored afterwards, or every later test that reads a
    UTF-8 file would fail for it."""
    import locale

    import SimpleITK as sitk

    saved = locale.setlocale(locale.LC_ALL, None)
    try:
        return _write_dicom_slices(folder, array, geometry, series_uid, study_uid, frame_uid, description, sitk)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_dicom_slices(folder, array, geometry, series_uid, study_uid, frame_uid, description, sitk) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.round(array).astype(np.int16))
    image.SetSpacing(geometry.spacing), image.SetOrigin(geometry.origin), image.SetDirection(geometry.direction)
    d = geometry.direction_matrix
    orientation = "\\".join(f"{v:.10f}" for v in (*d[:, 0], *d[:, 1]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    written = []
    for k in range(array.shape[0]):
        s = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "MR", "0008|0016": "1.2.840.10008.5.1.4.1.1.4", "0008|0018": f"{series_uid}.{k + 1}",
            "0020|000d": study_uid, "0020|000e": series_uid, "0020|0052": frame_uid, "0008|103e": description,
            "0020|0037": orientation, "0020|0032": "\\".join(f"{v:.10f}" for v in position),
            "0020|0013": str(k + 1), "0018|0050": f"{geometry.spacing[2]:g}", "0010|0020": "CMB-TEST-1", "0010|0010": "Test^Phantom",
        }  # fmt: skip
        for tag, value in tags.items():
            s.SetMetaData(tag, value)
        path = folder / f"{series_uid.rsplit('.', 1)[-1]}_{k:03d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(s)
        written.append(path)
    return written
