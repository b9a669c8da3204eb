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

import functools
import io
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from kneescreen.config import opt
from kneescreen.io.store import Store, join
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


@dataclass(frozen=True)
class Subject:
    index: int
    patient_ref: str
    mrn: str
    name: str
    birth_date: str
    study_date: str
    age: float
    sex: str
    t_score: float
    t_image: float
    site: int
    view: str
    laterality: str
    fmt: str
    syntax: str
    photometric: str
    bits: int
    seed: int


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
# drawing


@functools.lru_cache(maxsize=8)
def _texture_filter(size: int) -> np.ndarray:
    """Band-pass filter in the frequency domain: trabeculae are a few pixels wide and run
    mostly along the bone's long axis (anisotropic: elongated vertically)."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    scale = size / 384.0
    r = np.sqrt((fx * 1.0) ** 2 + (fy * 2.2) ** 2) * scale
    return np.exp(-((r - 0.11) ** 2) / (2 * 0.04**2)).astype(np.float32)


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0, 1)
    return b * (1 - h) + a * h - k * h * (1 - h)


def _ellipse(x, y, cx, cy, rx, ry):
    return (np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2) - 1) * min(rx, ry)


def _capsule(x, y, ax, ay, bx, by, r):
    px, py, dx, dy = x - ax, y - ay, bx - ax, by - ay
    h = np.clip((px * dx + py * dy) / (dx * dx + dy * dy), 0, 1)
    return np.sqrt((px - dx * h) ** 2 + (py - dy * h) ** 2) - r


def _pose(rng: np.random.Generator, sub: Subject) -> tuple[float, float, float, float, float]:
    """Rotation (rad), zoom, shift and joint gap: the first draws of a subject's generator."""
    # Pose: small rotation, shift and zoom, as positioning varies between radiographers.
    ang = np.deg2rad(rng.normal(0, 3))
    zoom = rng.uniform(0.9, 1.1)
    sx, sy = rng.normal(0, 0.02, 2)
    gap = 0.028 - 0.004 * (sub.age - 65) / 20 + rng.normal(0, 0.002)
    return ang, zoom, sx, sy, gap


def knee_landmarks(sub: Subject, size: int) -> dict:
    """Where `render_knee` puts the joint: ground truth for localisation tests.

    Returns:
        ``row``/``col`` of the joint-line centre (midway between the femoral condyles' lowest
        point and the tibial plateau's top) and ``width``, the bony extent just above the joint
        line (AP: across both condyles; lateral: patella front to condyle back), in pixels of a
        ``size`` x ``size`` rendering.
    """
    ang, zoom, sx, sy, gap = _pose(np.random.default_rng(sub.seed), sub)
    if sub.view == "AP":  # condyle ellipses end at y = 0.43 + 0.07; plateau starts at 0.5 + gap
        xb, yb, wb = 0.5, 0.5 + gap / 2, 0.38
    else:  # condyle ellipse ends at 0.42 + 0.085; plateau starts at 0.51 + gap
        xb, yb, wb = 0.475, (0.505 + 0.51 + gap) / 2, 0.37
    x = 1 - xb if sub.laterality == "L" else xb
    dx, dy = x - 0.5 - sx, yb - 0.5 - sy
    # Invert the rendering's rotation about the centre and its zoom.
    x0 = zoom * (np.cos(ang) * dx + np.sin(ang) * dy)
    y0 = zoom * (-np.sin(ang) * dx + np.cos(ang) * dy)
    return {"row": (y0 + 0.5) * size - 0.5, "col": (x0 + 0.5) * size - 0.5, "width": wb * zoom * size}


