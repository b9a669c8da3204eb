"""The incremental diff and the parallel listing: hash partitions give the same answer as one set
in memory, parallel listing the same objects and fingerprint as one sequential listing."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from kneescreen.errors import KneescreenError
from kneescreen.fileio.store import Store, join
from kneescreen.screen import diff, ledger, listing
from kneescreen.screen.config import ScreenConfig
from kneescreen.screen.schema import PREDICTIONS


def _commit(output: str, run_id: str, rows: list[tuple], version: str = "mv") -> None:
    """A committed run holding (key, etag, status, error_code) rows."""
    store = Store()
    table = pa.Table.from_pylist([{**{f.name: None for f in PREDICTIONS}, "run_id": run_id, "model_version": version,
                                   "key": k, "etag": e, "status": s, "error_code": c} for k, e, s, c in rows],
                                 schema=PREDICTIONS)
    uri = join(output, "predictions", f"model_version={version}", f"run_id={run_id}", "part-0.parquet")
    store.write_parquet(table, uri)
    ledger.commit_run(store, output, {"run_id": run_id, "started_at": f"2026-01-0{len(run_id)}T{run_id}",
                                      "model_version": version, "predictions": uri,
                                      "counts": {"listed": len(rows), "screened": len(rows)}})


def _archive(root, keys):
    for key in keys:
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(key.encode())
    return {o.key: o.etag for o in Store().list_objects(str(root))}


def _to_screen(store: Store, result: dict) -> set[str]:
    return {k for uri in result["chunk_uris"] for k in store.read_parquet(uri, columns=["key"]).column("key").to_pylist()}


@pytest.fixture
def ledger_case(tmp_path):
    """An archive and three committed runs covering every rule of the diff."""
    keys = ["ok.dcm", "flaky.dcm", "bad.dcm", "hip.dcm", "healed.dcm", "okthenfail.dcm", "dup.dcm", "other.dcm",
            "new.dcm", "changed.dcm", "a/deep/one.dcm", "a/two.dcm"]
    etag = _archive(tmp_path / "in", keys)
    out = str(tmp_path / "out")
    _commit(out, "r1", [("ok.dcm", etag["ok.dcm"], "ok", None), ("flaky.dcm", etag["flaky.dcm"], "error", "read_failed"),
                        ("bad.dcm", etag["bad.dcm"], "error", "truncated"), ("hip.dcm", etag["hip.dcm"], "skipped", "not_knee"),
                        ("healed.dcm", etag["healed.dcm"], "error", "read_failed"),
                        ("okthenfail.dcm", etag["okthenfail.dcm"], "ok", None), ("dup.dcm", etag["dup.dcm"], "ok", None),
                        ("changed.dcm", "old-etag", "ok", None), ("a/deep/one.dcm", etag["a/deep/one.dcm"], "ok", None),
                        ("gone.dcm", "e", "ok", None)])
    _commit(out, "r2", [("healed.dcm", etag["healed.dcm"], "ok", None), ("dup.dcm", etag["dup.dcm"], "ok", None),
                        ("okthenfail.dcm", etag["okthenfail.dcm"], "error", "read_failed"),
                        ("a/two.dcm", etag["a/two.dcm"], "error", "not_dicom")])
    _commit(out, "r3", [("other.dcm", etag["other.dcm"], "ok", None)], version="older-model")
    return ScreenConfig(input=str(tmp_path / "in"), output=out, bundle="unused"), keys


@pytest.mark.parametrize("partitions", [1, 4])
@pytest.mark.parametrize("retry_errors", [False, True])
def test_diff_applies_the_done_rule_in_every_partition(ledger_case, partitions, retry_errors):
    cfg, keys = ledger_case
    cfg = ScreenConfig(**{**cfg.__dict__, "retry_errors": retry_errors, "diff_partitions": partitions})
    store = Store()
    runs = ledger.committed_runs(store, cfg.output)
    result = diff.diff_listing(store, cfg, "run-x", runs, "mv", use_ray=False)
    expected = {"flaky.dcm", "other.dcm", "new.dcm", "changed.dcm"} | ({"bad.dcm", "a/two.dcm"} if retry_errors else set())
    assert _to_screen(store, result) == expected
    assert result["partitions"] == partitions
    assert result["to_screen"] == len(expected) and result["listed"] == len(keys)
    assert result["already_done"] == len(keys) - len(expected)
    # retried: listed objects whose committed rows (this model version) are all errors to retry.
    assert result["retried"] == (3 if retry_errors else 1)
    # The in-memory reference form of the rule agrees.
    done, retry = ledger.screen_state(store, cfg.output, runs, "mv", retry_errors)
    listed = {o.key: ledger.object_digest(o.key, o.etag) for o in store.list_objects(cfg.input)}
    assert {k for k, d in listed.items() if d not in done} == expected
    assert sum(d in retry for k, d in listed.items() if d not in done) == result["retried"]


def test_full_mode_and_first_run_subtract_nothing(ledger_case, tmp_path):
    cfg, keys = ledger_case
    store = Store()
    runs = ledger.committed_runs(store, cfg.output)
    full = diff.diff_listing(store, ScreenConfig(**{**cfg.__dict__, "mode": "full"}), "run-f", runs, "mv")
    assert _to_screen(store, full) == set(keys) and full["partitions"] == 1 and full["retried"] == 0
    fresh = diff.diff_listing(store, cfg, "run-n", runs, "new-model")
    assert _to_screen(store, fresh) == set(keys) and fresh["fingerprint"] == full["fingerprint"]


def _big_case(tmp_path, n=400, seed=0):
    rng = random.Random(seed)
    keys = [f"site{rng.randrange(5)}/{rng.randrange(20):02d}/img{i:04d}.dcm" for i in range(n)]
    etag = _archive(tmp_path / "in", keys)
    out = str(tmp_path / "out")
    for r in ("r1", "r2"):
        rows = []
        for k in rng.sample(keys, n // 2):
            status, code = rng.choice([("ok", None), ("error", "read_failed"), ("error", "truncated"),
                                       ("skipped", "not_knee")])
            rows.append((k, etag[k] if rng.random() < 0.9 else "stale", status, code))
        _commit(out, r, rows)
    return ScreenConfig(input=str(tmp_path / "in"), output=out, bundle="unused")


def _summary(store, result):
    return ({k: result[k] for k in ("listed", "already_done", "to_screen", "retried", "fingerprint")},
            sorted(_to_screen(store, result)))


def test_more_partitions_give_the_same_diff(tmp_path):
    cfg = _big_case(tmp_path)
    store = Store()
    runs = ledger.committed_runs(store, cfg.output)
    one = _summary(store, diff.diff_listing(store, ScreenConfig(**{**cfg.__dict__, "diff_partitions": 1}),
                                            "p1", runs, "mv"))
    assert 0 < one[0]["to_screen"] < one[0]["listed"] and one[0]["retried"] > 0
    for parts in (3, 16):
        c = ScreenConfig(**{**cfg.__dict__, "diff_partitions": parts})
        assert _summary(store, diff.diff_listing(store, c, f"p{parts}", runs, "mv", use_ray=False)) == one


def test_partitions_as_ray_tasks_give_the_same_diff(ray_local, tmp_path):
    cfg = _big_case(tmp_path, seed=1)
    store = Store()
    runs = ledger.committed_runs(store, cfg.output)
    one = _summary(store, diff.diff_listing(store, cfg, "p1", runs, "mv", use_ray=False))
    c = ScreenConfig(**{**cfg.__dict__, "diff_partitions": 5})
    assert _summary(store, diff.diff_listing(store, c, "p5", runs, "mv")) == one  # >1 partition: Ray tasks


def test_rescan_of_an_unchanged_archive_screens_nothing(tmp_path):
    keys = [f"d{i % 7}/x{i}.dcm" for i in range(120)]
    _archive(tmp_path / "in", keys)
    store = Store()
    cfg = ScreenConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), bundle="unused", diff_partitions=3)
    first = diff.diff_listing(store, cfg, "a", [], "mv")
    assert first["to_screen"] == 120 and first["partitions"] == 1  # nothing to subtract: one partition
    rows = [(r["key"], r["etag"], "ok", None) for uri in first["chunk_uris"] for r in store.read_parquet(uri).to_pylist()]
    _commit(cfg.output, "r1", rows)
    again = diff.diff_listing(store, cfg, "b", ledger.committed_runs(store, cfg.output), "mv", use_ray=False)
    assert (again["to_screen"], again["already_done"], again["chunk_uris"]) == (0, 120, [])
    assert again["partitions"] == 3 and again["fingerprint"] == first["fingerprint"]
    # Scratch files live under the run's own prefix; the ledger's clean-up removes them.
    assert store.exists(again["scratch"])
    ledger.drop_uncommitted(store, cfg.output, {"r1"})
    assert not store.exists(join(cfg.output, "_scratch"))


def test_choose_partitions_from_the_previous_run():
    cfg = ScreenConfig(input="in", output="out", bundle="b")
    runs = [{"run_id": "r", "model_version": "mv", "predictions": "x",
             "counts": {"listed": 2_500_000, "screened": 2_400_000}}]
    assert diff.choose_partitions(cfg, runs, "mv") == 3
    assert diff.choose_partitions(cfg, runs, "other") == 1  # nothing to subtract
    assert diff.choose_partitions(ScreenConfig(**{**cfg.__dict__, "diff_partitions": 7}), runs, "mv") == 7


# --- parallel listing ----------------------------------------------------------------------------

LAYOUT = ["top.dcm", "zz.png", ".hidden", "a/1.dcm", "a/2.dcm", "a/b/3.dcm", "a/b/c/4.dcm", "a/b/c/d/5.dcm",
          "b/6.dcm", "b/.hidden2", "bb/7.jpg", "c/deep/er/8.dcm", "empty/", "0a.dcm", "0b/9.dcm", "1c.dcm"]

FANOUTS = [dict(fanout_depth=0, workers=1), dict(fanout_depth=1, workers=4), dict(fanout_depth=2, workers=2),
           dict(fanout_depth=6, workers=3), dict(prefixes=("a", "b", "c", "e", "t", "z", "0", "1", "."), workers=4),
           dict(prefixes=("a/b/", "a/1", "a/2", "b", "c", "e", "t", "z", "0", "1", "."), workers=2)]


def _listing(store, root, **kw):
    seen, fp, markers = [], listing.Fingerprint(), 0
    for page in listing.iter_pages(store, root, page_size=2, **kw):
        seen += [(o.key, o.etag, o.size) for o in page.objects]
        fp.add([ledger.object_digest(o.key, o.etag) for o in page.objects])
        markers += page.markers
    return seen, fp.hexdigest(), markers


def _check_fanouts(store, root, include=(), exclude=(), markers=0):
    reference = sorted((o.key, o.etag, o.size) for o in store.list_objects(root, include, exclude))
    assert reference
    fingerprints = set()
    for kw in FANOUTS:
        seen, fp, skipped = _listing(store, root, include=include, exclude=exclude, **kw)
        assert sorted(seen) == reference, kw  # every object once: nothing skipped, nothing twice
        fingerprints.add(fp)
        # Directory markers under the listed prefixes: each counted once, whatever the fan-out.
        assert skipped == (markers(kw) if callable(markers) else markers), kw
    assert len(fingerprints) == 1  # order-independent: equal for equal listings


def _write_layout(root):
    for key in LAYOUT:
        if key.endswith("/"):
            (root / key).mkdir(parents=True, exist_ok=True)
        else:
            (root / key).parent.mkdir(parents=True, exist_ok=True)
            (root / key).write_bytes(key.encode() * 3)


def test_parallel_listing_equals_sequential_on_a_folder(tmp_path):
    _write_layout(tmp_path)
    store = Store()
    _check_fanouts(store, str(tmp_path))
    _check_fanouts(store, str(tmp_path), include=("*.dcm",), exclude=("a/b/*",))
    with pytest.raises(KneescreenError, match="does not exist"):
        list(listing.iter_pages(store, str(tmp_path / "missing"), fanout_depth=1, workers=2))


@pytest.mark.s3
def test_parallel_listing_equals_sequential_on_s3(s3_bucket, tmp_path):
    _write_layout(tmp_path)
    store = Store.resolve()
    for key in LAYOUT:
        if not key.endswith("/"):
            store.write_bytes(f"s3://{s3_bucket}/arch/{key}", (tmp_path / key).read_bytes())
    # Folder markers are not objects, but counted: one at the root, one below it, one nested.
    for marker in ("arch/", "arch/empty/", "arch/a/b/"):
        store.write_bytes(f"s3://{s3_bucket}/{marker}", b"")
    store.write_bytes(f"s3://{s3_bucket}/archive-sibling/x.dcm", b"x")  # outside the prefix
    store.write_bytes(f"s3://{s3_bucket}/archive-sibling/", b"")  # a marker outside it too

    def markers(kw):  # --list-prefixes list only below them: the root's own marker is outside
        return 2 if kw.get("prefixes") else 3

    _check_fanouts(store, f"s3://{s3_bucket}/arch", markers=markers)
    _check_fanouts(store, f"s3://{s3_bucket}/arch", include=("*.dcm",), exclude=("a/b/*",), markers=markers)


def test_fingerprint_changes_with_the_listing():
    def fp(pairs):
        f = listing.Fingerprint()
        f.add([ledger.object_digest(k, e) for k, e in pairs])
        return f.hexdigest()

    base = [("a", "1"), ("b", "2")]
    assert fp(base) == fp(base[::-1]) != fp([("a", "1"), ("b", "3")]) != fp(base[:1])
    assert fp(base) != fp([*base, ("c", "3")])


def test_overlapping_list_prefixes_are_refused():
    with pytest.raises(KneescreenError, match="overlap"):
        ScreenConfig(input="i", output="o", bundle="b", list_prefixes=("a", "ab")).validate()
    ScreenConfig(input="i", output="o", bundle="b", list_prefixes=("a/", "ab")).validate()


def test_cli_exposes_listing_and_diff_settings(capsys):
    import json

    from kneescreen.cli import main

    assert main(["screen", "--input", "in", "--output", "out", "--bundle", "b", "--list-fanout-depth", "2",
                 "--list-prefixes", "0,1", "--list-workers", "16", "--diff-partitions", "4", "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["list_fanout_depth"], cfg["list_prefixes"], cfg["list_workers"], cfg["diff_partitions"]) == \
        (2, ["0", "1"], 16, 4)


@pytest.mark.slow
def test_screen_rescans_with_partitioned_diff_are_exactly_once(ray_local, tmp_path, small_archive, tiny_bundle):
    """End to end: a rescan whose diff runs as Ray tasks (3 partitions) screens only the changed
    object, and the scratch is gone after each commit."""
    from kneescreen.screen.pipeline import run_screen

    root, _ = small_archive
    cfg = ScreenConfig(input=str(root / "images"), output=str(tmp_path / "out"), bundle=tiny_bundle, batch_size=8,
                       list_fanout_depth=2, list_workers=3, diff_partitions=3)
    first = run_screen(cfg)
    assert first["counts"]["screened"] == first["counts"]["listed"] > 0
    again = run_screen(cfg)
    assert again["counts"]["screened"] == 0 and again["counts"]["already_screened"] == first["counts"]["listed"]
    assert again["listing_fingerprint"] == first["listing_fingerprint"]
    sequential = ScreenConfig(**{**cfg.__dict__, "list_fanout_depth": 0, "list_workers": 1, "diff_partitions": None})
    assert run_screen(sequential)["listing_fingerprint"] == first["listing_fingerprint"]
    assert not list((tmp_path / "out" / "_scratch").rglob("*.parquet"))
