"""Window attention kernels for the 3D Swin backbone.

``window_attention(q, k, v, bias, scale)`` computes ``softmax(scale * q k^T + bias) v`` for a batch of
windows that share one additive bias (relative-position bias, plus the shifted-window mask of that group
of windows), without materialising the attention matrices where the device allows:

- CUDA and other devices: :func:`torch.nn.functional.scaled_dot_product_attention` (the fused kernels
  there differentiate the additive bias).
- CPU: PyTorch's fused CPU flash kernel computes the forward pass, but SDPA cannot differentiate
  ``attn_mask`` there (with a bias that requires grad it falls back to the slow materialising path).
  :class:`_FlashWindowAttentionCPU` runs the flash kernel forward (keeping only the output and the
  log-sum-exp) and its own backward that recomputes the probabilities a few windows at a time and
  returns dq, dk, dv and the bias gradient in one pass, so no full ``(windows, heads, L, L)`` tensor
  is ever stored.
- ``window_attention_qkv(qkv, bias, scale)`` takes the packed ``(W, L, 3, H, d)`` qkv instead (the Swin
  blocks' form): on CPU its backward returns the gradient in that layout, ready for the qkv Linear.
- ``explicit_window_attention`` is the reference path that also returns the probabilities (used when a
  caller asks for attention maps, e.g. for the head-diversity measure).

Shapes: q, k, v ``(W, H, L, d)`` (any strides with a unit last stride), bias ``(H, L, L)``; output
``(W, H, L, d)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_aten = torch.ops.aten
_CHUNK_ELEMENTS = 1 << 20  # elements of one (chunk, H, L, L) block in the bias-gradient loop


def _cpu_flash_available() -> bool:
    return hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu") and hasattr(
        _aten, "_scaled_dot_product_flash_attention_for_cpu_backward"
    )


def _flash_forward(ctx, q, k, v, bias, scale):
    """The CPU flash kernel's forward (output and log-sum-exp) with the bias as its additive mask; remembers in
    ``ctx`` what the backward needs besides the saved tensors."""
    mask = bias.to(q.dtype).unsqueeze(0)
    out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
    ctx.scale = scale
    ctx.bias_dtype = bias.dtype
    ctx.bias_needs_grad = bias.requires_grad
    return out, lse, mask


def _bias_grad(ctx, dbias):
    return dbias.to(ctx.bias_dtype) if ctx.bias_needs_grad else None


class _FlashWindowAttentionCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, scale):  # type: ignore[override]
        out, lse, mask = _flash_forward(ctx, q, k, v, bias, scale)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, v, out, lse, mask = ctx.saved_tensors
        dq, dk, dv, dbias = _chunked_attention_backward(q, k, v, out, lse, mask, grad_out, ctx.scale)
        return dq, dk, dv, _bias_grad(ctx, dbias), None


class _FlashWindowAttentionQKVCPU(torch.autograd.Function):
    """As :class:`_FlashWindowAttentionCPU`, from the packed ``qkv`` ``(W, L, 3, H, d)`` (the qkv Linear's output
    viewed per window): the backward writes dq, dk and dv straight into one gradient of that layout, so autograd
    neither stacks them nor copies the stack to a contiguous tensor for the Linear's backward."""

    @staticmethod
    def forward(ctx, qkv, bias, shift_mask, scale):  # type: ignore[override]
        full = bias if shift_mask is None else bias + shift_mask.to(bias.dtype)
        out, lse, mask = _flash_forward(ctx, *qkv.permute(2, 0, 3, 1, 4).unbind(0), full, scale)
        ctx.bias_dtype, ctx.bias_needs_grad = bias.dtype, ctx.needs_input_grad[1]  # of bias, not of the sum
        ctx.qkv_dtype = qkv.dtype
        if shift_mask is not None:
            # the backward recomputes P with -inf where the shifted-window mask is: P is exactly 0 there instead
            # of exp(-100 - lse) ~ 1e-44, a float32 subnormal, and x86 arithmetic on subnormals is ~10x slower
            # (a masked group's backward: 1.9 s -> 0.35 s, docs/RESULTS.md); the gradients are the same to 1e-40
            mask = mask.masked_fill(shift_mask < 0, float("-inf"))
        ctx.save_for_backward(qkv, out, lse, mask)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        qkv, out, lse, mask = ctx.saved_tensors
        low = qkv.dtype != torch.float32
        if low:  # bf16/fp16: convert the packed tensors whole (contiguous, fast) and work in float32 views
            qkv, out = qkv.float(), out.float()
            rows = grad_out.transpose(1, 2)  # (W, L, H, d): contiguous when it comes from the proj Linear
            grad_out = rows.float().transpose(1, 2) if rows.is_contiguous() else grad_out.float()
        dqkv = torch.empty(qkv.shape, dtype=torch.float32, device=qkv.device)
        grads = dqkv.permute(2, 0, 3, 1, 4).unbind(0)
        *_, dbias = _chunked_attention_backward(*qkv.permute(2, 0, 3, 1, 4).unbind(0), out, lse, mask, grad_out,
                                                ctx.scale, grads=grads)
        return (dqkv.to(ctx.qkv_dtype) if low else dqkv), _bias_grad(ctx, dbias), None, None


