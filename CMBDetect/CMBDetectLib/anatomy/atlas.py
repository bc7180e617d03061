"""The shipped atlas (Resources/Atlas/, built by build_atlas.py): the registration target and the
MARS structure labels on one 2 mm MNI grid, and the look-up of a template point's location."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

HEAD_FILE = "template_head_2mm.nii.gz"
LABELS_FILE = "structures_2mm.nii.gz"
ATLAS_JSON = "atlas.json"
STEP_MM = 2.0
UNKNOWN = "unknown"
MARS_REGIONS = ("lobar", "deep", "infratentorial")
SIDES = ("left", "right", "midline")
# (structure, MARS category), in label order; each lateral one comes as left and right. The
# vocabulary of the shipped labels (structures.py draws them, export/codes.py codes them).
STRUCTURES: tuple[tuple[str, str], ...] = (
    ("brainstem", "infratentorial"),
    ("cerebellum", "infratentorial"),
    ("basal_ganglia", "deep"),
    ("thalamus", "deep"),
    ("internal_capsule", "deep"),
    ("external_capsule", "deep"),
    ("corpus_callosum", "deep"),
    ("deep_white_matter", "deep"),
    *((f"{lobe}_{layer}", "lobar") for lobe in ("frontal", "parietal", "temporal", "occipital", "insula")
      for layer in ("cortex", "white_matter")),
)  # fmt: skip
# A point that lands outside every structure (in a sulcus, a ventricle, just outside the brain)
# takes the nearest structure within this distance; farther out it is unknown, not guessed.
SNAP_MM = 4.0


@dataclass(frozen=True)
class Location:
    mars_region: str = UNKNOWN  # lobar | deep | infratentorial | unknown
    mars_structure: str = UNKNOWN
    side: str = UNKNOWN  # left | right | midline | unknown

    def as_dict(self) -> dict[str, str]:
        return {"mars_region": self.mars_region, "mars_structure": self.mars_structure, "side": self.side}


UNKNOWN_LOCATION = Location()


def atlas_dir() -> Path:
    return Path(__file__).resolve().parent.parent.parent / "Resources" / "Atlas"


@dataclass(frozen=True)
class Atlas:
    head: sitk.Image  # float32, the registration target (LPS physical space = MNI with x, y negated)
    labels: sitk.Image  # uint8 structure labels on the same grid
    nearest: np.ndarray  # (3, K, J, I) index of the nearest labelled voxel, for snapping
    distance_mm: np.ndarray  # (K, J, I) to that voxel
    table: dict[int, Location]
    version: str

    @property
    def brain(self) -> sitk.Image:
        return sitk.Cast(self.labels > 0, sitk.sitkUInt8)

    def locate(self, template_lps: np.ndarray) -> list[Location]:
        """Locations of points given in the template's physical space (LPS mm), (N, 3)."""
        labels = sitk.GetArrayViewFromImage(self.labels)
        out = []
        for point in np.reshape(np.asarray(template_lps, float), (-1, 3)):
            index = np.rint(self.labels.TransformPhysicalPointToContinuousIndex(tuple(map(float, point))))[::-1].astype(int)
            if np.any(index < 0) or np.any(index >= labels.shape):
                out.append(UNKNOWN_LOCATION)
                continue
            kji = tuple(index)
            if self.distance_mm[kji] > SNAP_MM:
                out.append(UNKNOWN_LOCATION)
                continue
            value = int(labels[tuple(self.nearest[(slice(None), *kji)])])
            out.append(self.table.get(value, UNKNOWN_LOCATION))
        return out


@functools.lru_cache(maxsize=2)
def load_atlas(folder: str | None = None) -> Atlas:
    """The atlas, read once per process. RuntimeError when its files are missing or damaged."""
    root = Path(folder) if folder else atlas_dir()
    try:
        card = json.loads((root / ATLAS_JSON).read_text())
        head = sitk.ReadImage(str(root / HEAD_FILE), sitk.sitkFloat32)
        labels = sitk.ReadImage(str(root / LABELS_FILE), sitk.sitkUInt8)
    except (OSError, ValueError, RuntimeError) as exc:
        raise RuntimeError(f"the MARS atlas in {root} cannot be read ({exc}); reinstall the extension or rebuild it "
                           "(python -m CMBDetectLib.anatomy.build_atlas)") from None  # fmt: skip
    array = sitk.GetArrayFromImage(labels)
    distance, nearest = ndimage.distance_transform_edt(array == 0, return_indices=True)
    table = {int(r["value"]): Location(str(r["mars_region"]), str(r["structure"]), str(r["side"])) for r in card["labels"]}
    return Atlas(head, labels, nearest.astype(np.int16), (distance * STEP_MM).astype(np.float32), table, str(card.get("version", "")))


def lps_to_mni(points: np.ndarray) -> np.ndarray:
    """Template physical space (LPS, as ITK reads the NIfTI) to MNI mm (RAS)."""
    return np.reshape(np.asarray(points, float), (-1, 3)) * np.array([-1.0, -1.0, 1.0])


def truth_at(mni: np.ndarray) -> list[dict[str, str]]:
    """The MARS region, structure and side at template points given in MNI mm (N, 3), read
    from the shipped structure map as a lesion is: the generator's truth (synth/case.py). The map
    is built from the generator's own anatomy (structures.py), so reading it costs a look-up,
    not the 20 s of drawing the structures again in every process."""
    return [where.as_dict() for where in load_atlas().locate(lps_to_mni(mni))]  # the same flip both ways
