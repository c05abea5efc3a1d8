"""Does pretraining learn? The learning measures of issue 14 on a held-out CT, at step 0 and after N steps.

Fetches the real example CTs (or uses `--cache`), holds one prepared volume out, pretrains `--method` at
`--size` on the others for `--steps` steps, and evaluates on `--crops` fixed two-view crop pairs of the
held-out volume, with the method's own masks drawn from a fixed seed (the teacher sees its patch-dropped view,
as in training), at step 0 (the initial weights) and after training:

- masked reconstruction L1 (the AMIP loss) against the mean-of-visible predictor (each masked voxel predicted as
  the mean of its view's visible voxels): target ratio <= 0.75;
- per image-level term (AITD: the SA [CLS] token; GITD: the pooled token), the teacher's targets on view 1 of
  each crop, ``softmax((t - centre) / teacher_temp)`` with the run's centre and the temperature of the step
  evaluated (centring also for a Sinkhorn-Knopp run: its centre EMA runs too, and Sinkhorn-Knopp over a set of
  crops would equalise their prototypes by construction): the mean per-crop entropy / ln K (target <= 0.8:
  not a uniform collapse) and the entropy of the mean target over the crops / ln(crops) (target >= 0.5: not a
  one-prototype collapse);
- the SA importance map S: the mean per-crop entropy / ln N (target <= 0.9: the map looks somewhere), on the
  view the method scores (the teacher's patch-dropped view by default), and, for information, on the clean view
  (``importance_entropy_clean_view``: whether S looks at the anatomy or only at the tokens the teacher kept).

`--measure-only` measures the checkpoint already in `WORK/run` with the config it was trained with (no training),
with the overrides given applied on top of it (e.g. `mask.student=random`: the same network measured with random
masks instead of its own); `--measure-on train` measures on the training volumes instead of the held-out one
(validation data: a recipe may be chosen on it).
`--heads` adds where an image-level collapse sits (:func:`head_geometry`): the teacher's pooled token, each
image-level projection output z and its logits over the prototypes, at step 0 and after training.

    python benchmarks/learning_check.py --steps 300
    python benchmarks/learning_check.py --size cpu --steps 4000 --crops 64 loss.teacher_norm=sinkhorn_knopp
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

from dagman.config import load_config, override_config, plan_steps
from dagman.data.cache import atomic_write_json, read_manifest
from dagman.data.views import TwoViewDataset
from dagman.models.swin import upsample_mask
from dagman.ssl.monitor import entropy_ratio, mean_predictor_l1
from dagman.train.checkpoint import load_checkpoint
from dagman.train.probe import effective_rank
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


TARGETS = {"l1_ratio": ("<=", 0.75), "teacher_entropy": ("<=", 0.8), "mean_entropy": (">=", 0.5),
           "importance_entropy": ("<=", 0.9)}


def work_and_split(work: Path, cache_arg: str | None, holdout: str | None,
                   fresh: bool = True) -> tuple[Path, Path, list[str], str]:
    """A fresh ``work`` folder (``fresh=False``: keep what is there, e.g. a trained run), the cache (``cache_arg``, or the example CTs fetched and prepared into
    ``work/cache``) split into ``work/train-cache`` and ``work/heldout-cache`` (the volume whose id starts
    with ``holdout``, else the last one). Returns (train cache, held-out cache, training ids, held-out id)."""
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if cache_arg:
        cache = Path(cache_arg)
    else:
        from dagman.data.examples import default_examples_dir, fetch_examples
        from dagman.data.prepare import prepare

        manifest = fetch_examples(default_examples_dir(), progress=False)
        cache = work / "cache"
        prepare([manifest], cache, min_size=32, workers=2, progress=False)
    entries = read_manifest(cache)["volumes"]
    held = [e for e in entries if holdout and e["id"].startswith(holdout)] or [entries[-1]]
    train_ids = [e["id"] for e in entries if e not in held]
    return (subset_cache(cache, train_ids, work / "train-cache"),
            subset_cache(cache, [held[0]["id"]], work / "heldout-cache"), train_ids, held[0]["id"])


@torch.no_grad()
def heldout_measures(state, cache: Path, crops: int, seed: int) -> dict:
    """The learning measures (module docstring) of ``state`` on ``crops`` crop pairs of ``cache``."""
    ds = TwoViewDataset(cache, state.cfg.data.crop_size, seed=seed)
    values = state.schedules.at(max(state.step - 1, 0))
    state.student.eval()
    state.teacher.eval()
    l1 = trivial = 0.0
    targets: dict[str, list[torch.Tensor]] = {"aitd": [], "gitd": []}
    s_entropy: list[float] = []
    s_clean: list[float] = []
    for i in range(crops):
        batch = ds.batch([(i, i % len(ds))])
        result = state.method(state.student, state.teacher, batch["view1"], batch["view2"], values,
                              torch.Generator().manual_seed(seed + i))
        if "amip" in result.parts:
            l1 += float(result.parts["amip"])
            # the AMIP loss averages over every masked voxel of both views: weigh each view's predictor the same way
            x = torch.cat([batch["view1"], batch["view2"]])[:, 0].numpy()
            m = upsample_mask(result.masks["student"], x.shape[1:]).numpy()
            per_view = [(mean_predictor_l1(xv, mv), int(mv.sum())) for xv, mv in zip(x, m)]
            per_view = [(v, n) for v, n in per_view if v is not None]
            trivial += sum(v * n for v, n in per_view) / max(1, sum(n for _, n in per_view))
        for name in targets:
            logits, fn = result.teacher_logits.get(name), getattr(state.method, f"{name}_loss")
            if logits is not None and fn is not None:
                targets[name].append(torch.softmax((logits[:1].float() - fn.center) / values.teacher_temp, -1))
        if result.masks.get("importance") is not None:
            s_entropy.append(float(entropy_ratio(result.masks["importance"][:1]).mean()))
            with torch.no_grad():
                clean = state.teacher(batch["view1"], mask=None, heads=False).importance
            s_clean.append(float(entropy_ratio(clean.float()).mean()))
    out: dict = {"teacher_temp": values.teacher_temp}
    if trivial:
        out.update(l1=l1 / crops, mean_predictor_l1=trivial / crops, l1_ratio=l1 / trivial)
    for name, rows in targets.items():
        if rows:
            p = torch.cat(rows)
            out[f"{name}_teacher_entropy"] = float(entropy_ratio(p).mean())
            # over ln(crops), not ln K: the most a set of that many sharp targets can spread
            out[f"{name}_mean_entropy"] = float(entropy_ratio(p.mean(0))) * math.log(p.shape[-1]) / math.log(len(rows))
    if s_entropy:
        out["importance_entropy"] = sum(s_entropy) / len(s_entropy)
        out["importance_entropy_clean_view"] = sum(s_clean) / len(s_clean)
    return out


def _mean_cosine(x: torch.Tensor) -> float:
    """Mean cosine similarity between the distinct rows of ``x`` ``(N, D)``, N >= 2."""
    x = torch.nn.functional.normalize(x.double(), dim=-1)
    n = x.shape[0]
    return float(((x @ x.T).sum() - n) / (n * (n - 1)))


@torch.no_grad()
def head_geometry(state, cache: Path, crops: int, seed: int) -> dict:
    """Where an image-level collapse sits (docs/RESULTS.md, "Where the collapse at length sits"), on the clean view
    1 of ``crops`` crops of ``cache`` through the teacher: for the pooled last-stage token (GITD's input) and for
    each image-level projection output z (``gitd``, ``aitd``), the mean cosine between crops and the effective rank
    (1 and ~1: every crop the same); per term the logits' std over the K prototypes (about 1/sqrt(bottleneck) for
    random prototypes, ~0 when z points away from every prototype: uniform targets whatever the temperature) and
    over the crops (~0: the targets do not depend on the input); and the image prototype layer's effective rank."""
    ds = TwoViewDataset(cache, state.cfg.data.crop_size, seed=seed)
    net = state.teacher.eval()
    pooled, z, logits = [], {"gitd": [], "aitd": []}, {"gitd": [], "aitd": []}
    for i in range(crops):
        out = net(ds.batch([(i, i % len(ds))])["view1"], mask=None, outputs=(net.global_stage,))
        pooled.append(out.features.tokens[net.global_stage].mean(1))
        for name, (zs, ls) in {"gitd": (out.global_z, out.global_logits), "aitd": (out.cls_z, out.cls_logits)}.items():
            if zs is not None:
                z[name].append(zs)
                logits[name].append(ls)
    x = torch.cat(pooled)
    out = {"pooled_cosine": _mean_cosine(x), "pooled_rank": effective_rank(x.double().numpy())}
    layer = net.global_prototypes if net.global_prototypes is not None else net.cls_prototypes
    if layer is not None:
        out["prototype_rank"] = effective_rank(layer.effective_weight().double().numpy())
    for name in z:
        if z[name]:
            zs, ls = torch.cat(z[name]), torch.cat(logits[name]).double()
            out.update({f"{name}_z_cosine": _mean_cosine(zs), f"{name}_z_rank": effective_rank(zs.double().numpy()),
                        f"{name}_logit_std_over_K": float(ls.std(1).mean()),
                        f"{name}_logit_std_over_crops": float(ls.std(0).mean())})
    return out


