"""Synthetic knee radiograph archive (`kneescreen synth`).

Each image is a procedural AP or lateral knee: soft tissue, femur with condyles, tibia with its
plateau, fibula and patella, drawn from signed-distance shapes. Bone appearance follows a T-score:
cortical thickness, trabecular density and bone attenuation all fall as the T-score falls, so a
CNN can learn the three WHO classes (normal T >= -1, osteopenia -2.5 < T < -1, osteoporosis
T <= -2.5). Two knobs set how much signal each input carries:

- ``image_signal`` in [0, 1]: 1 draws the bone from the patient's own T-score, 0 from an
  independent one (the image then says nothing about the label).
- ``covariate_signal`` in [0, 1]: 1 makes older and female patients have lower T-scores the way
  a screening population does, 0 makes age and sex independent of the T-score.

A third says where in the image the signal sits. ``signal_scale="coarse"`` (the default, and the
archive as it always was) lets the T-score move brightness too, so it survives any downsampling.
``"fine"`` puts it only in trabecular spacing and cortical thickness at physical scale (the field
of view is `FOV_MM`), with every mean intensity held fixed: at 2048 px the classes differ by a
few pixels of texture and cortex, and a 160 px letterbox no longer shows them.

Everything is derived from ``seed``: the same config gives byte-identical files.
"""

from __future__ import annotations

import io
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from kneescreen.config import opt
from kneescreen.data.synth_render import FOV_MM, Subject, knee_landmarks, render_knee  # noqa: F401  (public here too)
from kneescreen.fileio.store import Store, join
from kneescreen.labels import CLASSES, t_score_to_class

_logger = logging.getLogger(__name__)

SITES = (
    # (site code, institution, manufacturer, model, modality)
    ("site-a", "Northfield General", "AGFA", "CR 85-X", "CR"),
    ("site-b", "Riverside Orthopaedic", "Carestream Health", "DRX-Evolution", "DX"),
    ("site-c", "Hillcrest Community", "FUJIFILM Corporation", "FCR Capsula", "CR"),
    ("site-d", "Lakeside Clinic", "Philips Medical Systems", "DigitalDiagnost", "DX"),
)
# Transfer syntaxes for DICOM output and how often each is drawn.
_SYNTAX_MIX = (
    ("1.2.840.10008.1.2.1", 0.40),  # Explicit VR Little Endian
    ("1.2.840.10008.1.2.5", 0.25),  # RLE Lossless
    ("1.2.840.10008.1.2.4.80", 0.15),  # JPEG-LS Lossless
    ("1.2.840.10008.1.2.4.90", 0.20),  # JPEG 2000 Lossless
)
_MEAN_T, _SD_T = -1.2, 1.2


@dataclass(frozen=True)
class SynthConfig:
    """Archive generator settings (one source of defaults for the CLI and tests)."""

    n: int = opt(200, "number of images")
    seed: int = opt(0, "random seed: the same seed writes the same archive")
    size: int = opt(384, "image side in pixels")
    image_signal: float = opt(1.0, "0..1: how much the image tells of the T-score")
    covariate_signal: float = opt(1.0, "0..1: how much age/sex tell of the T-score")
    signal_scale: str = opt("coarse", "where the image carries the T-score: coarse (bone brightness, "
                            "cortex and trabecular density; visible at any size) or fine (only "
                            "trabecular spacing and cortical thickness, a few pixels at 2048 px, "
                            "with mean intensities fixed: gone after a 160 px letterbox)",
                            choices=("coarse", "fine"))
    # Repeating a format weights it: ("dicom", "dicom", "png") writes two DICOMs per PNG.
    formats: tuple[str, ...] = opt(("dicom",), "formats to cycle through: dicom, png, jpeg",
                                   choices=("dicom", "png", "jpeg"))
    images_per_patient: int = opt(2, "images per synthetic patient")
    plant_bad: bool = opt(False, "add corrupt, truncated, non-image and non-knee objects")
    workers: int = opt(0, "processes (0: one per core)")


