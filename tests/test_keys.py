"""Every key S3 accepts is listed, diffed, read (whole and ranged), screened, written to Parquet
byte for byte and found by the next incremental diff: on the local S3 server and in a local
folder (issue #20). One table of character classes drives both."""

from __future__ import annotations

import pathlib
import shutil

import pytest

from kneescreen.fileio.store import Store, join, split_s3
from kneescreen.link.config import LinkConfig
from kneescreen.link.run import run_link
from kneescreen.screen.config import ScreenConfig
from kneescreen.screen.ledger import committed_runs
from kneescreen.screen.pipeline import run_screen

pytestmark = [pytest.mark.slow, pytest.mark.ray]

# Relative keys, one per character class; each names a copy of the same readable DICOM.
_LONG = "long/" + "/".join(["d" * 200] * 4) + "/"
KEYS = {
    "hash": "pacs/a#b.dcm",
    "question": "pacs/a?b=1.dcm",
    "percent": "pacs/100%25 done%.dcm",
    "plus_amp_eq": "pacs/a+b&c=d.dcm",
    "semicolon_colon_at": "pacs/a;b:c@d.dcm",
    "dollar_comma": "pacs/$x,y.dcm",
    "brackets_braces": "pacs/[1]{2}.dcm",
    "caret_tilde_backtick": "pacs/^a~b`c.dcm",
    "quotes": "pacs/it's \"q\".dcm",
    "backslash": "pacs/back\\slash.dcm",
    "space": "pacs/with space/and  two.dcm",
    "unicode": "pacs/ünïcødé/膝 röntgen 🦴.dcm",
    "printable_ascii": "ascii/" + "".join(chr(c) for c in range(33, 127) if chr(c) not in "/*") + ".dcm",
    "prefix_of_another": "pre/x.dcm",
    "prefix_of_another_long": "pre/x.dcm.more.dcm",
    "deep": "a/b/c/d/e/f/g/h/i/j/deep.dcm",
    "long": None,  # filled below to exactly 1,024 bytes with the input prefix
}
S3_PREFIX = "arch"
KEYS["long"] = _LONG + "x" * (1024 - len((S3_PREFIX + "/" + _LONG).encode()) - len(".dcm")) + ".dcm"
assert len((S3_PREFIX + "/" + KEYS["long"]).encode()) == 1024


def _good_dicom(small_archive, labels, planted) -> bytes:
    root, _ = small_archive
    key = next(k for k in sorted(labels) if k.endswith(".dcm") and k not in planted)
    return (root / "images" / key).read_bytes()


def _rows(store: Store, output: str) -> list[dict]:
    return store.read_parquet(join(output, "predictions")).to_pylist()


def _link(store: Store, archive: str, out: str, tmp_path: pathlib.Path, keys: list[str], markers: int) -> None:
    """`kneescreen link` lists and reads the headers of every key (none unreadable) and counts
    the directory markers it skipped."""
    registry = tmp_path / "registry.csv"
    registry.write_text("patient_id,exam_date,t_score\nnobody,2020-01-01,-1.0\n")
    audit = run_link(LinkConfig(archive=archive, registry=str(registry), out=out), store=store)
    assert audit["counts"]["listed"] == len(keys) and audit["counts"]["accounted"]
    assert audit["counts"]["skipped_directory_markers"] == markers
    rows = {}
    for sub in ("labels", "unlinked"):  # a folder with no rows is not written
        if any(True for _ in store.list_objects(join(out, sub))) if out.startswith("s3://") else \
                pathlib.Path(out, sub).is_dir():
            rows.update({r["key"]: r for r in store.read_parquet(join(out, sub)).to_pylist()})
    assert sorted(rows) == sorted(keys)
    assert not {k: r.get("reason") for k, r in rows.items() if r.get("reason") == "read_failed"}


def _screen_twice(store: Store, cfg: ScreenConfig, keys: list[str], markers: int) -> None:
    first = run_screen(cfg, store=store)
    assert first["counts"]["listed"] == first["counts"]["screened"] == len(keys), first["counts"]
    assert first["counts"]["skipped_directory_markers"] == markers  # skipped, and said so
    rows = _rows(store, cfg.output)
    by_key = {r["key"]: r for r in rows}
    assert sorted(by_key) == sorted(keys)  # byte for byte: no key lost, cut or re-encoded
    bad = {k: (r["status"], r["error_code"], r["error_message"]) for k, r in by_key.items() if r["status"] != "ok"}
    assert not bad
    second = run_screen(cfg, store=store)
    assert second["counts"]["listed"] == len(keys) and second["counts"]["screened"] == 0, second["counts"]
    assert second["counts"]["skipped_directory_markers"] == markers
    assert len(committed_runs(store, cfg.output)) == 2


@pytest.mark.s3
def test_every_legal_key_on_s3(ray_local, s3_bucket, small_archive, labels, planted, tiny_bundle, tmp_path):
    store = Store.resolve()
    data = _good_dicom(small_archive, labels, planted)
    root = f"s3://{s3_bucket}/{S3_PREFIX}"
    for key in KEYS.values():
        uri = join(root, key)
        assert split_s3(uri) == (s3_bucket, f"{S3_PREFIX}/{key}")
        store.write_bytes(uri, data)
        assert store.read_bytes(uri) == data
        assert store.read_range(uri, 128, 4).data == data[128:132]
    store.write_bytes(join(root, "pacs/") + "/", b"")  # a folder marker: not an object, skipped
    store.write_bytes(f"s3://{s3_bucket}/{S3_PREFIX}/pacs/marker/", b"")
    listed = sorted(o.key for o in store.list_objects(root))
    assert listed == sorted(KEYS.values())
    cfg = ScreenConfig(input=root, output=f"s3://{s3_bucket}/out", bundle=tiny_bundle, batch_size=8)
    _screen_twice(store, cfg, list(KEYS.values()), markers=2)
    _link(store, root, f"s3://{s3_bucket}/link", tmp_path, list(KEYS.values()), markers=2)


def test_every_legal_key_in_a_local_folder(ray_local, small_archive, labels, planted, tiny_bundle, tmp_path):
    store = Store()
    data = _good_dicom(small_archive, labels, planted)
    root = tmp_path / "in"
    keys = [k for k in KEYS.values()]
    for key in keys:
        path = pathlib.Path(join(str(root), key))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        assert store.read_range(str(path), 128, 4).data == data[128:132]
    assert sorted(o.key for o in store.list_objects(str(root))) == sorted(keys)
    cfg = ScreenConfig(input=str(root), output=str(tmp_path / "out"), bundle=tiny_bundle, batch_size=8)
    _screen_twice(store, cfg, keys, markers=0)
    _link(store, str(root), str(tmp_path / "link"), tmp_path, keys, markers=0)
    shutil.rmtree(root)
