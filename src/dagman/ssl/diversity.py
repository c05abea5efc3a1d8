"""Attention-head diversity of a Swin backbone, per stage and per head (method.md sec 7).

DECIDED definition. For every block and every head of the 3D Swin backbone, over a fixed batch of crops:

- **entropy** (nats): the mean over query tokens of ``H(p) = -sum_j p_j log p_j``, the entropy of that
  head's window attention distribution ``p`` (one row of the ``(L, L)`` softmax of a window);
- **distance** (voxels of the input): the mean over query tokens of ``sum_j p_j * ||c_i - c_j||``, the
  attention-weighted Euclidean distance between the query token's centre ``c_i`` and the key tokens'
  centres ``c_j`` within the window. Centres are token offsets inside the window times the token size
  of the stage in input voxels, ``patch_size * 2**k`` for Swin stage ``k + 1`` (``k = 0..3``; 2, 4, 8, 16
  voxels for the paper's patch 2).

Per stage (MONAI's ``layers1`` .. ``layers4``, numbered 1..4 here: stage 1 works on the patch-embedding
grid), each head's value is the mean over the stage's blocks; the stage reports the per-head values, their
mean and their spread (population standard deviation across heads, ``ddof = 0``).

Details that follow from Swin's windows, all kept on purpose:

- shifted-window blocks mask attention between tokens of different regions at the grid border (logit
  -100, probability ~1e-44): those keys contribute nothing to either measure (``0 log 0 = 0``), so a query
  in such a window attends over fewer tokens and its entropy is naturally lower;
- when a stage's token grid is not a multiple of the window, the grid is zero-padded (after the block's
  LayerNorm, as MONAI does) and the padded tokens take part in attention as queries and keys; they are
  included in the means (64^3 and 128^3 crops at patch 2 have no padded window; the ``small`` preset's
  96^3 crops pad stage 4's 6^3 grid to 8^3: 216 of its 512 tokens are real);
- a window at least as large as the grid shrinks to the grid (MONAI's rule), so ``L`` can differ per stage;
  ``entropy_max = log(L)`` of each stage is reported for reference.

Memory: attention probabilities are ``(windows, heads, L, L)`` per block; for the paper model on one 128^3
crop stage 1 alone holds 2 x 268 MB. :func:`head_diversity` therefore runs ``chunk`` crops at a time and
reduces each block's probabilities in slices of windows before the next chunk.

Functions here are tensor-in / plain-values-out, except :func:`eval_crops`, which reads fixed crops from a
prepared cache, and :func:`run_head_diversity` (``dagman diversity``), which measures a saved pretraining run on
such crops and writes ``diversity.json`` and ``diversity.png``.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

__all__ = [
    "window_attention_entropy",
    "window_attention_distance",
    "token_distances",
    "stage_token_size",
    "stage_summary",
    "head_diversity",
    "diversity_for_run",
    "find_backbone",
    "flatten_diversity",
    "eval_crops",
    "RunDiversity",
    "run_head_diversity",
]

_WINDOW_SLICE = 256  # windows reduced at once (bounds temporaries to ~ 256 * heads * L * L floats)


def _check_probs(probs: torch.Tensor) -> None:
    if probs.dim() != 4 or probs.shape[-1] != probs.shape[-2]:
        raise ValueError(f"attention probabilities must be (windows, heads, L, L), got {tuple(probs.shape)}")


def window_attention_entropy(probs: torch.Tensor, *, reduce: bool = True) -> torch.Tensor:
    """Entropy (nats) of each attention row, per head.

    ``probs``: ``(windows, heads, L, L)`` (rows sum to 1). Returns the mean over windows and query tokens,
    ``(heads,)`` float64 -- or, with ``reduce=False``, the sum over them (for chunked accumulation; divide
    by ``windows * L``). Zero probabilities contribute 0 (``xlogy``)."""
    _check_probs(probs)
    total = torch.zeros(probs.shape[1], dtype=torch.float64, device=probs.device)
    for start in range(0, probs.shape[0], _WINDOW_SLICE):
        p = probs[start : start + _WINDOW_SLICE].float()
        total -= torch.special.xlogy(p, p).sum(dim=-1).sum(dim=(0, 2), dtype=torch.float64)
    if reduce:
        total /= probs.shape[0] * probs.shape[2]
    return total


def token_distances(coords: torch.Tensor, token_size: Sequence[float]) -> torch.Tensor:
    """``(L, L)`` Euclidean distances between token centres, in input voxels: ``coords`` ``(L, 3)`` token
    offsets inside a window, scaled per axis by ``token_size`` (voxels per token along each axis)."""
    scale = torch.as_tensor([float(s) for s in token_size], dtype=torch.float64, device=coords.device)
    if coords.dim() != 2 or coords.shape[1] != scale.numel():
        raise ValueError(f"coords must be (L, {scale.numel()}), got {tuple(coords.shape)}")
    c = coords.to(torch.float64) * scale
    return torch.cdist(c, c)


def window_attention_distance(probs: torch.Tensor, coords: torch.Tensor, token_size: Sequence[float], *,
                              reduce: bool = True) -> torch.Tensor:
    """Attention-weighted mean distance (input voxels) from each query token to the keys, per head.

    ``probs``: ``(windows, heads, L, L)``; ``coords``: ``(L, 3)`` token offsets in a window; ``token_size``:
    voxels per token along each axis. Returns the mean over windows and query tokens of
    ``sum_j p_ij * d_ij``, ``(heads,)`` float64 -- or, with ``reduce=False``, the sum (see
    :func:`window_attention_entropy`)."""
    _check_probs(probs)
    if coords.shape[0] != probs.shape[-1]:
        raise ValueError(f"{coords.shape[0]} token coordinates for windows of {probs.shape[-1]} tokens")
    dist = token_distances(coords.to(probs.device), token_size).float()
    total = torch.zeros(probs.shape[1], dtype=torch.float64, device=probs.device)
    for start in range(0, probs.shape[0], _WINDOW_SLICE):
        p = probs[start : start + _WINDOW_SLICE].float()
        total += (p * dist).sum(dim=-1).sum(dim=(0, 2), dtype=torch.float64)
    if reduce:
        total /= probs.shape[0] * probs.shape[2]
    return total


def stage_token_size(patch_size: Sequence[int], stage_index: int) -> tuple[int, ...]:
    """Input voxels per token, per axis, in Swin stage ``stage_index + 1`` (``stage_index`` 0..3):
    ``patch_size * 2**stage_index``."""
    return tuple(int(p) * 2**int(stage_index) for p in patch_size)


def stage_summary(stage: int, entropy_per_block: np.ndarray, distance_per_block: np.ndarray, **extra) -> dict:
    """One stage's JSON entry from ``(blocks, heads)`` arrays of per-block, per-head values.

    Per-head values are the means over blocks; ``*_mean`` / ``*_std`` are their mean and population
    standard deviation across heads. ``extra`` keys are added as they are (plain values)."""
    ent = np.asarray(entropy_per_block, dtype=np.float64)
    dst = np.asarray(distance_per_block, dtype=np.float64)
    if ent.ndim != 2 or ent.shape != dst.shape:
        raise ValueError(f"expected two (blocks, heads) arrays of one shape, got {ent.shape} and {dst.shape}")
    ent_head, dst_head = ent.mean(axis=0), dst.mean(axis=0)
    out = {
        "stage": int(stage),
        "heads": int(ent.shape[1]),
        "blocks": int(ent.shape[0]),
        "entropy_per_head": [float(v) for v in ent_head],
        "entropy_mean": float(ent_head.mean()),
        "entropy_std": float(ent_head.std()),
        "distance_per_head": [float(v) for v in dst_head],
        "distance_mean": float(dst_head.mean()),
        "distance_std": float(dst_head.std()),
        "entropy_per_block": [[float(v) for v in row] for row in ent],
        "distance_per_block": [[float(v) for v in row] for row in dst],
    }
    out.update(extra)
    return out


def find_backbone(net: nn.Module):
    """The :class:`~dagman.models.swin.SwinBackbone` inside ``net``: a backbone itself, a
    ``MaskTokenEncoder``, an ``SSLNetwork`` (teacher), a ``StudentNetwork``, or any of them DDP-wrapped."""
    from dagman.models.swin import SwinBackbone

    seen = net
    for _ in range(4):
        if isinstance(seen, SwinBackbone):
            return seen
        if hasattr(seen, "module") and isinstance(seen.module, nn.Module):  # DDP
            seen = seen.module
        elif hasattr(seen, "net"):  # StudentNetwork
            seen = seen.net
        elif hasattr(seen, "backbone"):  # SSLNetwork, MaskTokenEncoder
            seen = seen.backbone
        else:
            break
    if isinstance(seen, SwinBackbone):
        return seen
    raise TypeError(f"no Swin backbone found in a {type(net).__name__}")


@torch.no_grad()
def head_diversity(backbone: nn.Module, crops: torch.Tensor, *, chunk: int = 1, progress: bool = False) -> dict:
    """Per-stage, per-head attention entropy and distance of ``backbone`` on ``crops``.

    ``backbone``: a :class:`~dagman.models.swin.SwinBackbone` (or anything :func:`find_backbone` accepts);
    ``crops``: ``(B, in_chans, S, S, S)`` float on any device (moved to the backbone's). Runs the clean
    crops (no mask) in eval mode, without autocast, ``chunk`` crops per forward pass (the training flag is
    restored afterwards). ``progress``: a tqdm bar on stderr.

    Returns a JSON-serialisable dict::

        {"crops": B, "crop_size": [S, S, S],
         "stages": [{"stage": 1..4, "heads": H, "blocks": depth, "window": [..], "tokens_per_window": L,
                     "token_size_voxels": [..], "entropy_max": log(L),
                     "entropy_per_head": [H], "entropy_mean", "entropy_std",        # nats
                     "distance_per_head": [H], "distance_mean", "distance_std",     # input voxels
                     "entropy_per_block": [[H] x depth], "distance_per_block": [[H] x depth]}, ...]}
    """
    from tqdm import tqdm

    bb = find_backbone(backbone)
    if crops.dim() != 5:
        raise ValueError(f"crops must be (B, C, D, H, W), got {tuple(crops.shape)}")
    n = crops.shape[0]
    if n < 1:
        raise ValueError("head_diversity needs at least one crop")
    chunk = max(1, int(chunk))
    device = next(bb.parameters()).device
    was_training = bb.training
    bb.eval()
    ent_sum: list[list[torch.Tensor]] | None = None
    dst_sum: list[list[torch.Tensor]] | None = None
    counts: list[list[int]] | None = None
    meta: list[dict] = []
    try:
        with torch.autocast(device.type, enabled=False):
            for start in tqdm(range(0, n, chunk), desc="head diversity", unit="chunk", disable=None if progress else True,
                              file=sys.stderr):
                x = crops[start : start + chunk].to(device=device, dtype=torch.float32)
                feats = bb.forward_features(x, return_attention=True)
                if ent_sum is None:
                    ent_sum = [[None] * len(blocks) for blocks in feats.attention]  # type: ignore[list-item]
                    dst_sum = [[None] * len(blocks) for blocks in feats.attention]  # type: ignore[list-item]
                    counts = [[0] * len(blocks) for blocks in feats.attention]
                for s, blocks in enumerate(feats.attention):
                    size = stage_token_size(bb.patch_size, s)
                    for j, rec in enumerate(blocks):
                        e = window_attention_entropy(rec.probs, reduce=False).cpu()
                        d = window_attention_distance(rec.probs, rec.coords, size, reduce=False).cpu()
                        ent_sum[s][j] = e if ent_sum[s][j] is None else ent_sum[s][j] + e
                        dst_sum[s][j] = d if dst_sum[s][j] is None else dst_sum[s][j] + d
                        counts[s][j] += rec.probs.shape[0] * rec.probs.shape[2]
                        if start == 0 and j == 0:
                            length = int(rec.probs.shape[-1])
                            meta.append({"window": [int(w) for w in rec.window], "tokens_per_window": length,
                                         "token_size_voxels": list(size), "entropy_max": math.log(length)})
                del feats
    finally:
        bb.train(was_training)
    stages = []
    for s in range(len(ent_sum)):  # type: ignore[arg-type]
        ent = torch.stack([e / c for e, c in zip(ent_sum[s], counts[s])]).numpy()  # type: ignore[index]
        dst = torch.stack([d / c for d, c in zip(dst_sum[s], counts[s])]).numpy()  # type: ignore[index]
        stages.append(stage_summary(s + 1, ent, dst, **meta[s]))
    return {"crops": int(n), "crop_size": [int(v) for v in crops.shape[2:]], "stages": stages}


def diversity_for_run(student_or_teacher_net: nn.Module, crops: torch.Tensor, *, chunk: int = 1) -> dict:
    """Head diversity of a pretraining network, for the trainer (every ``train.diversity_every_epochs`` on
    ``train.diversity_crops`` fixed crops from :func:`eval_crops`).

    ``student_or_teacher_net``: the teacher ``SSLNetwork``, the ``StudentNetwork`` or its DDP wrapper; only
    its backbone runs, on the clean crops, in eval mode, under ``no_grad`` (its training flag is restored).
    Same result as :func:`head_diversity`; :func:`flatten_diversity` turns it into scalar metrics."""
    return head_diversity(find_backbone(student_or_teacher_net), crops, chunk=chunk)


def flatten_diversity(result: dict, prefix: str = "diversity") -> dict[str, float]:
    """Scalar metrics of a :func:`head_diversity` result, for metrics.jsonl / TensorBoard:
    ``{prefix}/stage{k}/entropy_mean``, ``.../entropy_std``, ``.../distance_mean``, ``.../distance_std``."""
    out: dict[str, float] = {}
    for st in result["stages"]:
        for key in ("entropy_mean", "entropy_std", "distance_mean", "distance_std"):
            out[f"{prefix}/stage{st['stage']}/{key}"] = float(st[key])
    return out


def eval_crops(cache: str | os.PathLike, n: int, crop_size: int | Sequence[int], *, seed: int = 0,
               pad_value: float = 0.0) -> torch.Tensor:
    """``n`` fixed crops ``(n, 1, S, S, S)`` float32 from a prepared cache, deterministic.

    Crop ``i`` comes from volume ``i mod V`` (manifest order): the first crop of each volume is its centre
    crop, later ones (when ``n > V``) take origins from ``numpy.random.default_rng([seed, i])``. Axes where
    the volume is shorter than the crop are centred and padded with ``pad_value`` (0 = the bottom of the HU
    window, as the training sampler pads). Raises :class:`~dagman.errors.DataError` for a bad cache."""
    from dagman.data.cache import cache_entries, open_volume
    from dagman.errors import DataError

    if int(n) < 1:
        raise ValueError(f"need at least one crop, got {n}")
    shape = (int(crop_size),) * 3 if isinstance(crop_size, (int, np.integer)) else tuple(int(s) for s in crop_size)
    entries = cache_entries(cache)
    if not entries:
        raise DataError(f"{cache}: the cache holds no volumes")
    out = torch.full((int(n), 1, *shape), float(pad_value), dtype=torch.float32)
    for i in range(int(n)):
        vol = open_volume(cache, entries[i % len(entries)])
        if vol.ndim != 3:
            raise DataError(f"{cache}: volume {entries[i % len(entries)].id} is not 3D ({vol.shape})")
        rng = np.random.default_rng([int(seed), i]) if i >= len(entries) else None
        src, dst = [], []
        for size, crop in zip(vol.shape, shape):
            if size >= crop:
                o = (size - crop) // 2 if rng is None else int(rng.integers(0, size - crop + 1))
                src.append(slice(o, o + crop))
                dst.append(slice(0, crop))
            else:
                o = (crop - size) // 2
                src.append(slice(0, size))
                dst.append(slice(o, o + size))
        out[i, 0][tuple(dst)] = torch.from_numpy(np.asarray(vol[tuple(src)], dtype=np.float32))
    return out


@dataclass
class RunDiversity:
    """What :func:`run_head_diversity` measured and wrote: ``result`` (the content of ``diversity.json``: the
    run, the network, the units and :func:`head_diversity`'s stages), ``title`` (of the figure: method/size,
    network, step, crops), ``json_path`` and ``figure_path``."""

    result: dict
    title: str
    json_path: Path
    figure_path: Path

    def summary_lines(self) -> list[str]:
        """What ``dagman diversity`` prints: the title, one table row per stage (heads, window tokens, entropy
        and distance mean ± std across heads), and a closing line with the mean spread and the files."""
        stages = self.result["stages"]
        lines = [f"head diversity of the {self.title}",
                 f"{'stage':>5}  {'heads':>5}  {'L':>4}  {'entropy (nats)':>17}  {'max':>5}  {'distance (voxels)':>17}"]
        for st in stages:
            ent = f"{st['entropy_mean']:.3f} ± {st['entropy_std']:.3f}"
            dst = f"{st['distance_mean']:.2f} ± {st['distance_std']:.2f}"
            lines.append(f"{st['stage']:>5}  {st['heads']:>5}  {st.get('tokens_per_window', ''):>4}  {ent:>17}  "
                         f"{st.get('entropy_max', float('nan')):>5.2f}  {dst:>17}")
        mean_std = sum(st["entropy_std"] for st in stages) / len(stages)
        lines.append(f"dagman diversity: {len(stages)} stages, mean entropy spread across heads {mean_std:.3f} nats "
                     f"-> {self.json_path}, {self.figure_path}")
        return lines


def run_head_diversity(checkpoint: str | os.PathLike, data: str | os.PathLike, *, out: str | os.PathLike | None = None,
                       crops: int | None = None, crop_size: int | None = None, seed: int = 0,
                       which: str = "teacher", progress: bool = True) -> RunDiversity:
    """Head diversity (:func:`head_diversity`) of the ``which`` network (``teacher``, the exported encoder, or
    ``student``) of a pretraining run (``checkpoint``: run folder, its newest loadable checkpoint, or a checkpoint
    ``.pt``) on ``crops`` fixed crops (:func:`eval_crops`; default: the run's ``train.diversity_crops``) of
    ``crop_size`` voxels (default: the run's ``data.crop_size``) from the prepared cache ``data``. Writes
    ``diversity.json`` and ``diversity.png`` into ``out`` (default: ``RUN/figures/diversity``)."""
    from dagman.data.cache import atomic_write_json
    from dagman.errors import DagmanError
    from dagman.report.plots import diversity_figure
    from dagman.train.runs import build_networks, check_crop_size, default_device, load_pretrained

    if which not in ("teacher", "student"):
        raise DagmanError(f"which must be teacher or student, got {which!r}", option="which")
    pre = load_pretrained(checkpoint)
    cfg = pre.cfg
    n = crops if crops is not None else cfg.train.diversity_crops
    if n < 1:
        raise DagmanError(f"crops must be >= 1, got {n}", option="crops")
    size = check_crop_size(cfg, crop_size if crop_size is not None else cfg.data.crop_size)
    folder = Path(out) if out else pre.run / "figures" / "diversity"
    batch = eval_crops(data, n, size, seed=seed)
    net = build_networks(pre, (which,), default_device())[which]
    measured = head_diversity(net, batch, progress=progress)
    result = {
        "checkpoint": str(pre.path),
        "step": pre.step,
        "method": cfg.method,
        "size": cfg.size,
        "network": which,
        "data": str(data),
        "seed": seed,
        "units": {"entropy": "nats", "distance": "voxels of the input crop",
                  "voxel_mm": float(cfg.data.spacing_mm)},
        **measured,
    }
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "diversity.json", result)
    title = f"{cfg.method}/{cfg.size} {which}, step {pre.step}: {n} crop(s) of {size}^3"
    diversity_figure(result, folder / "diversity.png", title=title)
    return RunDiversity(result=result, title=title, json_path=folder / "diversity.json",
                        figure_path=folder / "diversity.png")
