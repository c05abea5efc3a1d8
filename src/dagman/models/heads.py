"""Heads of the pretraining method: DINO/iBOT projection heads and the AMIP voxel reconstruction head.

Projection (method.md sec 5)::

    x (..., in_dim) --ProjectionMLP--> z (..., bottleneck) --PrototypeLayer--> logits (..., K)
    ProjectionMLP : (Linear-GELU) x (num_layers-1), Linear to the bottleneck
    PrototypeLayer: z / ||z||, then a weight-normalised Linear(bottleneck, K, bias=False)

The two parts are separate modules so a method can give each token kind its own MLP (input widths differ)
while sharing or separating prototype layers (AITD and GITD may share the image-level one; patch tokens get
their own). :class:`ProjectionHead` composes one MLP with one (possibly shared) prototype layer.

Weight normalisation is explicit (not ``torch.nn.utils.weight_norm``, which is deprecated): the layer keeps a
direction matrix ``weight`` ``(K, bottleneck)`` and a gain ``gain`` ``(K, 1)``; the effective weight is
``gain * weight / ||weight||_row``. With ``norm_last_layer`` the gain is fixed at 1 (``requires_grad=False``,
as DINO's ``weight_g``), so every effective row has unit norm and each logit is a cosine similarity in
``[-1, 1]``.

Parameter groups for the optimiser: :func:`last_layer_parameter_names` (prototype layers, frozen during the
first epoch) and :func:`no_weight_decay_parameter_names` (biases, norms, 1-D parameters, gains, learnable
tokens) work on any module tree by parameter name.

Reconstruction (AMIP, method.md sec 5): :class:`ReconstructionHead` = 1x1x1 conv to
``out_channels * prod(upsample)`` channels + :func:`pixel_shuffle_3d`.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

__all__ = [
    "ProjectionMLP",
    "PrototypeLayer",
    "ProjectionHead",
    "ReconstructionHead",
    "pixel_shuffle_3d",
    "pixel_unshuffle_3d",
    "reconstruction_upsample",
    "last_layer_parameter_names",
    "no_weight_decay_parameter_names",
]


def _trunc_normal_linear(m: nn.Linear) -> None:
    nn.init.trunc_normal_(m.weight, std=0.02)
    if m.bias is not None:
        nn.init.zeros_(m.bias)


class ProjectionMLP(nn.Module):
    """DINO projection MLP: ``(Linear-GELU) x (num_layers-1)`` then ``Linear`` to the bottleneck
    (``num_layers = 1``: a single Linear). ``(..., in_dim)`` -> ``(..., bottleneck_dim)`` (not normalised).
    Linear weights trunc-normal(0.02), biases zero."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, num_layers: int = 3) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(width, hidden_dim), nn.GELU()]
            width = hidden_dim
        layers.append(nn.Linear(width, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                _trunc_normal_linear(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class PrototypeLayer(nn.Module):
    """L2-normalise the input, then a weight-normalised ``Linear(in_dim, out_dim, bias=False)``.

    ``(..., in_dim)`` -> logits ``(..., out_dim)``. Effective weight ``gain * weight / ||weight||_row``
    (:meth:`effective_weight`); ``norm_last_layer`` fixes ``gain`` at 1 (not trained). This is the "last
    layer" that the trainer freezes during the first epoch."""

    def __init__(self, in_dim: int, out_dim: int = 8192, norm_last_layer: bool = True) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.norm_last_layer = norm_last_layer
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        self.gain = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)
        nn.init.trunc_normal_(self.weight, std=0.02)

    def effective_weight(self) -> torch.Tensor:
        """``(out_dim, in_dim)``: each row ``gain_k * weight_k / ||weight_k||``."""
        direction = F.normalize(self.weight, dim=1)
        return direction if self.norm_last_layer else self.gain * direction

    def no_weight_decay(self) -> set[str]:
        return {"gain"}

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(z, dim=-1), self.effective_weight().to(z.dtype))

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, norm_last_layer={self.norm_last_layer}"


class ProjectionHead(nn.Module):
    """DINO/iBOT head = :class:`ProjectionMLP` + :class:`PrototypeLayer`. ``(..., in_dim)`` -> ``(..., out_dim)``.

    Pass ``prototypes`` to share an existing prototype layer between heads (then ``out_dim`` and
    ``norm_last_layer`` are taken from it and its ``in_dim`` must equal ``bottleneck_dim``)."""

    def __init__(self, in_dim: int, out_dim: int = 8192, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, norm_last_layer: bool = True, prototypes: PrototypeLayer | None = None) -> None:
        super().__init__()
        self.mlp = ProjectionMLP(in_dim, hidden_dim, bottleneck_dim, num_layers)
        if prototypes is None:
            prototypes = PrototypeLayer(bottleneck_dim, out_dim, norm_last_layer)
        elif prototypes.in_dim != bottleneck_dim:
            raise ValueError(f"shared prototype layer takes {prototypes.in_dim} inputs, bottleneck is {bottleneck_dim}")
        self.prototypes = prototypes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prototypes(self.mlp(x))


# ----------------------------------------------------------------------------------------------------------
# Parameter groups
# ----------------------------------------------------------------------------------------------------------

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm3d, nn.BatchNorm3d, nn.BatchNorm1d)


def _named_direct_parameters(module: nn.Module):
    """(full name, local name, owning module, parameter) for every parameter, each once (shared modules are
    reported under their first name, as ``module.named_parameters()`` does)."""
    for mod_name, mod in module.named_modules():
        for local, p in mod.named_parameters(recurse=False):
            yield (f"{mod_name}.{local}" if mod_name else local), local, mod, p


