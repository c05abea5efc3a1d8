"""benchmarks/learning_check.py and benchmarks/collapse_diagnosis.py on a SYNTHETIC cache (a smoke run of the
scripts and the arithmetic of their measures; the real runs are in docs/RESULTS.md)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
SMALLEST = ["model.embed_dim=6", "model.depths=[1,1,1,1]", "model.num_heads=[1,1,1,1]", "sa.num_heads=1",
            "data.crop_size=32", "heads.num_prototypes=16", "heads.hidden_dim=16", "heads.bottleneck_dim=8",
            "data.num_workers=0"]


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(BENCH))
    import collapse_diagnosis
    import learning_check

    yield learning_check, collapse_diagnosis
    sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from dagman.data.views import make_synthetic_cache

    return make_synthetic_cache(tmp_path_factory.mktemp("syn") / "cache", n_volumes=3, shape=(40, 40, 40))


def _smallest_state():
    """The untrained training state of the smallest `cpu`-preset DAGMaN (SA block and mask units at stage 2)."""
    from dagman.config import load_config, plan_steps
    from dagman.train.distributed import DistInfo
    from dagman.train.loop import build_state
    from dagman.train.schedules import Schedules

    cfg = load_config("cpu", "dagman", overrides=[*SMALLEST, "sa.stage=2", "mask.unit_stage=2"])
    return build_state(cfg, DistInfo(0, 1, 0, torch.device("cpu"), False), Schedules.from_config(cfg, plan_steps(cfg, 3)))


def test_heldout_measures_and_verdicts(scripts, cache):
    learning_check, _ = scripts
    state = _smallest_state()
    m = learning_check.heldout_measures(state, cache, crops=3, seed=0)
    assert m["l1_ratio"] == pytest.approx(m["l1"] / m["mean_predictor_l1"])
    for key in ("aitd_teacher_entropy", "gitd_teacher_entropy", "importance_entropy"):
        assert 0.0 <= m[key] <= 1.0 + 1e-6
    # the entropy of the mean target over 3 crops is over ln 3, so up to ln K / ln 3
    assert 0.0 <= m["aitd_mean_entropy"] <= math.log(16) / math.log(3) + 1e-6
    lines = learning_check.verdicts({"l1_ratio": 0.7, "aitd_teacher_entropy": 0.9, "aitd_mean_entropy": 0.6,
                                     "importance_entropy": 0.95, "teacher_temp": 0.04})
    assert len(lines) == 4  # teacher_temp is not a target
    verdict = {line.split()[0]: line.split()[-1] for line in lines}
    assert verdict == {"l1_ratio": "PASS", "aitd_teacher_entropy": "FAIL", "aitd_mean_entropy": "PASS",
                       "importance_entropy": "FAIL"}


def test_collapse_diagnosis_runs_and_logs_every_measure(scripts, cache, tmp_path, capsys):
    _, collapse_diagnosis = scripts
    work = tmp_path / "diag"
    rc = collapse_diagnosis.main(["--cache", str(cache), "--work", str(work), "--size", "cpu", "--steps", "2",
                                  "--every", "1", "--crops", "2", *SMALLEST])
    assert rc == 0
    rows = [json.loads(line) for line in (work / "diagnosis.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for s in range(5):
        assert rows[-1][f"heldout.stage{s}_cross_sample"] > 0.0  # the crops differ
    for s in range(4):  # (at 32^3 the last stage is a single token: no spread over positions)
        assert rows[-1][f"train.stage{s}_cross_position"] > 0.0
    assert rows[-1]["train.stage4_cross_position"] == 0.0
    assert "teacher_aitd_entropy" in rows[-1] and "heldout.l1_ratio" in rows[-1]
    assert "2 steps in" in capsys.readouterr().out


def test_learning_check_trains_then_measure_only_repeats_the_final_numbers(scripts, cache, tmp_path, capsys):
    """A 2-step run writes result.json; --measure-only on its checkpoint (with the config saved in it, not the
    preset of today) prints the same final measures, the clean-view S entropy among them."""
    learning_check, _ = scripts
    work = tmp_path / "lc"
    over = [*SMALLEST, "sa.stage=2", "mask.unit_stage=2", "sa.temperature=0.5"]
    assert learning_check.main(["--cache", str(cache), "--work", str(work), "--size", "cpu", "--steps", "2",
                                "--crops", "2", *over]) == 0
    final = json.loads((work / "result.json").read_text())["final"]
    assert 0.0 <= final["importance_entropy_clean_view"] <= 1.0 + 1e-6
    capsys.readouterr()
    assert learning_check.main(["--cache", str(cache), "--work", str(work), "--size", "cpu", "--crops", "2",
                                "--measure-only"]) == 0
    printed = capsys.readouterr().out
    assert "at step 2" in printed
    for key in ("l1_ratio", "aitd_teacher_entropy", "importance_entropy"):
        line = next(x for x in printed.splitlines() if x.split() and x.split()[0] == key)
        assert float(line.split()[1]) == pytest.approx(final[key], abs=1e-4)
    assert f"{final['importance_entropy_clean_view']:8.4f}" in printed

    def l1_ratio(text):
        return float(next(x for x in text.splitlines() if x.split() and x.split()[0] == "l1_ratio").split()[1])

    # the same checkpoint with random masks, and on the training volumes: other numbers, said in the header
    assert learning_check.main(["--cache", str(cache), "--work", str(work), "--size", "cpu", "--crops", "2",
                                "--measure-only", "mask.student=random"]) == 0
    random_masks = capsys.readouterr().out
    assert "with mask.student=random" in random_masks and l1_ratio(random_masks) != pytest.approx(final["l1_ratio"])
    assert learning_check.main(["--cache", str(cache), "--work", str(work), "--size", "cpu", "--crops", "2",
                                "--measure-only", "--measure-on", "train"]) == 0
    on_train = capsys.readouterr().out
    assert "TRAINING volumes" in on_train and l1_ratio(on_train) != pytest.approx(final["l1_ratio"])
    with pytest.raises(SystemExit) as e:  # training while measuring on the training volumes: refused, one line
        learning_check.main(["--cache", str(cache), "--work", str(work), "--measure-on", "train"])
    assert e.value.code == 2 and "add --measure-only" in capsys.readouterr().err


def test_head_geometry_sees_both_routes_of_an_image_level_collapse(scripts, cache):
    """head_geometry on constructed teachers: a GITD projection that ignores its input gives the same z for every
    crop (cosine 1, rank 0, logits that do not vary over the crops); a z orthogonal to every prototype gives
    logits that do not vary over K (the uniform corner of docs/RESULTS.md), while AITD keeps its spread."""
    learning_check, _ = scripts
    state = _smallest_state()
    g = learning_check.head_geometry(state, cache, crops=4, seed=0)
    for key in ("pooled_cosine", "gitd_z_cosine", "aitd_z_cosine"):
        assert -1.0 <= g[key] <= 1.0 + 1e-9
    assert g["pooled_rank"] > 1.0 and g["gitd_z_rank"] > 1.0 and g["prototype_rank"] > 1.0
    assert g["gitd_logit_std_over_K"] > 0.05 and g["gitd_logit_std_over_crops"] > 0.0

    net = state.teacher
    last = net.global_mlp.mlp[-1]
    with torch.no_grad():
        last.weight.zero_()  # z = bias, the same for every crop ...
        last.bias.zero_()
        last.bias[0] = 1.0  # ... pointing along the first axis
    g = learning_check.head_geometry(state, cache, crops=4, seed=0)
    assert g["gitd_z_cosine"] == pytest.approx(1.0, abs=1e-9)
    assert g["gitd_z_rank"] == 0.0
    assert g["gitd_logit_std_over_crops"] == pytest.approx(0.0, abs=1e-9)
    assert g["gitd_logit_std_over_K"] > 0.05  # the prototypes still see that one z
    with torch.no_grad():
        net.global_prototypes.weight[:, 0] = 0.0  # every prototype orthogonal to z
    g = learning_check.head_geometry(state, cache, crops=4, seed=0)
    assert g["gitd_logit_std_over_K"] == pytest.approx(0.0, abs=1e-9)
    assert g["aitd_logit_std_over_crops"] > 0.0  # the other term's z still depends on the crop
