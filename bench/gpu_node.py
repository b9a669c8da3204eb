"""One GPU screening node, measured end to end in one run (issue #22).

Usage (on a GPU node, from the repository root, with `pip install -e '.[gpu]'`):
    python bench/gpu_node.py --n 1200 --side 2560 --out bench/results/gpu_node.json
On a CPU machine it runs small (e.g. --n 12 --side 1024 --batch 8) and skips the GPU stages with a note.

1. Builds (once, cached in --work) an archive of full-size DICOM knees on local disk: `--side` x
   0.8 `--side` 12-bit DX, a third each uncompressed, JPEG 2000 lossless (OpenJPEG) and JPEG
   Lossless SV1 (kneescreen.data.jpeg_lossless), MONOCHROME1 and 2, a third with a window.
2. Measures, one stage after the other, on this node:
   - storage read: every file read cold (page cache dropped per file with posix_fadvise);
   - cpu-decode pipeline: one process per core reads + decodes + letterboxes (the screening
     decode task), the main process infers on the GPU as blocks arrive;
   - device-preprocess pipeline: the processes read + decode to stored pixels only; windowing,
     inversion and resize run in torch on the device (`kneescreen.data.device_preprocess`,
     where this checkout has it), then the model;
   - gpu-decode pipeline: the processes parse headers and cut out compressed frames; the GPU
     decodes them (nvImageCodec, CPU fallback per frame), preprocesses and infers;
   - gpu decode only, and model only (random uint8 batches, the bundle's inference code).
   It prints images/s per stage, GPU utilisation while it ran (pynvml or nvidia-smi), the
   bottleneck, and the issue's goals (end to end >= 4x the cpu-decode pipeline, and >= 0.8x the
   slowest of read, GPU decode and model-only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

KINDS = ("uncompressed", "jpeg2000-lossless", "jpeg-lossless")
CHUNK = 32  # paths per worker task: the screening decode task's default block


# --- archive -----------------------------------------------------------------------------------

def _render_base(args) -> np.ndarray:
    from kneescreen.data.synth import SynthConfig, draw_subjects
    from kneescreen.data.synth_render import render_knee

    index, side = args
    sub = draw_subjects(SynthConfig(n=index + 1, seed=11))[index]
    return render_knee(sub, side, "coarse")


def _write_one(args) -> str:
    import io

    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import JPEG2000Lossless, generate_uid

    from kneescreen.data.jpeg_lossless import lossless_jpeg_dicom

    i, base_path, path = args
    base = np.load(base_path, mmap_mode="r")
    rng = np.random.default_rng(i)
    stored = np.clip(np.asarray(base) * 3800 + 150 + rng.normal(0, 6, base.shape), 0, 4095).astype(np.uint16)
    mono1 = i % 2 == 1
    if mono1:
        stored = (4095 - stored).astype(np.uint16)
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid(entropy_srcs=[f"gpu-node-{i}"])
    ds.Modality, ds.BodyPartExamined, ds.PatientID = "DX", "KNEE", f"P{i:06d}"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1" if mono1 else "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.ImagerPixelSpacing = [0.15, 0.15]
    if i % 3 == 0:
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = stored.tobytes()
    kind = KINDS[i % len(KINDS)]
    if kind == "jpeg2000-lossless":
        ds.compress(JPEG2000Lossless, stored, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    elif kind == "jpeg-lossless":
        lossless_jpeg_dicom(ds, stored)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with open(path, "wb") as fh:
        fh.write(buf.getvalue())
    return path


def build_archive(work: str, n: int, side: int, procs: int) -> list[str]:
    """The archive's paths, built unless --work already holds the same one."""
    arch = os.path.join(work, "archive")
    stamp = os.path.join(work, "archive.json")
    want = {"n": n, "side": side, "kinds": list(KINDS)}  # as JSON reads it back
    paths = [os.path.join(arch, f"{i:06d}-{KINDS[i % len(KINDS)]}.dcm") for i in range(n)]
    if os.path.exists(stamp) and json.load(open(stamp)) == want and all(map(os.path.exists, paths)):
        return paths
    os.makedirs(arch, exist_ok=True)
    cols = max(8, int(side * 0.8))
    with ProcessPoolExecutor(procs) as ex:
        bases = []
        for k, img in enumerate(ex.map(_render_base, [(k, side) for k in range(min(4, n))])):
            top = (side - cols) // 2
            bases.append(os.path.join(work, f"base-{k}.npy"))
            np.save(bases[-1], img[:, top:top + cols])  # side x 0.8 side, a portrait film
        list(ex.map(_write_one, [(i, bases[i % len(bases)], p) for i, p in enumerate(paths)], chunksize=4))
    json.dump(want, open(stamp, "w"))
    return paths


