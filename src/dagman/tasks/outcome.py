"""Treatment-outcome prediction: a binary outcome (the classification protocol of :mod:`dagman.tasks.classify`)
or time-to-event with a linear Cox proportional-hazards head.

Time-to-event protocol (one seed; the splits of :mod:`dagman.tasks.classify` with the event indicator as the
stratum -- or, when every row has an event, time above/below its median):

1. rows -> ``K`` stratified patient-grouped folds; per fold the other folds are reduced to ``fraction`` of their
   patients and split by patient into train / validation;
2. ``lp``: frozen-encoder features (computed once), standardised on the training rows; a linear Cox head
   ``risk = x @ beta`` fitted by maximising the Breslow partial log-likelihood minus ``l2 * |beta|^2``
   (:func:`fit_cox`, L-BFGS in float64), ``l2`` chosen from :attr:`SurvivalProtocol.l2_grid` by the validation
   C-index (ties: higher validation partial likelihood). ``ft``: the encoder + linear head trained end-to-end on the
   batch partial likelihood (AdamW; weight decay is the L2 penalty), best epoch by validation C-index;
3. out-of-fold risks pooled -> Harrell's C-index with a bootstrap 95% CI (stratified by event), per-fold C-index;
4. risk groups: a test row is "high risk" when its risk exceeds the median risk of its fold's training part
   (train + validation); Kaplan-Meier curves of the two groups (:func:`kaplan_meier`) and the log-rank test
   (:func:`logrank_test`) in ``km.png``.

Conventions: ``time`` ``(N,)`` >= 0 in the table's unit (days, months); ``event`` ``(N,)`` 1 = event observed,
0 = censored; ``risk`` ``(N,)``, higher = earlier expected event.
"""

from __future__ import annotations

import math
import os
import time as _time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dagman.errors import ConfigError, DataError
from dagman.tasks.classify import LabelTable, write_outputs
from dagman.tasks.cv import Cohort, CVHead, Protocol, describe_run, finish_result, mean_std, run_cv
from dagman.tasks.metrics import bootstrap_ci, concordance_index

__all__ = [
    "SurvivalProtocol",
    "read_survival_columns",
    "cox_partial_log_likelihood",
    "fit_cox",
    "CoxHead",
    "fit_cox_head",
    "kaplan_meier",
    "survival_at",
    "logrank_test",
    "survival_metrics",
    "run_survival",
    "write_survival_outputs",
    "km_figure",
    "format_survival_table",
    "survival_summary_line",
]


@dataclass
class SurvivalProtocol(Protocol):
    """:class:`~dagman.tasks.classify.Protocol` plus ``l2_grid``: L2 penalties of the Cox head (per unit of
    the mean partial log-likelihood, on standardised features) tried on each fold's validation part."""

    l2_grid: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)

    def check(self) -> "SurvivalProtocol":
        super().check()
        if not self.l2_grid or any(not v >= 0 for v in self.l2_grid):
            raise ConfigError(f"the Cox L2 grid must hold values >= 0, got {self.l2_grid}")
        return self


# ----------------------------------------------------------------------------------------------------------
# Table columns
# ----------------------------------------------------------------------------------------------------------


def read_survival_columns(table: LabelTable, time_col: str = "time",
                          event_col: str = "event") -> tuple[np.ndarray, np.ndarray]:
    """``time`` ``(N,)`` float64 (>= 0, finite) and ``event`` ``(N,)`` int64 (0/1, at least one event) from a label
    table. One-line DataError naming the column and line of the first bad cell."""
    table.require(time_col, event_col)
    times = np.empty(len(table.rows), dtype=np.float64)
    events = np.empty(len(table.rows), dtype=np.int64)
    for i, row in enumerate(table.rows):
        t, e = row[time_col], row[event_col]
        try:
            times[i] = float(t)
        except ValueError:
            raise DataError(f"{table.path} line {i + 2}: {time_col!r} must be a number, got {t!r}") from None
        if not math.isfinite(times[i]):
            raise DataError(f"{table.path} line {i + 2}: {time_col!r} must be finite, got {t!r}")
        if times[i] < 0:
            raise DataError(f"{table.path} line {i + 2}: negative {time_col!r} {t} (follow-up times must be >= 0)")
        try:
            ev = float(e)
        except ValueError:
            ev = float("nan")
        if ev not in (0.0, 1.0):
            raise DataError(f"{table.path} line {i + 2}: {event_col!r} must be 0 (censored) or 1 (event), got {e!r}")
        events[i] = int(ev)
    if events.sum() == 0:
        raise DataError(f"{table.path}: no events: all {len(events)} rows are censored ({event_col} = 0); the Cox "
                        "model and the C-index need events")
    return times, events


