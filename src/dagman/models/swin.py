"""3D Swin transformer backbone with MONAI's weight layout, a mask token input, and attention capture.

:class:`SwinBackbone` is a re-implementation of ``monai.networks.nets.swin_unetr.SwinTransformer`` (3D):

- the same constructor keywords and the same ``state_dict`` keys and shapes, so weights load both ways
  with ``strict=True`` and an encoder trained here drops into ``SwinUNETR(...).swinViT``;
- the same five feature maps from ``forward(x, normalize=True)`` (float32 parity within 1e-5 is tested,
  including odd input sizes that need padding, windows larger than the grid, other depths and heads);
- faster (see ``benchmarks/backbone_speed.py``): activations stay channels-last through a stage; the
  shifted-window roll and window partition are one precomputed row gather (and its inverse), instead of
  ``torch.roll`` plus an 8-D permute copy each way; windows are ordered by their shifted-window mask
  pattern so each group shares one ``(heads, L, L)`` bias and runs through a fused attention kernel
  (:mod:`dagman.models.attention`) without materialising attention matrices.

On top of MONAI's behaviour:

- ``forward_features(x, mask=..., mask_token=...)``: masked positions (a boolean grid over *any* token
  grid, upsampled nearest to the patch grid) have their patch embedding replaced by a learnable token,
  ``x <- x * (1 - w) + mask_token * w``. The token is passed in (see :class:`MaskTokenEncoder`) so that
  the backbone's state dict stays exactly MONAI's.
- ``return_attention=True`` returns every block's window attention probabilities.
- :class:`SwinFeatures` exposes each stage's layer-normed tokens as ``(B, N, C)`` (the stage-3 tokens
  feed the semantic-attention block).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dagman.models.attention import window_attention_qkv

_SHIFT_MASK_VALUE = -100.0  # MONAI's value for attention between different shifted regions


def _triple(v) -> tuple[int, int, int]:
    if isinstance(v, int):
        return (v, v, v)
    v = tuple(int(i) for i in v)
    if len(v) != 3:
        raise ValueError(f"expected 3 values, got {v}")
    return v  # type: ignore[return-value]


def effective_window(dims: Sequence[int], window: Sequence[int], shift: Sequence[int]):
    """MONAI's ``get_window_size``: a window at least as large as the grid covers the grid, unshifted."""
    w, s = list(window), list(shift)
    for i, n in enumerate(dims):
        if n <= window[i]:
            w[i] = n
            s[i] = 0
    return tuple(w), tuple(s)