# --- worker tasks (one process per core) --------------------------------------------------------

def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _cpu_decode(paths: list[str], size: int) -> np.ndarray:
    from kneescreen.data.preprocess import letterbox
    from kneescreen.fileio.reader import ReaderConfig, read_radiograph

    cfg = ReaderConfig(hash_pixels=False)
    return np.stack([letterbox(read_radiograph(_read(p), cfg).image, size) for p in paths])


def _extract(paths: list[str], encoded: bool) -> list:
    """Read + header parse; compressed frames cut out (``encoded``) or decoded to stored pixels."""
    from kneescreen.fileio.frame_extract import extract_frame
    from kneescreen.fileio.frames import DEVICE_CODECS, EncodedFrame

    out = []
    for p in paths:
        ex = extract_frame(_read(p), codecs=DEVICE_CODECS if encoded else ())
        compressed = isinstance(ex.pixels, EncodedFrame)
        out.append((ex.pixels if compressed else None, None if compressed else ex.pixels, ex.facts))
    return out


def _per_core(fn, paths: list[str], *args) -> float:
    t0 = time.perf_counter()
    fn(paths, *args)
    return len(paths) / (time.perf_counter() - t0)


# --- the GPU side ------------------------------------------------------------------------------

class GpuSampler:
    """GPU utilisation (%) sampled every 0.2 s while a stage runs; None without a GPU."""

    def __init__(self):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._query = _nvml_query() or _smi_query()

    def __enter__(self):
        if self._query:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.2):
            value = self._query()
            if value is not None:
                self.samples.append(value)

    def __exit__(self, *exc):
        self._stop.set()

    @property
    def mean(self) -> float | None:
        return round(float(np.mean(self.samples)), 1) if self.samples else None


def _nvml_query():
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except Exception:  # noqa: BLE001 - not installed or no GPU
        return None


def _smi_query():
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return None

    def query():
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                  "-i", "0"], capture_output=True, text=True, timeout=2).stdout
            return float(out.strip().splitlines()[0])
        except Exception:  # noqa: BLE001
            return None
    return query


class Model:
    """The bundle's inference code on one EfficientNet-Lite0 gray member (random weights: the
    cost does not depend on them), as bench/gpu_node_balance.py measures it."""

    def __init__(self, size: int, device: str):
        import dataclasses

        import torch
        from screen_bench import bench_manifest

        from kneescreen.model.bundle import Bundle
        from kneescreen.model.registry import create_model

        manifest = dataclasses.replace(bench_manifest(size), version="bench")
        model = create_model("efficientnet_lite0", 3, "gray", weights=None).to(device).eval()
        self.bundle, self.size, self.device, self.torch = Bundle(manifest, [model], device), size, device, torch

    def infer(self, images) -> None:
        with self.torch.inference_mode():
            self.bundle.member_logits({self.size: images}, batch_size=len(images))

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()


# --- stages ------------------------------------------------------------------------------------