# ----------------------------------------------------------------------------------------------------------
# Cox model
# ----------------------------------------------------------------------------------------------------------


def _risk_set_ends(time: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order by descending time and, per sorted position, the last sorted position with the same time (so that
    ``logcumsumexp`` up to it covers everyone with ``t_j >= t_i``, ties included: Breslow)."""
    order = np.argsort(-np.asarray(time, np.float64), kind="stable")
    ts = np.asarray(time, np.float64)[order]
    ends = np.r_[np.nonzero(np.diff(ts))[0], ts.shape[0] - 1]
    group = np.r_[0, np.cumsum(np.diff(ts) != 0)]
    return order, ends[group]


def cox_partial_log_likelihood(risk: torch.Tensor, time, event) -> torch.Tensor:
    """Breslow partial log-likelihood ``sum_{i: event} [risk_i - log sum_{j: t_j >= t_i} exp(risk_j)]``.

    Args:
        risk: ``(N,)`` float tensor (log relative hazard, ``x @ beta``); differentiable.
        time: ``(N,)`` follow-up times; event: ``(N,)`` 0/1.
    Returns:
        A scalar tensor (a sum over events, not a mean; 0 when there are no events).
    """
    order, ends = _risk_set_ends(np.asarray(time))
    idx = torch.from_numpy(order).to(risk.device)
    r = risk.reshape(-1)[idx]
    log_risk_set = torch.logcumsumexp(r, dim=0)[torch.from_numpy(ends).to(risk.device)]
    e = torch.as_tensor(np.asarray(event)[order], dtype=r.dtype, device=risk.device)
    return ((r - log_risk_set) * e).sum()


def fit_cox(x: np.ndarray, time, event, l2: float = 0.0, max_iter: int = 200) -> np.ndarray:
    """Linear Cox coefficients ``beta`` ``(F,)`` maximising ``ll(x @ beta) / n_events - l2 * |beta|^2`` (Breslow
    ties; no intercept) with L-BFGS (strong Wolfe line search) in float64, from ``beta = 0``.

    ``x``: ``(N, F)`` covariates (standardise them first when ``l2 > 0``)."""
    xt = torch.as_tensor(np.asarray(x, np.float64)).reshape(len(time), -1)
    n_events = max(float(np.sum(event)), 1.0)
    beta = torch.zeros(xt.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([beta], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -cox_partial_log_likelihood(xt @ beta, time, event) / n_events + l2 * (beta * beta).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return beta.detach().numpy().copy()


@dataclass
class CoxHead:
    """A fitted linear Cox head on standardised features: ``risk(features (M, F)) -> (M,)``."""

    mean: np.ndarray
    scale: np.ndarray
    beta: np.ndarray
    l2: float
    val_c_index: float

    def risk(self, features: np.ndarray) -> np.ndarray:
        return ((np.asarray(features, np.float64) - self.mean) / self.scale) @ self.beta


def _c_index_or_half(time, event, risk) -> float:
    try:
        return concordance_index(time, event, risk)
    except DataError:  # no comparable pair in a tiny validation part
        return 0.5


def fit_cox_head(x_train, t_train, e_train, x_val, t_val, e_val, l2_grid: Sequence[float]) -> CoxHead:
    """One :func:`fit_cox` per ``l2`` on features standardised with the training mean/std; the ``l2`` with the best
    validation C-index wins (ties: higher mean validation partial log-likelihood, then the larger ``l2``)."""
    x_train = np.asarray(x_train, np.float64)
    mean = x_train.mean(0)
    scale = x_train.std(0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    z_tr = (x_train - mean) / scale
    z_val = (np.asarray(x_val, np.float64) - mean) / scale
    n_val_events = max(float(np.sum(e_val)), 1.0)
    best, best_key = None, None
    for l2 in sorted(l2_grid, reverse=True):
        beta = fit_cox(z_tr, t_train, e_train, l2)
        r_val = z_val @ beta
        ll = float(cox_partial_log_likelihood(torch.from_numpy(r_val), t_val, e_val)) / n_val_events
        key = (_c_index_or_half(t_val, e_val, r_val), ll)
        if best_key is None or key > best_key:
            best, best_key = (beta, float(l2)), key
    return CoxHead(mean=mean, scale=scale, beta=best[0], l2=best[1], val_c_index=float(best_key[0]))


# ----------------------------------------------------------------------------------------------------------
# Kaplan-Meier and log-rank
# ----------------------------------------------------------------------------------------------------------


def kaplan_meier(time, event) -> dict:
    """Kaplan-Meier estimate of the survival function (``lifelines.KaplanMeierFitter``).

    Returns ``{"time": (K+1,), "survival": (K+1,), "at_risk": (K+1,), "events": (K+1,), "censored_times": (C,),
    "median": float | None}``: the first point is ``(0, 1.0)``, then one point per distinct event time ``t_k``
    with ``S(t_k) = prod_{j <= k} (1 - d_j / n_j)`` (``n_j`` at risk just before ``t_j``, ``d_j`` events at it);
    ``median`` is the first time where ``S <= 0.5`` (None when not reached)."""
    from lifelines import KaplanMeierFitter

    t = np.asarray(time, np.float64).reshape(-1)
    e = np.asarray(event).reshape(-1).astype(bool)
    km = KaplanMeierFitter().fit(t, e)
    table = km.event_table
    rows = table[table["observed"] > 0]
    ev_times = rows.index.to_numpy(np.float64)
    surv = km.survival_function_at_times(ev_times).to_numpy(np.float64)
    median = float(km.median_survival_time_)
    return {
        "time": np.r_[0.0, ev_times],
        "survival": np.r_[1.0, surv],
        "at_risk": np.r_[t.shape[0], rows["at_risk"].to_numpy(np.int64)],
        "events": np.r_[0, rows["observed"].to_numpy(np.int64)],
        "censored_times": np.sort(t[~e]),
        "median": median if np.isfinite(median) else None,
    }


def survival_at(km: dict, times) -> np.ndarray:
    """The Kaplan-Meier step function (right-continuous) of :func:`kaplan_meier` evaluated at ``times``."""
    idx = np.searchsorted(km["time"], np.asarray(times, np.float64), side="right") - 1
    return np.asarray(km["survival"])[np.clip(idx, 0, None)]


def logrank_test(time, event, group) -> tuple[float, float]:
    """Two-group log-rank test (``lifelines.statistics.logrank_test``). ``group`` ``(N,)`` bool/0-1. Returns
    ``(chi2 statistic, p-value)`` with one degree of freedom; ``(nan, nan)`` when a group is empty or there is
    no event."""
    from lifelines.statistics import logrank_test as lifelines_logrank

    t = np.asarray(time, np.float64).reshape(-1)
    e = np.asarray(event).reshape(-1).astype(bool)
    g = np.asarray(group).reshape(-1).astype(bool)
    if g.all() or (~g).all() or not e.any():
        return float("nan"), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = lifelines_logrank(t[g], t[~g], event_observed_A=e[g], event_observed_B=e[~g])
    stat, p = float(res.test_statistic), float(res.p_value)
    return (stat, p) if np.isfinite(stat) else (float("nan"), float("nan"))


# ----------------------------------------------------------------------------------------------------------
# Protocol
# ----------------------------------------------------------------------------------------------------------


def survival_metrics(time, event, risk, n_boot: int = 1000, seed: int = 0) -> dict:
    """``{"n", "events", "c_index", "c_index_ci"}``: Harrell's C with a percentile bootstrap 95% CI (resampling
    stratified by event; replicates without a comparable pair are skipped)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        c, lo, hi = bootstrap_ci(concordance_index, np.asarray(time), np.asarray(event), np.asarray(risk),
                                 n_boot=n_boot, seed=seed, stratify=np.asarray(event))
    return {"n": int(len(time)), "events": int(np.sum(event)), "c_index": c, "c_index_ci": [lo, hi]}


