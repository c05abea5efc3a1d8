"""Mask generators over a token grid: random, blockwise (iBOT, 3D), attention-guided (high / low / hint),
and the noisy teacher's random patch drop.

A mask is a boolean tensor ``(B, d, h, w)`` over the mask-unit token grid (one unit = one stage-3 token by
default), ``True`` = masked (the position's patch embeddings are replaced by the mask token). ``N = d*h*w``.
Attention scores are ``(B, N)`` floats in C order of the grid, i.e. the order of ``SwinFeatures.tokens``
(or already shaped ``(B, d, h, w)``).

Every function is tensor-in / tensor-out; all randomness comes from the ``torch.Generator`` passed in
(random numbers are drawn on the generator's device and then moved to the output device, so a CPU generator
gives the same masks whatever the output device). Ties in scores are broken deterministically by a stable
sort: among equal scores the lower token index counts as the higher-ranked one (for both the descending and
the ascending order).

Token counts, for ``N`` tokens (computed with a 1e-9 tolerance so that ``0.7 * 10`` counts as exactly 7, not
``7.000000000000001``):

==================== ==========================================================================================
generator            masked per sample
==================== ==========================================================================================
random / teacher     ``round(r*N)`` (half up), exactly, uniformly at random (SimMIM / SMIT)
attention_high       the top ``ceil(r*N)`` by score (AttMask-High)
attention_low        the bottom ``ceil(r*N)`` by score (MST-style)
attention_hint       top ``ceil(r*N)`` masked, then ``int(s*r*N)`` "hints" chosen uniformly from the top
                     ``ceil(s*N)`` revealed again: ``ceil(r*N) - int(s*r*N)``, about ``(r - s*r) N``
blockwise            up to ``int(f*N)``, ``f ~ U(ratio_range)``, in cuboids; none with probability 1-mask_prob
==================== ==========================================================================================
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from dagman.errors import ConfigError

__all__ = [
    "MASK_KINDS",
    "random_mask_count",
    "attention_mask_counts",
    "random_mask",
    "teacher_drop_mask",
    "slab_planes",
    "blockwise_mask",
    "attention_high_mask",
    "attention_low_mask",
    "attention_hint_mask",
    "make_student_mask",
    "student_mask_from_config",
]

#: The student mask kinds of ``MaskConfig.student``.
MASK_KINDS: tuple[str, ...] = ("attention_hint", "attention_high", "attention_low", "random", "blockwise")

_EPS = 1e-9  # tolerance of the count roundings against floating-point error in r*N


def _ceil(x: float) -> int:
    return int(math.ceil(x - _EPS))


def _floor(x: float) -> int:
    return int(math.floor(x + _EPS))


def _check_fraction(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def _grid(grid: Sequence[int]) -> tuple[int, int, int]:
    g = tuple(int(v) for v in grid)
    if len(g) != 3 or any(v < 1 for v in g):
        raise ValueError(f"grid must be 3 positive sizes (d, h, w), got {tuple(grid)}")
    return g  # type: ignore[return-value]


def _check_generator(generator: torch.Generator) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return generator


def _uniform(generator: torch.Generator, shape: Sequence[int], device) -> torch.Tensor:
    """U[0, 1) noise drawn on the generator's device, returned on ``device`` (default: that device)."""
    noise = torch.rand(tuple(shape), generator=generator, device=generator.device)
    return noise if device is None else noise.to(device)


def random_mask_count(num_tokens: int, ratio: float) -> int:
    """Tokens masked by :func:`random_mask` / :func:`teacher_drop_mask`: ``round(ratio*num_tokens)``, half up."""
    return _floor(_check_fraction("ratio", ratio) * num_tokens + 0.5)


def attention_mask_counts(num_tokens: int, ratio: float, hint_fraction: float = 0.0) -> tuple[int, int, int]:
    """``(masked_top, hint_pool, hints)`` of the attention masks for ``N = num_tokens``:
    ``ceil(r*N)`` top tokens masked, hints drawn from the top ``ceil(s*N)``, ``int(s*r*N)`` hints revealed.
    The net masked count of :func:`attention_hint_mask` is ``masked_top - hints``."""
    r = _check_fraction("ratio", ratio)
    s = _check_fraction("hint_fraction", hint_fraction)
    if s > r:
        raise ValueError(f"hint_fraction (s={s}) must not exceed ratio (r={r}): hints are revealed masked tokens")
    return _ceil(r * num_tokens), _ceil(s * num_tokens), _floor(s * r * num_tokens)


