"""kneescreen: opportunistic osteoporosis screening on knee radiographs.

Layers, lowest first (a module imports only from its own layer or below; tests/test_layers.py
checks it):

    errors, labels, metrics, config     vocabulary, metrics with intervals, dataclass <-> CLI/YAML
    fileio/    Store (local + S3), radiograph reader, pseudonyms, inspect
    data/      shared decode batch function, preprocessing, leakage-free splits, synthetic archive
    model/     model registry, fusion, covariates, typed manifest, Bundle, ensemble fitting
    train/     Ray Train fine-tuning, evaluation, cross-validation
    screen/    Ray Data screening pipeline, run ledger, stats, output schemas
    report, demo, cli

Public surface: the reader, the store, the synthetic archive, splits, and the configs and
``run_*`` functions of each command.
"""

from __future__ import annotations

import importlib

from kneescreen.errors import ERROR_CODES, DecodeError, KneescreenError
from kneescreen.labels import CLASSES, t_score_to_class

__version__ = "0.1.0"
# The rest of the public surface loads on first use: `import kneescreen` (and so every command
# line, `kneescreen inspect` included) must not pay for pyarrow, Ray or torch it does not use.
_LAZY = {
    "SplitConfig": "kneescreen.data.split.run", "load_collection": "kneescreen.data.split.collection",
    "load_split": "kneescreen.data.split.run", "run_split": "kneescreen.data.split.run",
    "SynthConfig": "kneescreen.data.synth", "write_archive": "kneescreen.data.synth",
    "Radiograph": "kneescreen.fileio.reader", "ReaderConfig": "kneescreen.fileio.reader",
    "read_radiograph": "kneescreen.fileio.reader", "Store": "kneescreen.fileio.store",
}
__all__ = [
    "CLASSES", "ERROR_CODES", "DecodeError", "KneescreenError", "Radiograph", "ReaderConfig", "SplitConfig",
    "Store", "SynthConfig", "load_collection", "load_split", "read_radiograph", "run_split", "t_score_to_class",
    "write_archive",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'kneescreen' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
