"""The backbone matches MONAI's SwinTransformer: keys, shapes, outputs and gradients; plus the extras."""

import copy

import pytest
import torch
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import SwinTransformer

from dagman.models import attention as attn_mod
from dagman.models.swin import MaskTokenEncoder, build_backbone, build_window_plan, upsample_mask

ARCHS = [
    # (kwargs, input size) — none of these is a dagman preset
    (dict(embed_dim=12, window_size=(4, 4, 4), patch_size=(2, 2, 2), depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 8)), (64, 64, 64)),
    (dict(embed_dim=12, window_size=(3, 5, 4), patch_size=(2, 2, 2), depths=(1, 3, 2, 1), num_heads=(1, 2, 3, 4)), (37, 50, 61)),
    (dict(embed_dim=24, window_size=(7, 7, 7), patch_size=(2, 2, 2), depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24)), (64, 48, 40)),
    (dict(embed_dim=8, window_size=(2, 2, 2), patch_size=(1, 2, 2), depths=(3, 1, 1, 2), num_heads=(1, 2, 2, 4)), (33, 34, 30)),
    (dict(embed_dim=16, window_size=(4, 4, 4), patch_size=(2, 2, 2), depths=(2, 2, 2, 2), num_heads=(2, 4, 4, 8),
          downsample="mergingv2", qkv_bias=False, mlp_ratio=2.0, patch_norm=True), (32, 64, 48)),
    (dict(embed_dim=12, window_size=(4, 4, 4), patch_size=(2, 2, 2), depths=(2, 2, 2, 2), num_heads=(3, 3, 3, 3),
          use_v2=True), (32, 32, 32)),
]


def _pair(kwargs):
    torch.manual_seed(0)
    kw = dict(in_chans=1, **kwargs)
    monai_model = SwinTransformer(**kw)
    ours = build_backbone(**kw)
    ours.load_state_dict(monai_model.state_dict(), strict=True)
    return monai_model, ours


@pytest.mark.parametrize("kwargs,size", ARCHS)
def test_state_dict_keys_shapes_and_outputs_match_monai(kwargs, size):
    monai_model, ours = _pair(kwargs)
    a, b = monai_model.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
    # and the other way round
    monai_model.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 1, *size)
    with torch.no_grad():
        ref = monai_model(x, normalize=True)
        out = ours(x, normalize=True)
        ref_raw = monai_model(x, normalize=False)
        out_raw = ours(x, normalize=False)
    assert len(out) == 5
    for r, o in zip(ref + ref_raw, out + out_raw):
        assert r.shape == o.shape
        assert torch.allclose(r, o, atol=1e-4, rtol=0), float((r - o).abs().max())


@pytest.mark.parametrize("kwargs,size", [ARCHS[1], ARCHS[3]])
def test_gradients_match_monai_in_float64(kwargs, size):
    monai_model, ours = _pair(kwargs)
    monai_model, ours = monai_model.double(), ours.double()
    x = torch.randn(1, 1, *size, dtype=torch.float64)
    weights = [torch.randn_like(t) for t in monai_model(x)]
    grads = []
    for model in (monai_model, ours):
        xx = x.clone().requires_grad_()
        sum((t * w).sum() for t, w in zip(model(xx), weights)).backward()
        grads.append(({k: p.grad for k, p in model.named_parameters()}, xx.grad))
    (ga, gxa), (gb, gxb) = grads
    assert torch.allclose(gxa, gxb, rtol=1e-8, atol=1e-10)
    for k in ga:
        assert torch.allclose(ga[k], gb[k], rtol=1e-7, atol=1e-10), k


def test_fused_cpu_attention_gradients_match_reference():
    torch.manual_seed(1)
    w, h, n, d = 24, 3, 27, 8
    qkv = torch.randn(w, n, 3, h, d, dtype=torch.float64)
    bias = torch.randn(h, n, n, dtype=torch.float64) * 0.3
    bias[:, :5, 5:] -= 100.0  # a shifted-window style mask folded into the bias
    grad_out = torch.randn(w, h, n, d, dtype=torch.float64)
    results = []
    for fn, dtype in ((lambda *a: attn_mod.explicit_window_attention(*a)[0], torch.float64),
                      (attn_mod.window_attention, torch.float32),
                      ("packed", torch.float32)):
        t = qkv.to(dtype).detach().clone().requires_grad_()
        b = bias.to(dtype).detach().clone().requires_grad_()
        if fn == "packed":  # from the packed (W, L, 3, H, d) qkv: its gradient comes back in that layout
            out = attn_mod.window_attention_qkv(t, b, d**-0.5)
        else:
            q, k, v = t.permute(2, 0, 3, 1, 4).unbind(0)
            out = fn(q, k, v, b, d**-0.5)
        out.backward(grad_out.to(dtype))
        assert t.grad.shape == qkv.shape and t.grad.is_contiguous()
        results.append((out.double(), t.grad.double(), b.grad.double()))
    for got_set in results[1:]:
        for ref, got in zip(results[0], got_set):
            assert torch.allclose(ref, got, rtol=1e-4, atol=1e-5), float((ref - got).abs().max())
    # the packed and unpacked fused paths are the same computation
    for a, b in zip(results[1], results[2]):
        assert torch.equal(a, b)


