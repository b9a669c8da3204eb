"""Ray job: screen an archive with a model bundle into Parquet.

    ray job submit --working-dir . -- python jobs/screen.py --input s3://archive/knees/ \\
        --output s3://results/kneescreen/ --bundle s3://models/knee-v1 --reference s3://archive/labels.csv

    ray job submit --working-dir . -- python jobs/screen.py --config screen.yaml

The driver needs the pseudonymisation key: KNEESCREEN_PSEUDONYM_KEY_FILE naming a file that holds
it (the KubeRay manifests mount a Secret there) or KNEESCREEN_PSEUDONYM_KEY, set where the cluster's
head node starts, never in --runtime-env-json (`ray job list` shows it; docs/operations.md). Every
run writes its resolved settings to <output>/configs/run_id=<r>.yaml, which replays it with --config.
"""

from __future__ import annotations

import sys

from kneescreen.cli import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main("jobs/screen.py", __doc__, "screen", argv)


if __name__ == "__main__":
    sys.exit(main())
