"""Numerical faults in pretraining (issue 6): a non-finite loss or gradient skips the step (nothing moves:
student, teacher, optimiser moments, loss centres) and is counted; K bad steps in a row stop the run with one
line; under fp16 the GradScaler skips overflowing steps and a collapsing scale stops the run; under DDP a bad
step on one rank is skipped on every rank."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dagman.config import load_config, plan_steps
from dagman.data.views import make_synthetic_cache
from dagman.errors import DagmanError
from dagman.train.checkpoint import load_checkpoint
from dagman.train.distributed import DistInfo
from dagman.train.logging import read_metrics
from dagman.train.loop import MIN_FP16_LOSS_SCALE, build_state, train_step
from dagman.train.schedules import Schedules

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False)


class Poisoned:
    """Wraps a method so chosen calls return a non-finite loss ("nan", "inf") or a finite loss whose gradient
    is infinite ("grad": + sqrt(w - w.detach()), which is 0 with an infinite derivative)."""

    def __init__(self, inner, plan: dict[int, str], param: torch.nn.Parameter):
        self.inner, self.plan, self.param, self.calls = inner, plan, param, 0

    def __call__(self, *args, **kwargs):
        result = self.inner(*args, **kwargs)
        kind = self.plan.get(self.calls)
        self.calls += 1
        if kind == "nan":
            result.loss = result.loss * float("nan")
        elif kind == "inf":
            result.loss = result.loss + float("inf")
        elif kind == "grad":
            result.loss = result.loss + torch.sqrt(self.param - self.param.detach()).sum()
        return result

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _state(precision: str = "fp32", **overrides):
    extra = [f"{k}={v}" for k, v in overrides.items()]
    cfg = load_config("tiny", "dagman", overrides=["optim.warmup_epochs=0", "model.drop_path_rate=0",
                                                   f"train.precision={precision}", *extra])
    return build_state(cfg, CPU, Schedules.from_config(cfg, plan_steps(cfg, 8)))


def _views(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(2, 2, 1, 64, 64, 64, generator=g)
    return v[0], v[1]


def _snapshot(state) -> dict:
    return copy.deepcopy({"student": state.student_module.state_dict(), "teacher": state.teacher.state_dict(),
                          "method": state.method.state_dict(), "optimizer": state.optimizer.state_dict()["state"]})


def _equal(a: dict, b: dict) -> bool:
    for part in ("student", "teacher", "method"):
        if a[part].keys() != b[part].keys() or not all(torch.equal(a[part][k], b[part][k]) for k in a[part]):
            return False
    if a["optimizer"].keys() != b["optimizer"].keys():
        return False
    return all(torch.equal(v, b["optimizer"][p][k]) for p, st in a["optimizer"].items() for k, v in st.items())


def _poison(state, plan: dict[int, str]) -> Poisoned:
    param = next(state.student_module.net.parameters())
    state.method = Poisoned(state.method, plan, param)
    return state.method


@pytest.mark.parametrize("kind", ["nan", "inf", "grad"])
def test_a_non_finite_step_moves_nothing_and_is_counted(kind):
    state = _state()
    train_step(state, *_views(0))  # one good step first: optimiser moments exist, teacher != initial
    _poison(state, {0: kind})
    before = _snapshot(state)
    metrics = train_step(state, *_views(1))
    assert metrics["skipped_steps"] == 1 and state.skipped_steps == 1 and state.bad_in_row == 1
    assert not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"]))  # reported as measured
    assert _equal(before, _snapshot(state)), "a skipped step changed weights, moments or centres"
    assert state.step == 2  # the schedule still advances
    # the next good step applies, and resets the run of bad steps
    metrics = train_step(state, *_views(2))
    assert np.isfinite(metrics["grad_norm"]) and state.bad_in_row == 0 and state.skipped_steps == 1
    assert not _equal(before, _snapshot(state))


def test_k_bad_steps_in_a_row_stop_with_one_line_and_good_steps_reset_the_count():
    state = _state(**{"train.max_nonfinite_steps": 3})
    # bad, bad, good, bad, bad: never 3 in a row
    _poison(state, {0: "nan", 1: "grad", 3: "inf", 4: "nan", 5: "nan"})
    for i in range(5):
        train_step(state, *_views(i))
    assert state.skipped_steps == 4 and state.bad_in_row == 2
    with pytest.raises(DagmanError) as err:
        train_step(state, *_views(5))  # the third in a row
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("stopping at step 5: 3 steps in a row had a non-finite loss or gradient")


def test_fp16_grad_scaler_skips_an_overflowing_step_halves_its_scale_and_recovers():
    state = _state("fp16")
    assert state.scaler.is_enabled() and state.scaler.get_scale() == 2.0**16
    # start from a scale at which this model's real gradients do not overflow (from 2**16 the scaler would
    # first halve a few times on its own)
    state.scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    train_step(state, *_views(5))  # one good step: the optimiser has its moments (fused AdamW creates them
    # lazily, also on a step the scaler skips)
    assert state.skipped_steps == 0
    scale0 = state.scaler.get_scale()
    _poison(state, {0: "grad"})
    before = _snapshot(state)
    train_step(state, *_views(0))  # finite loss, infinite gradient: the scaler's own skip
    assert state.scaler.get_scale() == scale0 / 2
    assert state.skipped_steps == 1
    assert _equal(before, _snapshot(state)), "the scaler's skipped step changed something"
    metrics = train_step(state, *_views(1))
    assert state.scaler.get_scale() == scale0 / 2  # growth only after growth_interval good steps
    assert state.skipped_steps == 1 and np.isfinite(metrics["loss"])
    assert not _equal(before, _snapshot(state))
    # a non-finite loss under fp16 is caught before the scaler (counts towards the K-in-a-row stop)
    _poison(state, {0: "nan"})
    train_step(state, *_views(2))
    assert state.bad_in_row == 1 and state.skipped_steps == 2


def test_fp16_scale_collapsing_below_the_floor_stops_the_run():
    state = _state("fp16")
    # as if 24 overflowing steps in a row had halved the scale from 2**16
    state.scaler = torch.amp.GradScaler("cpu", init_scale=MIN_FP16_LOSS_SCALE)
    _poison(state, {0: "grad"})
    with pytest.raises(DagmanError) as err:
        train_step(state, *_views(0))
    msg = str(err.value)
    assert "\n" not in msg and "fp16 loss scale fell to" in msg and "bf16" in msg
    assert state.scaler.get_scale() < MIN_FP16_LOSS_SCALE


# ---------------------------------------------------------------------------------------------------------
# The real command: non-finite voxels in a prepared cache (bit rot, a hand-edited .npy)
# ---------------------------------------------------------------------------------------------------------


def _cache_with_nan(root, n_bad: int, n: int = 4):
    cache = make_synthetic_cache(root, n, (72, 70, 68))  # SYNTHETIC volumes
    volumes = sorted(cache.rglob("*.npy"))
    assert len(volumes) == n
    for p in volumes[:n_bad]:
        a = np.load(p, mmap_mode="r+")
        a[...] = np.nan
        a.flush()
        del a
    return cache


def _pretrain(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dagman", "pretrain", "--size", "tiny", "--method", "dagman",
                           *args], capture_output=True, text=True, env=env, timeout=600)


def test_cli_stops_after_k_bad_steps_with_one_line(tmp_path):
    cache = _cache_with_nan(tmp_path / "cache", n_bad=4)
    run = tmp_path / "run"
    r = _pretrain(["--data", str(cache), "--out", str(run), "--steps", "10", "train.max_nonfinite_steps=3",
                   "train.checkpoint_every_steps=1"])
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("dagman: error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr
    assert "stopping at step 2: 3 steps in a row had a non-finite loss or gradient" in errors[0]
    # no encoder; the last checkpoint (after the 2 skipped steps before the stop) holds only finite weights
    assert not (run / "encoder.safetensors").exists()
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["step"] == 2 and ckpt["skipped_steps"] == 2 and ckpt["bad_in_row"] == 2
    for part in ("student", "teacher"):
        assert all(torch.isfinite(v).all() for v in ckpt[part].values() if v.is_floating_point()), part


def test_cli_skips_and_counts_the_steps_that_meet_a_nan_volume(tmp_path):
    cache = _cache_with_nan(tmp_path / "cache", n_bad=1)
    run = tmp_path / "run"
    r = _pretrain(["--data", str(cache), "--out", str(run), "--steps", "8", "train.checkpoint_every_steps=8"])
    assert r.returncode == 0, r.stderr[-2000:]
    entries = read_metrics(run / "metrics.jsonl")
    bad = [e["step"] for e in entries if e["loss"] is None or not np.isfinite(e["loss"])]
    # 4 volumes, batch 2: each epoch of 2 steps has exactly one batch with the NaN volume
    assert len(bad) == 4
    assert entries[-1]["skipped_steps"] == 4
    assert "4 skipped" in r.stdout
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["skipped_steps"] == 4
    for part in ("student", "teacher"):
        assert all(torch.isfinite(v).all() for v in ckpt[part].values() if v.is_floating_point()), part


# ---------------------------------------------------------------------------------------------------------
# DDP: ranks that disagree on a non-finite step
# ---------------------------------------------------------------------------------------------------------

DDP_WORKER = r"""
import sys, torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[2])
from test_numeric_faults import _state, _snapshot, _equal, _poison, _views
from dagman.train.distributed import init_distributed
from dagman.train.loop import train_step
torch.set_num_threads(1)
info = init_distributed("cpu")
from dagman.config import load_config, plan_steps
from dagman.train.loop import build_state
from dagman.train.schedules import Schedules
cfg = load_config("tiny", "dagman", overrides=["optim.warmup_epochs=0", "model.drop_path_rate=0", "train.precision=fp32",
                                               "data.batch_size=1"])
state = build_state(cfg, info, Schedules.from_config(cfg, plan_steps(cfg, 8, info.world_size)))
if info.rank == 1:
    _poison(state, {0: "nan"})  # only rank 1 sees a non-finite loss
v1, v2 = _views(info.rank)
before = _snapshot(state)
train_step(state, v1[:1], v2[:1])
same = _equal(before, _snapshot(state))
flags = [None, None]
dist.all_gather_object(flags, (same, state.skipped_steps))
if info.rank == 0:
    print("RESULT", flags, flush=True)
del state
import gc; gc.collect()
dist.barrier()
dist.destroy_process_group()
"""


def test_ddp_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), "unused", os.path.dirname(__file__)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT")]
    assert line == ["RESULT [(True, 1), (True, 1)]"], r.stdout[-2000:]
