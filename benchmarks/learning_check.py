"""Does pretraining learn? Masked-reconstruction (AMIP) loss on held-out CT crops, step 0 vs step N.

Fetches the real example CTs (or uses `--cache`), holds one prepared volume out, pretrains `--method` at
`--size` on the others for `--steps` steps, and evaluates the student's masked-voxel L1 (the AMIP loss) on
fixed two-view crops of the held-out volume, with the method's own masks drawn from a fixed seed, at step 0
(the initial weights, same seed) and after training. Target in the issue: >= 20% lower.

    python benchmarks/learning_check.py --steps 300
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from dagman.config import load_config, plan_steps
from dagman.data.cache import atomic_write_json, read_manifest
from dagman.data.views import TwoViewDataset
from dagman.train.checkpoint import load_checkpoint
from dagman.train.distributed import DistInfo
from dagman.train.loop import build_state, pretrain, restore_state
from dagman.train.schedules import Schedules


def subset_cache(cache: Path, ids: list[str], out: Path) -> Path:
    """A cache folder holding only ``ids`` of ``cache`` (volumes hard-linked or copied)."""
    manifest = read_manifest(cache)
    keep = [e for e in manifest["volumes"] if e["id"] in ids]
    (out / "volumes").mkdir(parents=True, exist_ok=True)
    for e in keep:
        dst = out / e["file"]
        if not dst.exists():
            try:
                dst.hardlink_to(cache / e["file"])
            except OSError:
                shutil.copy2(cache / e["file"], dst)
    atomic_write_json(out / "manifest.json", {**manifest, "volumes": keep})
    return out


@torch.no_grad()
def heldout_amip(state, cache: Path, crops: int, seed: int) -> float:
    ds = TwoViewDataset(cache, state.cfg.data.crop_size, seed=seed)
    total = trivial = 0.0
    for i in range(crops):
        batch = ds.batch([(i, i % len(ds))])
        values = state.schedules.at(0)
        result = state.method(state.student, state.teacher, batch["view1"], batch["view2"], values,
                              torch.Generator().manual_seed(seed + i))
        total += float(result.parts["amip"])
        # reference: predict every masked voxel as the mean of the visible voxels of its view
        x = torch.cat([batch["view1"], batch["view2"]])
        m = result.masks["student"]
        for axis in range(3):
            m = m.repeat_interleave(x.shape[2 + axis] // m.shape[1 + axis], dim=1 + axis)
        m = m.unsqueeze(1)
        visible_mean = (x * ~m).flatten(1).sum(1) / (~m).flatten(1).sum(1).clamp_min(1)
        err = (x - visible_mean.view(-1, 1, 1, 1, 1)).abs()
        trivial += float((err * m).sum() / m.sum().clamp_min(1))
    return total / crops, trivial / crops


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", help="prepared cache (default: fetch the examples and prepare them)")
    p.add_argument("--work", default="learning-check", help="work folder (default ./learning-check)")
    p.add_argument("--method", default="dagman")
    p.add_argument("--size", default="tiny")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--crops", type=int, default=16, help="held-out evaluation crop pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout", default=None, help="id prefix of the held-out volume (default: the last one)")
    args = p.parse_args(argv)
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    if args.cache:
        cache = Path(args.cache)
    else:
        from dagman.data.examples import default_examples_dir, fetch_examples
        from dagman.data.prepare import prepare

        manifest = fetch_examples(default_examples_dir(), progress=False)
        cache = work / "cache"
        prepare([manifest], cache, min_size=32, workers=2, progress=False)
    entries = read_manifest(cache)["volumes"]
    held = [e for e in entries if args.holdout and e["id"].startswith(args.holdout)] or [entries[-1]]
    train_ids = [e["id"] for e in entries if e not in held]
    train_cache = subset_cache(cache, train_ids, work / "train-cache")
    held_cache = subset_cache(cache, [held[0]["id"]], work / "heldout-cache")

    cfg = load_config(args.size, args.method, overrides=[f"data.cache={train_cache}", f"train.total_steps={args.steps}",
                                                         f"train.seed={args.seed}",
                                                         f"train.checkpoint_every_steps={args.steps}"])
    info = DistInfo(0, 1, 0, torch.device("cpu"), False)
    schedules = Schedules.from_config(cfg, plan_steps(cfg, len(train_ids)))
    before, trivial0 = heldout_amip(build_state(cfg, info, schedules), held_cache, args.crops, args.seed)
    t0 = time.perf_counter()
    summary = pretrain(cfg, work / "run", progress=True)
    seconds = time.perf_counter() - t0
    state = build_state(cfg, info, schedules)
    path = work / "run" / "checkpoints" / "last.pt"
    restore_state(state, load_checkpoint(path), path)
    after, trivial = heldout_amip(state, held_cache, args.crops, args.seed)
    drop = 100.0 * (before - after) / before
    result = {"method": args.method, "size": args.size, "steps": args.steps, "train_volumes": train_ids,
              "heldout_volume": held[0]["id"], "heldout_crops": args.crops, "amip_step0": before,
              "amip_final": after, "reduction_percent": drop,
              "visible_mean_predictor_l1": trivial, "train_seconds": seconds,
              "final_train_losses": {k: v for k, v in summary["final"].items() if k.startswith("loss")}}
    (work / "result.json").write_text(json.dumps(result, indent=2))
    print(f"held-out masked-reconstruction L1 ({held[0]['id']}, {args.crops} crop pairs, fixed masks): "
          f"step 0 {before:.4f} -> step {args.steps} {after:.4f}  ({drop:.1f}% lower; target >= 20%)")
    print(f"reference: predicting each masked voxel as the mean of its view's visible voxels gives {trivial:.4f}")
    print(f"trained on {len(train_ids)} real CT volumes, {args.method}/{args.size}, {seconds:.0f} s on "
          f"{torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
