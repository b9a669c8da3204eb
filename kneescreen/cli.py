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
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--image-size", type=int, default=160, help="member input size (160 keeps CPU training in minutes)")
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
    p = sub.add_parser("train", help="fine-tune the ensemble on Ray Train and write a model bundle")
    add_train_args(p)
    _add_config(p)

    p = sub.add_parser("evaluate", help="evaluate a bundle on a split: table, JSON and Parquet")
    p.add_argument("--bundle", required=True, help="bundle folder or s3:// prefix")
    p.add_argument("--split-dir", required=True, help="folder holding split.csv (from `split` or `train`)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--out", default=None, help="where to write <split>.json/.parquet (default: <bundle>/evaluation)")
    p.add_argument("--endpoint-url", default=None)
    _add_config(p)
    p = sub.add_parser("report", help="HTML report + PNG figures from a screening output (local or s3://)")
    p.add_argument("--output", required=True, help="the screening output root")
    p.add_argument("--out", required=True, help="local folder for report.html and the figures")
    p.add_argument("--endpoint-url", default=None)
    _add_config(p)

    p = sub.add_parser("screen", help="screen an archive with a bundle: predictions, stats and a run manifest")
    add_screen_args(p)
    _add_config(p)
    return parser


def add_screen_args(p: argparse.ArgumentParser, mode_default: str = "incremental") -> None:
    """Screening flags, shared by `kneescreen screen`, jobs/screen.py and jobs/rescan.py."""
    p.add_argument("--input", required=True, help="archive: folder or s3://bucket/prefix")
    p.add_argument("--output", required=True, help="output root: folder or s3://bucket/prefix")
    p.add_argument("--bundle", required=True, help="model bundle folder or s3:// prefix")
    p.add_argument("--reference", default=None, help="labels CSV/Parquet: key|path|sop_instance_uid -> label|t_score")
    p.add_argument("--metadata", default=None, help="sidecar CSV/Parquet: key -> age, sex, site, ... (headers win)")
    p.add_argument("--include", action="append", default=[], help="glob on keys to include (repeatable)")
    p.add_argument("--exclude", action="append", default=[], help="glob on keys to exclude (repeatable)")
    p.add_argument("--mode", choices=("incremental", "full"), default=mode_default,
                   help="incremental: skip (key, etag) already screened by this model version")
    p.add_argument("--batch-size", type=int, default=32, help="inference batch size per actor")
    p.add_argument("--actors", type=int, default=None,
                   help="inference actors (default: one per GPU with --use-gpu, else one per 2 cluster CPUs)")
    p.add_argument("--actor-cpus", type=int, default=1, help="CPUs / torch threads per CPU inference actor")
    p.add_argument("--decode-batch-size", type=int, default=32, help="images per decode task / block")
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--body-part-policy", choices=("skip", "keep"), default="skip")
    p.add_argument("--max-pixels", type=int, default=64_000_000)
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (else AWS_ENDPOINT_URL)")
    p.add_argument("--dry-run", action="store_true", help="validate arguments and print the resolved config")


