"""Mask generators: exact counts, the hint property, determinism, independence, uniformity, block shapes."""

from __future__ import annotations

import math
import typing

import numpy as np
import pytest
import torch
from scipy import ndimage

from dagman.config import MaskConfig, StudentMask, load_config
from dagman.errors import ConfigError
from dagman.ssl.masking import (
    MASK_KINDS,
    _place_block,
    attention_high_mask,
    attention_hint_mask,
    attention_low_mask,
    attention_mask_counts,
    blockwise_mask,
    make_student_mask,
    random_mask,
    random_mask_count,
    student_mask_from_config,
    teacher_drop_mask,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


GRIDS = [(8, 8, 8), (4, 4, 4), (2, 3, 5), (1, 1, 7), (6, 5, 7)]


# ---------------------------------------------------------------------------------------------- counts


@pytest.mark.parametrize(
    "n,r,expected",
    [(512, 0.7, 358), (64, 0.7, 45), (10, 0.7, 7), (10, 0.25, 3), (30, 0.5, 15), (7, 0.0, 0), (7, 1.0, 7)],
)
def test_random_count_is_round_half_up(n, r, expected):
    # 0.7*512 = 358.4 -> 358; 0.7*64 = 44.8 -> 45; 0.25*10 = 2.5 -> 3 (half up, not banker's 2)
    assert random_mask_count(n, r) == expected


@pytest.mark.parametrize(
    "n,r,s,expected",
    [
        (512, 0.7, 0.1, (359, 52, 35)),  # ceil(358.4), ceil(51.2), int(35.84)
        (64, 0.7, 0.1, (45, 7, 4)),  # ceil(44.8), ceil(6.4), int(4.48)
        (10, 0.7, 0.1, (7, 1, 0)),
        (100, 0.7, 0.1, (70, 10, 7)),  # s*r*N is 6.999999999999999 in floats: still 7 hints, not 6
        (25, 0.28, 0.0, (7, 0, 0)),  # r*N is 7.000000000000001 in floats: ceil is still 7, not 8
        (50, 0.9, 0.2, (45, 10, 9)),  # s*r*N = 9.000000000000002: 9
        (30, 0.7, 0.7, (21, 21, 14)),  # s = r: the pool is the whole masked set
        (27, 0.7, 0.0, (19, 0, 0)),
    ],
)
def test_attention_counts(n, r, s, expected):
    assert attention_mask_counts(n, r, s) == expected


def test_counts_reject_bad_fractions():
    with pytest.raises(ValueError):
        attention_mask_counts(10, 0.5, 0.6)  # s > r
    with pytest.raises(ValueError):
        random_mask_count(10, 1.5)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.7, 1.0])
def test_random_mask_exact_count(grid, ratio):
    n = math.prod(grid)
    m = random_mask(6, grid, ratio, gen(1))
    assert m.shape == (6, *grid) and m.dtype == torch.bool
    assert m.flatten(1).sum(1).tolist() == [random_mask_count(n, ratio)] * 6


@pytest.mark.parametrize("grid", GRIDS)
def test_teacher_drop_mask_count_and_zero(grid):
    n = math.prod(grid)
    m = teacher_drop_mask(5, grid, 0.7, gen(2))
    assert m.flatten(1).sum(1).tolist() == [random_mask_count(n, 0.7)] * 5
    assert not teacher_drop_mask(5, grid, 0.0, gen(2)).any()


def _scores(b, n, seed=0, ties=False):
    g = gen(seed)
    if ties:  # few distinct values: many ties
        return torch.randint(0, 4, (b, n), generator=g).float()
    return torch.rand(b, n, generator=g)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.7])
