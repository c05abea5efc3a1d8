"""Optimiser groups and per-step settings, metrics logging across resume, and the distributed helpers
(single process without a group; two Gloo processes on the CPU)."""

from __future__ import annotations

import json
import math
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from dagman.config import load_config
from dagman.errors import DagmanError
from dagman.train import distributed as D
from dagman.train.logging import METRICS_FILE, MetricsLogger, read_metrics
from dagman.train.optim import (
    build_optimizer,
    cancel_gradients,
    clip_gradients,
    last_layer_parameters,
    param_groups,
    set_lr_wd,
)

# ----------------------------------------------------------------------------------------------------------
# Optimiser
# ----------------------------------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mask_token = nn.Parameter(torch.ones(1, 4))
        self.embed = nn.Conv3d(1, 4, 2)
        self.norm = nn.LayerNorm(4)
        self.attn = nn.Module()
        self.attn.relative_position_bias_table = nn.Parameter(torch.ones(27, 2))
        self.attn.qkv = nn.Linear(4, 12)
        self.cls_token = nn.Parameter(torch.ones(1, 1, 4))
        self.head = nn.Module()
        self.head.mlp = nn.Linear(4, 4)
        self.head.last_layer = nn.Linear(4, 8, bias=False)
        self.frozen = nn.Parameter(torch.ones(3, 3), requires_grad=False)


def _names(module, params):
    ids = {id(p) for p in params}
    return [n for n, p in module.named_parameters() if id(p) in ids]


def test_weight_decay_groups_follow_the_documented_rule():
    net = Net()
    decay, no_decay = param_groups(net)
    assert decay["apply_weight_decay"] and not no_decay["apply_weight_decay"] and no_decay["weight_decay"] == 0.0
    assert _names(net, decay["params"]) == ["embed.weight", "attn.relative_position_bias_table", "attn.qkv.weight",
                                            "head.mlp.weight", "head.last_layer.weight"]
    assert _names(net, no_decay["params"]) == ["mask_token", "cls_token", "embed.bias", "norm.weight", "norm.bias",
                                               "attn.qkv.bias", "head.mlp.bias"]  # frozen: in neither


def test_set_lr_wd_decays_only_the_regularised_group():
    torch.manual_seed(0)
    net = Net()
    opt = build_optimizer(net, load_config(size="tiny").optim)
    assert [g["apply_weight_decay"] for g in opt.param_groups] == [True, False]
    assert opt.param_groups[0]["betas"] == (0.9, 0.999) and opt.param_groups[0]["eps"] == 1e-8
    set_lr_wd(opt, lr=0.1, weight_decay=0.5)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(0.1, 0.5), (0.1, 0.0)]
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)  # zero gradient: only weight decay moves a parameter
    opt.step()
    after = dict(net.named_parameters())
    factor = torch.tensor(1 - 0.1 * 0.5, dtype=torch.float32)
    assert torch.equal(after["head.mlp.weight"], before["head.mlp.weight"] * factor)
    for name in ("mask_token", "cls_token", "norm.weight", "embed.bias"):
        assert torch.equal(after[name], before[name]), name


def test_pretraining_and_fine_tuning_run_the_same_weight_decay_rule():
    """The trainer (build_state), the prediction tasks' fine-tuning and segment's training loop all build their
    AdamW groups with param_groups: the same parameters decayed, the same ones not."""
    from dagman.config import plan_steps
    from dagman.tasks.finetune import ScoringNetwork, Tuner
    from dagman.tasks.encoder import build_task_encoder
    from dagman.train.distributed import DistInfo
    from dagman.train.loop import build_state
    from dagman.train.schedules import Schedules

    cfg = load_config("tiny", "dagman")
    state = build_state(cfg, DistInfo(0, 1, 0, torch.device("cpu"), False), Schedules.from_config(cfg, plan_steps(cfg, 2)))
    ref = param_groups(state.student)
    assert [[id(p) for p in g["params"]] for g in state.optimizer.param_groups] == [[id(p) for p in g["params"]]
                                                                                   for g in ref]
    net = ScoringNetwork(build_task_encoder("none", size="tiny"))
    tuner = Tuner(net, lr=1e-3, weight_decay=0.05, total_steps=40, clip=1.0)
    names = [_names(net, g["params"]) for g in tuner.optimizer.param_groups]
    assert names == [_names(net, g["params"]) for g in param_groups(net)]
    assert "encoder.backbone.layers1.0.blocks.0.attn.qkv.weight" in names[0]
    assert "encoder.backbone.layers1.0.blocks.0.norm1.weight" in names[1] and "head.bias" in names[1]