def _anatomy(x: np.ndarray, y: np.ndarray, view: str, gap: float) -> tuple[np.ndarray, ...]:
    """Signed distances of femur, tibia, fibula, patella and the soft-tissue outline."""
    if view == "AP":
        femur = _smin(_capsule(x, y, 0.5, -0.2, 0.5, 0.3, 0.085),
                      np.minimum(_ellipse(x, y, 0.41, 0.43, 0.1, 0.07), _ellipse(x, y, 0.59, 0.43, 0.1, 0.07)), 0.06)
        tib_top = 0.5 + gap
        tibia = _smin(_ellipse(x, y, 0.5, tib_top + 0.045, 0.19, 0.045), _capsule(x, y, 0.5, tib_top + 0.1, 0.5, 1.3, 0.075), 0.07)
        fibula = _smin(_ellipse(x, y, 0.685, tib_top + 0.1, 0.035, 0.03), _capsule(x, y, 0.685, tib_top + 0.1, 0.66, 1.3, 0.019), 0.02)
        patella = _ellipse(x, y, 0.5, 0.39, 0.065, 0.075)
        tissue = np.abs(x - 0.5) - (0.3 + 0.02 * np.sin(6 * y))
    else:
        femur = _smin(_capsule(x, y, 0.52, -0.2, 0.52, 0.3, 0.08), _ellipse(x, y, 0.55, 0.42, 0.11, 0.085), 0.06)
        tib_top = 0.51 + gap
        tibia = _smin(_ellipse(x, y, 0.52, tib_top + 0.04, 0.15, 0.04), _capsule(x, y, 0.5, tib_top + 0.09, 0.47, 1.3, 0.07), 0.07)
        fibula = _smin(_ellipse(x, y, 0.6, tib_top + 0.09, 0.03, 0.028), _capsule(x, y, 0.6, tib_top + 0.09, 0.56, 1.3, 0.017), 0.02)
        patella = _ellipse(x, y, 0.33, 0.4, 0.04, 0.085)
        tissue = np.abs(x - 0.48) - (0.26 + 0.03 * np.cos(5 * y))
    return femur, tibia, fibula, patella, tissue


def _coarse_bone(noise: np.ndarray, q: float, size: int, jitter: float) -> tuple:
    """Trabecular map, cortex width and (cortex, marrow, attenuation) factors: everything falls
    with the T-score, so the class shows in the mean brightness at any resolution."""
    # Trabecular network: band-pass noise, thresholded; lower T -> sparser, thinner struts.
    tex = np.fft.irfft2(np.fft.rfft2(noise) * _texture_filter(size), s=(size, size))
    tex /= tex.std() + 1e-6
    trab = np.clip((tex - (0.1 - 0.45 * q)) / 0.6, 0, 1)
    cortex_w = (0.016 + 0.006 * q) * jitter
    return trab, cortex_w, (0.55 + 0.08 * q, 0.8 + 0.15 * q, 0.35 + 0.05 * q)


# `signal_scale="fine"`: the field of view that makes the AP femoral condyles (0.38 of the
# image) 90 mm wide, so pixel sizes are physical: 0.116 mm at 2048 px, 1.5 mm at 160 px.
FOV_MM = 90.0 / 0.38
# Mean of clip((X - 0.1) / 0.6, 0, 1) for X ~ N(0, 1): the trabecular map's mean, fixed in fine mode.
_TRAB_MEAN = 0.3468
_FINE_CORTEX = 0.001  # cortex width per unit of bone quality q, as a fraction of the field


