"""The command line's shape: one table entry per command, each command's modules imported only
when it runs, so `kneescreen inspect` and `kneescreen --help` start without Ray or torch."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
from pydicom.data import get_testdata_file

from kneescreen import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEAVY = ("ray", "torch", "pandas", "pyarrow")


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("argv", [
    ["inspect", get_testdata_file("MR_small.dcm")],
    ["--help"],
    ["inspect", "--help"],
])
def test_light_commands_do_not_import_ray_or_torch(argv):
    code = f"""
import json, sys
from kneescreen.cli import main
try:
    rc = main({argv!r})
except SystemExit as exc:
    rc = exc.code
print(json.dumps({{"rc": rc, "loaded": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""
    proc = _fresh_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"rc": 0, "loaded": []}, result
    if argv[0] == "inspect" and "--help" not in argv:
        row = json.loads(proc.stdout.splitlines()[0])
        assert row["status"] == "ok" and row["modality"] == "MR"


def test_every_table_entry_resolves():
    """A typo in a "module:attribute" path fails here, not when a user first runs that command."""
    for name, command in cli.COMMANDS.items():
        cls, run = cli._load(command.config), cli._load(command.run)
        assert isinstance(cls, type) and callable(run), name
    full = cli.build_parser().format_help()
    assert all(name in full for name in cli.COMMANDS)


def test_a_command_gets_only_its_own_flags():
    parser = cli.build_parser(only="screen")
    args = parser.parse_args(["screen", "--input", "a", "--output", "b", "--bundle", "c", "--dry-run"])
    assert (args.command, args.input, args.dry_run) == ("screen", "a", True)
    with pytest.raises(SystemExit):  # inspect's flags were not added: the subcommand takes nothing
        parser.parse_args(["inspect", "x.dcm"])


def test_dry_run_prints_the_resolved_config(capsys):
    assert cli.main(["inspect", "a.dcm", "b.dcm", "--max-pixels", "10", "--dry-run"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["targets"] == ["a.dcm", "b.dcm"] and resolved["max_pixels"] == 10