class _RowPermute(torch.autograd.Function):
    """``x.index_select(0, perm)`` whose backward is the inverse gather (not a scatter-add)."""

    @staticmethod
    def forward(ctx, x, perm, inverse):  # type: ignore[override]
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def _permute_rows(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return _RowPermute.apply(x, perm, inverse)
    return x.index_select(0, perm)


@dataclass
class WindowPlan:
    """How one stage's (padded) token grid is cut into windows, for one batch size.

    ``perm`` lists, for every (group, sample, window, token-in-window) position, the row of the flattened
    padded grid ``(B * Dp * Hp * Wp)`` it comes from (shift applied); ``inverse`` undoes it.
    ``groups`` are ``(start_window, end_window, mask)`` with ``mask`` ``(L, L)`` (0 or -100) or None.
    ``window_coords`` ``(L, 3)`` are token offsets inside a window (for attention distances).
    """

    window: tuple[int, int, int]
    shift: tuple[int, int, int]
    perm: torch.Tensor
    inverse: torch.Tensor
    groups: list[tuple[int, int, torch.Tensor | None]]
    window_coords: torch.Tensor
    full_mask: torch.Tensor | None = None  # (windows, L, L) over all groups; built lazily for GPU kernels

    def window_mask(self) -> torch.Tensor | None:
        """The shifted-window mask of every window in plan order, ``(windows, L, L)``, or None."""
        if self.full_mask is None and any(m is not None for _, _, m in self.groups):
            n = self.tokens_per_window
            dev = self.perm.device
            parts = [(m if m is not None else torch.zeros(n, n, device=dev)).expand(e - s, n, n) for s, e, m in self.groups]
            self.full_mask = torch.cat(parts, 0)
        return self.full_mask

    @property
    def tokens_per_window(self) -> int:
        return self.window[0] * self.window[1] * self.window[2]


def _region_labels(dims, window, shift) -> torch.Tensor:
    """MONAI's ``compute_mask`` region ids on the padded grid: ``(Dp, Hp, Wp)`` long."""
    labels = torch.zeros(dims, dtype=torch.long)
    cnt = 0
    slices = [
        (slice(-window[i]), slice(-window[i], -shift[i]), slice(-shift[i], None)) for i in range(3)
    ]
    for sd in slices[0]:
        for sh in slices[1]:
            for sw in slices[2]:
                labels[sd, sh, sw] = cnt
                cnt += 1
    return labels


def build_window_plan(dims, window, shift, batch: int, device: torch.device) -> WindowPlan:
    dp, hp, wp = dims
    wd, wh, ww = window
    n_tok = dp * hp * wp
    grid = torch.arange(n_tok, dtype=torch.long).view(dp, hp, wp)
    shifted = any(s > 0 for s in shift)
    if shifted:
        grid = torch.roll(grid, shifts=tuple(-s for s in shift), dims=(0, 1, 2))
    # (nW, L): source row of every token of every window, MONAI's window and in-window raster order
    windows = grid.view(dp // wd, wd, hp // wh, wh, wp // ww, ww).permute(0, 2, 4, 1, 3, 5).reshape(-1, wd * wh * ww)
    n_win = windows.shape[0]
    if shifted:
        labels = _region_labels(dims, window, shift).view(dp // wd, wd, hp // wh, wh, wp // ww, ww)
        labels = labels.permute(0, 2, 4, 1, 3, 5).reshape(n_win, -1)
        pattern = labels.unsqueeze(1) != labels.unsqueeze(2)  # (nW, L, L) True where masked
        flat = pattern.view(n_win, -1)
        uniq, group_of = torch.unique(flat, dim=0, return_inverse=True)
    else:
        uniq = torch.zeros(1, 1, dtype=torch.bool)
        group_of = torch.zeros(n_win, dtype=torch.long)
    order = torch.argsort(group_of, stable=True)
    counts = torch.bincount(group_of, minlength=uniq.shape[0]).tolist()
    per_sample = windows[order]  # (nW, L) grouped
    parts, groups, start = [], [], 0
    for g, count in enumerate(counts):
        if count == 0:
            continue
        block = per_sample[start : start + count].reshape(-1)  # rows of this group for one sample
        parts.append(torch.cat([block + b * n_tok for b in range(batch)]))
        mask = None
        if shifted and bool(uniq[g].any()):
            mask = torch.zeros(uniq.shape[1], dtype=torch.float32)
            mask[uniq[g]] = _SHIFT_MASK_VALUE
            mask = mask.view(wd * wh * ww, wd * wh * ww).to(device)
        first = sum(c for c in counts[:g]) * batch
        groups.append((first, first + count * batch, mask))
        start += count
    perm = torch.cat(parts)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel())
    coords = torch.stack(
        torch.meshgrid(torch.arange(wd), torch.arange(wh), torch.arange(ww), indexing="ij"), -1
    ).view(-1, 3)
    return WindowPlan(tuple(window), tuple(shift), perm.to(device), inverse.to(device), groups, coords.to(device))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative-position bias (MONAI layout)."""

    def __init__(self, dim: int, num_heads: int, window_size: Sequence[int], qkv_bias: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.dim = dim
        self.window_size = _triple(window_size)
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        wd, wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wd - 1) * (2 * wh - 1) * (2 * ww - 1), num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(wd), torch.arange(wh), torch.arange(ww), indexing="ij"))
        coords = coords.flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
        rel[:, :, 0] += wd - 1
        rel[:, :, 1] += wh - 1
        rel[:, :, 2] += ww - 1
        rel[:, :, 0] *= (2 * wh - 1) * (2 * ww - 1)
        rel[:, :, 1] *= 2 * ww - 1
        self.register_buffer("relative_position_index", rel.sum(-1))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_bias(self, n: int) -> torch.Tensor:
        """(heads, n, n) bias for windows of ``n`` tokens (MONAI slices the index for smaller windows)."""
        index = self.relative_position_index[:n, :n].reshape(-1)
        return self.relative_position_bias_table[index].view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, plan: WindowPlan, keep_attention: bool = False):
        """x: (T, C) tokens in ``plan`` order, T = windows * L. Returns (T, C) and optional probabilities."""
        n = plan.tokens_per_window
        t, c = x.shape
        h = self.num_heads
        qkv = self.qkv(x).view(t // n, n, 3, h, c // h)
        bias = self.relative_bias(n)
        use_explicit = keep_attention or (self.training and self.attn_drop.p > 0)
        if x.device.type != "cpu" and not use_explicit:
            # accelerators: one fused call over all windows; the (windows, heads, L, L) bias is cheap there,
            # and one launch beats one per mask group at these small sizes
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            mask = plan.window_mask()
            am = bias.unsqueeze(0) if mask is None else bias.unsqueeze(0) + mask.unsqueeze(1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=am.to(q.dtype), scale=self.scale)
            return self.proj_drop(self.proj(o.transpose(1, 2).reshape(t, c))), None
        outs, probs_all = [], []
        # one split (its backward is a single concatenation; per-group slicing would allocate a zero-filled
        # full-size gradient per group)
        chunks = qkv.split([end - start for start, end, _ in plan.groups], 0) if len(plan.groups) > 1 else (qkv,)
        for (start, end, mask), chunk in zip(plan.groups, chunks):
            if use_explicit:
                group_bias = bias if mask is None else bias + mask.to(bias.dtype)
                q, k, v = chunk.permute(2, 0, 3, 1, 4).unbind(0)  # (W, H, L, d)
                logits = torch.matmul(q * self.scale, k.transpose(-1, -2)) + group_bias.to(q.dtype).unsqueeze(0)
                probs = logits.softmax(-1)
                if keep_attention:
                    probs_all.append(probs.detach())
                o = torch.matmul(self.attn_drop(probs), v)
            else:  # fused; from the packed chunk so that its gradient comes back in the qkv Linear's layout
                o = window_attention_qkv(chunk, bias, self.scale, shift_mask=mask)  # (W, H, L, d)
            outs.append(o.transpose(1, 2).reshape(-1, c))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
        out = self.proj_drop(self.proj(out))
        return out, (torch.cat(probs_all, 0) if keep_attention else None)


class Mlp(nn.Module):
    """MONAI's ``MLPBlock`` in "swin" dropout mode (keys ``linear1``, ``linear2``), exact GELU."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.fn = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.linear2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.linear2(self.drop1(self.fn(self.linear1(x)))))


class DropPath(nn.Module):
    """Stochastic depth per sample (scaled by the keep probability), on ``(B, ...)`` tensors."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


class SwinTransformerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window_size, shift_size, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 norm_layer=nn.LayerNorm, use_checkpoint: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = _triple(window_size)
        self.shift_size = _triple(shift_size)
        self.use_checkpoint = use_checkpoint
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, num_heads, self.window_size, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def _attention_part(self, x: torch.Tensor, plan: WindowPlan, padded: tuple[int, int, int] | None,
                        keep_attention: bool = False):
        b, d, h, w, c = x.shape
        y = self.norm1(x)
        if padded is not None:
            dp, hp, wp = padded
            y = F.pad(y, (0, 0, 0, wp - w, 0, hp - h, 0, dp - d))
        rows = _permute_rows(y.reshape(-1, c), plan.perm, plan.inverse)
        out, probs = self.attn(rows, plan, keep_attention=keep_attention)
        out = _permute_rows(out, plan.inverse, plan.perm)
        if padded is not None:
            out = out.view(b, *padded, c)[:, :d, :h, :w].contiguous()
        return out.view(b, d, h, w, c), probs

    def _mlp_part(self, x):
        return self.drop_path(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor, plan: WindowPlan, padded=None, keep_attention: bool = False):
        """x: (B, D, H, W, C) channels-last. Returns the same shape and, if asked, attention probabilities."""
        if self.use_checkpoint and torch.is_grad_enabled() and not keep_attention:
            attn_out = checkpoint(lambda t: self._attention_part(t, plan, padded)[0], x, use_reentrant=False)
            probs = None
        else:
            attn_out, probs = self._attention_part(x, plan, padded, keep_attention)
        x = x + self.drop_path(attn_out)
        if self.use_checkpoint and torch.is_grad_enabled():
            x = x + checkpoint(self._mlp_part, x, use_reentrant=False)
        else:
            x = x + self._mlp_part(x)
        return x, probs


class PatchMergingV2(nn.Module):
    """2x2x2 neighbourhood concat (order: itertools.product over d, h, w offsets), LayerNorm, Linear 8C->2C."""

    def __init__(self, dim: int, norm_layer=nn.LayerNorm, spatial_dims: int = 3) -> None:
        super().__init__()
        if spatial_dims != 3:
            raise ValueError("only 3D is supported")
        self.dim = dim
        self.reduction = nn.Linear(8 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(8 * dim)

    _OFFSETS = tuple(itertools.product(range(2), range(2), range(2)))

    def forward(self, x):
        b, d, h, w, c = x.shape
        if d % 2 or h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        x = torch.cat([x[:, i::2, j::2, k::2, :] for i, j, k in self._OFFSETS], -1)
        return self.reduction(self.norm(x))


class PatchMerging(PatchMergingV2):
    """MONAI's default ("merging", v0.9.0) neighbourhood order."""

    _OFFSETS = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1))


