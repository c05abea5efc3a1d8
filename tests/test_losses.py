"""Distillation and reconstruction losses: hand-computed values, centring, Sinkhorn-Knopp, masks, gradients,
DDP centre and DDP Sinkhorn-Knopp."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dagman.config import ConfigError, load_config
from dagman.ssl.losses import DistillationLoss, MaskedReconstructionLoss, sinkhorn_knopp
from dagman.ssl.method import SSLMethod


def _manual_ce(student, teacher, center, st, tt):
    """-sum_k P_t log P_s for one pair of logit rows, with explicit loops (plain Python floats)."""
    t = [(teacher[k] - center[k]) / tt for k in range(len(teacher))]
    mt = max(t)
    zt = sum(math.exp(v - mt) for v in t)
    p_t = [math.exp(v - mt) / zt for v in t]
    s = [student[k] / st for k in range(len(student))]
    ms = max(s)
    log_zs = ms + math.log(sum(math.exp(v - ms) for v in s))
    return -sum(p_t[k] * (s[k] - log_zs) for k in range(len(s)))


S2 = [[0.2, -0.1, 0.4], [1.0, 0.0, -1.0]]
T2 = [[0.3, 0.1, -0.2], [0.05, 0.5, 0.0]]


def test_image_token_loss_hand_value():
    loss = DistillationLoss(3)
    value = loss(torch.tensor(S2), torch.tensor(T2), student_temp=0.1, teacher_temp=0.04)
    expected = (_manual_ce(S2[0], T2[0], [0] * 3, 0.1, 0.04) + _manual_ce(S2[1], T2[1], [0] * 3, 0.1, 0.04)) / 2
    assert value.dtype == torch.float32 and value.dim() == 0
    assert value.item() == pytest.approx(expected, rel=1e-5)
    # a literal anchor for the first pair, by hand: teacher softmax of (0.3, 0.1, -0.2)/0.04 = (7.5, 2.5, -5)
    # = (0.993304, 0.0066929, 3.69e-6); student log-softmax of (2, -1, 4): logsumexp = 4 + log(1 + e^-2 + e^-5)
    # = 4.132844 -> (-2.132844, -5.132844, -0.132844); CE = 2.118563 + 0.034354 + 0.0000005 = 2.152918
    p_t = np.exp([7.5, 2.5, -5.0]) / np.exp([7.5, 2.5, -5.0]).sum()
    log_p_s = np.array([2.0, -1.0, 4.0]) - np.log(np.exp([2.0, -1.0, 4.0]).sum())
    assert _manual_ce(S2[0], T2[0], [0] * 3, 0.1, 0.04) == pytest.approx(float(-(p_t * log_p_s).sum()), rel=1e-12)
    assert float(-(p_t * log_p_s).sum()) == pytest.approx(2.152918, abs=2e-6)


def test_patch_token_loss_hand_value_with_and_without_weights():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 4, 5, generator=g)
    t = torch.randn(3, 4, 5, generator=g)
    center = torch.randn(1, 5, generator=g)
    w = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 2.0]])
    loss = DistillationLoss(5)
    loss.center.copy_(center)
    ce = np.zeros((3, 4))
    for b in range(3):
        for i in range(4):
            ce[b, i] = _manual_ce(s[b, i].tolist(), t[b, i].tolist(), center[0].tolist(), 0.1, 0.07)
    # no weights: mean over all tokens and samples
    assert loss(s, t, 0.1, 0.07).item() == pytest.approx(ce.mean(), rel=1e-5)
    # weights: per-sample weighted mean over tokens (sample 1 has none -> 0), then the mean over 3 samples
    per_sample = [
        (ce[0, 0] + ce[0, 2] + ce[0, 3]) / 3,
        0.0,
        (0.5 * ce[2, 0] + 2.0 * ce[2, 3]) / 2.5,
    ]
    assert loss(s, t, 0.1, 0.07, weights=w).item() == pytest.approx(sum(per_sample) / 3, rel=1e-5)
    # a bool mask behaves as 0/1 weights
    assert loss(s, t, 0.1, 0.07, weights=w > 0.7).item() == pytest.approx(
        (per_sample[0] + 0.0 + ce[2, 3]) / 3, rel=1e-5
    )


def test_center_ema_update_values():
    loss = DistillationLoss(3, center_momentum=0.9)
    assert torch.equal(loss.center, torch.zeros(1, 3))
    t1 = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])  # mean (2, 2, 2)
    loss.update_center(t1)
    assert torch.allclose(loss.center, torch.tensor([[0.2, 0.2, 0.2]]))
    t2 = torch.tensor([[[0.0, 10.0, 0.0], [4.0, 0.0, 0.0]]])  # (1, 2, 3): mean over tokens (2, 5, 0)
    loss.update_center(t2)
    assert torch.allclose(loss.center, torch.tensor([[0.9 * 0.2 + 0.2, 0.9 * 0.2 + 0.5, 0.9 * 0.2]]))
    # the centre is a buffer: saved and restored with the state dict
    state = loss.state_dict()
    assert set(state) == {"center"}
    other = DistillationLoss(3)
    other.load_state_dict(state)
    assert torch.equal(other.center, loss.center)


def test_forward_does_not_update_center_and_uses_it():
    loss = DistillationLoss(4)
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    offset = torch.tensor([[3.0, -1.0, 0.5, 2.0]])
    base = loss(s, t, 0.1, 0.04)
    assert torch.equal(loss.center, torch.zeros(1, 4))
    # a per-prototype offset on the teacher is removed exactly by a centre equal to it
    loss.center.copy_(offset)
    assert loss(s, t + offset, 0.1, 0.04).item() == pytest.approx(base.item(), rel=1e-6)
    # without the centre it changes the loss
    assert abs(DistillationLoss(4)(s, t + offset, 0.1, 0.04).item() - base.item()) > 1e-2


def test_centring_counters_a_dominant_prototype_and_sharpening():
    """Teacher logits favouring prototype 0 on every sample: after enough centre updates the centred teacher
    distribution is no longer dominated by it (DINO's collapse guard); a lower temperature sharpens."""
    loss = DistillationLoss(3)
    g = torch.Generator().manual_seed(1)
    t = torch.randn(64, 3, generator=g) * 0.1 + torch.tensor([1.0, 0.0, 0.0])
    before = loss.teacher_probs(t, 0.1)[:, 0].mean().item()
    for _ in range(60):
        loss.update_center(t)
    after = loss.teacher_probs(t, 0.1)[:, 0].mean().item()
    assert before > 0.99 and after < 0.5
    p_sharp, p_soft = loss.teacher_probs(t, 0.04), loss.teacher_probs(t, 0.07)
    entropy = lambda p: float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean())  # noqa: E731
    assert entropy(p_sharp) < entropy(p_soft)