def test_window_plan_is_a_permutation_grouped_by_mask_pattern():
    plan = build_window_plan((8, 8, 8), (4, 4, 4), (2, 2, 2), batch=2, device=torch.device("cpu"))
    n = 2 * 8 * 8 * 8
    assert torch.equal(torch.sort(plan.perm).values, torch.arange(n))
    assert torch.equal(plan.perm[plan.inverse], torch.arange(n))
    # 8 windows per sample, each with a different region pattern: 1 unmasked + 7 masked groups
    assert len(plan.groups) == 8
    assert sum(1 for g in plan.groups if g[2] is None) == 1
    assert plan.groups[-1][1] == 16  # windows, both samples
    unshifted = build_window_plan((8, 8, 8), (4, 4, 4), (0, 0, 0), batch=1, device=torch.device("cpu"))
    assert len(unshifted.groups) == 1 and unshifted.groups[0][2] is None


def test_encoder_weights_load_strictly_into_monai_swinunetr():
    kw = dict(embed_dim=12, window_size=(4, 4, 4), patch_size=(2, 2, 2), depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 8))
    ours = build_backbone(in_chans=1, **kw)
    net = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=kw["depths"], num_heads=kw["num_heads"],
                    window_size=4, patch_size=2)
    net.swinViT.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        for r, o in zip(net.swinViT(x, normalize=True), ours(x)):
            assert torch.allclose(r, o, atol=1e-4)


def test_mask_token_replaces_masked_patch_embeddings():
    torch.manual_seed(0)
    bb = build_backbone(in_chans=1, embed_dim=12, window_size=(4, 4, 4), patch_size=(2, 2, 2),
                        depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 8))
    enc = MaskTokenEncoder(bb)
    assert set(enc.encoder_state_dict()) == set(bb.state_dict())
    assert "mask_token" not in bb.state_dict()
    x = torch.randn(2, 1, 64, 64, 64)
    # mask over the stage-3 grid (64 / 2 / 8 = 4): upsampled x8 to the 32^3 patch grid
    mask = torch.zeros(2, 4, 4, 4, dtype=torch.bool)
    mask[0, 1, 2, 3] = True
    mask[1, :, :, 0] = True
    feats = enc(x, mask=mask, normalize=False)
    emb = bb.patch_embed(x)
    up = upsample_mask(mask, emb.shape[1:4])
    assert up.shape == (2, 32, 32, 32) and int(up[0].sum()) == 8**3 and int(up[1].sum()) == 4 * 4 * 8**3
    assert up[0, 8:16, 16:24, 24:32].all()
    got = feats.maps[0].permute(0, 2, 3, 4, 1)
    token = enc.mask_token.reshape(-1)
    assert torch.allclose(got[up], token.expand(int(up.sum()), -1))
    assert torch.allclose(got[~up], emb[~up])
    # gradient reaches the mask token
    feats.maps[-1].sum().backward()
    assert enc.mask_token.grad is not None and enc.mask_token.grad.abs().sum() > 0
    # no mask -> same as the plain backbone
    with torch.no_grad():
        plain = bb(x, normalize=True)
        again = enc(x).maps
    for a, b in zip(plain, again):
        assert torch.equal(a, b)


def test_attention_capture_and_stage_tokens():
    torch.manual_seed(0)
    bb = build_backbone(in_chans=1, embed_dim=12, window_size=(4, 4, 4), patch_size=(2, 2, 2),
                        depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 8))
    x = torch.randn(2, 1, 64, 64, 64)
    with torch.no_grad():
        f = bb.forward_features(x, return_attention=True)
        plain = bb(x)
    for a, b in zip(f.maps, plain):
        assert torch.allclose(a, b, atol=1e-5)  # explicit attention path == fused path
    assert [len(s) for s in f.attention] == [2, 2, 2, 2]
    rec = f.attention[0][1]  # stage 1, shifted block: 32^3 grid, 4^3 windows
    assert rec.probs.shape == (2 * 8**3, 2, 64, 64)
    assert torch.allclose(rec.probs.sum(-1), torch.ones(()), atol=1e-5)
    assert rec.shift == (2, 2, 2) and rec.coords.shape == (64, 3)
    # stage-3 output tokens (after the 3rd merging): 64/2/8 = 4 -> 64 tokens of width 8 * 12
    assert f.tokens[3].shape == (2, 64, 96)
    assert torch.equal(f.tokens[3], f.maps[3].flatten(2).transpose(1, 2))