def read_rate(paths: list[str], threads: int = 16) -> dict:
    """Every file read once, cold: its pages dropped from the page cache first."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        total = sum(len(b) for b in ex.map(_read, paths))
    s = time.perf_counter() - t0
    return {"images_per_s": round(len(paths) / s, 1), "mb_per_s": round(total / s / 1e6, 1)}


def _stream(ex, fn, chunks, *args, window: int):
    """Results of ``fn(chunk, *args)`` as they complete, at most ``window`` chunks in flight
    (raw frames are ~10 MB each: an unbounded queue would hold the archive in memory)."""
    chunks, pending = list(chunks), set()
    while chunks or pending:
        while chunks and len(pending) < window:
            pending.add(ex.submit(fn, chunks.pop(0), *args))
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        for fut in done:
            yield fut.result()


def _batches(items, size: int):
    buf = []
    for item in items:
        buf.extend(item)
        while len(buf) >= size:
            yield buf[:size]
            buf = buf[size:]
    if buf:
        yield buf


def cpu_decode_pipeline(ex, paths, model: Model, batch: int, procs: int) -> float:
    chunks = [paths[i:i + CHUNK] for i in range(0, len(paths), CHUNK)]
    t0, done = time.perf_counter(), 0
    for imgs in _batches(_stream(ex, _cpu_decode, chunks, model.size, window=2 * procs), batch):
        model.infer(np.stack(imgs))
        done += len(imgs)
    model.sync()
    return done / (time.perf_counter() - t0)


def device_pipeline(ex, paths, model: Model, batch: int, procs: int, gpu_decode: bool):
    """Stored pixels (or, with ``gpu_decode``, compressed frames decoded on the device) ->
    device preprocessing -> model; None where this checkout has no device preprocessing."""
    try:
        from kneescreen.data.device_preprocess import preprocess_stored
    except ImportError:
        return None
    decoder = None
    if gpu_decode:
        from kneescreen.fileio.frame_decoders import best_decoder

        decoder = best_decoder(model.device)
    key = f"img_{model.size}"
    chunks = [paths[i:i + CHUNK] for i in range(0, len(paths), CHUNK)]
    t0, done = time.perf_counter(), 0
    for rows in _batches(_stream(ex, _extract, chunks, gpu_decode, window=2 * procs), batch):
        frames = [stored for _, stored, _ in rows]
        encoded = [i for i, (enc, _, _) in enumerate(rows) if enc is not None]
        if encoded:
            for i, result in zip(encoded, decoder.decode([rows[i][0] for i in encoded])):
                frames[i] = None if isinstance(result, BaseException) else result
        inputs, _ = preprocess_stored(frames, [f for _, _, f in rows], (key,), model.device)
        model.infer(inputs[key])
        done += len(rows)
    model.sync()
    return done / (time.perf_counter() - t0)


def gpu_decode_rate(ex, paths, device: str, batch: int) -> dict:
    """nvImageCodec (CPU fallback per frame) on the archive's compressed frames, in memory."""
    from kneescreen.fileio.frame_decoders import best_decoder

    frames = [enc for chunk in ex.map(_extract, [paths[i:i + CHUNK] for i in range(0, len(paths), CHUNK)],
                                      [True] * len(paths)) for enc, _, _ in chunk if enc is not None]
    decoder = best_decoder(device)
    decoder.decode(frames[:4])  # warm-up: codec initialisation
    import torch

    t0 = time.perf_counter()
    for i in range(0, len(frames), batch):
        decoder.decode(frames[i:i + batch])
    torch.cuda.synchronize()
    s = time.perf_counter() - t0
    return {"images_per_s": round(len(frames) / s, 1), "frames": len(frames), "decoder": decoder.name,
            "fell_back": getattr(decoder, "fallbacks", None)}


def model_rate(model: Model, batch: int, n: int) -> float:
    imgs = np.random.default_rng(0).integers(0, 255, (batch, model.size, model.size), dtype=np.uint8)
    for _ in range(2):
        model.infer(imgs)
    model.sync()
    t0, done = time.perf_counter(), 0
    while done < n:
        model.infer(imgs)
        done += batch
    model.sync()
    return done / (time.perf_counter() - t0)


# --- main --------------------------------------------------------------------------------------

def _stage(res: dict, name: str, fn, *args):
    with GpuSampler() as gpu:
        t0 = time.perf_counter()
        value = fn(*args)
    if value is None:
        res["stages"][name] = {"skipped": "device preprocessing (issue #22 item 1) is not in this checkout"}
        return
    entry = value if isinstance(value, dict) else {"images_per_s": round(value, 1)}
    entry.update(wall_s=round(time.perf_counter() - t0, 2), gpu_util_pct=gpu.mean)
    res["stages"][name] = entry


