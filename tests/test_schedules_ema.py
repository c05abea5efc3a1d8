"""Per-step schedules at hand-computed steps, and the EMA teacher (exact copy, exact update, name matching)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from dagman.config import load_config, plan_steps
from dagman.train.ema import copy_student, matched_parameters, update_teacher
from dagman.train.schedules import Schedules, cosine_schedule, linear_ramp

# ----------------------------------------------------------------------------------------------------------
# cosine_schedule / linear_ramp
# ----------------------------------------------------------------------------------------------------------


def test_cosine_schedule_warmup_then_cosine_to_exact_final():
    s = cosine_schedule(1.0, 0.0, total_steps=11, warmup_steps=4, warmup_start=0.0)
    assert s.shape == (11,) and s.dtype == np.float64
    # warm-up: i / 4 for i = 0..3, then base at the end of the warm-up (step 4)
    assert s[:5].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    # cosine over steps 4..10 (7 steps, progress i/6): step 5 = (1 + cos(pi/6)) / 2, step 7 = 0.5
    assert s[5] == pytest.approx(0.5 * (1 + math.sqrt(3) / 2), abs=1e-15)
    assert s[7] == pytest.approx(0.5, abs=1e-15)
    assert s[10] == 0.0  # exactly final at the last step
    assert np.all(np.diff(s[4:]) < 0)


def test_cosine_schedule_warmup_start_and_edge_cases():
    s = cosine_schedule(2.0, 1.0, total_steps=6, warmup_steps=2, warmup_start=1.0)
    assert s[:3].tolist() == [1.0, 1.5, 2.0]
    assert s[-1] == 1.0
    assert cosine_schedule(0.996, 1.0, total_steps=1).tolist() == [0.996]  # one cosine step holds base
    assert cosine_schedule(0.996, 1.0, total_steps=2).tolist() == [0.996, 1.0]
    assert cosine_schedule(3.0, 0.0, total_steps=3, warmup_steps=3).tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="exceeds"):
        cosine_schedule(1.0, 0.0, total_steps=3, warmup_steps=4)
    with pytest.raises(ValueError):
        cosine_schedule(1.0, 0.0, total_steps=0)


def test_linear_ramp_with_and_without_hold():
    r = linear_ramp(0.04, 0.07, ramp_steps=4, total_steps=8)
    np.testing.assert_allclose(r, [0.04, 0.0475, 0.055, 0.0625, 0.07, 0.07, 0.07, 0.07], rtol=0, atol=1e-15)
    assert r[4] == 0.07 and r[0] == 0.04
    h = linear_ramp(0.04, 0.07, ramp_steps=2, total_steps=7, hold_steps=3)
    np.testing.assert_allclose(h, [0.04, 0.04, 0.04, 0.04, 0.055, 0.07, 0.07], rtol=0, atol=1e-15)
    assert linear_ramp(1.0, 2.0, ramp_steps=0, total_steps=3, hold_steps=1).tolist() == [1.0, 2.0, 2.0]
    assert linear_ramp(1.0, 2.0, ramp_steps=10, total_steps=3).tolist() == [1.0, 1.1, 1.2]  # cut short


# ----------------------------------------------------------------------------------------------------------
# Schedules from the config
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_schedules():
    # tiny: 10 epochs, lr warm-up 1 epoch, teacher-temperature ramp 2 epochs, patch hold 2 epochs, freeze 1
    # epoch, batch 2 -> peak lr 8e-4 * 2 / 8 = 2e-4. 101 steps -> 10.1 steps/epoch: warm-up round(10.1) = 10,
    # ramps round(20.2) = 20 steps.
    cfg = load_config(size="tiny", method="dagman", overrides=["train.total_steps=101"])
    plan = plan_steps(cfg, num_volumes=50)
    assert plan.peak_lr == pytest.approx(2e-4) and plan.total_steps == 101
    return Schedules.from_config(cfg, plan)


def test_schedules_lr(tiny_schedules):
    s = tiny_schedules
    assert s.total_steps == 101 and s.lr.shape == (101,)
    assert s.at(0).lr == 0.0  # first step
    assert s.at(5).lr == pytest.approx(1e-4, rel=1e-12)  # warm-up middle
    assert s.at(9).lr == pytest.approx(1.8e-4, rel=1e-12)
    assert s.at(10).lr == pytest.approx(2e-4, rel=1e-12)  # end of warm-up = peak
    # cosine over steps 10..100 (91 steps): middle at step 55 = min + (peak - min) / 2
    assert s.at(55).lr == pytest.approx(1e-6 + 0.5 * (2e-4 - 1e-6), rel=1e-12)
    assert s.at(100).lr == 1e-6  # last step: min_lr exactly


def test_schedules_weight_decay_and_momentum(tiny_schedules):
    s = tiny_schedules
    assert s.at(0).weight_decay == pytest.approx(0.04, rel=1e-15)
    assert s.at(50).weight_decay == pytest.approx(0.22, rel=1e-12)  # cosine middle of 0.04 -> 0.4
    assert s.at(100).weight_decay == 0.4
    assert s.at(0).momentum == 0.996
    assert s.at(25).momentum == pytest.approx(1 - 0.002 * (1 + math.sqrt(0.5)), rel=1e-12)
    assert s.at(50).momentum == pytest.approx(0.998, rel=1e-12)
    assert s.at(100).momentum == 1.0  # exactly momentum_end at the last step
    assert np.all(np.diff(s.momentum) > 0)


def test_schedules_temperatures_and_freeze(tiny_schedules):
    s = tiny_schedules
    assert [s.at(i).teacher_temp for i in (0, 10, 20, 100)] == pytest.approx([0.04, 0.055, 0.07, 0.07], rel=1e-12)
    assert s.at(20).teacher_temp == 0.07
    # patch temperature: held at 0.04 for 20 steps, then the same 20-step ramp
    assert [s.at(i).patch_teacher_temp for i in (0, 10, 20, 30, 40, 100)] == pytest.approx(
        [0.04, 0.04, 0.04, 0.055, 0.07, 0.07], rel=1e-12
    )
    assert s.freeze_last_layer_steps == 10
    assert s.at(9).last_layer_frozen is True and s.at(10).last_layer_frozen is False
    assert isinstance(s.at(3).lr, float)
    with pytest.raises(IndexError):
        s.at(101)
    with pytest.raises(IndexError):
        s.at(-1)


def test_paper_momentum_is_indexed_by_global_step_and_reaches_one():
    cfg = load_config(size="paper", method="dagman")
    plan = plan_steps(cfg, num_volumes=10412, world_size=4)  # 10412 // 8 = 1301 steps per epoch, 800 epochs
    s = Schedules.from_config(cfg, plan)
    assert plan.total_steps == 1301 * 800 and s.momentum.shape == (1301 * 800,)
    assert s.momentum[-1] == 1.0
    assert s.momentum[1301] > s.momentum[0]  # not restarted each epoch
    assert s.at(1301 * 80).lr == pytest.approx(8e-4, rel=1e-12)  # warm-up 80 epochs to the peak
    assert s.at(1300).last_layer_frozen and not s.at(1301).last_layer_frozen


def test_schedule_durations_are_clipped_to_the_run():
    cfg = load_config(size="tiny", overrides=["train.steps_per_epoch=100", "train.total_steps=5"])
    s = Schedules.from_config(cfg, plan_steps(cfg, num_volumes=10))
    assert s.total_steps == 5 and s.freeze_last_layer_steps == 5
    assert s.lr.tolist() == pytest.approx([0.0, 4e-5, 8e-5, 1.2e-4, 1.6e-4])  # warm-up 100 steps, cut at 5


# ----------------------------------------------------------------------------------------------------------
# EMA teacher
# ----------------------------------------------------------------------------------------------------------


class Toy(nn.Module):
    def __init__(self, drop: float = 0.0) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.drop = nn.Dropout(drop)
        self.token = nn.Parameter(torch.zeros(1, 3))
        self.register_buffer("index", torch.arange(6))


class Wrapper(nn.Module):
    """Stands in for DDP: parameters named ``module.*``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.module = inner