def test_bf16_autocast_and_checkpointing_run_and_agree():
    torch.manual_seed(0)
    kw = dict(in_chans=1, embed_dim=12, window_size=(4, 4, 4), patch_size=(2, 2, 2), depths=(1, 1, 2, 1),
              num_heads=(2, 2, 4, 8))
    bb = build_backbone(**kw)
    ck = copy.deepcopy(bb)
    ck.set_checkpointing(True)
    x = torch.randn(1, 1, 64, 64, 64)
    grads = []
    for model in (bb, ck):
        model.zero_grad()
        model(x)[-1].square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bb(x)
    out[-1].float().mean().backward()
    assert all(torch.isfinite(o.float()).all() for o in out)


def test_outputs_leaves_unread_maps_out_and_keeps_the_read_ones_exact():
    torch.manual_seed(3)
    model = build_backbone(in_chans=1, embed_dim=12, window_size=(4, 4, 4), patch_size=(2, 2, 2),
                           depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2))
    x = torch.randn(2, 1, 32, 32, 32)
    full = model.forward_features(x)
    part = model.forward_features(x, outputs=[3, -1])
    for i in range(5):
        if i in (3, 4):
            assert torch.equal(part.maps[i], full.maps[i]) and torch.equal(part.tokens[i], full.tokens[i])
        else:
            assert part.maps[i] is None and part.tokens[i] is None


def test_packed_attention_with_a_separate_shift_mask_equals_the_folded_bias():
    """The shifted-window mask passed apart from the learnable bias (the backward recomputes with -inf there,
    avoiding subnormal arithmetic) gives the values and gradients of the mask folded into the bias."""
    torch.manual_seed(2)
    w, h, n, d = 16, 2, 27, 6
    qkv = torch.randn(w, n, 3, h, d)
    bias = torch.randn(h, n, n) * 0.3
    region = torch.randint(0, 3, (n,))
    shift_mask = torch.zeros(n, n)
    shift_mask[region[:, None] != region[None, :]] = -100.0
    grad_out = torch.randn(w, h, n, d)
    results = []
    for separate in (False, True):
        t = qkv.clone().requires_grad_()
        b = bias.clone().requires_grad_()
        if separate:
            out = attn_mod.window_attention_qkv(t, b, d**-0.5, shift_mask=shift_mask)
        else:
            out = attn_mod.window_attention_qkv(t, b + shift_mask, d**-0.5)
        out.backward(grad_out)
        results.append((out, t.grad, b.grad))
    (o1, g1, b1), (o2, g2, b2) = results
    assert torch.equal(o1, o2)  # the forward is the same computation
    assert torch.allclose(g1, g2, rtol=0, atol=1e-6) and torch.allclose(b1, b2, rtol=0, atol=1e-6)
    # and both match the float64 reference
    x = qkv.double().requires_grad_()
    bb = bias.double().requires_grad_()
    q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)
    ref, _ = attn_mod.explicit_window_attention(q, k, v, bb + shift_mask.double(), d**-0.5)
    ref.backward(grad_out.double())
    assert torch.allclose(g2.double(), x.grad, atol=1e-5) and torch.allclose(b2.double(), bb.grad, atol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_bf16_fused_attention_backward_matches_float32(packed):
    """bf16 inputs (the autocast path): the backward converts once and returns bf16 gradients in the input's
    layout, within bf16 rounding of the float32 computation."""
    torch.manual_seed(4)
    w, h, n, d = 40, 3, 64, 8
    qkv = torch.randn(w, n, 3, h, d)
    bias = torch.randn(h, n, n) * 0.1
    shift_mask = torch.zeros(n, n)
    shift_mask[:32, 32:] = shift_mask[32:, :32] = -100.0
    grad_out = torch.randn(w, h, n, d)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        t = qkv.to(dtype).clone().requires_grad_()
        b = bias.clone().requires_grad_()
        if packed:
            out = attn_mod.window_attention_qkv(t, b, d**-0.5, shift_mask=shift_mask)
        else:
            q, k, v = t.permute(2, 0, 3, 1, 4).unbind(0)
            out = attn_mod.window_attention(q, k, v, b + shift_mask, d**-0.5)
        out.backward(grad_out.to(dtype))
        assert t.grad.dtype == dtype and t.grad.shape == qkv.shape and b.grad.dtype == torch.float32
        results.append((t.grad.float(), b.grad))
    (g32, b32), (g16, b16) = results
    assert float((g16 - g32).abs().max()) <= 0.05 * float(g32.abs().max())
    assert float((b16 - b32).abs().max()) <= 0.05 * float(b32.abs().max())
