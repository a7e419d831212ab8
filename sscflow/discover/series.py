"""Series: files grouped by SeriesInstanceUID, each checked against the ``discover`` rules.

A series is eligible when it is an axial ORIGINAL CT image stack in one folder, with one
orientation and one frame of reference, evenly spaced slices (no gap, no duplicated position, no
tilt), enough craniocaudal coverage, thin slices, no contrast, inspiratory and supine. The first
rule a series fails (in the order of RULES) is its exclusion reason.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np

from sscflow.discover.settings import DiscoverConfig
from sscflow.discover.slices import SliceLayoutError, check_slice_layout

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

# every series-level rule, in the order they are checked, with its text for excluded.csv
RULES = {
    "inconsistent_series": "files of one series disagree on patient or study",
    "not_ct": "not a CT image series (other modality, dose report, secondary capture)",
    "localizer": "localizer / scout",
    "derived": "not an ORIGINAL image (MPR, reformat, derived or secondary)",
    "no_geometry": "slices without position or orientation",
    "mixed_orientation": "slices with different orientations",
    "not_axial": "not axial",
    "mixed_frame_of_reference": "slices in several frames of reference",
    "several_folders": "files spread over several folders",
    "truncated_file": "a file whose pixel data is cut short",
    "duplicate_position": "duplicated slice position",
    "missing_slice": "missing slice (a gap in slice positions)",
    "uneven_spacing": "uneven slice spacing",
    "gantry_tilt": "gantry tilt",
    "too_few_slices": "fewer than 2 slices",
    "too_short": "too short to cover a chest",
    "thick_slices": "slices too thick",
    "contrast": "contrast-enhanced",
    "expiratory": "expiratory",
    "not_supine": "not supine",
    "not_lung_kernel": "not a lung kernel",
}


@dataclass
class Series:
    """One series as read from its files' headers."""

    uid: str
    files: list = field(default_factory=list)  # (path, tags) per file

    def first(self, name, default=None):
        for _, t in self.files:
            v = t.get(name)
            if v not in (None, "", []):
                return v
        return default

    def values(self, name) -> set:
        return {_key(t.get(name)) for _, t in self.files}


@dataclass
class SeriesCheck:
    """A series after the checks: ``rule`` empty when eligible, else the first failed rule."""

    uid: str
    patient_id: str
    study_uid: str
    folder: str
    rule: str = ""
    detail: str = ""
    n_files: int = 0
    thickness_mm: float | None = None
    spacing_mm: float | None = None
    extent_mm: float | None = None
    lung_kernel: bool = False
    series_number: float = 0.0
    date: str = ""  # YYYYMMDD, of the study (falls back to the series' own dates)
    birth_date: str = ""
    sex: str = ""
    age: str = ""  # PatientAge as written, e.g. 064Y

    @property
    def eligible(self) -> bool:
        return not self.rule

    def rank(self) -> tuple:
        """Smaller is better: lung kernel, thinner, finer spacing, longer, series number, UID."""
        return (
            not self.lung_kernel,
            self.thickness_mm or 99.0,
            self.spacing_mm or 99.0,
            -(self.extent_mm or 0.0),
            self.series_number,
            self.uid,
        )


def _key(v):
    return tuple(v) if isinstance(v, list) else v


def _text(v) -> str:
    if isinstance(v, list):
        return "\\".join(str(x) for x in v)
    return "" if v is None else str(v)


def _number(v) -> float | None:
    if isinstance(v, list):
        v = v[0] if v else None
    try:
        return float(v) if v not in (None, "") else None
    except (TypeError, ValueError):
        return None


def group_series(records) -> dict[str, Series]:
    """Readable image files (status 'ok', with a SeriesInstanceUID) grouped by series."""
    out: dict[str, Series] = {}
    for path, _status, _problem, tags in records:
        uid = tags.get("SeriesInstanceUID")
        if isinstance(uid, str) and uid:
            out.setdefault(uid, Series(uid)).files.append((path, tags))
    return out


