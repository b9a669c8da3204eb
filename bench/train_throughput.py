"""Training throughput per ensemble member: images/s for forward + backward + AdamW step.

Runs wherever torch runs (no Ray): on a GPU with bf16 autocast and channels_last, on a CPU in
fp32. The 1-vs-2 Ray Train worker comparison on CPU is bench/train_workers.py.

Usage: python bench/train_throughput.py [--members a,b] [--batch 64] [--steps 10] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from kneescreen.model.registry import create_model, get_spec, list_models  # noqa: E402


def bench(name: str, batch: int, steps: int, device: str, bf16: bool, mode: str = "gray", size: int | None = None) -> float:
    size = size or get_spec(name).input_size
    model = create_model(name, 3, mode, weights=None).to(device)
    x = torch.rand(batch, 1 if mode == "gray" else 3, size, size, device=device)
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (batch,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step():
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--members", default=",".join(n for n in list_models() if n != "test_cnn"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default=None)
    p.add_argument("--size", type=int, default=None, help="override every member's input size")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for name in args.members.split(","):
        row = {"member": name, "input_size": args.size or get_spec(name).input_size, "device": device,
               "gpu": torch.cuda.get_device_name() if device == "cuda" else None, "batch": args.batch,
               "torch": torch.__version__}
        row["images_per_s_fp32"] = round(bench(name, args.batch, args.steps, device, False, size=args.size), 1)
        if device == "cuda":
            row["images_per_s_bf16"] = round(bench(name, args.batch, args.steps, device, True, size=args.size), 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