@pytest.mark.parametrize("ties", [False, True])
def test_attention_high_low_masks(grid, ratio, ties):
    n = math.prod(grid)
    k = attention_mask_counts(n, ratio)[0]
    s = _scores(4, n, seed=3, ties=ties)
    high = attention_high_mask(s, ratio, grid=grid)
    low = attention_low_mask(s, ratio, grid=grid)
    assert high.shape == low.shape == (4, *grid)
    fh, fl = high.flatten(1), low.flatten(1)
    assert fh.sum(1).tolist() == [k] * 4 and fl.sum(1).tolist() == [k] * 4
    for i in range(4):
        if 0 < k < n:
            assert s[i][fh[i]].min() >= s[i][~fh[i]].max()
            assert s[i][fl[i]].max() <= s[i][~fl[i]].min()
    # ties resolved by a stable sort: lower index first, in both directions
    t = torch.zeros(1, 10)
    assert attention_high_mask(t, 0.3)[0].nonzero().flatten().tolist() == [0, 1, 2]
    assert attention_low_mask(t, 0.3)[0].nonzero().flatten().tolist() == [0, 1, 2]


def test_attention_masks_accept_grid_shaped_scores():
    s = _scores(2, 60, seed=4)
    flat = attention_high_mask(s, 0.4, grid=(3, 4, 5))
    shaped = attention_high_mask(s.view(2, 3, 4, 5), 0.4)
    assert torch.equal(flat, shaped)
    assert attention_high_mask(s, 0.4).shape == (2, 60)
    with pytest.raises(ValueError):
        attention_high_mask(s, 0.4, grid=(3, 4, 4))


# ---------------------------------------------------------------------------------------------- hint mask


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("r,s", [(0.7, 0.1), (0.5, 0.2), (0.7, 0.7), (0.9, 0.3), (0.7, 0.0)])
@pytest.mark.parametrize("ties", [False, True])
def test_hint_mask_counts_and_property(grid, r, s, ties):
    n = math.prod(grid)
    masked_top, pool, hints = attention_mask_counts(n, r, s)
    scores = _scores(8, n, seed=5, ties=ties)
    mask, hint = attention_hint_mask(scores, r, s, gen(6), grid=grid, return_hints=True)
    assert mask.shape == hint.shape == (8, *grid)
    m, h = mask.flatten(1), hint.flatten(1)
    assert m.sum(1).tolist() == [masked_top - hints] * 8
    assert h.sum(1).tolist() == [hints] * 8
    assert not (m & h).any()
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    for i in range(8):
        unmasked_non_hint = ~m[i] & ~h[i]
        # every masked token scores >= every unmasked non-hint token
        if m[i].any() and unmasked_non_hint.any():
            assert scores[i][m[i]].min() >= scores[i][unmasked_non_hint].max()
        # hints are among the top ceil(sN) (by the stable order), and masked + hints = the top ceil(rN)
        pool_set = set(order[i, :pool].tolist())
        assert set(h[i].nonzero().flatten().tolist()) <= pool_set
        assert set((m[i] | h[i]).nonzero().flatten().tolist()) == set(order[i, :masked_top].tolist())


def test_hint_mask_paper_numbers():
    # paper: 8^3 stage-3 tokens, r 0.7, s 0.1 -> 359 masked, 35 of the top 52 revealed: 324 net (63.3%)
    mask = attention_hint_mask(_scores(3, 512), 0.7, 0.1, gen(0), grid=(8, 8, 8))
    assert mask.flatten(1).sum(1).tolist() == [324] * 3


def test_hint_mask_reproducible_and_generator_dependent():
    scores = _scores(4, 512, seed=7)
    a = attention_hint_mask(scores, 0.7, 0.1, gen(11))
    b = attention_hint_mask(scores, 0.7, 0.1, gen(11))
    c = attention_hint_mask(scores, 0.7, 0.1, gen(12))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # only the hints depend on the generator: masked + hints is the top set, whatever the generator
    for seed in (11, 12):
        mask, hint = attention_hint_mask(scores, 0.7, 0.1, gen(seed), return_hints=True)
        assert torch.equal(mask | hint, attention_high_mask(scores, 0.7))


