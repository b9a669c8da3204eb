"""Ray job: fine-tune the ensemble and write a bundle.

    ray job submit --working-dir . -- python jobs/train.py --data s3://bucket/labelled/ \\
        --out s3://bucket/models/knee-v1 --members efficientnet_lite0:gray,efficientnet_lite0:rgb \\
        --workers 4 --use-gpu --name knee-v1

    ray job submit --working-dir . -- python jobs/train.py --data s3://bucket/linked/ \
        --out s3://bucket/models/knee-v2 --finetune-min-films 10000 --workers 4 --use-gpu --name knee-v2
        # the default recipe: frozen Lite0, plus fine-tuned candidates from 10,000 development films on

    ray job submit --working-dir . -- python jobs/train.py --config train.yaml

Rerunning with the same --name (and --storage-path, default <out>/checkpoints) resumes from the
last checkpoint. <out>/train_config.yaml replays a run with --config.
"""

from __future__ import annotations

import sys

from kneescreen.cli import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main("jobs/train.py", __doc__, "train", argv)


if __name__ == "__main__":
    sys.exit(main())