def test_tuner_schedule_and_skips():
    """Warm-up 5% (at most 100 steps) then cosine to 0 at the last step; a non-finite loss is skipped, counted
    and still advances the schedule."""
    from dagman.tasks.finetune import Tuner, warmup_steps

    assert [warmup_steps(n) for n in (10, 100, 4000)] == [0, 5, 100]
    lin = nn.Linear(2, 1)
    tuner = Tuner(lin, lr=1.0, weight_decay=0.0, total_steps=100, clip=1.0)
    assert tuner.lrs[0] == 0.0 and tuner.lrs[5] == 1.0 and tuner.lrs[-1] == 0.0 and tuner.lrs[3] == pytest.approx(0.6)
    before = lin.weight.detach().clone()
    assert tuner.step(torch.tensor(float("nan"), requires_grad=True)) is False
    assert tuner.skipped == 1 and tuner.index == 1 and torch.equal(lin.weight, before)
    assert tuner.step(lin(torch.ones(1, 2)).sum()) is True
    assert tuner.optimizer.param_groups[0]["lr"] == pytest.approx(0.2) and not torch.equal(lin.weight, before)


def test_cancelled_last_layer_gets_no_update_at_all():
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.AdamW(param_groups(net), lr=0.1)
    last = last_layer_parameters(net)
    assert last == [net.head.last_layer.weight]
    before = net.head.last_layer.weight.detach().clone()
    net.head.last_layer(net.head.mlp(torch.randn(2, 4))).sum().backward()
    cancel_gradients(last)
    opt.step()
    assert torch.equal(net.head.last_layer.weight, before)  # neither Adam moments nor weight decay
    assert net.head.last_layer.weight not in opt.state and net.head.mlp.weight in opt.state


def test_clip_gradients_returns_the_norm_before_clipping():
    a = nn.Parameter(torch.zeros(2))
    b = nn.Parameter(torch.zeros(1))
    c = nn.Parameter(torch.zeros(1))  # no gradient: ignored
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    norm = clip_gradients([a, b, c], max_norm=0.0)  # measure only
    assert norm.item() == 5.0 and a.grad.tolist() == [3.0, 0.0]
    norm = clip_gradients([a, b, c], max_norm=1.0)
    assert norm.item() == pytest.approx(5.0)
    total = math.sqrt(a.grad.square().sum().item() + b.grad.square().sum().item())
    assert total == pytest.approx(1.0, rel=1e-5)
    assert clip_gradients([c], 1.0).item() == 0.0


# ----------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_metrics_jsonl_and_tensorboard(tmp_path):
    with MetricsLogger(tmp_path) as log:
        entry = log.log(1, {"loss": {"total": torch.tensor(2.5), "amip": 0.5}, "lr": np.float64(1e-4),
                            "frozen": True, "note": "warm-up", "bad": float("nan")})
        log.log(2, {"loss": {"total": 2.0, "amip": 0.25}, "lr": 2e-4})
    assert entry["loss/total"] == 2.5 and entry["bad"] is None
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["step"] == 1 and first["loss/amip"] == 0.5 and first["lr"] == 1e-4 and first["note"] == "warm-up"
    assert first["bad"] is None and first["frozen"] is True and isinstance(first["time"], float)
    scalars = _scalars(tmp_path / "tensorboard")
    assert scalars["loss/total"] == [(1, 2.5), (2, 2.0)]
    assert scalars["frozen"] == [(1, 1.0)] and "note" not in scalars
    with pytest.raises(ValueError, match="reserved"):
        MetricsLogger(tmp_path / "x", tensorboard=False).log(1, {"step": 3})


