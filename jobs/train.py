"""Ray job: fine-tune the ensemble and write a bundle.

    ray job submit --working-dir . -- python jobs/train.py --data s3://bucket/labelled/ \\
        --out s3://bucket/models/knee-v1 --members efficientnet_lite0:gray,efficientnet_lite0:rgb \\
        --workers 4 --use-gpu --storage-path s3://bucket/ray-train --name knee-v1

Rerunning with the same --name and --storage-path resumes from the last checkpoint.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from kneescreen.cli import add_train_args, job_main, run_train_from_args

    return job_main("jobs/train.py", __doc__, add_train_args, run_train_from_args, argv)


if __name__ == "__main__":
    sys.exit(main())