def test_hint_choice_is_uniform_and_independent_per_sample():
    n, r, s = 100, 0.5, 0.2  # pool 20, 10 hints: each pool token revealed with probability 1/2
    batch = 4000
    scores = torch.arange(n, 0, -1).float().expand(batch, n)  # identical scores: same pool for all rows
    _, hint = attention_hint_mask(scores, r, s, gen(13), return_hints=True)
    freq = hint[:, :20].float().mean(0)
    assert hint[:, 20:].sum() == 0
    # binomial(4000, 0.5): sd 0.0079 per token; 0.04 is 5 sd
    assert torch.all((freq - 0.5).abs() < 0.04), freq
    # chi-square over the 20 pool tokens, 19 dof: mean 19; 60 is far in the tail
    counts = hint[:, :20].sum(0).double()
    expected = batch * 10 / 20
    assert float(((counts - expected) ** 2 / expected).sum()) < 60
    # samples independent: P(token 0 and token 1 both revealed) ~ P(0) P(1) conditional (10/20 * 9/19)
    joint_same = (hint[:, 0] & hint[:, 1]).float().mean().item()
    assert abs(joint_same - 0.5 * 9 / 19) < 0.03
    # across samples: hint of row i vs row i+1 at token 0 uncorrelated
    a, b = hint[:-1, 0].float(), hint[1:, 0].float()
    assert abs(float((a * b).mean() - a.mean() * b.mean())) < 0.02


# ---------------------------------------------------------------------------------------------- random masks


def test_random_mask_reproducible_and_independent_across_samples():
    a = random_mask(2000, (4, 4, 4), 0.5, gen(21))
    assert torch.equal(a, random_mask(2000, (4, 4, 4), 0.5, gen(21)))
    assert not torch.equal(a, random_mask(2000, (4, 4, 4), 0.5, gen(22)))
    f = a.flatten(1).float()
    # each token masked with probability 32/64
    assert torch.all((f.mean(0) - 0.5).abs() < 0.05)
    # overlap of consecutive samples: hypergeometric mean 32*32/64 = 16
    overlap = (f[:-1] * f[1:]).sum(1)
    assert abs(float(overlap.mean()) - 16.0) < 0.3
    assert len({tuple(row.tolist()) for row in a.flatten(1)[:50]}) == 50


