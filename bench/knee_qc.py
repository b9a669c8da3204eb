"""Knee-joint localisation on the real dev radiographs: placement count, time, QC montage.

Usage: .venv/bin/python bench/knee_qc.py --dev-set ../shared/data/knee-xray-dev --out /tmp/knee_qc

Reads every image listed in labels.csv with `read_radiograph` (the product's reader), runs
`locate_joints` (both knees of bilateral films), times it per image (reading excluded), and
writes `montage.png` (all images: red joint line one knee width long, cyan tibial ROI, yellow
femoral ROI, confidence) plus `montage-<k>.png` sheets of 20 with larger thumbnails,
`closeup-<k>.png` sheets (one crop around each placed joint, to judge the row to a few
pixels) and `placements.csv`. Cortical thickness is measured on each placed knee and
its Spearman correlation with the T-score printed, as a sanity check of the radiogrammetry.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np


def _spearman(x, y) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1]) if len(x) > 2 else float("nan")


def _measure(rows: list[dict], root: str) -> tuple[list, list, list[dict]]:
    from kneescreen.data.knee.joint import locate_joints
    from kneescreen.data.knee.radiogrammetry import cortical_thickness
    from kneescreen.errors import DecodeError
    from kneescreen.fileio.reader import ReaderConfig, read_radiograph

    images, locs, out = [], [], []
    for r in rows:
        with open(os.path.join(root, r["path"]), "rb") as f:
            rad = read_radiograph(f.read(), ReaderConfig(hash_pixels=False))
        t0 = time.perf_counter()
        try:
            found = locate_joints(rad.image, rad.meta.pixel_spacing)
            err = ""
        except DecodeError as e:
            found, err = [], e.error_code
        dt = time.perf_counter() - t0
        cort = [cortical_thickness(rad.image, j) for j in found]
        ci = [c["femur"]["cortical_index"] for c in cort if c["femur"]] + [c["tibia"]["cortical_index"] for c in cort if c["tibia"]]
        out.append({"path": r["path"], "label": r["label"], "t_score": float(r["t_score"]),
                    "knees": len(found), "error": err, "seconds": round(dt, 4),
                    "confidence": ";".join(f"{j.confidence:.2f}" for j in found),
                    "row_frac": ";".join(f"{j.row / j.shape[0]:.3f}" for j in found),
                    "cortical_index": float(np.mean(ci)) if ci else float("nan")})
        images.append(rad.image)
        locs.append(found)
    return images, locs, out


def _closeups(images, locs, names):
    """One crop per placed knee, 1.6 knee widths square around the joint, location shifted to
    match: at montage size the joint line can be judged to a few pixels."""
    from dataclasses import replace

    crops, cl, titles = [], [], []
    for i, (img, found) in enumerate(zip(images, locs)):
        for k, j in enumerate(found):
            side = int(1.6 * j.width_px)
            top, left = int(j.row - side / 2), int(j.col - side / 2)
            padded = np.pad(img, side)  # black outside the film, as in the ROIs
            crops.append(padded[top + side:top + 2 * side, left + side:left + 2 * side])
            cl.append(replace(j, row=j.row - top, col=j.col - left, shape=(side, side)))
            titles.append(f"{i}.{k}:{names[i]}")
    return crops, cl, titles


def main(argv=None) -> int:
    from kneescreen.data.knee.qc import qc_montage

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dev-set", default="../shared/data/knee-xray-dev")
    ap.add_argument("--out", default="/tmp/knee_qc")
    ap.add_argument("--per-sheet", type=int, default=20)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.dev_set, "labels.csv")) as f:
        rows = list(csv.DictReader(f))
    images, locs, out = _measure(rows, args.dev_set)
    names = [os.path.basename(r["path"]) for r in rows]
    qc_montage(images, locs, os.path.join(args.out, "montage.png"), titles=names, thumb=200, columns=13)
    for k in range(0, len(images), args.per_sheet):
        sl = slice(k, k + args.per_sheet)
        qc_montage(images[sl], locs[sl], os.path.join(args.out, f"montage-{k // args.per_sheet}.png"),
                   titles=[f"{k + i}:{n}" for i, n in enumerate(names[sl])], thumb=400, columns=5)
    crops, cl, ct = _closeups(images, locs, names)
    for k in range(0, len(crops), 30):
        qc_montage(crops[k:k + 30], cl[k:k + 30], os.path.join(args.out, f"closeup-{k // 30}.png"),
                   titles=ct[k:k + 30], thumb=220, columns=6)
    with open(os.path.join(args.out, "placements.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(out[0]))
        w.writeheader()
        w.writerows(out)
    placed = sum(o["knees"] > 0 for o in out)
    knees = sum(o["knees"] for o in out)
    ms = statistics.median(o["seconds"] for o in out) * 1000
    ok = [o for o in out if np.isfinite(o["cortical_index"])]
    rho = _spearman([o["cortical_index"] for o in ok], [o["t_score"] for o in ok])
    print(f"placed {placed}/{len(out)} images ({knees} knees), median {ms:.0f} ms/image "
          f"(localisation only, reading excluded)")
    print(f"cortical index measured on {len(ok)} images; Spearman vs T-score {rho:+.2f}")
    print(f"montages and placements.csv in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
