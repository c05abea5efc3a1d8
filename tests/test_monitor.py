"""The learning monitor (dagman.ssl.monitor) on constructed teacher targets, and its numbers in a real step."""

from __future__ import annotations

import math

import pytest
import torch

from dagman.config import load_config, plan_steps
from dagman.ssl.monitor import collapse_advice, collapse_kind, entropy_ratio, learning_summary, teacher_monitor
from dagman.train.distributed import DistInfo
from dagman.train.loop import build_state, train_step
from dagman.train.schedules import Schedules

K = 16


def _numbers(probs):
    return {k: float(v) for k, v in teacher_monitor(probs, "aitd").items()}


def test_uniform_targets_are_a_uniform_collapse():
    m = _numbers(torch.full((8, K), 1 / K))
    assert m["teacher_aitd_entropy"] == pytest.approx(1.0)
    assert m["teacher_aitd_mean_entropy"] == pytest.approx(1.0)
    assert collapse_kind(m, "aitd") == "uniform"


def test_one_hot_on_one_prototype_is_a_one_prototype_collapse():
    probs = torch.zeros(8, K)
    probs[:, 3] = 1.0
    m = _numbers(probs)
    assert m["teacher_aitd_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert m["teacher_aitd_mean_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert collapse_kind(m, "aitd") == "one-prototype"


def test_healthy_targets_sharp_per_row_spread_over_prototypes():
    probs = torch.eye(K)[:8]  # 8 inputs, each sharply on its own prototype
    m = _numbers(probs)
    assert m["teacher_aitd_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert m["teacher_aitd_mean_entropy"] == pytest.approx(math.log(8) / math.log(K))  # 0.75 by hand
    assert collapse_kind(m, "aitd") is None


def test_entropy_ratio_hand_values():
    # two of four prototypes at 1/2: H = ln 2, ln K = ln 4 -> 0.5
    assert float(entropy_ratio(torch.tensor([0.5, 0.5, 0.0, 0.0]))) == pytest.approx(0.5)
    assert entropy_ratio(torch.ones(3, 1)).tolist() == [0.0, 0.0, 0.0]


def test_summary_names_the_collapse_and_advice_says_what_to_try():
    m = {"aitd_uniform_ratio": 0.999, **_numbers(torch.full((4, K), 1 / K)), "importance_entropy": 0.9999}
    line = learning_summary(m)
    assert "aitd 0.999x uniform" in line and "(uniform collapse)" in line and "S entropy 1.000 of ln N" in line
    assert "sinkhorn_knopp" in collapse_advice("uniform") and "sinkhorn_knopp" in collapse_advice("one-prototype")
    assert collapse_advice("uniform", "centering").endswith("collapse at length sits'), or a larger batch")
    assert collapse_advice("uniform", "sinkhorn_knopp") == (
        "the teacher's targets are uniform, so the term sits at 2 ln K and teaches nothing under Sinkhorn-Knopp; "
        "try loss.koleo_head_weight=0.01 for gitd/aitd (at length their projection outputs can turn away from "
        "every prototype: docs/RESULTS.md, 'Where the collapse at length sits') or a larger batch")
    assert collapse_advice("no-input", "sinkhorn_knopp").endswith("try a larger batch or more data")
    assert learning_summary({"loss": 1.0}) == ""


def test_a_dagman_step_logs_the_monitor():
    cfg = load_config("tiny", "dagman", overrides=[
        "model.embed_dim=6", "model.depths=[1,1,1,1]", "model.num_heads=[1,1,1,1]", "sa.num_heads=1",
        "data.crop_size=32", "heads.num_prototypes=64", "heads.hidden_dim=32", "heads.bottleneck_dim=16",
        "optim.warmup_epochs=0", "train.total_steps=4"])
    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False)
    state = build_state(cfg, cpu, Schedules.from_config(cfg, plan_steps(cfg, 8)))
    v = torch.rand(2, cfg.data.batch_size, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    m = train_step(state, v[0], v[1])
    for term in ("aitd", "gitd", "ampd"):
        assert m[f"{term}_uniform_ratio"] == pytest.approx(m[f"loss_{term}"] / (2 * math.log(64)))
        assert 0.0 <= m[f"teacher_{term}_entropy"] <= 1.0 + 1e-6
        assert 0.0 <= m[f"teacher_{term}_mean_entropy"] <= 1.0 + 1e-6
        assert m[f"center_{term}_norm"] >= 0.0
    assert 0.0 < m["importance_entropy"] <= 1.0 + 1e-6
    # the targets the monitor measures are the loss's own: recompute AITD's from the step's teacher logits
    result = state.extra["last_result"]
    t = result.teacher_logits["aitd"]
    b = t.shape[0] // 2
    fn = state.method.aitd_loss
    # (the centre moved after the step: undo it for the recomputation)
    fn.center.sub_(fn.center)  # a fresh run's centre is zero at step 0
    probs = torch.cat([fn.teacher_probs(t[:b], m["teacher_temp"]), fn.teacher_probs(t[b:], m["teacher_temp"])])
    assert float(teacher_monitor(probs, "aitd")["teacher_aitd_entropy"]) == pytest.approx(m["teacher_aitd_entropy"], rel=1e-5)
