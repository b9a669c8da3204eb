"""Ray job: link an archive's knee radiographs to a DXA registry -> training labels + audit.

    ray job submit --working-dir . -- python jobs/link.py --archive s3://archive/knees/ \\
        --registry s3://registry/dxa.parquet --out s3://results/link/ --window-days 365

    ray job submit --working-dir . -- python jobs/link.py --config link.yaml

The registry's raw patient ids are pseudonymised inside the Ray tasks with the key screening uses:
KNEESCREEN_PSEUDONYM_KEY_FILE (a mounted Secret) or KNEESCREEN_PSEUDONYM_KEY, set where the cluster's
head node starts, never in --runtime-env-json (docs/operations.md). The resolved settings go to
<out>/link_config.yaml; train with `python jobs/train.py --data <out> ...`.
"""

from __future__ import annotations

import sys

from kneescreen.cli import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main("jobs/link.py", __doc__, "link", argv)


if __name__ == "__main__":
    sys.exit(main())