def _scatter(index: torch.Tensor, num_tokens: int, value: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
    """Bool ``(B, N)``: ``out`` (default all ``not value``) with ``value`` at ``index`` ``(B, k)``."""
    if out is None:
        out = torch.full((index.shape[0], num_tokens), not value, dtype=torch.bool, device=index.device)
    return out.scatter_(1, index, value)


def _flat_scores(scores: torch.Tensor, grid: Sequence[int] | None) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Scores as ``(B, N)`` and the shape of the returned mask."""
    if scores.dim() == 4:
        if grid is not None and tuple(scores.shape[1:]) != _grid(grid):
            raise ValueError(f"scores of grid {tuple(scores.shape[1:])} do not match grid {tuple(grid)}")
        return scores.reshape(scores.shape[0], -1), tuple(scores.shape)
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, N) or (B, d, h, w), got {tuple(scores.shape)}")
    if grid is None:
        return scores, tuple(scores.shape)
    g = _grid(grid)
    if math.prod(g) != scores.shape[1]:
        raise ValueError(f"scores have {scores.shape[1]} tokens but grid {g} has {math.prod(g)}")
    return scores, (scores.shape[0], *g)


def _order(scores: torch.Tensor, descending: bool) -> torch.Tensor:
    """Token indices ``(B, N)`` sorted by score; stable, so ties keep the lower index first."""
    return torch.sort(scores.detach(), dim=1, descending=descending, stable=True).indices


# ----------------------------------------------------------------------------------------------------------
# Random masks
# ----------------------------------------------------------------------------------------------------------


def random_mask(batch: int, grid: Sequence[int], ratio: float, generator: torch.Generator,
                device: torch.device | str | None = None) -> torch.Tensor:
    """SimMIM / SMIT random mask: exactly ``round(ratio*N)`` tokens per sample, a uniformly random subset,
    independent across samples. Returns bool ``(batch, d, h, w)`` on ``device`` (default: the generator's)."""
    d, h, w = _grid(grid)
    n = d * h * w
    k = random_mask_count(n, ratio)
    noise = _uniform(_check_generator(generator), (batch, n), device)
    # the first k of a uniformly random permutation (argsort of i.i.d. uniforms) = a uniform k-subset
    return _scatter(noise.argsort(dim=1)[:, :k], n).view(batch, d, h, w)


def teacher_drop_mask(batch: int, grid: Sequence[int], ratio: float, generator: torch.Generator,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Noisy-teacher patch drop (method.md sec 4, ``r_t = 0.7``): a :func:`random_mask` of ``round(r_t*N)``
    units per sample; ``ratio = 0`` gives an all-False mask (no noisy teacher). Bool ``(batch, d, h, w)``."""
    return random_mask(batch, grid, ratio, generator, device)


def slab_planes(batch: int, planes: int, prob: float, fraction: tuple[float, float],
                generator: torch.Generator) -> torch.Tensor:
    """Which z planes each of ``batch`` student inputs keeps (``mask.student_slab_prob``): bool ``(batch, planes)``,
    all True for a row that is not thinned (probability ``1 - prob``), else one slab of
    :func:`dagman.data.views.slab_bounds` planes with the thickness fraction uniform in ``fraction``. Three numbers
    per row from ``generator`` (keep, fraction, position), drawn whether or not the row is thinned."""
    from dagman.data.views import slab_bounds

    draws = torch.rand(batch, 3, generator=generator, device=generator.device).cpu().tolist()
    keep = torch.ones(batch, planes, dtype=torch.bool)
    lo, hi = fraction
    for row, (u, f, w) in enumerate(draws):
        if u < prob:
            first, thick = slab_bounds(planes, lo + (hi - lo) * f, w)
            keep[row] = False
            keep[row, first:first + thick] = True
    return keep


# ----------------------------------------------------------------------------------------------------------
# Blockwise (iBOT) masks, in 3D
# ----------------------------------------------------------------------------------------------------------


def _scalar(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * torch.rand((), generator=generator, device=generator.device).item()


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in ``[low, high]`` (inclusive)."""
    return int(torch.randint(low, high + 1, (), generator=generator, device=generator.device).item())


def _place_block(mask: torch.Tensor, max_new: int, generator: torch.Generator, min_tokens: int,
                 min_aspect: float, attempts: int = 10) -> int:
    """Try (up to ``attempts`` times) to add one cuboid to the 3D bool ``mask`` (in place) that masks between
    1 and ``max_new`` new tokens. Returns the number of newly masked tokens (0 when every attempt failed)."""
    dims = mask.shape
    half_log_aspect = -0.5 * math.log(min_aspect)
    for _ in range(attempts):
        volume = _scalar(generator, min_tokens, max_new)
        logs = [_scalar(generator, -half_log_aspect, half_log_aspect) for _ in range(3)]
        mean = sum(logs) / 3.0
        edges = [round(volume ** (1.0 / 3.0) * math.exp(v - mean)) for v in logs]
        if any(e < 1 or e > n for e, n in zip(edges, dims)):
            continue
        z, y, x = (_randint(generator, 0, n - e) for e, n in zip(edges, dims))
        box = mask[z : z + edges[0], y : y + edges[1], x : x + edges[2]]
        new = edges[0] * edges[1] * edges[2] - int(box.sum())
        if 0 < new <= max_new:
            box.fill_(True)
            return new
    return 0


def blockwise_mask(batch: int, grid: Sequence[int], generator: torch.Generator, *,
                   ratio_range: tuple[float, float] = (0.1, 0.5), min_tokens: int = 4, min_aspect: float = 0.3,
                   mask_prob: float = 0.5, device: torch.device | str | None = None) -> torch.Tensor:
    """iBOT-style block masking generalised to 3D. Returns bool ``(batch, d, h, w)`` on ``device``
    (default: the generator's).

    Per sample: with probability ``1 - mask_prob`` no token is masked. Otherwise a target fraction
    ``f ~ U(ratio_range)`` gives a budget ``T = int(f*N)`` and cuboids are added until ``T`` tokens are masked
    or a block cannot be placed (so the masked count is at most ``T``, usually exactly ``T``). One block
    (iBOT's ``MaskingGenerator._mask``, up to 10 attempts): a volume ``V ~ U(min_tokens, T - masked)``;
    three log-edge factors ``l_a ~ U(-L/2, L/2)`` with ``L = -log(min_aspect)``, centred to sum 0, give edges
    ``round(V**(1/3) * exp(l_a))`` (product V; every pairwise edge ratio in ``[min_aspect, 1/min_aspect]``
    before rounding — the 3D form of iBOT's ``h/w`` aspect range); a uniformly random position inside the
    grid; accepted if it masks between 1 and ``T - masked`` new tokens. Blocks may overlap earlier ones.
    Loops over samples and blocks in Python (a few dozen scalar draws per sample)."""
    d, h, w = _grid(grid)
    n = d * h * w
    lo, hi = (float(v) for v in ratio_range)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"ratio_range must satisfy 0 <= lo <= hi <= 1, got {(lo, hi)}")
    if not 0.0 < min_aspect <= 1.0:
        raise ValueError(f"min_aspect must be in (0, 1], got {min_aspect}")
    if min_tokens < 1:
        raise ValueError(f"min_tokens must be >= 1, got {min_tokens}")
    _check_fraction("mask_prob", mask_prob)
    _check_generator(generator)
    out = torch.zeros(batch, d, h, w, dtype=torch.bool)
    for b in range(batch):
        if _scalar(generator) >= mask_prob:
            continue
        target = int(_scalar(generator, lo, hi) * n)
        count = 0
        while count < target:
            delta = _place_block(out[b], target - count, generator, min_tokens, min_aspect)
            if delta == 0:
                break
            count += delta
    return out.to(device if device is not None else generator.device)


# ----------------------------------------------------------------------------------------------------------
# Attention-guided masks
# ----------------------------------------------------------------------------------------------------------


def attention_high_mask(scores: torch.Tensor, ratio: float, grid: Sequence[int] | None = None) -> torch.Tensor:
    """AttMask-High: mask the ``ceil(ratio*N)`` highest-scoring tokens of each sample.

    ``scores``: ``(B, N)`` float (C order of the grid) or ``(B, d, h, w)``. Returns bool ``(B, d, h, w)`` when
    ``grid`` is given or the scores are 4-D, else ``(B, N)``; on the scores' device."""
    flat, shape = _flat_scores(scores, grid)
    n = flat.shape[1]
    k = attention_mask_counts(n, ratio)[0]
    return _scatter(_order(flat, descending=True)[:, :k], n).view(shape)


def attention_low_mask(scores: torch.Tensor, ratio: float, grid: Sequence[int] | None = None) -> torch.Tensor:
    """MST-style: mask the ``ceil(ratio*N)`` lowest-scoring tokens of each sample. Shapes as
    :func:`attention_high_mask`."""
    flat, shape = _flat_scores(scores, grid)
    n = flat.shape[1]
    k = attention_mask_counts(n, ratio)[0]
    return _scatter(_order(flat, descending=False)[:, :k], n).view(shape)


def attention_hint_mask(scores: torch.Tensor, ratio: float, hint_fraction: float, generator: torch.Generator,
                        grid: Sequence[int] | None = None, return_hints: bool = False):
    """DAGMaN's student mask (method.md sec 4, AttMask "hint" semantics):

    1. mask the top ``ceil(r*N)`` tokens by score;
    2. from the top ``ceil(s*N)`` tokens reveal ``int(s*r*N)`` chosen uniformly at random (independently
       per sample).

    Net masked ``ceil(r*N) - int(s*r*N)`` (about ``r - s*r`` = 0.63 of the tokens for r 0.7, s 0.1). Every
    masked token scores at least as high as every unmasked token that is not a hint. Requires
    ``0 <= s <= r <= 1``.

    ``scores``: ``(B, N)`` (C order of the grid) or ``(B, d, h, w)``. Returns bool mask on the scores' device,
    ``(B, d, h, w)`` when ``grid`` is given or the scores are 4-D, else ``(B, N)``; with ``return_hints``
    also the bool hint positions (same shape)."""
    flat, shape = _flat_scores(scores, grid)
    b, n = flat.shape
    masked_top, pool, hints = attention_mask_counts(n, ratio, hint_fraction)
    order = _order(flat, descending=True)
    mask = _scatter(order[:, :masked_top], n)
    hint = torch.zeros_like(mask)
    if hints > 0:
        noise = _uniform(_check_generator(generator), (b, pool), flat.device)
        chosen = order[:, :pool].gather(1, noise.argsort(dim=1)[:, :hints])  # uniform hints-subset of the pool
        _scatter(chosen, n, value=False, out=mask)
        _scatter(chosen, n, out=hint)
    if return_hints:
        return mask.view(shape), hint.view(shape)
    return mask.view(shape)


# ----------------------------------------------------------------------------------------------------------
# Dispatch by config string
# ----------------------------------------------------------------------------------------------------------


def make_student_mask(kind: str, *, batch: int, grid: Sequence[int], generator: torch.Generator,
                      scores: torch.Tensor | None = None, ratio: float = 0.7, hint_fraction: float = 0.1,
                      block_ratio_range: tuple[float, float] = (0.1, 0.5), block_min_tokens: int = 4,
                      block_min_aspect: float = 0.3, block_mask_prob: float = 0.5,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """The student mask of kind ``kind`` (one of :data:`MASK_KINDS`, i.e. ``MaskConfig.student``), bool
    ``(batch, d, h, w)``.

    Attention kinds need ``scores`` ``(batch, N)`` (the teacher's importance map, C order of ``grid``) and
    return on the scores' device; ``random`` / ``blockwise`` ignore ``scores`` and return on ``device``
    (default: the generator's). ``hint_fraction`` applies to ``attention_hint`` only, the ``block_*``
    options to ``blockwise`` only. Raises ConfigError for an unknown kind."""
    g = _grid(grid)
    if kind in ("attention_hint", "attention_high", "attention_low"):
        if scores is None:
            raise ValueError(f"mask kind '{kind}' needs attention scores")
        if scores.shape[0] != batch:
            raise ValueError(f"scores have batch {scores.shape[0]}, expected {batch}")
        if kind == "attention_hint":
            mask = attention_hint_mask(scores, ratio, hint_fraction, generator, grid=g)
        elif kind == "attention_high":
            mask = attention_high_mask(scores, ratio, grid=g)
        else:
            mask = attention_low_mask(scores, ratio, grid=g)
        return mask if device is None else mask.to(device)
    if kind == "random":
        return random_mask(batch, g, ratio, generator, device)
    if kind == "blockwise":
        return blockwise_mask(batch, g, generator, ratio_range=block_ratio_range, min_tokens=block_min_tokens,
                              min_aspect=block_min_aspect, mask_prob=block_mask_prob, device=device)
    raise ConfigError(f"unknown mask.student '{kind}'; valid: {', '.join(MASK_KINDS)}")


def student_mask_from_config(cfg, *, batch: int, grid: Sequence[int], generator: torch.Generator,
                             scores: torch.Tensor | None = None,
                             device: torch.device | str | None = None) -> torch.Tensor:
    """:func:`make_student_mask` with every option from a :class:`dagman.config.MaskConfig` ``cfg``."""
    return make_student_mask(
        cfg.student, batch=batch, grid=grid, generator=generator, scores=scores, ratio=cfg.ratio,
        hint_fraction=cfg.hint_fraction, block_ratio_range=tuple(cfg.block_ratio_range),
        block_min_tokens=cfg.block_min_tokens, block_min_aspect=cfg.block_min_aspect,
        block_mask_prob=cfg.block_mask_prob, device=device,
    )
