"""`kneescreen link`: pair an archive's knee radiographs with the same patient's DXA exam from a
registry, at archive scale, to make training labels a programme owns.

    list (parallel pages) -> DICOM headers only (ranged reads, Ray Data tasks) -> films
    registry CSV/Parquet -> Ray Data tasks: pseudonymise, parse, lowest site -> exams
    both hash-partitioned by pseudonymous id -> per partition (Ray task): nearest exam within
    +-window days -> OUT/labels/ (Parquet), OUT/unlinked/, OUT/link_audit.json

Modules: `config` (LinkConfig), `registry` (columns, row cleaning), `headers` (film rows),
`join` (the rule), `audit` (counts, printed table), `run` (`run_link`). The output is read back by
`kneescreen.data.link_output` (train --data OUT, screen --reference OUT).
"""

from kneescreen.link.config import LinkConfig

__all__ = ["LinkConfig"]
