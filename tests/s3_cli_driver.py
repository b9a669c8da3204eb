"""Every command against an S3 server named only by --endpoint-url (run by test_s3_end_to_end).

Usage: python tests/s3_cli_driver.py ENDPOINT BUCKET REPORT_DIR
"""

from __future__ import annotations

import os
import sys

import yaml

from kneescreen.cli import main
from kneescreen.fileio.store import Store


def run(argv: list[str]) -> None:
    print("$ kneescreen " + " ".join(argv), flush=True)
    rc = main(argv)
    if rc:
        sys.exit(rc)


def replay_written_config(ep: str, b: str, report_dir: str) -> None:
    """Replay the first screening run from the config it wrote, in full mode."""
    store = Store(ep)
    written = [o.uri for o in store.list_objects(f"s3://{b}/out/configs")]
    values = yaml.safe_load(store.read_bytes(written[0]))
    values["mode"] = "full"
    os.makedirs(report_dir, exist_ok=True)
    path = f"{report_dir}/replay.yaml"
    with open(path, "w") as fh:
        yaml.safe_dump(values, fh)
    run(["screen", "--config", path])


def main_(ep: str, b: str, report_dir: str) -> None:
    s3 = f"s3://{b}"
    run(["synth", "--out", f"{s3}/coll", "--n", "48", "--size", "96", "--seed", "7", "--workers", "1",
         "--endpoint-url", ep])
    run(["train", "--data", f"{s3}/coll", "--out", f"{s3}/bundle", "--members", "test_cnn:gray",
         "--weights", f"{s3}/weights/test_cnn-imagenet.pt", "--image-size", "0", "--epochs", "2",
         "--batch-size", "8", "--oof-folds", "3", "--endpoint-url", ep])  # 3: the fewest for a fine-tuned member
    run(["evaluate", "--bundle", f"{s3}/bundle", "--split-dir", f"{s3}/bundle/split", "--endpoint-url", ep])
    run(["screen", "--input", f"{s3}/coll/images", "--output", f"{s3}/out", "--bundle", f"{s3}/bundle",
         "--reference", f"{s3}/coll/labels.csv", "--batch-size", "8", "--endpoint-url", ep])
    replay_written_config(ep, b, report_dir)
    run(["report", "--output", f"{s3}/out", "--out", report_dir, "--endpoint-url", ep])


if __name__ == "__main__":
    main_(*sys.argv[1:4])
