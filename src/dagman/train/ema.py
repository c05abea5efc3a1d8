"""The teacher: an exact copy of the student, then an exponential moving average of its parameters.

Parameters are matched by *name* (``named_parameters()``, wrappers such as DDP's ``module.`` or
``torch.compile``'s ``_orig_mod.`` prefixes removed) and the name sets must be identical, so a missing or
extra parameter is an error instead of a silently skipped average.

Buffers are *not* averaged: the models here have only constant buffers (Swin's
``relative_position_index``; LayerNorm keeps no running statistics) and the loss centres live in the
losses, not in the networks. :func:`copy_student` copies them once, exactly, with everything else.
"""

from __future__ import annotations

import copy
from typing import Iterator

import torch
from torch import nn

__all__ = ["copy_student", "update_teacher", "matched_parameters", "unwrap_model", "strip_wrapper_prefixes"]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrapper_prefixes(name: str) -> str:
    """``"module._orig_mod.backbone.x"`` -> ``"backbone.x"``: drop leading DDP / torch.compile prefixes."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                stripped = True
    return name


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (``.module``) / ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel) or isinstance(model, nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _named(model: nn.Module) -> dict[str, torch.Tensor]:
    return {strip_wrapper_prefixes(n): p for n, p in model.named_parameters()}


def matched_parameters(student: nn.Module, teacher: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(student_params, teacher_params)`` paired by name, in the student's order.

    Raises ValueError when the name sets differ (listing up to five names on each side) or when a pair
    differs in shape."""
    s, t = _named(student), _named(teacher)
    if s.keys() != t.keys():
        only_s = sorted(s.keys() - t.keys())
        only_t = sorted(t.keys() - s.keys())
        raise ValueError(
            "student and teacher parameters do not match by name: "
            f"only in student {only_s[:5]}{'...' if len(only_s) > 5 else ''}, "
            f"only in teacher {only_t[:5]}{'...' if len(only_t) > 5 else ''}"
        )
    names = list(s)
    for n in names:
        if s[n].shape != t[n].shape:
            raise ValueError(f"parameter '{n}': student shape {tuple(s[n].shape)} != teacher {tuple(t[n].shape)}")
    return [s[n] for n in names], [t[n] for n in names]


def copy_student(student: nn.Module, teacher: nn.Module | None = None) -> nn.Module:
    """The teacher at step 0: an exact copy of ``student`` (DDP wrapper removed), with
    ``requires_grad=False`` everywhere and no ``.grad``.

    Without ``teacher`` it is a deep copy (same architecture *and* same drop-path rates; run it in
    ``eval()`` mode, or pass a template). With ``teacher`` (a freshly built module of the same
    architecture, e.g. with the teacher's drop-path rate), the student's parameters and buffers are copied
    into it exactly (strict: same names and shapes) and that module is returned."""
    student = unwrap_model(student)
    if teacher is None:
        teacher = copy.deepcopy(student)
    else:
        teacher = unwrap_model(teacher)
        matched_parameters(student, teacher)  # clear error before load_state_dict's
        with torch.no_grad():
            teacher.load_state_dict(student.state_dict(), strict=True)
    for p in teacher.parameters():
        p.requires_grad_(False)
        p.grad = None
    return teacher


def _has_foreach() -> bool:
    return hasattr(torch, "_foreach_mul_") and hasattr(torch, "_foreach_add_")


def _groups(student_params, teacher_params) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Pairs grouped by (device, dtype) of the teacher tensor, as the foreach kernels want."""
    groups: dict[tuple, tuple[list, list]] = {}
    for s, t in zip(student_params, teacher_params):
        key = (t.device, t.dtype)
        ss, tt = groups.setdefault(key, ([], []))
        ss.append(s.detach().to(device=t.device, dtype=t.dtype))
        tt.append(t.detach())
    yield from groups.values()


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """In place, for every parameter name: ``teacher = momentum * teacher + (1 - momentum) * student``.

    ``momentum`` in [0, 1]; 1 leaves the teacher untouched (returns at once). Parameters are matched by
    name (DDP/compile prefixes ignored; ValueError on any mismatch); buffers are left alone. Uses the
    fused ``torch._foreach_*`` kernels when available."""
    momentum = float(momentum)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    student_params, teacher_params = matched_parameters(student, teacher)
    if momentum == 1.0:
        return
    for ss, tt in _groups(student_params, teacher_params):
        if _has_foreach():
            torch._foreach_mul_(tt, momentum)
            torch._foreach_add_(tt, ss, alpha=1.0 - momentum)
        else:  # pragma: no cover - very old torch
            for s, t in zip(ss, tt):
                t.mul_(momentum).add_(s, alpha=1.0 - momentum)
