"""Ray job for scheduled rescans: the screening job in incremental mode.

Run it on a schedule (KubeRay RayCronJob or a CronJob that creates a RayJob, see infra/). Each
run screens only objects whose (key, etag) no committed run of the same model version holds, so
an unchanged archive costs a listing and a diff.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from screen import main as screen_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return screen_main(argv, mode_default="incremental")


if __name__ == "__main__":
    sys.exit(main())
