"""Where does the collapse happen? Token and head statistics of the teacher over a pretraining run.

Trains `--method` at `--size` on the example CTs less one held-out volume (as `learning_check.py` does), and
every `--every` steps runs the teacher (clean views, no masks) on `--crops` fixed crops of the held-out volume and
of the training volumes and records, for every backbone stage s = 0..4 (0: patch embedding; layer-normed
maps, as the heads read them):

- ``cross_sample``: the variance across crops of each crop's mean token (mean over channels): how much the
  stage says about *which* crop it sees;
- ``cross_position``: the variance across a crop's token positions (mean over crops and channels): how much it
  says about *where* in the crop;
- for the heads: the std across crops of the [CLS] and global logits (the trainer's ``teacher_*_spread``) and
  the std across positions of the patch logits;

plus the trainer's learning monitor of that step (uniform ratios, teacher entropies, centre norms, S entropy)
and `learning_check.heldout_measures` on the held-out crops (masked L1 / mean-of-visible predictor, teacher
entropies, S entropy).
Writes ``diagnosis.jsonl`` (one row per measurement) and prints a table.

    python benchmarks/collapse_diagnosis.py --steps 600 --every 100
    python benchmarks/collapse_diagnosis.py --steps 600 --every 100 loss.teacher_norm=sinkhorn_knopp
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learning_check import heldout_measures, work_and_split  # noqa: E402

from dagman.config import load_config, plan_steps  # noqa: E402
from dagman.data.views import TwoViewDataset, two_view_loader  # noqa: E402
from dagman.ssl.monitor import entropy_ratio  # noqa: E402
from dagman.train.distributed import DistInfo  # noqa: E402
from dagman.train.loop import build_state, is_monitor_key, train_step  # noqa: E402
from dagman.train.schedules import Schedules  # noqa: E402


def fixed_crops(cache: Path, crop: int, n: int, seed: int) -> torch.Tensor:
    ds = TwoViewDataset(cache, crop, seed=seed)
    return torch.cat([ds.batch([(i, i % ds.n_volumes)])["view1"] for i in range(n)])


@torch.no_grad()
def token_stats(teacher, x: torch.Tensor) -> dict:
    teacher.eval()
    out = teacher(x, mask=None, heads=True, outputs=(0, 1, 2, 3, 4))
    teacher.train()
    row = {}
    for s, tok in enumerate(out.features.tokens):
        if tok is None:
            continue
        t = tok.float()  # (B, N, C)
        row[f"stage{s}_cross_sample"] = float(t.mean(1).var(0, unbiased=False).mean())
        row[f"stage{s}_cross_position"] = float(t.var(1, unbiased=False).mean())
    for name in ("cls_logits", "global_logits"):
        v = getattr(out, name)
        if v is not None:
            row[f"{name}_std_across_crops"] = float(v.float().std(0).mean())
    if out.patch_logits is not None:
        row["patch_logits_std_across_positions"] = float(out.patch_logits.float().std(1).mean())
    if out.importance is not None:
        row["importance_entropy_clean"] = float(entropy_ratio(out.importance).mean())
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", help="prepared cache (default: fetch the examples and prepare them)")
    p.add_argument("--work", default="collapse-diagnosis", help="work folder (default ./collapse-diagnosis)")
    p.add_argument("--method", default="dagman")
    p.add_argument("--size", default="tiny")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--crops", type=int, default=8, help="fixed crops per set (held-out, training)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="config key=value overrides, as for dagman pretrain")
    args = p.parse_args(argv)
    work = Path(args.work)
    train_cache, held_cache, _, _ = work_and_split(work, args.cache, None)
    cfg = load_config(args.size, args.method, overrides=[
        f"data.cache={train_cache}", f"train.total_steps={args.steps}", f"train.seed={args.seed}", *args.overrides])
    info = DistInfo(0, 1, 0, torch.device("cpu"), False)
    d = cfg.data
    ds = TwoViewDataset.from_config(d, train_cache, seed=args.seed)
    ds.samples_per_volume = max(1, -(-d.batch_size // ds.n_volumes))
    state = build_state(cfg, info, Schedules.from_config(cfg, plan_steps(cfg, ds.n_volumes)))
    loader = two_view_loader(ds, d.batch_size, workers=1, seed=args.seed)
    sets = {"heldout": fixed_crops(held_cache, d.crop_size, args.crops, args.seed + 1),
            "train": fixed_crops(train_cache, d.crop_size, args.crops, args.seed + 2)}
    rows = []
    log = (work / "diagnosis.jsonl").open("w")

    def measure(metrics: dict) -> None:
        row = {"step": state.step, **{k: v for k, v in metrics.items() if is_monitor_key(k)}}
        for name, x in sets.items():
            row.update({f"{name}.{k}": v for k, v in token_stats(state.teacher, x).items()})
        row.update({f"heldout.{k}": v for k, v in heldout_measures(state, held_cache, args.crops, args.seed).items()})
        rows.append(row)
        log.write(json.dumps(row) + "\n")
        log.flush()
        h = row.get("heldout.stage3_cross_sample", float("nan"))
        print(f"step {state.step:5d}  loss {metrics.get('loss', float('nan')):.4f}  held-out stage3 cross-sample "
              f"{h:.3e}  cls std {row.get('heldout.cls_logits_std_across_crops', float('nan')):.2e}  "
              f"aitd H {row.get('teacher_aitd_entropy', float('nan')):.3f}  "
              f"ampd H {row.get('teacher_ampd_entropy', float('nan')):.3f}  "
              f"S H {row.get('importance_entropy', float('nan')):.3f}  "
              f"held-out L1/mean-pred {row.get('heldout.l1_ratio', float('nan')):.3f}", flush=True)

    t0 = time.perf_counter()
    measure({})
    epoch = 0
    while state.step < args.steps:
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            metrics = train_step(state, batch["view1"], batch["view2"])
            if state.step % args.every == 0 or state.step == args.steps:
                measure(metrics)
            if state.step >= args.steps:
                break
        epoch += 1
    log.close()
    print(f"{args.steps} steps in {time.perf_counter() - t0:.0f} s -> {work / 'diagnosis.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