def _print_heads(before: dict, after: dict, label: str) -> None:
    print(f"teacher head geometry, clean view 1 (step 0 -> {label}):")
    for key, value in after.items():
        print(f"  {key:26s} {before.get(key, float('nan')):8.4f} -> {value:8.4f}")


def verdicts(measures: dict) -> list[str]:
    """One line per measured target: the value, the target and PASS/FAIL."""
    lines = []
    for key, value in measures.items():
        target = next(((k, t) for k, t in TARGETS.items() if key == k or key.endswith("_" + k)), None)
        if target is None:
            continue
        op, limit = target[1]
        ok = value <= limit if op == "<=" else value >= limit
        lines.append(f"  {key:26s} {value:8.4f}   target {op} {limit}   {'PASS' if ok else 'FAIL'}")
    return lines


def _print_info(measures: dict) -> None:
    if "importance_entropy_clean_view" in measures:
        print(f"  {'S entropy, clean view':26s} {measures['importance_entropy_clean_view']:8.4f}   (information)")


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
    p.add_argument("--measure-only", action="store_true",
                   help="measure the checkpoint in WORK/run with its own config; no training")
    p.add_argument("--measure-on", choices=["heldout", "train"], default="heldout",
                   help="with --measure-only: the held-out volume (default) or the training volumes")
    p.add_argument("--heads", action="store_true",
                   help="also print where an image-level collapse sits (teacher pooled token, projection output z, "
                        "logits over the prototypes), step 0 against the end")
    p.add_argument("overrides", nargs="*", help="config key=value overrides, as for dagman pretrain")
    args = p.parse_args(argv)
    if args.measure_on != "heldout" and not args.measure_only:
        p.error("--measure-on train measures a trained run: add --measure-only")
    work = Path(args.work)
    train_cache, held_cache, train_ids, held_id = work_and_split(work, args.cache, args.holdout,
                                                                 fresh=not args.measure_only)

    cfg = load_config(args.size, args.method, overrides=[f"data.cache={train_cache}", f"train.total_steps={args.steps}",
                                                         f"train.seed={args.seed}",
                                                         f"train.checkpoint_every_steps={args.steps}",
                                                         *args.overrides])
    info = DistInfo(0, 1, 0, torch.device("cpu"), False)
    path = work / "run" / "checkpoints" / "last.pt"
    if args.measure_only:
        ckpt = load_checkpoint(path)
        cfg = override_config(ckpt["config"], args.overrides)
        schedules = Schedules.from_config(cfg, plan_steps(cfg, len(train_ids)))
        state = build_state(cfg, info, schedules)
        restore_state(state, ckpt, path)
        on, where = ((held_cache, f"held-out learning measures ({held_id}") if args.measure_on == "heldout" else
                     (train_cache, f"learning measures on the TRAINING volumes ({len(train_ids)}"))
        extra = f"; with {' '.join(args.overrides)}" if args.overrides else ""
        print(f"{where}, {args.crops} crop pairs{extra}), {path} at step {state.step}:")
        measures = heldout_measures(state, on, args.crops, args.seed)
        print("\n".join(verdicts(measures)))
        _print_info(measures)
        if args.heads:
            _print_heads(head_geometry(build_state(cfg, info, schedules), on, args.crops, args.seed),
                         head_geometry(state, on, args.crops, args.seed), f"step {state.step}")
        return 0
    from dagman.train.probe import probe_set_for

    probe_set_for(cfg)  # refuse a mismatched probe set now, not after the step-0 measures
    schedules = Schedules.from_config(cfg, plan_steps(cfg, len(train_ids)))
    initial = build_state(cfg, info, schedules)
    heads_before = head_geometry(initial, held_cache, args.crops, args.seed) if args.heads else None
    before = heldout_measures(initial, held_cache, args.crops, args.seed)
    t0 = time.perf_counter()
    summary = pretrain(cfg, work / "run", progress=True)
    seconds = time.perf_counter() - t0
    state = build_state(cfg, info, schedules)
    restore_state(state, load_checkpoint(path), path)
    after = heldout_measures(state, held_cache, args.crops, args.seed)
    heads_after = head_geometry(state, held_cache, args.crops, args.seed) if args.heads else None
    result = {"method": args.method, "size": args.size, "steps": args.steps, "overrides": args.overrides,
              "train_volumes": train_ids, "heldout_volume": held_id, "heldout_crops": args.crops,
              "step0": before, "final": after, "train_seconds": seconds,
              "learning_monitor_last_steps": summary.get("learning", {}),
              "final_train_losses": {k: v for k, v in summary["final"].items() if k.startswith("loss")}}
    if args.heads:
        result["head_geometry"] = {"step0": heads_before, "final": heads_after}
    (work / "result.json").write_text(json.dumps(result, indent=2))
    print(f"held-out learning measures ({held_id}, {args.crops} crop pairs, fixed masks), "
          f"{args.method}/{args.size} {' '.join(args.overrides)}")
    for label, measures in (("step 0", before), (f"step {summary['steps']}", after)):
        print(label + ":")
        for line in verdicts(measures):
            print(line)
        _print_info(measures)
    if args.heads:
        _print_heads(heads_before, heads_after, f"step {summary['steps']}")
    if "l1" in after:
        print(f"masked L1 {before['l1']:.4f} -> {after['l1']:.4f}; mean-of-visible predictor {after['mean_predictor_l1']:.4f}")
    print(f"trained on {len(train_ids)} real CT volumes, {seconds:.0f} s on {torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    from dagman.errors import run_script

    sys.exit(run_script(main))
