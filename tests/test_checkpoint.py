"""Checkpoints: atomic writes, weights-only loading (malicious / corrupt files refused in one line), run-folder
helpers, encoder.safetensors in MONAI's layout, RNG capture/restore."""

from __future__ import annotations

import dataclasses
import os
import pickle
import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from dagman.config import load_config, to_dict
from dagman.errors import DagmanError
from dagman.train import checkpoint as ckpt
from dagman.train.checkpoint import (
    capture_rng_state,
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    load_encoder,
    read_encoder_metadata,
    restore_rng_state,
    save_checkpoint,
    save_encoder_safetensors,
    save_run_checkpoint,
)


def _training_state(step: int = 3) -> dict:
    """A realistic state: model + teacher state dicts, AdamW state after steps, a GradScaler, centres, RNG."""
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    teacher = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    opt = torch.optim.AdamW(
        [{"params": list(student.parameters()), "group_name": "decay", "apply_weight_decay": True}], lr=1e-3
    )
    for _ in range(step):
        student(torch.randn(5, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    return {
        "student": student.state_dict(),
        "teacher": teacher.state_dict(),
        "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict(),
        "centres": {"image": torch.randn(1, 16), "patch": torch.randn(1, 16)},
        "step": step,
        "epoch": 0,
        "config": to_dict(load_config(size="tiny")),
        "rng": capture_rng_state(),
        "nonfinite_streak": 0,
        "best": float("inf"),
    }


def _assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), where


def _is_one_line_refusal(err: DagmanError, path) -> bool:
    text = str(err)
    return text.startswith(f"{path}: not a valid dagman checkpoint (") and text.endswith(")") and "\n" not in text


# ----------------------------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------------------------


def test_round_trip_restores_everything_exactly(tmp_path):
    state = _training_state()
    path = save_checkpoint(tmp_path / "c.pt", state)
    loaded = load_checkpoint(path)
    assert loaded.pop("dagman_checkpoint") == ckpt.FORMAT_VERSION
    _assert_same(state, loaded)
    # the optimiser and scaler accept their state back
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    model.load_state_dict(loaded["student"])
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    opt.load_state_dict(loaded["optimizer"])
    assert opt.param_groups[0]["apply_weight_decay"] is True and opt.state_dict()["state"][0]["step"] == 3
    scaler = torch.amp.GradScaler("cpu")
    scaler.load_state_dict(loaded["scaler"])
    assert scaler.get_scale() == 1024.0
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left


def test_save_refuses_values_weights_only_loading_cannot_read(tmp_path):
    with pytest.raises(TypeError, match=r"state\['extra'\]\['a'\].*numpy.*tolist"):
        save_checkpoint(tmp_path / "c.pt", {"extra": {"a": np.zeros(3)}})
    with pytest.raises(TypeError, match=r"state\['obj'\]"):
        save_checkpoint(tmp_path / "c.pt", {"obj": object()})
    assert not any(tmp_path.iterdir())  # nothing was written


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "c.pt", {"step": 1, "w": torch.ones(3)})
    real_save = torch.save

    def crash(obj, fh, *a, **k):
        fh.write(b"partial bytes")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