def test_random_masks_device_from_generator_and_override():
    m = random_mask(2, (2, 2, 2), 0.5, gen(0))
    assert m.device.type == "cpu"
    m2 = random_mask(2, (2, 2, 2), 0.5, gen(0), device="cpu")
    assert torch.equal(m, m2)
    with pytest.raises(TypeError):
        random_mask(2, (2, 2, 2), 0.5, None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- blockwise


def test_blockwise_fraction_within_range():
    grid, n = (8, 8, 8), 512
    m = blockwise_mask(400, grid, gen(31), ratio_range=(0.1, 0.5), mask_prob=1.0)
    counts = m.flatten(1).sum(1).float()
    assert counts.max() <= int(0.5 * n)  # never exceeds the budget
    assert counts.min() >= 0.9 * int(0.1 * n)  # reaches (about) its budget
    assert abs(float(counts.mean()) / n - 0.3) < 0.03  # f ~ U(0.1, 0.5): mean 0.3
    # fixed fraction: the budget int(0.3*512) = 153 is reached almost always
    fixed = blockwise_mask(200, grid, gen(32), ratio_range=(0.3, 0.3), mask_prob=1.0).flatten(1).sum(1).float()
    assert fixed.max() == 153 and fixed.mean() > 0.98 * 153


def test_blockwise_mask_prob_and_reproducibility():
    m = blockwise_mask(2000, (4, 4, 4), gen(33), mask_prob=0.5)
    empty = (m.flatten(1).sum(1) == 0).float().mean().item()
    assert abs(empty - 0.5) < 0.05  # sd 0.011
    assert torch.equal(m, blockwise_mask(2000, (4, 4, 4), gen(33), mask_prob=0.5))
    assert blockwise_mask(50, (4, 4, 4), gen(34), mask_prob=1.0).flatten(1).any(1).all()


def test_blockwise_masks_are_blocky():
    """Blocks are contiguous cuboids: few connected components, each much larger than one token, unlike a
    random mask of the same size."""
    m = blockwise_mask(100, (8, 8, 8), gen(35), ratio_range=(0.3, 0.3), mask_prob=1.0).numpy()
    comps = [ndimage.label(x)[1] for x in m]
    sizes = [x.sum() / c for x, c in zip(m, comps)]
    assert np.mean(comps) < 8 and np.mean(sizes) > 20
    r = random_mask(100, (8, 8, 8), 0.3, gen(36)).numpy()
    assert np.mean([ndimage.label(x)[1] for x in r]) > 30


@pytest.mark.parametrize("seed", range(30))
def test_single_block_is_a_cuboid_with_bounded_aspect(seed):
    mask = torch.zeros(8, 8, 8, dtype=torch.bool)
    new = _place_block(mask, 100, gen(seed), min_tokens=4, min_aspect=0.3)
    assert new == int(mask.sum()) and 0 < new <= 100
    idx = mask.nonzero()
    lo, hi = idx.min(0).values, idx.max(0).values
    edges = (hi - lo + 1).tolist()
    box = torch.zeros_like(mask)
    box[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1] = True
    assert torch.equal(mask, box)  # one solid cuboid
    # pairwise edge ratios e_a / e_b >= 0.3 before rounding, and rounding moves an edge by at most 1/2
    for a in edges:
        for b in edges:
            assert (a + 0.5) / (b - 0.5) >= 0.3


def test_blockwise_budget_respected_on_tiny_grids():
    for grid in [(1, 1, 7), (2, 3, 5), (4, 4, 4)]:
        n = math.prod(grid)
        m = blockwise_mask(200, grid, gen(37), ratio_range=(0.2, 0.6), mask_prob=1.0)
        assert int(m.flatten(1).sum(1).max()) <= int(0.6 * n)


# ---------------------------------------------------------------------------------------------- dispatcher


def test_mask_kinds_match_config():
    assert set(MASK_KINDS) == set(typing.get_args(StudentMask))


def test_make_student_mask_dispatches():
    grid, n = (4, 4, 4), 64
    scores = _scores(3, n, seed=41)
    kw = dict(batch=3, grid=grid, scores=scores, ratio=0.7, hint_fraction=0.1)
    assert torch.equal(make_student_mask("attention_high", generator=gen(0), **kw), attention_high_mask(scores, 0.7, grid))
    assert torch.equal(make_student_mask("attention_low", generator=gen(0), **kw), attention_low_mask(scores, 0.7, grid))
    assert torch.equal(
        make_student_mask("attention_hint", generator=gen(5), **kw), attention_hint_mask(scores, 0.7, 0.1, gen(5), grid)
    )
    assert torch.equal(make_student_mask("random", generator=gen(5), **kw), random_mask(3, grid, 0.7, gen(5)))
    assert torch.equal(
        make_student_mask("blockwise", generator=gen(5), **kw, block_mask_prob=1.0),
        blockwise_mask(3, grid, gen(5), mask_prob=1.0),
    )
    with pytest.raises(ValueError):
        make_student_mask("attention_hint", batch=3, grid=grid, generator=gen(0))
    with pytest.raises(ConfigError, match="mask.student"):
        make_student_mask("checkerboard", batch=3, grid=grid, generator=gen(0))


def test_student_mask_from_config_uses_every_option():
    cfg = load_config(size="tiny", method="dagman").mask
    scores = _scores(2, 64, seed=42)
    m = student_mask_from_config(cfg, batch=2, grid=(4, 4, 4), generator=gen(1), scores=scores)
    assert m.flatten(1).sum(1).tolist() == [45 - 4] * 2
    ibot = MaskConfig(student="blockwise", block_ratio_range=(0.25, 0.25), block_mask_prob=1.0)
    b = student_mask_from_config(ibot, batch=4, grid=(4, 4, 4), generator=gen(1))
    assert int(b.flatten(1).sum(1).max()) == 16
