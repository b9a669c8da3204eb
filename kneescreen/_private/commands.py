"""The config dataclasses of the CLI commands that wrap a library config: where to read and write,
plus the library's settings as a nested group. Kept out of `kneescreen.cli` so that the CLI
imports them (and the data modules behind them) only for the command that uses them."""

from __future__ import annotations

from dataclasses import dataclass, field

from kneescreen.config import opt
from kneescreen.data.split.run import SplitConfig
from kneescreen.data.synth import SynthConfig


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