def run_screen_from_args(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from kneescreen.screen import ScreenConfig, run_screen

    cfg = ScreenConfig(
        input=args.input, output=args.output, bundle=args.bundle, reference=args.reference, metadata=args.metadata,
        include=tuple(args.include), exclude=tuple(args.exclude), mode=args.mode, batch_size=args.batch_size,
        actors=args.actors, actor_cpus=args.actor_cpus, decode_batch_size=args.decode_batch_size,
        use_gpu=args.use_gpu, body_part_policy=args.body_part_policy, max_pixels=args.max_pixels,
        endpoint=args.endpoint_url,
    )
    if args.dry_run:
        print(json.dumps(asdict(cfg), indent=2))
        return 0
    manifest = run_screen(cfg)
    print(json.dumps({k: manifest[k] for k in ("run_id", "model_version", "counts", "throughput_images_per_s")}, indent=2))
    return 0


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Training flags, shared by `kneescreen train` and jobs/train.py."""
    from kneescreen.train import TrainConfig

    d = TrainConfig()
    p.add_argument("--data", required=True, help="labelled collection (folder-per-class, folder with labels.csv, or labels file)")
    p.add_argument("--out", required=True, help="bundle folder or s3:// prefix")
    p.add_argument("--split-dir", default=None, help="reuse this split (default: <out>/split, created if missing)")
    p.add_argument("--members", default="efficientnet_lite0:gray",
                   help="comma list of architecture:input_mode (see `kneescreen.models.list_models()`)")
    p.add_argument("--weights", default="imagenet", help="imagenet | none | path/s3 URI to an ImageNet state dict")
    p.add_argument("--image-size", type=int, default=160,
                   help="every member's input size; 160 trains in minutes on a CPU (docs/results.md), "
                        "0 = each architecture's native size (224-299), the better choice on GPUs")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--patience", type=int, default=d.patience, help="early stopping on validation macro-F1")
    p.add_argument("--workers", type=int, default=d.num_workers, help="Ray Train workers (DDP)")
    p.add_argument("--cpus-per-worker", type=int, default=d.cpus_per_worker)
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker, bf16 autocast, NCCL")
    p.add_argument("--placement-strategy", choices=("PACK", "SPREAD"), default=d.placement_strategy)
    p.add_argument("--fusion", default=d.fusion, choices=("soft", "weighted", "majority", "fuzzy_rank"))
    p.add_argument("--target-sensitivity", type=float, default=d.target_sensitivity)
    p.add_argument("--storage-path", default=d.storage_path, help="Ray Train checkpoints (folder or s3://)")
    p.add_argument("--name", default=d.name, help="run name: rerunning the same name resumes from its checkpoints")
    p.add_argument("--max-failures", type=int, default=d.max_failures)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--endpoint-url", default=None)
    p.add_argument("--dry-run", action="store_true", help="validate arguments and print the resolved config")


def train_config_from_args(args: argparse.Namespace):
    from kneescreen.models import list_models
    from kneescreen.train import MemberSpec, TrainConfig

    members = []
    for item in args.members.split(","):
        arch, _, mode = item.strip().partition(":")
        if arch not in list_models():
            raise KneescreenError(f"--members: unknown architecture {arch!r}; valid: {', '.join(list_models())}")
        if (mode or "gray") not in ("gray", "rgb"):
            raise KneescreenError(f"--members: input mode must be gray or rgb, not {mode!r}")
        weights = None if args.weights == "none" else args.weights
        members.append(MemberSpec(arch, mode or "gray", weights, args.image_size or None))
    return TrainConfig(
        members=tuple(members), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, patience=args.patience,
        num_workers=args.workers, use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker, seed=args.seed,
        placement_strategy=args.placement_strategy,
        fusion=args.fusion, target_sensitivity=args.target_sensitivity, storage_path=args.storage_path,
        name=args.name, max_failures=args.max_failures,
    )


def run_train_from_args(args: argparse.Namespace) -> int:
    from kneescreen.evaluate import format_table
    from kneescreen.train import run_train

    cfg = train_config_from_args(args)
    if args.dry_run:
        from dataclasses import asdict

        print(json.dumps(asdict(cfg), indent=2, default=str))
        return 0
    out = run_train(args.data, args.out, cfg, split_dir=args.split_dir, endpoint=args.endpoint_url)
    print(format_table(out["test"]))
    print(f"bundle {out['version']} written to {out['bundle']}")
    return 0


def job_main(prog: str, doc: str, add_args, run, argv: list[str] | None = None) -> int:
    """Shared body of the thin Ray job entry points in jobs/: parse, log, run, exit status."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)  # decode failures are error rows
    logging.getLogger("openjpeg").setLevel(logging.WARNING)
    try:
        return run(args)
    except KneescreenError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2


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

        return run_demo(args.out, n=args.n, dev_set=args.dev_set, epochs=args.epochs, image_size=args.image_size)
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
    if args.command == "report":
        from kneescreen.report import build_report

        print(build_report(args.output, args.out, endpoint=args.endpoint_url))
        return 0
    if args.command == "screen":
        return run_screen_from_args(args)
    if args.command == "train":
        return run_train_from_args(args)
    if args.command == "evaluate":
        from kneescreen.evaluate import run_evaluate

        run_evaluate(args.bundle, args.split_dir, args.out, args.split, endpoint=args.endpoint_url)
        return 0
    raise KneescreenError(f"unknown command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