def draw_subjects(cfg: SynthConfig) -> list[Subject]:
    """Patients, then images per patient (AP and lateral of one knee, sometimes both knees)."""
    rng = np.random.default_rng(cfg.seed)
    n_patients = max(1, int(np.ceil(cfg.n / max(1, cfg.images_per_patient))))
    out: list[Subject] = []
    c = float(np.clip(cfg.covariate_signal, 0, 1))
    s = float(np.clip(cfg.image_signal, 0, 1))
    for p in range(n_patients):
        female = rng.random() < 0.7
        age = float(rng.uniform(45, 90))
        cov = 0.05 * (age - 67.5) + 0.6 * (float(female) - 0.7)
        # Keep the total T-score spread fixed while the covariate share varies.
        noise_sd = np.sqrt(max(_SD_T**2 - (c**2) * 0.5, 0.05))
        t = float(_MEAN_T - c * cov + rng.normal(0, noise_sd))
        t_img = s * t + (1 - s) * float(rng.normal(_MEAN_T, _SD_T))
        site = int(rng.integers(len(SITES)))
        year = int(rng.integers(2015, 2026))
        study = f"{year}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
        birth = f"{year - int(age)}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
        mrn = f"MRN{int(rng.integers(10**7, 10**8))}"
        name = f"SYNTH^{'ANNA' if female else 'JOHN'}{p:05d}"
        ref = f"SP{int(rng.integers(16**10)):010x}"
        lat = "R" if rng.random() < 0.5 else "L"
        for k in range(cfg.images_per_patient):
            if len(out) >= cfg.n:
                break
            view = "AP" if k % 2 == 0 else "LAT"
            if k >= 2 and k % 2 == 0:
                lat = "L" if lat == "R" else "R"
            fmt = cfg.formats[int(rng.integers(len(cfg.formats)))]
            syntax = _SYNTAX_MIX[int(rng.choice(len(_SYNTAX_MIX), p=[w for _, w in _SYNTAX_MIX]))][0]
            out.append(Subject(
                index=len(out), patient_ref=ref, mrn=mrn, name=name, birth_date=birth,
                study_date=study, age=round(age, 1), sex="F" if female else "M", t_score=round(t, 3),
                t_image=t_img, site=site, view=view, laterality=lat, fmt=fmt, syntax=syntax,
                photometric="MONOCHROME1" if rng.random() < 0.3 else "MONOCHROME2",
                bits=int(rng.choice([12, 14, 16])), seed=int(rng.integers(2**63 - 1)),
            ))
    return out


# ---------------------------------------------------------------------------------------------
# writing


def _uid(sub: Subject, kind: str) -> str:
    from pydicom.uid import generate_uid

    # Deterministic UIDs: derived from the subject seed, so reruns give identical files.
    return generate_uid(prefix="1.2.826.0.1.3680043.10.1137.", entropy_srcs=[str(sub.seed), kind])