def _chunked_attention_backward(q, k, v, out, lse, mask, grad_out, scale, grads=None):
    """Attention backward from the saved log-sum-exp, a few windows at a time so every intermediate
    ``(chunk, H, L, L)`` block stays in cache:

    P = exp(scale q k^T + bias - lse);  dV = P^T dO;  dS = P * (dO V^T - rowsum(dO * O));
    dQ = scale dS K;  dK = scale dS^T Q;  dbias = sum over windows of dS.

    One pass gives all four gradients (the flash kernel's own backward would recompute P again just to
    get dq, dk, dv). Shapes: q, k, v, out, grad_out (W, H, L, d); lse (W, H, L); mask (1, H, L, L).
    Intermediates in float32 whatever the input dtype; dbias (H, L, L) float32. ``grads``: optional (dq, dk, dv)
    tensors (any strides) to write into instead of new ones.
    """
    n_win, heads, length, dim = q.shape
    in_dtype = q.dtype
    low = in_dtype != torch.float32
    if low:
        # bf16/fp16: one contiguous copy and one conversion per tensor here; converting strided per-chunk
        # slices instead was most of a bf16 backward (measured: 3.9 ms per (85, 3, 64, 8) slice)
        q, k, v, grad_out = (t.contiguous().float() for t in (q, k, v, grad_out))
        out = out.float()
        targets, grads = grads, None
    if grads is None:
        grads = tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    dq, dk, dv = grads
    dbias = torch.zeros(heads, length, length, dtype=torch.float32, device=q.device)
    chunk = max(1, _CHUNK_ELEMENTS // (heads * length * length))
    m = mask.float()
    delta = (grad_out.float() * out.float()).sum(-1, keepdim=True)  # (W, H, L, 1)
    for s in range(0, n_win, chunk):
        e = min(n_win, s + chunk)
        # the scale rides on the small (chunk, H, L, d) operands, not on the (chunk, H, L, L) blocks:
        # S = (scale q) k^T, dQ = dS (scale k), dK = dS^T (scale q)
        qs, ks = q[s:e].float() * scale, k[s:e].float() * scale
        kc, vc, gc = (t[s:e].float() for t in (k, v, grad_out))
        probs = torch.matmul(qs, kc.transpose(-1, -2)).add_(m)
        probs.sub_(lse[s:e].float().unsqueeze(-1)).exp_()
        dv[s:e] = torch.matmul(probs.transpose(-1, -2), gc)
        ds = torch.matmul(gc, vc.transpose(-1, -2)).sub_(delta[s:e]).mul_(probs)
        dbias += ds.sum(0)
        dq[s:e] = torch.matmul(ds, ks)
        dk[s:e] = torch.matmul(ds.transpose(-1, -2), qs)
    if low:
        converted = [g.to(in_dtype) for g in (dq, dk, dv)]  # contiguous conversions
        if targets is None:
            return (*converted, dbias)
        for target, g in zip(targets, converted):
            target.copy_(g)  # same dtype: a plain strided copy
        dq, dk, dv = targets
    return dq, dk, dv, dbias


def explicit_window_attention(q, k, v, bias, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention that materialises and returns the probabilities ``(W, H, L, L)``."""
    logits = torch.matmul(q * scale, k.transpose(-1, -2)) + bias.to(q.dtype).unsqueeze(0)
    probs = logits.softmax(-1)
    return torch.matmul(probs, v), probs


def window_attention_qkv(qkv, bias, scale: float, shift_mask=None) -> torch.Tensor:
    """:func:`window_attention` from the packed ``qkv`` ``(W, L, 3, H, d)``; returns ``(W, H, L, d)``. The
    additive bias is ``bias`` (``(H, L, L)``, e.g. the relative-position bias) plus ``shift_mask`` (``(L, L)``,
    0 or a large negative value where tokens of different shifted regions meet; not differentiated)."""
    if (qkv.device.type == "cpu" and _cpu_flash_available() and qkv.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and torch.is_grad_enabled() and (qkv.requires_grad or bias.requires_grad)):
        return _FlashWindowAttentionQKVCPU.apply(qkv, bias, shift_mask, scale)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return window_attention(q, k, v, bias if shift_mask is None else bias + shift_mask.to(bias.dtype), scale)


def window_attention(q, k, v, bias, scale: float) -> torch.Tensor:
    """Fused window attention with a shared additive bias. See the module docstring for shapes."""
    if q.device.type == "cpu" and _cpu_flash_available() and q.dtype in (torch.float32, torch.bfloat16, torch.float16):
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or bias.requires_grad):
            return _FlashWindowAttentionCPU.apply(q, k, v, bias, scale)
        return _aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=bias.to(q.dtype).unsqueeze(0), scale=scale
        )[0]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype).unsqueeze(0), scale=scale)
