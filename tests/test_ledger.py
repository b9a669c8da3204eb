"""The run ledger's commit: the pretty manifest under runs/ stays the commit, written last; its
one-line copy under runs_jsonl/ (for JSON SerDe tables) is written just before it and cleaned up
with the other files of a run that never committed."""

from __future__ import annotations

import json

from kneescreen.fileio.store import Store
from kneescreen.screen import ledger

MANIFEST = {"run_id": "20260105T020000Z-abc123", "started_at": "2026-01-05T02:00:00+00:00", "model_version": "mv1",
            "counts": {"listed": 3, "ok": 2}, "error_codes": {"not_dicom": 1}, "note": "multi\nline text"}


class RecordingStore(Store):
    """A local Store that remembers the order of writes."""

    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write_bytes(self, uri: str, data: bytes) -> None:
        self.writes.append(str(uri))
        super().write_bytes(uri, data)


def test_commit_writes_one_line_copy_then_the_commit(tmp_path):
    store = RecordingStore()
    ledger.commit_run(store, str(tmp_path), MANIFEST)
    name = f"run_id={MANIFEST['run_id']}.json"
    assert store.writes == [str(tmp_path / "runs_jsonl" / name), str(tmp_path / "runs" / name)]  # commit last
    line = (tmp_path / "runs_jsonl" / name).read_text()
    assert line.endswith("\n") and line.count("\n") == 1  # one object per line, newline-terminated
    assert json.loads(line) == MANIFEST == json.loads((tmp_path / "runs" / name).read_text())
    assert "\n  " in (tmp_path / "runs" / name).read_text()  # the ledger's file stays readable
    assert ledger.committed_runs(store, str(tmp_path)) == [MANIFEST]  # runs_jsonl/ is not a second ledger


def test_orphan_one_line_copy_is_dropped_with_its_run(tmp_path):
    """A crash between the two writes leaves a line for a run that never committed: the next run
    deletes it, as it deletes that run's predictions."""
    store = Store()
    out = str(tmp_path)
    ledger.commit_run(store, out, MANIFEST)
    orphan = {**MANIFEST, "run_id": "20260106T020000Z-dead00"}
    store.write_bytes(str(tmp_path / "runs_jsonl" / f"run_id={orphan['run_id']}.json"), json.dumps(orphan).encode())
    (tmp_path / "predictions" / "model_version=mv1" / f"run_id={orphan['run_id']}").mkdir(parents=True)
    committed = {r["run_id"] for r in ledger.committed_runs(store, out)}
    assert ledger.drop_uncommitted(store, out, committed) == [orphan["run_id"]]
    assert sorted(p.name for p in (tmp_path / "runs_jsonl").iterdir()) == [f"run_id={MANIFEST['run_id']}.json"]
    assert ledger.drop_uncommitted(store, out, committed) == []


def test_drop_uncommitted_without_runs_jsonl(tmp_path):
    """Outputs written before runs_jsonl/ existed are fine."""
    assert ledger.drop_uncommitted(Store(), str(tmp_path), set()) == []
