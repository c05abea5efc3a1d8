"""Semantic attention (class attention, importance map) and the projection / reconstruction heads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dagman.models.heads import (
    ProjectionHead,
    ProjectionMLP,
    PrototypeLayer,
    ReconstructionHead,
    last_layer_parameter_names,
    no_weight_decay_parameter_names,
    pixel_shuffle_3d,
    pixel_unshuffle_3d,
    reconstruction_upsample,
)
from dagman.models.semantic_attention import ClassAttentionBlock, SemanticAttention
from dagman.models.swin import MaskTokenEncoder, build_backbone

# ---------------------------------------------------------------------------------------------- SA


def _tokens(b=2, n=27, c=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.layer_norm(torch.randn(b, n, c, generator=g), (c,))


def test_sa_shapes_importance_sums_to_one_and_tokens_unchanged():
    torch.manual_seed(0)
    sa = SemanticAttention(32, num_heads=4, num_blocks=2)
    x = _tokens()
    before = x.clone()
    cls, tokens, importance = sa(x)
    assert cls.shape == (2, 32) and importance.shape == (2, 27)
    assert tokens is x and torch.equal(x, before)
    assert torch.allclose(importance.sum(1), torch.ones(2), atol=1e-6)
    assert (importance > 0).all()
    # the final LayerNorm: zero mean, unit variance per sample (affine at init: 1, 0); the variance is
    # v / (v + eps) with v ~ 0.02**2 (the trunc-normal [CLS] token barely moved by LayerScale 1e-4)
    assert torch.allclose(cls.mean(1), torch.zeros(2), atol=1e-5)
    assert torch.allclose(cls.var(1, unbiased=False), torch.ones(2), atol=0.05)


def test_sa_with_zero_layerscale_outputs_normed_cls_token():
    torch.manual_seed(1)
    sa = SemanticAttention(16, num_heads=2, num_blocks=3, layerscale_init=0.0)
    out = sa(_tokens(3, 8, 16))
    expected = F.layer_norm(sa.cls_token[0, 0], (16,), sa.norm.weight, sa.norm.bias)
    assert torch.allclose(out.cls, expected.expand(3, -1), atol=1e-6)


def test_sa_gradient_reaches_cls_token_and_not_through_patches_unless_used():
    torch.manual_seed(2)
    sa = SemanticAttention(16, num_heads=2, num_blocks=2, layerscale_init=0.5)
    x = _tokens(2, 8, 16).requires_grad_(True)
    out = sa(x)
    out.cls.pow(2).sum().backward()
    assert sa.cls_token.grad is not None and sa.cls_token.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0  # cls attends to the patches
    for name, p in sa.named_parameters():
        assert p.grad is not None, name


def test_sa_importance_matches_explicit_computation_and_sdpa_path_agrees():
    """Importance = head-mean of the last block's softmax(q.k/sqrt(dh)) over [cls; patches], cls dropped,
    renormalised; the fused (SDPA) path of the earlier blocks equals the explicit one."""
    torch.manual_seed(3)
    dim, heads, n = 12, 3, 5
    sa = SemanticAttention(dim, num_heads=heads, num_blocks=2, layerscale_init=0.3)
    with torch.no_grad():  # peaked, head-specific attention (at init every head is nearly uniform)
        for blk in sa.blocks:
            blk.attn.q.weight.mul_(40)
            blk.attn.k.weight.mul_(40)
    x = _tokens(2, n, dim, seed=4)
    out = sa(x)
    # explicit forward in float64 numpy-style, independent of the module's code paths
    cls = sa.cls_token.expand(2, -1, -1).double()
    xd = x.double()
    for i, blk in enumerate(sa.blocks):
        u = F.layer_norm(torch.cat([cls, xd], 1), (dim,), blk.norm1.weight.double(), blk.norm1.bias.double())
        a = blk.attn
        q = (u[:, :1] @ a.q.weight.double().T + a.q.bias.double()).view(2, 1, heads, 4)
        k = (u @ a.k.weight.double().T + a.k.bias.double()).view(2, n + 1, heads, 4)
        v = (u @ a.v.weight.double().T + a.v.bias.double()).view(2, n + 1, heads, 4)
        logits = torch.einsum("bqhd,bkhd->bhk", q, k) / math.sqrt(4)
        p = logits.softmax(-1)  # (2, heads, n+1)
        o = torch.einsum("bhk,bkhd->bhd", p, v).reshape(2, 1, dim)
        o = o @ a.proj.weight.double().T + a.proj.bias.double()
        cls = cls + blk.gamma1.double() * o
        hdn = F.layer_norm(cls, (dim,), blk.norm2.weight.double(), blk.norm2.bias.double())
        hdn = F.gelu(hdn @ blk.mlp.linear1.weight.double().T + blk.mlp.linear1.bias.double())
        cls = cls + blk.gamma2.double() * (hdn @ blk.mlp.linear2.weight.double().T + blk.mlp.linear2.bias.double())
    s = p.mean(1)[:, 1:]
    s = s / s.sum(1, keepdim=True)
    ref_cls = F.layer_norm(cls[:, 0], (dim,), sa.norm.weight.double(), sa.norm.bias.double())
    assert torch.allclose(out.importance.double(), s, atol=1e-6)
    assert torch.allclose(out.cls.double(), ref_cls, atol=1e-5)


def test_sa_temperature_divides_the_attention_logits():
    """temperature t: softmax(q.k / (sqrt(dh) t)) -- the same block as t = 1 with the query projection (weight
    and bias) scaled by 1/t, in the explicit (importance) and the fused (earlier blocks) paths alike."""
    torch.manual_seed(5)
    dim, t = 12, 0.05
    hot = SemanticAttention(dim, num_heads=3, num_blocks=2, layerscale_init=0.3, temperature=t)
    ref = SemanticAttention(dim, num_heads=3, num_blocks=2, layerscale_init=0.3)
    ref.load_state_dict(hot.state_dict())
    with torch.no_grad():
        for blk in ref.blocks:
            blk.attn.q.weight.div_(t)
            blk.attn.q.bias.add_(0.01).div_(t)
        for blk in hot.blocks:
            blk.attn.q.bias.add_(0.01)
    x = _tokens(2, 6, dim, seed=6)
    a, b = hot(x), ref(x)
    torch.testing.assert_close(a.importance, b.importance, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a.cls, b.cls, atol=1e-5, rtol=1e-5)
    plain = SemanticAttention(dim, num_heads=3, num_blocks=2, layerscale_init=0.3)
    plain.load_state_dict(hot.state_dict())
    # a lower temperature sharpens the same map: lower entropy
    with torch.no_grad():
        ent = [float(-(o.importance * o.importance.log()).sum(1).mean()) for o in (hot(x), plain(x))]
    assert ent[0] < ent[1]
    with pytest.raises(ValueError, match="temperature"):
        SemanticAttention(dim, num_heads=3, temperature=0.0)


def test_class_attention_hand_example_one_head():
    """dim 2, one head, identity q/k/v/proj, unit LayerNorms. LN of a 2-vector [a, b] is (1, -1) if a > b
    else (-1, 1) (up to the LN eps). cls [1, 0] -> (1,-1); patches [2,0] -> (1,-1), [0,3] -> (-1,1),
    [5,1] -> (1,-1). Logits q.k/sqrt(2) = +-2/sqrt(2) = +-sqrt(2): attention over (cls, p1, p2, p3)
    ~ (e^a, e^a, e^-a, e^a), a = sqrt(2). Importance over patches = (e^a, e^-a, e^a) / (2e^a + e^-a).
    Block output (gamma1 = 1, gamma2 = 0): cls + (1 - 2 p2)(1, -1) with p2 = e^-a / (3e^a + e^-a)."""
    blk = ClassAttentionBlock(2, num_heads=1, mlp_ratio=1.0, layerscale_init=0.0)
    with torch.no_grad():
        for lin in (blk.attn.q, blk.attn.k, blk.attn.v, blk.attn.proj):
            lin.weight.copy_(torch.eye(2))
            lin.bias.zero_()
        blk.gamma1.fill_(1.0)
    cls = torch.tensor([[[1.0, 0.0]]])
    x = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [5.0, 1.0]]])
    new_cls, probs = blk(cls, x, return_attention=True)
    a = math.sqrt(2.0)
    ea, em = math.exp(a), math.exp(-a)
    expected_probs = torch.tensor([[[ea, ea, em, ea]]]) / (3 * ea + em)
    assert torch.allclose(probs, expected_probs, atol=1e-4)
    p2 = em / (3 * ea + em)
    expected_cls = torch.tensor([[[1.0 + (1 - 2 * p2), -(1 - 2 * p2)]]])
    assert torch.allclose(new_cls, expected_cls, atol=1e-4)
    # the SA importance of the same setting: cls column dropped and renormalised
    sa = SemanticAttention(2, num_heads=1, num_blocks=1, mlp_ratio=1.0, layerscale_init=0.0)
    sa.blocks[0].load_state_dict(blk.state_dict())
    with torch.no_grad():
        sa.cls_token.copy_(cls)
    imp = sa(x).importance
    assert torch.allclose(imp, torch.tensor([[ea, em, ea]]) / (2 * ea + em), atol=1e-4)


def test_sa_on_backbone_stage3_tokens_and_no_weight_decay():
    torch.manual_seed(5)
    enc = MaskTokenEncoder(build_backbone(in_chans=1, embed_dim=12, window_size=(4, 4, 4), patch_size=(2, 2, 2),
                                          depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 8)))
    feats = enc(torch.randn(2, 1, 64, 64, 64))
    sa = SemanticAttention(96, num_heads=4)
    out = sa(feats.tokens[3])
    assert out.importance.shape == (2, 64) and out.cls.shape == (2, 96)
    assert out.tokens is feats.tokens[3]
    nwd = set(no_weight_decay_parameter_names(sa))
    assert "cls_token" in nwd and "blocks.0.gamma1" in nwd and "blocks.1.norm1.weight" in nwd
    assert "blocks.0.attn.q.weight" not in nwd and "blocks.0.mlp.linear1.weight" not in nwd
    assert "mask_token" in no_weight_decay_parameter_names(enc)


# ---------------------------------------------------------------------------------------------- heads


def test_prototype_layer_hand_example():
    layer = PrototypeLayer(2, 2, norm_last_layer=True)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    out = layer(torch.tensor([[1.0, 1.0], [-2.0, 0.0]]))
    r = 1 / math.sqrt(2)
    # rows -> (0.6, 0.8), (0, 1); inputs -> (r, r), (-1, 0)
    expected = torch.tensor([[0.6 * r + 0.8 * r, r], [-0.6, 0.0]])
    assert torch.allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_prototype_rows_unit_norm_and_gain(norm_last_layer):
    torch.manual_seed(6)
    layer = PrototypeLayer(16, 40, norm_last_layer=norm_last_layer)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(40, 1) * 10)
    assert torch.allclose(layer.effective_weight().norm(dim=1), torch.ones(40), atol=1e-6)
    assert layer.gain.requires_grad is (not norm_last_layer)
    logits = layer(torch.randn(5, 16) * 7)
    if norm_last_layer:
        assert logits.abs().max() <= 1 + 1e-6  # cosine similarities
        with torch.no_grad():
            layer.gain.fill_(3.0)  # ignored: the gain is fixed at 1
        assert torch.allclose(layer.effective_weight().norm(dim=1), torch.ones(40), atol=1e-6)
    else:
        with torch.no_grad():
            layer.gain.copy_(torch.arange(1, 41.0).view(40, 1))
        assert torch.allclose(layer.effective_weight().norm(dim=1), torch.arange(1, 41.0), atol=1e-4)
        layer(torch.randn(3, 16)).sum().backward()
        assert layer.gain.grad is not None


def test_projection_mlp_layers_and_head_composition():
    torch.manual_seed(7)
    mlp = ProjectionMLP(10, hidden_dim=20, bottleneck_dim=6, num_layers=3)
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(10, 20), (20, 20), (20, 6)]
    assert sum(isinstance(m, nn.GELU) for m in mlp.modules()) == 2
    assert [type(m) for m in ProjectionMLP(10, 20, 6, num_layers=1).modules()][-1] is nn.Linear
    head = ProjectionHead(10, out_dim=50, hidden_dim=20, bottleneck_dim=6, num_layers=3)
    x = torch.randn(4, 7, 10)
    out = head(x)
    assert out.shape == (4, 7, 50)
    z = head.mlp(x)
    assert torch.allclose(out, F.normalize(z, dim=-1) @ head.prototypes.effective_weight().T, atol=1e-6)


def test_shared_prototype_layer_and_parameter_groups():
    torch.manual_seed(8)
    shared = PrototypeLayer(6, 30)
    heads = nn.ModuleDict({
        "cls": ProjectionHead(12, hidden_dim=16, bottleneck_dim=6, prototypes=shared),
        "glob": ProjectionHead(24, hidden_dim=16, bottleneck_dim=6, prototypes=shared),
        "patch": ProjectionHead(12, out_dim=30, hidden_dim=16, bottleneck_dim=6),
    })
    assert heads["cls"].prototypes is heads["glob"].prototypes
    last = last_layer_parameter_names(heads)
    assert last == ["cls.prototypes.weight", "cls.prototypes.gain", "patch.prototypes.weight", "patch.prototypes.gain"]
    names = dict(heads.named_parameters())
    assert set(last) <= set(names)
    nwd = set(no_weight_decay_parameter_names(heads))
    assert {"cls.mlp.mlp.0.bias", "cls.mlp.mlp.4.bias", "cls.prototypes.gain", "patch.prototypes.gain"} <= nwd
    assert not {"cls.mlp.mlp.0.weight", "cls.prototypes.weight", "glob.mlp.mlp.2.weight"} & nwd
    assert nwd <= set(names)
    with pytest.raises(ValueError):
        ProjectionHead(12, bottleneck_dim=8, prototypes=shared)


# ---------------------------------------------------------------------------------------------- pixel shuffle


def test_pixel_shuffle_3d_hand_example():
    # 8 channels at one position, factor 2: channel i*4 + j*2 + k lands at voxel (i, j, k)
    x = torch.arange(8.0).view(1, 8, 1, 1, 1)
    out = pixel_shuffle_3d(x, 2)
    assert out.shape == (1, 1, 2, 2, 2)
    for i in range(2):
        for j in range(2):
            for k in range(2):
                assert out[0, 0, i, j, k] == 4 * i + 2 * j + k
    # two output channels, two positions along W, anisotropic factor (1, 2, 3)
    x = torch.arange(2 * 6 * 2.0).view(1, 12, 1, 1, 2)
    out = pixel_shuffle_3d(x, (1, 2, 3))
    assert out.shape == (1, 2, 1, 2, 6)
    expected = np.zeros((2, 1, 2, 6))
    for c in range(2):
        for j in range(2):
            for k in range(3):
                for w in range(2):
                    expected[c, 0, j, w * 3 + k] = x[0, c * 6 + j * 3 + k, 0, 0, w]
    assert np.array_equal(out[0].numpy(), expected)


def test_pixel_shuffle_3d_matches_torch_2d_and_inverts():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3 * 4 * 4, 5, 3, 2, generator=g)
    out = pixel_shuffle_3d(x, (1, 4, 4))
    for d in range(5):
        assert torch.equal(out[:, :, d], F.pixel_shuffle(x[:, :, d], 4))
    y = torch.randn(2, 2 * 2 * 3 * 4, 3, 2, 2, generator=g)
    assert torch.equal(pixel_unshuffle_3d(pixel_shuffle_3d(y, (2, 3, 4)), (2, 3, 4)), y)
    z = torch.randn(1, 2, 4, 6, 8, generator=g)
    assert torch.equal(pixel_shuffle_3d(pixel_unshuffle_3d(z, 2), 2), z)
    with pytest.raises(ValueError):
        pixel_shuffle_3d(torch.randn(1, 7, 2, 2, 2), 2)


def test_reconstruction_head_shapes_and_linearity():
    assert reconstruction_upsample(2) == (32, 32, 32)
    assert reconstruction_upsample((1, 2, 2), stage=4) == (16, 32, 32)
    torch.manual_seed(10)
    head = ReconstructionHead(24, out_channels=1, upsample=(2, 4, 4))
    assert head.conv.out_channels == 32 and head.conv.kernel_size == (1, 1, 1)
    x = torch.randn(2, 24, 3, 2, 2)
    out = head(x)
    assert out.shape == (2, 1, 6, 8, 8)
    # each voxel is a linear function of its token's features only: the (2,4,4) block of token (1,0,1)
    with torch.no_grad():
        ref = head.conv.weight.view(32, 24) @ x[0, :, 1, 0, 1] + head.conv.bias
    assert torch.allclose(out[0, 0, 2:4, 0:4, 4:8].reshape(-1), ref, atol=1e-5)
    # the matrix-product forward is the 1x1x1 convolution + pixel shuffle, values and gradients
    head2 = ReconstructionHead(24, out_channels=2, upsample=(2, 1, 4))
    tokens = torch.randn(2, 3, 2, 2, 24, requires_grad=True)
    xs = tokens.permute(0, 4, 1, 2, 3)  # a channels-last view, as the backbone's maps are
    g = torch.randn(2, 2, 6, 2, 8)
    results = []
    for fn in (head2, lambda t: pixel_shuffle_3d(head2.conv(t), head2.upsample)):
        head2.zero_grad()
        tokens.grad = None
        y = fn(xs)
        y.backward(g)
        results.append((y.detach(), tokens.grad.clone(), head2.conv.weight.grad.clone(), head2.conv.bias.grad.clone()))
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_reconstruction_from_an_earlier_stage():
    """heads.reconstruction_stage: the AMIP head reads that map (its width) and each token predicts
    patch*2**stage voxels per axis, so the reconstruction still covers the crop."""
    from dagman.config import ConfigError, load_config
    from dagman.ssl.method import StudentNetwork

    small = ["model.embed_dim=6", "model.depths=[1,1,1,1]", "model.num_heads=[1,1,1,1]", "sa.num_heads=1",
             "data.crop_size=32", "heads.num_prototypes=16", "heads.hidden_dim=16", "heads.bottleneck_dim=8"]
    student = StudentNetwork(load_config("tiny", "dagman", overrides=[*small, "heads.reconstruction_stage=2"]))
    assert student.reconstruction.conv.in_channels == 6 * 4 and student.reconstruction.upsample == (8, 8, 8)
    out = student(torch.rand(2, 1, 32, 32, 32))
    assert out.reconstruction.shape == (2, 1, 32, 32, 32)
    last = StudentNetwork(load_config("tiny", "dagman", overrides=small))
    assert last.reconstruction.conv.in_channels == 6 * 16 and last.reconstruction.upsample == (32, 32, 32)
    with pytest.raises(ConfigError, match="reconstruction_stage"):
        load_config("tiny", "dagman", overrides=["heads.reconstruction_stage=5"])
