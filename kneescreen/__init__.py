"""kneescreen: opportunistic osteoporosis screening on knee radiographs.

Public surface: the reader, the synthetic archive, and leakage-free dataset splits.
"""

from kneescreen.datasets import SplitConfig, load_collection, load_split, run_split
from kneescreen.errors import ERROR_CODES, DecodeError, KneescreenError
from kneescreen.labels import CLASSES, t_score_to_class
from kneescreen.reader import Radiograph, ReaderConfig, read_radiograph
from kneescreen.synth import SynthConfig, write_archive

__version__ = "0.1.0"
__all__ = [
    "CLASSES", "ERROR_CODES", "DecodeError", "KneescreenError", "Radiograph", "ReaderConfig",
    "SplitConfig", "SynthConfig", "load_collection", "load_split", "read_radiograph", "run_split",
    "t_score_to_class", "write_archive",
]
