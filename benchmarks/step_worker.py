"""A child process that holds one pretraining state and runs one ``train_step`` per request.

``perf.py --baseline-commit`` starts two of these, one on this checkout's ``src`` and one on a baseline
commit's ``src`` (exported to a temporary folder and put first on ``PYTHONPATH``), and asks them for steps in
alternating order, so the two code versions are timed in the same rounds on the same machine (two versions of
one package cannot live in one process). The worker uses only the API the two versions share
(``load_config``, ``plan_steps``, ``Schedules``, ``build_state``, ``train_step``) and the preset's *default*
settings (precision, and whatever else the checkout's default path is), except that the learning-rate warm-up
and the last-layer freeze are off so every step is a full update.

Protocol (one JSON object per line): the worker prints ``READY {...}`` once its state is built (the package
file it imported, the precision and the path its config runs), then for every ``step`` line on stdin runs
one step on fixed random views and prints ``STEP {"seconds": s, "loss": l}``; ``quit`` or end of input exits.

    PYTHONPATH=/tmp/old/src python benchmarks/step_worker.py --size tiny --method dagman
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny")
    p.add_argument("--method", default="dagman")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import dagman
    from dagman.config import load_config, plan_steps
    from dagman.train.distributed import DistInfo
    from dagman.train.loop import build_state, train_step
    from dagman.train.schedules import Schedules

    device = torch.device(args.device)
    overrides = ["optim.warmup_epochs=0", "optim.freeze_last_layer_epochs=0", "train.total_steps=100000"]
    cfg = load_config(args.size, args.method, overrides=overrides)
    info = DistInfo(rank=0, world_size=1, local_rank=max(device.index or 0, 0), device=device, distributed=False)
    state = build_state(cfg, info, Schedules.from_config(cfg, plan_steps(cfg, num_volumes=100 * cfg.data.batch_size)))
    d = cfg.data
    g = torch.Generator().manual_seed(args.seed)
    views = torch.rand(2, d.batch_size, 1, d.crop_size, d.crop_size, d.crop_size, generator=g).to(device)
    ready = {"package": os.path.dirname(dagman.__file__), "precision": cfg.train.precision,
             "compile": getattr(cfg.train, "compile", None), "batch": d.batch_size, "crop": d.crop_size,
             "threads": torch.get_num_threads()}
    print("READY " + json.dumps(ready), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        if cmd != "step":
            print("ERROR " + json.dumps({"error": f"unknown command {cmd!r}"}), flush=True)
            continue
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        metrics = train_step(state, views[0], views[1])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        print("STEP " + json.dumps({"seconds": seconds, "loss": metrics["loss"],
                                    "skipped": metrics.get("skipped_steps", 0)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
