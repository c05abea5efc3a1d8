"""`dagman classify` and its library (dagman.tasks.classify) on SYNTHETIC 32^3 NIfTI crops whose label is set
by the image content: a bright (positive) or dark (negative) blob in air-like noise."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from matplotlib.image import imread

import dagman.tasks.classify as classify
from dagman.cli import main as cli_main
from dagman.errors import DataError
from dagman.tasks.classify import (Protocol, cohort_from_table, encode, load_inputs, parse_binary_labels,
                                   read_label_table, run_classification)
from dagman.tasks.encoder import build_task_encoder

SIZE = 32
METRIC_KEYS = {"task", "checkpoint", "feature_source", "mode", "fraction", "folds", "seeds", "n", "label_balance",
               "cv", "test", "timing", "across_seeds", "per_seed", "protocol", "roc", "input", "labels_csv"}
CV_KEYS = {"auc", "auc_ci", "sensitivity", "sensitivity_ci", "specificity", "specificity_ci", "fold_aucs",
           "fold_auc_mean", "fold_auc_std", "folds", "n", "positives"}


def write_blobs(root, n=36, seed=0, names=("0", "1"), extra_cols=True):
    """``n`` SYNTHETIC CTs (HU, 1 mm): a blob of radius 4-7 mm, +150 HU (label names[1]) or -450 HU (names[0]),
    in -800 HU noise; two crops per patient with independent labels. Returns the CSV path."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ax = np.arange(SIZE) - (SIZE - 1) / 2
    r2 = ax[:, None, None] ** 2 + ax[None, :, None] ** 2 + ax[None, None, :] ** 2
    rows = []
    for i in range(n):
        label = int(rng.random() < 0.45) if i >= 4 else i % 2
        hu = rng.normal(-800, 40, (SIZE,) * 3)
        blob = r2 < rng.uniform(4, 7) ** 2
        hu[blob] = (150 if label else -450) + rng.normal(0, 40, int(blob.sum()))
        nib.save(nib.Nifti1Image(hu.astype(np.float32), np.eye(4)), str(root / f"crop{i:03d}.nii.gz"))
        row = {"image": f"crop{i:03d}.nii.gz", "mask": "", "label": names[label], "patient": f"P{i // 2}"}
        if extra_cols:
            row["diameter_mm"] = "8.0"
        rows.append(row)
    path = root / "labels.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    root = tmp_path_factory.mktemp("blobs")
    csv_path = write_blobs(root / "train", 36, seed=0)
    test_path = write_blobs(root / "test", 16, seed=1)
    cohort = cohort_from_table(read_label_table(csv_path))
    cohort.inputs = load_inputs(cohort.images, 1.0, (-1000.0, 400.0), SIZE, progress=False)
    test = cohort_from_table(read_label_table(test_path))
    test.inputs = load_inputs(test.images, 1.0, (-1000.0, 400.0), SIZE, progress=False)
    torch.manual_seed(0)
    encoder = build_task_encoder("none", size="tiny")
    return {"root": root, "csv": csv_path, "test_csv": test_path, "cohort": cohort, "test": test, "encoder": encoder}


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
    """A tiny dagman run pretrained for 2 steps on a SYNTHETIC cache (has an SA block)."""
    from dagman.config import load_config
    from dagman.data.views import make_synthetic_cache
    from dagman.train.loop import pretrain

    root = tmp_path_factory.mktemp("pre")
    cache = make_synthetic_cache(root / "cache", n_volumes=2, shape=(64, 64, 64))
    cfg = load_config("tiny", "dagman", overrides=[f"data.cache={cache}", "train.total_steps=2", "data.batch_size=1",
                                                   "heads.num_prototypes=64", "heads.hidden_dim=32",
                                                   "heads.bottleneck_dim=16"])
    pretrain(cfg, root / "run", progress=False)
    return root / "run"


def test_input_loading_and_label_parsing(blobs):
    c = blobs["cohort"]
    assert c.inputs.shape == (36, SIZE, SIZE, SIZE) and c.inputs.dtype == np.float32
    assert 0.0 <= c.inputs.min() and c.inputs.max() <= 1.0
    assert c.has_patients and c.n_patients == 18 and c.fold is None
    # the blob is brighter for label 1 at the crop centre
    centre = c.inputs[:, 14:18, 14:18, 14:18].mean((1, 2, 3))
    assert centre[c.labels == 1].min() > centre[c.labels == 0].max()