def last_layer_parameter_names(module: nn.Module) -> list[str]:
    """Names (as in ``module.named_parameters()``) of the parameters of every :class:`PrototypeLayer` in
    ``module`` (the DINO "last layer", frozen during the first epoch)."""
    return [full for full, _, mod, _ in _named_direct_parameters(module) if isinstance(mod, PrototypeLayer)]


def no_weight_decay_parameter_names(module: nn.Module) -> list[str]:
    """Names (as in ``module.named_parameters()``) of the parameters that take no weight decay: 1-D
    parameters (biases, norm scales, LayerScale gammas), every parameter of a norm layer, learnable tokens
    (local names ending in ``token``: cls_token, mask_token), and what a module lists in its
    ``no_weight_decay()`` (local names; e.g. the prototype gains)."""
    out = []
    for full, local, mod, p in _named_direct_parameters(module):
        declared = mod.no_weight_decay() if callable(getattr(mod, "no_weight_decay", None)) else ()
        if p.ndim <= 1 or isinstance(mod, _NORMS) or local.endswith("token") or local in declared:
            out.append(full)
    return out


# ----------------------------------------------------------------------------------------------------------
# Reconstruction
# ----------------------------------------------------------------------------------------------------------


def _factors(upsample: int | Sequence[int]) -> tuple[int, int, int]:
    f = (int(upsample),) * 3 if isinstance(upsample, int) else tuple(int(v) for v in upsample)
    if len(f) != 3 or any(v < 1 for v in f):
        raise ValueError(f"upsample must be a positive int or 3 positive ints, got {upsample}")
    return f  # type: ignore[return-value]


def pixel_shuffle_3d(x: torch.Tensor, upsample: int | Sequence[int]) -> torch.Tensor:
    """3D pixel shuffle: ``(B, C*u0*u1*u2, D, H, W)`` -> ``(B, C, D*u0, H*u1, W*u2)``.

    Channel ``c*u0*u1*u2 + i*u1*u2 + j*u2 + k`` goes to ``out[:, c, d*u0 + i, h*u1 + j, w*u2 + k]`` — the
    ordering of ``torch.nn.functional.pixel_shuffle`` extended by one axis."""
    u0, u1, u2 = _factors(upsample)
    if x.dim() != 5 or x.shape[1] % (u0 * u1 * u2):
        raise ValueError(f"pixel_shuffle_3d needs (B, C*{u0 * u1 * u2}, D, H, W), got {tuple(x.shape)}")
    return rearrange(x, "b (c u0 u1 u2) d h w -> b c (d u0) (h u1) (w u2)", u0=u0, u1=u1, u2=u2)


def pixel_unshuffle_3d(x: torch.Tensor, upsample: int | Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pixel_shuffle_3d`: ``(B, C, D*u0, H*u1, W*u2)`` -> ``(B, C*u0*u1*u2, D, H, W)``."""
    u0, u1, u2 = _factors(upsample)
    if x.dim() != 5 or x.shape[2] % u0 or x.shape[3] % u1 or x.shape[4] % u2:
        raise ValueError(f"pixel_unshuffle_3d needs (B, C, D*{u0}, H*{u1}, W*{u2}), got {tuple(x.shape)}")
    return rearrange(x, "b c (d u0) (h u1) (w u2) -> b (c u0 u1 u2) d h w", u0=u0, u1=u1, u2=u2)


def reconstruction_upsample(patch_size: int | Sequence[int], stage: int = 4) -> tuple[int, int, int]:
    """Voxels per axis of one token after ``stage`` mergings: ``patch_size * 2**stage`` (32 for patch 2 and
    the last map) — the ``upsample`` of a :class:`ReconstructionHead` reading that map."""
    return tuple(p * 2**stage for p in _factors(patch_size))  # type: ignore[return-value]


class ReconstructionHead(nn.Module):
    """AMIP head (method.md sec 5, SimMIM-style): a 1x1x1 conv from ``in_dim`` to
    ``out_channels * u0*u1*u2`` channels, then :func:`pixel_shuffle_3d`.

    ``(B, in_dim, d, h, w)`` -> ``(B, out_channels, d*u0, h*u1, w*u2)`` (voxels of the input crop when the
    map is the last stage and ``upsample = reconstruction_upsample(patch_size)``). ``upsample``: int or
    one factor per axis (anisotropic patches)."""

    def __init__(self, in_dim: int, out_channels: int = 1, upsample: int | Sequence[int] = 32) -> None:
        super().__init__()
        self.upsample = _factors(upsample)
        self.out_channels = out_channels
        self.conv = nn.Conv3d(in_dim, out_channels * math.prod(self.upsample), kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the 1x1x1 conv as one matrix product on channels-last rows (the backbone's maps are channels-last
        # views, so no copy in): the same weights and values as ``pixel_shuffle_3d(self.conv(x), upsample)``,
        # 2-3x faster fwd+bwd on a CPU than the convolution kernel with its 32^3-channel weight at the tiny
        # preset's shapes (measured side by side, docs/RESULTS.md "Faster CPU steps")
        if x.dim() != 5:
            raise ValueError(f"ReconstructionHead needs (B, C, D, H, W), got {tuple(x.shape)}")
        u0, u1, u2 = self.upsample
        weight = self.conv.weight.view(self.conv.out_channels, self.conv.in_channels)
        y = F.linear(x.permute(0, 2, 3, 4, 1), weight, self.conv.bias)  # (B, d, h, w, C*u0*u1*u2)
        b, d, h, w, _ = y.shape
        y = y.view(b, d, h, w, self.out_channels, u0, u1, u2).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return y.reshape(b, self.out_channels, d * u0, h * u1, w * u2)
