"""Losses of the pretraining method: DINO/iBOT distillation cross-entropy with a centred, sharpened teacher
(AITD, GITD, AMPD) and the masked-voxel L1 reconstruction (AMIP). method.md sec 5.

The teacher distribution is normalised one of two ways (``loss.teacher_norm``): DINO centring (method.md's,
the default) or Sinkhorn-Knopp (SwAV / DINOv2's ``sinkhorn_knopp`` centring: a few alternating row/column
normalisations of ``exp(t / temp)`` so that every prototype gets an equal share of the batch and every sample
a distribution; the sums run over the global batch, all-reduced under DDP).

Both are small ``nn.Module`` s computing in float32 (inputs are cast), with no device calls: move the module
with ``.to(device)`` (the centre is a buffer). Use one :class:`DistillationLoss` per centre: one for
image-level tokens (AITD and GITD — or one each), one for patch tokens (AMPD); the centres are saved with
``state_dict()``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DistillationLoss", "MaskedReconstructionLoss", "TEACHER_NORMS", "koleo_loss", "sinkhorn_knopp"]

TEACHER_NORMS = ("centering", "sinkhorn_knopp")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(t, op=op)
    return t


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp teacher targets for ``(R, K)`` logits (R rows of this process; under DDP the rows of
    all processes form the batch): ``Q = exp(logits / temp)`` normalised ``iterations`` times alternately so
    that each prototype's column sums to ``R_global / K`` and then each row sums to 1. After the last
    (row) step every row is a distribution and the columns sum to ``R_global / K`` approximately (exactly in
    the limit of many iterations). float32, no gradient. Every process must call it with the same ``K``
    and ``iterations`` (the sums are all-reduced); ``R`` may differ between processes, or be 0."""
    if logits.dim() != 2:
        raise ValueError(f"sinkhorn_knopp takes (R, K) logits, got {tuple(logits.shape)}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    z = logits.detach().float() / temp
    k = z.shape[1]
    # exp of the logits less their global maximum (a constant factor that the first normalisation cancels)
    peak = z.max() if z.numel() else torch.tensor(float("-inf"), device=z.device)
    peak = _all_reduce(peak.reshape(1).clone(), dist.ReduceOp.MAX)
    q = torch.exp(z - peak)
    rows = _all_reduce(torch.tensor([float(z.shape[0])], device=z.device))
    for _ in range(iterations):
        col = _all_reduce(q.sum(dim=0, keepdim=True))  # (1, K) over the global batch
        q = q / col.clamp_min(torch.finfo(q.dtype).tiny) * (rows / k)
        q = q / q.sum(dim=1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)
    return q


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The KoLeo regulariser of DINOv2 (Sablayrolles et al.'s Kozachenko-Leonenko entropy estimator, up to
    constants) for ``(R, D)`` rows, R >= 2: ``-mean_i log ||u_i - u_nn(i)||`` with ``u = x / ||x||`` and nn(i)
    the nearest other row. Lowest when the rows are spread evenly over the sphere; it rises without bound as
    two rows meet. Float32; the gradient flows into ``x``."""
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"koleo_loss takes (R, D) rows with R >= 2, got {tuple(x.shape)}")
    u = F.normalize(x.float(), dim=1, eps=eps)
    with torch.no_grad():  # the neighbour is chosen, not differentiated through
        sim = u @ u.t()
        sim.fill_diagonal_(-2.0)
        nearest = sim.argmax(dim=1)
    dist2 = (u - u[nearest]).pow(2).sum(dim=1)
    return -0.5 * torch.log(dist2 + eps).mean()


class DistillationLoss(nn.Module):
    """DINO/iBOT cross-entropy between a centred, sharpened teacher and the student over ``K`` prototypes.

    ``forward(student_logits, teacher_logits, student_temp, teacher_temp, weights=None)``:

    - logits ``(B, K)`` (image tokens) or ``(B, T, K)`` (patch tokens), same shape for both;
    - ``P_t`` (no gradient): with ``norm="centering"`` ``softmax((t - center) / teacher_temp)``; with
      ``norm="sinkhorn_knopp"`` :func:`sinkhorn_knopp` of ``t`` over the rows of the batch (image tokens: the
      samples; patch tokens: the tokens whose weight is > 0, all tokens without ``weights``);
      ``log P_s = log_softmax(s / student_temp)``, ``ce = -sum_k P_t log P_s`` per sample (per token);
    - ``(B, K)``: the mean of ``ce`` over samples;
    - ``(B, T, K)`` without ``weights``: the mean over all tokens and samples;
    - ``(B, T, K)`` with ``weights`` ``(B, T)`` (float or bool, e.g. the AMPD student mask): per sample the
      weighted mean over tokens ``sum_t w ce / sum_t w`` (0 for a sample whose weights sum to 0), then the
      mean over all B samples (iBOT's convention: unmasked samples count, as zeros).

    Returns a 0-dim float32 tensor. The centre is not updated by ``forward``; call
    :meth:`update_center` with the teacher logits after computing the loss (DINO order: the loss uses the
    centre from before this step). The centre is kept under Sinkhorn-Knopp too (unused there; it is a
    monitor and lets a run switch normalisation on resume)."""

    center: torch.Tensor

    def __init__(self, out_dim: int, center_momentum: float = 0.9, norm: str = "centering",
                 sinkhorn_iterations: int = 3, queue_size: int = 0) -> None:
        super().__init__()
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        if norm not in TEACHER_NORMS:
            raise ValueError(f"teacher normalisation must be one of {', '.join(TEACHER_NORMS)}, got {norm!r}")
        self.out_dim = out_dim
        self.center_momentum = float(center_momentum)
        self.norm = norm
        self.sinkhorn_iterations = int(sinkhorn_iterations)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.queue_size = int(queue_size) if norm == "sinkhorn_knopp" else 0
        if self.queue_size:  # SwAV's queue: past teacher logits that join the Sinkhorn-Knopp batch
            self.register_buffer("queue", torch.zeros(self.queue_size, out_dim))
            self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))

    def _with_queue(self, rows: torch.Tensor) -> torch.Tensor:
        if not self.queue_size:
            return rows
        return torch.cat([self.queue[self.queue_size - int(self.queue_filled):].to(rows.device), rows])

    @torch.no_grad()
    def update_queue(self, teacher_logits: torch.Tensor) -> None:
        """Push this step's teacher logits (every row of ``(B, K)``; this process's rows only: under DDP each
        process keeps its own queue, and the all-reduced Sinkhorn-Knopp sums see all of them) into the queue,
        newest last, dropping the oldest. No-op without a queue."""
        if not self.queue_size:
            return
        rows = teacher_logits.detach().float().reshape(-1, self.out_dim)[-self.queue_size:]
        n = rows.shape[0]
        self.queue.copy_(torch.cat([self.queue[n:], rows.to(self.queue.device)]))  # the valid rows are the last ones
        self.queue_filled.fill_(min(self.queue_size, int(self.queue_filled) + n))

    def teacher_probs(self, teacher_logits: torch.Tensor, teacher_temp: float,
                      weights: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher distribution ``P_t`` (see the class), float32, detached; same shape as
        ``teacher_logits``. ``weights`` (``(B, T)``, patch tokens only) choose the rows Sinkhorn-Knopp
        normalises over (weight > 0); the other rows get the uniform distribution (they carry no weight)."""
        t = teacher_logits.detach().float()
        if self.norm == "centering":
            return F.softmax((t - self.center) / teacher_temp, dim=-1)
        flat = t.reshape(-1, self.out_dim)
        if weights is None:
            q = sinkhorn_knopp(self._with_queue(flat), teacher_temp, self.sinkhorn_iterations)
            return q[q.shape[0] - flat.shape[0]:].reshape(t.shape)
        keep = weights.reshape(-1) > 0
        out = torch.full_like(flat, 1.0 / self.out_dim)
        out[keep] = sinkhorn_knopp(flat[keep], teacher_temp, self.sinkhorn_iterations)
        return out.reshape(t.shape)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, student_temp: float,
                teacher_temp: float, weights: torch.Tensor | None = None) -> torch.Tensor:
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} "
                             "logits differ in shape")
        if student_logits.dim() not in (2, 3) or student_logits.shape[-1] != self.out_dim:
            raise ValueError(f"logits must be (B, {self.out_dim}) or (B, T, {self.out_dim}), "
                             f"got {tuple(student_logits.shape)}")
        if weights is not None and (student_logits.dim() != 3 or weights.shape != student_logits.shape[:2]):
            raise ValueError(f"weights must be (B, T) = {tuple(student_logits.shape[:2])} for (B, T, K) logits, "
                             f"got {tuple(weights.shape)}")
        return self.cross_entropy(student_logits, self.teacher_probs(teacher_logits, teacher_temp, weights),
                                  student_temp, weights)

    def cross_entropy(self, student_logits: torch.Tensor, p_t: torch.Tensor, student_temp: float,
                      weights: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of :meth:`forward` from teacher targets ``p_t`` already computed by :meth:`teacher_probs`
        (the method computes them once for the loss and the learning monitor)."""
        log_p_s = F.log_softmax(student_logits.float() / student_temp, dim=-1)
        ce = -(p_t * log_p_s).sum(dim=-1)  # (B,) or (B, T)
        if weights is None:
            return ce.mean()
        w = weights.to(ce.dtype)
        total = w.sum(dim=1)
        per_sample = (ce * w).sum(dim=1) / total.clamp_min(torch.finfo(ce.dtype).tiny)
        return torch.where(total > 0, per_sample, torch.zeros_like(per_sample)).mean()

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """EMA of the centre: ``center <- m * center + (1 - m) * mean(teacher_logits)``, the mean over every
        sample (and token) of ``(B, K)`` / ``(B, T, K)`` logits, and over all processes (sum and count
        all-reduced) when ``torch.distributed`` is initialised."""
        t = teacher_logits.detach().float().reshape(-1, self.out_dim)
        total = t.sum(dim=0, keepdim=True)
        count = torch.tensor([float(t.shape[0])], device=t.device)
        if _distributed():
            dist.all_reduce(total)
            dist.all_reduce(count)
        batch_center = total / count.clamp_min(1.0)
        self.center.mul_(self.center_momentum).add_(batch_center.to(self.center.device), alpha=1 - self.center_momentum)

    def extra_repr(self) -> str:
        extra = f", sinkhorn_iterations={self.sinkhorn_iterations}" if self.norm == "sinkhorn_knopp" else ""
        return f"out_dim={self.out_dim}, center_momentum={self.center_momentum}, norm={self.norm}{extra}"


class MaskedReconstructionLoss(nn.Module):
    """AMIP: L1 between predicted and target voxels on masked voxels only.

    ``forward(pred, target, mask)``: ``pred``, ``target`` ``(B, C, D, H, W)``; ``mask`` bool ``(B, D, H, W)``
    or ``(B, 1, D, H, W)`` at voxel resolution, or on a coarser grid ``(B, d, h, w)`` whose sizes divide
    ``(D, H, W)`` (each cell then covers a ``D/d x H/h x W/w`` cuboid, e.g. a token-grid mask).
    Returns ``sum |pred - target| over masked voxels and channels / (masked voxels * C)``: the mean absolute
    error over every masked voxel of the batch (each voxel weighs the same, SimMIM's convention), float32;
    exactly 0 (still differentiable, zero gradient) when nothing is masked."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape or pred.dim() != 5:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must both be (B, C, D, H, W)")
        if mask.dim() == 5:
            if mask.shape[1] != 1:
                raise ValueError(f"a 5-D mask must be (B, 1, D, H, W), got {tuple(mask.shape)}")
            mask = mask[:, 0]
        size = tuple(pred.shape[2:])
        if mask.dim() != 4 or mask.shape[0] != pred.shape[0] or any(v % m for v, m in zip(size, mask.shape[1:])):
            raise ValueError(f"mask {tuple(mask.shape)} must be (B, d, h, w) dividing the voxel grid {size}")
        for axis, (v, m) in enumerate(zip(size, mask.shape[1:])):
            if v != m:
                mask = mask.repeat_interleave(v // m, dim=axis + 1)
        w = mask.to(torch.float32).unsqueeze(1)  # (B, 1, D, H, W)
        err = (pred.float() - target.float()).abs()
        masked_voxels = w.sum() * pred.shape[1]
        return (err * w).sum() / masked_voxels.clamp_min(1.0)