def _verdict(res: dict) -> dict:
    st = {k: v.get("images_per_s") for k, v in res["stages"].items() if "images_per_s" in v}
    parts = {k: st[k] for k in ("storage read", "gpu decode only", "model only") if k in st}
    out = {"slowest_part": min(parts, key=parts.get) if parts else None}
    end = st.get("gpu-decode pipeline")
    if end and st.get("cpu-decode pipeline"):
        out["gpu_decode_vs_cpu_decode_pipeline"] = round(end / st["cpu-decode pipeline"], 2)
        out["goal_4x_cpu_decode"] = end >= 4 * st["cpu-decode pipeline"]
    if end and parts:
        out["gpu_decode_vs_slowest_part"] = round(end / min(parts.values()), 2)
        out["goal_0.8x_slowest_part"] = end >= 0.8 * min(parts.values())
    return out


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1200, help="images in the archive")
    p.add_argument("--side", type=int, default=2560, help="long side in px (the short side is 0.8x)")
    p.add_argument("--batch", type=int, default=256, help="inference batch")
    p.add_argument("--size", type=int, default=160, help="model input size")
    p.add_argument("--procs", type=int, default=os.cpu_count() or 1, help="decode processes")
    p.add_argument("--work", default="/tmp/kneescreen-gpu-node", help="archive folder (kept between runs)")
    p.add_argument("--out", default=None, help="write the results as JSON here too")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    res = {"device": torch.cuda.get_device_name(0) if cuda else "cpu (no CUDA device)", "cores": os.cpu_count(),
           "procs": args.procs, "n": args.n, "side": args.side, "batch": args.batch, "size": args.size, "stages": {}}
    t0 = time.perf_counter()
    paths = build_archive(args.work, args.n, args.side, args.procs)
    res["archive"] = {"build_s": round(time.perf_counter() - t0, 1),
                      "mb": round(sum(os.path.getsize(x) for x in paths) / 1e6, 1),
                      "kinds": {k: sum(k in x for x in paths) for k in KINDS}}
    model = Model(args.size, device)
    with ProcessPoolExecutor(args.procs) as ex:
        list(ex.map(_cpu_decode, [paths[:1]] * args.procs, [args.size] * args.procs))  # warm the workers
        res["decode_per_core"] = {k: round(_per_core(_cpu_decode, [x for x in paths if k in x][:4], args.size), 2)
                                  for k in KINDS}
        _stage(res, "storage read", read_rate, paths)
        _stage(res, "model only", model_rate, model, args.batch, max(4 * args.batch, args.n))
        _stage(res, "cpu-decode pipeline", cpu_decode_pipeline, ex, paths, model, args.batch, args.procs)
        _stage(res, "device-preprocess pipeline", device_pipeline, ex, paths, model, args.batch, args.procs, False)
        if cuda:
            _stage(res, "gpu decode only", gpu_decode_rate, ex, paths, device, 64)
            _stage(res, "gpu-decode pipeline", device_pipeline, ex, paths, model, args.batch, args.procs, True)
        else:
            for name in ("gpu decode only", "gpu-decode pipeline"):
                res["stages"][name] = {"skipped": "no CUDA device: GPU decode not measured"}
    res["verdict"] = _verdict(res)
    _print(res)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        json.dump(res, open(args.out, "w"), indent=1)
    return 0


def _print(res: dict) -> None:
    print(f"{res['device']}, {res['cores']} cores, {res['procs']} decode processes; {res['n']} images "
          f"{res['side']} x {int(res['side'] * 0.8)} ({res['archive']['mb']} MB: {res['archive']['kinds']}); "
          f"model input {res['size']} px, batch {res['batch']}")
    print("decode per core, images/s (read + decode + letterbox, one process): "
          + ", ".join(f"{k} {v}" for k, v in res["decode_per_core"].items()))
    print(f"{'stage':<28} {'images/s':>10} {'GPU util %':>11}  note")
    for name, st in res["stages"].items():
        rate = st.get("images_per_s")
        util = st.get("gpu_util_pct")
        note = st.get("skipped") or ", ".join(f"{k} {v}" for k, v in st.items()
                                               if k not in ("images_per_s", "gpu_util_pct"))
        print(f"{name:<28} {'-' if rate is None else f'{rate:,.1f}':>10} {'-' if util is None else util:>11}  {note}")
    print("verdict:", json.dumps(res["verdict"]))


if __name__ == "__main__":
    raise SystemExit(main())