def _fine_filter(size: int, period_px: float) -> np.ndarray:
    """Band-pass filter peaking at ``period_px`` across the bone (1.3x longer along it: a more
    elongated pattern would keep vertical frequencies low enough to survive downsampling)."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    f0 = 1.0 / period_px
    r = np.sqrt(fx**2 + (fy * 1.3) ** 2)
    return np.exp(-((r - f0) ** 2) / (2 * (0.25 * f0) ** 2)).astype(np.float32)


def _highpass(a: np.ndarray, period_px: float) -> np.ndarray:
    """``a`` without its content coarser than ``period_px`` (DC included)."""
    fy = np.fft.fftfreq(a.shape[0])[:, None]
    fx = np.fft.rfftfreq(a.shape[1])[None, :]
    h = 1 - np.exp(-(fx**2 + fy**2) * (period_px**2) / 2)
    return np.fft.irfft2(np.fft.rfft2(a) * h, s=a.shape)


def _fine_bone(noise: np.ndarray, q: float, size: int, jitter: float) -> tuple:
    """Like `_coarse_bone`, but the T-score moves only fine structure, and nothing coarser than
    2 mm depends on it, so a 160 px letterbox (1.5 mm pixels) is the same at every T-score.

    Trabecular spacing is 0.7 - 0.15 q mm (0.45-0.95 mm: 4-8 px at 2048 px); the map keeps a
    fixed mean and loses its content coarser than 2 mm. The cortex keeps its outer envelope, but
    only its outer `_solid_fraction` is solid: the endosteal rest is trabecularised, porous bone
    of the same mean brightness (~8 px thinner solid cortex per unit q at 2048 px). A thinner
    *envelope* would not hide: a 4 mm cortex is resolved by 1.5 mm pixels.

    Returns:
        ``(trab, cortex_w, factors, solid_w)``: `_coarse_bone`'s three plus the solid width.
    """
    mm_px = FOV_MM / size
    period_px = float(np.clip(0.7 - 0.15 * q, 0.45, 0.95)) / mm_px
    tex = np.fft.irfft2(np.fft.rfft2(noise) * _fine_filter(size, period_px), s=(size, size))
    tex /= tex.std() + 1e-6
    trab = _TRAB_MEAN + _highpass(np.clip((tex - 0.1) / 0.6, 0, 1), 2.0 / mm_px)
    cortex_w = 0.016 * jitter
    return trab, cortex_w, (0.55, 0.8, 0.35), cortex_w * _solid_fraction(q)


def _solid_fraction(q: float) -> float:
    return float(np.clip(0.75 + 0.15 * q, 0.45, 1.0))


def render_knee(sub: Subject, size: int, signal_scale: str = "coarse") -> np.ndarray:
    """Float image in [0, 1], bone bright, for one subject.

    Args:
        sub: the subject (its seed fixes pose, texture and noise).
        size: image side in pixels.
        signal_scale: "coarse" (the default archive) or "fine" (see `SynthConfig`): the same
            subject gets the same pose and noise in both; only the bone differs.
    """
    rng = np.random.default_rng(sub.seed)
    q = float(np.clip((sub.t_image + 1.2) / 2.5, -1.6, 1.6))  # bone quality, ~0 at the mean
    ang, zoom, sx, sy, gap = _pose(rng, sub)
    g = (np.arange(size, dtype=np.float32) + 0.5) / size
    y0, x0 = np.meshgrid(g - 0.5, g - 0.5, indexing="ij")
    x = (np.cos(ang) * x0 - np.sin(ang) * y0) / zoom + 0.5 + sx
    y = (np.sin(ang) * x0 + np.cos(ang) * y0) / zoom + 0.5 + sy
    if sub.laterality == "L":
        x = 1 - x
    femur, tibia, fibula, patella, tissue = _anatomy(x, y, sub.view, gap)
    noise = rng.standard_normal((size, size)).astype(np.float32)
    fine = signal_scale == "fine"
    bone_fn = _fine_bone if fine else _coarse_bone
    trab, cortex_w, (cortex_i, marrow_f, atten), *solid_w = bone_fn(noise, q, size, rng.uniform(0.9, 1.1))
    soft = 1.5 / size
    img = 0.28 * _sigmoid(-tissue / (4 * soft))
    for sdf, weight in ((femur, 1.0), (tibia, 1.0), (fibula, 0.85), (patella, 0.45)):
        inside = _sigmoid(-sdf / soft)
        depth = np.sqrt(np.clip(-sdf, 0, None))  # chord length through a round bone
        cortex = inside * _sigmoid((sdf + cortex_w) / soft)
        marrow = inside - cortex
        bone = cortex * cortex_i + marrow * (0.12 + 0.2 * trab) * marrow_f + 2.2 * depth * inside * atten
        if fine:  # pores in the endosteal cortex: zero-mean texture, so no coarse trace
            porous = cortex - inside * _sigmoid((sdf + solid_w[0]) / soft)
            bone = bone + porous * 0.6 * (trab - _TRAB_MEAN)
        img = img + weight * bone * 0.6
    # Acquisition: heel effect, exposure, quantum noise.
    img = img * (1 + rng.uniform(-0.08, 0.08) * (y - 0.5)) * rng.uniform(0.85, 1.15) + 0.04
    img = img + rng.normal(0, rng.uniform(0.006, 0.015), img.shape)
    return np.clip(img / 1.25, 0, 1).astype(np.float32)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * z))


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