def _risk_groups(time, event, high) -> dict:
    """KM of the low (``high == False``) and high risk groups + log-rank, as JSON-ready lists."""
    out = {}
    for name, mask in (("low", ~high), ("high", high)):
        if mask.sum() == 0:
            out[name] = None
            continue
        km = kaplan_meier(time[mask], event[mask])
        out[name] = {"n": int(mask.sum()), "events": int(event[mask].sum()), "median_time": km["median"],
                     "km": {k: [float(v) for v in km[k]] for k in ("time", "survival", "at_risk", "events",
                                                                    "censored_times")}}
    stat, p = logrank_test(time, event, high)
    out["logrank_chi2"] = None if math.isnan(stat) else stat
    out["logrank_p"] = None if math.isnan(p) else p
    return out


def _cox_ft_loss(t_train: np.ndarray, e_train: np.ndarray):
    def loss(out, rows):
        ev = e_train[rows]
        if ev.sum() == 0:
            return None
        return -cox_partial_log_likelihood(out, t_train[rows], ev) / float(ev.sum())

    return loss


class SurvivalHead(CVHead):
    """Time-to-event prediction in the shared protocol: a linear Cox head on frozen features or a fine-tuned
    log-risk, the cut-off = the median risk of the fold's training part (train + validation), Harrell's C-index
    per fold and pooled, Kaplan-Meier risk groups."""

    metric = "c_index"
    fold_keys = ("fold_c_indices", "fold_c_index")

    def __init__(self, cohort: Cohort, strata: np.ndarray, what: str) -> None:
        self.cohort, self.strata, self.what = cohort, strata, what
        self.t, self.e = cohort.time, cohort.event

    def counts(self, tr, va, te) -> dict:
        e = self.e
        return {"train_events": int(e[tr].sum()), "val_events": int(e[va].sum()), "test_events": int(e[te].sum())}

    def fit_frozen(self, feats, tr, va, protocol):
        t, e = self.t, self.e
        head = fit_cox_head(feats[tr], t[tr], e[tr], feats[va], t[va], e[va], protocol.l2_grid)
        return head.risk, {"l2": head.l2, "val_c_index": head.val_c_index}

    def objective(self, tr, va):
        tv, ev = self.t[va], self.e[va]

        def val_key(out):
            ll = float(cox_partial_log_likelihood(torch.from_numpy(out), tv, ev)) / max(ev.sum(), 1)
            return (_c_index_or_half(tv, ev, out), ll)

        return _cox_ft_loss(self.t[tr], self.e[tr]), val_key, lambda out: out, "val_c_index"

    def cut(self, predict, tr, va):
        cut = float(np.median(predict(np.r_[tr, va])))
        return cut, {"median_train_risk": cut}

    def fold_metric(self, te, scores) -> float:
        return _c_index_or_half(self.t[te], self.e[te], scores)

    def pooled(self, oof, cut, seed, protocol) -> dict:
        return survival_metrics(self.t, self.e, oof, protocol.n_boot, seed=seed)

    def finish_pooled(self, cv, oof, cut) -> None:
        cv["risk_groups"] = _risk_groups(self.t, self.e, oof > cut)

    def record(self, i, seed, fold, score, cut) -> dict:
        c = self.cohort
        return {"row": i, "image": str(c.images[i]), "patient": str(c.groups[i]), "time": float(self.t[i]),
                "event": int(self.e[i]), "seed": seed, "fold": fold, "risk": score, "median_train_risk": cut,
                "risk_group": "high" if score > cut else "low"}

    def test_metrics(self, test, score, cut, seed, protocol, models) -> dict:
        tm = survival_metrics(test.time, test.event, score, protocol.n_boot, seed=seed)
        tm.update({"models": models, "median_train_risk": cut,
                   "risk_groups": _risk_groups(test.time, test.event, score > cut)})
        return tm

    def test_record(self, test, i, seed, score, cut) -> dict:
        return {"row": i, "image": str(test.images[i]), "patient": str(test.groups[i]),
                "time": float(test.time[i]), "event": int(test.event[i]), "seed": seed, "risk": score,
                "median_train_risk": cut, "risk_group": "high" if score > cut else "low"}


