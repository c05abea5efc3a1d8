"""End-to-end pretraining: every method runs, resume is exact, DDP equals one process with the whole batch."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.networks.nets import SwinUNETR

from dagman.cli import main as cli_main
from dagman.config import METHODS, load_config, plan_steps
from dagman.data.views import make_synthetic_cache
from dagman.train.checkpoint import load_checkpoint, load_encoder
from dagman.train.distributed import DistInfo
from dagman.train.loop import build_state, train_step
from dagman.train.logging import read_metrics
from dagman.train.schedules import Schedules

EXPECTED_LOSSES = {
    "dagman": {"amip", "ampd", "aitd", "gitd"},
    "dagman-no-nt": {"amip", "ampd", "aitd", "gitd"},
    "dagman-no-sa": {"amip", "ampd", "gitd"},
    "smit": {"amip", "ampd", "gitd"},
    "ibot": {"ampd", "gitd"},
    "attmask": {"ampd", "aitd"},
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # SYNTHETIC volumes (ellipsoid + noise), enough for a 64^3 crop
    return make_synthetic_cache(tmp_path_factory.mktemp("cache"), 4, (72, 70, 68))


def _run(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "dagman", *args], capture_output=True, text=True, env=full_env,
                          timeout=600)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_pretrains_16_steps_and_exports_a_monai_encoder(method, cache, tmp_path, capsys):
    run = tmp_path / method
    rc = cli_main(["pretrain", "--size", "tiny", "--method", method, "--data", str(cache), "--out", str(run),
                   "--steps", "16", "train.checkpoint_every_steps=8"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "16 steps" in out and "encoder ->" in out
    entries = read_metrics(run / "metrics.jsonl")
    assert [e["step"] for e in entries] == list(range(1, 17))
    logged = {k[len("loss_"):] for k in entries[-1] if k.startswith("loss_")}
    assert logged == EXPECTED_LOSSES[method]
    for e in entries:
        assert math.isfinite(e["loss"]) and all(math.isfinite(e[f"loss_{k}"]) for k in logged)
    assert entries[-1]["skipped_steps"] == 0
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.pt").is_file()
    assert any((run / "tensorboard").iterdir())
    # the encoder drops into MONAI's SwinUNETR with strict loading
    cfg = load_config("tiny", method)
    m = cfg.model
    net = SwinUNETR(in_channels=1, out_channels=2, feature_size=m.embed_dim, depths=m.depths, num_heads=m.num_heads,
                    window_size=m.window_size, patch_size=m.patch_size[0])
    state = load_encoder(run / "encoder.safetensors")
    net.swinViT.load_state_dict(state, strict=True)
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["step"] == 16
    for k, v in state.items():  # the exported encoder is the teacher's backbone
        assert torch.equal(v, ckpt["teacher"][f"encoder.backbone.{k}"]), k


def test_teacher_equals_student_at_step_0_and_differs_after():
    cfg = load_config("tiny", "dagman", overrides=["optim.warmup_epochs=0"])
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False)
    plan = plan_steps(cfg, 8)
    state = build_state(cfg, info, Schedules.from_config(cfg, plan))
    student = state.student_module.net.state_dict()
    teacher = state.teacher.state_dict()
    assert student.keys() == teacher.keys()
    assert all(torch.equal(student[k], teacher[k]) for k in student)
    g = torch.Generator().manual_seed(0)
    views = torch.rand(2, 2, 1, 64, 64, 64, generator=g)
    train_step(state, views[0], views[1])
    student = state.student_module.net.state_dict()
    teacher = state.teacher.state_dict()
    changed = [k for k in student if not torch.equal(student[k], teacher[k])]
    assert changed  # the student moved, the teacher followed by EMA only
    m = state.schedules.at(0).momentum
    k = "encoder.backbone.layers1.0.blocks.0.attn.qkv.weight"
    # teacher = m * old + (1 - m) * new student, and old == initial student
    assert not torch.equal(student[k], teacher[k])


def _state_dicts(run: Path) -> dict:
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    return {"student": ckpt["student"], "teacher": ckpt["teacher"], "method": ckpt["method"],
            "optimizer": ckpt["optimizer"]["state"], "step": ckpt["step"]}


def assert_same_run(a_run: Path, b_run: Path, steps: int) -> None:
    """Two run folders ended bitwise equal after ``steps`` steps: student, teacher, loss centres, Adam state, the
    exported encoder; and ``b_run``'s metrics file has exactly one entry per step (no duplicates after resumes)."""
    a, b = _state_dicts(a_run), _state_dicts(b_run)
    assert a["step"] == b["step"] == steps
    for part in ("student", "teacher", "method"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k}"
    for pid, st in a["optimizer"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"][pid][k]), (pid, k)
    assert [e["step"] for e in read_metrics(b_run / "metrics.jsonl")] == list(range(1, steps + 1))
    ea, eb = load_encoder(a_run / "encoder.safetensors"), load_encoder(b_run / "encoder.safetensors")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


def test_resume_after_kill_is_bitwise_identical(cache, tmp_path):
    common = ["pretrain", "--size", "tiny", "--method", "dagman", "--data", str(cache), "--steps", "20",
              "train.checkpoint_every_steps=10"]
    straight = tmp_path / "straight"
    r = _run(common + ["--out", str(straight)])
    assert r.returncode == 0, r.stderr[-2000:]
    broken = tmp_path / "broken"
    r = _run(common + ["--out", str(broken)], env={"DAGMAN_FAULT_KILL_AFTER_STEP": "13"})
    assert r.returncode == 137  # killed after step 13; last checkpoint at step 10
    assert load_checkpoint(broken / "checkpoints" / "last.pt")["step"] == 10
    assert not (broken / "encoder.safetensors").exists()
    r = _run(["pretrain", "--out", str(broken), "--resume", "--data", str(cache)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_run(straight, broken, 20)


DDP_WORKER = r"""
import os, sys, torch
import torch.distributed as dist
from dagman.config import load_config, plan_steps
from dagman.train.distributed import init_distributed
from dagman.train.loop import build_state, train_step
from dagman.train.schedules import Schedules
torch.set_num_threads(1)
out, method = sys.argv[1], sys.argv[2]
info = init_distributed("cpu")
b = 4 // info.world_size  # per-process batch; the global batch (hence the scaled lr) is 4 either way
cfg = load_config("tiny", method, overrides=["optim.warmup_epochs=0", "model.drop_path_rate=0", f"data.batch_size={b}"])
state = build_state(cfg, info, Schedules.from_config(cfg, plan_steps(cfg, 8, info.world_size)))
g = torch.Generator().manual_seed(123)
views = torch.rand(2, 4, 1, 64, 64, 64, generator=g)  # the global batch: 4 volumes, 2 views
rows = slice(info.rank * b, (info.rank + 1) * b)
train_step(state, views[0, rows], views[1, rows])
if info.rank == 0:
    torch.save({"student": state.student_module.state_dict(), "teacher": state.teacher.state_dict(),
                "method": state.method.state_dict()}, out)
del state  # the DDP wrapper holds the process group: release it before the group is destroyed
if info.distributed:
    import gc
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
"""


@pytest.mark.parametrize("method", ["dagman", "smit"])
def test_ddp_two_gloo_processes_equal_one_process_with_the_whole_batch(method, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one.pt"), method], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(tmp_path / "two.pt"), method], env=env, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a = torch.load(tmp_path / "one.pt", weights_only=True)
    b = torch.load(tmp_path / "two.pt", weights_only=True)
    init = load_config("tiny", method)
    moved = 0
    for part in ("student", "teacher", "method"):
        for k in a[part]:
            assert torch.allclose(a[part][k].float(), b[part][k].float(), atol=1e-5, rtol=0), f"{part}.{k}"
    # and the step did change the weights (so the comparison is not vacuous)
    fresh = build_state(load_config("tiny", method, overrides=["optim.warmup_epochs=0", "model.drop_path_rate=0"]),
                        DistInfo(0, 1, 0, torch.device("cpu"), False),
                        Schedules.from_config(init, plan_steps(init, 8))).student_module.state_dict()
    moved = sum(not torch.equal(fresh[k], a["student"][k]) for k in fresh)
    assert moved > 10


def test_torchrun_pretrain_end_to_end_exits_cleanly(cache, tmp_path):
    """The real command under torchrun (2 gloo processes): it trains, writes one run folder and both processes
    exit 0 (the process group is torn down after the DDP wrapper is released, no abort at exit)."""
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "dagman", "pretrain", "--size", "tiny", "--method", "smit", "--data", str(cache),
                        "--out", str(run), "--steps", "3", "data.batch_size=1"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "terminate called" not in r.stderr
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 3
    assert load_checkpoint(run / "checkpoints" / "last.pt")["world_size"] == 2
    assert (run / "encoder.safetensors").is_file()
    assert [e["step"] for e in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]


def test_collapse_monitor_logs_teacher_spread_and_warns_once_when_it_vanishes(capsys):
    from dagman.log import show_messages
    from dagman.train.loop import COLLAPSE_AFTER_STEPS, _warn_if_collapsed

    show_messages()  # the command line's stderr handler (run alone, nothing else installs it)

    cfg = load_config("tiny", "dagman", overrides=["optim.warmup_epochs=0"])
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False)
    state = build_state(cfg, info, Schedules.from_config(cfg, plan_steps(cfg, 8)))
    views = torch.rand(2, 2, 1, 64, 64, 64, generator=torch.Generator().manual_seed(0))
    metrics = train_step(state, views[0], views[1])
    # a fresh teacher on 4 different inputs: its pooled-token logits differ across them; the SA [CLS] logits
    # hardly do (the class-attention block starts close to its learned token; it must learn to look)
    assert metrics["teacher_global_spread"] > 1e-3
    assert 0.0 <= metrics["teacher_cls_spread"] < metrics["teacher_global_spread"]
    assert not _warn_if_collapsed(COLLAPSE_AFTER_STEPS - 1, {"teacher_cls_spread": 0.0})  # too early to tell
    assert not _warn_if_collapsed(500, {"teacher_cls_spread": 0.0}, total_steps=10_000)  # < a tenth of the run
    assert not _warn_if_collapsed(500, {"teacher_cls_spread": 0.2, "teacher_global_spread": 0.1})
    assert capsys.readouterr().err == ""
    assert _warn_if_collapsed(500, {"teacher_cls_spread": 7e-6, "teacher_global_spread": 0.1})
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "step 500" in err and "teacher_cls_spread 7.0e-06" in err
    # the kinds of collapse, from the entropies of the teacher's targets, each with what to try
    uniform = {"teacher_aitd_entropy": 0.999, "teacher_aitd_mean_entropy": 0.999,
               "teacher_ampd_entropy": 0.3, "teacher_ampd_mean_entropy": 0.8}
    assert _warn_if_collapsed(500, uniform)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "uniform collapse of aitd (aitd H 1.00 of ln K)" in err
    assert "sinkhorn_knopp" in err and "ampd" not in err
    # a run that already normalises with Sinkhorn-Knopp is told so, and is not told to switch it on
    assert _warn_if_collapsed(500, uniform, teacher_norm="sinkhorn_knopp")
    err = capsys.readouterr().err
    assert "uniform collapse of aitd" in err and "under Sinkhorn-Knopp; try loss.koleo_head_weight=0.01" in err
    assert "teacher_norm=sinkhorn_knopp" not in err
    assert _warn_if_collapsed(500, {"teacher_gitd_entropy": 0.01, "teacher_gitd_mean_entropy": 0.02})
    assert "one-prototype collapse of gitd" in capsys.readouterr().err
    assert not _warn_if_collapsed(500, {"teacher_gitd_entropy": 0.01, "teacher_gitd_mean_entropy": 0.6})


def test_the_collapse_warning_reads_the_mean_of_the_last_steps(capsys):
    from dagman.log import show_messages
    from dagman.train.loop import SUMMARY_STEPS, _warn_if_collapsed, window_mean

    show_messages()

    healthy = {"teacher_gitd_entropy": 0.2, "teacher_gitd_mean_entropy": 0.35, "teacher_global_spread": 0.1}
    by_chance = {"teacher_gitd_entropy": 0.04, "teacher_gitd_mean_entropy": 0.04, "teacher_global_spread": 0.1}
    assert _warn_if_collapsed(500, by_chance)  # one batch alone looks collapsed ...
    capsys.readouterr()
    window = [healthy] * (SUMMARY_STEPS - 1) + [by_chance]
    mean = window_mean(window)
    assert abs(mean["teacher_gitd_mean_entropy"] - (0.35 * (SUMMARY_STEPS - 1) + 0.04) / SUMMARY_STEPS) < 1e-12
    assert not _warn_if_collapsed(500, mean)  # ... the window does not
    assert _warn_if_collapsed(500, window_mean([by_chance] * SUMMARY_STEPS))
    assert "one-prototype collapse of gitd" in capsys.readouterr().err
    assert window_mean([]) == {} and window_mean([{"a": 1.0, "b": 2.0}, {"a": 3.0}]) == {"a": 2.0}
