"""The site's cases for `cmbdetect adapt`: what each case is made of, and where cases come from.

Without torch (as training/adapt.py is not), so that CMBReviewLib's study source
(CMBReviewLib/adaptation.py) can build them in a process that never loads the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..errors import InputError
from ..io import case_name, is_volume_file, sha256_of


@dataclass
class SiteCase:
    name: str
    image: Path
    truth: Path
    phase: Path | None = None
    mimics: Path | None = None
    # The mimic map holds the detections readers judged incorrect (one region each, coded by
    # class, CLASSES 1..5), not the engine's whole mimic map: a region no candidate reaches is
    # still a sample, since a reader saw it there.
    verdicts: bool = False

    def inputs(self) -> dict[str, object]:
        """Each input file with its sha256: what the model was adapted from."""
        out: dict[str, object] = {"case": self.name}
        for role in ("image", "truth", "phase", "mimics"):
            path = getattr(self, role)
            if path is not None:
                out[role], out[f"{role}_sha256"] = str(Path(path).absolute()), sha256_of(path)
        return out


class SiteSource(Protocol):
    """Where the site's cases come from (labelled folders, a review study)."""

    description: str  # the card's training_data source

    def cases(self, work: Path) -> list[SiteCase]:
        """The cases, checked; files a source derives (consensus label maps) go under `work`.
        Raises InputError naming every bad case."""
        ...

    def provenance(self) -> dict:
        """What the card records of the source beyond each case's files and sha256."""
        ...


@dataclass
class LabelledFolders:
    """--images DIR --truth DIR [--phase DIR]."""

    images: Path
    truth: Path
    phase: Path | None = None
    description: str = "the site's labelled cases (cmbdetect adapt --images --truth)"

    def cases(self, work: Path) -> list[SiteCase]:
        return list_site_cases(self.images, self.truth, self.phase)

    def provenance(self) -> dict:
        return {"kind": "labelled folders", "images": str(Path(self.images).absolute()), "truth": str(Path(self.truth).absolute()),
                "phase": str(Path(self.phase).absolute()) if self.phase else None}  # fmt: skip


def _volumes(folder: Path) -> dict[str, Path]:
    """Volumes of a folder by case name (`<case>.seg.nrrd` is case `<case>`)."""
    out: dict[str, Path] = {}
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            if p.is_file() and not p.name.startswith(".") and is_volume_file(p):
                name = case_name(p)
                out[name.removesuffix(".seg")] = p
    return out


def list_site_cases(images: Path, truth: Path, phase: Path | None = None) -> list[SiteCase]:
    """The site's cases: images/<case>.*, truth as `evaluate --truth` reads it (TRUTH/labels/ when
    there is one, else TRUTH itself; `.seg.nrrd` too), TRUTH/mimics/ and PHASE/<case>.* optional.
    Every problem is collected, so one InputError names them all."""
    images, truth = Path(images), Path(truth)
    for folder, what in ((images, "--images"), (truth, "--truth")):
        if not folder.is_dir():
            raise InputError(f"{what} {folder} is not a folder")
    if phase is not None and not Path(phase).is_dir():
        raise InputError(f"--phase {phase} is not a folder")
    found = _volumes(images)
    if not found:
        raise InputError(f"no images (NIfTI, NRRD, MHA) in {images}")
    label_dir = truth / "labels" if (truth / "labels").is_dir() else truth
    labels = _volumes(label_dir)
    mimics = _volumes(truth / "mimics") if label_dir != truth else {}
    phases = _volumes(Path(phase)) if phase is not None else {}
    problems = [f"{name}: no label map {name}.nii.gz / .nrrd / .seg.nrrd in {label_dir}" for name in found if name not in labels]
    if problems:
        raise InputError("\n".join(problems))
    return [SiteCase(n, p, labels[n], phases.get(n), mimics.get(n)) for n, p in found.items()]