def test_resume_truncates_later_entries_in_both_outputs(tmp_path):
    with MetricsLogger(tmp_path) as log:
        for step in range(1, 6):
            log.log(step, {"loss": float(step)})
    with open(tmp_path / METRICS_FILE, "a") as fh:
        fh.write('{"step": 6, "loss": 6.0, "ti')  # torn line of a killed process
    with MetricsLogger(tmp_path, resume_step=3) as log:  # checkpoint at step 3: steps 4.. are redone
        assert [e["step"] for e in read_metrics(tmp_path)] == [1, 2, 3]
        for step in range(4, 7):
            log.log(step, {"loss": 10.0 * step})
    assert [(e["step"], e["loss"]) for e in read_metrics(tmp_path)] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)
    ]
    assert _scalars(tmp_path / "tensorboard")["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
    # a fresh (non-resumed) logger starts a new file
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(1, {"loss": 0.5})
    assert [e["step"] for e in read_metrics(tmp_path)] == [1]


def test_resume_tensorboard_independent_of_event_file_name_order(tmp_path):
    """Regression (CI flake): event-file names carry a per-process counter, so a resumed writer's file can
    sort *before* the old one ("...10" < "...9") and TensorBoard's purge_step then drops the wrong events."""
    with MetricsLogger(tmp_path) as log:
        for step in range(1, 5):
            log.log(step, {"loss": float(step)})
    (old,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    old.rename(old.with_name("events.out.tfevents.9999999999.zz.9.9"))  # sorts after any new file
    with MetricsLogger(tmp_path, resume_step=2) as log:
        for step in range(3, 5):
            log.log(step, {"loss": 10.0 * step})
    assert _scalars(tmp_path / "tensorboard")["loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_disabled_logger_touches_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "run", enabled=False)
    assert log.log(1, {"loss": 1.0}) is None
    log.close()
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------------
# Distributed
# ----------------------------------------------------------------------------------------------------------

_TORCHRUN_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def test_single_process_has_no_process_group(monkeypatch):
    for var in _TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    info = D.init_distributed("cpu")
    assert (info.rank, info.world_size, info.local_rank, info.distributed, info.is_main) == (0, 1, 0, False, True)
    assert info.device == torch.device("cpu") and not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert D.init_distributed("auto").distributed is False
    t = torch.tensor([1.0, 3.0])
    assert D.all_reduce_mean_(t) is t and t.tolist() == [1.0, 3.0]
    assert D.gather_object({"a": 1}) == [{"a": 1}] and D.broadcast_object(5) == 5
    D.barrier()
    D.cleanup()
    assert (D.get_rank(), D.get_world_size(), D.is_distributed()) == (0, 1, False)


def test_bad_torchrun_environment_is_a_one_line_error(monkeypatch):
    for var in _TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(DagmanError, match="MASTER_ADDR is not set"):
        D.init_distributed("cpu")
    monkeypatch.setenv("RANK", "zero")
    with pytest.raises(DagmanError, match="RANK='zero' is not an integer"):
        D.init_distributed("cpu")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(DagmanError, match=r"RANK=2 must be in \[0, WORLD_SIZE=2\)"):
        D.init_distributed("cpu")
    with pytest.raises(DagmanError, match="device must be"):
        D.init_distributed("tpu")
    if not torch.cuda.is_available():
        monkeypatch.setenv("WORLD_SIZE", "1")
        with pytest.raises(DagmanError, match="CUDA is not available"):
            D.init_distributed("cuda")


def test_seed_everything_offsets_by_rank():
    import random

    D.seed_everything(3, rank=0)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    D.seed_everything(3, rank=0)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
    assert D.seed_everything(3, rank=1) == 4 and torch.rand(1).item() != a[2]
    assert D.seed_everything(2**32 - 1, rank=2) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import os

    from dagman.train.ema import copy_student, update_teacher

    os.environ.update(
        WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    info = D.init_distributed("cpu", timeout_s=60)
    try:
        centre = torch.tensor([rank + 1.0, 10.0 * (rank + 1)])
        D.all_reduce_mean_(centre)  # centres all-reduced: every rank ends with the mean
        gathered = D.gather_object({"rank": rank})
        token = D.broadcast_object("from-0" if rank == 0 else None)
        # EMA through a real DDP wrapper ("module." names) into an unwrapped teacher
        torch.manual_seed(0)
        student = nn.Linear(2, 2)
        ddp = nn.parallel.DistributedDataParallel(student)
        teacher = copy_student(ddp)
        with torch.no_grad():
            student.weight.fill_(1.0)
            teacher.weight.fill_(0.0)
        update_teacher(ddp, teacher, 0.75)
        D.barrier()
        result = {
            "rank": info.rank, "world": info.world_size, "backend": info.backend, "main": info.is_main,
            "centre": centre.tolist(), "gathered": gathered, "token": token,
            "teacher_type": type(teacher).__name__, "teacher_w": teacher.weight.flatten().tolist(),
        }
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(result, fh)
    finally:
        D.cleanup()


def test_two_gloo_processes_all_reduce_gather_and_ema(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, res in enumerate(results):
        assert res["rank"] == r and res["world"] == 2 and res["backend"] == "gloo" and res["main"] == (r == 0)
        assert res["centre"] == [1.5, 15.0]
        assert res["gathered"] == [{"rank": 0}, {"rank": 1}] and res["token"] == "from-0"
        assert res["teacher_type"] == "Linear" and res["teacher_w"] == [0.25] * 4
