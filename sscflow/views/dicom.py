"""``sscflow export --format dicom``: results that open beside the CT in OHIF, 3D Slicer, Orthanc.

Per patient, into ``OUT/<patient_id>/``:

- ``CT/CT0001.dcm ...``: the store's baseline on its canonical grid as a CT series (one file per
  slice, int16 HU with slope 1 and intercept 0, lung window), the series the other objects
  reference;
- ``lung_mask.SEG.dcm``: the baseline lung mask as a binary DICOM Segmentation (segment 1,
  "lung", SNOMED 39607008) referencing every CT slice;
- ``log_jacobian.PM.dcm``: the log-Jacobian map as a DICOM Parametric Map, 32-bit float pixel
  data with a real world value mapping of slope 1 and intercept 0 (the stored values, unit UCUM
  "1": a log of a volume ratio has none), labelled "log-Jacobian; negative where lung shrinks".
  Voxels not measured (outside the lungs) are IEEE NaN, which Float Pixel Data may hold (PS3.5
  section 8); the mapping's value range covers the finite values only. The template-space map is
  on the template's grid, which has no CT series, and is not exported as DICOM.

De-identified by construction: PatientName and PatientID are the pseudonym, there is no date or
time from the input (study and series dates are empty, ``LongitudinalTemporalInformationModified``
is REMOVED; the SEG and the map carry the time of the export as their content date), no birth
date, institution, accession number or physician; ``PatientIdentityRemoved`` is YES and
``DeidentificationMethod`` / ``DeidentificationMethodCodeSequence`` come from
:data:`sscflow.discover.DEIDENTIFICATION`. Every UID is ``2.25.<integer>`` (see
:func:`sscflow.discover.pseudonym.keyed_uid`), keyed by a SHA-256 digest of the patient's stored
baseline (its voxels and grid) and named by the pseudonym and the object's role: the same store
exports the same UIDs again (a viewer or Orthanc replaces rather than duplicates), two cohorts
that reuse a pseudonym (``P0001``) do not collide, and no original UID is an input, so nothing
leads back to the PACS.
"""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import numpy as np

from sscflow.core import store as st
from sscflow.core.geometry import index_to_physical
from sscflow.discover import DEIDENTIFICATION
from sscflow.discover.pseudonym import keyed_uid
from sscflow.errors import IncompleteOutputError, SscflowError

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SIGN_CONVENTION = "log-Jacobian; negative where lung shrinks"
LUNG_WINDOW = (-600.0, 1500.0)  # centre, width (HU)
# PS3.15 codes that hold for these objects: dates are removed, so no 'modified dates' option
_CODES = [c for c in DEIDENTIFICATION["codes"] if c[0] != "113107"]


def _highdicom():
    try:
        import highdicom
    except ImportError:
        raise SscflowError("--format dicom needs highdicom: pip install 'sscflow[dicom]'") from None
    return highdicom


def _ds(value: float) -> str:
    """A DS value (at most 16 characters) to a micrometre or better."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


class _Uids:
    """The keyed UIDs of one patient's export."""

    def __init__(self, pseudonym: str, baseline: np.ndarray, geometry):
        h = hashlib.sha256(b"sscflow-dicom-export/1\0")
        h.update(repr((geometry.shape, geometry.spacing, geometry.origin,
                       geometry.direction)).encode())  # fmt: skip
        h.update(np.ascontiguousarray(baseline).tobytes())
        self.secret, self.pseudonym = h.digest(), pseudonym

    def __call__(self, role: str) -> str:
        return keyed_uid(self.secret, f"{self.pseudonym}/{role}")


def _deidentification(ds) -> None:
    """The PS3.15 attributes every object carries."""
    from pydicom.dataset import Dataset

    ds.PatientIdentityRemoved = "YES"
    text = (f"sscflow de-identification version {DEIDENTIFICATION['version']}: "
            f"{DEIDENTIFICATION['method']}; pseudonyms {DEIDENTIFICATION['pseudonyms']}; "
            "DICOM export: keyed 2.25 UIDs, no dates")  # fmt: skip
    ds.DeidentificationMethod = textwrap.wrap(text.replace("\\", "/"), 64)
    items = []
    for value, scheme, meaning in _CODES:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
        items.append(item)
    ds.DeidentificationMethodCodeSequence = items
    ds.LongitudinalTemporalInformationModified = "REMOVED"


