"""The pieces of benchmarks/compare_methods.py that decide its numbers: the statistics and the resumable
result store (the whole run is exercised by `python benchmarks/compare_methods.py --quick`)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cm():
    spec = importlib.util.spec_from_file_location("compare_methods", ROOT / "benchmarks" / "compare_methods.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_seed_mean_auc_ci_brackets_the_mean_and_narrows_with_more_test_rows(cm):
    rng = np.random.default_rng(0)

    def case(n):
        y = np.r_[np.zeros(n // 2), np.ones(n // 2)].astype(int)
        scores = [y + rng.normal(0, 1.2, n) for _ in range(3)]
        mean_auc = np.mean([roc_auc_score(y, s) for s in scores])
        lo, hi = cm.seed_mean_auc_ci(y, scores, n_boot=400)
        return mean_auc, lo, hi

    m_small, lo_small, hi_small = case(60)
    m_big, lo_big, hi_big = case(600)
    assert lo_small < m_small < hi_small and lo_big < m_big < hi_big
    assert hi_big - lo_big < 0.6 * (hi_small - lo_small)


def test_t_interval_matches_scipy(cm):
    from scipy import stats

    v = np.array([0.31, 0.35, 0.29])
    lo, hi = cm.t_interval(v)
    ref = stats.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=stats.sem(v))
    assert lo == pytest.approx(ref[0]) and hi == pytest.approx(ref[1])
    assert cm.t_interval([0.5]) == [0.5, 0.5]


def test_seg_summary_mean_std_and_case_bootstrap(cm):
    runs = [{"dice": [0.8, 0.6, 0.7, 0.9]}, {"dice": [0.5, 0.7, 0.6, 0.8]}, {"dice": [0.9, 0.9, 0.7, 0.7]}]
    s = cm.seg_summary(runs, n_boot=500)
    per_seed = [0.75, 0.65, 0.8]
    assert s["mean"] == pytest.approx(np.mean(per_seed)) and s["std"] == pytest.approx(np.std(per_seed, ddof=1))
    assert s["ci"][0] < s["mean"] < s["ci"][1] and 0.5 <= s["ci"][0] and s["ci"][1] <= 0.9


def test_results_are_reused_only_under_the_same_budget(cm, tmp_path):
    budget = cm.Budget.quick()
    calls = []

    def compute():
        calls.append(1)
        return {"auc": np.float64(0.75), "values": np.arange(3)}

    store = cm.Results(tmp_path, budget)
    assert store.get("lp_x", compute) == {"auc": 0.75, "values": [0, 1, 2]}
    assert store.get("lp_x", compute) == {"auc": 0.75, "values": [0, 1, 2]} and len(calls) == 1
    other = cm.Results(tmp_path, dataclasses.replace(budget, steps=budget.steps + 1))
    other.get("lp_x", compute)
    assert len(calls) == 2  # a different budget invalidates the stored unit
    (tmp_path / "results" / "lp_x.json").write_text("{torn")
    other.get("lp_x", compute)
    assert len(calls) == 3 and json.loads((tmp_path / "results" / "lp_x.json").read_text())["value"]["auc"] == 0.75
    assert not [p for p in (tmp_path / "results").iterdir() if p.name.endswith(".tmp")]


def test_a_replication_seed_shares_random_init_but_not_pretrained_units(cm, tmp_path):
    """--pretrain-seed K: units that read no pretrained weights keep seed 0's fingerprint (reused), the
    pretrained ones do not; the tables of seed K go to their own files."""
    base = cm.Budget.quick()
    rep = dataclasses.replace(base, pretrain_seeds=(1,))
    assert base.fingerprint("u", pretrained=False) == rep.fingerprint("u", pretrained=False)
    assert base.fingerprint("u") != rep.fingerprint("u")
    # seed 0: stores written before the length left random init's hash are still recognised (legacy hash)
    assert base.fingerprint("u") == base.fingerprint("u", pretrained=False, legacy=True)
    calls = []
    cm.Results(tmp_path, base).get("recognition_random-init", lambda: calls.append(1) or 0.1, pretrained=False)
    cm.Results(tmp_path, rep).get("recognition_random-init", lambda: calls.append(1) or 0.2, pretrained=False)
    assert len(calls) == 1
    assert cm.output_suffix(base) == "" and cm.output_suffix(rep) == "_p1"


def test_random_init_units_are_shared_across_pretraining_lengths_and_old_stores_are_upgraded(cm, tmp_path):
    """Random init reads no pretrained weights, so a comparison at another --steps reuses its units; a unit stored
    under the former hash (steps included) is read back without recomputing and rewritten under the new one."""
    short = cm.Budget.quick()
    long = dataclasses.replace(short, steps=short.steps * 2)
    assert short.fingerprint("u", pretrained=False) == long.fingerprint("u", pretrained=False)
    assert short.fingerprint("u") != long.fingerprint("u")
    assert short.fingerprint("u", pretrained=False, legacy=True) != long.fingerprint("u", pretrained=False, legacy=True)
    store = tmp_path / "results"
    store.mkdir()
    old = {"fingerprint": short.fingerprint("lp_random-init", pretrained=False, legacy=True), "seconds": 3.0,
           "value": {"auc": 0.7}}
    (store / "lp_random-init.json").write_text(json.dumps(old))
    calls = []
    store_short = cm.Results(tmp_path, short)
    got = store_short.get("lp_random-init", lambda: calls.append(1) or {"auc": 0.1}, pretrained=False)
    assert got == {"auc": 0.7} and not calls
    assert store_short.seconds == 3.0  # the recorded time of the units a table shows, read back or computed
    assert json.loads((store / "lp_random-init.json").read_text())["fingerprint"] == short.fingerprint(
        "lp_random-init", pretrained=False)
    # the longer budget now finds it too; a pretrained unit under a legacy-looking hash is not accepted
    assert cm.Results(tmp_path, long).get("lp_random-init", lambda: calls.append(1), pretrained=False) == {"auc": 0.7}
    (store / "lp_dagman.json").write_text(json.dumps({**old, "fingerprint": short.fingerprint("lp_dagman")}))
    assert cm.Results(tmp_path, long).get("lp_dagman", lambda: calls.append(1) or {"auc": 0.2}) == {"auc": 0.2}
    assert calls == [1]


def test_default_budget_covers_the_issue(cm):
    b = cm.Budget()
    assert cm.PRESETS == ("dagman", "dagman-no-nt", "dagman-no-sa", "smit", "ibot", "attmask")
    assert cm.ENCODERS[0] == "random-init" and b.seeds >= 3
    # the label-fraction curves of issue 12: 5, 10, 25 and 100% for probes and fine-tuning; few-shot segmentation
    assert b.fractions == (0.05, 0.1, 0.25, 1.0) and b.ft_fractions == (0.05, 0.1, 0.25, 1.0)
    assert b.seg_fractions == (0.1, 0.25, 1.0) and b.seg_lr == 3e-3 and b.seg_loss == "dicece-batch"


def test_a_changed_preset_is_refused_instead_of_mixing_recipes(cm, tmp_path, monkeypatch):
    from dagman import config_presets

    budget = dataclasses.replace(cm.Budget.quick(), size="cpu")
    cm.check_presets(tmp_path, budget)  # first run: records the presets
    recorded = json.loads((tmp_path / "presets.json").read_text())
    assert recorded["size"] == "cpu" and recorded["size_preset"]["mask"] == {"unit_stage": 2}
    cm.check_presets(tmp_path, budget)  # same presets: accepted
    with pytest.raises(SystemExit, match="size and size_preset"):
        cm.check_presets(tmp_path, dataclasses.replace(budget, size="tiny"))  # the run folders are not keyed on size
    changed = {**config_presets.SIZE_PRESETS, "cpu": {**config_presets.SIZE_PRESETS["cpu"], "mask": {"unit_stage": 3}}}
    monkeypatch.setattr(config_presets, "SIZE_PRESETS", changed)
    with pytest.raises(SystemExit, match="size_preset of this checkout and command differ"):
        cm.check_presets(tmp_path, budget)
    assert json.loads((tmp_path / "presets.json").read_text()) == recorded  # the record is never overwritten
    # a comparison whose units read the SA encoders through their SA [CLS] token (recorded before "features")
    monkeypatch.undo()
    older = tmp_path / "older"
    older.mkdir()
    (older / "presets.json").write_text(json.dumps({k: v for k, v in recorded.items() if k != "features"}))
    with pytest.raises(SystemExit, match="features of this checkout and command differ"):
        cm.check_presets(older, budget)


def test_the_sa_rows_belong_to_the_presets_with_an_sa_block(cm):
    with_sa = [m for m in cm.PRESETS if cm.has_sa_block(m, "cpu")]
    assert with_sa == ["dagman", "dagman-no-nt", "attmask"] and not cm.has_sa_block(cm.RANDOM, "cpu")


def test_the_report_names_the_command_as_given(cm):
    argv = ["--size", "cpu", "--steps", "3000", "--threads", "1", "--out", "/work/compare cpu", "--report-only"]
    assert cm.command_line(argv) == ("python benchmarks/compare_methods.py --size cpu --steps 3000 --threads 1 "
                                     "--out '/work/compare cpu'")


def test_random_init_draws_row_gives_mean_lowest_and_highest_per_column(cm):
    draws = [{"fractions": {"0.25": {"knn_10": {"mean": v}}, "1.0": {"knn_10": {"mean": w}}}}
             for v, w in ((0.10, 0.20), (0.16, 0.30), (0.13, 0.25))] + [None]  # a missing draw is left out
    row = cm.draws_row(draws, (0.25, 1.0), lambda d, f: (d["fractions"].get(str(f)) or {}).get("knn_10", {}).get("mean"))
    assert row == "| random init, 3 weight draws: mean [lowest, highest] | 0.130 [0.100, 0.160] | 0.250 [0.200, 0.300] |"
    assert cm.draws_row(draws[:1], (0.25,), lambda d, f: 0.1) is None  # one draw: no spread to show


def test_set_overrides_change_the_pretrained_units_only(cm):
    base = dataclasses.replace(cm.Budget.quick(), size="cpu")
    recipe = dataclasses.replace(base, overrides=("loss.koleo_head_weight=0.01",))
    # random init and the references do not read pretrained weights: shared by every recipe of the size preset
    assert base.fingerprint("u", pretrained=False) == recipe.fingerprint("u", pretrained=False)
    assert base.fingerprint("u") != recipe.fingerprint("u")
    # a budget without overrides hashes as it did before the field existed, so earlier stores stay valid
    fields = dataclasses.asdict(base)
    del fields["overrides"]
    import hashlib

    before = hashlib.sha256(json.dumps([fields, "u"], sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert base.fingerprint("u") == before


def test_set_overrides_are_checked_before_anything_runs(cm):
    cm.check_overrides(["loss.koleo_head_weight=0.01"], "cpu", ["dagman", "smit"])
    cm.check_overrides([], "cpu", ["dagman"])
    with pytest.raises(ValueError, match="architecture comes from --size"):
        cm.check_overrides(["model.embed_dim=24"], "cpu", ["dagman"])
    # the config's own reading of KEY=VALUE: its one-line errors, named after the --set item
    with pytest.raises(ValueError, match="--set loss.koleo_head_weight: .*key=value"):
        cm.check_overrides(["loss.koleo_head_weight"], "cpu", ["dagman"])
    with pytest.raises(ValueError, match="--set loss.no_such_key=1: .*no_such_key"):
        cm.check_overrides(["loss.no_such_key=1"], "cpu", ["dagman"])
    with pytest.raises(ValueError, match="--method smit: "):  # a value the config refuses, named with the preset
        cm.check_overrides(["loss.koleo_head_weight=-1"], "cpu", ["smit"])
    with pytest.raises(SystemExit) as e:  # on the command line: argparse's one-line error, status 2
        cm.main(["--set", "model.depths=[1,1,1,1]", "--report-only", "--out", "/nonexistent"])
    assert e.value.code == 2


def test_a_recipe_is_recorded_and_another_one_refused(cm, tmp_path, monkeypatch):
    budget = dataclasses.replace(cm.Budget.quick(), size="cpu")
    recipe = dataclasses.replace(budget, overrides=("loss.koleo_head_weight=0.01",))
    cm.check_presets(tmp_path, recipe)
    assert json.loads((tmp_path / "presets.json").read_text())["overrides"] == ["loss.koleo_head_weight=0.01"]
    assert cm.recorded_overrides(tmp_path) == ["loss.koleo_head_weight=0.01"]
    cm.check_presets(tmp_path, recipe)
    with pytest.raises(SystemExit, match="overrides of this checkout and command differ"):
        cm.check_presets(tmp_path, budget)
    # a folder recorded before --set existed holds the presets without overrides
    older = tmp_path / "older"
    older.mkdir()
    cm.check_presets(older, budget)
    record = json.loads((older / "presets.json").read_text())
    del record["overrides"]
    (older / "presets.json").write_text(json.dumps(record))
    cm.check_presets(older, budget)
    assert cm.recorded_overrides(older) == [] and cm.recorded_overrides(tmp_path / "none") == []
    with pytest.raises(SystemExit, match="overrides"):
        cm.check_presets(older, recipe)
    # the pretraining command carries the recipe
    calls = []
    monkeypatch.setattr(cm, "dagman_cli", lambda args, log: calls.append([str(a) for a in args]))
    cm.pretrain(tmp_path, tmp_path / "cache", recipe, "dagman", 0)
    assert calls and calls[0][-1] == "loss.koleo_head_weight=0.01" and "--steps" in calls[0]


def test_separation_by_hand(cm):
    assert cm.separation([0.19, 0.26], [0.11, 0.13]) == "▲"
    assert cm.separation([0.19, 0.26], [0.11, 0.13], draws=[0.12, 0.20]) == ""  # a weight draw reaches inside
    assert cm.separation([0.19, 0.26], [0.11, 0.13], draws=[0.12, None, 0.18]) == "▲"
    assert cm.separation([0.70, 0.75], [0.85, 0.92], draws=[0.88]) == "▼"
    assert cm.separation([0.70, 0.75], [0.85, 0.92], draws=[0.74]) == ""
    assert cm.separation([0.10, 0.13], [0.11, 0.14]) == ""  # overlapping
    assert cm.separation(None, [0.1, 0.2]) == cm.separation([0.1, 0.2], None) == ""


def test_the_tables_mark_and_list_each_separating_cell(cm, tmp_path):
    budget = dataclasses.replace(cm.Budget.quick(), size="cpu", fractions=(0.25, 1.0))

    def rec(v25, ci25, v100, ci100):
        cell = lambda v, ci: {"knn_10": {"mean": v, "std": 0.0, "values": [v], "ci": ci}}  # noqa: E731
        return {"fractions": {"0.25": cell(v25, ci25), "1.0": cell(v100, ci100)}, "train_case": "a", "test_case": "b",
                "classes": ["x", "y"], "chance": 0.5, "n_test": 10}

    res = {nset: {"lp": {"mean": {}, "sa": {}, "ref": {}}, "ft": {}} for nset, _ in cm.NODULE_SETS}
    res.update(cluster={}, diversity={}, seg={}, draws={"lp": {}, "recognition": []})
    res["recognition"] = {cm.RANDOM: rec(0.12, [0.11, 0.13], 0.11, [0.08, 0.14]),
                          "dagman": rec(0.23, [0.19, 0.26], 0.22, [0.16, 0.28]),
                          "smit": rec(0.05, [0.02, 0.07], 0.12, [0.09, 0.15])}
    # random init drawn again: its highest draw at 100% (0.18) reaches dagman's interval, at 25% (0.16) does not
    res["draws"]["recognition"] = [res["recognition"][cm.RANDOM], rec(0.16, None, 0.18, None)]
    meta = {"machine": "test", "evaluation_seconds_recorded": 0.0, "command": "x"}
    text = cm.write_tables(tmp_path, budget, res, meta)
    summary = text.split("## Where an encoder separates from random init")[1].split("\n## ")[0]
    assert "| dagman | organ recognition, k-NN k=10, 25% | above | 0.230 [0.190, 0.260] |" in summary
    assert "| smit | organ recognition, k-NN k=10, 25% | below |" in summary
    assert summary.count("| above |") == 1 and summary.count("| below |") == 1  # dagman at 100%: inside the draws
    table = text.split("### k-NN k=10")[1].split("###")[0]
    assert "| dagman | 0.230 [0.190, 0.260] ▲ | 0.220 [0.160, 0.280] |" in table
    assert "▲" not in table.split("| dagman")[0]  # random init's own rows are never marked
    empty = cm.write_tables(tmp_path, budget, {**res, "recognition": {cm.RANDOM: res["recognition"][cm.RANDOM]}}, meta)
    assert "No cell of a pretrained encoder separates from random init." in empty


def test_recipe_verdict_compares_the_t_intervals_of_seeds_and_draws(cm):
    assert cm.recipe_verdict([0.19, 0.21, 0.20], [0.12, 0.13, 0.11, 0.12]) == "above"
    assert cm.recipe_verdict([0.10, 0.11, 0.09], [0.14, 0.15, 0.16]) == "below"
    # the seed 0 and 1 runs alone would separate; the third pretraining seed widens the interval over seeds
    assert cm.recipe_verdict([0.191, 0.227, 0.146], [0.119, 0.111, 0.156, 0.130, 0.125]) == "level"
    assert cm.recipe_verdict([0.2, 0.3], [0.1]) == cm.recipe_verdict([0.2, 0.3, 0.25], [0.1]) == ""
    # two seeds: no verdict, however narrow their interval (ARI at 12000 steps: 0.0614 and 0.0615)
    assert cm.recipe_verdict([0.0614, 0.0615], [0.03, 0.04, 0.05, 0.035]) == cm.NO_VERDICT_FEW_SEEDS
    assert cm.recipe_verdict([0.2], [0.1, 0.11]) == cm.NO_VERDICT_FEW_SEEDS
    assert cm.recipe_verdict([0.0614, 0.0615, 0.0613], [0.03, 0.04, 0.05, 0.035]) == "above"


def test_the_seed_table_reads_every_stored_seed_of_the_same_budget(cm, tmp_path):
    budget = dataclasses.replace(cm.Budget.quick(), size="cpu", fractions=(0.25,))

    def rec(v):
        return {"fractions": {"0.25": {p: {"mean": v, "ci": [v - 0.01, v + 0.01]} for p, _ in cm.RECOGNITION_PROBES}}}

    def store(seed, dagman_value, b=budget, name=None):
        res = {"recognition": {cm.RANDOM: rec(0.12), "dagman": rec(dagman_value)},
               "draws": {"lp": {}, "recognition": [rec(0.12), rec(0.11), rec(0.13), rec(0.12)]}}
        doc = {"budget": dataclasses.asdict(dataclasses.replace(b, pretrain_seeds=(seed,))), "results": res}
        (tmp_path / (name or f"comparison{f'_p{seed}' if seed else ''}.json")).write_text(json.dumps(doc))

    meta = {"machine": "test"}
    store(0, 0.20)
    assert cm.write_seed_table(tmp_path, budget, meta) is None  # one pretraining seed: no recipe-level table
    assert not (tmp_path / "comparison_seeds.md").exists()
    store(1, 0.22)
    two = cm.write_seed_table(tmp_path, budget, meta)  # two seeds: the values, no verdict
    assert "No cell separates." in two
    assert next(line for line in two.splitlines() if line.startswith("| organ recognition, k-NN k=10, 25% |")
                ).endswith(f"(4) | {cm.NO_VERDICT_FEW_SEEDS} |")
    store(2, 0.21)
    store(3, 0.90, b=dataclasses.replace(budget, steps=budget.steps + 1))  # another budget: left out
    store(4, 0.90, name="comparison_p4_old.json")  # not a comparison's name: left out
    text = cm.write_seed_table(tmp_path, budget, meta)
    row = next(line for line in text.splitlines() if line.startswith("| organ recognition, k-NN k=10, 25% |"))
    lo, hi = cm.t_interval([0.20, 0.22, 0.21])
    assert row.startswith("| organ recognition, k-NN k=10, 25% | 0.200 | 0.220 | 0.210 | "
                          f"0.210 [{lo:.3f}, {hi:.3f}] | 0.120 [")
    assert row.endswith("(4) | above |")
    assert "## dagman: pretraining seeds 0, 1, 2" in text and "seed 3" not in text
    saved = json.loads((tmp_path / "comparison_seeds.json").read_text())
    assert saved["seeds"] == [0, 1, 2]
    cell = next(r for r in saved["presets"]["dagman"] if r["cell"] == "organ recognition, linear probe, 25%")
    assert cell["seeds"] == {"0": 0.2, "1": 0.22, "2": 0.21} and cell["verdict"] == "above"
    assert "| dagman | organ recognition, k-NN k=10, 25% | above |" in text.split("## dagman")[0]


def test_clustering_cells_are_judged_against_random_inits_draws(cm, tmp_path):
    budget = dataclasses.replace(cm.Budget.quick(), size="cpu")

    def clu(nmi, ci):
        c = {k: {"mean": 1.0, "std": 0.0, "values": [1.0], "ci": [0.9, 1.1]} for k in cm.CLUSTER_KEYS}
        c["kmeans_nmi"] = {"mean": nmi, "std": 0.0, "values": [nmi], "ci": ci}
        return {**c, "n_crops": 10, "n_classes": 3}

    res = {nset: {"lp": {"mean": {}, "sa": {}, "ref": {}}, "ft": {}} for nset, _ in cm.NODULE_SETS}
    res.update(recognition={}, diversity={}, seg={}, draws={"lp": {}, "recognition": []})
    res["cluster"] = {cm.RANDOM: clu(0.27, [0.20, 0.34]), "dagman": clu(0.40, [0.37, 0.43])}
    meta = {"machine": "test", "evaluation_seconds_recorded": 0.0, "command": "x"}
    table = lambda text: text.split("## Organ clustering")[1].split("\n## ")[0]  # noqa: E731
    assert "0.400 [0.370, 0.430] ▲" in table(cm.write_tables(tmp_path, budget, res, meta))
    res["draws"]["cluster"] = [res["cluster"][cm.RANDOM], clu(0.38, None), clu(0.30, None)]
    text = table(cm.write_tables(tmp_path, budget, res, meta))
    assert "▲" not in text  # one weight draw of random init reaches inside dagman's interval
    assert "| random init, 3 weight draws: mean [lowest, highest] |  |  | 1.000 [1.000, 1.000] | " \
           "1.000 [1.000, 1.000] | 0.317 [0.270, 0.380] | 1.000 [1.000, 1.000] |" in text


def test_report_only_keeps_the_machine_that_computed_the_tables(cm, tmp_path):
    """--report-only rewrites the tables from the stored units; their machine and command stay those of the run
    that computed them (not of the process that only rewrote them)."""
    (tmp_path / "comparison.json").write_text(json.dumps({"meta": {"machine": "the box that computed it",
                                                                   "command": "python the-command-that-ran"}}))
    assert cm.main(["--quick", "--size", "cpu", "--out", str(tmp_path), "--report-only"]) == 0
    text = (tmp_path / "comparison.md").read_text()
    assert "Machine: the box that computed it." in text and "Command: `python the-command-that-ran`" in text
    assert json.loads((tmp_path / "comparison.json").read_text())["meta"]["machine"] == "the box that computed it"
    fresh = tmp_path / "fresh"  # nothing stored before: this process's machine
    assert cm.main(["--quick", "--size", "cpu", "--out", str(fresh), "--report-only"]) == 0
    assert "Machine: the box" not in (fresh / "comparison.md").read_text()
