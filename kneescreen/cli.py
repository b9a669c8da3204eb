"""The `kneescreen` command line and the shared body of the Ray job entry points in jobs/.

Every command is one frozen config dataclass and one runner. Flags come from the dataclass
(`kneescreen.config`), so defaults and help text live in one place; ``--config FILE`` sets any
field (required ones included) from YAML, and flags given on the command line win. """

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from dataclasses import dataclass

from kneescreen import config as cfglib
from kneescreen._private import console
from kneescreen.errors import KneescreenError

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Command:
    """One subcommand. ``config`` and ``run`` are ``"module:attribute"`` paths, imported only when
    the command runs (or its flags are asked for), so ``kneescreen inspect`` never loads Ray or
    torch. ``run`` takes the resolved config and returns the exit status."""

    config: str
    run: str
    help: str


def _load(path: str):
    module, _, attr = path.partition(":")
    if module == "kneescreen.cli":  # this module, also when it runs as `python -m kneescreen.cli`
        return globals()[attr]
    return getattr(importlib.import_module(module), attr)


# One line per command. The runners in this module are the CLI's part: they print the result.
COMMANDS: dict[str, Command] = {
    "demo": Command("kneescreen.demo:DemoConfig", "kneescreen.demo:run_demo",
                    "the main job on embedded defaults (local folders, generated archive)"),
    "inspect": Command("kneescreen.fileio.probe:InspectConfig", "kneescreen.cli:run_inspect_config",
                       "one JSON line per file: how the reader decodes it"),
    "synth": Command("kneescreen._private.commands:SynthCommand", "kneescreen.cli:run_synth_config",
                     "generate a synthetic knee radiograph archive + labels"),
    "split": Command("kneescreen._private.commands:SplitCommand", "kneescreen.cli:run_split_config",
                     "fingerprint, dedupe and split a labelled collection without leakage"),
    "link": Command("kneescreen.link.config:LinkConfig", "kneescreen.cli:run_link_config",
                    "link archive radiographs to a DXA registry: training labels + audit"),
    "train": Command("kneescreen.train.config:TrainConfig", "kneescreen.cli:run_train_config",
                     "fine-tune the ensemble on Ray Train and write a model bundle"),
    "evaluate": Command("kneescreen.train.evaluate:EvaluateConfig", "kneescreen.cli:run_evaluate_config",
                        "evaluate a bundle on a split: table, JSON and Parquet"),
    "report": Command("kneescreen.report:ReportConfig", "kneescreen.cli:run_report_config",
                      "HTML report + PNG figures from a screening output (local or s3://)"),
    "screen": Command("kneescreen.screen.config:ScreenConfig", "kneescreen.cli:run_screen_config",
                      "screen an archive with a bundle: predictions, stats, run manifest"),
}


def run_inspect_config(cfg) -> int:
    from kneescreen.fileio.probe import run_inspect
    from kneescreen.fileio.reader import ReaderConfig
    from kneescreen.fileio.store import Store

    return run_inspect(list(cfg.targets), Store.resolve(cfg.endpoint_url), config=ReaderConfig(max_pixels=cfg.max_pixels))


def run_synth_config(cfg) -> int:
    from kneescreen.data.synth import write_archive
    from kneescreen.fileio.store import Store, join

    store = Store.resolve(cfg.endpoint_url)
    if cfg.registry:
        from kneescreen.data.synth_registry import write_archive_with_registry

        summary = write_archive_with_registry(cfg.out, cfg.synth, store, cfg.registry_window_days, cfg.registry_format)
    else:
        summary = write_archive(cfg.out, cfg.synth, store)
    store.write_bytes(join(cfg.out, "synth_config.yaml"), cfglib.dump_yaml(cfg).encode())
    print(json.dumps(summary, indent=2))
    return 0


def run_split_config(cfg) -> int:
    from kneescreen.data.split.run import run_split
    from kneescreen.fileio.store import Store, join

    store = Store.resolve(cfg.endpoint_url)
    audit = run_split(cfg.source, cfg.out, cfg.split, images_root=cfg.images_root, store=store)
    store.write_bytes(join(cfg.out, "split_config.yaml"), cfglib.dump_yaml(cfg).encode())
    print(json.dumps(audit["summary"], indent=2))
    return 0 if audit["summary"]["leaks"] == 0 else 1


