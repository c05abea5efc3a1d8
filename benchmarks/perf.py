"""The project's performance table in one command: every speed and memory claim, measured side by side.

    python benchmarks/perf.py                      # full table on CPU (<= ~25 min on 2 cores) -> perf-out/
    python benchmarks/perf.py --quick              # reduced sizes and repeats (~1-2 min on 2 cores)
    python benchmarks/perf.py --device cuda        # the same rows on a GPU, plus torch.compile on/off
    python benchmarks/perf.py --baseline-commit ff03bbb --skip backbone loader memory flops   # row (g) only

Rows (the existing benchmarks' functions are imported and reused, not re-implemented):

(a) backbone fwd+bwd, ours / MONAI: dagman's SwinBackbone against MONAI's SwinTransformer, the `paper`
    architecture (embed 48, depths 2-2-8-2, heads 4-4-8-16, window 4, patch 2) with the same weights, batch
    1, fp32, --backbone-size^3 input (96 default). Target <= 0.8 (docs/RESULTS.md).  [backbone_speed.py]
(b) DAGMaN / SMIT training step: whole `train_step` at each --step-sizes preset (tiny: 64^3 batch 2 fp32;
    small: 96^3 batch 4 bf16), same backbone, heads and batch. Target <= 1.15.  [step_speed.py part A]
(c) bf16 autocast / fp32 for the backbone step of (a) (ours only; on CPU too, whatever it is). No target.
    On CUDA also: torch.compile(ours) / eager, fp32. No target.
(d) loader / step consumption: two-view loader pairs/s (--loader-workers, 2 default; the crop, batch and
    augmentation of each measured preset; the consumer reads every voxel once) divided by the pairs/s the
    DAGMaN training step of that preset consumes (batch / step time from (b), or from (e) for `paper`).
    Target >= 5. The loader is measured alone: in training it shares the cores with the step.
    Without --cache the volumes are SYNTHETIC (8 x 200x170x180 float16 in the page cache).  [loader_speed.py]
(e) paper-size step memory: the `paper` preset, DAGMaN, 128^3, batch 2, activation checkpointing on and off
    (x --paper-precisions), each in a fresh child process: peak RSS on CPU (torch.cuda.max_memory_allocated
    on CUDA) and median step time. Target: with checkpointing the step fits in 24 GiB. On CPU a child's
    address space is capped at the available memory minus 1 GiB (a configuration that does not fit reports
    "out of memory").  [step_speed.py part B]
(f) achieved FLOP/s: the FLOPs of one backbone fwd+bwd step of (a) and of one DAGMaN training step of (b)
    are counted with torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions, attention; elementwise
    ops, norms and the optimiser are not counted), divided by each round's step time, and compared with this
    machine's measured matmul peak (best GFLOP/s of large square torch.matmul, --matmul-sizes, same thread
    count): fp32 steps against the fp32 peak, bf16 steps against the bf16 peak. Target (aim) for the fp32
    backbone step: >= 40% of the fp32 matmul peak.
    FlopCounterMode has no formula for PyTorch's CPU flash-attention kernels, which our fused window attention
    (src/dagman/models/attention.py) and the SA block use on CPU, so their attention FLOPs would be missing;
    perf.py adds formulas for them (forward 4*B*heads*windows*N^2*d, i.e. torch's own SDPA formula; the SDPA
    backward as torch counts its fused kernels, 5 matmuls incl. recomputing QK^T). Our own chunked attention
    backward is plain matmuls and counted as executed (also 5, incl. the recompute). The output states what
    was added and cross-checks the forward attention FLOPs against the analytic sum over blocks.

(g) this checkout's training step / a baseline commit's (only with --baseline-commit REV): the baseline's
    ``src`` is exported (``git archive``) to a temporary folder, and two child processes
    (benchmarks/step_worker.py) hold one `dagman pretrain --size S` state each — this checkout's and the
    baseline's, each with its own default settings (precision, path) — and run one step per request, in
    alternating order, so both are timed in the same rounds. The figure is the marginal step time (after
    --baseline-warmup steps) of this checkout over the baseline's, per --step-sizes preset. Target <= 0.5.

Spread: every ratio is the median over interleaved rounds (the order of the variants alternates between
rounds) of the per-round ratio, with a 95% percentile-bootstrap confidence interval of that median
(--bootstrap resamples, seed 0); the min-max range is in perf.json. Rows whose two sides are not measured in
the same rounds (loader vs consumption) use the ratio of the medians with both sides resampled independently.
Memory rows have no interval (one child each). Reruns should agree within the reported intervals.

Output: the Markdown table on stdout, and --out DIR/perf.json (every number, per-round samples) and
DIR/perf.md (the table with the machine line and this command), both rewritten on each run. Progress lines go
to stderr.
"""

from __future__ import annotations

import os

# As step_speed.py: set before torch starts its OpenMP threads (idle threads sleep instead of spinning).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402
from typing import Callable, Sequence  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from dagman.sysinfo import describe_machine  # noqa: E402

HERE = Path(__file__).resolve().parent


