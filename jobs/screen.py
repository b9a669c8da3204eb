"""Ray job: screen an archive with a model bundle into Parquet.

    ray job submit --working-dir . -- python jobs/screen.py --input s3://archive/knees/ \\
        --output s3://results/kneescreen/ --bundle s3://models/knee-v1 --reference s3://archive/labels.csv

Set KNEESCREEN_PSEUDONYM_KEY (a secret) in the job's runtime environment.
"""

from __future__ import annotations

import functools
import sys


def main(argv: list[str] | None = None, mode_default: str = "incremental") -> int:
    from kneescreen.cli import add_screen_args, job_main, run_screen_from_args

    add = functools.partial(add_screen_args, mode_default=mode_default)
    return job_main("jobs/screen.py", __doc__, add, run_screen_from_args, argv)


if __name__ == "__main__":
    sys.exit(main())