def run_survival(cohort: Cohort, encoder=None, protocol: SurvivalProtocol | None = None, *,
                 test: Cohort | None = None, features: np.ndarray | None = None,
                 test_features: np.ndarray | None = None, device=None, progress: bool = True,
                 out_dir: str | os.PathLike | None = None, meta: dict | None = None) -> dict:
    """The time-to-event protocol (module docstring). ``cohort.time``/``cohort.event`` must be set; inputs
    loaded (or ``features`` given, lp). Returns a dict with ``task="outcome", kind="time-to-event", checkpoint,
    feature_source, mode, fraction, folds, fold_source, seeds, n, events, protocol, cv {c_index, c_index_ci,
    fold_c_indices, fold_c_index_mean/std, folds, risk_groups}, test, across_seeds, per_seed, timing``; with
    ``out_dir`` it also writes ``metrics.json``, ``predictions.csv`` and ``km.png``."""
    t_start = _time.perf_counter()
    protocol = (protocol or SurvivalProtocol()).check()
    if cohort.time is None or cohort.event is None:
        raise DataError(f"{cohort.source}: no time/event columns")
    t_all, e_all = cohort.time, cohort.event
    if e_all.sum() == 0:
        raise DataError(f"{cohort.source}: no events: all {len(e_all)} rows are censored")
    if e_all.all():  # nothing censored: stratify by early/late instead
        strata, what = (t_all > np.median(t_all)).astype(np.int64), "time above the median"
    else:
        strata, what = e_all.astype(np.int64), "event"
    run = run_cv(cohort, SurvivalHead(cohort, strata, what), protocol, encoder, test=test, features=features,
                 test_features=test_features, device=device, progress=progress)
    per_seed = run.per_seed

    first = per_seed[0]
    across = {"cv": {"c_index": mean_std([r["cv"]["c_index"] for r in per_seed]),
                     "fold_c_index_mean": mean_std([r["cv"]["fold_c_index_mean"] for r in per_seed])}}
    if test is not None:
        across["test"] = {"c_index": mean_std([r["test"]["c_index"] for r in per_seed])}
    result = {
        "task": "outcome",
        "kind": "time-to-event",
        **describe_run(run, cohort, encoder, protocol),
        "events": int(e_all.sum()),
        "censored": int(len(e_all) - e_all.sum()),
        "time_range": [float(t_all.min()), float(t_all.max())],
        "protocol": {
            "val_fraction": protocol.val_fraction, "n_boot": protocol.n_boot,
            "ci": "95% percentile bootstrap, stratified by event",
            "model": ("linear Cox head on standardised frozen features (Breslow partial likelihood, L-BFGS), L2 "
                      f"from {list(protocol.l2_grid)} by validation C-index") if protocol.mode == "lp" else
                     (f"encoder + linear Cox head fine-tuned end-to-end on the batch partial likelihood (AdamW lr "
                      f"{protocol.lr} with warm-up + cosine, weight decay {protocol.weight_decay} (not on norms, "
                      f"biases, tokens), clip {protocol.grad_clip}, batch {protocol.batch_size}, "
                      f"{protocol.epochs} epochs, random flips), best epoch by validation C-index"),
            "risk_groups": "high = risk above the median risk of the fold's training part (train + validation)",
            "pooling": "out-of-fold risks pooled over folds; test set: fold models' risks averaged",
        },
        "cv": first["cv"],
        "test": first["test"],
        "across_seeds": across,
        "per_seed": [{"seed": r["seed"], "c_index": r["cv"]["c_index"], "c_index_ci": r["cv"]["c_index_ci"],
                      "logrank_p": r["cv"]["risk_groups"]["logrank_p"],
                      "test_c_index": r["test"]["c_index"] if r["test"] else None} for r in per_seed],
    }
    if cohort.fold is None:
        result["fold_source"] += f" (stratified by {what})"
    finish_result(result, run, test, meta, t_start)
    if out_dir is not None:
        write_survival_outputs(result, out_dir)
    return result