class _Evil:
    """Unpickling this would create a marker file (stands in for arbitrary code)."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickles_are_refused_without_running_code(tmp_path):
    marker = tmp_path / "PWNED"
    evil_zip = tmp_path / "evil.pt"
    torch.save({"dagman_checkpoint": 1, "student": _Evil(marker)}, evil_zip)  # torch zip format
    evil_raw = tmp_path / "evil_raw.pt"
    with open(evil_raw, "wb") as fh:
        pickle.dump(_Evil(marker), fh, protocol=2)  # legacy raw pickle
    evil_v4 = tmp_path / "evil_v4.pt"
    with open(evil_v4, "wb") as fh:
        pickle.dump({"x": _Evil(marker)}, fh, protocol=4)
    for path in (evil_zip, evil_raw, evil_v4):
        with pytest.raises(DagmanError) as info:
            load_checkpoint(path)
        assert _is_one_line_refusal(info.value, path), str(info.value)
        with pytest.raises(DagmanError, match="not a valid encoder weight file"):
            load_encoder(path)
    assert "refused" in str(pytest.raises(DagmanError, load_checkpoint, evil_zip).value)
    assert "posix.system" in str(pytest.raises(DagmanError, load_checkpoint, evil_zip).value)
    assert not marker.exists()


def test_corrupt_truncated_and_foreign_files_are_refused(tmp_path):
    good = save_checkpoint(tmp_path / "good.pt", _training_state(step=1))
    data = good.read_bytes()
    cases = {
        "truncated.pt": data[: len(data) // 2],
        "garbage.pt": b"hello, this is not a checkpoint",
        "empty.pt": b"",
        "flipped.pt": data[:100] + bytes(b ^ 0xFF for b in data[100:400]) + data[400:],
    }
    for name, payload in cases.items():
        (tmp_path / name).write_bytes(payload)
    torch.save({"model": torch.ones(2)}, tmp_path / "foreign.pt")  # a plain torch file, no marker
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    torch.save({"dagman_checkpoint": 99}, tmp_path / "future.pt")
    for name in [*cases, "foreign.pt", "list.pt", "future.pt", "missing.pt"]:
        path = tmp_path / name
        with pytest.raises(DagmanError) as info:
            load_checkpoint(path)
        assert _is_one_line_refusal(info.value, path), str(info.value)
    assert "no 'dagman_checkpoint' marker" in str(pytest.raises(DagmanError, load_checkpoint, tmp_path / "foreign.pt").value)
    assert "upgrade" in str(pytest.raises(DagmanError, load_checkpoint, tmp_path / "future.pt").value)
    assert "no such file" in str(pytest.raises(DagmanError, load_checkpoint, tmp_path / "missing.pt").value)
    assert "neither a zip archive nor a pickle" in str(pytest.raises(DagmanError, load_checkpoint, tmp_path / "garbage.pt").value)
    assert "empty file" in str(pytest.raises(DagmanError, load_checkpoint, tmp_path / "empty.pt").value)


# ----------------------------------------------------------------------------------------------------------
# Run folder
# ----------------------------------------------------------------------------------------------------------


def test_run_checkpoints_last_and_periodic(tmp_path):
    run = tmp_path / "run"
    assert latest_checkpoint(run) is None
    save_run_checkpoint(run, {"w": torch.full((2,), 10.0)}, step=10, keep_periodic=True)
    last = save_run_checkpoint(run, {"w": torch.full((2,), 20.0)}, step=20)
    folder = checkpoint_dir(run)
    assert last == folder / "last.pt"
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "step_00000010.pt"]
    found = latest_checkpoint(run)
    assert found.path == last and found.state["step"] == 20 and torch.equal(found.state["w"], torch.full((2,), 20.0))
    # the snapshot kept its own content after last.pt moved on
    assert load_checkpoint(folder / "step_00000010.pt")["step"] == 10
    with pytest.raises(ValueError, match="disagrees"):
        save_run_checkpoint(run, {"step": 5}, step=6)


def test_latest_checkpoint_skips_corrupt_files_with_a_warning(tmp_path):
    run = tmp_path / "run"
    save_run_checkpoint(run, {"w": torch.ones(1)}, step=10, keep_periodic=True)
    save_run_checkpoint(run, {"w": torch.ones(1)}, step=20, keep_periodic=True)
    folder = checkpoint_dir(run)
    (folder / "last.pt").write_bytes(b"torn")  # last.pt and the newest snapshot are damaged
    (folder / "step_00000020.pt").write_bytes((folder / "step_00000010.pt").read_bytes()[:50])
    with pytest.warns(UserWarning) as record:
        found = latest_checkpoint(run)
    assert found.path.name == "step_00000010.pt" and found.state["step"] == 10
    messages = [str(r.message) for r in record]
    assert any("last.pt: not a valid dagman checkpoint" in m for m in messages)
    assert any("step_00000020.pt: not a valid dagman checkpoint" in m for m in messages)
    for p in folder.iterdir():
        p.write_bytes(b"x")
    with pytest.warns(UserWarning):
        assert latest_checkpoint(run) is None


def test_snapshot_newer_than_last_wins_and_stale_temp_files_go(tmp_path):
    run = tmp_path / "run"
    save_run_checkpoint(run, {"w": torch.ones(1)}, step=10)
    folder = checkpoint_dir(run)
    # a writer killed after the snapshot of step 20, before last.pt was replaced, and one killed mid-write
    save_checkpoint(folder / "step_00000020.pt", {"step": 20})
    (folder / ".last.pt.abc123.tmp").write_bytes(b"half")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found = latest_checkpoint(run)
    assert found.path.name == "step_00000020.pt" and found.state["step"] == 20
    save_run_checkpoint(run, {"w": torch.ones(1)}, step=30)
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "step_00000020.pt"]


# ----------------------------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------------------------


def test_encoder_safetensors_loads_into_monai_strictly(tmp_path):
    from monai.networks.nets.swin_unetr import SwinTransformer

    kwargs = dict(spatial_dims=3, **dataclasses.asdict(load_config(size="tiny").model))
    torch.manual_seed(0)
    source = SwinTransformer(**kwargs)
    path = save_encoder_safetensors(
        tmp_path / "encoder.safetensors", source.state_dict(), {"config": "size: tiny\n", "step": 20, "method": "dagman"}
    )
    weights = load_encoder(path)
    assert sorted(weights) == sorted(source.state_dict())
    assert weights["layers1.0.blocks.0.attn.relative_position_index"].dtype == torch.int64
    target = SwinTransformer(**kwargs)
    target.load_state_dict(weights, strict=True)
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k
    meta = read_encoder_metadata(path)
    assert meta["config"] == "size: tiny\n" and meta["step"] == "20" and meta["method"] == "dagman"
    assert meta["format"] == "dagman-encoder" and meta["layout"].endswith("SwinTransformer")
    with pytest.raises(ValueError, match="wrapper prefix"):
        save_encoder_safetensors(tmp_path / "x.safetensors", {"module.a": torch.ones(1)})


def test_load_encoder_accepts_only_safe_tensor_files(tmp_path):
    flat = tmp_path / "flat.pt"
    torch.save({"a.weight": torch.ones(2, 2)}, flat)
    assert torch.equal(load_encoder(flat)["a.weight"], torch.ones(2, 2))
    save_checkpoint(tmp_path / "train.pt", {"student": {"a": torch.ones(1)}})
    torch.save({"a": 1}, tmp_path / "notensors.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    for name, hint in [("train.pt", "dagman export"), ("notensors.pt", "flat"), ("bad.safetensors", ""),
                       ("nope.safetensors", "no such file")]:
        with pytest.raises(DagmanError, match="not a valid encoder weight file") as info:
            load_encoder(tmp_path / name)
        assert hint in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------------------
# RNG
# ----------------------------------------------------------------------------------------------------------


def _draw():
    return (
        [random.random() for _ in range(3)] + [random.gauss(0, 1) for _ in range(3)],
        np.random.standard_normal(5).tolist() + np.random.randint(0, 1000, 3).tolist(),
        torch.randn(4).tolist() + torch.randint(0, 1000, (3,)).tolist(),
    )


def test_rng_state_restores_identical_draws_through_a_checkpoint(tmp_path):
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    random.gauss(0, 1)  # leaves python's gauss_next set
    np.random.standard_normal()  # leaves numpy's cached gaussian set
    state = capture_rng_state()
    assert state["python"]["gauss_next"] is not None and state["numpy"]["has_gauss"] == 1
    first = _draw()
    save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    _draw()  # move every generator on
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert _draw() == first


# ----------------------------------------------------------------------------------------------------------
# The pieces compose into an exact resume
# ----------------------------------------------------------------------------------------------------------


def _train(run, start: int, stop: int, total: int = 20):
    """Steps ``start..stop-1`` of a toy run using the real schedules / optimiser / EMA / checkpoint helpers;
    resumes from RUN when ``start > 0``. Random inputs and dropout make the result depend on the RNG state."""
    from dagman.config import plan_steps
    from dagman.train.ema import copy_student, update_teacher
    from dagman.train.optim import build_optimizer, cancel_gradients, clip_gradients, last_layer_parameters, set_lr_wd
    from dagman.train.schedules import Schedules

    cfg = load_config(size="tiny", overrides=[f"train.total_steps={total}", "optim.lr=0.05"])
    sched = Schedules.from_config(cfg, plan_steps(cfg, num_volumes=4))
    torch.manual_seed(0)
    student = nn.Module()
    student.body = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Dropout(0.2), nn.LayerNorm(16))
    student.last_layer = nn.Linear(16, 3)
    teacher = copy_student(student)
    opt = build_optimizer(student, cfg.optim)
    if start > 0:
        state = latest_checkpoint(run).state
        assert state["step"] == start
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        opt.load_state_dict(state["optimizer"])
        restore_rng_state(state["rng"])
    else:
        random.seed(1)
        np.random.seed(1)
        torch.manual_seed(1)
    for step in range(start, stop):
        v = sched.at(step)
        set_lr_wd(opt, v.lr, v.weight_decay)
        x = torch.randn(8, 6) + float(np.random.rand()) + random.random()
        loss = student.last_layer(student.body(x)).log_softmax(-1).mean(0).sum().neg() / v.teacher_temp
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if v.last_layer_frozen:
            cancel_gradients(last_layer_parameters(student))
        clip_gradients(student.parameters(), cfg.optim.grad_clip)
        opt.step()
        update_teacher(student, teacher, v.momentum)
    save_run_checkpoint(
        run,
        {"student": student.state_dict(), "teacher": teacher.state_dict(), "optimizer": opt.state_dict(),
         "rng": capture_rng_state(), "config": to_dict(cfg)},
        step=stop,
    )
    return student.state_dict(), teacher.state_dict()


def test_twenty_steps_equal_ten_plus_resumed_ten_bitwise(tmp_path):
    straight = _train(tmp_path / "a", 0, 20)
    _train(tmp_path / "b", 0, 10)
    random.seed(99)  # whatever happens in between must not matter
    np.random.seed(99)
    torch.manual_seed(99)
    resumed = _train(tmp_path / "b", 10, 20)
    for a, b in zip(straight, resumed):
        _assert_same(a, b)
    changed = _train(tmp_path / "c", 0, 20, total=21)[0]  # sanity: a different schedule gives other weights
    assert not torch.equal(changed["body.0.weight"], straight[0]["body.0.weight"])
