"""Per-step schedules (DINO style): every value precomputed for each global optimiser step.

Steps are 0-based indices of optimiser updates: ``values[i]`` is used *during* update ``i`` (the update
that takes the run from ``i`` completed steps to ``i + 1``). All schedules are float64 numpy arrays of
length ``total_steps``; :meth:`Schedules.at` returns plain python floats for one step.

Shapes of the curves (``T`` = total steps, ``W`` = warm-up steps):

- :func:`cosine_schedule`: linear warm-up ``warmup_start -> base`` over steps ``0..W-1`` (step ``i`` has
  ``warmup_start + (base - warmup_start) * i / W``), then a half cosine from ``base`` at step ``W`` to
  exactly ``final`` at the last step ``T-1``. Unlike DINO's ``cosine_scheduler`` the last value is
  ``final`` itself, so the EMA momentum really reaches ``momentum_end`` (1.0).
- :func:`linear_ramp`: ``start`` for ``hold`` steps, then linear ``start -> end`` over ``ramp`` steps
  (step ``hold + k`` has ``start + (end - start) * k / ramp``), then ``end``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dagman.config import Config, StepPlan

__all__ = ["cosine_schedule", "linear_ramp", "StepValues", "Schedules"]


def _check_counts(total_steps: int, **counts: int) -> None:
    if int(total_steps) != total_steps or total_steps < 1:
        raise ValueError(f"total_steps must be a positive integer, got {total_steps}")
    for name, value in counts.items():
        if int(value) != value or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value}")


def cosine_schedule(
    base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """``(total_steps,) float64``: linear warm-up ``warmup_start -> base`` over ``warmup_steps`` steps, then
    cosine ``base -> final`` reaching ``final`` exactly at the last step.

    The warm-up ends at step ``warmup_steps`` (value ``base``). A cosine part of a single step holds
    ``base``. Raises ValueError when ``warmup_steps > total_steps``."""
    _check_counts(total_steps, warmup_steps=warmup_steps)
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) exceeds total_steps ({total_steps})")
    warm = warmup_start + (base - warmup_start) * np.arange(warmup_steps, dtype=np.float64) / max(warmup_steps, 1)
    n = total_steps - warmup_steps
    if n == 0:
        return warm
    if n == 1:
        return np.concatenate([warm, [float(base)]])
    progress = np.arange(n, dtype=np.float64) / (n - 1)
    decay = final + 0.5 * (base - final) * (1.0 + np.cos(math.pi * progress))
    decay[-1] = final  # exact, whatever the rounding of cos(pi)
    return np.concatenate([warm, decay])


def linear_ramp(start: float, end: float, ramp_steps: int, total_steps: int, hold_steps: int = 0) -> np.ndarray:
    """``(total_steps,) float64``: ``start`` for ``hold_steps`` steps, linear ``start -> end`` over the next
    ``ramp_steps`` steps, ``end`` from step ``hold_steps + ramp_steps`` on (cut at ``total_steps``)."""
    _check_counts(total_steps, ramp_steps=ramp_steps, hold_steps=hold_steps)
    k = np.arange(total_steps, dtype=np.float64) - hold_steps
    if ramp_steps == 0:
        return np.where(k < 0, float(start), float(end))
    frac = np.clip(k / ramp_steps, 0.0, 1.0)
    out = start + (end - start) * frac
    out[k >= ramp_steps] = end  # exact end value
    return out


@dataclass(frozen=True)
class StepValues:
    """Every scheduled value for one optimiser step (python floats)."""

    step: int  # 0-based index of the optimiser update these values are for
    lr: float  # learning rate (of every parameter group)
    weight_decay: float  # AdamW weight decay of the regularised group
    teacher_temp: float  # image-token (AITD/GITD) teacher softmax temperature
    patch_teacher_temp: float  # patch-token (AMPD) teacher softmax temperature
    momentum: float  # teacher EMA momentum applied after this update
    last_layer_frozen: bool  # the prototype layers get no update at this step
    distill_on: bool = True  # the distillation terms (AMPD, AITD, GITD) count in the total (loss.distill_start_epochs)


@dataclass(frozen=True, eq=False)
class Schedules:
    """All per-step schedules of a run, arrays of length ``total_steps`` (float64).

    Built from the config by :meth:`from_config`: ``lr`` cosine ``plan.peak_lr -> optim.min_lr`` after a
    linear warm-up from 0 over ``optim.warmup_epochs``; ``weight_decay`` cosine ``optim.weight_decay ->
    optim.weight_decay_end``; ``teacher_temp`` linear ``loss.teacher_temp_start -> end`` over
    ``loss.teacher_temp_warmup_epochs``; ``patch_teacher_temp`` held at ``patch_teacher_temp_start`` for
    ``loss.patch_teacher_temp_hold_epochs`` then the same-length ramp to ``patch_teacher_temp_end``;
    ``momentum`` cosine ``ema.momentum_start -> ema.momentum_end`` by global step (exactly the end value
    at the last step); the last layer is frozen for steps ``< freeze_last_layer_steps``; the distillation terms
    count from step ``distill_start_steps`` (``loss.distill_start_epochs``). Epoch durations
    become steps with ``plan.steps`` and are clipped to ``total_steps``."""

    lr: np.ndarray
    weight_decay: np.ndarray
    teacher_temp: np.ndarray
    patch_teacher_temp: np.ndarray
    momentum: np.ndarray
    freeze_last_layer_steps: int
    total_steps: int
    distill_start_steps: int = 0

    @classmethod
    def from_config(cls, cfg: Config, plan: StepPlan) -> "Schedules":
        """Schedules of ``cfg`` laid out over ``plan`` (from :func:`dagman.config.plan_steps`)."""
        total = int(plan.total_steps)

        def steps(epochs: float) -> int:
            return min(plan.steps(epochs), total)

        o, loss, e = cfg.optim, cfg.loss, cfg.ema
        ramp = steps(loss.teacher_temp_warmup_epochs)
        return cls(
            lr=cosine_schedule(plan.peak_lr, o.min_lr, total, warmup_steps=steps(o.warmup_epochs), warmup_start=0.0),
            weight_decay=cosine_schedule(o.weight_decay, o.weight_decay_end, total),
            teacher_temp=linear_ramp(loss.teacher_temp_start, loss.teacher_temp_end, ramp, total),
            patch_teacher_temp=linear_ramp(
                loss.patch_teacher_temp_start,
                loss.patch_teacher_temp_end,
                ramp,
                total,
                hold_steps=steps(loss.patch_teacher_temp_hold_epochs),
            ),
            momentum=cosine_schedule(e.momentum_start, e.momentum_end, total),
            freeze_last_layer_steps=steps(o.freeze_last_layer_epochs),
            total_steps=total,
            distill_start_steps=steps(loss.distill_start_epochs),
        )

    def at(self, step: int) -> StepValues:
        """The values for 0-based optimiser step ``step`` (IndexError outside ``0..total_steps-1``)."""
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} outside the schedule (0..{self.total_steps - 1})")
        return StepValues(
            step=int(step),
            lr=float(self.lr[step]),
            weight_decay=float(self.weight_decay[step]),
            teacher_temp=float(self.teacher_temp[step]),
            patch_teacher_temp=float(self.patch_teacher_temp[step]),
            momentum=float(self.momentum[step]),
            last_layer_frozen=bool(step < self.freeze_last_layer_steps),
            distill_on=bool(step >= self.distill_start_steps),
        )
