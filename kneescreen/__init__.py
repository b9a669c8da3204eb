"""kneescreen: opportunistic osteoporosis screening on knee radiographs.

Layers, lowest first (a module imports only from its own layer or below; tests/test_layers.py
checks it):

    errors, labels, metrics, config     vocabulary, metrics with intervals, dataclass <-> CLI/YAML
    io/        Store (local + S3), radiograph reader, pseudonyms, inspect
    data/      shared decode batch function, preprocessing, leakage-free splits, synthetic archive
    model/     model registry, fusion, covariates, typed manifest, Bundle, ensemble fitting
    train/     Ray Train fine-tuning, evaluation, cross-validation
    screen/    Ray Data screening pipeline, run ledger, stats, output schemas
    report, demo, cli

Public surface: the reader, the store, the synthetic archive, splits, and the configs and
``run_*`` functions of each command.
"""

from kneescreen.data.split.collection import load_collection
from kneescreen.data.split.run import SplitConfig, load_split, run_split
from kneescreen.data.synth import SynthConfig, write_archive
from kneescreen.errors import ERROR_CODES, DecodeError, KneescreenError
from kneescreen.io.reader import Radiograph, ReaderConfig, read_radiograph
from kneescreen.io.store import Store
from kneescreen.labels import CLASSES, t_score_to_class

__version__ = "0.1.0"
__all__ = [
    "CLASSES", "ERROR_CODES", "DecodeError", "KneescreenError", "Radiograph", "ReaderConfig", "SplitConfig",
    "Store", "SynthConfig", "load_collection", "load_split", "read_radiograph", "run_split", "t_score_to_class",
    "write_archive",
]
