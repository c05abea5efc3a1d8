"""Backbone forward+backward time: dagman's SwinBackbone vs MONAI's SwinTransformer.

Same architecture (the `paper` preset: embed 48, depths 2-2-8-2, heads 4-4-8-16, window 4, patch 2),
same weights (MONAI's state dict loaded strictly into ours), same input, same precision, batch 1.
Runs are interleaved (MONAI, ours, MONAI, ours, ...) after a warm-up, and the reported number is the
median of the per-pair ratios ours/MONAI (lower is better), so slow drifts of a shared machine cancel.

    python benchmarks/backbone_speed.py                       # 96^3 and 128^3 on CPU, fp32
    python benchmarks/backbone_speed.py --device cuda --precision bf16 --sizes 128
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from monai.networks.nets.swin_unetr import SwinTransformer

from dagman.models.swin import build_backbone
from dagman.sysinfo import describe_machine

PAPER = dict(in_chans=1, embed_dim=48, window_size=(4, 4, 4), patch_size=(2, 2, 2), depths=(2, 2, 8, 2),
             num_heads=(4, 4, 8, 16), mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.0)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(model, x, dtype, device):
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        outs = model(x, normalize=True)
        loss = sum(o.float().mean() for o in outs)
    loss.backward()
    sync(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[96, 128], help="cubic input sizes (default 96 128)")
    p.add_argument("--repeats", type=int, default=5, help="timed pairs per size (default 5)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    torch.manual_seed(0)
    monai_model = SwinTransformer(**PAPER).to(device)
    ours = build_backbone(**PAPER).to(device)
    ours.load_state_dict(monai_model.state_dict(), strict=True)
    print(f"machine: {describe_machine(device)}; precision {args.precision}; batch 1; paper architecture")
    with torch.no_grad():  # both compute the same function (fp32 check on a small input)
        x = torch.randn(1, 1, 64, 64, 64, device=device)
        diff = max(float((a - b).abs().max()) for a, b in zip(monai_model(x), ours(x)))
    print(f"parity check (64^3, fp32, no grad): max |ours - MONAI| over the 5 outputs = {diff:.2e}")
    print(f"{'input':>8} {'MONAI s':>9} {'ours s':>9} {'ours/MONAI':>11}  (median of {args.repeats} interleaved pairs)")
    rows = []
    for size in args.sizes:
        x = torch.randn(1, 1, size, size, size, device=device)
        for _ in range(args.warmup):
            step(monai_model, x, dtype, device)
            step(ours, x, dtype, device)
        tm, to = [], []
        for _ in range(args.repeats):
            for model, times in ((monai_model, tm), (ours, to)):
                t0 = time.perf_counter()
                step(model, x, dtype, device)
                times.append(time.perf_counter() - t0)
        ratio = statistics.median(b / a for a, b in zip(tm, to))
        rows.append((size, statistics.median(tm), statistics.median(to), ratio))
        print(f"{size:>6}^3 {rows[-1][1]:>9.3f} {rows[-1][2]:>9.3f} {ratio:>11.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