def test_gradients_flow_only_to_the_student():
    loss = DistillationLoss(6)
    s = torch.randn(2, 3, 6, requires_grad=True)
    t = torch.randn(2, 3, 6, requires_grad=True)
    loss(s, t, 0.1, 0.04, weights=torch.tensor([[1.0, 0, 1], [0, 1, 0]])).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert s.grad[0, 1].abs().sum() == 0  # unweighted tokens get no gradient
    # the gradient of the CE wrt student logits is (P_s - P_t) / st / (weight sum * B), e.g. token (0, 0)
    p_s = torch.softmax(s.detach()[0, 0] / 0.1, -1)
    p_t = torch.softmax(t.detach()[0, 0] / 0.04, -1)
    assert torch.allclose(s.grad[0, 0], (p_s - p_t) / 0.1 / 2 / 2, atol=1e-5)


def test_distillation_rejects_mismatched_shapes():
    loss = DistillationLoss(4)
    with pytest.raises(ValueError):
        loss(torch.randn(2, 4), torch.randn(3, 4), 0.1, 0.04)
    with pytest.raises(ValueError):
        loss(torch.randn(2, 5), torch.randn(2, 5), 0.1, 0.04)
    with pytest.raises(ValueError):
        loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), 0.1, 0.04, weights=torch.ones(2, 4))


