"""Ray job: fine-tune the ensemble and write a bundle.

    ray job submit --working-dir . -- python jobs/train.py --data s3://bucket/labelled/ \\
        --out s3://bucket/models/knee-v1 --members efficientnet_lite0:gray,efficientnet_lite0:rgb \\
        --workers 4 --use-gpu --storage-path s3://bucket/ray-train --name knee-v1

Rerunning with the same --name and --storage-path resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from kneescreen.cli import add_train_args, run_train_from_args
    from kneescreen.errors import KneescreenError

    parser = argparse.ArgumentParser(prog="jobs/train.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_train_from_args(args)
    except KneescreenError as exc:
        print(f"jobs/train.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
