"""Screening settings: the source of the ``kneescreen screen`` / jobs/screen.py flags, the
``--config`` YAML keys and the config written beside every run (``configs/run_id=<r>.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass

from kneescreen.config import opt
from kneescreen.errors import KneescreenError


@dataclass(frozen=True)
class ScreenConfig:
    """What `run_screen` needs."""

    input: str = opt(help="archive: folder or s3://bucket/prefix")
    output: str = opt(help="output root: folder or s3://bucket/prefix")
    bundle: str = opt(help="model bundle folder or s3:// prefix")
    reference: str | None = opt(None, "labels CSV/Parquet: key|path|sop_instance_uid -> label|t_score")
    metadata: str | None = opt(None, "sidecar CSV/Parquet: key -> age, sex, site, ... (DICOM headers win)")
    include: tuple[str, ...] = opt((), "glob on keys to include")
    exclude: tuple[str, ...] = opt((), "glob on keys to exclude")
    mode: str = opt("incremental", "incremental: skip (key, etag) already screened by this model version",
                    choices=("incremental", "full"))
    # Transient errors (read_failed: storage, timeouts, throttling, decoder crashes) are always
    # retried by the next incremental run; permanent ones (not_dicom, truncated, ...) only when
    # asked, e.g. after a reader fix (docs/operations.md, "Transient and permanent errors").
    retry_errors: bool = opt(False, "incremental: also re-screen objects whose earlier rows are permanent errors")
    # Bounded: an object whose transient error persists through this many incremental retries
    # gets a permanent retries_exhausted row (naming the last error) instead of being read forever.
    max_retries: int = opt(3, "incremental: retry a transient error at most this many runs, then retries_exhausted")
    # Listing fan-out (screen.listing): one delimiter listing per folder level down to this depth,
    # then every folder at that depth listed by its own thread. S3 pages 1,000 keys per round trip,
    # so one sequential listing of 100 million keys is 100,000 round trips; fan-out divides the
    # wall time by the workers, at the cost of one extra request per folder above the depth.
    list_fanout_depth: int = opt(1, "list folders down to this depth first, then each one in parallel (0: one listing)")
    list_prefixes: tuple[str, ...] = opt((), "list only these key prefixes (relative to --input), each in parallel; "
                                         "for flat archives, e.g. 0,1,...,f for hex-named keys")
    list_workers: int = opt(8, "concurrent listing threads")
    # Hash partitions of the incremental diff (screen.diff). None sizes them from the previous run
    # (about 1 million rows per partition); one partition is diffed on the driver, more as Ray tasks.
    diff_partitions: int | None = opt(None, "partitions of the incremental diff (default: ~1M objects each)")
    # Inference batch (screen.sizing): 32 keeps a CPU actor's working set (32 x 224^2 activations)
    # in cache-friendly sizes; a GPU infers 5x faster at 256 than at 32 (benchmarks.md).
    batch_size: int | None = opt(None, "inference batch size per actor (default: 256 with --use-gpu, else 32)")
    # Rows per decode task (and per block streaming into the actors). Small enough that the
    # first inference batch is ready soon after start and every actor has blocks to take; large
    # enough that per-task overhead stays small next to decoding (bench/screen_bench.py).
    decode_batch_size: int = opt(32, "images per decode task / block")
    # None = one per GPU with use_gpu, else one 1-CPU actor per two cluster CPUs (the other half
    # decodes): two 1-thread processes out-infer one 2-thread process on CPUs (benchmarks.md).
    actors: int | None = opt(None, "inference actors (default: one per GPU with --use-gpu, else one per 2 CPUs)")
    # Ray starts 1-CPU actors with one torch thread; on CPU nodes give the actor more so
    # inference is not the single-threaded bottleneck.
    actor_cpus: int = opt(1, "CPUs / torch threads per CPU inference actor")
    use_gpu: bool = opt(False, "one GPU per inference actor")
    # GPU runs cap concurrent decode tasks at the CPUs that keep the GPUs at 90% of their measured
    # model rate (screen.sizing, docs/operations.md "Sizing"); CPU runs leave it to Ray Data.
    decode_tasks: int | None = opt(None, "most concurrent decode tasks (default with --use-gpu: the CPUs that keep "
                                   "the GPUs busy, at most the cluster's; else Ray Data decides)")
    decode_rate: float | None = opt(None, "images/s one CPU decodes, for --use-gpu sizing (default 35: full-size "
                                    "films, benchmarks.md; measure yours with bench/gpu_node.py)")
    # Where windowing, inversion, letterbox, ROI and tiles run (issue #22). cpu: in the decode
    # tasks, which hand the actors 8-bit model inputs. device: decode tasks stop at the stored
    # pixels and the inference actor does the rest with torch on its GPU (or CPU), in batches;
    # a GPU node is otherwise starved by CPU preprocessing (docs/operations.md). None picks device
    # with --use-gpu, else cpu; the run's config records what was used.
    preprocess: str | None = opt(None, "where the display transform and resizing run: cpu (decode tasks) or "
                                 "device (the inference actor, with torch); default device with --use-gpu, "
                                 "else cpu", choices=("cpu", "device"))
    # With --preprocess device: where compressed frames (JPEG 2000 / HTJ2K, baseline and lossless
    # JPEG DICOM, grayscale PNG / JPEG files) are decoded. task: the CPU decode tasks, as always.
    # actor: the inference actor, with nvImageCodec on its GPU (the gpu extra) and the CPU
    # decoders per frame where that fails (kneescreen.fileio.frame_decoders); the tasks only read
    # and parse headers. JPEG-LS, RLE and 12-bit JPEG are decoded in the tasks either way.
    frame_decode: str = opt("task", "with --preprocess device: decode compressed frames in the CPU decode tasks "
                            "(task) or on the inference actor's GPU, CPU fallback per frame (actor)",
                            choices=("task", "actor"))
    body_part_policy: str = opt("skip", "skip: non-knee DICOM (BodyPartExamined) becomes a skipped row",
                                choices=("skip", "keep"))
    # Most bytes of a mixed PACS export can be CTs and chest films: reading each DICOM header
    # first (64 KB) and the rest only for knee radiographs saves most of that transfer
    # (benchmarks.md); off reads every object whole in one request, as before.
    header_triage: bool = opt(True, "read DICOM headers first; skip non-knee objects without fetching their pixels")
    max_pixels: int = opt(64_000_000, "refuse images above this many pixels (decompression-bomb guard)")
    endpoint_url: str | None = opt(None, "S3-compatible endpoint (else AWS_ENDPOINT_URL)")

    @property
    def resolved_preprocess(self) -> str:
        """``preprocess``, or its default: ``device`` with ``use_gpu``, else ``cpu``."""
        return self.preprocess or ("device" if self.use_gpu else "cpu")

    def validate(self) -> None:
        """Refuse settings that would fail later, before any work starts.

        Raises:
            KneescreenError: what is wrong and the flag to change.
        """
        if self.mode not in ("incremental", "full"):
            raise KneescreenError(f"--mode must be incremental or full, not {self.mode!r}")
        if self.preprocess not in (None, "cpu", "device"):
            raise KneescreenError(f"--preprocess must be cpu or device, not {self.preprocess!r}")
        if self.body_part_policy not in ("skip", "keep"):
            raise KneescreenError(f"--body-part-policy must be skip or keep, not {self.body_part_policy!r}")
        for name in ("batch_size", "decode_batch_size", "actor_cpus", "actors", "max_pixels", "list_workers",
                     "diff_partitions", "decode_tasks"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise KneescreenError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
        if self.frame_decode not in ("task", "actor"):
            raise KneescreenError(f"--frame-decode must be task or actor, not {self.frame_decode!r}")
        if self.frame_decode == "actor" and self.resolved_preprocess != "device":
            raise KneescreenError("--frame-decode actor needs --preprocess device (the actor decodes frames only "
                                  "where it also preprocesses them); add --preprocess device or --use-gpu")
        if self.decode_rate is not None and not self.decode_rate > 0:
            raise KneescreenError(f"--decode-rate must be a positive images/s, not {self.decode_rate}")
        if self.max_retries < 0:
            raise KneescreenError(f"--max-retries must be 0 or more, not {self.max_retries}")
        if self.list_fanout_depth < 0:
            raise KneescreenError(f"--list-fanout-depth must be 0 or more, not {self.list_fanout_depth}")
        for i, a in enumerate(self.list_prefixes):
            for j, b in enumerate(self.list_prefixes):
                if i != j and b.startswith(a):
                    raise KneescreenError(f"--list-prefixes {a!r} and {b!r} overlap: keys under {b!r} would be "
                                          "listed twice; give prefixes none of which starts another")