def run_train_config(cfg) -> int:
    """Train from a resolved `TrainConfig`: print the test table and where the bundle went."""
    from kneescreen.train.evaluate import format_table
    from kneescreen.train.run import run_train

    out = run_train(cfg)
    print(format_table(out["test"]))
    print(f"bundle {out['version']} written to {out['bundle']}")
    return 0


def run_evaluate_config(cfg) -> int:
    """Evaluate with a resolved `EvaluateConfig` and print its table."""
    from kneescreen.train.evaluate import format_table, run_evaluate

    print(format_table(run_evaluate(cfg)))
    return 0


def run_report_config(cfg) -> int:
    from kneescreen.fileio.store import Store
    from kneescreen.report import build_report

    print(build_report(cfg.output, cfg.out, Store.resolve(cfg.endpoint_url)))
    return 0


def run_screen_config(cfg) -> int:
    """Screen with a resolved `ScreenConfig` and print the run's counts."""
    from kneescreen.screen.pipeline import run_screen

    manifest = run_screen(cfg)
    print(json.dumps({k: manifest[k] for k in ("run_id", "model_version", "counts", "throughput_images_per_s")}, indent=2))
    return 0


def run_link_config(cfg) -> int:
    """Link an archive to a DXA registry with a resolved `LinkConfig` and print the audit table."""
    from kneescreen.link.audit import format_audit
    from kneescreen.link.run import run_link

    print(format_audit(run_link(cfg), cfg.out))
    return 0


def _add_common(p: argparse.ArgumentParser, cls: type) -> None:
    cfglib.add_arguments(p, cls)
    cfglib.add_config_flag(p)
    p.add_argument("--dry-run", action="store_true", help="validate the settings, print them resolved, and stop")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug logging, and Ray's own output on the console (else it goes to <output>/logs/)")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``kneescreen`` parser. Every command is listed; only ``only``'s flags are added (all
    when None), so parsing one command imports one config module."""
    parser = argparse.ArgumentParser(prog="kneescreen", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        if only is None or name == only:
            _add_common(p, _load(command.config))
    return parser


def _setup_logging(verbose: bool, command: str = "kneescreen", cfg=None) -> None:
    """Logging for one command: stage lines and a progress line on the console, everything else
    (Ray's dataset dumps, internal warnings, worker output) in ``<output>/logs/`` unless
    ``--verbose`` (`kneescreen._private.console`)."""
    output = next((getattr(cfg, a) for a in ("out", "output") if isinstance(getattr(cfg, a, None), str)), None)
    path = console.setup(command, output, verbose)
    if not verbose:
        _logger.info("%s: details in %s (--verbose prints them here)", command, path)


def _resolve_and_run(command: Command, args: argparse.Namespace, prog: str, name: str) -> int:
    try:
        cls = _load(command.config)
        values = cfglib.load_yaml(args.config) if args.config else None
        cfg = cfglib.build(cls, args, values, source=args.config or "config")
        if hasattr(cfg, "validate"):
            cfg.validate()
        if args.dry_run:
            print(json.dumps(cfglib.to_flat_dict(cfg), indent=2))
            return 0
        _setup_logging(args.verbose, name, cfg)
        return _load(command.run)(cfg)
    except KneescreenError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2


def job_main(prog: str, doc: str, command: str, argv: list[str] | None = None) -> int:
    """Shared body of the thin Ray job entry points in jobs/: parse, resolve, run, exit status."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(parser, _load(COMMANDS[command].config))
    return _resolve_and_run(COMMANDS[command], parser.parse_args(argv), prog, command)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The first word that is not an option names the command (the top level has only -h).
    named = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(only=named if named in COMMANDS else "").parse_args(argv)
    return _resolve_and_run(COMMANDS[args.command], args, "kneescreen", args.command)


if __name__ == "__main__":
    sys.exit(main())