def test_parse_binary_labels():
    y, names = parse_binary_labels(["0", "1.0", "1", "0"], "t.csv")
    assert y.tolist() == [0, 1, 1, 0] and names == ("0", "1")
    y, names = parse_binary_labels(["malignant", "benign", "benign"], "t.csv")
    assert y.tolist() == [1, 0, 0] and names == ("benign", "malignant")
    y, names = parse_binary_labels(["yes", "no"], "t.csv", positive="no")
    assert y.tolist() == [0, 1] and names == ("yes", "no")
    y, names = parse_binary_labels(["2", "10", "2"], "t.csv")  # numeric order, not string order
    assert y.tolist() == [0, 1, 0] and names == ("2", "10")
    y, _ = parse_binary_labels(["benign", "malignant"], "test.csv", class_names=("benign", "malignant"))
    assert y.tolist() == [0, 1]
    with pytest.raises(DataError, match="AUC needs both classes: all 3 rows have label 1"):
        parse_binary_labels(["1", "1", "1"], "t.csv")
    with pytest.raises(DataError, match="two classes, found 3: 1, 2, 3"):
        parse_binary_labels(["1", "2", "3"], "t.csv")
    with pytest.raises(DataError, match="line 3: empty 'label' cell"):
        parse_binary_labels(["1", ""], "t.csv")
    with pytest.raises(DataError, match="'maybe' is not one of the training classes"):
        parse_binary_labels(["benign", "maybe"], "test.csv", class_names=("benign", "malignant"))
    with pytest.raises(DataError, match="positive 'x' is not one of"):
        parse_binary_labels(["a", "b"], "t.csv", positive="x")


def test_linear_probe_on_random_init_separates_bright_from_dark(blobs):
    c = blobs["cohort"]
    r = run_classification(c, blobs["encoder"], Protocol(mode="lp", folds=3, n_boot=200), progress=False)
    cv = r["cv"]
    assert cv["auc"] > 0.9, cv["auc"]
    assert cv["auc_ci"][0] <= cv["auc"] <= cv["auc_ci"][1]
    assert len(cv["fold_aucs"]) == 3 and all(a > 0.75 for a in cv["fold_aucs"])
    assert cv["fold_auc_mean"] == pytest.approx(np.mean(cv["fold_aucs"]))
    assert r["feature_source"] == "mean of the last stage's tokens"
    assert r["checkpoint"] == "random init (tiny architecture)"
    assert r["label_balance"]["positives"] == int(c.labels.sum())
    # every row scored exactly once, out of fold; patients never split across folds
    preds = r["_predictions"]
    assert sorted(p["row"] for p in preds) == list(range(len(c)))
    fold_of = {}
    for p in preds:
        assert fold_of.setdefault(p["patient"], p["fold"]) == p["fold"]
    # pooled AUC recomputed from the predictions
    from sklearn.metrics import roc_auc_score

    assert cv["auc"] == pytest.approx(roc_auc_score([p["label"] for p in preds], [p["score"] for p in preds]))
    sens = np.mean([p["called"] for p in preds if p["label"] == 1])
    assert cv["sensitivity"] == pytest.approx(sens)


def test_threshold_and_model_choice_come_from_the_validation_part(blobs, monkeypatch):
    c = blobs["cohort"]
    parts_seen, youden_calls = [], []
    from dagman.tasks import cv

    real_parts, real_youden = cv.fold_parts, classify.threshold_at_youden

    def spy_parts(*a, **k):
        parts = real_parts(*a, **k)
        parts_seen.append(parts)
        return parts

    def spy_youden(y, score):
        youden_calls.append((np.asarray(y).copy(), np.asarray(score).copy()))
        return real_youden(y, score)

    monkeypatch.setattr(cv, "fold_parts", spy_parts)
    monkeypatch.setattr(classify, "threshold_at_youden", spy_youden)
    r = run_classification(c, blobs["encoder"], Protocol(fraction=0.5, n_boot=50), progress=False)
    assert len(parts_seen) == len(youden_calls) == 3
    for parts, (y, score), info in zip(parts_seen, youden_calls, r["cv"]["folds"]):
        assert set(parts) == {"train", "val", "test"}
        # the threshold was chosen on exactly the validation rows, disjoint from the test fold and from train
        np.testing.assert_array_equal(y, c.labels[parts["val"]])
        assert np.intersect1d(parts["val"], parts["test"]).size == 0
        assert np.intersect1d(parts["val"], parts["train"]).size == 0
        assert not set(c.groups[parts["val"]]) & set(c.groups[parts["test"]])
        assert info["threshold"] == real_youden(y, score)
        assert info["n_val"] == len(y) and info["n_test"] == len(parts["test"])
        # 50% of the training folds' patients: train + val are about half of the other folds
        others = len(c) - len(parts["test"])
        assert 0.3 * others <= info["n_train"] + info["n_val"] <= 0.7 * others
    oof_thr = {p["fold"]: p["threshold"] for p in r["_predictions"]}
    assert [oof_thr[f] for f in range(3)] == [fi["threshold"] for fi in r["cv"]["folds"]]