def _load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` (the folder is not a package) as a module, once."""
    key = f"dagman_benchmarks_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
    return module


backbone_speed = _load_benchmark("backbone_speed")
step_speed = _load_benchmark("step_speed")
loader_speed = _load_benchmark("loader_speed")

TARGET_BACKBONE = 0.8  # ours / MONAI fwd+bwd (docs/RESULTS.md)
TARGET_STEP = step_speed.TARGET_RATIO  # dagman / smit step (1.15)
TARGET_LOADER = 5.0  # loader pairs/s / step consumption
TARGET_MEMORY_GIB = 24.0  # paper 128^3 batch-2 step with activation checkpointing (CPU)
TARGET_FLOPS_PERCENT = 40.0  # backbone fp32 step, % of the measured fp32 matmul peak (aim)
TARGET_BASELINE = 0.5  # this checkout's default step / the baseline commit's (issue 13)
GIB = 1024**3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
INTERVAL_TEXT = ("95% percentile-bootstrap CI of the median over the per-round ratios ({n} resamples, seed 0); "
                 "loader rows: of the ratio of medians, both sides resampled")


# ----------------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------------


def bootstrap_median_ci(values: Sequence[float], *, resamples: int = 2000, level: float = 0.95,
                        seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap ``level`` confidence interval of the median of ``values`` (n >= 1 floats).
    With one value the interval is that value."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values")
    if x.size == 1 or resamples < 1:
        return float(x.min()), float(x.max())
    rng = np.random.default_rng(seed)
    medians = np.median(x[rng.integers(0, x.size, (resamples, x.size))], axis=1)
    tail = (1.0 - level) / 2 * 100
    return float(np.percentile(medians, tail)), float(np.percentile(medians, 100 - tail))


def bootstrap_ratio_of_medians_ci(num: Sequence[float], den: Sequence[float], *, resamples: int = 2000,
                                  level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``median(num) / median(den)`` for two independent samples (each
    resampled on its own)."""
    a, b = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if resamples < 1 or (a.size == 1 and b.size == 1):
        r = float(np.median(a) / np.median(b))
        return r, r
    rng = np.random.default_rng(seed)
    ma = np.median(a[rng.integers(0, a.size, (resamples, a.size))], axis=1)
    mb = np.median(b[rng.integers(0, b.size, (resamples, b.size))], axis=1)
    ratios = ma / mb
    tail = (1.0 - level) / 2 * 100
    return float(np.percentile(ratios, tail)), float(np.percentile(ratios, 100 - tail))


def _check_target(value: float | None, target: tuple[str, float] | None) -> bool | None:
    if target is None or value is None or not math.isfinite(value):
        return None if target is None else False
    op, bound = target
    return value <= bound if op == "<=" else value >= bound


def _target_text(target: tuple[str, float] | None, percent: bool = False) -> str:
    if target is None:
        return ""
    return f"{target[0]} {target[1]:g}{'%' if percent else ''}"


def paired_ratio_row(row_id: str, measurement: str, configuration: str, values: dict, values_text: str,
                     num: Sequence[float], den: Sequence[float], *, target: tuple[str, float] | None = None,
                     percent: bool = False, scale: float = 1.0, resamples: int = 2000) -> dict:
    """A table row whose figure is the median of the per-round ratios ``scale * num[i] / den[i]`` (interleaved
    rounds), with the bootstrap CI of that median and the min-max range. ``percent``: shown as a percentage
    (``scale`` 100)."""
    ratios = [scale * a / b for a, b in zip(num, den)]
    ratio = statistics.median(ratios)
    lo, hi = bootstrap_median_ci(ratios, resamples=resamples)
    return {
        "id": row_id, "measurement": measurement, "configuration": configuration, "values": values,
        "values_text": values_text, "ratio": ratio, "ratio_kind": "median of per-round ratios",
        "percent": percent, "scale": scale, "interval": [lo, hi], "range": [min(ratios), max(ratios)],
        "rounds": len(ratios), "target": _target_text(target, percent), "pass": _check_target(ratio, target),
        "samples": {"numerator": list(num), "denominator": list(den)},
    }


# ----------------------------------------------------------------------------------------------------------
# FLOP counting and the matmul peak
# ----------------------------------------------------------------------------------------------------------

_aten = torch.ops.aten


def _attention_shapes(q_shape, k_shape, v_shape) -> tuple[int, int, int, int, int]:
    """(batch*heads, Lq, Lk, d, dv) of (..., L, d) query/key/value shapes."""
    bh = math.prod(q_shape[:-2])
    return bh, q_shape[-2], k_shape[-2], q_shape[-1], v_shape[-1]


def _sdpa_forward_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """Q K^T and P V: ``2*BH*Lq*Lk*d + 2*BH*Lq*Lk*dv`` (= 4*B*heads*windows*N^2*d for window attention)."""
    bh, lq, lk, d, dv = _attention_shapes(q_shape, k_shape, v_shape)
    return 2 * bh * lq * lk * d + 2 * bh * lq * lk * dv


def _sdpa_backward_flops(grad_out_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """As torch counts its fused SDPA backward: recompute Q K^T, dP = dO V^T, dV = P^T dO, dQ = dS K,
    dK = dS^T Q (5 matmuls)."""
    bh, lq, lk, d, dv = _attention_shapes(q_shape, k_shape, v_shape)
    return 2 * bh * lq * lk * d + 2 * bh * lq * lk * dv + 2 * bh * lk * lq * dv + 2 * 2 * bh * lq * lk * d


def added_flop_formulas() -> dict:
    """FLOP formulas perf.py adds to FlopCounterMode's registry: PyTorch's CPU flash-attention kernels
    (forward and backward), which it does not count. Keys are aten op packets."""
    extra = {}
    if hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu"):
        extra[_aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_forward_flops
    if hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        extra[_aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_backward_flops
    return extra


class _OpNames(TorchDispatchMode):
    """Records the name of every aten op packet that runs inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func._overloadpacket)
        return func(*args, **(kwargs or {}))


def count_flops(fn: Callable[[], object]) -> dict:
    """Run ``fn()`` once under FlopCounterMode (with :func:`added_flop_formulas`). Returns ``{"total": int
    FLOPs, "by_op": {op name: FLOPs}, "added": {op name: FLOPs counted by perf.py's formulas},
    "attention_ops": [attention ops that ran], "uncounted_attention_ops": [attention ops with no formula]}``.
    One multiply-add = 2 FLOPs."""
    extra = added_flop_formulas()
    counter = FlopCounterMode(display=False, custom_mapping=extra)
    spy = _OpNames()
    with counter:
        with spy:
            fn()
    by_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    counted = set(counter.flop_registry)
    attention = sorted(str(p) for p in spy.names if "attention" in str(p))
    return {
        "total": int(counter.get_total_flops()),
        "by_op": by_op,
        "added": {str(k): by_op[str(k)] for k in extra if str(k) in by_op},
        "attention_ops": attention,
        "uncounted_attention_ops": sorted(str(p) for p in spy.names if "attention" in str(p) and p not in counted),
    }


def analytic_window_attention_flops(size: int, *, embed_dim: int, depths: Sequence[int], num_heads: Sequence[int],
                                    window: int, patch: int, batch: int = 1) -> int:
    """Forward FLOPs of the window attention (Q K^T and P V) of a 3D Swin backbone on a ``size^3`` input:
    ``sum over blocks of 4 * batch * heads * windows * N^2 * d`` with N tokens per window (the window shrinks to
    the grid where the grid is smaller, as MONAI's; grids are padded up to whole windows) and d = width/heads."""
    grid = -(-size // patch)
    total = 0
    for stage, (depth, heads) in enumerate(zip(depths, num_heads)):
        w = min(window, grid)
        windows = (-(-grid // w)) ** 3
        n = w**3
        d = embed_dim * 2**stage // heads
        total += depth * 4 * batch * heads * windows * n * n * d
        grid = -(-grid // 2)
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, sizes: Sequence[int], repeats: int) -> dict:
    """Best GFLOP/s of ``torch.matmul`` of two random ``(n, n)`` matrices of ``dtype`` (``2 n^3`` FLOPs), over
    ``sizes`` x ``repeats`` timed calls after one untimed call per size (CUDA synchronised; TF32 as the
    current torch settings say). Returns ``{"gflops", "size", "seconds", "per_size": {n: best GFLOP/s}}``."""
    per_size, best = {}, (0.0, 0, 0.0)
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        torch.matmul(a, b, out=out)
        _sync(device)
        fastest = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.matmul(a, b, out=out)
            _sync(device)
            fastest = min(fastest, time.perf_counter() - t0)
        rate = 2 * n**3 / fastest / 1e9
        per_size[n] = rate
        if rate > best[0]:
            best = (rate, n, fastest)
        del a, b, out
    return {"gflops": best[0], "size": best[1], "seconds": best[2], "per_size": per_size,
            "repeats": repeats, "dtype": str(dtype).replace("torch.", "")}


# ----------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------


class Progress:
    """One line per measurement on stderr: ``[perf 3/9, +12.3 s] what``."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self.t0 = time.perf_counter()

    def __call__(self, what: str) -> None:
        self.done += 1
        if self.enabled:
            print(f"[perf {self.done}/{self.total}, +{time.perf_counter() - self.t0:.1f} s] {what}",
                  file=sys.stderr, flush=True)


def build_backbones(device: torch.device, seed: int = 0):
    """MONAI's SwinTransformer and ours at the paper architecture, ours loaded strictly from MONAI's weights."""
    from monai.networks.nets.swin_unetr import SwinTransformer

    from dagman.models.swin import build_backbone

    torch.manual_seed(seed)
    monai_model = SwinTransformer(**backbone_speed.PAPER).to(device)
    ours = build_backbone(**backbone_speed.PAPER).to(device)
    ours.load_state_dict(monai_model.state_dict(), strict=True)
    return monai_model, ours


def measure_backbone(device: torch.device, size: int, *, rounds: int, warmup: int, compile_model: bool = False,
                     seed: int = 0, progress: bool = True) -> dict:
    """Interleaved fwd+bwd step times (``backbone_speed.step``: loss = sum of the means of the five normalised
    outputs, backward) of MONAI fp32, ours fp32, ours bf16 autocast and, with ``compile_model``,
    ``torch.compile(ours)`` fp32, batch 1, one ``(1, 1, size, size, size)`` random input. The order of the
    variants alternates between rounds. Returns ``{"size", "rounds", "warmup", "times": {variant: [s per
    round]}, "parity_max_abs_diff", "compile_error" (None or one line), "models": (monai, ours)}``."""
    from tqdm import tqdm

    monai_model, ours = build_backbones(device, seed)
    with torch.no_grad():  # both compute the same function (cheap fp32 check at 32^3)
        x = torch.randn(1, 1, 32, 32, 32, device=device)
        parity = max(float((a - b).abs().max()) for a, b in zip(monai_model(x), ours(x)))
    x = torch.randn(1, 1, size, size, size, device=device)
    variants = {"monai fp32": (monai_model, torch.float32), "ours fp32": (ours, torch.float32),
                "ours bf16": (ours, torch.bfloat16)}
    compile_error = None
    if compile_model:
        try:
            compiled = torch.compile(ours)
            t0 = time.perf_counter()
            for _ in range(max(warmup, 2)):  # compiles forward and backward
                backbone_speed.step(compiled, x, torch.float32, device)
            variants["ours fp32 compiled"] = (compiled, torch.float32)
            compile_seconds = time.perf_counter() - t0
        except Exception as err:  # noqa: BLE001 - a compile failure is a result to report, not a crash
            compile_error = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err) else ''}"
    for _ in range(warmup):
        for model, dtype in variants.values():
            backbone_speed.step(model, x, dtype, device)
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    bar = tqdm(total=rounds, desc=f"backbone {size}^3", unit="round", disable=None if progress else True,
               file=sys.stderr)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            model, dtype = variants[name]
            t0 = time.perf_counter()
            backbone_speed.step(model, x, dtype, device)
            times[name].append(time.perf_counter() - t0)
        bar.update(1)
    bar.close()
    out = {"size": size, "batch": 1, "rounds": rounds, "warmup": warmup, "times": times,
           "parity_max_abs_diff": parity, "compile_error": compile_error, "models": (monai_model, ours)}
    if compile_model and compile_error is None:
        out["compile_warmup_seconds"] = compile_seconds
    return out


def count_backbone_flops(monai_model, ours, size: int, device: torch.device) -> dict:
    """FLOPs of one fp32 fwd+bwd step of ours and of MONAI's (explicit attention: every matmul counted by
    torch itself), and the analytic forward window-attention FLOPs. On the CPU path, ours = MONAI's + the
    attention backward's recompute of Q K^T (half the forward attention FLOPs)."""
    x = torch.randn(1, 1, size, size, size, device=device)
    ours_count = count_flops(lambda: backbone_speed.step(ours, x, torch.float32, device))
    monai_count = count_flops(lambda: backbone_speed.step(monai_model, x, torch.float32, device))
    p = backbone_speed.PAPER
    analytic = analytic_window_attention_flops(size, embed_dim=p["embed_dim"], depths=p["depths"],
                                               num_heads=p["num_heads"], window=p["window_size"][0],
                                               patch=p["patch_size"][0])
    ours.zero_grad(set_to_none=True)
    monai_model.zero_grad(set_to_none=True)
    return {"ours": ours_count, "monai": monai_count, "analytic_attention_forward": analytic}


def measure_loader(cache: Path, preset: str, *, workers: int, seconds: float, repeats: int, warmup: int,
                   seed: int = 0) -> dict:
    """Two-view loader pairs/s with the crop, batch and augmentation of ``preset`` (as ``pretrain`` builds it),
    ``workers`` worker processes, the consumer reading every voxel once (``loader_speed.measure``). Returns
    ``{"preset", "crop", "batch", "workers", "rates": [pairs/s per repeat]}``."""
    from dagman.config import load_config
    from dagman.data.cache import cache_entries
    from dagman.data.views import TwoViewDataset

    cfg = load_config(preset, "dagman")
    d = cfg.data
    n = len(cache_entries(cache))
    per_volume = max(1, -(-64 * d.batch_size // n))  # epochs of >= 64 batches, as loader_speed.py
    dataset = TwoViewDataset.from_config(d, cache, seed=seed, samples_per_volume=per_volume)
    args = SimpleNamespace(batch=d.batch_size, seed=seed, warmup=warmup, repeats=repeats, seconds=seconds,
                           consume=True)
    rates = loader_speed.measure(dataset, workers, args)
    return {"preset": preset, "crop": d.crop_size, "batch": d.batch_size, "workers": workers, "rates": rates}


def count_step_flops(size: str, device: torch.device) -> dict:
    """FLOPs (:func:`count_flops`) of one DAGMaN ``train_step`` at preset ``size`` (a fresh state, fixed views)."""
    state = step_speed.make_state(size, "dagman", device)
    views = step_speed.random_views(state)
    step_speed.timed_step(state, *views)  # first step outside the counter (lazy initialisations)
    result = count_flops(lambda: step_speed.timed_step(state, *views))
    result["precision"] = state.cfg.train.precision
    return result


# ----------------------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------------------


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds < 10 else f"{seconds:.1f} s"


def backbone_rows(bb: dict, resamples: int) -> list[dict]:
    """Rows (a), (c) and, with a compiled variant (or its failure), torch.compile / eager, from
    :func:`measure_backbone`'s result."""
    t = bb["times"]
    cfg = f"paper architecture, {bb['size']}³, batch 1, {bb['rounds']} rounds"
    med = {k: statistics.median(v) for k, v in t.items()}
    rows = [paired_ratio_row(
        "backbone_ours_vs_monai", "(a) backbone fwd+bwd, ours / MONAI", f"{cfg}, fp32",
        {"ours_s": med["ours fp32"], "monai_s": med["monai fp32"]},
        f"ours {_fmt_s(med['ours fp32'])}, MONAI {_fmt_s(med['monai fp32'])}",
        t["ours fp32"], t["monai fp32"], target=("<=", TARGET_BACKBONE), resamples=resamples)]
    rows[0]["parity_max_abs_diff"] = bb["parity_max_abs_diff"]  # max |ours - MONAI| over the outputs, 32^3
    rows.append(paired_ratio_row(
        "backbone_bf16_vs_fp32", "(c) backbone fwd+bwd, bf16 autocast / fp32 (ours)", cfg,
        {"bf16_s": med["ours bf16"], "fp32_s": med["ours fp32"]},
        f"bf16 {_fmt_s(med['ours bf16'])}, fp32 {_fmt_s(med['ours fp32'])}",
        t["ours bf16"], t["ours fp32"], resamples=resamples))
    if "ours fp32 compiled" in t:
        rows.append(paired_ratio_row(
            "backbone_compile_vs_eager", "(c) backbone fwd+bwd, torch.compile / eager (ours)", f"{cfg}, fp32",
            {"compiled_s": med["ours fp32 compiled"], "eager_s": med["ours fp32"],
             "compile_warmup_s": bb.get("compile_warmup_seconds", float("nan"))},
            f"compiled {_fmt_s(med['ours fp32 compiled'])}, eager {_fmt_s(med['ours fp32'])}",
            t["ours fp32 compiled"], t["ours fp32"], resamples=resamples))
    elif bb.get("compile_error"):
        rows.append(_failed_row("backbone_compile_vs_eager", "(c) backbone fwd+bwd, torch.compile / eager (ours)",
                                f"{cfg}, fp32", f"torch.compile failed: {bb['compile_error']}"))
    return rows


def step_row(result: dict, resamples: int) -> dict:
    """Row (b) from ``step_speed.measure_ratio``'s result (dagman and smit times per round)."""
    t = result["times"]
    return paired_ratio_row(
        f"step_dagman_vs_smit_{result['size']}", "(b) training step, DAGMaN / SMIT",
        f"{result['size']}: {result['crop']}³, batch {result['batch']}, {result['precision']}, "
        f"{result['repeats']} rounds",
        {"dagman_s": result["seconds"]["dagman"], "smit_s": result["seconds"]["smit"]},
        f"DAGMaN {_fmt_s(result['seconds']['dagman'])}, SMIT {_fmt_s(result['seconds']['smit'])}",
        t["dagman"], t["smit"], target=("<=", TARGET_STEP), resamples=resamples)


# ----------------------------------------------------------------------------------------------------------
# (g) this checkout vs a baseline commit
# ----------------------------------------------------------------------------------------------------------

REPO = HERE.parent


def export_source(commit: str, dest: Path, repo: Path = REPO) -> str:
    """Write ``commit``'s ``src`` folder under ``dest`` (``git archive``, no worktree state left behind);
    returns the full commit id. A commit git does not know exits 2 with one line."""
    try:
        full = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        _usage_error(f"--baseline-commit {commit!r} is not a commit of {repo}")
    tar = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", full, "src"], capture_output=True,
                         check=True).stdout
    import io

    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(dest, filter="data")
    return full


class StepWorker:
    """A benchmarks/step_worker.py child on the package under ``src``: ``step()`` runs one training step there
    and returns its wall seconds."""

    def __init__(self, src: Path, size: str, device: str, threads: int, seed: int) -> None:
        env = dict(os.environ, PYTHONPATH=str(src) + (os.pathsep + os.environ["PYTHONPATH"]
                                                     if os.environ.get("PYTHONPATH") else ""))
        cmd = [sys.executable, str(HERE / "step_worker.py"), "--size", size, "--device", device,
               "--threads", str(threads), "--seed", str(seed)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.losses: list[float] = []
        self.info = self._read("READY")
        expected = (Path(src) / "dagman").resolve()
        if Path(self.info["package"]).resolve() != expected:
            self.close()
            raise RuntimeError(f"the worker imported {self.info['package']}, not {expected}")

    def _read(self, tag: str) -> dict:
        for line in self.proc.stdout:
            if line.startswith(tag + " "):
                return json.loads(line[len(tag) + 1:])
            if line.startswith("ERROR "):
                raise RuntimeError(line.strip())
        raise RuntimeError(f"the step worker stopped (exit {self.proc.wait()}) before printing {tag}")

    def step(self) -> float:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        out = self._read("STEP")
        if out["skipped"]:
            raise RuntimeError("a step was skipped (non-finite loss)")
        self.losses.append(out["loss"])
        return out["seconds"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def measure_against_baseline(size: str, baseline_src: Path, *, rounds: int, warmup: int, device: str = "cpu",
                             threads: int = 0, seed: int = 0, current_src: Path = REPO / "src") -> dict:
    """Interleaved marginal step times of this checkout and the baseline at preset ``size``: both workers
    alive, ``warmup`` untimed steps each, then ``rounds`` rounds of one step each (order alternating)."""
    workers = {}
    try:
        workers["current"] = StepWorker(current_src, size, device, threads, seed)
        workers["baseline"] = StepWorker(baseline_src, size, device, threads, seed)
        for w in workers.values():
            for _ in range(warmup):
                w.step()
        times = {"current": [], "baseline": []}
        for r in range(rounds):
            for name in (("current", "baseline") if r % 2 == 0 else ("baseline", "current")):
                times[name].append(workers[name].step())
        return {"size": size, "rounds": rounds, "warmup": warmup, "times": times,
                "seconds": {k: statistics.median(v) for k, v in times.items()},
                "info": {k: w.info for k, w in workers.items()},
                "losses": {k: w.losses for k, w in workers.items()}}
    finally:
        for w in workers.values():
            w.close()


def baseline_row(result: dict, commit: str, resamples: int) -> dict:
    """Row (g): this checkout's step / the baseline's, with each side's default path."""
    cur, base = result["info"]["current"], result["info"]["baseline"]

    def path(info):
        text = info["precision"]
        if info.get("compile") is not None:
            text += f", compile {info['compile']}"
        return text

    return paired_ratio_row(
        f"step_vs_baseline_{result['size']}", f"(g) training step, this checkout / {commit[:7]}",
        f"{result['size']}: {cur['crop']}³, batch {cur['batch']}, DAGMaN, default settings (this: {path(cur)}; "
        f"{commit[:7]}: {path(base)}), {result['warmup']} warm-up + {result['rounds']} rounds",
        {"current_s": result["seconds"]["current"], "baseline_s": result["seconds"]["baseline"]},
        f"this {_fmt_s(result['seconds']['current'])}, {commit[:7]} {_fmt_s(result['seconds']['baseline'])}",
        result["times"]["current"], result["times"]["baseline"], target=("<=", TARGET_BASELINE), resamples=resamples)


def loader_row(loader: dict, step_times: Sequence[float], step_source: str, resamples: int) -> dict:
    """Row (d): loader pairs/s over the pairs/s the step consumes (batch / step time)."""
    rates = loader["rates"]
    consumption = [loader["batch"] / s for s in step_times]
    ratio = statistics.median(rates) / statistics.median(consumption)
    lo, hi = bootstrap_ratio_of_medians_ci(rates, consumption, resamples=resamples)
    target = (">=", TARGET_LOADER)
    return {
        "id": f"loader_vs_step_{loader['preset']}", "measurement": "(d) loader pairs/s / step consumption",
        "configuration": f"{loader['preset']}: {loader['crop']}³, batch {loader['batch']}, "
                         f"{loader['workers']} workers, {len(rates)} repeats; step from {step_source}",
        "values": {"loader_pairs_per_s": statistics.median(rates), "step_pairs_per_s": statistics.median(consumption),
                   "step_s": statistics.median(step_times)},
        "values_text": f"loader {statistics.median(rates):.1f} pairs/s, step consumes "
                       f"{statistics.median(consumption):.2f} pairs/s",
        "ratio": ratio, "ratio_kind": "ratio of medians", "percent": False, "scale": 1.0, "interval": [lo, hi],
        "range": [min(rates) / max(consumption), max(rates) / min(consumption)], "rounds": len(rates),
        "target": _target_text(target), "pass": _check_target(ratio, target),
        "samples": {"numerator": list(rates), "denominator": consumption},
    }


def memory_rows(configs: list[dict], device: torch.device, reduced: bool) -> list[dict]:
    """Rows (e): per precision, checkpointing on vs off (peak memory and step time), from
    ``step_speed.run_paper_config`` results."""
    mem = "GPU max allocated" if device.type == "cuda" else "peak RSS"
    rows = []
    for precision in dict.fromkeys(c["precision"] for c in configs):
        on = next((c for c in configs if c["precision"] == precision and c["use_checkpoint"]), None)
        off = next((c for c in configs if c["precision"] == precision and not c["use_checkpoint"]), None)
        any_row = on or off
        cfg = (f"{any_row['size']}: {any_row.get('crop', '?')}³, batch {any_row['batch']}, {precision}, DAGMaN, "
               f"one child process each")
        if reduced:
            cfg += " (REDUCED by --quick; the target applies to paper 128³)"
        values, parts = {}, []
        for name, c in (("ckpt_on", on), ("ckpt_off", off)):
            if c is None:
                continue
            label = "ckpt on" if c["use_checkpoint"] else "ckpt off"
            if c["status"] == "ok":
                values[f"{name}_peak_gib"] = c["peak_gib"]
                values[f"{name}_step_s"] = c["seconds"]
                parts.append(f"{label}: {c['peak_gib']:.2f} GiB, {_fmt_s(c['seconds'])}")
            else:
                cap = f" (cap {c['mem_limit_gib']:.1f} GiB)" if c.get("mem_limit_gib") else ""
                parts.append(f"{label}: {c['status']}{cap}")
        ratio = None
        if "ckpt_on_peak_gib" in values and "ckpt_off_peak_gib" in values:
            ratio = values["ckpt_on_peak_gib"] / values["ckpt_off_peak_gib"]
            values["time_ratio_on_off"] = values["ckpt_on_step_s"] / values["ckpt_off_step_s"]
            parts.append(f"time on/off {values['time_ratio_on_off']:.2f}")
        target = None if reduced else ("<=", TARGET_MEMORY_GIB)
        verdict = None
        if target is not None and on is not None:
            verdict = on["status"] == "ok" and on["peak_gib"] <= TARGET_MEMORY_GIB
        rows.append({
            "id": f"memory_ckpt_{precision}", "measurement": f"(e) step {mem}, checkpointing on / off",
            "configuration": cfg, "values": values, "values_text": "; ".join(parts), "ratio": ratio,
            "ratio_kind": "peak memory on / off", "percent": False, "scale": 1.0, "interval": None, "range": None,
            "rounds": None, "target": f"ckpt on <= {TARGET_MEMORY_GIB:g} GiB" if target else "",
            "pass": verdict, "children": [c for c in (on, off) if c is not None],
        })
    return rows


def peak_rows(peaks: dict) -> list[dict]:
    rows = []
    for name, p in peaks.items():
        rows.append({
            "id": f"matmul_peak_{name}", "measurement": f"(f) {name} matmul peak (torch.matmul, square)",
            "configuration": f"n in {sorted(p['per_size'])}, best of {p['repeats']} each",
            "values": {"gflops": p["gflops"], "size": p["size"], "seconds": p["seconds"]},
            "values_text": f"{p['gflops']:.1f} GFLOP/s at n={p['size']}", "ratio": None, "ratio_kind": None,
            "percent": False, "scale": 1.0, "interval": None, "range": None, "rounds": None, "target": "",
            "pass": None,
        })
    return rows


def flops_row(row_id: str, measurement: str, configuration: str, flops: int, times: Sequence[float],
              peak: dict, peak_name: str, *, target: tuple[str, float] | None, resamples: int, note: str = "") -> dict:
    """Row (f): achieved FLOP/s per round (``flops / time``) as a percentage of the matmul ``peak``."""
    peak_flops = peak["gflops"] * 1e9
    achieved = [flops / t for t in times]
    row = paired_ratio_row(
        row_id, measurement, configuration,
        {"gflop_per_step": flops / 1e9, "achieved_gflops": statistics.median(achieved) / 1e9,
         "peak_gflops": peak["gflops"], "step_s": statistics.median(times)},
        f"{flops / 1e9:.1f} GFLOP/step, {statistics.median(achieved) / 1e9:.1f} GFLOP/s of {peak_name} peak "
        f"{peak['gflops']:.0f}{note}",
        [float(flops)] * len(times), [t * peak_flops for t in times], target=target, percent=True, scale=100.0,
        resamples=resamples)
    return row


def _failed_row(row_id: str, measurement: str, configuration: str, text: str) -> dict:
    return {"id": row_id, "measurement": measurement, "configuration": configuration, "values": {},
            "values_text": text, "ratio": None, "ratio_kind": None, "percent": False, "scale": 1.0,
            "interval": None, "range": None, "rounds": None, "target": "", "pass": None}


# ----------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------


def _fmt_ratio(row: dict, value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.1f}%" if row["percent"] else f"{value:.3f}"


def markdown_table(report: dict) -> str:
    """The report as Markdown: header lines (machine, torch, threads, command) and one table row per row."""
    lines = [
        "# Performance table (benchmarks/perf.py)", "",
        f"- machine: {report['machine']}",
    ]
    if report.get("device_name"):
        lines.append(f"- device: {report['device_name']} (host CPU: {report['host']})")
    lines += [
        f"- torch {report['torch']}, {report['threads']} torch threads, OMP_WAIT_POLICY="
        f"{report['omp_wait_policy']}",
        f"- command: `{report['command']}`",
        f"- finished {report['finished']} after {report['seconds_total']:.0f} s"
        + ("; **--quick** (reduced sizes and repeats)" if report["quick"] else ""),
        f"- interval: {report['interval']}", "",
        "| measurement | configuration | value(s) | ratio | interval | target | pass |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        interval = "–" if row["interval"] is None else \
            f"[{_fmt_ratio(row, row['interval'][0])}, {_fmt_ratio(row, row['interval'][1])}]"
        verdict = {True: "pass", False: "**FAIL**", None: "–"}[row["pass"]]
        cells = [row["measurement"], row["configuration"], row["values_text"], _fmt_ratio(row, row["ratio"]),
                 interval, row["target"] or "–", verdict]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    if report.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    from dagman.fileio import atomic_write

    atomic_write(path, lambda fh: fh.write(text), text=True)


def _json_safe(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

PARTS = ("backbone", "step", "loader", "memory", "flops")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="perf.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="reduced run (~1-2 min on 2 cores): backbone 64³ x 3 rounds, tiny step only (4 rounds), "
                        "1 s loader repeats, the memory rows at the tiny preset (64³, fp32) instead of paper, "
                        "smaller matmuls. Targets of reduced rows are not evaluated where the size differs")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--out", type=Path, default=Path("perf-out"), help="folder for perf.json and perf.md "
                   "(default perf-out/)")
    p.add_argument("--skip", nargs="+", choices=PARTS, default=[],
                   help="leave parts out: backbone = rows (a)(c); step = (b); loader = (d); memory = (e); "
                        "flops = (f)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples per interval (default 2000)")
    g = p.add_argument_group("(a)(c) backbone")
    g.add_argument("--backbone-size", type=int, default=None, help="cubic input edge (default 96; quick 64)")
    g.add_argument("--backbone-rounds", type=int, default=None,
                   help="interleaved rounds (default 10 on CPU, 20 on CUDA; quick 3)")
    g.add_argument("--backbone-warmup", type=int, default=None, help="untimed steps per variant (default 1; CUDA 3)")
    g.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="also time torch.compile(ours) (auto = on CUDA only)")
    g = p.add_argument_group("(b) DAGMaN / SMIT step")
    g.add_argument("--step-sizes", nargs="+", choices=["tiny", "cpu", "small", "paper"], default=None,
                   help="presets (default tiny small; quick tiny)")
    g.add_argument("--step-rounds", type=int, default=None,
                   help="interleaved rounds per preset (default: tiny 10, others 4; CUDA 20; quick 4)")
    g.add_argument("--step-warmup", type=int, default=None, help="untimed steps per method (default 1; CUDA 3)")
    g = p.add_argument_group("(g) this checkout vs a baseline commit")
    g.add_argument("--baseline-commit", default=None, metavar="REV",
                   help="also time this checkout's default training step against commit REV's (e.g. ff03bbb), "
                        "interleaved, at each --step-sizes preset (row (g); off by default)")
    g.add_argument("--baseline-rounds", type=int, default=None,
                   help="interleaved rounds per preset (default: as --step-rounds)")
    g.add_argument("--baseline-warmup", type=int, default=3,
                   help="untimed steps per side first, so compile and caches are not in the figure (default 3)")
    g = p.add_argument_group("(d) loader")
    g.add_argument("--cache", type=Path, default=None,
                   help="a prepared cache (default: a SYNTHETIC one in a temporary folder)")
    g.add_argument("--loader-workers", type=int, default=2, help="loader worker processes (default 2)")
    g.add_argument("--loader-seconds", type=float, default=None, help="timed seconds per repeat (default 3; quick 1)")
    g.add_argument("--loader-repeats", type=int, default=None, help="repeats (default 3; quick 2)")
    g.add_argument("--loader-volumes", type=int, default=8, help="synthetic volumes (default 8)")
    g.add_argument("--loader-shape", type=int, nargs=3, default=(200, 170, 180), metavar=("X", "Y", "Z"),
                   help="synthetic volume shape (default 200 170 180)")
    g = p.add_argument_group("(e) paper-size step memory")
    g.add_argument("--memory-preset", choices=["tiny", "cpu", "small", "paper"], default=None,
                   help="preset of the memory rows (default paper; quick tiny)")
    g.add_argument("--paper-batch", type=int, default=2, help="volumes per step (default 2)")
    g.add_argument("--paper-precisions", nargs="+", choices=["bf16", "fp32"], default=None,
                   help="precisions, each with checkpointing on and off (default bf16 fp32; quick fp32)")
    g.add_argument("--paper-repeats", type=int, default=None, help="timed steps per child (default 2; CUDA 5; quick 1)")
    g.add_argument("--paper-warmup", type=int, default=None,
                   help="untimed steps per child (default 1; CUDA 2; quick 0)")
    g.add_argument("--mem-limit-gib", type=float, default=None,
                   help="address-space cap per child on CPU (default: available memory - 1 GiB; 0 = none)")
    g = p.add_argument_group("(f) FLOP/s")
    g.add_argument("--matmul-sizes", type=int, nargs="+", default=None,
                   help="square matmul sizes for the peak (default 2048 3072; CUDA 4096 8192; quick 1024 2048)")
    g.add_argument("--matmul-repeats", type=int, default=None, help="timed matmuls per size (default 5; quick 3)")
    return p


def _usage_error(message: str) -> None:
    """Exit 2 with one line, as argparse does for a bad option."""
    print(f"perf.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options left at None from --quick and the device; exit 2 on an impossible value."""
    try:
        cuda = torch.device(args.device).type == "cuda"
    except RuntimeError:
        _usage_error(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1, ...)")
    q = args.quick

    def pick(name, full, quick, gpu=None):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else (gpu if cuda and gpu is not None else full))

    pick("backbone_size", 96, 64)
    pick("backbone_rounds", 10, 3, 20)
    pick("backbone_warmup", 1, 1, 3)
    pick("step_sizes", ["tiny", "small"], ["tiny"])
    pick("step_warmup", 1, 1, 3)
    pick("loader_seconds", 3.0, 1.0)
    pick("loader_repeats", 3, 2)
    pick("memory_preset", "paper", "tiny")
    pick("paper_precisions", ["bf16", "fp32"], ["fp32"])
    pick("paper_repeats", 2, 1, 5)
    pick("paper_warmup", 1, 0, 2)
    pick("matmul_sizes", [2048, 3072], [1024, 2048], [4096, 8192])
    pick("matmul_repeats", 5, 3)
    args.compile_model = args.compile == "on" or (args.compile == "auto" and cuda)
    for name in ("backbone_size", "backbone_rounds", "loader_repeats", "paper_repeats", "paper_batch",
                 "matmul_repeats", "bootstrap"):
        if getattr(args, name) < 1:
            _usage_error(f"--{name.replace('_', '-')} must be >= 1")
    if args.backbone_size % 32:
        _usage_error("--backbone-size must be a multiple of 32 (patch 2 x 2^4 mergings)")
    return args


def _step_rounds(args, size: str) -> int:
    if args.step_rounds is not None:
        return args.step_rounds
    if args.quick:
        return 4
    if torch.device(args.device).type == "cuda":
        return 20
    return 10 if size == "tiny" else 4


@dataclass
class Session:
    """What the parts of one run share: the options, the device, the progress printer, and what they produce."""

    args: argparse.Namespace
    device: torch.device
    progress: Progress
    rows: list = field(default_factory=list)
    raw: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    peaks: dict = field(default_factory=dict)  # "fp32"/"bf16" -> measure_matmul_peak result
    step_results: dict = field(default_factory=dict)  # preset -> step_speed.measure_ratio result
    memory_configs: list = field(default_factory=list)  # step_speed.run_paper_config results

    @property
    def counting(self) -> bool:
        return "flops" not in self.args.skip


def run_matmul_peaks(s: Session) -> None:
    """(f) the fp32 and bf16 matmul peaks (first, while nothing else has run in this process)."""
    for name, dtype in DTYPES.items():
        s.progress(f"(f) {name} matmul peak, n in {s.args.matmul_sizes}")
        s.peaks[name] = measure_matmul_peak(s.device, dtype, s.args.matmul_sizes, s.args.matmul_repeats)
    s.rows += peak_rows(s.peaks)
    s.raw["matmul_peak"] = s.peaks
    if s.device.type == "cuda":
        try:
            tf32 = torch.backends.cuda.matmul.allow_tf32
        except Exception:  # noqa: BLE001 - a renamed setting must not stop the run
            tf32 = "unknown"
        s.notes.append(f"fp32 matmul peak (and fp32 steps) with torch.backends.cuda.matmul.allow_tf32={tf32}")


def run_backbone(s: Session) -> None:
    """(a), (c) and, when counting, the backbone's (f) rows."""
    a = s.args
    s.progress(f"(a)(c) backbone fwd+bwd at {a.backbone_size}³: MONAI fp32, ours fp32, ours bf16"
               + (", ours compiled" if a.compile_model else "") + f", {a.backbone_rounds} rounds")
    bb = measure_backbone(s.device, a.backbone_size, rounds=a.backbone_rounds, warmup=a.backbone_warmup,
                          compile_model=a.compile_model, seed=a.seed)
    monai_model, ours = bb.pop("models")
    s.raw["backbone"] = bb
    s.rows += backbone_rows(bb, a.bootstrap)
    if not s.counting:
        return
    s.progress(f"(f) FLOPs of one backbone fwd+bwd step at {a.backbone_size}³ (ours and MONAI)")
    fl = count_backbone_flops(monai_model, ours, a.backbone_size, s.device)
    s.raw["backbone_flops"] = fl
    added = sum(fl["ours"]["added"].values())
    text = (f"FLOPs = matmul, convolution and attention FLOPs as FlopCounterMode counts them (one multiply-add "
            f"= 2). Backbone fwd+bwd at {a.backbone_size}³: ours {fl['ours']['total'] / 1e9:.2f} GFLOP, "
            f"MONAI's explicit attention {fl['monai']['total'] / 1e9:.2f} GFLOP; analytic forward window "
            f"attention (sum over blocks of 4·B·heads·windows·N²·d) {fl['analytic_attention_forward'] / 1e9:.2f} "
            "GFLOP.")
    if added:
        text += (" FlopCounterMode has no formula for torch's CPU flash-attention kernels, which our fused window "
                 f"attention runs forward on CPU: perf.py added {added / 1e9:.2f} GFLOP for them (torch's SDPA "
                 "formula). The chunked attention backward is plain matmuls, counted as executed, incl. "
                 f"recomputing QKᵀ: hence ours - MONAI = {(fl['ours']['total'] - fl['monai']['total']) / 1e9:.2f} "
                 "GFLOP (half the forward attention).")
    s.notes.append(text)
    if fl["ours"]["uncounted_attention_ops"]:
        s.notes.append("attention ops with no FLOP formula (not counted): "
                       + ", ".join(fl["ours"]["uncounted_attention_ops"]))
    cfg = f"paper architecture, {a.backbone_size}³, batch 1, {bb['rounds']} rounds"
    note = f" (incl. {added / 1e9:.1f} GFLOP of CPU flash attention added by perf.py)" if added else ""
    s.rows.append(flops_row("flops_backbone_fp32", "(f) backbone fwd+bwd achieved FLOP/s, % of fp32 peak",
                            f"{cfg}, fp32", fl["ours"]["total"], bb["times"]["ours fp32"], s.peaks["fp32"], "fp32",
                            target=(">=", TARGET_FLOPS_PERCENT), resamples=a.bootstrap, note=note))
    s.rows.append(flops_row("flops_backbone_bf16", "(f) backbone fwd+bwd achieved FLOP/s, % of bf16 peak",
                            f"{cfg}, bf16 autocast", fl["ours"]["total"], bb["times"]["ours bf16"], s.peaks["bf16"],
                            "bf16", target=None, resamples=a.bootstrap))


def run_steps(s: Session) -> None:
    """(b) per preset and, when counting, the whole step's (f) row."""
    a = s.args
    for size in a.step_sizes:
        rounds = _step_rounds(a, size)
        s.progress(f"(b) DAGMaN / SMIT training step at {size}, {rounds} rounds")
        res = step_speed.measure_ratio(size, ["dagman", step_speed.BASELINE], s.device, repeats=rounds,
                                       warmup=a.step_warmup)
        s.step_results[size] = res
        s.rows.append(step_row(res, a.bootstrap))
        if not s.counting:
            continue
        s.progress(f"(f) FLOPs of one DAGMaN training step at {size}")
        fl = count_step_flops(size, s.device)
        res["flops"] = fl
        name = "bf16" if fl["precision"] == "bf16" else "fp32"
        added = sum(fl["added"].values())
        note = f" (incl. {added / 1e9:.2f} GFLOP of CPU flash attention added by perf.py)" if added else ""
        s.rows.append(flops_row(
            f"flops_step_{size}", f"(f) DAGMaN training step achieved FLOP/s, % of {name} peak",
            f"{size}: {res['crop']}³, batch {res['batch']}, {res['precision']}, {res['repeats']} rounds",
            fl["total"], res["times"]["dagman"], s.peaks[name], name, target=None, resamples=a.bootstrap, note=note))
    s.raw["step"] = s.step_results


def run_memory(s: Session) -> None:
    """(e): one child process per (checkpointing, precision), the configuration most likely not to fit last."""
    a = s.args
    limit = a.mem_limit_gib
    if limit is None:
        limit = max(step_speed._available_gib() - 1.0, 1.0) if s.device.type == "cpu" else 0.0
    for use_ckpt, precision in step_speed.PAPER_CONFIGS:
        if precision not in a.paper_precisions:
            continue
        s.progress(f"(e) {a.memory_preset} step memory, checkpointing {'on' if use_ckpt else 'off'}, {precision}, "
                   f"batch {a.paper_batch} (child process)")
        spec = {"size": a.memory_preset, "method": "dagman", "batch": a.paper_batch, "use_checkpoint": use_ckpt,
                "precision": precision, "device": a.device, "threads": a.threads, "warmup": a.paper_warmup,
                "repeats": a.paper_repeats}
        s.memory_configs.append(step_speed.run_paper_config(spec, limit))
    s.rows += memory_rows(s.memory_configs, s.device, reduced=a.memory_preset != "paper")
    s.raw["memory"] = {"configs": s.memory_configs, "mem_limit_gib": limit if s.device.type == "cpu" else None}
    if a.memory_preset != "paper":
        s.notes.append(f"--quick: the memory rows ran at the {a.memory_preset} preset, not paper 128³; the 24 GiB "
                       "target is not evaluated. Run without --quick for the real rows.")


def loader_step_sources(s: Session) -> dict[str, tuple[list[float], str]]:
    """Preset -> (DAGMaN step seconds per round, where they come from): (b)'s presets, and (e)'s child whose
    configuration is its preset's (checkpointing, precision and batch as the preset has them)."""
    from dagman.config import load_config

    sources = {size: (res["times"]["dagman"], "(b)") for size, res in s.step_results.items()}
    for c in s.memory_configs:
        if c["size"] in sources or c["status"] != "ok":
            continue
        cfg = load_config(c["size"], "dagman")
        if (c["use_checkpoint"] == cfg.model.use_checkpoint and c["precision"] == cfg.train.precision
                and c["batch"] == cfg.data.batch_size):
            sources[c["size"]] = (c["times"], "(e)")
    return sources


def run_baseline(s: Session) -> None:
    """(g) per --step-sizes preset: this checkout's default step against --baseline-commit's."""
    a = s.args
    with tempfile.TemporaryDirectory(prefix="dagman-baseline-") as tmp:
        commit = export_source(a.baseline_commit, Path(tmp))
        s.raw["baseline"] = {"commit": commit, "sizes": {}}
        for size in a.step_sizes:
            rounds = a.baseline_rounds if a.baseline_rounds is not None else _step_rounds(a, size)
            s.progress(f"(g) training step at {size}: this checkout vs {commit[:7]} (two child processes), "
                       f"{a.baseline_warmup} warm-up + {rounds} rounds")
            res = measure_against_baseline(size, Path(tmp) / "src", rounds=rounds, warmup=a.baseline_warmup,
                                           device=a.device, threads=a.threads, seed=a.seed)
            s.raw["baseline"]["sizes"][size] = res
            s.rows.append(baseline_row(res, commit, a.bootstrap))


def run_loader(s: Session) -> None:
    """(d) for every preset with a measured DAGMaN step time."""
    a = s.args
    sources = loader_step_sources(s)
    if not sources:
        s.notes.append("loader rows need a measured step time: run with the step or memory part")
        return
    s.raw["loader"] = {}
    with tempfile.TemporaryDirectory(prefix="dagman-perf-") as tmp:
        cache = a.cache
        if cache is None:
            from dagman.data.views import make_synthetic_cache

            cache = make_synthetic_cache(Path(tmp) / "cache", a.loader_volumes, a.loader_shape, seed=a.seed)
            s.notes.append(f"loader: SYNTHETIC cache, {a.loader_volumes} x {'x'.join(map(str, a.loader_shape))} "
                           "float16, in the page cache; the consumer reads every voxel once; measured alone (in "
                           "training the step shares the cores)")
        for size, (times, source) in sources.items():
            s.progress(f"(d) loader pairs/s at the {size} preset, {a.loader_workers} workers")
            ld = measure_loader(Path(cache), size, workers=a.loader_workers, seconds=a.loader_seconds,
                                repeats=a.loader_repeats, warmup=3, seed=a.seed)
            s.raw["loader"][size] = ld
            s.rows.append(loader_row(ld, times, source, a.bootstrap))


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict:
    """Run every part not in ``args.skip`` (matmul peaks, backbone, steps, memory, then the loader, which needs
    the step times); returns the report dict that :func:`main` writes."""
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        _usage_error("--device cuda but torch sees no CUDA device")
    skip = set(args.skip)
    if args.cache is not None and "loader" not in skip:
        from dagman.data.cache import cache_entries

        cache_entries(args.cache)  # a DataError naming the folder now, not after the other parts
    counting = "flops" not in skip
    loader_presets = set(args.step_sizes if "step" not in skip else [])
    if "memory" not in skip:
        loader_presets.add(args.memory_preset)  # used when its preset configuration is among the children
    n_total = (("backbone" not in skip) * (1 + counting) + ("step" not in skip) * len(args.step_sizes) * (1 + counting)
               + ("loader" not in skip) * len(loader_presets) + ("memory" not in skip) * 2 * len(args.paper_precisions)
               + counting * len(DTYPES) + bool(args.baseline_commit) * len(args.step_sizes))
    s = Session(args, device, Progress(n_total))
    for part, function in (("flops", run_matmul_peaks), ("backbone", run_backbone), ("step", run_steps),
                           ("memory", run_memory), ("loader", run_loader)):
        if part not in skip:
            function(s)
    if args.baseline_commit:
        run_baseline(s)

    order = {"(a)": 0, "(b)": 1, "(c)": 2, "(d)": 3, "(e)": 4, "(f)": 5, "(g)": 6}
    s.rows.sort(key=lambda r: order.get(r["measurement"][:3], 9))  # stable: keeps the order within a part
    machine = describe_machine(device)
    for row in s.rows:
        row.update(machine=machine, torch=torch.__version__, threads=torch.get_num_threads())
    return {
        "machine": machine,
        "host": describe_machine("cpu"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "command": "python benchmarks/perf.py" + "".join(f" {x}" for x in (argv or [])),
        "quick": bool(args.quick),
        "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds_total": time.perf_counter() - started,
        "interval": INTERVAL_TEXT.format(n=args.bootstrap),
        "targets": {"backbone_ours_vs_monai": f"<= {TARGET_BACKBONE}", "step_dagman_vs_smit": f"<= {TARGET_STEP}",
                    "loader_vs_step": f">= {TARGET_LOADER}", "memory_ckpt": f"<= {TARGET_MEMORY_GIB} GiB",
                    "flops_backbone_fp32": f">= {TARGET_FLOPS_PERCENT}%", "step_vs_baseline": f"<= {TARGET_BASELINE}"},
        "rows": s.rows,
        "notes": s.notes,
        "raw": s.raw,
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = resolve_defaults(build_parser().parse_args(argv))
    report = run(args, argv)
    table = markdown_table(report)
    out = Path(args.out)
    _write(out / "perf.json", json.dumps(_json_safe(report), indent=2) + "\n")
    _write(out / "perf.md", table)
    print(table, end="")
    print(f"\nwrote {out / 'perf.md'} and {out / 'perf.json'}")
    return 0


if __name__ == "__main__":
    from dagman.errors import run_script

    raise SystemExit(run_script(main))
