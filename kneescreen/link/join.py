"""The link rule, on one hash partition of films and exams (both sides of a patient always land in
the same partition, so partitions are independent and their counts add up exactly).

For each knee radiograph with a patient and a date: the same patient's registry exam nearest in
time within +-``window`` days; a tie between an exam before and one after the film goes to the
earlier; two exams on the same day, to the lower T-score. The exam's class is the WHO class of
its lowest site T-score (`kneescreen.link.registry`); ``gap_days`` = exam date - film date
(negative: the DXA came first); ``site`` names the site that decided. A film whose in-window exams
disagree on the class is still linked by the rule, and its patient counted as conflicting.

`link_tables` is pure (Arrow in, Arrow out, unit-tested on hand-built tables); `link_partition`
is the Ray task around it: it reads the partition's scratch files and writes ``labels/`` and
``unlinked/`` part files. What it holds is one partition (~250,000 films and their exams).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa

from kneescreen.data.link_output import LABELS_SCHEMA, UNLINKED_SCHEMA
from kneescreen.fileio.store import Store, join


def _empty_stats(window: int) -> dict:
    return {"linked": 0, "unlinked": Counter(), "skipped": Counter(), "classes": Counter(), "sites": Counter(),
            "conflicting_patients": 0, "conflicting_films": 0, "registry_patients": 0, "bytes_read": 0,
            "gap_hist": np.zeros(window + 1, dtype=np.int64)}


def link_tables(films: pa.Table, exams: pa.Table, window: int) -> tuple[pa.Table, pa.Table, dict]:
    """Apply the rule to films (`kneescreen.link.headers.FILM_SCHEMA`) and good registry exams
    (`kneescreen.link.registry.EXAM_SCHEMA` without bad rows).

    Returns:
        (linked rows in `LABELS_SCHEMA`, unlinked and skipped rows in `UNLINKED_SCHEMA`, counts:
        linked, unlinked / skipped / classes / sites by name, conflicting patients and films,
        registry patients, bytes read, and a histogram of |gap_days| (index = days)).
    """
    stats = _empty_stats(window)
    f = films.to_pandas(date_as_object=False)
    e = exams.select(["patient_pseudo_id", "exam_date", "t_score", "site", "label"]).to_pandas(date_as_object=False)
    stats["registry_patients"] = int(e["patient_pseudo_id"].nunique())
    stats["bytes_read"] = int(f["bytes_read"].sum()) if len(f) else 0
    ok = f[f["status"] == "ok"]
    m = ok.merge(e, on="patient_pseudo_id", how="inner")
    m["gap_days"] = (m["exam_date"] - m["study_date"]).dt.days.astype("int64")
    m["abs_gap"] = m["gap_days"].abs()
    cand = m[m["abs_gap"] <= window]
    # Nearest first; a tie in distance -> the earlier exam (negative gap first); same day -> lower T.
    best = cand.sort_values(["key", "abs_gap", "gap_days", "t_score"], kind="stable").drop_duplicates("key")
    classes_per_film = cand.groupby("key")["label"].nunique()
    conflicting = classes_per_film[classes_per_film > 1].index
    stats["conflicting_films"] = int(len(conflicting))
    stats["conflicting_patients"] = int(cand[cand["key"].isin(conflicting)]["patient_pseudo_id"].nunique())
    in_registry = ok["patient_pseudo_id"].isin(e["patient_pseudo_id"])
    unlinked_ok = ok[~ok["key"].isin(best["key"])].copy()
    unlinked_ok["status"] = "unlinked"
    unlinked_ok["reason"] = np.where(in_registry.loc[unlinked_ok.index].to_numpy(dtype=bool), "no_exam_in_window",
                                     "patient_not_in_registry")
    rest = f[f["status"] != "ok"]
    unlinked = pa.concat_tables([
        pa.Table.from_pandas(part[UNLINKED_SCHEMA.names], schema=UNLINKED_SCHEMA, preserve_index=False)
        for part in (rest, unlinked_ok)])
    linked = pa.Table.from_pandas(best[LABELS_SCHEMA.names], schema=LABELS_SCHEMA, preserve_index=False)
    stats["linked"] = linked.num_rows
    stats["classes"].update(best["label"].tolist())
    stats["sites"].update(best["site"].tolist())
    stats["skipped"].update(rest.loc[rest["status"] == "skipped", "reason"].tolist())
    stats["unlinked"].update(rest.loc[rest["status"] == "unlinked", "reason"].tolist())
    stats["unlinked"].update(unlinked_ok["reason"].tolist())
    stats["gap_hist"] += np.bincount(best["abs_gap"].to_numpy(dtype=np.int64), minlength=window + 1)[:window + 1]
    return linked, unlinked, stats


def link_partition(store: Store, scratch: str, out: str, p: int, film_files: int, exam_files: int,
                   window: int) -> dict:
    """One partition: read its scratch films and exams, link, write ``labels/`` and ``unlinked/``
    part files. Runs as a Ray task (`kneescreen.link.run`)."""
    from kneescreen.link.headers import FILM_SCHEMA
    from kneescreen.link.registry import EXAM_SCHEMA
    from kneescreen.screen.diff import part_uri  # the incremental diff's scratch layout

    def read(side: str, n: int, schema: pa.Schema) -> pa.Table:
        tables = [store.read_parquet(part_uri(join(scratch, side), p, i), use_threads=False) for i in range(n)]
        return pa.concat_tables(tables).cast(schema) if tables else schema.empty_table()

    exam_schema = pa.schema([fld for fld in EXAM_SCHEMA if fld.name != "bad"])
    linked, unlinked, stats = link_tables(read("films", film_files, FILM_SCHEMA),
                                          read("exams", exam_files, exam_schema), window)
    if linked.num_rows:
        store.write_parquet(linked.sort_by("key"), join(out, "labels", f"part-{p:05d}.parquet"))
    if unlinked.num_rows:
        store.write_parquet(unlinked.sort_by("key"), join(out, "unlinked", f"part-{p:05d}.parquet"))
    return stats