MERGING_MODE = {"merging": PatchMerging, "mergingv2": PatchMergingV2}


class BasicLayer(nn.Module):
    """One Swin stage: ``depth`` blocks alternating regular and shifted windows, then optional merging."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size, drop_path, mlp_ratio: float = 4.0,
                 qkv_bias: bool = False, drop: float = 0.0, attn_drop: float = 0.0, norm_layer=nn.LayerNorm,
                 downsample=None, use_checkpoint: bool = False) -> None:
        super().__init__()
        self.window_size = _triple(window_size)
        self.shift_size = tuple(i // 2 for i in self.window_size)
        self.no_shift = (0, 0, 0)
        self.depth = depth
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim, num_heads, self.window_size, self.no_shift if i % 2 == 0 else self.shift_size, mlp_ratio,
                qkv_bias, drop, attn_drop, drop_path[i] if isinstance(drop_path, (list, tuple)) else drop_path,
                norm_layer, use_checkpoint,
            )
            for i in range(depth)
        )
        self.downsample = downsample(dim=dim, norm_layer=norm_layer, spatial_dims=3) if callable(downsample) else downsample
        self._plans: dict = {}

    def _plan(self, dims, shifted: bool, batch: int, device) -> WindowPlan:
        window, shift = effective_window(dims, self.window_size, self.shift_size if shifted else self.no_shift)
        padded = tuple(-(-n // wsz) * wsz for n, wsz in zip(dims, window))
        key = (padded, window, shift, batch, str(device))
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) > 32:
                self._plans.clear()
            plan = build_window_plan(padded, window, shift, batch, device)
            self._plans[key] = plan
        return plan

    def forward(self, x: torch.Tensor, keep_attention: bool = False):
        """x: (B, D, H, W, C) channels-last. Returns (x after merging, channels-last; attention list)."""
        b, d, h, w, _ = x.shape
        attentions = []
        for i, blk in enumerate(self.blocks):
            plan = self._plan((d, h, w), i % 2 == 1, b, x.device)
            padded = tuple(-(-n // wsz) * wsz for n, wsz in zip((d, h, w), plan.window))
            x, probs = blk(x, plan, padded if padded != (d, h, w) else None, keep_attention)
            if keep_attention:
                attentions.append(AttentionRecord(probs, plan.window, plan.shift, plan.window_coords, b))
        if self.downsample is not None:
            x = self.downsample(x)
        return x, attentions


@dataclass
class AttentionRecord:
    """Window attention probabilities of one block: ``probs`` ``(windows, heads, L, L)`` over all samples
    (windows in the plan's order), ``coords`` ``(L, 3)`` token offsets within a window."""

    probs: torch.Tensor
    window: tuple[int, int, int]
    shift: tuple[int, int, int]
    coords: torch.Tensor
    batch: int


@dataclass
class SwinFeatures:
    """Outputs of :meth:`SwinBackbone.forward_features`.

    ``maps[i]``: ``(B, C_i, D_i, H_i, W_i)``, MONAI's i-th output (i = 0 patch embedding, 1..4 after each
    stage with its merging); layer-normed (no affine) when ``normalize``; None for an index the caller
    left out of ``outputs``. ``tokens[i]``: the same
    values as ``(B, N_i, C_i)`` (a view, channels-last). ``attention[s][j]``: stage s, block j
    (only with ``return_attention``).
    """

    maps: list[torch.Tensor]
    tokens: list[torch.Tensor]
    attention: list[list[AttentionRecord]] = field(default_factory=list)


def upsample_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest upsampling of a boolean ``(B, d, h, w)`` token mask to ``size`` -> ``(B, *size)`` bool."""
    if mask.dim() != 4:
        raise ValueError(f"mask must be (B, d, h, w), got {tuple(mask.shape)}")
    if tuple(mask.shape[1:]) == tuple(size):
        return mask.bool()
    out = F.interpolate(mask[:, None].float(), size=tuple(size), mode="nearest")
    return out[:, 0] > 0.5


class SwinBackbone(nn.Module):
    """MONAI-compatible 3D Swin transformer. Keywords as ``monai.networks.nets.swin_unetr.SwinTransformer``."""

    def __init__(self, in_chans: int, embed_dim: int, window_size: Sequence[int], patch_size: Sequence[int],
                 depths: Sequence[int], num_heads: Sequence[int], mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 norm_layer=nn.LayerNorm, patch_norm: bool = False, use_checkpoint: bool = False,
                 spatial_dims: int = 3, downsample="merging", use_v2: bool = False, use_hyena: bool = False,
                 hyena_stages=None, use_flash_attention: bool = False) -> None:
        super().__init__()
        if spatial_dims != 3:
            raise ValueError("dagman's Swin backbone is 3D only (spatial_dims=3)")
        if use_hyena or (hyena_stages is not None and any(hyena_stages)):
            raise ValueError("Hyena blocks are not supported by dagman's Swin backbone")
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} differ in length")
        if len(depths) != 4:
            raise ValueError("MONAI's SwinTransformer layout has exactly 4 stages")
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.patch_norm = patch_norm
        self.window_size = _triple(window_size)
        self.patch_size = _triple(patch_size)
        self.use_v2 = use_v2
        self.patch_embed = _PatchEmbed(self.patch_size, in_chans, embed_dim, norm_layer if patch_norm else None)
        self.pos_drop = nn.Dropout(p=drop_rate)
        dpr = [v.item() for v in torch.linspace(0, drop_path_rate, sum(depths))]
        merge = MERGING_MODE[downsample] if isinstance(downsample, str) else downsample
        for i in range(self.num_layers):
            layer = BasicLayer(
                int(embed_dim * 2**i), depths[i], num_heads[i], self.window_size,
                dpr[sum(depths[:i]) : sum(depths[: i + 1])], mlp_ratio, qkv_bias, drop_rate, attn_drop_rate,
                norm_layer, merge, use_checkpoint,
            )
            setattr(self, f"layers{i + 1}", nn.ModuleList([layer]))
        if use_v2:
            from monai.networks.blocks import UnetrBasicBlock

            for i in range(self.num_layers):
                c = embed_dim * 2**i
                block = UnetrBasicBlock(3, c, c, kernel_size=3, stride=1, norm_name="instance", res_block=True)
                setattr(self, f"layers{i + 1}c", nn.ModuleList([block]))
        self.num_features = int(embed_dim * 2 ** (self.num_layers - 1))

    @property
    def stage_widths(self) -> list[int]:
        """Channels of the five outputs: embed, 2x, 4x, 8x, 16x."""
        return [self.embed_dim * 2**i for i in range(self.num_layers + 1)]

    def set_checkpointing(self, enabled: bool) -> None:
        for i in range(self.num_layers):
            for blk in getattr(self, f"layers{i + 1}")[0].blocks:
                blk.use_checkpoint = enabled

    def forward(self, x: torch.Tensor, normalize: bool = True) -> list[torch.Tensor]:
        """MONAI's contract: the five feature maps ``(B, C_i, D_i, H_i, W_i)``."""
        return self.forward_features(x, normalize=normalize).maps

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                         mask_token: torch.Tensor | None = None, normalize: bool = True,
                         return_attention: bool = False, outputs: Sequence[int] | None = None) -> SwinFeatures:
        """x: ``(B, in_chans, D, H, W)``. ``mask``: optional bool ``(B, d, h, w)`` over any token grid
        (True = replace by ``mask_token``, a ``(embed_dim,)`` or ``(1, embed_dim)`` tensor). ``outputs``: the
        indices (0-4) of the maps the caller reads; the others are None in the result and their layer norm is
        not computed (None = all five)."""
        wanted = set(range(self.num_layers + 1)) if outputs is None else {int(i) % (self.num_layers + 1)
                                                                          for i in outputs}
        x = self.patch_embed(x)  # (B, D, H, W, C) channels-last
        if mask is not None:
            if mask_token is None:
                raise ValueError("a mask needs a mask_token")
            w = upsample_mask(mask, x.shape[1:4]).unsqueeze(-1).to(x.dtype)
            x = x * (1.0 - w) + mask_token.reshape(-1).to(x.dtype) * w
        x = self.pos_drop(x)
        outs, attention = [self._out(x, normalize) if 0 in wanted else None], []
        for i in range(self.num_layers):
            if self.use_v2:
                conv = getattr(self, f"layers{i + 1}c")[0]
                x = conv(x.permute(0, 4, 1, 2, 3).contiguous()).permute(0, 2, 3, 4, 1).contiguous()
            x, att = getattr(self, f"layers{i + 1}")[0](x, keep_attention=return_attention)
            attention.append(att)
            outs.append(self._out(x, normalize) if i + 1 in wanted else None)
        tokens = [None if t is None else t.reshape(t.shape[0], -1, t.shape[-1]) for t in outs]
        maps = [None if t is None else t.permute(0, 4, 1, 2, 3) for t in outs]
        return SwinFeatures(maps, tokens, attention if return_attention else [])

    @staticmethod
    def _out(x: torch.Tensor, normalize: bool) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:]) if normalize else x


