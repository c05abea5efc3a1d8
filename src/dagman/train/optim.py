"""AdamW parameter groups, per-step learning rate / weight decay, last-layer freezing, gradient clipping: the one
optimiser rule of pretraining and of every fine-tuning loop (:mod:`dagman.tasks.finetune`).

Weight decay (the rule that runs everywhere): none on parameters with at most one dimension (biases, LayerNorm
weights, LayerScale gains), on every parameter of a norm layer, on learnable tokens (local names ending in
``token``: ``mask_token``, ``cls_token``) and on what a module lists in its ``no_weight_decay()`` (e.g. the
prototype layer's weight-norm gain) -- :func:`dagman.models.heads.no_weight_decay_parameter_names`. Everything
else is decayed, Swin's 2-D ``relative_position_bias_table`` included (as in DINO / iBOT, whose rule is biases
and 1-D parameters; method.md: none on norms, biases, mask token). Frozen parameters (``requires_grad=False``)
are left out of the optimiser.

The schedules set the values each step: :func:`set_lr_wd` writes the lr into every group and the weight
decay into the regularised group only.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from dagman.config import OptimConfig

__all__ = [
    "param_groups",
    "build_optimizer",
    "set_lr_wd",
    "last_layer_parameters",
    "cancel_gradients",
    "clip_gradients",
]


def param_groups(module: nn.Module) -> list[dict]:
    """AdamW parameter groups of ``module``'s trainable parameters under the rule above:
    ``{"params", "apply_weight_decay": True}`` and ``{"params", "apply_weight_decay": False, "weight_decay": 0.0}``
    (empty groups omitted)."""
    from dagman.models.heads import no_weight_decay_parameter_names

    no_wd = set(no_weight_decay_parameter_names(module))
    decay = [p for n, p in module.named_parameters() if p.requires_grad and n not in no_wd]
    no_decay = [p for n, p in module.named_parameters() if p.requires_grad and n in no_wd]
    groups = [g for g in ({"params": decay, "apply_weight_decay": True},
                          {"params": no_decay, "apply_weight_decay": False, "weight_decay": 0.0}) if g["params"]]
    if not groups:
        raise ValueError("no trainable parameters to optimise")
    return groups


def build_optimizer(module: nn.Module, cfg: OptimConfig | None = None, *, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (``cfg.betas`` / ``cfg.eps``, else AdamW's defaults); lr and weight decay
    start at 0 and are set every step with :func:`set_lr_wd`. ``fused``: one kernel over all parameters."""
    kwargs = {}
    if cfg is not None:
        if cfg.optimizer != "adamw":
            raise ValueError(f"unsupported optimiser {cfg.optimizer!r}")
        kwargs = {"betas": tuple(cfg.betas), "eps": cfg.eps}
    return torch.optim.AdamW(param_groups(module), lr=0.0, weight_decay=0.0, fused=fused, **kwargs)


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
