"""AdamW parameter groups, per-step learning rate / weight decay, last-layer freezing, gradient clipping.

Weight decay (DECIDED): none on biases, on every parameter with at most one dimension (LayerNorm weights,
LayerScale gains, ...), on the learnable tokens (``mask_token``, ``cls_token``) and on Swin's
``relative_position_bias_table``. DINO / iBOT exclude biases and 1-D parameters only; the table is 2-D
``((2w-1)^3, heads)`` but is an additive attention *bias* indexed by relative offset, and the official Swin
recipe excludes it from weight decay as well, which we follow. Frozen parameters (``requires_grad=False``,
e.g. a weight-norm gain fixed to 1) are left out of the optimiser.

The schedules set the values each step: :func:`set_lr_wd` writes the lr into every group and the weight
decay into the regularised group only.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from dagman.config import OptimConfig

__all__ = [
    "NO_WEIGHT_DECAY_NAMES",
    "split_weight_decay",
    "param_groups",
    "build_optimizer",
    "set_lr_wd",
    "last_layer_parameters",
    "cancel_gradients",
    "clip_gradients",
]

#: Name components (the last dotted part, or any dotted suffix) that never get weight decay.
NO_WEIGHT_DECAY_NAMES: tuple[str, ...] = ("mask_token", "cls_token", "relative_position_bias_table")


def _excluded(name: str, param: torch.Tensor, no_weight_decay_names: Sequence[str]) -> bool:
    if param.ndim <= 1 or name.endswith(".bias") or name == "bias":
        return True
    return any(name == key or name.endswith("." + key) for key in no_weight_decay_names)


def split_weight_decay(
    named_params: Iterable[tuple[str, torch.Tensor]],
    no_weight_decay_names: Sequence[str] = NO_WEIGHT_DECAY_NAMES,
) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]:
    """``(regularised, not_regularised)`` lists of ``(name, param)``; parameters with
    ``requires_grad=False`` are dropped. A name is excluded from decay when it ends with ``.bias``, the
    parameter has ``ndim <= 1``, or the name equals / ends with ``"." + k`` for ``k`` in
    ``no_weight_decay_names`` (e.g. ``"mask_token"``, ``"backbone.cls_token"``)."""
    decay: list[tuple[str, torch.Tensor]] = []
    no_decay: list[tuple[str, torch.Tensor]] = []
    seen: set[int] = set()
    for name, p in named_params:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if _excluded(name, p, no_weight_decay_names) else decay).append((name, p))
    return decay, no_decay


def param_groups(
    named_params: Iterable[tuple[str, torch.Tensor]],
    no_weight_decay_names: Sequence[str] = NO_WEIGHT_DECAY_NAMES,
) -> list[dict]:
    """AdamW parameter groups: ``{"params", "group_name": "decay", "apply_weight_decay": True}`` and
    ``{"params", "group_name": "no_decay", "apply_weight_decay": False, "weight_decay": 0.0}`` (empty
    groups omitted). See :func:`split_weight_decay` for the rule."""
    decay, no_decay = split_weight_decay(named_params, no_weight_decay_names)
    groups = []
    if decay:
        groups.append({"params": [p for _, p in decay], "group_name": "decay", "apply_weight_decay": True})
    if no_decay:
        groups.append(
            {
                "params": [p for _, p in no_decay],
                "group_name": "no_decay",
                "apply_weight_decay": False,
                "weight_decay": 0.0,
            }
        )
    if not groups:
        raise ValueError("no trainable parameters to optimise")
    return groups


def build_optimizer(
    named_params: Iterable[tuple[str, torch.Tensor]],
    cfg: OptimConfig,
    no_weight_decay_names: Sequence[str] = NO_WEIGHT_DECAY_NAMES,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` with ``cfg.betas`` / ``cfg.eps``; lr and weight decay start at 0
    and are set every step with :func:`set_lr_wd`."""
    if cfg.optimizer != "adamw":
        raise ValueError(f"unsupported optimiser {cfg.optimizer!r}")
    return torch.optim.AdamW(
        param_groups(named_params, no_weight_decay_names), lr=0.0, weight_decay=0.0, betas=tuple(cfg.betas),
        eps=cfg.eps,
    )


def set_lr_wd(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Set ``lr`` on every group and ``weight_decay`` on groups with ``apply_weight_decay`` (default True
    for groups that do not say); the others keep 0."""
    for group in optimizer.param_groups:
        group["lr"] = float(lr)
        group["weight_decay"] = float(weight_decay) if group.get("apply_weight_decay", True) else 0.0


def last_layer_parameters(module: nn.Module, key: str = "last_layer") -> list[torch.Tensor]:
    """Parameters whose dotted name has a component equal to ``key`` (the DINO/iBOT prototype layers,
    ``...last_layer.weight`` or ``...last_layer.parametrizations.weight.original1``)."""
    return [p for n, p in module.named_parameters() if key in n.split(".")]


def cancel_gradients(params: Iterable[torch.Tensor]) -> None:
    """Drop the gradients of ``params`` (``p.grad = None``): AdamW then skips them entirely (no moment
    update, no weight decay), which is how the prototype layers stay frozen during the first epoch.
    Call after ``backward`` (and after ``scaler.unscale_``), before clipping and ``optimizer.step``."""
    for p in params:
        p.grad = None


def clip_gradients(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the global L2 norm of the gradients of ``params`` to ``max_norm`` (``0`` or less = measure
    only); returns the total norm *before* clipping as a 0-d float tensor (no host sync). Gradients must be
    unscaled first under fp16 (``scaler.unscale_``)."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    if max_norm and max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in params]
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