def _center_worker(rank: int, world: int, init_file: str, queue) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        loss = DistillationLoss(2, center_momentum=0.5)
        # rank 0: two rows with mean (1, 1); rank 1: one row (4, -2). Global mean over 3 rows: (2, 0)
        rows = torch.tensor([[0.0, 2.0], [2.0, 0.0]]) if rank == 0 else torch.tensor([[4.0, -2.0]])
        loss.update_center(rows)
        queue.put((rank, loss.center.tolist()))
    finally:
        dist.destroy_process_group()


def _two_processes(target, init_file: str, per_rank_args=((), ())) -> dict:
    """Run ``target(rank, 2, init_file, *args, queue)`` in two spawned gloo processes; {rank: what it put}."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, 2, init_file, *per_rank_args[r], queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def test_center_is_all_reduced_across_processes(tmp_path):
    results = _two_processes(_center_worker, str(tmp_path / "init"))
    assert results[0] == results[1] == [[1.0, 0.0]]  # 0.5 * 0 + 0.5 * (2, 0)


# ------------------------------------------------------------------------------------- Sinkhorn-Knopp


def test_sinkhorn_knopp_one_round_hand_value():
    # exp(logits) = [[1, 3], [1, 1]]; columns sum (2, 4) -> scaled to R/K = 1: [[.5, .75], [.5, .25]];
    # rows then sum 1.25 and 0.75 -> [[.4, .6], [2/3, 1/3]]
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    q = sinkhorn_knopp(logits, temp=1.0, iterations=1)
    assert q.flatten().tolist() == pytest.approx([0.4, 0.6, 2 / 3, 1 / 3], abs=1e-6)
    # a temperature divides the logits first: temp 0.5 doubles them -> exp = [[1, 9], [1, 1]]
    q = sinkhorn_knopp(logits / 2, temp=0.5, iterations=1)
    assert q.flatten().tolist() == pytest.approx([0.4, 0.6, 2 / 3, 1 / 3], abs=1e-6)


def test_sinkhorn_knopp_rows_are_distributions_and_columns_equal_shares():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(24, 8, generator=g)
    q = sinkhorn_knopp(logits, temp=0.5, iterations=50)
    assert torch.allclose(q.sum(1), torch.ones(24), atol=1e-6)  # exact after the last (row) step
    assert torch.allclose(q.sum(0), torch.full((8,), 24 / 8), atol=1e-4)  # converged: equal shares
    few = sinkhorn_knopp(logits, temp=0.5, iterations=3)
    assert torch.allclose(few.sum(1), torch.ones(24), atol=1e-6)
    assert (few.sum(0) - 3).abs().max() < (torch.softmax(logits / 0.5, -1).sum(0) - 3).abs().max()


def test_sinkhorn_knopp_spreads_identical_rows_where_centring_cannot_in_one_step():
    # a collapsed teacher (the same logits for every input): Sinkhorn-Knopp gives every row the uniform
    # distribution (no prototype may take more than its share), a fresh centre gives the same peaked row
    row = torch.tensor([2.0, 0.0, -1.0, 0.5])
    logits = row.expand(6, 4).clone()
    q = sinkhorn_knopp(logits, temp=0.1, iterations=3)
    assert torch.allclose(q, torch.full((6, 4), 0.25), atol=1e-6)
    centred = DistillationLoss(4).teacher_probs(logits, 0.1)
    assert centred[0, 0] > 0.99 and torch.allclose(centred, centred[:1].expand(6, 4))


def test_sinkhorn_knopp_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(R, K\)"):
        sinkhorn_knopp(torch.zeros(2, 3, 4), 0.1)
    with pytest.raises(ValueError, match="iterations"):
        sinkhorn_knopp(torch.zeros(2, 3), 0.1, iterations=0)
    with pytest.raises(ValueError, match="normalisation"):
        DistillationLoss(3, norm="softmax")


def test_sinkhorn_loss_image_tokens_and_masked_patch_tokens():
    g = torch.Generator().manual_seed(1)
    k = 5
    loss = DistillationLoss(k, norm="sinkhorn_knopp", sinkhorn_iterations=3)
    s, t = torch.randn(4, k, generator=g), torch.randn(4, k, generator=g)
    p_t = sinkhorn_knopp(t, 0.07, 3)
    expected = -(p_t * torch.log_softmax(s / 0.1, -1)).sum(-1).mean()
    assert float(loss(s, t, 0.1, 0.07)) == pytest.approx(float(expected), rel=1e-6)
    # patch tokens: only the weighted (masked) tokens form the Sinkhorn-Knopp batch
    sp, tp = torch.randn(2, 3, k, generator=g), torch.randn(2, 3, k, generator=g)
    w = torch.tensor([[True, False, True], [False, False, True]])
    probs = loss.teacher_probs(tp, 0.07, w)
    assert torch.allclose(probs[w], sinkhorn_knopp(tp[w], 0.07, 3), atol=1e-7)
    assert torch.allclose(probs[~w], torch.full((3, k), 1 / k))
    ce = -(probs * torch.log_softmax(sp / 0.1, -1)).sum(-1)
    per_sample = (ce * w).sum(1) / w.sum(1)
    assert float(loss(sp, tp, 0.1, 0.07, w)) == pytest.approx(float(per_sample.mean()), rel=1e-6)


def test_teacher_norm_config_key():
    assert load_config("paper", "dagman").loss.teacher_norm == "centering"  # method.md's default
    cfg = load_config("tiny", "dagman", overrides=["loss.teacher_norm=sinkhorn_knopp", "loss.sinkhorn_iterations=5",
                                                   "loss.sinkhorn_queue=16"])
    method = SSLMethod(cfg)
    for fn in (method.aitd_loss, method.gitd_loss, method.ampd_loss):
        assert fn.norm == "sinkhorn_knopp" and fn.sinkhorn_iterations == 5
    assert method.aitd_loss.queue_size == method.gitd_loss.queue_size == 16
    assert method.ampd_loss.queue_size == 0  # patch tokens: many rows per batch already
    with pytest.raises(ConfigError, match="teacher_norm"):
        load_config("tiny", "dagman", overrides=["loss.teacher_norm=softmax"])
    with pytest.raises(ConfigError, match="sinkhorn_iterations"):
        load_config("tiny", "dagman", overrides=["loss.sinkhorn_iterations=0"])


def test_sinkhorn_queue_keeps_the_newest_rows_and_joins_the_normalised_batch():
    loss = DistillationLoss(2, norm="sinkhorn_knopp", sinkhorn_iterations=2, queue_size=3)
    assert int(loss.queue_filled) == 0
    batch = torch.tensor([[1.0, 0.0]])
    # an empty queue: Sinkhorn-Knopp over the batch alone
    assert torch.allclose(loss.teacher_probs(batch, 0.5), sinkhorn_knopp(batch, 0.5, 2))
    loss.update_queue(torch.tensor([[0.0, 1.0], [0.5, 0.5]]))
    loss.update_queue(torch.tensor([[2.0, 0.0], [0.0, 3.0]]))  # 4 rows pushed, 3 kept: the oldest drops
    assert int(loss.queue_filled) == 3
    kept = torch.tensor([[0.5, 0.5], [2.0, 0.0], [0.0, 3.0]])
    assert torch.equal(loss.queue, kept)
    # the batch's targets are its rows of Sinkhorn-Knopp over queue + batch
    expected = sinkhorn_knopp(torch.cat([kept, batch]), 0.5, 2)[-1:]
    assert torch.allclose(loss.teacher_probs(batch, 0.5), expected)
    assert not torch.allclose(expected, sinkhorn_knopp(batch, 0.5, 2))
    # saved with the state dict (exact resume); no queue, no buffers (older checkpoints still load strictly)
    assert {"queue", "queue_filled"} <= set(loss.state_dict())
    assert set(DistillationLoss(2, norm="sinkhorn_knopp").state_dict()) == {"center"}
    assert set(DistillationLoss(2, queue_size=5).state_dict()) == {"center"}  # centring: no queue


def _sinkhorn_worker(rank: int, world: int, init_file: str, rows: list, queue) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        queue.put((rank, sinkhorn_knopp(torch.tensor(rows), 0.2, 3).tolist()))
    finally:
        dist.destroy_process_group()


def test_sinkhorn_knopp_under_ddp_equals_one_process_on_the_whole_batch(tmp_path):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 6, generator=g)
    split = ((logits[:3].tolist(),), (logits[3:].tolist(),))  # unequal shares of the global batch
    results = _two_processes(_sinkhorn_worker, str(tmp_path / "init"), split)
    together = torch.tensor(results[0] + results[1])
    assert torch.allclose(together, sinkhorn_knopp(logits, 0.2, 3), atol=1e-6)


# ---------------------------------------------------------------------------------------------- AMIP


def test_masked_reconstruction_hand_value():
    pred = torch.tensor([[[[[1.0, 2.0], [3.0, 4.0]]]]])  # (1, 1, 1, 2, 2)
    target = torch.tensor([[[[[0.0, 0.0], [5.0, 4.5]]]]])
    mask = torch.tensor([[[[True, False], [True, True]]]])  # (1, 1, 2, 2)
    # |1-0| + |3-5| + |4-4.5| over 3 masked voxels = 3.5 / 3
    loss = MaskedReconstructionLoss()
    assert loss(pred, target, mask).item() == pytest.approx(3.5 / 3)
    assert loss(pred, target, mask[:, None]).item() == pytest.approx(3.5 / 3)  # (B, 1, D, H, W) mask


def test_masked_reconstruction_multichannel_batch_and_coarse_mask():
    g = torch.Generator().manual_seed(2)
    pred = torch.randn(2, 2, 4, 4, 6, generator=g)
    target = torch.randn(2, 2, 4, 4, 6, generator=g)
    token_mask = torch.tensor([[[[True, False, False]], [[False, False, True]]],
                               [[[False, False, False]], [[False, True, False]]]])  # (2, 2, 1, 3)
    total, count = 0.0, 0
    for b in range(2):
        for z in range(4):
            for y in range(4):
                for x in range(6):
                    if token_mask[b, z // 2, y // 4, x // 2]:
                        count += 1
                        for c in range(2):
                            total += abs(pred[b, c, z, y, x].item() - target[b, c, z, y, x].item())
    assert count == 3 * 2 * 4 * 2
    value = MaskedReconstructionLoss()(pred, target, token_mask)
    assert value.item() == pytest.approx(total / (count * 2), rel=1e-5)


def test_masked_reconstruction_zero_mask_is_zero_with_grad():
    pred = torch.randn(2, 1, 4, 4, 4, requires_grad=True)
    value = MaskedReconstructionLoss()(pred, torch.zeros(2, 1, 4, 4, 4), torch.zeros(2, 4, 4, 4, dtype=torch.bool))
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))


def test_masked_reconstruction_gradient_only_on_masked_voxels():
    pred = torch.zeros(1, 1, 2, 2, 2, requires_grad=True)
    target = torch.ones(1, 1, 2, 2, 2)
    mask = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    mask[0, 0, 0, 0] = mask[0, 1, 1, 1] = True
    MaskedReconstructionLoss()(pred, target, mask).backward()
    expected = torch.zeros(1, 1, 2, 2, 2)
    expected[0, 0, 0, 0, 0] = expected[0, 0, 1, 1, 1] = -0.5  # d/dp |p - 1| / 2 at p = 0
    assert torch.equal(pred.grad, expected)
    with pytest.raises(ValueError):
        MaskedReconstructionLoss()(pred, target, torch.zeros(1, 3, 2, 2, dtype=torch.bool))


def test_a_sinkhorn_queue_run_resumes_bitwise(tmp_path):
    """The queue is part of the saved state: 3 steps after a save/restore equal 3 steps straight on."""
    from dagman.config import plan_steps
    from dagman.train.checkpoint import load_checkpoint, save_run_checkpoint
    from dagman.train.distributed import DistInfo
    from dagman.train.loop import build_state, checkpoint_state, restore_state, train_step
    from dagman.config import plan_steps
    from dagman.train.schedules import Schedules

    cfg = load_config("tiny", "dagman", overrides=[
        "model.embed_dim=6", "model.depths=[1,1,1,1]", "model.num_heads=[1,1,1,1]", "sa.num_heads=1",
        "data.crop_size=32", "heads.num_prototypes=32", "heads.hidden_dim=16", "heads.bottleneck_dim=8",
        "optim.warmup_epochs=0", "train.total_steps=10", "loss.teacher_norm=sinkhorn_knopp", "loss.sinkhorn_queue=6"])
    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False)

    def fresh():
        return build_state(cfg, cpu, Schedules.from_config(cfg, plan_steps(cfg, 8)))

    v = torch.rand(2, cfg.data.batch_size, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    a = fresh()
    for _ in range(4):
        train_step(a, v[0], v[1])
    assert int(a.method.aitd_loss.queue_filled) == 6  # 4 steps x 4 rows, the newest 6 kept
    path = save_run_checkpoint(tmp_path, checkpoint_state(a), a.step)
    b = fresh()
    restore_state(b, load_checkpoint(path), path)
    la = [train_step(a, v[0], v[1])["loss"] for _ in range(3)]
    lb = [train_step(b, v[0], v[1])["loss"] for _ in range(3)]
    assert la == lb
    for k, t in a.method.state_dict().items():
        assert torch.equal(t, b.method.state_dict()[k]), k


def test_koleo_hand_values_and_gradient():
    from dagman.ssl.losses import koleo_loss

    # three unit vectors at 0, 90 and 180 degrees: every nearest neighbour is sqrt(2) away
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]) * torch.tensor([[2.0], [0.5], [3.0]])  # norms removed
    assert float(koleo_loss(x)) == pytest.approx(-math.log(math.sqrt(2.0)), abs=1e-6)
    # angles 0, 60, 180 degrees: neighbours 1, 1 (0 and 60 are 2 sin 30 = 1 apart) and sqrt(3) (180 to 60)
    a = torch.tensor([0.0, 60.0, 180.0]) * math.pi / 180
    x = torch.stack([a.cos(), a.sin()], 1)
    assert float(koleo_loss(x)) == pytest.approx(-(0 + 0 + math.log(math.sqrt(3.0))) / 3, abs=1e-6)
    # the gradient pushes the two close rows apart (their distance grows after a small step against it)
    x = torch.tensor([[1.0, 0.0], [0.99, 0.14], [-1.0, 0.0]], requires_grad=True)
    koleo_loss(x).backward()
    moved = torch.nn.functional.normalize(x.detach() - 0.01 * x.grad, dim=1)
    before = torch.nn.functional.normalize(x.detach(), dim=1)
    assert (moved[0] - moved[1]).norm() > (before[0] - before[1]).norm()
    with pytest.raises(ValueError, match="R >= 2"):
        koleo_loss(torch.ones(1, 4))


def test_koleo_weight_enters_the_total_and_is_off_by_default():
    from dagman.ssl.method import StudentNetwork, make_teacher
    from dagman.config import plan_steps
    from dagman.train.schedules import Schedules

    assert load_config("paper", "dagman").loss.koleo_weight == 0.0  # method.md has no such term

    def step(weight):
        _, student, _, out = _tiny_step(f"loss.koleo_weight={weight}")
        out.loss.backward()
        last = torch.cat([q.grad.flatten() for q in student.net.backbone.layers4.parameters()])
        return out, last

    out, grad = step(0.5)
    assert set(out.parts) == {"amip", "ampd", "aitd", "gitd", "koleo"}
    p = {k: float(v) for k, v in out.parts.items()}
    total = p["amip"] + 0.1 * (p["ampd"] + p["aitd"] + p["gitd"]) + 0.5 * p["koleo"]
    assert float(out.loss.detach()) == pytest.approx(total, rel=1e-6)
    out_off, grad_off = step(0.0)
    assert "koleo" not in out_off.parts
    same = {k: v for k, v in p.items() if k != "koleo"}
    assert {k: float(v) for k, v in out_off.parts.items()} == pytest.approx(same)
    assert not torch.allclose(grad, grad_off)  # KoLeo's gradient reaches the backbone's last stage
    cfg = load_config("tiny", "dagman", overrides=["loss.koleo_weight=0.5", "train.total_steps=100"])
    student = StudentNetwork(cfg)
    one = torch.rand(1, 1, 64, 64, 64)
    values = Schedules.from_config(cfg, plan_steps(cfg, num_volumes=10)).at(30)
    single = SSLMethod(cfg)(student, make_teacher(student), one, one, values, torch.Generator().manual_seed(2))
    assert "koleo" not in single.parts  # one crop per view: no neighbour, no term (held-out measures, attention)
    with pytest.raises(ConfigError, match="batch_size >= 2"):
        load_config("tiny", "dagman", overrides=["loss.koleo_weight=0.1", "data.batch_size=1"])
    with pytest.raises(ConfigError, match="koleo_weight"):
        load_config("tiny", "dagman", overrides=["loss.koleo_weight=-1"])


def _tiny_step(*overrides: str):
    """One seeded tiny DAGMaN step (weights from torch seed 0, views from 1, masks from 2, drop path from 3) with
    ``overrides``: (config, student, views ``(2, B, 1, S, S, S)``, step output)."""
    from dagman.config import plan_steps
    from dagman.ssl.method import StudentNetwork, make_teacher
    from dagman.train.schedules import Schedules

    cfg = load_config("tiny", "dagman", overrides=[*overrides, "train.total_steps=100"])
    torch.manual_seed(0)
    student = StudentNetwork(cfg)
    teacher = make_teacher(student)
    views = torch.rand(2, 2, 1, 64, 64, 64, generator=torch.Generator().manual_seed(1))
    values = Schedules.from_config(cfg, plan_steps(cfg, num_volumes=10)).at(30)
    torch.manual_seed(3)
    out = SSLMethod(cfg)(student, teacher, views[0], views[1], values, torch.Generator().manual_seed(2))
    return cfg, student, views, out


def _koleo_step(weight_key: str, weight: float):
    """One tiny DAGMaN step with ``loss.{weight_key}=weight``: (student, step output, the student's output
    recomputed from the same masked forward)."""
    _, student, views, out = _tiny_step(f"loss.{weight_key}={weight}")
    torch.manual_seed(3)
    s_out = student(torch.cat([views[0], views[1]]), mask=out.masks["student"])
    return student, out, s_out


def _total_with(out, name: str, weight: float) -> float:
    p = {k: float(v) for k, v in out.parts.items()}
    return p["amip"] + 0.1 * (p["ampd"] + p["aitd"] + p["gitd"]) + weight * p[name]


def test_koleo_on_the_sa_cls_token():
    from dagman.ssl.losses import koleo_loss

    _, out, s_out = _koleo_step("koleo_cls_weight", 0.3)
    assert set(out.parts) == {"amip", "ampd", "aitd", "gitd", "koleo_cls"}
    # the term is KoLeo of the student's SA [CLS] rows of each view
    expected = koleo_loss(s_out.cls[:2]) + koleo_loss(s_out.cls[2:])
    assert float(out.parts["koleo_cls"]) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert float(out.loss.detach()) == pytest.approx(_total_with(out, "koleo_cls", 0.3), rel=1e-6)
    assert load_config("paper", "dagman").loss.koleo_cls_weight == 0.0
    with pytest.raises(ConfigError, match="sa.enabled"):
        load_config("tiny", "smit", overrides=["loss.koleo_cls_weight=0.1"])
    with pytest.raises(ConfigError, match="koleo_cls_weight=0.1 needs data.batch_size >= 2"):
        load_config("tiny", "dagman", overrides=["loss.koleo_cls_weight=0.1", "data.batch_size=1"])


def test_koleo_on_the_image_level_projection_outputs():
    """loss.koleo_head_weight: KoLeo of the student's GITD and AITD projection outputs z, each view's rows, one
    term per projection, summed; refused without an image-level term."""
    from dagman.ssl.losses import koleo_loss

    student, out, s_out = _koleo_step("koleo_head_weight", 0.2)
    assert set(out.parts) == {"amip", "ampd", "aitd", "gitd", "koleo_head"}
    # z is what the prototype layers read: their logits recomputed from it are the network's
    assert torch.allclose(student.net.global_prototypes(s_out.global_z), s_out.global_logits)
    expected = sum(koleo_loss(z[:2]) + koleo_loss(z[2:]) for z in (s_out.global_z, s_out.cls_z))
    assert float(out.parts["koleo_head"]) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert float(out.loss.detach()) == pytest.approx(_total_with(out, "koleo_head", 0.2), rel=1e-6)
    assert load_config("paper", "dagman").loss.koleo_head_weight == 0.0
    with pytest.raises(ConfigError, match="koleo_head_weight needs loss.gitd or loss.aitd"):
        load_config("tiny", "dagman", overrides=["loss.koleo_head_weight=0.1", "loss.gitd=false", "loss.aitd=false"])


def test_student_slab_thins_the_student_input_only():
    """mask.student_slab_prob: the student sees a slab of z planes (the rest 0); the teacher's targets, the masks and
    the reconstruction target are those of the full crop; off (the default) draws nothing."""
    from dagman.ssl.masking import slab_planes
    from dagman.ssl.method import make_teacher

    _, _, views, off = _tiny_step()
    _, _, _, zero = _tiny_step("mask.student_slab_prob=0")
    assert {k: float(v) for k, v in zero.parts.items()} == {k: float(v) for k, v in off.parts.items()}
    cfg, student, _, on = _tiny_step("mask.student_slab_prob=1", "mask.student_slab_fraction_range=[0.5,0.5]")
    for key in ("aitd", "gitd", "ampd"):  # the teacher saw the full crops
        torch.testing.assert_close(on.teacher_logits[key], off.teacher_logits[key])
    assert torch.equal(on.masks["student"], off.masks["student"])
    assert float(on.parts["amip"]) != pytest.approx(float(off.parts["amip"]))
    # the student's input: the same draws after the masks give each row one slab of 32 of the 64 planes
    x = torch.cat([views[0], views[1]])
    g = torch.Generator().manual_seed(2)
    from dagman.ssl.masking import student_mask_from_config, teacher_drop_mask

    grid = SSLMethod(cfg).unit_grid(tuple(x.shape[2:]))
    teacher_drop_mask(4, grid, cfg.mask.teacher_drop_ratio, g)
    scores = make_teacher(student)(x, mask=on.masks["teacher_drop"]).importance  # attention masks read S
    student_mask_from_config(cfg.mask, batch=4, grid=grid, generator=g, scores=scores.float(), device=x.device)
    keep = slab_planes(4, 64, 1.0, (0.5, 0.5), g)
    assert keep.sum(1).tolist() == [32] * 4
    torch.manual_seed(3)
    s_out = student(x * keep[:, None, None, None, :], mask=on.masks["student"])
    torch.testing.assert_close(on.reconstruction, s_out.reconstruction.detach())
    with pytest.raises(ConfigError, match="mask.student_slab_fraction_range"):
        load_config("tiny", "dagman", overrides=["mask.student_slab_fraction_range=[0.5,0.2]"])
    with pytest.raises(ConfigError, match="mask.student_slab_prob"):
        load_config("tiny", "dagman", overrides=["mask.student_slab_prob=2"])


def test_slab_planes_rows_and_probability():
    from dagman.ssl.masking import slab_planes

    g = torch.Generator().manual_seed(0)
    assert slab_planes(5, 16, 0.0, (0.25, 1.0), g).all()  # off: every plane of every row
    keep = slab_planes(400, 16, 0.5, (0.25, 0.5), torch.Generator().manual_seed(1))
    thinned = ~keep.all(1)
    assert abs(float(thinned.float().mean()) - 0.5) < 0.1
    for row in keep[thinned]:
        kept = torch.nonzero(row).flatten()
        assert 4 <= len(kept) <= 8 and bool((kept.diff() == 1).all())  # one slab of round(0.25..0.5 * 16) planes
    again = slab_planes(400, 16, 0.5, (0.25, 0.5), torch.Generator().manual_seed(1))
    assert torch.equal(keep, again)