def _fill(model: nn.Module, values_from: float) -> None:
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape) * 0.5 + values_from + i)


def test_copy_student_is_exact_and_frozen():
    torch.manual_seed(0)
    student = Toy()
    student.lin.weight.grad = torch.ones_like(student.lin.weight)
    teacher = copy_student(student)
    assert type(teacher) is Toy
    for (ns, s), (nt, t) in zip(student.state_dict().items(), teacher.state_dict().items()):
        assert ns == nt and torch.equal(s, t) and s.data_ptr() != t.data_ptr()
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())


def test_copy_student_into_a_separately_built_template():
    torch.manual_seed(0)
    student = Toy(drop=0.1)
    torch.manual_seed(1)
    template = Toy(drop=0.0)  # different init, different dropout (the teacher's own drop rates)
    assert not torch.equal(template.lin.weight, student.lin.weight)
    teacher = copy_student(student, template)
    assert teacher is template and teacher.drop.p == 0.0
    for s, t in zip(student.state_dict().values(), teacher.state_dict().values()):
        assert torch.equal(s, t)
    with pytest.raises(ValueError, match="only in student"):
        copy_student(student, nn.Linear(4, 3))


def test_update_teacher_is_exactly_the_ema_formula():
    student, teacher = Toy(), Toy()
    _fill(student, values_from=8.0)
    _fill(teacher, values_from=-4.0)
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    m = 0.75  # dyadic values and momentum: m*t + (1-m)*s is exact in float32, whatever the kernel order
    update_teacher(student, teacher, m)
    for n, p in teacher.named_parameters():
        expected = m * before[n] + (1 - m) * dict(student.named_parameters())[n]
        assert torch.equal(p, expected), n
    # lin.bias is parameter 2 (after token, lin.weight): 0.75 * (-4 + 2) + 0.25 * (8 + 2) = 1
    assert teacher.lin.bias[0].item() == 1.0 and teacher.lin.bias[1].item() == 1.5


