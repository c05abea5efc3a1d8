"""Pretraining throughput of the real trainer: median step time (after warm-up) and peak memory.

Runs `dagman.train.loop.pretrain` for a few steps per configuration on a prepared cache and reads the
step times back from metrics.jsonl (the trainer synchronises CUDA before timing a step). On CUDA the
peak memory is torch's max allocated; on CPU it is the process's peak RSS (one configuration per child
process so peaks do not mix).

    python benchmarks/pretrain_throughput.py --data CACHE --configs tiny:dagman:fp32 small:dagman:bf16 \
        paper:dagman:bf16 paper:dagman:bf16:ckpt --steps 20
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from dagman.sysinfo import describe_machine

CHILD = r"""
import json, resource, sys, torch
from dagman.config import load_config
from dagman.train.loop import pretrain
from dagman.train.logging import read_metrics
from dagman.sysinfo import describe_machine
size, method, precision, ckpt, data, out, steps = sys.argv[1:8]
over = [f"data.cache={data}", f"train.total_steps={steps}", f"train.precision={precision}",
        f"model.use_checkpoint={'true' if ckpt == '1' else 'false'}", "train.diversity_every_epochs=0",
        f"train.checkpoint_every_steps={steps}"] + sys.argv[8:]
cfg = load_config(size, method, overrides=over)
summary = pretrain(cfg, out, progress=False)
m = read_metrics(f"{out}/metrics.jsonl")
times = [e["step_seconds"] for e in m[min(5, len(m) - 1):]]
res = {"median_step_s": sorted(times)[len(times) // 2], "batch": cfg.data.batch_size, "crop": cfg.data.crop_size,
       "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
       "gpu_peak_gib": max((e.get("gpu_peak_memory_gib", 0.0) for e in m), default=0.0),
       "final_loss": m[-1]["loss"], "skipped": m[-1]["skipped_steps"]}
print("RESULT " + json.dumps(res))
"""


def machine() -> str:
    import torch

    return describe_machine("cuda" if torch.cuda.is_available() else "cpu")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="prepared cache")
    p.add_argument("--configs", nargs="+", default=["tiny:dagman:fp32"],
                   help="size:method:precision[:ckpt] (ckpt = activation checkpointing on)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", help="write the rows here")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = p.parse_args(argv)
    print(f"machine: {machine()}")
    print(f"{'config':<28} {'batch':>5} {'crop':>5} {'step s':>8} {'vol/s':>7} {'GPU peak GiB':>13} {'RSS GiB':>8}")
    rows = []
    for spec in args.configs:
        parts = spec.split(":")
        size, method, precision = parts[:3]
        ckpt = "1" if len(parts) > 3 and parts[3] == "ckpt" else "0"
        with tempfile.TemporaryDirectory() as tmp:
            r = subprocess.run([sys.executable, "-c", CHILD, size, method, precision, ckpt, args.data,
                                str(Path(tmp) / "run"), str(args.steps), *args.overrides],
                               capture_output=True, text=True)
        line = next((l for l in r.stdout.splitlines() if l.startswith("RESULT ")), None)
        if r.returncode != 0 or line is None:
            err = (r.stderr.strip().splitlines() or ["failed"])[-1]
            print(f"{spec:<28} failed: {err}")
            rows.append({"config": spec, "error": err})
            continue
        res = json.loads(line[7:])
        res["config"] = spec
        rows.append(res)
        vols = res["batch"] / res["median_step_s"]
        print(f"{spec:<28} {res['batch']:>5} {res['crop']:>5} {res['median_step_s']:>8.3f} {vols:>7.2f} "
              f"{res['gpu_peak_gib']:>13.2f} {res['peak_rss_gib']:>8.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
