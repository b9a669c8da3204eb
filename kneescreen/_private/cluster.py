"""Joining or starting Ray, the same way for every command."""

from __future__ import annotations

import os

import ray

from kneescreen._private import console


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (``ray job submit`` sets it), else start a
    local one; when Ray is already initialised in this process, use it as it is."""
    if ray.is_initialized():
        pass
    elif os.environ.get("RAY_ADDRESS"):
        ray.init()  # inside `ray job submit` (or pointed at a cluster): join it as it is
    else:
        # Logical CPUs: Ray Train workers and Ray Data tasks both ask for CPUs; on a 2-core
        # machine 2 training workers would otherwise leave Data nothing and stall it.
        # address="local": start one, even where `ray start` left /tmp/ray/ray_current_cluster
        # behind (plain ray.init() would try to join that cluster and refuse num_cpus).
        ray.init(address="local", num_cpus=num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False,
                 log_to_driver=True, ignore_reinit_error=True)
    # Workers' output: to the log file unless --verbose (log_to_driver stays on so the driver
    # still receives it, e.g. training's per-epoch lines for the progress line).
    console.attach_ray()