def test_update_teacher_matches_reference_for_generic_values():
    torch.manual_seed(0)
    student, teacher = Toy(), Toy()
    ref = {n: p.double().clone() for n, p in teacher.named_parameters()}
    for _ in range(3):
        update_teacher(student, teacher, 0.996)
        for n, p in student.named_parameters():
            ref[n] = 0.996 * ref[n] + 0.004 * p.double()
    for n, p in teacher.named_parameters():
        torch.testing.assert_close(p.double(), ref[n], rtol=1e-6, atol=1e-7)


def test_momentum_one_leaves_teacher_unchanged_and_zero_copies():
    torch.manual_seed(0)
    student = Toy()
    teacher = copy_student(student)
    _fill(student, values_from=3.0)
    with torch.no_grad():
        student.token.fill_(float("nan"))
    snapshot = {n: p.clone() for n, p in teacher.named_parameters()}
    update_teacher(student, teacher, 1.0)
    assert all(torch.equal(p, snapshot[n]) for n, p in teacher.named_parameters())
    with torch.no_grad():
        student.token.zero_()
    update_teacher(student, teacher, 0.0)
    assert all(torch.equal(t, s) for t, s in zip(teacher.parameters(), student.parameters()))


def test_update_teacher_matches_names_through_wrappers_and_leaves_buffers():
    torch.manual_seed(0)
    student, teacher = Toy(), Toy()
    with torch.no_grad():
        teacher.index.fill_(7)
    update_teacher(Wrapper(student), teacher, 0.5)  # "module." prefix on the student only
    assert torch.equal(teacher.index, torch.full((6,), 7))  # buffers are not averaged
    s, t = matched_parameters(Wrapper(Wrapper(student)), teacher)
    assert [x.shape for x in s] == [x.shape for x in t] and len(s) == 5


def test_update_teacher_refuses_mismatched_names_and_bad_momentum():
    student = Toy()
    other = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="do not match by name"):
        update_teacher(student, other, 0.9)
    teacher = Toy()
    teacher.lin = nn.Linear(4, 5)
    with pytest.raises(ValueError, match="shape"):
        update_teacher(student, teacher, 0.9)
    with pytest.raises(ValueError, match="momentum"):
        update_teacher(student, Toy(), 1.5)


def test_shared_parameters_are_updated_once():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(2, 2, bias=False)
            self.b = self.a  # e.g. AITD and GITD sharing one prototype layer

    student = Shared()
    teacher = copy_student(student)
    assert teacher.a.weight is teacher.b.weight
    with torch.no_grad():
        student.a.weight.fill_(1.0)
        teacher.a.weight.fill_(0.0)
    update_teacher(student, teacher, 0.5)
    assert torch.equal(teacher.a.weight, torch.full((2, 2), 0.5))


def test_distill_start_epochs_weights_the_distillation_terms_zero_until_then():
    # 100 steps over tiny's 10 epochs -> 10 steps per epoch: distillation from step 25 (epoch 2.5)
    cfg = load_config(size="tiny", overrides=["train.total_steps=100", "loss.distill_start_epochs=2.5"])
    s = Schedules.from_config(cfg, plan_steps(cfg, num_volumes=10))
    assert s.distill_start_steps == 25
    assert s.at(24).distill_on is False and s.at(25).distill_on is True
    default = Schedules.from_config(load_config(size="tiny", overrides=["train.total_steps=100"]),
                                    plan_steps(cfg, num_volumes=10))
    assert default.distill_start_steps == 0 and default.at(0).distill_on is True  # method.md: all four from step 0

    from dagman.ssl.method import SSLMethod, StudentNetwork, make_teacher

    torch.manual_seed(0)
    student = StudentNetwork(cfg)
    teacher = make_teacher(student)
    method = SSLMethod(cfg)
    views = torch.rand(2, 2, 1, 64, 64, 64, generator=torch.Generator().manual_seed(1))
    totals = {}
    for on in (False, True):  # the same step's values, distillation off and on
        torch.manual_seed(3)  # drop-path draws
        values = dataclasses.replace(s.at(30), distill_on=on)
        out = method(student, teacher, views[0], views[1], values, torch.Generator().manual_seed(2))
        totals[on] = (float(out.loss), {k: float(v) for k, v in out.parts.items()})
    (off, parts_off), (on, parts_on) = totals[False], totals[True]
    assert parts_off == pytest.approx(parts_on, rel=1e-6)  # the same terms are computed (and logged) either way
    assert set(parts_off) == {"amip", "ampd", "aitd", "gitd"}
    assert off == pytest.approx(parts_off["amip"], rel=1e-6)
    assert on == pytest.approx(parts_on["amip"] + 0.1 * (parts_on["ampd"] + parts_on["aitd"] + parts_on["gitd"]),
                               rel=1e-6)
    with pytest.raises(Exception, match="distill_start_epochs"):
        load_config(size="tiny", overrides=["loss.distill_start_epochs=-1"])
    with pytest.raises(Exception, match="distill_start_epochs=11.0 must not exceed train.epochs=10"):
        load_config(size="tiny", overrides=["loss.distill_start_epochs=11"])
