"""Resume: which cases of a batch are already done, and clearing what a killed run left.

A case is done when its `<case>_summary.json` (written last, so its presence means every
file of the case is in place) records the same parameters fingerprint as this run and every
file it lists exists. The fingerprint covers what decides the result: the model and the
candidate classifier (id, version and the sha256 of the weights as loaded, whatever their
cards record) and every detection parameter except those that only decide where and how fast
it runs (device, batch size); the precision enters as resolved (batch.py), not as asked, so a
run on a CPU where `auto` means bf16 does not resume an fp32 run's results, nor the reverse. The cmbdetect version is recorded in the
summary but not fingerprinted: `--force` redoes a folder after an upgrade.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..detection.records import DICOM_FILES, dicom_output_paths, every_output_path, output_paths
from ..detection.pipeline import DetectionParams, DetectionResult
from ..models import CardIdentity

# How write_case_outputs names its hidden staging folders: tempfile.mkdtemp(prefix=f".cmbdetect-{case}-")
# adds 8 random characters.
STAGING_PREFIX = ".cmbdetect-"
# Parameters that change where and how fast a case runs, not its result; the two models enter
# by what was loaded (id, version, sha256), not by the path or id that named them.
EXECUTION_ONLY = ("device", "batch_size", "model", "candidate_model")


def fingerprint_fields(params: DetectionParams, model: CardIdentity, classifier: CardIdentity | None) -> dict:
    """What the fingerprint is made of, kept in the summary so a reader sees why a case was redone.

    `classifier`: the candidate classifier this run uses, None for the single-stage pipeline.
    """
    decisive = {k: v for k, v in asdict(params).items() if k not in EXECUTION_ONLY}
    stage_two = {"classifier_id": None, "classifier_version": None, "classifier_sha256": None}
    if classifier is not None:
        stage_two = {"classifier_id": classifier.id, "classifier_version": classifier.version, "classifier_sha256": classifier.sha256}
    return {"model_id": model.id, "model_version": model.version, "model_sha256": model.sha256, **stage_two, **decisive}


def fingerprint(described: dict) -> str:
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class FingerprintedResult(DetectionResult):
    """A detection result whose summary also records the parameters fingerprint of its batch."""

    fingerprint: str = ""
    fingerprint_of: dict | None = None

    @classmethod
    def of(cls, result: DetectionResult, fingerprint: str, described: dict) -> "FingerprintedResult":
        values = {f.name: getattr(result, f.name) for f in fields(result) if f.init}
        return cls(**values, fingerprint=fingerprint, fingerprint_of=described)

    def summary(self) -> dict[str, object]:
        return {**super().summary(), "params_fingerprint": self.fingerprint, "params_fingerprinted": self.fingerprint_of}


def _read_summary(out_dir: Path, case: str) -> dict | None:
    try:
        summary = json.loads(output_paths(out_dir, case)["summary"].read_text())
    except (OSError, ValueError):
        return None  # absent, or cut short by a crash (a summary is renamed into place, but be safe)
    return summary if isinstance(summary, dict) else None


def done_summary(
    out_dir: Path, case: str, expected: str, preview: bool, series: str | None = None, dicom_dir: Path | None = None
) -> dict | None:
    """The summary of `case` when it is complete with fingerprint `expected`, else None.

    Complete means every output this run asks for is there: the preview when `preview`; with
    `series`, the case was read from that DICOM series; with `dicom_dir`, a case read from a
    DICOM series has its measurement report in that folder (and its SEG when it has lesions).
    """
    summary = _read_summary(out_dir, case)
    if summary is None or summary.get("params_fingerprint") != expected:
        return None
    listed = summary.get("files")
    if not isinstance(listed, dict) or (preview and "preview" not in listed):
        return None
    if not all(isinstance(name, str) and (Path(out_dir) / name).is_file() for name in listed.values()):
        return None
    source = summary.get("dicom_source")
    if series is not None and (not isinstance(source, dict) or source.get("series_instance_uid") != series):
        return None
    if dicom_dir is not None and isinstance(source, dict):
        report = listed.get("dicom_sr")
        wanted = dicom_output_paths(dicom_dir, case)["dicom_sr"]
        if report is None or (Path(out_dir) / report).resolve() != wanted.resolve():
            return None
    return summary


def remove_case_outputs(out_dir: Path, case: str, dicom_dir: Path | None = None) -> None:
    """Remove every file an earlier, different or interrupted run may have left for `case`,
    whatever its options (the summary first): in `out_dir`, the DICOM objects its summary
    lists wherever they are, and those of `case` in `dicom_dir`.

    Only files: anything else by those names is not ours, and the case will fail on it, by name.
    """
    listed = (_read_summary(out_dir, case) or {}).get("files")
    listed = listed if isinstance(listed, dict) else {}
    # Only files by our names: a summary is a plain file, and what it lists must not be a way
    # to delete anything else.
    dicom = [
        Path(out_dir) / listed[key] for key, name in DICOM_FILES.items()
        if isinstance(listed.get(key), str) and Path(listed[key]).name == name.format(case=case)
    ]  # fmt: skip
    if dicom_dir is not None:
        dicom += dicom_output_paths(dicom_dir, case).values()
    for path in [*reversed(list(every_output_path(out_dir, case).values())), *dicom]:
        if path.is_symlink() or path.is_file():
            try:
                path.unlink()
            except OSError:
                pass  # unremovable: writing the case over it will fail and say why


def staging_case(name: str) -> str | None:
    """The case a staging folder was made for: `.cmbdetect-<case>-<8 random characters>`."""
    if not name.startswith(STAGING_PREFIX) or len(name) < len(STAGING_PREFIX) + 10 or name[-9] != "-":
        return None
    return name[len(STAGING_PREFIX) : -9]


def remove_staging_debris(out_dir: Path, cases: set[str]) -> list[Path]:
    """Remove the hidden staging folders a killed run left for `cases`; returns what was removed.

    Called before any of those cases starts, so none of their staging folders can be live.
    Folders of other cases are left alone: several batches with disjoint case lists (a
    SLURM job array, say) may write into one output folder at the same time.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    debris = sorted(p for p in out_dir.iterdir() if staging_case(p.name) in cases and p.is_dir())
    for path in debris:
        shutil.rmtree(path, ignore_errors=True)
    return debris
