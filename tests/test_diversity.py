"""Head-diversity measure (method.md sec 7): entropy and attention distance on hand-built attention, the
per-stage aggregation, and the measure on a real backbone whose attention is uniform by construction."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dagman.config import load_config
from dagman.data.views import make_synthetic_cache
from dagman.models.swin import SwinBackbone
from dagman.ssl.diversity import (
    diversity_for_run,
    eval_crops,
    flatten_diversity,
    head_diversity,
    stage_summary,
    stage_token_size,
    token_distances,
    window_attention_distance,
    window_attention_entropy,
)
from dagman.ssl.method import StudentNetwork, make_teacher


def _coords(w: int) -> torch.Tensor:
    g = torch.meshgrid(torch.arange(w), torch.arange(w), torch.arange(w), indexing="ij")
    return torch.stack(g, -1).view(-1, 3)


def test_uniform_attention_has_entropy_log_L_and_mean_pairwise_distance():
    coords = _coords(4)  # L = 64
    L = coords.shape[0]
    probs = torch.full((5, 3, L, L), 1.0 / L)
    ent = window_attention_entropy(probs)
    assert ent.shape == (3,)
    assert torch.allclose(ent, torch.full((3,), math.log(L), dtype=torch.float64), atol=1e-6)
    # token size 4 voxels (stage index 1, patch 2): brute-force mean distance between token centres
    c = coords.double().numpy() * 4
    brute = np.mean([np.linalg.norm(a - b) for a in c for b in c])
    dist = window_attention_distance(probs, coords, (4, 4, 4))
    assert np.allclose(dist.numpy(), brute, atol=1e-5)


def test_one_hot_attention_has_zero_entropy_and_the_distance_to_its_target():
    coords = _coords(2)  # L = 8
    L = coords.shape[0]
    probs = torch.zeros(3, 2, L, L)
    for i, (a, b, c) in enumerate(coords.tolist()):
        probs[:, 0, i, i] = 1.0  # head 0 attends to itself
        j = ((1 - a) * 2 + b) * 2 + c  # head 1: the token one step along axis 0 (offset (+-1, 0, 0))
        probs[:, 1, i, j] = 1.0
    ent = window_attention_entropy(probs)
    assert torch.equal(ent, torch.zeros(2, dtype=torch.float64))
    size = stage_token_size((2, 2, 2), 0)  # Swin stage 1, patch 2 -> 2 voxels per token
    assert size == (2, 2, 2)
    dist = window_attention_distance(probs, coords, size)
    assert dist.tolist() == pytest.approx([0.0, 2.0])
    # anisotropic patch (2, 2, 4): one step along axis 2 is 4 voxels at stage 1, 8 at stage 2
    d = token_distances(coords, stage_token_size((2, 2, 4), 1))
    assert d[0, 1].item() == pytest.approx(8.0) and d[0, 2].item() == pytest.approx(4.0)
    assert d[0, 7].item() == pytest.approx(math.sqrt(4**2 + 4**2 + 8**2))


def test_per_head_values_and_chunked_sums():
    coords = _coords(2)
    L = 8
    probs = torch.zeros(4, 2, L, L)
    probs[:, 0] = 1.0 / L
    probs[:, 1] = torch.eye(L)
    assert window_attention_entropy(probs).tolist() == pytest.approx([math.log(8), 0.0])
    total = window_attention_entropy(probs, reduce=False)
    assert total.tolist() == pytest.approx([4 * L * math.log(8), 0.0])
    # shifted-window style masked keys (probability ~1e-44) contribute nothing and give no NaN
    masked = torch.softmax(torch.tensor([0.0, 0.0, -100.0, -100.0]), -1).view(1, 1, 1, 4).expand(1, 1, 4, 4)
    e = window_attention_entropy(masked.contiguous())
    assert torch.isfinite(e).all() and e.item() == pytest.approx(math.log(2), abs=1e-6)


def test_stage_summary_aggregates_blocks_then_heads():
    ent = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 5.0]])  # (blocks, heads)
    dst = np.array([[10.0, 0.0, 4.0], [20.0, 0.0, 8.0]])
    s = stage_summary(2, ent, dst, window=[4, 4, 4])
    assert s["stage"] == 2 and s["heads"] == 3 and s["blocks"] == 2 and s["window"] == [4, 4, 4]
    assert s["entropy_per_head"] == pytest.approx([2.0, 2.0, 4.0])
    assert s["entropy_mean"] == pytest.approx(8.0 / 3.0)
    assert s["entropy_std"] == pytest.approx(np.std([2.0, 2.0, 4.0]))  # population std across heads
    assert s["distance_per_head"] == pytest.approx([15.0, 0.0, 6.0])
    assert s["distance_mean"] == pytest.approx(7.0)
    assert s["distance_std"] == pytest.approx(math.sqrt((64 + 49 + 1) / 3))
    json.dumps(s)


def _uniform_backbone() -> SwinBackbone:
    torch.manual_seed(0)
    bb = SwinBackbone(in_chans=1, embed_dim=8, window_size=(4, 4, 4), patch_size=(2, 2, 2), depths=(2, 2, 2, 2),
                      num_heads=(1, 2, 2, 4))
    with torch.no_grad():
        for name, p in bb.named_parameters():
            if "attn.qkv" in name or "relative_position_bias_table" in name:
                p.zero_()  # every logit 0: uniform attention, except where shifted windows mask
    return bb


def test_head_diversity_on_a_backbone_with_uniform_attention():
    bb = _uniform_backbone()
    crops = torch.rand(2, 1, 32, 32, 32)  # token grids 16, 8, 4, 2
    res = head_diversity(bb, crops)
    json.dumps(res)
    assert res["crops"] == 2 and res["crop_size"] == [32, 32, 32]
    st = res["stages"]
    assert [s["stage"] for s in st] == [1, 2, 3, 4]
    assert [len(s["entropy_per_head"]) for s in st] == [1, 2, 2, 4]
    assert [len(s["distance_per_head"]) for s in st] == [1, 2, 2, 4]
    assert [s["tokens_per_window"] for s in st] == [64, 64, 64, 8]
    assert [s["token_size_voxels"] for s in st] == [[2] * 3, [4] * 3, [8] * 3, [16] * 3]
    # stages 1-2 (grids 16, 8): unshifted block uniform over 64 tokens; shifted block: along each axis only
    # the last window is cut in two regions (2 + 2 tokens), so of n positions n - 4 see 4 same-region tokens
    # and 4 see 2; regions are products over axes: E[log count] = 3 ((n-4)/n log 4 + 4/n log 2)
    for s, n in zip(st[:2], (16, 8)):
        shifted = 3 * ((n - 4) / n * math.log(4) + 4 / n * math.log(2))
        for head in range(s["heads"]):
            assert s["entropy_per_block"][0][head] == pytest.approx(math.log(64), abs=1e-5)
            assert s["entropy_per_block"][1][head] == pytest.approx(shifted, abs=1e-4)
        assert s["entropy_std"] == pytest.approx(0.0, abs=1e-6)
    # stage 3: the window covers the 4^3 grid, so no shift; stage 4: window shrinks to the 2^3 grid
    assert st[2]["entropy_per_head"] == pytest.approx([math.log(64)] * 2, abs=1e-5)
    assert st[3]["entropy_per_head"] == pytest.approx([math.log(8)] * 4, abs=1e-5)
    cube = (3 * 16 + 3 * 16 * math.sqrt(2) + 16 * math.sqrt(3)) / 8  # mean corner distance, side 16 voxels
    assert st[3]["distance_per_head"] == pytest.approx([cube] * 4, abs=1e-4)
    assert st[3]["distance_std"] == pytest.approx(0.0, abs=1e-6)
    # the same numbers whatever the chunking
    res2 = head_diversity(bb, crops, chunk=2)
    for a, b in zip(res["stages"], res2["stages"]):
        assert a["entropy_per_head"] == pytest.approx(b["entropy_per_head"], abs=1e-9)
        assert a["distance_per_head"] == pytest.approx(b["distance_per_head"], abs=1e-9)


def test_diversity_for_run_on_student_and_teacher_keeps_the_training_flag():
    cfg = load_config("tiny", "dagman", overrides=["data.crop_size=32"])
    torch.manual_seed(0)
    student = StudentNetwork(cfg)
    teacher = make_teacher(student)
    student.train()
    crops = torch.rand(cfg.train.diversity_crops, 1, 32, 32, 32)
    a = diversity_for_run(student, crops)
    b = diversity_for_run(teacher, crops)
    assert student.training and student.net.backbone.training  # restored after the eval-mode pass
    # the teacher starts as an exact copy and drop path is off in eval mode: identical measures
    for sa, sb in zip(a["stages"], b["stages"]):
        assert sa["entropy_per_head"] == pytest.approx(sb["entropy_per_head"], abs=1e-9)
        assert len(sa["entropy_per_head"]) == cfg.model.num_heads[sa["stage"] - 1]
        assert all(0.0 < e <= sa["entropy_max"] + 1e-9 for e in sa["entropy_per_head"])
    flat = flatten_diversity(a)
    assert len(flat) == 16 and flat["diversity/stage1/entropy_mean"] == a["stages"][0]["entropy_mean"]


def test_eval_crops_are_centre_crops_then_seeded_and_pad_small_volumes(tmp_path):
    cache = make_synthetic_cache(tmp_path / "c", 2, [(40, 36, 30), (20, 50, 40)], seed=3)
    crops = eval_crops(cache, 3, 32, seed=5)
    assert crops.shape == (3, 1, 32, 32, 32) and crops.dtype == torch.float32
    v0 = np.load(cache / "volumes" / "synthetic_0000.npy").astype(np.float32)
    v1 = np.load(cache / "volumes" / "synthetic_0001.npy").astype(np.float32)
    # volume 0: centre crop on axes 0 and 1, axis 2 (30 < 32) centred with one voxel of padding each side
    assert torch.equal(crops[0, 0, :, :, 1:31], torch.from_numpy(v0[4:36, 2:34, :]))
    assert torch.all(crops[0, 0, :, :, 0] == 0) and torch.all(crops[0, 0, :, :, 31] == 0)
    # volume 1: axis 0 (20) padded by 6 in front, axes 1-2 centre-cropped
    assert torch.equal(crops[1, 0, 6:26], torch.from_numpy(v1[:, 9:41, 4:36]))
    # crop 2 repeats volume 0 at a seeded origin: reproducible, and seed-dependent
    assert torch.equal(crops, eval_crops(cache, 3, 32, seed=5))
    others = [eval_crops(cache, 3, 32, seed=s)[2] for s in (6, 7, 8)]
    assert any(not torch.equal(o, crops[2]) for o in others)