def check_series(s: Series, cfg: DiscoverConfig) -> SeriesCheck:
    """Check one series against the rules; never raises for bad headers."""
    pids, studies = s.values("PatientID"), s.values("StudyInstanceUID")
    folders = {os.path.dirname(p) for p, _ in s.files}
    date = _text(s.first("StudyDate") or s.first("SeriesDate") or s.first("AcquisitionDate"))
    kernel = _text(s.first("ConvolutionKernel", "")).split("\\")[0].strip()
    c = SeriesCheck(
        uid=s.uid,
        patient_id=_text(s.first("PatientID", "")),
        study_uid=_text(s.first("StudyInstanceUID", "")),
        folder=sorted(folders)[0],
        n_files=len(s.files),
        thickness_mm=_number(s.first("SliceThickness")),
        lung_kernel=cfg.is_lung_kernel(kernel),
        series_number=_number(s.first("SeriesNumber")) or 0,
        date=date[:8],
        birth_date=_text(s.first("PatientBirthDate", ""))[:8],
        sex=_text(s.first("PatientSex", "")).upper(),
        age=_text(s.first("PatientAge", "")),
    )

    def fail(rule, detail=""):
        c.rule, c.detail = rule, detail or RULES[rule]
        return c

    if len(pids) > 1 or len(studies) > 1:
        return fail(
            "inconsistent_series",
            f"files of one series carry {len(pids)} PatientIDs "
            f"and {len(studies)} StudyInstanceUIDs",
        )
    modality, sop = _text(s.first("Modality", "")), _text(s.first("SOPClassUID", ""))
    if sop == ENHANCED_CT:
        return fail(
            "not_ct",
            "enhanced (multi-frame) CT is not supported: export the series as classic CT images",
        )
    if modality != "CT" or sop != CT_IMAGE:
        kind = {"SR": "a structured report (dose report)"}.get(modality, f"modality {modality!r}")
        if sop == SECONDARY_CAPTURE:
            kind = "a secondary capture"
        return fail("not_ct", f"not a CT image series: {kind}")
    image_type = [str(v).upper() for v in (s.first("ImageType") or [])]
    if isinstance(s.first("ImageType"), str):
        image_type = s.first("ImageType").upper().split("\\")
    if "LOCALIZER" in image_type or re.search(
        r"scout|topogram|localizer|surview", _text(s.first("SeriesDescription", "")), re.I
    ):
        return fail("localizer", "localizer / scout (ImageType or description)")
    if not image_type or image_type[0] != "ORIGINAL":
        written = "/".join(image_type) or "(none)"
        return fail(
            "derived",
            f"ImageType {written}: not an ORIGINAL image (MPR, reformat, derived or secondary)",
        )
    try:
        pos = np.array([[float(v) for v in t["ImagePositionPatient"]] for _, t in s.files])
        ori = np.array([[float(v) for v in t["ImageOrientationPatient"]] for _, t in s.files])
        if pos.shape[1:] != (3,) or ori.shape[1:] != (6,):
            raise ValueError
    except (TypeError, ValueError, KeyError):
        return fail("no_geometry", "slices without ImagePositionPatient or ImageOrientationPatient")
    if len(s.values("FrameOfReferenceUID")) > 1:
        return fail("mixed_frame_of_reference")
    if len(folders) > 1:
        return fail(
            "several_folders",
            f"files spread over {len(folders)} folders; ingest reads a series from one folder",
        )
    truncated = [t for _, t in s.files if t.get("_pixel") != "ok"]
    if truncated:
        return fail(
            "truncated_file", f"{len(truncated)} file(s) with pixel data cut short or missing"
        )
    try:
        layout = check_slice_layout(pos, ori, tilt_deg=_number(s.first("GantryDetectorTilt")) or 0)
    except SliceLayoutError as exc:
        return fail(exc.rule if exc.rule in RULES else "no_geometry", exc.detail)
    c.spacing_mm, c.extent_mm = layout.spacing_mm, layout.extent_mm
    if c.thickness_mm is None:
        c.thickness_mm = layout.spacing_mm
    if layout.axial_angle_deg > cfg.max_axial_angle_deg:
        return fail(
            "not_axial",
            f"not axial: slice normal {layout.axial_angle_deg:.0f} degrees "
            "from the body axis (coronal, sagittal or oblique)",
        )
    if layout.extent_mm < cfg.min_extent_mm:
        return fail(
            "too_short",
            f"covers {layout.extent_mm:.1f} mm; a chest needs "
            f"discover.min_extent_mm = {cfg.min_extent_mm:g} mm",
        )
    if c.thickness_mm > cfg.max_slice_thickness_mm + 1e-6:
        return fail(
            "thick_slices",
            f"slice thickness {c.thickness_mm:g} mm > "
            f"discover.max_slice_thickness_mm = {cfg.max_slice_thickness_mm:g} mm",
        )
    described = " ".join(_text(s.first(n, "")) for n in ("SeriesDescription", "ProtocolName"))
    if not cfg.allow_contrast:
        agent = [
            n
            for n in (
                "ContrastBolusAgent",
                "ContrastBolusRoute",
                "ContrastBolusVolume",
                "ContrastBolusIngredient",
            )
            if _text(s.first(n, "")).strip().upper() not in ("", "NONE", "NO", "0")
        ]
        if agent:
            return fail("contrast", f"contrast-enhanced ({agent[0]} present)")
        if any(re.search(p, described, re.I) for p in cfg.contrast_patterns):
            return fail("contrast", "contrast-enhanced (series description)")
    if any(re.search(p, described, re.I) for p in cfg.expiratory_patterns):
        return fail("expiratory", "expiratory (series description)")
    position = _text(s.first("PatientPosition", "")).upper()
    if position not in cfg.patient_positions:
        return fail(
            "not_supine",
            f"patient position {position or '(not recorded)'}; "
            f"discover.patient_positions = {list(cfg.patient_positions)}",
        )
    if cfg.require_lung_kernel and not c.lung_kernel:
        return fail(
            "not_lung_kernel",
            f"kernel {kernel or '(none)'} is not a lung kernel (discover.lung_kernels)",
        )
    return c
