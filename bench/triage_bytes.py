"""Header triage: storage bytes (and time) the decode stage reads on a mixed DICOM archive.

Usage: .venv/bin/python bench/triage_bytes.py [--n 60] [--non-knee 0.3] [--knee-size 1536] [--s3]

Builds an archive of uncompressed DICOM objects: (1 - non_knee) knee radiographs (synthetic
knees, DX/CR, rendered at 512 px and upsampled to --knee-size, 16-bit) and non_knee chest studies,
half CT slices (512 x 512 x 16-bit, Modality CT) and half chest CR films (2048 x 2048 x 16-bit,
BodyPartExamined CHEST). Then runs the screening decode function (`decode_batch`, as the decode
stage calls it, 32 rows per call) over the listing with header triage off (every object read
whole, one request) and on, and prints bytes read per kind of object, requests, and wall time.
With --s3 the archive sits on a moto S3 server started in this process (127.0.0.1), read
through the same boto3 client code as on AWS; otherwise in a local folder.

It also times, for the knee objects, the two ways to finish an object after its header:
fetching only the rest (what `read_one` does) or fetching the whole object again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402


class CountingStore:
    """Counts requests by wrapping a Store's two read methods (the store stays a real Store)."""

    def __init__(self, store):
        self.store, self.requests = store, 0
        orig_range, orig_bytes = store.read_range, store.read_bytes

        def read_range(*a, **kw):
            self.requests += 1
            return orig_range(*a, **kw)

        def read_bytes(*a, **kw):
            self.requests += 1
            return orig_bytes(*a, **kw)

        store.read_range, store.read_bytes = read_range, read_bytes


def _dicom(sub, image: np.ndarray, modality: str | None = None, body_part: str = "KNEE") -> bytes:
    import io

    import pydicom

    from kneescreen.data.synth import Subject, encode_dicom

    sub = Subject(**{**sub.__dict__, "syntax": "1.2.840.10008.1.2.1"})  # uncompressed
    data = encode_dicom(sub, image, body_part=body_part)
    if modality is None:
        return data
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.Modality = modality
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def build(store, root: str, n: int, non_knee: float, knee_size: int) -> dict[str, str]:
    """Write the archive; returns key -> kind (knee, chest_ct, chest_cr)."""
    from kneescreen.data.synth import SynthConfig, draw_subjects, render_knee
    from kneescreen.fileio.store import join

    subjects = draw_subjects(SynthConfig(n=n, seed=17, size=512))
    rng = np.random.default_rng(17)
    n_other = round(n * non_knee)
    kinds = ["chest_ct"] * (n_other // 2) + ["chest_cr"] * (n_other - n_other // 2) + ["knee"] * (n - n_other)
    rng.shuffle(kinds)
    base = [render_knee(s, 512) for s in subjects[:4]]  # content does not change the byte counts
    out = {}
    for i, (sub, kind) in enumerate(zip(subjects, kinds)):
        img = base[i % len(base)]
        if kind == "knee":
            f = knee_size // 512
            data = _dicom(sub, np.kron(img, np.ones((f, f))) if f > 1 else img)
        elif kind == "chest_ct":
            data = _dicom(sub, img, modality="CT", body_part="CHEST")
        else:
            data = _dicom(sub, np.kron(img, np.ones((4, 4))), body_part="CHEST")
        key = f"{kind}/{i:05d}.dcm"
        store.write_bytes(join(root, key), data)
        out[key] = kind
    return out


def decode_all(store, root: str, kinds: dict[str, str], triage: bool) -> dict:
    from kneescreen.data.decode import DecodeSpec, decode_batch

    counter = CountingStore(store)
    spec = DecodeSpec(store=store, sizes=(224,), root=root, pseudo_key=b"bench-key-0123456", header_triage=triage)
    keys = sorted(kinds)
    by_kind, status = defaultdict(int), Counter()
    t0 = time.perf_counter()
    for i in range(0, len(keys), 32):
        out = decode_batch({"key": np.array(keys[i:i + 32], object)}, spec)
        for k, s, code, b in zip(out["key"], out["status"], out["error_code"], out["bytes_read"]):
            by_kind[kinds[k]] += int(b)
            status[f"{s}:{code}" if code else s] += 1
    wall = time.perf_counter() - t0
    del store.read_range, store.read_bytes  # the class's methods again
    return {"triage": triage, "bytes_read": sum(by_kind.values()), "bytes_by_kind": dict(by_kind),
            "requests": counter.requests, "wall_s": round(wall, 2), "status": dict(status)}


def finish_knees(store, root: str, kinds: dict[str, str]) -> dict:
    """Per knee object after a 64 KB head: the rest as one ranged read vs the whole object again."""
    from kneescreen.fileio.store import join

    knees = [join(root, k) for k, v in sorted(kinds.items()) if v == "knee"]
    out = {}
    for how in ("rest", "whole", "rest", "whole"):  # twice each, interleaved: the second pair counts
        t0, nbytes = time.perf_counter(), 0
        for uri in knees:
            head = store.read_range(uri, 0, 65536)
            if how == "rest":
                nbytes += len(head.data) + len(store.read_range(uri, 65536, head.size - 65536, if_match=head.etag).data)
            else:
                nbytes += len(head.data) + len(store.read_bytes(uri))
        out[how] = {"bytes": nbytes, "wall_s": round(time.perf_counter() - t0, 2)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=60)
    p.add_argument("--non-knee", type=float, default=0.3)
    p.add_argument("--knee-size", type=int, default=1536, help="knee image side in pixels (multiple of 512)")
    p.add_argument("--s3", action="store_true", help="archive on a moto S3 server in this process")
    args = p.parse_args(argv)
    os.environ.setdefault("KNEESCREEN_PSEUDONYM_KEY", "bench-only-key")
    from kneescreen.fileio.store import Store

    server = None
    if args.s3:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
        server.start()
        host, port = server.get_host_and_port()
        os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
        store = Store(endpoint_url=f"http://{host}:{port}", region="us-east-1")
        store.client.create_bucket(Bucket="archive")
        root = "s3://archive/pacs-export"
    else:
        store, root = Store(), tempfile.mkdtemp(prefix="triage-bench-")
    try:
        kinds = build(store, root, args.n, args.non_knee, args.knee_size)
        sizes = defaultdict(int)
        for o in store.list_objects(root):
            sizes[kinds[o.key]] += o.size
        print(json.dumps({"archive": root, "objects": Counter(kinds.values()), "bytes_by_kind": dict(sizes),
                          "bytes": sum(sizes.values())}))
        off, on = decode_all(store, root, kinds, False), decode_all(store, root, kinds, True)
        print(json.dumps(off))
        print(json.dumps(on))
        print(json.dumps({"bytes_saved": off["bytes_read"] - on["bytes_read"],
                          "fraction_read": round(on["bytes_read"] / off["bytes_read"], 4)}))
        print(json.dumps({"finish_knees": finish_knees(store, root, kinds)}))
    finally:
        if server is not None:
            server.stop()
        elif root.startswith(tempfile.gettempdir()):
            import shutil

            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