# ----------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------


def write_survival_outputs(result: dict, out_dir: str | os.PathLike, *, figure: bool = True) -> dict:
    """Write ``metrics.json``, ``predictions.csv`` (row, image, patient, time, event, seed, fold, risk,
    median_train_risk, risk_group), ``test_predictions.csv`` (with a test set) and ``km.png`` into ``out_dir``
    (:func:`dagman.tasks.classify.write_outputs` with the Kaplan-Meier figure)."""
    return write_outputs(result, out_dir, figure=figure, figure_fn=km_figure, figure_name="km")


def km_figure(result: dict, path: str | os.PathLike) -> Path:
    """Kaplan-Meier curves of the low- and high-risk groups (censoring as ticks) with the log-rank p-value and
    the C-index: one panel for the pooled out-of-fold CV, a second for the test set when scored."""
    from matplotlib.figure import Figure

    from dagman.fileio import atomic_write

    panels = [("cv", f"{result['folds']}-fold CV (out-of-fold)")]
    if result.get("test"):
        panels.append(("test", "held-out test"))
    fig = Figure(figsize=(5.0 * len(panels), 4.2), dpi=100)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (key, name) in zip(axes, panels):
        m = result[key]
        groups = m["risk_groups"]
        for gname, colour in (("low", "#1f77b4"), ("high", "#d62728")):
            g = groups.get(gname)
            if not g:
                continue
            km = g["km"]
            cens = np.asarray(km["censored_times"])
            xs, ys = list(km["time"]), list(km["survival"])
            if cens.size and cens[-1] > xs[-1]:  # the curve runs on, flat, to the last censored follow-up
                xs.append(float(cens[-1]))
                ys.append(ys[-1])
            ax.step(xs, ys, where="post", color=colour, lw=1.6,
                    label=f"{gname} risk (n={g['n']}, {g['events']} events)")
            if cens.size:
                ax.plot(cens, survival_at({k: np.asarray(v) for k, v in km.items()}, cens), "|", color=colour,
                        ms=7, mew=1.0)
        p = groups.get("logrank_p")
        p_txt = "= n/a" if p is None else (f"= {p:.2g}" if p >= 1e-4 else "< 1e-4")
        lo, hi = m["c_index_ci"]
        ax.set_title(f"{name}\nC-index {m['c_index']:.3f} [{lo:.2f}, {hi:.2f}], log-rank p {p_txt}", fontsize=9)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("time", fontsize=9)
        ax.set_ylabel("survival probability (Kaplan-Meier)", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"outcome: {result['mode']}, {result['fraction']:.0%} of training folds; {result['feature_source']}",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    path = Path(path)
    atomic_write(path, lambda fh: fig.savefig(fh, format="png"))
    return path


def format_survival_table(result: dict) -> str:
    """Per-fold rows of the first seed, the pooled line with risk groups, the test line and the seed spread."""
    cv = result["cv"]
    lp = result["mode"] == "lp"
    lines = [f"{'fold':>4} {'train':>6} {'val':>5} {'test':>5} {'events':>6} {'L2' if lp else 'epoch':>7} "
             f"{'val C':>6} {'C':>6}"]
    for fi in cv["folds"]:
        hp = f"{fi['l2']:g}" if lp else str(fi["best_epoch"])
        lines.append(f"{fi['fold']:>4} {fi['n_train']:>6} {fi['n_val']:>5} {fi['n_test']:>5} {fi['test_events']:>6} "
                     f"{hp:>7} {fi['val_c_index']:>6.3f} {fi['c_index']:>6.3f}")
    g = cv["risk_groups"]
    p = g["logrank_p"]
    lines.append(f"CV pooled ({cv['n']} rows, {cv['events']} events): C-index {cv['c_index']:.3f} "
                 f"[{cv['c_index_ci'][0]:.2f}, {cv['c_index_ci'][1]:.2f}]; per-fold {cv['fold_c_index_mean']:.3f} ± "
                 f"{cv['fold_c_index_std']:.3f}; risk groups low {g['low']['n'] if g['low'] else 0} / high "
                 f"{g['high']['n'] if g['high'] else 0}, log-rank p {'n/a' if p is None else f'{p:.3g}'}")
    t = result.get("test")
    if t:
        tp = t["risk_groups"]["logrank_p"]
        lines.append(f"test ({t['n']} rows, {t['events']} events, mean of {t['models']} fold models): C-index "
                     f"{t['c_index']:.3f} [{t['c_index_ci'][0]:.2f}, {t['c_index_ci'][1]:.2f}], log-rank p "
                     f"{'n/a' if tp is None else f'{tp:.3g}'}")
    if len(result["seeds"]) > 1:
        a = result["across_seeds"]["cv"]["c_index"]
        lines.append(f"across {len(result['seeds'])} seeds: CV C-index {a['mean']:.3f} ± {a['std']:.3f}")
    return "\n".join(lines)


def survival_summary_line(result: dict, out_dir: str | os.PathLike | None = None) -> str:
    """``dagman outcome: C-index 0.68 [0.60, 0.75] (3-fold CV, lp, Cox, ...); log-rank p 0.01 -> OUT/metrics.json``"""
    cv = result["cv"]
    p = cv["risk_groups"]["logrank_p"]
    text = (f"dagman outcome: C-index {cv['c_index']:.3f} [{cv['c_index_ci'][0]:.2f}, {cv['c_index_ci'][1]:.2f}] "
            f"({result['folds']}-fold CV, {result['mode']}, Cox, {result['fraction']:.0%} of training folds, "
            f"{result['feature_source']}); high vs low risk log-rank p {'n/a' if p is None else f'{p:.2g}'}")
    if out_dir is not None:
        text += f" -> {Path(out_dir) / 'metrics.json'}"
    return text
