"""The `kneescreen` command line. Each subcommand parses flags and calls one ``run_*`` function."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from kneescreen.errors import KneescreenError


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file whose keys set the defaults of this command's flags")


def _apply_config(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse twice: once to find --config, then with its keys as defaults (flags still win)."""
    args, _ = parser.parse_known_args(argv)
    if getattr(args, "config", None):
        import yaml

        with open(args.config) as fh:
            values = yaml.safe_load(fh) or {}
        sub = parser._subparsers._group_actions[0].choices[args.command]  # noqa: SLF001
        known = {a.dest for a in sub._actions}  # noqa: SLF001
        unknown = sorted(set(values) - known)
        if unknown:
            raise KneescreenError(f"{args.config}: unknown keys {unknown}; valid: {sorted(known - {'help'})}")
        sub.set_defaults(**{k.replace("-", "_"): v for k, v in values.items()})
    return parser.parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kneescreen", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the main job on embedded defaults (local folders, generated archive)")
    p.add_argument("--out", default="demo-out", help="output folder")
    p.add_argument("--n", type=int, default=200, help="synthetic archive size")
    p.add_argument("--dev-set", default=None, help="labelled real knee X-rays (default ../shared/data/knee-xray-dev)")
    _add_config(p)

    p = sub.add_parser("inspect", help="one JSON line per file: how the reader decodes it")
    p.add_argument("targets", nargs="+", help="files, folders or s3:// URIs/prefixes")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (else AWS_ENDPOINT_URL)")
    p.add_argument("--max-pixels", type=int, default=None, help="refuse images above this many pixels")
    _add_config(p)

    p = sub.add_parser("synth", help="generate a synthetic knee radiograph archive + labels")
    p.add_argument("--out", required=True, help="output folder or s3:// prefix")
    p.add_argument("--n", type=int, default=200, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=384, help="image side in pixels")
    p.add_argument("--image-signal", type=float, default=1.0, help="0..1: how much the image tells of the T-score")
    p.add_argument("--covariate-signal", type=float, default=1.0, help="0..1: how much age/sex tell of the T-score")
    p.add_argument("--formats", default="dicom", help="comma list of dicom,png,jpeg")
    p.add_argument("--images-per-patient", type=int, default=2)
    p.add_argument("--plant-bad", action="store_true", help="add corrupt, truncated, non-image and non-knee objects")
    p.add_argument("--workers", type=int, default=0, help="processes (0: one per core)")
    _add_config(p)

    p = sub.add_parser("split", help="fingerprint, dedupe and split a labelled collection without leakage")
    p.add_argument("source", help="folder-per-class, or a folder/URI with labels.csv, or a labels CSV/Parquet")
    p.add_argument("--out", required=True, help="folder for split.csv, audit.json, duplicates.csv")
    p.add_argument("--images-root", default=None, help="where keys in a labels file are relative to")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--test-fraction", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--duplicates", choices=("group", "drop"), default="drop",
                   help="exact duplicates with one label: keep one (drop) or keep all in one group")
    p.add_argument("--conflicts", choices=("drop", "keep"), default="drop",
                   help="duplicates that carry different labels: drop all copies (default) or keep")
    p.add_argument("--endpoint-url", default=None)
    _add_config(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = _apply_config(parser, argv)
    except KneescreenError as exc:
        print(f"kneescreen: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # openjpeg logs every encoded tile at INFO; keep the CLI's output about kneescreen.
    logging.getLogger("openjpeg").setLevel(logging.WARNING)
    # pydicom logs a traceback for each decoder failure; those failures are already error rows
    # with a code and message, so its logger is kept to critical events in the CLI.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    try:
        return _dispatch(args)
    except KneescreenError as exc:
        print(f"kneescreen: error: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from kneescreen.demo import run_demo

        return run_demo(args.out, n=args.n, dev_set=args.dev_set)
    if args.command == "inspect":
        from kneescreen.inspect import run_inspect
        from kneescreen.reader import ReaderConfig

        cfg = ReaderConfig(max_pixels=args.max_pixels) if args.max_pixels else ReaderConfig()
        return run_inspect(args.targets, endpoint=args.endpoint_url, config=cfg)
    if args.command == "synth":
        from kneescreen.synth import SynthConfig, write_archive

        formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
        bad = sorted(set(formats) - {"dicom", "png", "jpeg"})
        if bad:
            raise KneescreenError(f"--formats: unknown {bad}; choose from dicom, png, jpeg")
        cfg = SynthConfig(
            n=args.n, seed=args.seed, size=args.size, image_signal=args.image_signal,
            covariate_signal=args.covariate_signal, formats=formats,
            images_per_patient=args.images_per_patient, plant_bad=args.plant_bad, workers=args.workers,
        )
        summary = write_archive(args.out, cfg)
        print(json.dumps(summary, indent=2))
        return 0
    if args.command == "split":
        from kneescreen.datasets import SplitConfig, run_split

        cfg = SplitConfig(
            folds=args.folds, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
            seed=args.seed, duplicates=args.duplicates, conflicts=args.conflicts,
        )
        audit = run_split(args.source, args.out, cfg, images_root=args.images_root, endpoint=args.endpoint_url)
        print(json.dumps(audit["summary"], indent=2))
        return 0 if audit["summary"]["leaks"] == 0 else 1
    raise KneescreenError(f"unknown command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
