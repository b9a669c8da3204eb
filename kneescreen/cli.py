"""The `kneescreen` command line and the shared body of the Ray job entry points in jobs/.

Every command is one frozen config dataclass and one runner. Flags come from the dataclass
(`kneescreen.config`), so defaults and help text live in one place; ``--config FILE`` sets any
field (required ones included) from YAML, and flags given on the command line win. """

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from kneescreen import config as cfglib
from kneescreen._private import console
from kneescreen.config import opt
from kneescreen.data.datasets import SplitConfig, run_split
from kneescreen.data.synth import SynthConfig, write_archive
from kneescreen.demo import DemoConfig, run_demo
from kneescreen.errors import KneescreenError
from kneescreen.io.inspect import InspectConfig, run_inspect
from kneescreen.io.reader import ReaderConfig
from kneescreen.io.store import Store, join
from kneescreen.link.config import LinkConfig
from kneescreen.report import ReportConfig, build_report
from kneescreen.screen.config import ScreenConfig
from kneescreen.screen.pipeline import run_screen
from kneescreen.train.config import TrainConfig
from kneescreen.train.evaluate import EvaluateConfig, format_table, run_evaluate
from kneescreen.train.run import run_train

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SynthCommand:
    """``kneescreen synth``: where to write, plus the generator settings."""

    out: str = opt(help="output folder or s3:// prefix")
    endpoint_url: str | None = opt(None, "S3-compatible endpoint (else AWS_ENDPOINT_URL)")
    registry: bool = opt(False, "also write a DXA registry with known truth (registry.csv, registry_truth.csv)")
    registry_window_days: int = opt(365, "the link window the registry's truth is built for")
    registry_format: str = opt("csv", "registry file format", choices=("csv", "parquet"))
    synth: SynthConfig = field(default_factory=SynthConfig)


@dataclass(frozen=True)
class SplitCommand:
    """``kneescreen split``: the collection, where to write, plus the split policy."""

    source: str = opt(help="folder-per-class, a folder/URI with labels.csv, or a labels CSV/Parquet", positional=True)
    out: str = opt(help="folder or prefix for split.csv, audit.json, duplicates.csv")
    images_root: str | None = opt(None, "where keys in a labels file are relative to")
    endpoint_url: str | None = opt(None, "S3-compatible endpoint (else AWS_ENDPOINT_URL)")
    split: SplitConfig = field(default_factory=SplitConfig)


def _run_inspect(cfg: InspectConfig) -> int:
    return run_inspect(list(cfg.targets), Store.resolve(cfg.endpoint_url), config=ReaderConfig(max_pixels=cfg.max_pixels))


def _run_synth(cfg: SynthCommand) -> int:
    store = Store.resolve(cfg.endpoint_url)
    if cfg.registry:
        from kneescreen.data.synth_registry import write_archive_with_registry

        summary = write_archive_with_registry(cfg.out, cfg.synth, store, cfg.registry_window_days, cfg.registry_format)
    else:
        summary = write_archive(cfg.out, cfg.synth, store)
    store.write_bytes(join(cfg.out, "synth_config.yaml"), cfglib.dump_yaml(cfg).encode())
    print(json.dumps(summary, indent=2))
    return 0


def _run_split(cfg: SplitCommand) -> int:
    store = Store.resolve(cfg.endpoint_url)
    audit = run_split(cfg.source, cfg.out, cfg.split, images_root=cfg.images_root, store=store)
    store.write_bytes(join(cfg.out, "split_config.yaml"), cfglib.dump_yaml(cfg).encode())
    print(json.dumps(audit["summary"], indent=2))
    return 0 if audit["summary"]["leaks"] == 0 else 1


def run_train_config(cfg) -> int:
    """Train from a resolved `TrainConfig`: print the test table and where the bundle went."""
    out = run_train(cfg)
    print(format_table(out["test"]))
    print(f"bundle {out['version']} written to {out['bundle']}")
    return 0


