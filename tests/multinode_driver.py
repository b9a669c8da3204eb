"""Driver for the multi-node check (tests/test_multinode.py, docs/operations.md).

Run with RAY_ADDRESS pointing at a running cluster: trains the tiny model with 2 Ray Train
workers spread over nodes, screens an archive, then asks Ray's state API which nodes ran what.

    RAY_ADDRESS=127.0.0.1:6379 python tests/multinode_driver.py ARCHIVE_DIR WORK_DIR
"""

from __future__ import annotations

import json
import os
import sys
import time

MIN_NODES = 2  # the test starts the second raylet right after the head; wait for it, not a fixed sleep


def main(archive: str, work: str) -> int:
    import ray
    from ray.util.state import list_actors, list_nodes, list_tasks

    from kneescreen._private.cluster import ensure_ray
    from kneescreen.screen.config import ScreenConfig
    from kneescreen.screen.pipeline import run_screen
    from kneescreen.train.config import TrainConfig
    from kneescreen.train.run import run_train

    ensure_ray()
    deadline = time.monotonic() + 120
    while sum(n["Alive"] for n in ray.nodes()) < MIN_NODES:
        if time.monotonic() > deadline:
            raise SystemExit(f"fewer than {MIN_NODES} nodes joined within 120 s")
        time.sleep(0.5)
    cfg = TrainConfig(data=archive, out=os.path.join(work, "bundle"), members=("test_cnn:gray",), weights="none",
                      image_size=0, epochs=1, oof_folds=3, num_workers=2, cpus_per_worker=1, placement_strategy="SPREAD",
                      storage_path=os.path.join(work, "runs"), name="multinode")
    run_train(cfg)
    manifest = run_screen(ScreenConfig(input=os.path.join(archive, "images"), output=os.path.join(work, "out"),
                                       bundle=os.path.join(work, "bundle"), batch_size=8, actors=2,
                                       # 2 actors x 2 CPUs cannot share a 3-CPU node: one per node.
                                       actor_cpus=2))
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=1000, detail=True)
    tasks = list_tasks(limit=10000, detail=True)
    decode_nodes = {t.node_id for t in tasks if "decode_stage" in (t.name or "") and t.node_id}
    actor_nodes = {a.node_id for a in list_actors(limit=1000, detail=True)
                   if "EnsemblePredictor" in (a.class_name or "") and a.node_id}
    print(json.dumps({
        "nodes": sorted(n.node_id for n in list_nodes() if n.state == "ALIVE"),
        "train_worker_nodes": sorted({a.node_id for a in workers if a.node_id}),
        "screen_decode_task_nodes": sorted(decode_nodes),
        "screen_actor_nodes": sorted(actor_nodes),
        "screened": manifest["counts"]["screened"],
    }))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
