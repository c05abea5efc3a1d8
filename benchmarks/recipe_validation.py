"""Validation measures for choosing a pretraining recipe, without looking at any evaluation set.

    python benchmarks/recipe_validation.py --probe probe-train.npz --nodules compare-out/nodules \\
        none RUN_A RUN_B ...            # 'none' = random init (of --size), a run folder or encoder file
    python benchmarks/recipe_validation.py --probe probe-train.npz --random-seeds 5 none   # init-noise floor
    python benchmarks/recipe_validation.py --nodules DIR --ft-fractions 0.25 -- RUN     # '--' after a list option
    python benchmarks/recipe_validation.py --probe probe-train.npz --probe-slab 20 none RUN   # + thin-series probe

Two instruments, both on data a recipe may be chosen on (DEVELOPERS.md: evaluation sets are looked at once
per recipe, never tuned on):

1. **Organ probe within the training patients** (``--probe``, a ``dagman data probe`` set built from
   *training* volumes, e.g. ``totalseg_abdomen`` vs ``totalseg_abdomen_crop``): the k-NN vote the trainer's
   ``train.probe`` runs (k = 20, balanced accuracy), on the mean of each stage's tokens (s0..s4) and on the
   SA [CLS] token (``sa``, encoders pretrained with an SA block); beside it the effective rank of each of
   those features over the probe's crops (RankMe; a falling rank is dimensional collapse); and k-means on the
   mean tokens of all the probe's crops against their organ labels (NMI, ARI: the twin of compare_methods'
   organ clustering). With ``--probe-slab N`` the probe runs a second time with its *test* crops thinned to a
   slab of N z planes (the rest 0, :func:`dagman.train.probe.thin_crops`): the padding a series of N slices gets
   when it is cut into crops of more planes, which is what every crop of a thin held-out series looks like (a
   20-slice series at 2 mm fills 20 of 32 planes). It asks whether the features still find the organ when the
   crop was not fully scanned, on training volumes.
2. **Nodule malignancy, training pool only** (``--nodules``, a ``dagman data nodules`` folder, e.g. the one
   ``compare_methods.py`` builds): ``compare_methods.py``'s fixed patient-grouped split is made, the held-out
   test nodules are dropped *before anything is encoded*, and ``dagman classify``'s cross-validation runs on
   the training pool alone: linear probe on frozen features (the mean of the last stage's tokens, and the
   SA [CLS] token of an encoder with an SA block) at ``--fractions`` and fine-tuning (compare_methods' protocol: 2 folds, 4 epochs, lr 1e-4)
   at ``--ft-fractions``. Reported: CV AUC, mean +- std over ``--seeds`` seeds.

Random init is drawn from torch seed 0 (as in compare_methods); ``--random-seeds N`` adds N-1 more random
draws (seeds 1..N-1), the spread a pretrained encoder has to clear before a difference means anything.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def encoder(ckpt: str, size: str, use_sa: bool | None, seed: int = 0):
    """compare_methods' task encoder of ``ckpt`` ('none': random init of ``size`` drawn from torch seed ``seed``),
    in eval mode; ``use_sa=None``: the SA [CLS] token when the weights have an SA block, else the mean tokens."""
    from compare_methods import open_encoder

    from dagman.tasks.encoder import open_encoder as encoder_source

    if use_sa is None:
        use_sa = ckpt != "none" and encoder_source(ckpt, size=size).sa is not None
    return open_encoder(ckpt, size, use_sa=use_sa, seed=seed).eval()


def organ_probe(enc, probe) -> dict[str, dict[str, float]]:
    """The trainer's probe (:func:`dagman.train.probe.probe_network`) on every stage's mean tokens (``s0``..``s4``)
    and the SA [CLS] token (``sa``, when the encoder has an SA block): ``"knn"``, the k-NN (k = 20) balanced
    accuracy of the probe set's test crops, and ``"rank"``, the effective rank of each feature over all its crops
    (of ``"dim"`` dimensions). ``probe``: a probe set or its file."""
    from dagman.train.probe import load_probe_set, probe_features, probe_scores

    probe = load_probe_set(probe) if isinstance(probe, (str, Path)) else probe
    feats = probe_features(enc, probe.inputs, stages=True)
    scores = probe_scores(feats, probe)
    # "mean" is s4 again; keep the stage names and "sa"
    out = {part: {k.removeprefix(f"probe/{part}_"): v for k, v in scores.items()
                  if k.startswith(f"probe/{part}_") and k != f"probe/{part}_mean"}
           for part in ("knn", "rank", "dim")}
    out["kmeans"] = probe_kmeans(feats["mean"], probe)
    return out


def probe_kmeans(x: np.ndarray, probe, seeds: int = 3) -> dict[str, dict[str, float]]:
    """The validation twin of compare_methods' organ clustering: k-means (k = the probe's classes, standardised
    features, :func:`dagman.tasks.cluster.kmeans_labels`) on ``x``, the mean last-stage tokens of *all* the probe's
    crops (both training volumes), scored against their organ labels (:func:`dagman.tasks.cluster.kmeans_agreement`);
    NMI and ARI, mean +- std over ``seeds`` k-means seeds."""
    from dagman.tasks.cluster import kmeans_agreement

    per_seed = np.array([kmeans_agreement(x, probe.class_ids, len(probe.class_names), s) for s in range(seeds)])
    return {k: {"mean": float(per_seed[:, j].mean()), "std": float(per_seed[:, j].std())}
            for j, k in enumerate(("nmi", "ari"))}


def training_pool(nodules: Path, crop_size: int = 32):
    """compare_methods' nodule split (:func:`compare_methods.split_nodules`) with the test nodules removed before
    any input is read: the training pool as a cohort with its inputs loaded, and how many test nodules were left
    out."""
    import dataclasses

    from compare_methods import split_nodules

    from dagman.tasks.classify import cohort_from_table, load_inputs, read_label_table

    cohort = cohort_from_table(read_label_table(nodules / "labels.csv"))
    keep, test = split_nodules(cohort)
    images = [cohort.images[i] for i in keep]
    pool = dataclasses.replace(cohort, images=images, groups=cohort.groups[keep], labels=cohort.labels[keep],
                               fold=None, inputs=load_inputs(images, 1.0, (-750.0, 1750.0), crop_size, progress=False))
    return pool, int(len(test))


def nodule_cv(ckpt: str, size: str, pool, fractions, ft_fractions, seeds: int, seed: int = 0,
              ft_features: str = "mean") -> dict[str, dict]:
    """CV AUC on the training pool: ``lp-mean@f``, ``lp-sa@f`` (encoders with an SA block) and ``ft@f`` (the
    fine-tuned head on the mean of the last stage's tokens, or on the SA [CLS] token with ``ft_features="sa"``)."""
    import torch

    from dagman.tasks.classify import Protocol, encode, run_classification

    out: dict[str, dict] = {}

    def record(key, res):
        aucs = [r["cv"]["auc"] for r in res["per_seed"]]
        out[key] = {"mean": float(np.mean(aucs)), "std": float(np.std(aucs, ddof=1)) if len(aucs) > 1 else 0.0}

    mean, sa = encoder(ckpt, size, False, seed), encoder(ckpt, size, None, seed)
    for name, enc in (("mean", mean), ("sa", sa if sa.sa is not None else None)):
        if enc is None:
            continue
        feats = encode(enc, pool.inputs, progress=False)
        for f in fractions:
            proto = Protocol(mode="lp", fraction=f, folds=3, seeds=seeds, seed=0, n_boot=200)
            record(f"lp-{name}@{f}", run_classification(pool, enc, proto, features=feats, progress=False))
    enc = sa if ft_features == "sa" else mean  # run_classification fine-tunes a copy: the encoder stays as built
    for f in ft_fractions:
        torch.manual_seed(0)
        proto = Protocol(mode="ft", fraction=f, folds=2, seeds=seeds, seed=0, n_boot=200, epochs=4, lr=1e-4,
                         batch_size=16)
        record(f"ft@{f}", run_classification(pool, enc, proto, progress=False))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("checkpoints", nargs="+", help="run folders, encoder files, or 'none' (random init)")
    p.add_argument("--size", default="cpu", help="architecture of random init (default cpu)")
    p.add_argument("--probe", help="organ probe set (.npz) built from TRAINING volumes")
    p.add_argument("--probe-slab", type=int, metavar="N",
                   help="also run the probe with its test crops thinned to N z planes (the rest 0): a thin series")
    p.add_argument("--probe-slab-train", action="store_true",
                   help="with --probe-slab: thin the probe's training crops too (matched padding)")
    p.add_argument("--nodules", type=Path, help="a `dagman data nodules` folder (its test split is never read)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.25, 1.0])
    p.add_argument("--ft-fractions", type=float, nargs="+", default=[0.05, 0.25])
    p.add_argument("--ft-features", choices=["mean", "sa"], default="mean",
                   help="fine-tuned head on the mean of the last stage's tokens (default, as compare_methods) or on "
                        "the SA [CLS] token (sa: encoders with an SA block)")
    p.add_argument("--seeds", type=int, default=3, help="CV seeds (default 3)")
    p.add_argument("--random-seeds", type=int, default=1, help="random-init draws for 'none' (default 1)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, help="also write every number here")
    args = p.parse_args(argv)
    if not args.probe and not args.nodules:
        p.error("give --probe, --nodules or both")
    if args.probe_slab is not None and not args.probe:
        p.error("--probe-slab thins the test crops of --probe: give --probe too")
    if args.probe_slab_train and not args.probe_slab:
        p.error("--probe-slab-train needs --probe-slab N")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    probe = thin = None
    if args.probe:
        from dagman.errors import DataError
        from dagman.train.probe import load_probe_set, thin_crops

        probe = load_probe_set(args.probe)
        try:
            thin = thin_crops(probe, args.probe_slab, train_too=args.probe_slab_train) if args.probe_slab else None
        except DataError as err:
            p.error(f"--probe-slab {args.probe_slab}: {err}")
    pool = None
    if args.nodules:
        pool, dropped = training_pool(args.nodules)
        print(f"nodule training pool: {len(pool.labels)} nodules ({int(pool.labels.sum())} malignant); "
              f"{dropped} test nodules left out unread", flush=True)
    rows = []
    for ckpt in args.checkpoints:
        for seed in range(args.random_seeds if ckpt == "none" else 1):
            name = ckpt if ckpt != "none" else f"random init (seed {seed})"
            row: dict = {"encoder": name}
            if args.probe:
                enc = encoder(ckpt, args.size, None, seed)
                row["probe"] = organ_probe(enc, probe)
                knn, rank, dim = row["probe"]["knn"], row["probe"]["rank"], row["probe"]["dim"]
                print(name, "probe k-NN20:", " ".join(f"{k} {v:.3f}" for k, v in knn.items()), flush=True)
                print(name, "effective rank:", " ".join(f"{k} {rank[k]:.1f}/{dim[k]:.0f}" for k in rank), flush=True)
                km = row["probe"]["kmeans"]
                print(name, "probe k-means (mean tokens):", " ".join(f"{k.upper()} {v['mean']:.3f}±{v['std']:.3f}"
                                                                  for k, v in km.items()), flush=True)
                if thin is not None:
                    row["probe_slab"] = {"planes": args.probe_slab, "train_too": args.probe_slab_train,
                                         **organ_probe(enc, thin)}
                    print(name, f"probe k-NN20, {'all' if args.probe_slab_train else 'test'} crops thinned to "
                          f"{args.probe_slab} z planes:",
                          " ".join(f"{k} {v:.3f}" for k, v in row["probe_slab"]["knn"].items()), flush=True)
            if pool is not None:
                row["nodules_cv"] = nodule_cv(ckpt, args.size, pool, args.fractions, args.ft_fractions, args.seeds,
                                              seed, args.ft_features)
                print(name, "nodule CV AUC:", " ".join(f"{k} {v['mean']:.3f}±{v['std']:.3f}"
                                                       for k, v in row["nodules_cv"].items()), flush=True)
            rows.append(row)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
