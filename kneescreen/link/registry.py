"""The DXA registry: its columns checked on the driver, its rows cleaned and pseudonymised in Ray
tasks, so raw patient ids never reach the driver, a log or an output.

    registry CSV/Parquet (local or s3://)
      -> `registry_columns` (driver: the header / schema only): id, date, T-score columns, or an
         error naming what is missing and what was found
      -> Ray Data read -> `clean_registry_batch` (pure): pseudonymous id, exam date, the lowest
         T-score over the exam's sites and the site that gave it, its WHO class; a bad row keeps
         only its reason (``bad``) and nothing else
      -> the driver counts reasons and streams the good rows into hash partitions (`kneescreen.link.run`)

A row is bad (counted by reason, never fatal, never silently dropped) when its id is empty
(``empty_id``), its date does not parse (``bad_date``), a T-score is not a number
(``t_score_not_a_number``) or outside [-7, 5] (``t_score_out_of_range``: a typing error that could
otherwise decide the class), or every T-score column is empty (``no_t_score``). Empty sites are
fine: the lowest of the sites measured decides.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

import pyarrow as pa

from kneescreen.errors import KneescreenError
from kneescreen.fileio.privacy import patient_pseudo_id
from kneescreen.fileio.store import Store
from kneescreen.labels import t_score_to_class

T_MIN, T_MAX = -7.0, 5.0  # plausible T-scores; outside is a data-entry error
EXAM_SCHEMA = pa.schema([("patient_pseudo_id", pa.string()), ("exam_date", pa.date32()), ("t_score", pa.float64()),
                         ("site", pa.string()), ("label", pa.string()), ("bad", pa.string())])
_EPOCH = _dt.date(1970, 1, 1)


@dataclass(frozen=True)
class RegistrySpec:
    """What a registry-cleaning task needs: the columns and the pseudonymisation."""

    id_column: str
    date_column: str
    t_columns: tuple[str, ...]
    key: bytes
    ids: str = "raw"  # raw | pseudonymised


def parse_date(value) -> _dt.date | None:
    """A date from ISO ``YYYY-MM-DD``, DICOM ``YYYYMMDD`` (also ``YYYY.MM.DD``, old ACR-NEMA), a
    date/datetime, or an integer 20240131; None when it is none of those or not a real date."""
    if value is None:
        return None
    if isinstance(value, _dt.datetime):
        return value.date()
    if isinstance(value, _dt.date):
        return value
    text = str(value).strip()
    if len(text) >= 10 and text[4] in "-." and text[7] == text[4]:
        text = text[:4] + text[5:7] + text[8:10] + text[10:]
        if len(text) > 8 and text[8] not in "T ":
            return None
        text = text[:8]
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return _dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def _site_name(column: str) -> str:
    return column[len("t_score_"):] if column.startswith("t_score_") else column


def registry_columns(names: list[str], id_column: str, date_column: str, where: str) -> tuple[str, ...]:
    """The T-score columns of a registry with these column names (``t_score`` and every
    ``t_score_*``), after checking the id and date columns are there.

    Raises:
        KneescreenError: naming every missing column and the columns found.
    """
    t_cols = tuple(n for n in names if n == "t_score" or n.startswith("t_score_"))
    missing = [f"{what} column {col!r}" for what, col in (("id", id_column), ("date", date_column)) if col not in names]
    if not t_cols:
        missing.append("a T-score column ('t_score', or per site 't_score_<site>', e.g. t_score_total_hip)")
    if missing:
        named = id_column not in names or date_column not in names
        hint = " (--id-column / --date-column name the registry's own columns)" if named else ""
        raise KneescreenError(f"{where}: missing {', '.join(missing)}; found columns: {', '.join(names) or 'none'}{hint}")
    return t_cols


def read_column_names(store: Store, uri: str) -> list[str]:
    """A registry's column names, from the CSV header line or the Parquet footer only."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    fs, path = store.filesystem(uri)
    try:
        if uri.lower().endswith(".parquet"):
            with fs.open_input_file(path) as f:
                return list(pq.read_schema(f).names)
        with fs.open_input_stream(path) as f:
            return list(pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=1 << 16)).schema.names)
    except FileNotFoundError:
        raise KneescreenError(f"--registry {uri}: no such file") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise KneescreenError(f"--registry {uri}: cannot read it as {'Parquet' if uri.endswith('.parquet') else 'CSV'}: "
                              f"{exc}") from None


def _t_score(value) -> tuple[float | None, str | None]:
    """(T-score, None), (None, None) for an empty cell, or (None, reason)."""
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None, None
    try:
        t = float(value)
    except (TypeError, ValueError):
        return None, "t_score_not_a_number"
    if t != t:  # NaN: an empty cell of a numeric Parquet column
        return None, None
    if not T_MIN <= t <= T_MAX:
        return None, "t_score_out_of_range"
    return t, None


def clean_row(raw_id, raw_date, t_values: dict, spec: RegistrySpec) -> dict:
    """One registry row -> an `EXAM_SCHEMA` row (``bad`` set and nothing else when it is bad)."""
    bad = {"patient_pseudo_id": None, "exam_date": None, "t_score": None, "site": None, "label": None}
    pid = (patient_pseudo_id(raw_id, spec.key) if spec.ids == "raw"
           else (str(raw_id).strip() or None) if raw_id is not None else None)
    if pid is None:
        return {**bad, "bad": "empty_id"}
    date = parse_date(raw_date)
    if date is None:
        return {**bad, "bad": "bad_date"}
    best, site = None, None
    for col, value in t_values.items():
        t, reason = _t_score(value)
        if reason:
            return {**bad, "bad": reason}
        if t is not None and (best is None or t < best):  # ties: the first column listed
            best, site = t, _site_name(col)
    if best is None:
        return {**bad, "bad": "no_t_score"}
    return {"patient_pseudo_id": pid, "exam_date": date, "t_score": best, "site": site,
            "label": t_score_to_class(best), "bad": None}


def clean_registry_batch(batch: pa.Table, spec: RegistrySpec) -> pa.Table:
    """Ray Data batch function: registry rows -> `EXAM_SCHEMA` rows, one per input row. The raw
    id column is read here and dropped: it is not in what this returns."""
    ids = batch.column(spec.id_column).to_pylist()
    dates = batch.column(spec.date_column).to_pylist()
    ts = {c: batch.column(c).to_pylist() for c in spec.t_columns}
    rows = [clean_row(ids[i], dates[i], {c: ts[c][i] for c in spec.t_columns}, spec) for i in range(len(ids))]
    return pa.Table.from_pylist(rows, schema=EXAM_SCHEMA)


def days(dates: list) -> list[int | None]:
    """Dates as days since 1970-01-01 (what the join compares)."""
    return [None if d is None else (d - _EPOCH).days for d in dates]