def test_precomputed_features_give_the_same_result(blobs):
    c, enc = blobs["cohort"], blobs["encoder"]
    feats = encode(enc, c.inputs, progress=False)
    assert feats.shape == (36, enc.feature_dim)
    p = Protocol(n_boot=100, fraction=0.5)
    a = run_classification(c, enc, p, progress=False)
    b = run_classification(c, None, p, features=feats, progress=False)
    assert a["cv"]["auc"] == pytest.approx(b["cv"]["auc"], abs=1e-6)
    assert [f["C"] for f in a["cv"]["folds"]] == [f["C"] for f in b["cv"]["folds"]]
    assert b["checkpoint"] == "precomputed features"
    with pytest.raises(DataError, match="5 feature rows for 36 table rows"):
        run_classification(c, None, p, features=feats[:5], progress=False)


def test_seeds_and_held_out_test_set(blobs):
    c, t = blobs["cohort"], blobs["test"]
    r = run_classification(c, blobs["encoder"], Protocol(seeds=2, seed=3, n_boot=100), test=t, progress=False)
    assert r["seeds"] == [3, 4]
    per = [s["cv"]["auc"] for s in r["per_seed"]]
    acr = r["across_seeds"]["cv"]["auc"]
    assert acr["values"] == per and acr["mean"] == pytest.approx(np.mean(per))
    assert acr["std"] == pytest.approx(np.std(per, ddof=1))
    assert r["test"]["n"] == 16 and r["test"]["models"] == 3 and r["test"]["auc"] > 0.9
    assert r["test"]["threshold"] == pytest.approx(np.mean([f["threshold"] for f in r["cv"]["folds"]]))
    assert len(r["_test_predictions"]) == 2 * 16 and len(r["_predictions"]) == 2 * 36
    assert "test" in r["across_seeds"]


def test_fine_tune_mode_trains_a_copy_and_picks_an_epoch(blobs):
    c, enc = blobs["cohort"], blobs["encoder"]
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    r = run_classification(c, enc, Protocol(mode="ft", epochs=2, batch_size=6, lr=3e-4, n_boot=50),
                           progress=False)
    assert r["mode"] == "ft"
    for fi in r["cv"]["folds"]:
        assert fi["best_epoch"] in (1, 2) and 0.0 <= fi["val_auc"] <= 1.0
    assert 0.0 <= r["cv"]["auc"] <= 1.0 and np.isfinite(r["cv"]["auc"])
    for k, v in enc.state_dict().items():  # the caller's encoder is untouched
        assert torch.equal(v, before[k]), k


def test_fine_tune_skips_and_counts_non_finite_batches_and_keeps_finite_weights(blobs):
    c, enc = blobs["cohort"], blobs["encoder"]
    x = c.inputs.astype(np.float32)
    y = torch.tensor(c.labels, dtype=torch.float32)
    calls = [0]

    def loss_fn(out, rows):
        calls[0] += 1
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out, y[rows])
        if calls[0] == 1:
            return loss * float("nan")  # non-finite loss
        if calls[0] == 2:  # finite loss, infinite gradient
            return loss + torch.sqrt(out - out.detach()).sum()
        return loss

    net, fit = classify.fine_tune(enc, x[:24], x[24:], loss_fn, lambda o: float(np.mean(o)),
                                  Protocol(mode="ft", epochs=1, batch_size=6, lr=3e-4), seed=0, progress=False)
    assert fit["skipped_steps"] == 2 and calls[0] == 4
    assert all(torch.isfinite(v).all() for v in net.state_dict().values() if v.is_floating_point())


