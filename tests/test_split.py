"""Leakage-safe splits: duplicates, conflicts, near duplicates, patients, and the real dev set."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil

import pytest
from conftest import DEV_SET
from PIL import Image

from kneescreen.data.split.audit import audit_split
from kneescreen.data.split.run import SplitConfig, load_split, run_split
from kneescreen.fileio.reader import read_radiograph

needs_dev = pytest.mark.skipif(not os.path.isdir(DEV_SET), reason="../shared/data/knee-xray-dev not present")


@needs_dev
def test_dev_set_split_has_zero_cross_split_fingerprints(tmp_path):
    audit = run_split(DEV_SET, str(tmp_path))
    s = audit["summary"]
    assert s["input_items"] == 104 and s["kept"] == 104 and s["leaks"] == 0
    rows = load_split(str(tmp_path))
    assert len(rows) == 104
    # Recompute the audit from the written file: no pixel hash in two splits or two folds.
    for part in ("split", "fold"):
        seen = {}
        for r in rows:
            assert seen.setdefault(r["pixel_hash"], r[part]) == r[part]
    # Stratified: every class is present in every split.
    for split in ("train", "val", "test"):
        assert {r["label"] for r in rows if r["split"] == split} == {"normal", "osteopenia", "osteoporosis"}
    assert json.loads((tmp_path / "audit.json").read_text())["summary"]["leaks"] == 0


def _dev_subset(tmp_path, n_per_class=6):
    """A small folder-per-class copy of the dev set to plant duplicates in."""
    root = tmp_path / "coll"
    for cls in ("normal", "osteopenia", "osteoporosis"):
        (root / cls).mkdir(parents=True)
        for f in sorted(os.listdir(os.path.join(DEV_SET, cls)))[:n_per_class]:
            shutil.copy(os.path.join(DEV_SET, cls, f), root / cls / f)
    return root


@needs_dev
def test_planted_duplicates_conflicts_and_near_duplicates(tmp_path):
    root = _dev_subset(tmp_path)
    src = sorted((root / "normal").iterdir())[0]
    decoded = read_radiograph(src.read_bytes())
    # 1) lossless re-encoding as PNG under a *different* label: an exact-pixel conflict
    Image.open(src).convert("L").save(root / "osteoporosis" / "conflict.png")
    # 2) exact duplicate, same label, different container
    Image.open(src).convert("L").save(root / "normal" / "dup.png")
    # 3) near duplicate: half-size, re-compressed copy of another image, same label
    other = sorted((root / "osteopenia").iterdir())[0]
    im = Image.open(other).convert("L")
    im.resize((im.width // 2, im.height // 2)).save(root / "osteopenia" / "near.jpg", quality=70)
    audit = run_split(str(root), str(tmp_path / "out"), SplitConfig(folds=3))
    s = audit["summary"]
    assert s["label_conflict_groups"] == 1 and s["leaks"] == 0
    dropped = {d["key"]: d["reason"] for d in audit["dropped"]}
    assert dropped == {f"normal/{src.name}": "label_conflict", "normal/dup.png": "label_conflict",
                       "osteoporosis/conflict.png": "label_conflict"}
    rows = {r["key"]: r for r in load_split(str(tmp_path / "out"))}
    near, orig = rows["osteopenia/near.jpg"], rows[f"osteopenia/{other.name}"]
    assert near["group"] == orig["group"] and near["split"] == orig["split"] and near["fold"] == orig["fold"]
    assert s["near_duplicate_pairs"] >= 1
    assert decoded.pixel_hash == read_radiograph((root / "normal" / "dup.png").read_bytes()).pixel_hash


def test_patients_never_cross_splits(small_archive, tmp_path):
    root, _ = small_archive
    audit = run_split(str(root), str(tmp_path), SplitConfig(folds=3, val_fraction=0.2, test_fraction=0.2))
    rows = load_split(str(tmp_path))
    assert audit["summary"]["leaks"] == 0 and audit["summary"]["patients_from_labels"]
    by_patient = {}
    for r in rows:
        assert by_patient.setdefault(r["patient"], r["split"]) == r["split"]
    assert len(by_patient) < len(rows)  # two images per patient: the grouping did real work


def test_audit_detects_a_leak():
    rows = [
        {"key": "a", "label": "normal", "patient": "p1", "pixel_hash": "h1", "group": 0, "split": "train", "fold": 0},
        {"key": "b", "label": "normal", "patient": "p1", "pixel_hash": "h2", "group": 1, "split": "test", "fold": 1},
    ]
    assert audit_split(rows)["summary"]["leaks"] == 2  # patient crosses both split and fold


@pytest.mark.s3
@pytest.mark.parametrize("engine", ["local", pytest.param("ray", marks=[pytest.mark.ray, pytest.mark.slow])])
def test_labels_csv_on_s3(s3_bucket, small_archive, tmp_path, engine, request):
    from kneescreen.fileio.store import Store

    # The Ray engine reads images in Ray workers, which take S3 credentials from their own
    # environment (as on a cluster): the shared instance, started after the S3 server, has them.
    if engine == "ray":
        request.getfixturevalue("ray_local")
    root, _ = small_archive
    labels = list(csv.DictReader(open(root / "labels.csv")))[:8]
    for r in labels:
        Store.resolve().write_bytes(f"s3://{s3_bucket}/coll/images/{r['key']}", (root / "images" / r["key"]).read_bytes())
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(labels[0]))
    w.writeheader()
    w.writerows(labels)
    Store.resolve().write_bytes(f"s3://{s3_bucket}/coll/labels.csv", buf.getvalue().encode())
    audit = run_split(f"s3://{s3_bucket}/coll/labels.csv", f"s3://{s3_bucket}/split", SplitConfig(folds=2, engine=engine))
    assert audit["summary"]["kept"] == 8 and audit["summary"]["leaks"] == 0
    assert len(load_split(f"s3://{s3_bucket}/split")) == 8


def test_unknown_label_is_a_clear_error(tmp_path):
    from kneescreen.data.split.collection import load_collection
    from kneescreen.errors import KneescreenError

    (tmp_path / "labels.csv").write_text("key,label\na.png,broken-ish\n")
    with pytest.raises(KneescreenError, match="unknown label 'broken-ish'"):
        load_collection(str(tmp_path))


def _partition(rows: list[dict], links: list[tuple[str, str]]) -> set[frozenset]:
    """Connected components of keys under ``links`` plus same patient and same pixel hash: the
    grouping the old all-pairs code computed, as a reference."""
    parent = {r["key"]: r["key"] for r in rows}

    def find(a):
        while parent[a] != a:
            a = parent[a]
        return a

    first = {}
    for r in rows:
        for attr in ("patient", "pixel_hash"):
            links.append((r["key"], first.setdefault((attr, r[attr]), r["key"])))
    for a, b in links:
        parent[find(a)] = find(b)
    groups = {}
    for r in rows:
        groups.setdefault(find(r["key"]), set()).add(r["key"])
    return {frozenset(g) for g in groups.values()}


def _linked_collection(tmp_path):
    """Dev-set subset with a labels.csv: one patient with two images, an exact copy and a near copy
    of other images under new patients. Returns (root, keys, exact-copied key, near-copied key)."""
    root = _dev_subset(tmp_path)
    keys = [f"{c}/{f}" for c in ("normal", "osteopenia", "osteoporosis") for f in sorted(os.listdir(root / c))]
    labels = [{"key": k, "label": k.split("/")[0], "patient_ref": f"P{i}"} for i, k in enumerate(keys)]
    labels[1]["patient_ref"] = labels[0]["patient_ref"]  # one patient, two images
    a, b = keys[3], keys[8]
    Image.open(root / a).convert("L").save(root / "normal" / "exact-copy.png")  # same pixels, other patient
    im = Image.open(root / b).convert("L")
    im.resize((im.width // 2, im.height // 2)).save(root / "osteopenia" / "near-copy.jpg", quality=70)
    labels += [{"key": "normal/exact-copy.png", "label": "normal", "patient_ref": "X1"},
               {"key": "osteopenia/near-copy.jpg", "label": "osteopenia", "patient_ref": "X2"}]
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["key", "label", "patient_ref"])
        w.writeheader()
        w.writerows(labels)
    return root, keys, a, b


@needs_dev
def test_duplicates_across_patients_stay_together_and_match_all_pairs(tmp_path):
    import numpy as np

    from kneescreen.data.fingerprints import all_pairs_near_duplicates, thumbnail

    root, keys, a, b = _linked_collection(tmp_path)
    audit = run_split(str(root), str(tmp_path / "out"), SplitConfig(folds=3, duplicates="group"))
    rows = load_split(str(tmp_path / "out"))
    by_key = {r["key"]: r for r in rows}
    for x, y in ((a, "normal/exact-copy.png"), (b, "osteopenia/near-copy.jpg"), (keys[0], keys[1])):
        assert (by_key[x]["group"], by_key[x]["split"], by_key[x]["fold"]) == \
               (by_key[y]["group"], by_key[y]["split"], by_key[y]["fold"])
    assert audit["summary"]["leaks"] == 0 and audit["summary"]["exact_duplicate_groups"] == 1
    # The same groups and pair count as the exact all-pairs search over every kept image.
    thumbs = np.stack([thumbnail(read_radiograph((root / r["key"]).read_bytes()).image) for r in rows])
    pairs = all_pairs_near_duplicates(thumbs, SplitConfig().near_duplicate_corr)
    assert audit["summary"]["near_duplicate_pairs"] == len(pairs) >= 2  # the near copy and the exact copy
    by_group = {}
    for r in rows:
        by_group.setdefault(r["group"], set()).add(r["key"])
    assert {frozenset(g) for g in by_group.values()} == _partition(rows, [(rows[i]["key"], rows[j]["key"]) for i, j in pairs])


@needs_dev
@pytest.mark.ray
@pytest.mark.slow
def test_local_and_ray_engines_write_the_same_split(ray_local, tmp_path):
    root, _, _, _ = _linked_collection(tmp_path)
    audits = {}
    for engine in ("local", "ray"):
        cfg = SplitConfig(folds=3, duplicates="group", engine=engine)
        audits[engine] = run_split(str(root), str(tmp_path / engine), cfg)
        audits[engine].pop("config")
    split = (tmp_path / "local" / "split.csv").read_text()
    assert split == (tmp_path / "ray" / "split.csv").read_text() and split.count("\n") == 21  # header + 20 rows
    assert (tmp_path / "local" / "duplicates.csv").read_text() == (tmp_path / "ray" / "duplicates.csv").read_text()
    assert audits["local"] == audits["ray"]
    s = audits["local"]["summary"]
    assert s["exact_duplicate_groups"] == 1 and s["near_duplicate_pairs"] >= 2 and s["leaks"] == 0


def test_auto_engine_splits_small_collections_in_process(small_archive, tmp_path, caplog):
    from kneescreen.data.split.collection import Item
    from kneescreen.data.split.run import choose_engine

    root, _ = small_archive
    with caplog.at_level("INFO", logger="kneescreen.data.split.run"):
        run_split(str(root), str(tmp_path), SplitConfig(folds=2))
    assert "with the local engine" in caplog.text
    batches = [[Item(key=f"{b}-{i}", uri="", label="normal", patient="") for i in range(3)] for b in range(3)]
    cfg = SplitConfig(local_max_images=5)
    engine, rest = choose_engine(cfg, iter(batches))
    assert engine == "ray" and [it.key for b in rest for it in b] == [it.key for b in batches for it in b]
    assert choose_engine(SplitConfig(local_max_images=9), iter(batches))[0] == "local"
    assert choose_engine(SplitConfig(engine="ray"), iter(batches))[0] == "ray"
    assert choose_engine(SplitConfig(engine="local", local_max_images=1), iter(batches))[0] == "local"


def test_importing_the_package_and_its_entry_points_does_not_import_ray():
    """`import kneescreen` stays light: only the Ray engine's functions import Ray."""
    import subprocess
    import sys

    code = ("import kneescreen, kneescreen.data.split, sys\n"
            "from kneescreen.data.split import assign, audit, collection, components, engine, engine_local, "
            "engine_ray, run, tables, writer\n"
            "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))[:5]\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_both_engines_implement_the_same_interface():
    import inspect

    from kneescreen.data.split import engine_local, engine_ray
    from kneescreen.data.split.engine import Engine
    from kneescreen.data.split.run import ENGINES

    assert ENGINES == {"local": engine_local, "ray": engine_ray}
    names = [n for n, f in vars(Engine).items() if inspect.isfunction(f) and not n.startswith("_")]
    assert names == ["fingerprint", "find_exact_duplicates", "find_near_pairs", "write_split"]
    for name in names:
        want = [p for p in inspect.signature(getattr(Engine, name)).parameters.values() if p.name != "self"]
        for module in (engine_local, engine_ray):
            got = inspect.signature(getattr(module, name))
            assert list(got.parameters.values()) == want, f"{module.__name__}.{name}{got}"
            assert got.return_annotation == inspect.signature(getattr(Engine, name)).return_annotation