def ct_series(array: np.ndarray, geometry, pseudonym: str, uids: _Uids) -> list:
    """The baseline as single-frame CT datasets (pydicom), slice k of the array first to last."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    from sscflow import __version__

    d = np.asarray(geometry.direction, float)  # columns: the x, y, z index axes
    orientation = [_ds(v) for v in (*d[:, 0], *d[:, 1])]
    sz, sy, sx = geometry.spacing
    hu = np.asarray(array)
    if hu.dtype != np.int16:
        hu = np.clip(np.rint(hu), -32768, 32767).astype(np.int16)
    out = []
    for k in range(geometry.shape[0]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CT_STORAGE
        ds.SOPClassUID = CT_STORAGE
        ds.SOPInstanceUID = uids(f"ct/instance/{k}")
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientName = f"{pseudonym}^"  # the family name; the caret marks a one-part name
        ds.PatientID = pseudonym
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        _deidentification(ds)
        ds.StudyInstanceUID = uids("study")
        ds.StudyDate, ds.StudyTime, ds.StudyID = "", "", "1"  # no date (type 2: empty)
        ds.ReferringPhysicianName, ds.AccessionNumber = "", ""
        ds.StudyDescription = "sscflow"
        ds.Modality = "CT"
        ds.BodyPartExamined = "CHEST"
        ds.SeriesInstanceUID = uids("ct/series")
        ds.SeriesNumber = 1
        ds.SeriesDescription = "baseline, sscflow canonical grid"
        ds.FrameOfReferenceUID = uids("frame-of-reference")
        ds.PositionReferenceIndicator = ""
        ds.Manufacturer = "sscflow"
        ds.SoftwareVersions = __version__
        ds.InstanceNumber = k + 1
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.AcquisitionNumber = ""
        ds.KVP = ""
        ds.PatientPosition = ""
        ds.ImageOrientationPatient = orientation
        corner = index_to_physical((k, 0, 0), geometry)[::-1]  # x, y, z (LPS)
        ds.ImagePositionPatient = [_ds(v) for v in corner]
        ds.PixelSpacing = [_ds(sy), _ds(sx)]  # between rows (y), between columns (x)
        ds.SliceThickness = _ds(sz)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(geometry.shape[1]), int(geometry.shape[2])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
        ds.WindowCenter, ds.WindowWidth = _ds(LUNG_WINDOW[0]), _ds(LUNG_WINDOW[1])
        ds.PixelData = np.ascontiguousarray(hu[k]).astype("<i2").tobytes()
        out.append(ds)
    return out


def _equipment() -> dict:
    from sscflow import __version__

    return {"manufacturer": "sscflow", "manufacturer_model_name": "sscflow",
            "software_versions": __version__, "device_serial_number": "0"}  # fmt: skip


def lung_segmentation(ct: list, mask: np.ndarray, uids: _Uids):
    """The lung mask (on the CT's grid) as a binary DICOM SEG referencing ``ct``."""
    hd = _highdicom()
    from pydicom.sr.codedict import codes

    from sscflow import __version__

    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="lung",
        segmented_property_category=codes.SCT.Organ, segmented_property_type=codes.SCT.Lung,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="sscflow segment", version=__version__,
            family=codes.cid7162.HistogramAnalysis),
    )  # fmt: skip
    seg = hd.seg.Segmentation(
        source_images=ct, pixel_array=np.asarray(mask) > 0,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment], series_instance_uid=uids("seg/series"), series_number=2,
        sop_instance_uid=uids("seg/instance"), instance_number=1,
        content_description="lung mask (sscflow)", content_label="LUNG",
        omit_empty_frames=False, **_equipment(),
    )  # fmt: skip
    seg.SeriesDescription = "lung mask, sscflow"
    _deidentification(seg)
    return seg


def parametric_map(ct: list, values: np.ndarray, uids: _Uids, *, role: str = "log_jacobian"):
    """A float map (on the CT's grid) as a DICOM Parametric Map referencing ``ct``: 32-bit
    float pixel data (NaN where not measured), a real world value mapping of slope 1 without
    unit, the sign convention in the mapping's explanation and the content description."""
    hd = _highdicom()
    from pydicom.sr.codedict import codes

    values = np.asarray(values, np.float32)
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="LOGJAC", lut_explanation=SIGN_CONVENTION, unit=codes.UCUM.NoUnits,
        value_range=(lo, hi), slope=1.0, intercept=0.0,
    )  # fmt: skip
    half = max(abs(lo), abs(hi), 1e-3)
    pm = hd.pm.ParametricMap(
        source_images=ct, pixel_array=values, series_instance_uid=uids(f"{role}/series"),
        series_number=3, sop_instance_uid=uids(f"{role}/instance"), instance_number=1,
        contains_recognizable_visual_features=False, real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(
            window_center=0.0, window_width=2 * half, voi_lut_function="LINEAR_EXACT")],
        content_description=SIGN_CONVENTION,
        content_label="LOGJAC", **_equipment(),
    )  # fmt: skip
    pm.SeriesDescription = SIGN_CONVENTION
    pm.BodyPartExamined = "CHEST"
    _deidentification(pm)
    return pm