def _run_evaluate(cfg) -> int:
    run_evaluate(cfg)
    return 0


def _run_report(cfg) -> int:
    print(build_report(cfg.output, cfg.out, Store.resolve(cfg.endpoint_url)))
    return 0


def run_screen_config(cfg) -> int:
    """Screen with a resolved `ScreenConfig` and print the run's counts."""
    manifest = run_screen(cfg)
    print(json.dumps({k: manifest[k] for k in ("run_id", "model_version", "counts", "throughput_images_per_s")}, indent=2))
    return 0


def _run_link(cfg) -> int:
    from kneescreen.link.audit import format_audit
    from kneescreen.link.run import run_link

    print(format_audit(run_link(cfg), cfg.out))
    return 0


def _commands() -> dict[str, tuple[type, Callable, str]]:
    """name -> (config dataclass, runner, help)."""
    return {
        "demo": (DemoConfig, run_demo, "the main job on embedded defaults (local folders, generated archive)"),
        "inspect": (InspectConfig, _run_inspect, "one JSON line per file: how the reader decodes it"),
        "synth": (SynthCommand, _run_synth, "generate a synthetic knee radiograph archive + labels"),
        "split": (SplitCommand, _run_split, "fingerprint, dedupe and split a labelled collection without leakage"),
        "link": (LinkConfig, _run_link, "link archive radiographs to a DXA registry: training labels + audit"),
        "train": (TrainConfig, run_train_config, "fine-tune the ensemble on Ray Train and write a model bundle"),
        "evaluate": (EvaluateConfig, _run_evaluate, "evaluate a bundle on a split: table, JSON and Parquet"),
        "report": (ReportConfig, _run_report, "HTML report + PNG figures from a screening output (local or s3://)"),
        "screen": (ScreenConfig, run_screen_config, "screen an archive with a bundle: predictions, stats, run manifest"),
    }


def _add_common(p: argparse.ArgumentParser, cls: type) -> None:
    cfglib.add_arguments(p, cls)
    cfglib.add_config_flag(p)
    p.add_argument("--dry-run", action="store_true", help="validate the settings, print them resolved, and stop")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug logging, and Ray's own output on the console (else it goes to <output>/logs/)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kneescreen", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, _, help_text) in _commands().items():
        _add_common(sub.add_parser(name, help=help_text, description=help_text), cls)
    return parser


def _setup_logging(verbose: bool, command: str = "kneescreen", cfg=None) -> None:
    """Logging for one command: stage lines and a progress line on the console, everything else
    (Ray's dataset dumps, internal warnings, worker output) in ``<output>/logs/`` unless
    ``--verbose`` (`kneescreen._private.console`)."""
    output = next((getattr(cfg, a) for a in ("out", "output") if isinstance(getattr(cfg, a, None), str)), None)
    path = console.setup(command, output, verbose)
    if not verbose:
        _logger.info("%s: details in %s (--verbose prints them here)", command, path)


def _resolve_and_run(cls: type, runner: Callable, args: argparse.Namespace, prog: str, command: str) -> int:
    try:
        values = cfglib.load_yaml(args.config) if args.config else None
        cfg = cfglib.build(cls, args, values, source=args.config or "config")
        if hasattr(cfg, "validate"):
            cfg.validate()
        if args.dry_run:
            print(json.dumps(cfglib.to_flat_dict(cfg), indent=2))
            return 0
        _setup_logging(args.verbose, command, cfg)
        return runner(cfg)
    except KneescreenError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2


def job_main(prog: str, doc: str, command: str, argv: list[str] | None = None) -> int:
    """Shared body of the thin Ray job entry points in jobs/: parse, resolve, run, exit status."""
    cls, runner, _ = _commands()[command]
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(parser, cls)
    return _resolve_and_run(cls, runner, parser.parse_args(argv), prog, command)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cls, runner, _ = _commands()[args.command]
    return _resolve_and_run(cls, runner, args, "kneescreen", args.command)


if __name__ == "__main__":
    sys.exit(main())
