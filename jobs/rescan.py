"""Ray job for scheduled rescans: the screening job in incremental mode (its default).

Run it on a schedule (KubeRay RayCronJob or a CronJob that creates a RayJob, see infra/). Each
run screens only objects whose (key, etag) no committed run of the same model version holds, so
an unchanged archive costs a listing and a diff.
"""

from __future__ import annotations

import sys

from kneescreen.cli import job_main


def main(argv: list[str] | None = None) -> int:
    return job_main("jobs/rescan.py", __doc__, "screen", argv)


if __name__ == "__main__":
    sys.exit(main())
