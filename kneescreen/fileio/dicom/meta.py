"""Header facts of a DICOM data set (`RadiographMeta`): size, photometric, transfer syntax,
modality, laterality, pixel spacing, sex and age (PatientAge, else birth and study dates).
``patient_id`` is a raw identifier: pseudonymise before anything is written."""

from __future__ import annotations

import datetime as _dt

from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from kneescreen.fileio.radiograph import RadiographMeta


def element_text(ds, name: str) -> str | None:
    """An element's value as stripped text; None when absent or empty."""
    value = ds.get(name)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _parse_age(age: str | None, birth: str | None, study: str | None) -> float | None:
    """Years from PatientAge ('065Y', '018M', '010W', '003D'), else birth and study dates."""
    if age:
        try:
            n, unit = float(age[:-1]), age[-1].upper()
            return round(n / {"Y": 1, "M": 12, "W": 52.1775, "D": 365.25}[unit], 2)
        except (ValueError, KeyError, IndexError):
            pass
    if birth and study:
        try:
            b = _dt.datetime.strptime(birth[:8], "%Y%m%d").date()
            s = _dt.datetime.strptime(study[:8], "%Y%m%d").date()
            years = (s - b).days / 365.25
            return round(years, 2) if 0 <= years < 130 else None
        except ValueError:
            return None
    return None


def _transfer_syntax(ds) -> str | None:
    """The data set's transfer syntax; for raw data sets (no file meta) the one pydicom inferred
    while parsing, written into a new file meta so the pixel decoders can find it."""
    fm = getattr(ds, "file_meta", None)
    if fm is not None and "TransferSyntaxUID" in fm:
        return str(fm.TransferSyntaxUID)
    meta_ts = None
    if getattr(ds, "is_little_endian", None) is not None:
        if not ds.is_little_endian:
            meta_ts = str(ExplicitVRBigEndian)
        else:
            meta_ts = str(ImplicitVRLittleEndian if ds.is_implicit_VR else ExplicitVRLittleEndian)
    ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    if meta_ts:
        ds.file_meta.TransferSyntaxUID = meta_ts
    return meta_ts


def _int(ds, tag: str, default: int | None) -> int | None:
    try:
        return int(ds.get(tag)) if ds.get(tag) is not None else default
    except (TypeError, ValueError):
        return default


def dicom_meta(ds) -> RadiographMeta:
    meta_ts = _transfer_syntax(ds)
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    try:
        spacing_t = (float(spacing[0]), float(spacing[1])) if spacing and len(spacing) == 2 else None
        if spacing_t and min(spacing_t) <= 0:
            spacing_t = None  # some CR writers put 0\\0 when the plate was not calibrated
    except (TypeError, ValueError):
        spacing_t = None
    sex = element_text(ds, "PatientSex")
    sex = sex.upper()[:1] if sex and sex.upper()[:1] in ("M", "F", "O") else None
    rows, cols = _int(ds, "Rows", 0) or 0, _int(ds, "Columns", 0) or 0
    return RadiographMeta(
        format="dicom",
        rows=rows,
        cols=cols,
        photometric=element_text(ds, "PhotometricInterpretation"),
        transfer_syntax=meta_ts,
        bits_stored=_int(ds, "BitsStored", None),
        frames=max(_int(ds, "NumberOfFrames", 1) or 1, 1),
        modality=element_text(ds, "Modality"),
        body_part=element_text(ds, "BodyPartExamined"),
        laterality=element_text(ds, "ImageLaterality") or element_text(ds, "Laterality"),
        view_position=element_text(ds, "ViewPosition"),
        manufacturer=element_text(ds, "Manufacturer"),
        institution=element_text(ds, "InstitutionName"),
        pixel_spacing=spacing_t,
        sex=sex,
        age=_parse_age(element_text(ds, "PatientAge"), element_text(ds, "PatientBirthDate"), element_text(ds, "StudyDate")),
        study_date=element_text(ds, "StudyDate"),
        other_date=element_text(ds, "SeriesDate") or element_text(ds, "AcquisitionDate") or element_text(ds, "ContentDate"),
        study_uid=element_text(ds, "StudyInstanceUID"),
        series_uid=element_text(ds, "SeriesInstanceUID"),
        sop_uid=element_text(ds, "SOPInstanceUID"),
        patient_id=element_text(ds, "PatientID"),
    )