def encode_dicom(sub: Subject, image: np.ndarray, body_part: str = "KNEE",
                 pixel_spacing: float | None = None) -> bytes:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian

    maxv = 2**sub.bits - 1
    stored = np.round(image * maxv).astype(np.uint16)
    if sub.photometric == "MONOCHROME1":
        stored = (maxv - stored).astype(np.uint16)
    site_code, inst, manuf, model, modality = SITES[sub.site]
    sop_class = "1.2.840.10008.5.1.4.1.1.1" if modality == "CR" else "1.2.840.10008.5.1.4.1.1.1.1"
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = _uid(sub, "sop")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = _uid(sub, f"study-{sub.patient_ref}")
    ds.SeriesInstanceUID = _uid(sub, f"series-{sub.patient_ref}-{sub.view}")
    ds.PatientName, ds.PatientID = sub.name, sub.mrn
    ds.PatientBirthDate, ds.PatientSex = sub.birth_date, sub.sex
    ds.PatientAge = f"{int(sub.age):03d}Y"
    ds.StudyDate = ds.ContentDate = sub.study_date
    ds.AccessionNumber = f"ACC{sub.seed % 10**9:09d}"
    ds.Modality, ds.BodyPartExamined = modality, body_part
    ds.ViewPosition, ds.ImageLaterality, ds.Laterality = sub.view, sub.laterality, sub.laterality
    ds.Manufacturer, ds.ManufacturerModelName, ds.InstitutionName = manuf, model, inst
    # The coarse archive's spacing is nominal (it makes the knee ~22 mm wide); fine mode passes
    # the physical one (FOV_MM / size).
    ds.ImagerPixelSpacing = [pixel_spacing or 0.15 * 384 / image.shape[0]] * 2
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, sub.photometric
    ds.Rows, ds.Columns = image.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, sub.bits, sub.bits - 1, 0
    if sub.seed % 3 == 0:  # a third carry a window, like many CR exports
        ds.WindowCenter, ds.WindowWidth = maxv // 2, maxv
    if sub.photometric == "MONOCHROME1" and modality == "DX":
        ds.PresentationLUTShape = "INVERSE"
    ds.PixelData = stored.tobytes()
    syntax = UID(sub.syntax)
    if syntax != ExplicitVRLittleEndian:
        plugin = {"1.2.840.10008.1.2.5": "pylibjpeg", "1.2.840.10008.1.2.4.80": "pyjpegls",
                  "1.2.840.10008.1.2.4.90": "pylibjpeg"}[str(syntax)]
        ds.compress(syntax, stored, encoding_plugin=plugin, generate_instance_uid=False)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def encode_raster(sub: Subject, image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    if sub.fmt == "png":
        Image.fromarray(np.round(image * 65535).astype(np.uint16)).save(buf, format="PNG")
    else:
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _key(sub: Subject) -> str:
    ext = {"dicom": "dcm", "png": "png", "jpeg": "jpg"}[sub.fmt]
    return f"{SITES[sub.site][0]}/img-{sub.index:06d}.{ext}"


def _make_one(args: tuple[Subject, int, str]) -> tuple[str, bytes]:
    sub, size, scale = args
    img = render_knee(sub, size, scale)
    spacing = FOV_MM / size if scale == "fine" else None
    data = encode_dicom(sub, img, pixel_spacing=spacing) if sub.fmt == "dicom" else encode_raster(sub, img)
    return _key(sub), data


def label_row(sub: Subject) -> dict:
    site_code, _, manuf, _, _ = SITES[sub.site]
    return {
        "key": _key(sub), "label": t_score_to_class(sub.t_score), "t_score": sub.t_score,
        "patient_ref": sub.patient_ref, "age": sub.age, "sex": sub.sex, "site": site_code,
        "manufacturer": manuf, "view": sub.view, "laterality": sub.laterality, "format": sub.fmt,
        "sop_instance_uid": _uid(sub, "sop") if sub.fmt == "dicom" else "",
    }


def planted_bad_files(cfg: SynthConfig, good: dict[str, bytes]) -> dict[str, tuple[bytes, str]]:
    """Bad objects a real archive holds, keyed, with the error code the reader must give."""
    rng = np.random.default_rng(cfg.seed + 1)
    sub = draw_subjects(SynthConfig(n=1, seed=cfg.seed + 7, size=cfg.size))[0]
    img = render_knee(sub, cfg.size)
    dcm = next((v for k, v in sorted(good.items()) if k.endswith(".dcm")), encode_dicom(sub, img))
    chest = encode_dicom(sub, img, body_part="CHEST")
    bad: dict[str, tuple[bytes, str]] = {
        "bad/truncated.dcm": (dcm[: len(dcm) // 2], "truncated"),
        "bad/random-bytes.dcm": (rng.bytes(4096), "not_dicom"),
        "bad/notes.txt": (b"scanned requisition form, not an image\n", "not_dicom"),
        "bad/empty.dcm": (b"", "truncated"),
        "bad/chest.dcm": (chest, "not_knee"),
    }
    # A J2K object whose codestream header (COD/QCD markers) is scrambled: the decoder refuses it.
    j2k_sub = draw_subjects(SynthConfig(n=1, seed=11, size=cfg.size))[0]
    j2k_sub = Subject(**{**j2k_sub.__dict__, "syntax": "1.2.840.10008.1.2.4.90", "fmt": "dicom"})
    j2k = bytearray(encode_dicom(j2k_sub, render_knee(j2k_sub, cfg.size)))
    siz = bytes(j2k).find(b"\xff\x4f\xff\x51")
    j2k[siz + 45 : siz + 200] = np.random.default_rng(20261127).bytes(155)
    bad["bad/corrupt-j2k.dcm"] = (bytes(j2k), "decode_failed")
    # Decoder garbage that arrives "successfully": uncompressed pixel data replaced by noise.
    noise_sub = Subject(**{**j2k_sub.__dict__, "syntax": "1.2.840.10008.1.2.1"})
    bad["bad/noise.dcm"] = (encode_dicom(noise_sub, rng.random((cfg.size, cfg.size))), "implausible_pixels")
    return bad


def write_archive(out_dir: str, cfg: SynthConfig = SynthConfig(), store: Store | None = None) -> dict:
    """Generate the archive under ``out_dir`` (a folder, or an s3:// prefix).

    Returns:
        Summary dict: counts, rate (images/s), paths of ``labels.csv`` and ``planted.csv``.
    """
    store = store or Store.resolve()
    t0 = time.perf_counter()
    subjects = draw_subjects(cfg)
    workers = cfg.workers or (os.cpu_count() or 1)
    jobs = [(s, cfg.size, cfg.signal_scale) for s in subjects]
    files: dict[str, bytes] = {}

    def emit(key: str, data: bytes) -> None:
        store.write_bytes(join(out_dir, "images", key), data)

    if workers > 1 and len(jobs) > 16:
        with ProcessPoolExecutor(workers) as pool:
            results = pool.map(_make_one, jobs, chunksize=8)
            for i, (key, data) in enumerate(results, 1):
                emit(key, data)
                if i < 3:
                    files[key] = data
                if i % 500 == 0:
                    _logger.info("synth: %d/%d images", i, len(jobs))
    else:
        for i, job in enumerate(jobs, 1):
            key, data = _make_one(job)
            emit(key, data)
            if i < 3:
                files[key] = data
    planted = planted_bad_files(cfg, files) if cfg.plant_bad else {}
    for key, (data, _) in planted.items():
        emit(key, data)
    elapsed = time.perf_counter() - t0
    rows = [label_row(s) for s in subjects]
    store.write_csv(join(out_dir, "labels.csv"), rows)
    if planted:
        store.write_csv(join(out_dir, "planted.csv"), [{"key": k, "expected": code} for k, (_, code) in planted.items()])
    counts = {c: sum(r["label"] == c for r in rows) for c in CLASSES}
    return {
        "images": len(rows), "planted_bad": len(planted), "classes": counts,
        "seconds": round(elapsed, 2), "images_per_s": round(len(rows) / max(elapsed, 1e-9), 1),
        "images_root": join(out_dir, "images"), "labels": join(out_dir, "labels.csv"),
    }