def test_fold_column_is_used(tmp_path):
    path = write_blobs(tmp_path, 12, seed=3, extra_cols=False)
    rows = list(csv.DictReader(open(path)))
    # fold by patient: P0,P1 -> 0; P2,P3 -> 1; P4,P5 -> 2
    for r in rows:
        r["fold"] = str(int(r["patient"][1:]) // 2)
        r["label"] = "1" if int(r["image"][4:7]) % 2 else "0"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    c = cohort_from_table(read_label_table(path))
    np.testing.assert_array_equal(c.fold, [int(r["fold"]) for r in rows])
    c.inputs = load_inputs(c.images, 1.0, (-1000.0, 400.0), SIZE, progress=False)
    r = run_classification(c, build_task_encoder("none"), Protocol(folds=5, n_boot=20), progress=False)
    assert r["folds"] == 3 and r["fold_source"].startswith("the table's fold column")
    assert [p["fold"] for p in r["_predictions"]] == [int(x["fold"]) for x in rows]


def test_cli_end_to_end_with_a_pretrained_run(blobs, pretrained_run, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli_main(["classify", "--labels", str(blobs["csv"]), "--checkpoint", str(pretrained_run), "--spacing", "1",
                   "--crop-size", "32", "--fraction", "0.5", "--n-boot", "100", "--test", str(blobs["test_csv"]),
                   "--features", "sa", "--out", str(out)])  # the SA [CLS] token on request (default: mean tokens)
    assert rc == 0
    text = capsys.readouterr().out
    last = text.strip().splitlines()[-1]
    assert last.startswith("dagman classify: AUC ")
    assert "(3-fold CV, lp, 50% of training folds, SA [CLS] token (stage 3))" in last
    assert last.endswith(f"-> {out / 'metrics.json'}")
    m = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= set(m), METRIC_KEYS - set(m)
    assert CV_KEYS <= set(m["cv"])
    assert m["task"] == "classify" and m["mode"] == "lp" and m["fraction"] == 0.5 and m["folds"] == 3
    assert m["feature_source"] == "SA [CLS] token (stage 3)" and "dagman" in m["checkpoint"]
    assert m["n"] == 36 and m["seeds"] == [0]
    assert m["input"] == {"spacing_mm": 1.0, "hu_window": [-750.0, 1750.0], "crop_size": 32}
    assert m["test"]["n"] == 16 and set(m["test"]) >= {"auc", "auc_ci", "sensitivity", "specificity"}
    assert f"AUC {m['cv']['auc']:.3f} [{m['cv']['auc_ci'][0]:.2f}, {m['cv']['auc_ci'][1]:.2f}]" in last
    assert set(m["timing"]) == {"features_s", "fit_s", "total_s"}
    with open(out / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 36
    assert {"row", "patient", "label", "fold", "score"} <= set(rows[0])
    assert len(list(csv.DictReader(open(out / "test_predictions.csv")))) == 16
    img = imread(str(out / "roc.png"))
    assert img.shape[0] > 300 and img.shape[1] > 300


def test_cli_string_labels_name_the_positive_class(tmp_path, capsys):
    path = write_blobs(tmp_path, 18, seed=5, names=("benign", "malignant"))
    out = tmp_path / "out"
    rc = cli_main(["classify", "--labels", str(path), "--checkpoint", "none", "--spacing", "1", "--crop-size", "32",
                   "--hu-window", "-1000", "400", "--n-boot", "20", "--out", str(out)])
    assert rc == 0
    assert "positive = 'malignant'" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    assert m["label_balance"]["positive_label"] == "malignant" and m["label_balance"]["negative_label"] == "benign"
    assert m["checkpoint"] == "random init (tiny architecture)"


def _error(capsys, argv):
    rc = cli_main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_cli_errors_are_one_line(blobs, tmp_path, capsys):
    csv_path = blobs["csv"]
    base = ["--checkpoint", "none", "--spacing", "1", "--crop-size", "32", "--out", str(tmp_path / "o")]
    err = _error(capsys, ["classify", "--labels", str(tmp_path / "nope.csv"), *base])
    assert "nope.csv: no such label table" in err

    no_label = tmp_path / "no_label.csv"
    no_label.write_text("image,patient\ncrop000.nii.gz,P0\n")
    err = _error(capsys, ["classify", "--labels", str(no_label), *base])
    assert "missing column(s) 'label'" in err and "has: image, patient" in err

    (tmp_path / "missing").mkdir()
    missing = tmp_path / "missing" / "labels.csv"
    missing.write_text(f"image,label\n{blobs['cohort'].images[0]},0\nghost.nii.gz,1\n")
    err = _error(capsys, ["classify", "--labels", str(missing), *base])
    assert "line 3: image ghost.nii.gz not found" in err

    one = tmp_path / "one.csv"
    one.write_text("image,label\n" + "".join(f"{p},1\n" for p in blobs["cohort"].images[:5]))
    err = _error(capsys, ["classify", "--labels", str(one), *base])
    assert err.endswith("AUC needs both classes: all 5 rows have label 1")

    few = tmp_path / "few.csv"
    imgs = blobs["cohort"].images
    few.write_text("image,label\n" + "".join(f"{p},{int(i < 2)}\n" for i, p in enumerate(imgs[:10])))
    err = _error(capsys, ["classify", "--labels", str(few), *base])
    assert "too few samples per class for 3-fold CV: label 1 has 2 sample(s); need at least 3" in err

    err = _error(capsys, ["classify", "--labels", str(csv_path), *base, "--fraction", "1.5"])
    assert "--fraction must be in (0, 1]" in err

    err = _error(capsys, ["classify", "--labels", str(csv_path), "--checkpoint", str(csv_path), "--out", str(tmp_path)])
    assert "unknown checkpoint format" in err

    err = _error(capsys, ["classify", "--labels", str(csv_path), "--checkpoint", "none", "--crop-size", "40",
                          "--out", str(tmp_path)])
    assert "--crop-size 40 must be a positive multiple of 32" in err

    err = _error(capsys, ["classify", "--labels", str(csv_path), *base, "--test", str(one)])
    assert "AUC needs both classes" in err


def test_reference_rows_use_the_same_folds_and_see_size_and_shape(tmp_path, capsys):
    """diameter_mm equal to the label's blob size class: the diameter-only reference separates perfectly; masks
    that are the blobs themselves: the shape-only reference sees their size too. SYNTHETIC crops."""
    from dagman.tasks.classify import reference_rows

    root = tmp_path / "ref"
    path = write_blobs(root, 24, seed=3)
    rows = list(csv.DictReader(open(path)))
    for i, r in enumerate(rows):
        big = r["label"] == "1"
        r["diameter_mm"] = str(12.0 + i * 0.01 if big else 6.0 + i * 0.01)
        m = np.zeros((SIZE,) * 3, np.uint8)
        c, rad = SIZE // 2, (6 if big else 3)
        m[c - rad:c + rad, c - rad:c + rad, c - rad:c + rad] = 1
        nib.save(nib.Nifti1Image(m, np.eye(4)), str(root / f"mask{i:03d}.nii.gz"))
        r["mask"] = f"mask{i:03d}.nii.gz"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    table = read_label_table(path)
    cohort = cohort_from_table(table)
    refs = reference_rows(cohort, table, Protocol(folds=3, n_boot=100))
    assert set(refs) == {"diameter-only", "shape-only"}
    assert refs["diameter-only"]["cv"]["auc"] == 1.0 and refs["shape-only"]["cv"]["auc"] == 1.0
    assert refs["diameter-only"]["cv"]["n"] == len(rows)
    out = tmp_path / "out"
    assert cli_main(["classify", "--labels", str(path), "--checkpoint", "none", "--spacing", "1", "--crop-size", "32",
                 "--n-boot", "100", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "reference diameter-only (logistic regression on the diameter_mm column): CV AUC 1.000" in printed
    assert "reference shape-only" in printed
    m = json.loads((out / "metrics.json").read_text())
    assert m["references"]["diameter-only"]["cv"]["auc"] == 1.0
    # the blobs table of the other tests has empty mask cells: no shape reference, and nothing breaks
    assert set(reference_rows(cohort_from_table(read_label_table(write_blobs(tmp_path / "b", 12))),
                              read_label_table(tmp_path / "b" / "labels.csv"), Protocol(folds=2, n_boot=50))) == {
        "diameter-only"}
