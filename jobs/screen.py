"""Ray job: screen an archive with a model bundle into Parquet.

    ray job submit --working-dir . -- python jobs/screen.py --input s3://archive/knees/ \\
        --output s3://results/kneescreen/ --bundle s3://models/knee-v1 --reference s3://archive/labels.csv

Set KNEESCREEN_PSEUDONYM_KEY (a secret) in the job's runtime environment.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None, mode_default: str = "incremental") -> int:
    from kneescreen.cli import add_screen_args, run_screen_from_args
    from kneescreen.errors import KneescreenError

    parser = argparse.ArgumentParser(prog="jobs/screen.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_screen_args(parser, mode_default=mode_default)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)  # decode failures are error rows
    try:
        return run_screen_from_args(args)
    except KneescreenError as exc:
        print(f"jobs/screen.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
