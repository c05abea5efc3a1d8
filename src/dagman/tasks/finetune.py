"""Fine-tuning: the one optimisation step every downstream training loop runs (:class:`Tuner`: AdamW with the
pretraining weight-decay rule of :func:`dagman.train.optim.param_groups`, linear warm-up + cosine learning rate from
:func:`dagman.train.schedules.cosine_schedule`, gradient-norm clipping, non-finite steps skipped and counted), the
encoder + one-output linear head loop of the prediction tasks (:func:`fine_tune`: classification logit or Cox
log-risk, best epoch on validation) and batched prediction (:func:`predict_network`). ``dagman segment``'s
:func:`~dagman.tasks.segment.train_model` drives the same :class:`Tuner`."""

from __future__ import annotations

import copy
from typing import Callable

import numpy as np
import torch
from torch import nn

__all__ = ["ScoringNetwork", "Tuner", "device_for", "fine_tune", "predict_network", "random_flips", "warmup_steps"]

WARMUP_FRACTION = 0.05  # share of the steps with a linear learning-rate warm-up (at most MAX_WARMUP_STEPS)
MAX_WARMUP_STEPS = 100


def warmup_steps(total: int) -> int:
    """Warm-up length of a ``total``-step fine-tuning run: ``min(MAX_WARMUP_STEPS, WARMUP_FRACTION * total)``."""
    return min(MAX_WARMUP_STEPS, int(WARMUP_FRACTION * total))


class Tuner:
    """One AdamW optimisation step at a time for ``total_steps`` steps: parameter groups and weight decay as in
    pretraining (:func:`dagman.train.optim.param_groups`), learning rate ``lr`` with :func:`warmup_steps` of
    linear warm-up then a cosine to 0 at the last step (:func:`dagman.train.schedules.cosine_schedule`),
    gradient-norm clipping at ``clip``. :meth:`step` skips (and counts in ``skipped``) a step whose loss or
    gradient norm is not finite; the schedule advances either way."""

    def __init__(self, model: nn.Module, lr: float, weight_decay: float, total_steps: int, clip: float) -> None:
        from dagman.train.optim import build_optimizer
        from dagman.train.schedules import cosine_schedule

        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model)
        self.lrs = cosine_schedule(float(lr), 0.0, max(1, int(total_steps)), warmup_steps(int(total_steps)))
        self.weight_decay = float(weight_decay)
        self.clip = float(clip)
        self.index = 0
        self.skipped = 0

    def advance(self) -> int:
        """Move the schedule one step without an update (e.g. a batch with nothing to learn); returns the index
        of the step taken."""
        i = min(self.index, len(self.lrs) - 1)
        self.index += 1
        return i

    def step(self, loss: torch.Tensor) -> bool:
        """Backward ``loss`` and apply one update at this step's learning rate; False when skipped."""
        from dagman.train.optim import set_lr_wd

        set_lr_wd(self.optimizer, float(self.lrs[self.advance()]), self.weight_decay)
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):  # skipped and counted, never applied
            self.skipped += 1
            return False
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        if not torch.isfinite(norm):  # finite loss, non-finite gradient: the weights must not see it
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            return False
        self.optimizer.step()
        return True


class ScoringNetwork(nn.Module):
    """Encoder + one linear layer: ``forward(x (B, 1, D, H, W)) -> (B,)`` logit (classification) or log-risk
    (Cox). The encoder is used as given (copy it first to keep the original)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.feature_dim, 1)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)).squeeze(-1)


def device_for(device=None) -> torch.device:
    """``device``, else CUDA when available, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def random_flips(x, generator):
    """Flip each sample of ``x (B, 1, D, H, W)`` along each spatial axis with probability 1/2."""
    flips = torch.rand(x.shape[0], 3, generator=generator) < 0.5
    out = []
    for i in range(x.shape[0]):
        dims = [2 + a for a in range(3) if flips[i, a]]
        out.append(torch.flip(x[i:i + 1], dims) if dims else x[i:i + 1])
    return torch.cat(out)


def predict_network(net, inputs: np.ndarray, batch_size: int = 16, device=None) -> np.ndarray:
    """Outputs ``(N,)`` float64 of a scoring network on inputs ``(N, D, H, W)`` (eval mode, no grad, bf16
    autocast on CUDA)."""
    device = device_for(device)
    net.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, inputs.shape[0], batch_size):
            x = torch.from_numpy(np.ascontiguousarray(inputs[i:i + batch_size]))[:, None].float().to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                o = net(x)
            outs.append(o.float().cpu().numpy().astype(np.float64))
    return np.concatenate(outs) if outs else np.zeros(0)


def fine_tune(encoder, x_train: np.ndarray, x_val: np.ndarray, loss_fn: Callable, val_key: Callable,
              protocol, seed: int, device=None, progress: bool = True, desc: str = "fine-tune"):
    """Train a copy of ``encoder`` + a linear head end-to-end; keep the epoch whose validation outputs score best.

    Args:
        encoder: a :class:`~dagman.tasks.encoder.TaskEncoder` (copied, never modified).
        x_train: ``(M, D, H, W)`` float32 training inputs; x_val: ``(V, D, H, W)`` validation inputs.
        loss_fn: ``loss_fn(outputs (B,) float tensor, rows (B,) int64 numpy indices into x_train) -> scalar
            tensor`` (or None to skip the batch, e.g. a Cox batch without events).
        val_key: ``val_key(val_outputs (V,) numpy) -> comparable`` (higher is better, e.g. ``(auc, -loss)``).
        protocol: ``epochs``, ``lr``, ``weight_decay``, ``batch_size``, ``grad_clip`` (the :class:`Tuner`'s
            settings: warm-up + cosine over all ``epochs`` batches, the pretraining weight-decay rule).
        seed: seeds the head, the batch order and the flips.
    Returns:
        ``(network in eval mode with the best epoch's weights, {"best_epoch": int (1-based), "val_key": ...,
        "skipped_steps": batches whose loss or gradient was not finite (skipped, never applied)})``.
    """
    from tqdm import tqdm

    device = device_for(device)
    torch.manual_seed(int(seed))
    net = ScoringNetwork(copy.deepcopy(encoder).float()).to(device)
    gen = torch.Generator().manual_seed(int(seed))
    n = x_train.shape[0]
    per_epoch = -(-n // protocol.batch_size)
    tuner = Tuner(net, protocol.lr, protocol.weight_decay, protocol.epochs * per_epoch, protocol.grad_clip)
    best_state, best_key, best_epoch = None, None, 0
    bar = tqdm(total=protocol.epochs, desc=desc, unit="epoch", disable=None if progress else True, leave=False)
    for epoch in range(protocol.epochs):
        net.train()
        order = torch.randperm(n, generator=gen).numpy()
        for i in range(0, n, protocol.batch_size):
            rows = order[i:i + protocol.batch_size]
            x = torch.from_numpy(np.ascontiguousarray(x_train[rows]))[:, None].float()
            x = random_flips(x, gen).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = net(x)
            loss = loss_fn(out.float(), rows)
            if loss is None:  # e.g. a Cox batch without events: no step, the schedule still advances
                tuner.advance()
                continue
            tuner.step(loss)
        key = val_key(predict_network(net, x_val, protocol.batch_size * 2, device))
        if best_key is None or key > best_key:
            best_key, best_epoch = key, epoch + 1
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        bar.update(1)
    bar.close()
    skipped = tuner.skipped
    net.load_state_dict(best_state)
    net.eval()
    return net, {"best_epoch": best_epoch, "val_key": best_key, "skipped_steps": skipped}
