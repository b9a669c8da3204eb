"""Link settings: the source of the ``kneescreen link`` / jobs/link.py flags, the ``--config`` YAML
keys and ``OUT/link_config.yaml`` (which replays the run)."""

from __future__ import annotations

from dataclasses import dataclass

from kneescreen.config import opt
from kneescreen.errors import KneescreenError


@dataclass(frozen=True)
class LinkConfig:
    """What `run_link` needs."""

    archive: str = opt(help="radiograph archive: folder or s3://bucket/prefix (keys are written relative to it)")
    registry: str = opt(help="DXA registry: CSV or Parquet file, local or s3://")
    out: str = opt(help="output folder or s3:// prefix: labels/, unlinked/, link_audit.json")
    # 365 days is the window most opportunistic-screening studies use (a DXA within a year of the
    # radiograph); bone density changes little over that time outside treatment.
    window_days: int = opt(365, "link a radiograph to the same patient's DXA exam at most this many days away")
    registry_ids: str = opt("raw", "raw: the registry holds raw patient ids (pseudonymised in the Ray tasks "
                            "with KNEESCREEN_PSEUDONYM_KEY); pseudonymised: already keyed with the same secret",
                            choices=("raw", "pseudonymised"))
    id_column: str = opt("patient_id", "registry column with the patient id (the DICOM PatientID)")
    date_column: str = opt("exam_date", "registry column with the DXA exam date (YYYY-MM-DD or YYYYMMDD)")
    include: tuple[str, ...] = opt((), "glob on archive keys to include")
    exclude: tuple[str, ...] = opt((), "glob on archive keys to exclude")
    list_fanout_depth: int = opt(1, "list folders down to this depth first, then each one in parallel (0: one listing)")
    list_workers: int = opt(8, "concurrent listing threads")
    # Header reads are S3 round trips (~20-50 ms each), not CPU: threads inside each task keep many
    # in flight, so a 2-CPU node reads ~hundreds of headers a second instead of ~40.
    header_batch_size: int = opt(256, "objects per header-reading task")
    header_threads: int = opt(16, "concurrent ranged reads inside one header task")
    # Hash partitions of the join (by pseudonymous id). Each is one Ray task holding its films and
    # exams in memory (~300 bytes a film): None sizes them to ~250,000 films each.
    partitions: int | None = opt(None, "partitions of the join (default: ~250,000 objects each)")
    body_part_policy: str = opt("skip", "skip: non-knee DICOM (BodyPartExamined) is skipped, as screening does",
                                choices=("skip", "keep"))
    endpoint_url: str | None = opt(None, "S3-compatible endpoint (else AWS_ENDPOINT_URL)")

    def validate(self) -> None:
        """Refuse settings that would fail later, before any work starts.

        Raises:
            KneescreenError: what is wrong and the flag to change.
        """
        if self.window_days < 0:
            raise KneescreenError(f"--window-days must be 0 or more, not {self.window_days}")
        if self.registry_ids not in ("raw", "pseudonymised"):
            raise KneescreenError(f"--registry-ids must be raw or pseudonymised, not {self.registry_ids!r}")
        if self.body_part_policy not in ("skip", "keep"):
            raise KneescreenError(f"--body-part-policy must be skip or keep, not {self.body_part_policy!r}")
        for name in ("header_batch_size", "header_threads", "partitions", "list_workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise KneescreenError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
        if not self.registry.lower().endswith((".csv", ".parquet", ".csv.gz")):
            raise KneescreenError(f"--registry {self.registry}: give a .csv or .parquet file")
