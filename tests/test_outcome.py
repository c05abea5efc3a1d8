"""`dagman outcome` and dagman.tasks.outcome: the Cox partial likelihood, the Cox fit, Kaplan-Meier and log-rank
against lifelines, and the time-to-event / binary pipelines on SYNTHETIC 32^3 NIfTI crops whose blob brightness
sets the hazard."""

from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from matplotlib.image import imread

from dagman.cli import main as cli_main
from dagman.errors import DataError
from dagman.tasks.classify import cohort_from_table, load_inputs, read_label_table
from dagman.tasks.encoder import build_task_encoder
from dagman.tasks.outcome import (SurvivalProtocol, cox_partial_log_likelihood, fit_cox, kaplan_meier, logrank_test,
                                  read_survival_columns, run_survival, survival_at)

SIZE = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


def write_survival_set(root, n=45, seed=0, binary=False):
    """SYNTHETIC CTs (HU, 1 mm): a blob whose brightness b in [0, 1] sets the hazard exp(3 b); exponential event
    times, independent exponential censoring. With ``binary`` also a ``label`` column (event before time 1.5).
    Returns the CSV path."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ax = np.arange(SIZE) - (SIZE - 1) / 2
    blob = (ax[:, None, None] ** 2 + ax[None, :, None] ** 2 + ax[None, None, :] ** 2) < 5.5**2
    rows = []
    for i in range(n):
        b = rng.uniform(0, 1)
        hu = rng.normal(-800, 40, (SIZE,) * 3)
        hu[blob] = -500 + 700 * b + rng.normal(0, 30, int(blob.sum()))
        nib.save(nib.Nifti1Image(hu.astype(np.float32), np.eye(4)), str(root / f"s{i:03d}.nii.gz"))
        t_event = rng.exponential(1.0 / math.exp(3.0 * b)) * 10
        t_cens = rng.exponential(6.0)
        row = {"image": f"s{i:03d}.nii.gz", "patient": f"Q{i}"}
        row.update({"time": round(min(t_event, t_cens), 4), "event": int(t_event <= t_cens)})
        if binary:
            row["label"] = int(t_event < 1.5)
        rows.append(row)
    path = root / "labels.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def surv(tmp_path_factory):
    root = tmp_path_factory.mktemp("surv")
    path = write_survival_set(root / "train", 45, seed=0)
    table = read_label_table(path)
    cohort = cohort_from_table(table, label_col=None)
    cohort.time, cohort.event = read_survival_columns(table)
    cohort.inputs = load_inputs(cohort.images, 1.0, (-1000.0, 400.0), SIZE, progress=False)
    torch.manual_seed(0)
    return {"root": root, "csv": path, "cohort": cohort, "encoder": build_task_encoder("none")}


# ----------------------------------------------------------------------------------------------------------
# Cox model, KM, log-rank against brute force and lifelines
# ----------------------------------------------------------------------------------------------------------


def _brute_breslow(risk, time, event):
    total = 0.0
    for i in range(len(time)):
        if event[i]:
            total += risk[i] - math.log(sum(math.exp(risk[j]) for j in range(len(time)) if time[j] >= time[i]))
    return total


def test_cox_partial_likelihood_matches_brute_force_with_ties():
    rng = np.random.default_rng(0)
    time = rng.integers(1, 8, 40).astype(float)  # many ties
    event = (rng.random(40) < 0.6).astype(int)
    risk = rng.normal(0, 1, 40)
    got = float(cox_partial_log_likelihood(torch.from_numpy(risk), time, event))
    assert got == pytest.approx(_brute_breslow(risk, time, event), rel=1e-10)
    # a hand-sized case: times 1, 2, 2, 3; events 1, 1, 1, 0; risks 0, ln 2, 0, ln 3
    r = np.log([1.0, 2.0, 1.0, 3.0])
    hand = (0 - math.log(7)) + (math.log(2) - math.log(6)) + (0 - math.log(6))
    assert float(cox_partial_log_likelihood(torch.from_numpy(r), [1, 2, 2, 3], [1, 1, 1, 0])) == pytest.approx(hand)
    # differentiable
    rt = torch.from_numpy(risk).requires_grad_()
    cox_partial_log_likelihood(rt, time, event).backward()
    assert torch.isfinite(rt.grad).all() and rt.grad.abs().sum() > 0


@pytest.mark.parametrize("seed", [0, 1])
def test_fit_cox_matches_lifelines(seed):
    from lifelines import CoxPHFitter
    import pandas as pd

    rng = np.random.default_rng(seed)
    n = 150
    x = rng.normal(0, 1, (n, 2))
    t_event = rng.exponential(1.0 / np.exp(0.8 * x[:, 0] - 0.5 * x[:, 1]))
    t_cens = rng.exponential(2.0, n)
    time, event = np.minimum(t_event, t_cens), (t_event <= t_cens).astype(int)  # continuous: no ties
    ref = CoxPHFitter(penalizer=0.0).fit(pd.DataFrame({"x0": x[:, 0], "x1": x[:, 1], "T": time, "E": event}),
                                         "T", "E")
    beta = fit_cox(x, time, event, l2=0.0)
    np.testing.assert_allclose(beta, ref.params_.values, rtol=1e-4, atol=1e-5)
    # 1-D
    ref1 = CoxPHFitter(penalizer=0.0).fit(pd.DataFrame({"x0": x[:, 0], "T": time, "E": event}), "T", "E")
    assert fit_cox(x[:, :1], time, event)[0] == pytest.approx(ref1.params_.values[0], rel=1e-4)
    # the L2 penalty shrinks
    assert abs(fit_cox(x[:, :1], time, event, l2=1.0)[0]) < abs(ref1.params_.values[0])


def test_kaplan_meier_matches_lifelines():
    from lifelines import KaplanMeierFitter

    rng = np.random.default_rng(3)
    time = rng.integers(1, 30, 80).astype(float)
    event = (rng.random(80) < 0.7).astype(int)
    km = kaplan_meier(time, event)
    ref = KaplanMeierFitter().fit(time, event)
    timeline = ref.survival_function_.index.values
    np.testing.assert_allclose(survival_at(km, timeline), ref.survival_function_.values[:, 0], atol=1e-12)
    assert km["median"] == ref.median_survival_time_
    assert km["at_risk"][0] == 80 and km["survival"][0] == 1.0
    assert kaplan_meier([1.0, 2.0], [0, 0])["median"] is None
    # by hand: times 1 2 2 3 4 (events 1 1 0 1 0): at risk 5, 4, 2 at the event times 1, 2, 3
    hand = kaplan_meier([1, 2, 2, 3, 4], [1, 1, 0, 1, 0])
    assert hand["time"].tolist() == [0, 1, 2, 3] and hand["at_risk"].tolist() == [5, 5, 4, 2]
    assert hand["events"].tolist() == [0, 1, 1, 1]
    np.testing.assert_allclose(hand["survival"], [1, 4 / 5, 4 / 5 * 3 / 4, 4 / 5 * 3 / 4 * 1 / 2])
    assert hand["median"] == 3.0 and hand["censored_times"].tolist() == [2, 4]


def test_logrank_matches_lifelines():
    from lifelines.statistics import logrank_test as ll_logrank

    rng = np.random.default_rng(4)
    time = np.r_[rng.exponential(1.0, 40), rng.exponential(1.8, 35)].round(2)
    event = (rng.random(75) < 0.75).astype(int)
    group = np.r_[np.ones(40, bool), np.zeros(35, bool)]
    stat, p = logrank_test(time, event, group)
    ref = ll_logrank(time[group], time[~group], event[group], event[~group])
    assert stat == pytest.approx(ref.test_statistic, rel=1e-9)
    assert p == pytest.approx(ref.p_value, rel=1e-9)
    assert all(math.isnan(v) for v in logrank_test(time, event, np.ones(75, bool)))
    # by hand: group A times 1, 3 (events), group B times 2 (event), 4 (censored). At t=1: n=4, n_A=2, d=1, d_A=1;
    # t=2: n=3, n_A=1, d=1, d_A=0; t=3: n=2, n_A=1, d=1, d_A=1. O-E = (1-1/2) + (0-1/3) + (1-1/2) = 2/3;
    # V = 1/4 + 2/9 + 1/4 = 13/18; chi2 = (4/9) / (13/18) = 8/13
    stat, _ = logrank_test([1, 3, 2, 4], [1, 1, 1, 0], [1, 1, 0, 0])
    assert stat == pytest.approx(8 / 13, rel=1e-12)


def test_survival_columns_errors(tmp_path):
    def table(text):
        p = tmp_path / "t.csv"
        p.write_text(text)
        return read_label_table(p)

    t, e = read_survival_columns(table("image,time,event\na,1.5,1\nb,3,0\n"))
    assert t.tolist() == [1.5, 3.0] and e.tolist() == [1, 0]
    with pytest.raises(DataError, match="line 3: negative 'time' -2"):
        read_survival_columns(table("image,time,event\na,1,1\nb,-2,0\n"))
    with pytest.raises(DataError, match="line 2: 'event' must be 0 \\(censored\\) or 1 \\(event\\), got '2'"):
        read_survival_columns(table("image,time,event\na,1,2\n"))
    with pytest.raises(DataError, match="no events: all 2 rows are censored"):
        read_survival_columns(table("image,time,event\na,1,0\nb,2,0\n"))
    with pytest.raises(DataError, match="'time' must be a number, got 'soon'"):
        read_survival_columns(table("image,time,event\na,soon,1\n"))
    with pytest.raises(DataError, match="missing column\\(s\\) 'os_days'"):
        read_survival_columns(table("image,time,event\na,1,1\n"), time_col="os_days")


# ----------------------------------------------------------------------------------------------------------
# Pipelines
# ----------------------------------------------------------------------------------------------------------


def test_survival_pipeline_c_index_matches_lifelines(surv):
    from lifelines.utils import concordance_index as ll_cindex

    c = surv["cohort"]
    r = run_survival(c, surv["encoder"], SurvivalProtocol(n_boot=100), progress=False)
    preds = r["_predictions"]
    assert sorted(p["row"] for p in preds) == list(range(len(c)))
    time = np.array([p["time"] for p in preds])
    event = np.array([p["event"] for p in preds])
    risk = np.array([p["risk"] for p in preds])
    # lifelines scores "higher = longer survival": pass the negative risk
    assert r["cv"]["c_index"] == pytest.approx(ll_cindex(time, -risk, event), abs=1e-12)
    assert r["cv"]["c_index"] > 0.6, r["cv"]["c_index"]  # brightness sets the hazard
    lo, hi = r["cv"]["c_index_ci"]
    assert lo <= r["cv"]["c_index"] <= hi
    assert len(r["cv"]["fold_c_indices"]) == 3
    # risk groups: above the median risk of the fold's training part
    for p in preds:
        assert (p["risk_group"] == "high") == (p["risk"] > p["median_train_risk"])
    g = r["cv"]["risk_groups"]
    assert g["low"]["n"] + g["high"]["n"] == len(c)
    stat, p_val = logrank_test(time, event, np.array([p["risk_group"] == "high" for p in preds]))
    assert g["logrank_p"] == pytest.approx(p_val)
    for fi in r["cv"]["folds"]:
        assert fi["l2"] in SurvivalProtocol().l2_grid


def test_survival_fine_tune_runs(surv):
    c = surv["cohort"]
    r = run_survival(c, surv["encoder"], SurvivalProtocol(mode="ft", epochs=1, batch_size=8, n_boot=50),
                     progress=False)
    assert r["mode"] == "ft" and all(fi["best_epoch"] == 1 for fi in r["cv"]["folds"])
    assert 0.0 <= r["cv"]["c_index"] <= 1.0


def test_outcome_cli_time_to_event(surv, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli_main(["outcome", "--labels", str(surv["csv"]), "--checkpoint", "none", "--spacing", "1",
                   "--crop-size", "32", "--hu-window", "-1000", "400", "--n-boot", "100", "--test", str(surv["csv"]),
                   "--out", str(out)])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("dagman outcome: C-index ") and "(3-fold CV, lp, Cox, 100% of training folds" in last
    assert last.endswith(f"-> {out / 'metrics.json'}")
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "outcome" and m["kind"] == "time-to-event" and m["events"] == int(surv["cohort"].event.sum())
    assert {"c_index", "c_index_ci", "fold_c_indices", "risk_groups", "folds"} <= set(m["cv"])
    assert m["test"]["n"] == 45 and m["test"]["models"] == 3
    km = m["cv"]["risk_groups"]["high"]["km"]
    assert km["time"][0] == 0.0 and km["survival"][0] == 1.0 and np.all(np.diff(km["survival"]) <= 0)
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 45 and {"risk", "risk_group", "time", "event", "fold"} <= set(rows[0])
    assert imread(str(out / "km.png")).shape[1] > 600  # two panels (CV and test)


def test_outcome_cli_binary(tmp_path, capsys):
    path = write_survival_set(tmp_path / "bin", 30, seed=2, binary=True)
    out = tmp_path / "out"
    # the table also has time/event columns: naming --label-col picks the binary outcome
    rc = cli_main(["outcome", "--labels", str(path), "--label-col", "label", "--checkpoint", "none", "--spacing", "1",
                   "--crop-size", "32", "--n-boot", "50", "--out", str(out)])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("dagman outcome: AUC ")
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "outcome" and m["kind"] == "binary" and "auc_ci" in m["cv"]
    assert (out / "roc.png").is_file()


def _error(capsys, argv):
    rc = cli_main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_outcome_cli_errors(surv, tmp_path, capsys):
    base = ["--checkpoint", "none", "--crop-size", "32", "--out", str(tmp_path / "o")]
    err = _error(capsys, ["outcome", "--labels", str(surv["csv"]), "--time-col", "os_days", *base])
    assert "missing column(s) 'os_days'" in err
    images = surv["cohort"].images

    def table(name, rows):
        p = tmp_path / name
        p.write_text("image,time,event\n" + "".join(f"{images[i]},{t},{e}\n" for i, (t, e) in enumerate(rows)))
        return str(p)

    err = _error(capsys, ["outcome", "--labels", table("neg.csv", [(1, 1), (-3, 0)]), *base])
    assert "negative 'time' -3" in err
    err = _error(capsys, ["outcome", "--labels", table("ev.csv", [(1, 1), (2, "yes")]), *base])
    assert "'event' must be 0 (censored) or 1 (event), got 'yes'" in err
    err = _error(capsys, ["outcome", "--labels", table("none.csv", [(1, 0), (2, 0)]), *base])
    assert "no events: all 2 rows are censored" in err
    # no time/event columns and no label column
    p = tmp_path / "bare.csv"
    p.write_text(f"image\n{images[0]}\n")
    err = _error(capsys, ["outcome", "--labels", str(p), *base])
    assert "missing column(s) 'label'" in err