class _PatchEmbed(nn.Module):
    """Conv3d patch embedding (MONAI keys ``proj``, ``norm``), padding at the end; channels-last output."""

    def __init__(self, patch_size, in_chans: int, embed_dim: int, norm_layer=None) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None

    def forward(self, x):
        if x.dim() != 5:
            raise ValueError(f"expected input (B, C, D, H, W), got {tuple(x.shape)}")
        _, _, d, h, w = x.shape
        pd, ph, pw = ((p - n % p) % p for n, p in zip((d, h, w), self.patch_size))
        if pd or ph or pw:
            x = F.pad(x, (0, pw, 0, ph, 0, pd))
        x = self.proj(x).permute(0, 2, 3, 4, 1)
        if self.norm is not None:
            x = self.norm(x)
        return x.contiguous()


class MaskTokenEncoder(nn.Module):
    """A :class:`SwinBackbone` plus the learnable mask token (trunc-normal init; exclude it from weight
    decay). ``encoder_state_dict()`` is the backbone alone, in MONAI's layout."""

    def __init__(self, backbone: SwinBackbone) -> None:
        super().__init__()
        self.backbone = backbone
        self.mask_token = nn.Parameter(torch.zeros(1, backbone.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, x, mask=None, normalize: bool = True, return_attention: bool = False,
                outputs: Sequence[int] | None = None) -> SwinFeatures:
        return self.backbone.forward_features(x, mask, self.mask_token if mask is not None else None,
                                              normalize=normalize, return_attention=return_attention,
                                              outputs=outputs)

    def encoder_state_dict(self) -> dict:
        return self.backbone.state_dict()


def build_backbone(**kwargs) -> SwinBackbone:
    """Build a :class:`SwinBackbone` from MONAI ``SwinTransformer`` keyword arguments."""
    return SwinBackbone(**kwargs)
