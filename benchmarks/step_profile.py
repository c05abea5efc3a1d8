"""Where a pretraining step spends its time, and the side-by-side ratio behind each change made from it.

    python benchmarks/step_profile.py                 # tiny preset, 64^3, batch 2, fp32, 1 thread (~2 min)
    python benchmarks/step_profile.py --size small --precision bf16 --threads 2
    python benchmarks/step_profile.py --backbone      # + the top ops of the paper backbone step (perf.py (a))

Prints three tables:

1. Phases of one `train_step` (torch.profiler, CPU time per step, median of --steps steps after --warmup):
   teacher forward, student forward, loss functions, mask drawing, optimiser, gradient clipping, EMA, and the
   rest (the backward pass and the autograd bookkeeping).
2. The optimiser step on the student's own parameters and gradients: AdamW's default per-tensor loop vs
   `foreach=True` vs `fused=True` (what dagman uses), interleaved rounds, median ratio with a 95% bootstrap CI.
3. Host syncs per step: the number of device-to-host reads (`Tensor.item()`, `.tolist()`, `float()`, `int()`,
   `bool()` called from Python) one `train_step` makes. On a GPU each one stalls the host until the queue
   drains.

All numbers come from this run; nothing is hard-coded. Synthetic random views (the step's cost does not
depend on the voxel values).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dagman.ssl.losses as losses_mod  # noqa: E402
import dagman.ssl.method as method_mod  # noqa: E402
import dagman.train.loop as loop  # noqa: E402
from dagman.config import load_config, plan_steps  # noqa: E402
from dagman.sysinfo import describe_machine  # noqa: E402
from dagman.train.distributed import DistInfo  # noqa: E402
from dagman.train.schedules import Schedules  # noqa: E402

PHASES = ["teacher forward", "student forward", "loss functions", "mask drawing", "optimiser step",
          "gradient clipping", "EMA teacher update"]


def _state(size: str, precision: str):
    cfg = load_config(size, "dagman", overrides=[f"train.precision={precision}", "optim.warmup_epochs=0"])
    info = DistInfo(0, 1, 0, torch.device("cpu"), False)
    state = loop.build_state(cfg, info, Schedules.from_config(cfg, plan_steps(cfg, 8)))
    s, b = cfg.data.crop_size, cfg.data.batch_size
    views = torch.rand(2, b, 1, s, s, s, generator=torch.Generator().manual_seed(0))
    return cfg, state, views


def _labelled(fn, label: str):
    def wrapper(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)

    return wrapper


def phase_table(size: str, precision: str, steps: int, warmup: int) -> list[tuple[str, float, float]]:
    """(phase, median ms per step, share of the step) for one train_step."""
    cfg, state, views = _state(size, precision)
    state.teacher.forward = _labelled(state.teacher.forward, "teacher forward")
    state.student.forward = _labelled(state.student.forward, "student forward")
    state.optimizer.step = _labelled(state.optimizer.step, "optimiser step")
    saved = {}
    for mod, name, label in ((method_mod, "teacher_drop_mask", "mask drawing"),
                             (method_mod, "student_mask_from_config", "mask drawing"),
                             (loop, "clip_gradients", "gradient clipping"),
                             (loop, "update_teacher", "EMA teacher update")):
        saved[(mod, name)] = getattr(mod, name)
        setattr(mod, name, _labelled(getattr(mod, name), label))
    for cls in (losses_mod.DistillationLoss, losses_mod.MaskedReconstructionLoss):
        saved[(cls, "forward")] = cls.forward
        cls.forward = _labelled(cls.forward, "loss functions")
    try:
        for _ in range(warmup):
            loop.train_step(state, views[0], views[1])
        per_step: dict[str, list[float]] = {p: [] for p in PHASES + ["whole step"]}
        for _ in range(steps):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                with record_function("whole step"):
                    loop.train_step(state, views[0], views[1])
            totals = {e.key: e.cpu_time_total / 1e3 for e in prof.key_averages()}
            for p in per_step:
                per_step[p].append(totals.get(p, 0.0))
    finally:
        for (obj, name), fn in saved.items():
            setattr(obj, name, fn)
    whole = statistics.median(per_step["whole step"])
    rows = [(p, statistics.median(per_step[p])) for p in PHASES]
    rest = whole - sum(ms for _, ms in rows)
    rows.append(("backward + the rest", rest))
    rows.append(("whole step", whole))
    return [(p, ms, ms / whole) for p, ms in rows]


def _bootstrap_median(values: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    arr = np.asarray(values)
    meds = np.median(rng.choice(arr, size=(resamples, arr.size), replace=True), axis=1)
    return float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


def optimiser_table(size: str, rounds: int) -> list[tuple[str, float, float, tuple[float, float]]]:
    """(variant, median ms, median ratio to fused, CI) for AdamW over the student's parameters."""
    cfg, state, views = _state(size, "fp32")
    loop.train_step(state, views[0], views[1])  # real gradients and moments
    params = [p for p in state.student_module.parameters() if p.grad is not None]
    grads = [p.grad.clone() for p in params]
    variants = {"per-tensor loop (default)": {"foreach": False}, "foreach=True": {"foreach": True},
                "fused=True (dagman)": {"fused": True}}
    optims = {}
    for name, kw in variants.items():
        optims[name] = torch.optim.AdamW([{"params": params}], lr=1e-6, **kw)
        optims[name].step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for r in range(rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            for p, g in zip(params, grads):
                p.grad = g
            t0 = time.perf_counter()
            optims[name].step()
            times[name].append(time.perf_counter() - t0)
    fused = times["fused=True (dagman)"]
    out = []
    for name in variants:
        ratios = [a / b for a, b in zip(times[name], fused)]
        out.append((name, statistics.median(times[name]) * 1e3, statistics.median(ratios), _bootstrap_median(ratios)))
    return out


_READS = ("item", "tolist", "__float__", "__int__", "__bool__")


def host_syncs(size: str, precision: str) -> int:
    """Device-to-host reads one train_step makes from Python: calls of Tensor.item / tolist / float() /
    int() / bool() (each waits for the device queue on a GPU)."""
    cfg, state, views = _state(size, precision)
    loop.train_step(state, views[0], views[1])
    count = [0]
    saved = {name: getattr(torch.Tensor, name) for name in _READS}

    def counted(fn):
        def wrapper(self, *args, **kwargs):
            count[0] += 1
            return fn(self, *args, **kwargs)

        return wrapper

    for name, fn in saved.items():
        setattr(torch.Tensor, name, counted(fn))
    try:
        loop.train_step(state, views[0], views[1])
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
    return count[0]


def backbone_op_table(size: int = 96, top: int = 12) -> list[tuple[str, float]]:
    """(op, share of self CPU time) for one fp32 fwd+bwd of the `paper` backbone at ``size``^3, batch 1 (the
    step of perf.py row (a)), the ``top`` ops by self time."""
    from dagman.models.swin import build_backbone

    torch.manual_seed(0)
    net = build_backbone(in_chans=1, embed_dim=48, window_size=(4, 4, 4), patch_size=(2, 2, 2), depths=(2, 2, 8, 2),
                         num_heads=(4, 4, 8, 16), spatial_dims=3)
    x = torch.randn(1, 1, size, size, size)

    def step() -> None:
        outs = net(x)
        sum(o.float().mean() for o in outs).backward()

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    return [(e.key, e.self_cpu_time_total / total) for e in events[:top]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny", choices=["tiny", "cpu", "small", "paper"])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5, help="profiled steps (median)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=20, help="interleaved optimiser rounds")
    ap.add_argument("--backbone", action="store_true",
                    help="also: the top ops of one fp32 fwd+bwd of the paper backbone at 96^3 (perf.py row (a))")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"machine: {describe_machine()}; torch {torch.__version__}; {args.threads} thread(s); "
          f"preset {args.size}, {args.precision}")
    print(f"\n1. train_step phases ({args.size}, {args.precision}; CPU ms per step, median of {args.steps})\n")
    print("| phase | ms / step | share |\n|---|---|---|")
    for phase, ms, share in phase_table(args.size, args.precision, args.steps, args.warmup):
        print(f"| {phase} | {ms:.1f} | {100 * share:.1f}% |")
    print(f"\n2. AdamW step over the {args.size} student's parameters (fp32; {args.rounds} interleaved rounds)\n")
    print("| variant | median ms | time / fused (median, 95% CI) |\n|---|---|---|")
    for name, ms, ratio, (lo, hi) in optimiser_table(args.size, args.rounds):
        print(f"| {name} | {ms:.1f} | {ratio:.2f} [{lo:.2f}, {hi:.2f}] |")
    print(f"\n3. host syncs (device-to-host scalar reads) in one train_step: {host_syncs(args.size, args.precision)}")
    if args.backbone:
        print("\n4. paper backbone fwd+bwd, 96^3, batch 1, fp32: top ops by self CPU time\n")
        print("| op | share |\n|---|---|")
        for op, share in backbone_op_table():
            print(f"| {op} | {100 * share:.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
