"""Semantic attention (SA): CaiT-style class attention with a learnable [CLS] token on top of Swin tokens.

method.md sec 3. The SA block reads the (layer-normed) stage-3 tokens of the backbone and gives

- a [CLS] image token (the AITD token), and
- a per-token importance map ``S`` (the attention-guided masks are built from the teacher's),

while the patch tokens pass through unchanged (the backbone is untouched by SA). Each of the
``num_blocks`` class-attention blocks updates the [CLS] token only::

    u   = LN1([cls; x])                       (B, 1+N, C)
    cls = cls + gamma1 * CA(u)                CA: query from u[:, :1], keys/values from all of u
    cls = cls + gamma2 * MLP(LN2(cls))

and the output [CLS] goes through a final LayerNorm.

Importance map (DECIDED): the last block's attention probabilities of the [CLS] query over the ``1+N`` keys
(softmax of ``q . k / sqrt(d_head)``), averaged over heads, with the [CLS] column dropped and the rest
renormalised, so ``S`` ``(B, N)`` sums to 1 over the N patch tokens. Renormalising multiplies each sample's
map by one positive constant, so the token ranking (hence every attention mask) is exactly that of the
head-averaged softmax over all keys.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from dagman.models.swin import DropPath, Mlp

__all__ = ["ClassAttention", "ClassAttentionBlock", "SemanticAttention", "SemanticAttentionOutput"]


class ClassAttention(nn.Module):
    """Multi-head attention with one query (the [CLS] token) over all tokens.

    ``forward(u, return_attention=False)``: ``u`` ``(B, 1+N, C)`` with the [CLS] token first. Returns the
    attended [CLS] update ``(B, 1, C)`` (after the output projection) and, when asked, the attention
    probabilities ``(B, heads, 1+N)`` (else None)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, temperature: float = 1.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"SA width {dim} is not divisible by {num_heads} heads")
        if not temperature > 0:
            raise ValueError(f"SA temperature must be > 0, got {temperature}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5 / temperature
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, u: torch.Tensor, return_attention: bool = False):
        b, length, c = u.shape
        h, dh = self.num_heads, self.head_dim
        q = self.q(u[:, :1]).view(b, 1, h, dh).transpose(1, 2)  # (B, H, 1, dh)
        k = self.k(u).view(b, length, h, dh).transpose(1, 2)  # (B, H, 1+N, dh)
        v = self.v(u).view(b, length, h, dh).transpose(1, 2)
        probs = None
        if return_attention:
            probs = torch.matmul(q * self.scale, k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, 1, 1+N)
            out = torch.matmul(probs.to(v.dtype), v)
            probs = probs[:, :, 0]
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, 1, c)), probs


class ClassAttentionBlock(nn.Module):
    """One CaiT class-attention block with LayerScale; updates the [CLS] token only.

    ``forward(cls, x, return_attention=False)``: ``cls`` ``(B, 1, C)``, ``x`` ``(B, N, C)`` -> new ``cls``
    ``(B, 1, C)`` and the attention probabilities ``(B, heads, 1+N)`` when asked (else None)."""

    def __init__(self, dim: int, num_heads: int = 8, mlp_ratio: float = 4.0, layerscale_init: float = 1e-4,
                 qkv_bias: bool = True, drop_path: float = 0.0, temperature: float = 1.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ClassAttention(dim, num_heads, qkv_bias, temperature)
        self.gamma1 = nn.Parameter(torch.full((dim,), float(layerscale_init)))
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.gamma2 = nn.Parameter(torch.full((dim,), float(layerscale_init)))
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, cls: torch.Tensor, x: torch.Tensor, return_attention: bool = False):
        update, probs = self.attn(self.norm1(torch.cat([cls, x], dim=1)), return_attention)
        cls = cls + self.drop_path(self.gamma1 * update)
        cls = cls + self.drop_path(self.gamma2 * self.mlp(self.norm2(cls)))
        return cls, probs


class SemanticAttentionOutput(NamedTuple):
    """``cls`` ``(B, C)``: the final-LayerNormed [CLS] token; ``tokens`` ``(B, N, C)``: the input patch
    tokens, unchanged (the same tensor object); ``importance`` ``(B, N)``: ``S``, non-negative, sums to 1 per
    sample (see the module docstring). ``importance`` is part of the autograd graph; detach it (or run
    under ``torch.no_grad()``, as for the teacher) before building masks."""

    cls: torch.Tensor
    tokens: torch.Tensor
    importance: torch.Tensor


class SemanticAttention(nn.Module):
    """The SA block (method.md sec 3): a learnable [CLS] token (trunc-normal, std 0.02) and ``num_blocks``
    :class:`ClassAttentionBlock` s of width ``dim``, each with stochastic depth ``drop_path`` on both residual
    branches (per sample; 0 = off, the default) and attention logits ``q . k / (sqrt(d_head) * temperature)``
    (1 = CaiT's scale, the default).

    ``forward(tokens)``: ``tokens`` ``(B, N, C)`` layer-normed stage tokens (``SwinFeatures.tokens[stage]``)
    -> :class:`SemanticAttentionOutput` ``(cls (B, C), tokens (B, N, C), importance (B, N))``.
    The last block computes its attention probabilities explicitly (one query, cheap); the others use
    ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int = 8, num_blocks: int = 2, mlp_ratio: float = 4.0,
                 layerscale_init: float = 1e-4, qkv_bias: bool = True, drop_path: float = 0.0,
                 temperature: float = 1.0) -> None:
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.dim = dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(
            ClassAttentionBlock(dim, num_heads, mlp_ratio, layerscale_init, qkv_bias, drop_path, temperature)
            for _ in range(num_blocks)
        )
        self.norm = nn.LayerNorm(dim)
        self.reset_parameters()

    @classmethod
    def from_config(cls, sa, dim: int) -> "SemanticAttention":
        """The SA block an ``SAConfig`` (``cfg.sa``) describes, of width ``dim`` (the one constructor the trainer
        and the downstream encoder share, so a pretrained block is rebuilt exactly as it was trained)."""
        return cls(dim, num_heads=sa.num_heads, num_blocks=sa.num_blocks, mlp_ratio=sa.mlp_ratio,
                   layerscale_init=sa.layerscale_init, qkv_bias=sa.qkv_bias, drop_path=sa.drop_path_rate,
                   temperature=sa.temperature)

    def reset_parameters(self) -> None:
        """CaiT/timm init: trunc-normal(0.02) Linear weights and [CLS] token, zero biases, unit LayerNorms;
        LayerScale gammas keep their init value."""
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this module) that take no weight decay besides 1-D ones."""
        return {"cls_token"}

    def forward(self, tokens: torch.Tensor) -> SemanticAttentionOutput:
        if tokens.dim() != 3 or tokens.shape[-1] != self.dim:
            raise ValueError(f"SA expects tokens (B, N, {self.dim}), got {tuple(tokens.shape)}")
        cls = self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        probs = None
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            cls, p = block(cls, tokens, return_attention=i == last)
            if p is not None:
                probs = p
        attention = probs.float().mean(dim=1)[:, 1:]  # (B, N): head-averaged [CLS] -> patch attention
        importance = attention / attention.sum(dim=1, keepdim=True)
        return SemanticAttentionOutput(self.norm(cls[:, 0]), tokens, importance)