def _write_atomic_dicom(ds, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".partial-" + path.name)
    ds.save_as(tmp, enforce_file_format=True)
    tmp.replace(path)  # a killed export leaves no half-written file under the final name
    return path


def write_patient_dicom(folder, pseudonym: str, geometry, baseline: np.ndarray,
                        lung_mask=None, log_jacobian=None) -> list[Path]:  # fmt: skip
    """The CT series of ``baseline`` on ``geometry`` (any direction) into ``folder/CT/``, and the
    mask and the map given (on the same grid) as SEG and Parametric Map beside it."""
    _highdicom()
    folder = Path(folder)
    uids = _Uids(pseudonym, baseline, geometry)
    ct = ct_series(baseline, geometry, pseudonym, uids)
    written = [_write_atomic_dicom(ds, folder / "CT" / f"CT{k + 1:04d}.dcm")
               for k, ds in enumerate(ct)]  # fmt: skip
    if lung_mask is not None:
        written.append(_write_atomic_dicom(lung_segmentation(ct, lung_mask, uids),
                                           folder / "lung_mask.SEG.dcm"))  # fmt: skip
    if log_jacobian is not None:
        written.append(_write_atomic_dicom(parametric_map(ct, log_jacobian, uids),
                                           folder / "log_jacobian.PM.dcm"))  # fmt: skip
    return written


def export_patient_dicom(root, patient_id: str, out_dir) -> list[Path]:
    """Write one patient's baseline CT series, lung SEG and log-Jacobian Parametric Map (those
    that are complete) into ``out_dir/<patient_id>/``."""
    _highdicom()
    group = st.patient_group(root, patient_id, create=False)
    try:
        base = st.read_image(group, "baseline")
    except IncompleteOutputError:
        return []
    geometry = st.stored_geometry(base)
    on_grid = {}
    for name in ("lung_mask", "log_jacobian"):
        try:
            s = st.read_image(group, name)
        except IncompleteOutputError:
            continue
        if not st.stored_geometry(s).same_grid(geometry):
            raise SscflowError(f"{patient_id}: {name} is not on the baseline's grid; "
                               "rerun 'sscflow run'")  # fmt: skip
        on_grid[name] = s.array[...]
    return write_patient_dicom(Path(out_dir) / patient_id, patient_id, geometry,
                               base.array[...], **on_grid)  # fmt: skip


TEMPLATE_ID = "TEMPLATE"  # the template's patient name and ID in the DICOM export


def export_template_dicom(root, patient_ids, out_dir) -> list[Path]:
    """The template as a CT series with its lung SEG into ``out_dir/template/``, and beside them
    one Parametric Map per patient of ``patient_ids`` whose template-space log-Jacobian map is
    complete (``<patient_id>.log_jacobian_template.PM.dcm``, the pseudonym in its series
    description): the maps of a cohort open over one anatomy in a viewer, as in the group-mean
    figures. Nothing when the template stage has not run."""
    _highdicom()
    try:
        tpl = st.template_group(root)
        image = st.read_image(tpl, "image")
    except IncompleteOutputError:
        return []
    geometry = st.stored_geometry(image)
    folder = Path(out_dir) / "template"
    mask = None
    try:
        m = st.read_image(tpl, "lung_mask")
        mask = m.array[...] if st.stored_geometry(m).same_grid(geometry) else None
    except IncompleteOutputError:
        pass
    written = write_patient_dicom(folder, TEMPLATE_ID, geometry, image.array[...], lung_mask=mask)
    ct = _read_series(folder / "CT")
    uids = _Uids(TEMPLATE_ID, image.array[...], geometry)
    for pid in patient_ids:
        group = st.patient_group(root, pid, create=False)
        try:
            s = st.read_image(group, "log_jacobian_template")
        except IncompleteOutputError:
            continue
        if not st.stored_geometry(s).same_grid(geometry):
            raise SscflowError(f"{pid}: log_jacobian_template is not on the template's grid; "
                               "rerun 'sscflow run --rebuild-template'")  # fmt: skip
        pm = parametric_map(ct, s.array[...], uids, role=f"{pid}/log_jacobian_template")
        pm.SeriesDescription = f"{pid}: log-Jacobian in template space"[:64]  # LO: 64 at most
        written.append(_write_atomic_dicom(pm, folder / f"{pid}.log_jacobian_template.PM.dcm"))
    return written


def _read_series(folder: Path) -> list:
    """The CT datasets written into ``folder`` (slice order), as highdicom needs its sources."""
    import pydicom

    return [pydicom.dcmread(p) for p in sorted(Path(folder).glob("CT*.dcm"))]
