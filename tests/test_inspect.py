"""`kneescreen inspect` over real DICOM files, local and through the S3 server."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from conftest import dicom_test_files

from kneescreen.cli import main
from kneescreen.fileio.probe import run_inspect
from kneescreen.fileio.store import Store

FILES = dicom_test_files()


def _lines(targets, **kw) -> list[dict]:
    out = io.StringIO()
    assert run_inspect(targets, out=out, **kw) == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_one_line_per_file_for_all_real_dicom_files():
    paths = sorted(FILES.values())
    rows = _lines(paths)
    assert [r["path"] for r in rows] == paths
    assert {r["status"] for r in rows} == {"ok", "error"}
    assert all(r["error_code"] for r in rows if r["status"] == "error")
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) >= 80 and all(len(r["pixel_hash"]) == 64 and r["rows"] > 0 for r in ok)
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in rows}
    assert by_name["RG1_UNCR.dcm"]["pixel_hash"] == by_name["RG1_J2KR.dcm"]["pixel_hash"]
    assert by_name["MR_truncated.dcm"]["error_code"] == "truncated"


def test_cli_subprocess_exit_zero_even_with_bad_files(tmp_path):
    bad = tmp_path / "garbage.dcm"
    bad.write_bytes(b"\x00" * 300)
    proc = subprocess.run(
        [sys.executable, "-m", "kneescreen.cli", "inspect", FILES["MR_small.dcm"], str(bad), str(tmp_path / "missing.dcm")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(x) for x in proc.stdout.splitlines()]
    assert [r["status"] for r in rows] == ["ok", "error", "error"]
    assert rows[1]["error_code"] == "not_dicom" and rows[2]["error_code"] == "read_failed"


@pytest.mark.s3
def test_inspect_s3_prefix_and_object(s3_bucket):
    client = Store.resolve().client
    for name in ("MR_small.dcm", "MR_small_RLE.dcm", "rtplan.dcm"):
        client.put_object(Bucket=s3_bucket, Key=f"arch/{name}", Body=open(FILES[name], "rb").read())
    rows = _lines([f"s3://{s3_bucket}/arch/"])
    assert [r["path"].rsplit("/", 1)[-1] for r in rows] == ["MR_small.dcm", "MR_small_RLE.dcm", "rtplan.dcm"]
    assert rows[0]["pixel_hash"] == rows[1]["pixel_hash"] and rows[2]["error_code"] == "no_pixel_data"
    single = _lines([f"s3://{s3_bucket}/arch/MR_small.dcm"])
    assert len(single) == 1 and single[0]["status"] == "ok"


def test_config_file_sets_defaults(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_pixels: 100\n")
    assert main(["inspect", "--config", str(cfg), FILES["MR_small.dcm"]]) == 0
    assert json.loads(capsys.readouterr().out)["error_code"] == "too_large"
    cfg.write_text("no_such_flag: 1\n")
    assert main(["inspect", "--config", str(cfg), FILES["MR_small.dcm"]]) == 2
