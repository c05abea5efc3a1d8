"""The pretraining loop: data -> one student/teacher step -> optimiser -> EMA -> log -> checkpoint.

``pretrain(cfg, out)`` runs on one CPU process with no process group, on one GPU, or under ``torchrun``
(DDP; nccl on GPU, gloo on CPU). Everything a resume needs is in the checkpoint, and every random draw
of step ``k`` is seeded from ``(seed, k)`` (masks: the same generator on every process; stochastic
depth: ``(seed, rank, k)``) and the data order from ``(seed, epoch)``, so stopping after step ``k`` and
resuming reproduces the uninterrupted run exactly (bitwise on CPU).
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from dagman.config import Config, plan_steps, samples_per_volume, save_config, to_dict
from dagman.errors import DagmanError
from dagman.models.heads import last_layer_parameter_names
from dagman.ssl.method import SSLMethod, SSLNetwork, StudentNetwork, make_teacher
from dagman.ssl.monitor import TERMS, collapse_advice, collapse_kind
from dagman.train import checkpoint as ckpt
from dagman.train.distributed import (
    DistInfo,
    PeerFailure,
    all_reduce_sum_,
    barrier,
    cleanup,
    init_distributed,
    is_peer_failure,
    peer_failure_error,
    resume_batch_size,
)
from dagman.train.ema import update_teacher
from dagman.train.logging import MetricsLogger
from dagman.train.optim import build_optimizer, cancel_gradients, clip_gradients, set_lr_wd
from dagman.train.schedules import Schedules
from dagman.log import logger as log

ENCODER_FILE = "encoder.safetensors"
# Fault injection for the crash-safety tests: the process kills itself (os._exit) right after this step.
KILL_AFTER_STEP_ENV = "DAGMAN_FAULT_KILL_AFTER_STEP"
# Test hook for the distributed-fault tests: with it set, only the process of this rank obeys
# KILL_AFTER_STEP_ENV (unset: every process does).
KILL_RANK_ENV = "DAGMAN_FAULT_KILL_RANK"

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# fp16 only: GradScaler halves its scale (initially 2**16) on every overflowing step; 24 halvings in a row
# bring it below 1/256, where the gradients are not finite for a reason scaling cannot fix
MIN_FP16_LOSS_SCALE = 2.0 ** -8


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A 63-bit seed for step ``step`` (and ``rank``), stable across runs and resumes."""
    return (int(seed) * 1_000_003 + int(step) * 7_919 + int(rank) * 104_729 + 12_345) % (2**63 - 1)


@dataclass
class TrainState:
    """Everything the loop mutates. ``student`` may be DDP-wrapped; ``step`` = optimiser steps done."""

    cfg: Config
    info: DistInfo
    student: nn.Module
    teacher: SSLNetwork
    method: SSLMethod
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedules: Schedules
    last_layer: list[torch.Tensor]
    step: int = 0
    skipped_steps: int = 0
    bad_in_row: int = 0
    missing_samples: int = 0  # samples (all processes) whose volume file vanished or changed mid-run
    extra: dict = field(default_factory=dict)

    @property
    def student_module(self) -> StudentNetwork:
        return getattr(self.student, "module", self.student)


def build_state(cfg: Config, info: DistInfo, schedules: Schedules) -> TrainState:
    """Student (DDP-wrapped under a process group), teacher = exact copy of the (broadcast) student,
    losses with their centres, AdamW with parameter groups, grad scaler (fp16 only)."""
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every process (DDP broadcasts anyway)
    student = StudentNetwork(cfg).to(info.device)
    if cfg.model.use_checkpoint:
        student.net.backbone.set_checkpointing(True)
    if info.distributed:
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        # without AMIP and a stage-4 global token, the last stage gets no gradient
        uses_last_stage = cfg.loss.amip or (cfg.loss.gitd and cfg.loss.global_token_stage == 4)
        student = nn.parallel.DistributedDataParallel(student, device_ids=device_ids,
                                                      find_unused_parameters=not uses_last_stage)
    module = getattr(student, "module", student)
    teacher = make_teacher(module, cfg.ema.teacher_drop_path_rate).to(info.device)
    method = SSLMethod(cfg).to(info.device)
    # fused AdamW: one kernel over all parameters instead of ~10 small ops per tensor (3.5x faster on a CPU
    # for the tiny preset's 143 tensors, benchmarks/step_profile.py); the CPU and CUDA builds of torch both have it
    optimizer = build_optimizer(module, cfg.optim, fused=info.device.type in ("cpu", "cuda"))
    scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.train.precision == "fp16")
    last = set(last_layer_parameter_names(module))
    last_layer = [p for n, p in module.named_parameters() if n in last]
    state = TrainState(cfg, info, student, teacher, method, optimizer, scaler, schedules, last_layer)
    if compile_enabled(cfg, info.device):
        compile_encoders(state)
    return state


def compile_enabled(cfg: Config, device: torch.device) -> bool:
    """``train.compile``: on, off, or auto = on with CUDA and off on a CPU (there compiling the tiny preset's
    blocks took ~10 minutes on 2 cores and the compiled step ran slower than eager; docs/RESULTS.md)."""
    return cfg.train.compile == "on" or (cfg.train.compile == "auto" and torch.device(device).type == "cuda")


def _encoders(state: TrainState) -> tuple[nn.Module, nn.Module]:
    return state.student_module.net.encoder, state.teacher.encoder


def compile_encoders(state: TrainState) -> None:
    """``torch.compile`` the student's and the teacher's encoders in place (``nn.Module.compile``: parameter
    names, state dicts and checkpoints stay as they are). Compiling happens lazily in the first step; a
    failure there falls back to eager (see :func:`train_step`)."""
    for encoder in _encoders(state):
        encoder.compile()
    state.extra["compile"] = "pending"


def _uncompile(state: TrainState) -> None:
    for encoder in _encoders(state):
        encoder._compiled_call_impl = None
    state.extra["compile"] = "failed"


def _is_compile_error(err: BaseException) -> bool:
    module = type(err).__module__ or ""
    return isinstance(err, torch._dynamo.exc.TorchDynamoException) or module.startswith(("torch._dynamo", "torch._inductor"))


def step_path(cfg: Config, device: torch.device) -> str:
    """One line that says which step runs: device, precision, torch.compile, and on a CPU its vector unit and
    whether it has bf16 matrix units."""
    device = torch.device(device)
    parts = [f"{device.type}", "fp32" if cfg.train.precision == "fp32" else f"{cfg.train.precision} autocast"]
    parts.append(f"torch.compile {'on' if compile_enabled(cfg, device) else 'off'} (train.compile={cfg.train.compile})")
    if device.type == "cpu":
        from dagman.sysinfo import cpu_features

        f = cpu_features()
        units = "AMX-BF16" if f["amx"] else ("AVX512-BF16" if f["bf16_matmul"] else "no bf16 matrix units")
        parts.append(f"CPU kernels {f['capability']}, {units}, {torch.get_num_threads()} threads")
    return "step path: " + ", ".join(parts)


def train_step(state: TrainState, view1: torch.Tensor, view2: torch.Tensor, missing: int = 0) -> dict:
    """One optimiser step on this process's share of the batch. Returns the step's metrics. ``missing``: samples
    of this process's batch whose volume vanished and was replaced (summed over the processes into
    ``state.missing_samples`` with the same all-reduce as the finiteness flags).

    A non-finite loss or gradient norm on any process skips the update everywhere (counted); after
    ``train.max_nonfinite_steps`` such steps in a row the run stops with a DagmanError.

    With compiled encoders (:func:`compile_encoders`) the first step compiles them; if torch.compile fails
    there (no C++ compiler, an unsupported op), one warning line is printed, the encoders go back to eager
    and the step runs again eagerly (every random draw of a step is seeded from the step, so the retry is the
    step the eager run would have taken)."""
    if state.extra.get("compile") != "pending":
        return _train_step(state, view1, view2, missing)
    t0 = time.perf_counter()
    try:
        metrics = _train_step(state, view1, view2, missing)
    except Exception as err:  # noqa: BLE001 - only compile failures are caught, the rest re-raised
        if not _is_compile_error(err):
            raise
        _uncompile(state)
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        log.warning(f"dagman: warning: torch.compile failed ({type(err).__name__}: {first[:200]}); running eager "
                       "(train.compile=off skips the attempt)")
        return _train_step(state, view1, view2, missing)
    state.extra["compile"] = "done"
    state.extra["compile_seconds"] = time.perf_counter() - t0
    if state.info.is_main:
        log.info(f"dagman: torch.compile: the first step took {state.extra['compile_seconds']:.1f} s (compiling); "
                    "later steps run the compiled encoders")
    return metrics


def _train_step(state: TrainState, view1: torch.Tensor, view2: torch.Tensor, missing: int = 0) -> dict:
    cfg, info = state.cfg, state.info
    step = state.step
    values = state.schedules.at(step)
    set_lr_wd(state.optimizer, values.lr, values.weight_decay)
    torch.manual_seed(step_seed(cfg.train.seed, step, info.rank))  # stochastic depth
    generator = torch.Generator().manual_seed(step_seed(cfg.train.seed, step))  # masks: same on every rank
    view1 = view1.to(info.device, non_blocking=True)
    view2 = view2.to(info.device, non_blocking=True)
    dtype = _DTYPES[cfg.train.precision]
    state.student.train()
    state.teacher.train()
    if info.device.type == "cuda":
        torch.cuda.synchronize(info.device)
    t0 = time.perf_counter()
    with torch.autocast(info.device.type, dtype=dtype, enabled=dtype != torch.float32):
        result = state.method(state.student, state.teacher, view1, view2, values, generator)
    loss = result.loss
    state.optimizer.zero_grad(set_to_none=True)
    # Backward first, then ONE host sync for the finiteness of the loss and the gradient norm together and
    # all the step's metrics: no sync between the forward and the backward, where a GPU would idle while the
    # host waits. A non-finite loss gives non-finite gradients; their backward is wasted only on such steps.
    state.scaler.scale(loss).backward()
    if values.last_layer_frozen:
        cancel_gradients(state.last_layer)
    state.scaler.unscale_(state.optimizer)
    norm = clip_gradients(state.student_module.parameters(), cfg.optim.grad_clip)
    # the step's scalars (loss, parts, stats, gradient norm) and the finiteness flags in one device-to-host read
    names = ["loss", *(f"loss_{k}" for k in result.parts), *result.stats, "grad_norm"]
    scalars = torch.stack([torch.as_tensor(t).detach().float().reshape(()).to(loss.device)
                           for t in (loss, *result.parts.values(), *result.stats.values(), norm)])
    flags = torch.cat([torch.isfinite(scalars[[0, -1]]).to(torch.float32),
                       torch.tensor([float(missing)], device=loss.device)])
    if info.distributed:  # a bad step on any process is skipped on every process; missing samples are summed
        all_reduce_sum_(flags)
    read = torch.cat([flags, scalars]).tolist()
    loss_ok, grad_ok = (f == (info.world_size if info.distributed else 1) for f in read[:2])
    state.missing_samples += int(read[2])
    measured = dict(zip(names, read[3:]))
    if loss_ok and (grad_ok or state.scaler.is_enabled()):  # fp16: the scaler skips a step with inf gradients
        scale_before = state.scaler.get_scale() if state.scaler.is_enabled() else 1.0
        state.scaler.step(state.optimizer)
        state.scaler.update()
        applied = not state.scaler.is_enabled() or state.scaler.get_scale() >= scale_before
        if applied:
            update_teacher(state.student_module.net, state.teacher, values.momentum)
            state.method.update_centers(result)
            state.bad_in_row = 0
        else:  # fp16: the scaler found inf/NaN gradients, skipped the update and halved its scale
            state.skipped_steps += 1
            scale = state.scaler.get_scale()
            if scale < MIN_FP16_LOSS_SCALE:
                raise DagmanError(
                    f"stopping at step {step}: the fp16 loss scale fell to {scale:.3g} and the gradients are still "
                    "not finite; use train.precision=bf16 or fp32, lower optim.lr, or check the data"
                )
    else:
        state.optimizer.zero_grad(set_to_none=True)
        if state.scaler.is_enabled():
            state.scaler.update()  # close the scaler's step after unscale_ (no optimizer step was taken)
        state.skipped_steps += 1
        state.bad_in_row += 1
        if state.bad_in_row >= cfg.train.max_nonfinite_steps:
            raise DagmanError(
                f"stopping at step {step}: {state.bad_in_row} steps in a row had a non-finite loss or gradient "
                "(last loss " + str(float(loss.detach())) + "); lower optim.lr, use train.precision=bf16/fp32, "
                "or check the data"
            )
    state.step += 1
    if info.device.type == "cuda":
        torch.cuda.synchronize(info.device)
    elapsed = time.perf_counter() - t0
    metrics = {
        **measured,
        "lr": values.lr,
        "weight_decay": values.weight_decay,
        "teacher_temp": values.teacher_temp,
        "patch_teacher_temp": values.patch_teacher_temp,
        "ema_momentum": values.momentum,
        "skipped_steps": state.skipped_steps,
        "missing_volume_samples": state.missing_samples,
        "step_seconds": elapsed,
    }
    if info.device.type == "cuda":
        metrics["gpu_peak_memory_gib"] = torch.cuda.max_memory_allocated(info.device) / 2**30
    state.extra["last_result"] = result
    return metrics


# the collapse monitor: after this many steps (and a tenth of the run), a teacher whose image-level logits spread
# less than this across the batch's inputs, or whose targets are uniform or all on one prototype
# (dagman.ssl.monitor), is reported once (the distillation terms on them teach nothing)
COLLAPSE_AFTER_STEPS = 100
COLLAPSE_SPREAD = 1e-4


# the end-of-run learning summary: the monitor's numbers averaged over this many last steps
SUMMARY_STEPS = 20


def is_monitor_key(key: str) -> bool:
    """Whether a metric of :func:`train_step` is one of the learning monitor's (dagman.ssl.monitor, the spreads)."""
    return (key.endswith(("_uniform_ratio", "_entropy", "_spread")) or key.startswith("center_")) and \
        not key.startswith("diversity")


def window_mean(window: Sequence[dict]) -> dict[str, float]:
    """The mean of each key present in every entry of ``window`` (the learning monitor of the last steps)."""
    if not window:
        return {}
    return {k: sum(m[k] for m in window) / len(window) for k in window[-1] if all(k in m for m in window)}


def _warn_if_collapsed(step: int, metrics: dict, total_steps: int = 0, teacher_norm: str | None = None) -> bool:
    """Print one warning line when the teacher's targets carry no information about the input: its [CLS] or
    global logits do not depend on the input (``teacher_*_spread`` below ``COLLAPSE_SPREAD``), or a term's
    targets are uniform or all on one prototype (:func:`dagman.ssl.monitor.collapse_kind`). Only at a step
    >= ``COLLAPSE_AFTER_STEPS`` and >= a tenth of ``total_steps``. The line says which kind of collapse and
    what to try (not the run's own ``teacher_norm``). Returns whether it warned."""
    if step < max(COLLAPSE_AFTER_STEPS, total_steps // 10):
        return False
    flat = {k: metrics[k] for k in ("teacher_cls_spread", "teacher_global_spread")
            if metrics.get(k) is not None and metrics[k] < COLLAPSE_SPREAD}
    kinds: dict[str, list[str]] = {}
    for term in TERMS:
        kind = collapse_kind(metrics, term)
        if kind is not None:
            kinds.setdefault(kind, []).append(term)
    if not flat and not kinds:
        return False
    said = []
    if flat:
        which = ", ".join(f"{k} {v:.1e}" for k, v in sorted(flat.items()))
        said.append(f"the teacher's outputs are the same for every input ({which})")
    for kind, terms in kinds.items():
        entropy = ", ".join(f"{t} H {metrics[f'teacher_{t}_entropy']:.2f}" for t in terms)
        said.append(f"{kind} collapse of {'/'.join(terms)} ({entropy} of ln K): "
                    f"{collapse_advice(kind, teacher_norm)}")
    if not kinds:
        said.append(collapse_advice("no-input", teacher_norm))
    log.warning(f"dagman: warning: step {step}: " + "; ".join(said) + " (metrics.jsonl logs the learning monitor)")
    return True


def checkpoint_state(state: TrainState) -> dict:
    return {
        "format": "dagman-pretrain-checkpoint",
        "version": 1,
        "student": state.student_module.state_dict(),
        "teacher": state.teacher.state_dict(),
        "method": state.method.state_dict(),  # loss centres
        "optimizer": state.optimizer.state_dict(),
        "scaler": state.scaler.state_dict(),
        "rng": ckpt.capture_rng_state(),
        "skipped_steps": state.skipped_steps,
        "bad_in_row": state.bad_in_row,
        "missing_volume_samples": state.missing_samples,
        "config": to_dict(state.cfg),
        "world_size": state.info.world_size,
    }


def restore_state(state: TrainState, saved: dict, path: Path) -> None:
    if saved.get("format") != "dagman-pretrain-checkpoint":
        raise DagmanError(f"{path}: not a dagman pretraining checkpoint")
    try:
        state.student_module.load_state_dict(saved["student"], strict=True)
        state.teacher.load_state_dict(saved["teacher"], strict=True)
        state.method.load_state_dict(saved["method"], strict=True)
        state.optimizer.load_state_dict(saved["optimizer"])
        state.scaler.load_state_dict(saved["scaler"])
    except (KeyError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DagmanError(f"{path}: does not match this configuration ({first})") from None
    ckpt.restore_rng_state(saved.get("rng", {}))
    state.step = int(saved["step"])
    state.skipped_steps = int(saved.get("skipped_steps", 0))
    state.bad_in_row = int(saved.get("bad_in_row", 0))
    state.missing_samples = int(saved.get("missing_volume_samples", 0))


def _keep_global_batch(cfg: Config, found: ckpt.FoundCheckpoint, info: DistInfo, explicit: bool) -> Config:
    """``cfg`` with the ``data.batch_size`` that keeps the global batch of the checkpoint ``found`` on
    ``info.world_size`` processes (unchanged when the number of processes is the run's); prints one notice
    line on rank 0 when it changes. A one-line ConfigError when the global batch cannot be kept."""
    saved_cfg = found.state.get("config")
    saved_data = saved_cfg.get("data") if isinstance(saved_cfg, dict) else None
    try:
        saved_batch = int(saved_data["batch_size"]) if isinstance(saved_data, dict) else cfg.data.batch_size
        saved_world = int(found.state.get("world_size", 1))
    except (KeyError, TypeError, ValueError):
        raise DagmanError(f"{found.path}: the checkpoint's data.batch_size or world_size is not a number") from None
    explicit = explicit or cfg.data.batch_size != saved_batch  # a --config / edited config.yaml changed it
    batch = resume_batch_size(saved_batch, saved_world, info.world_size, cfg.data.batch_size, explicit=explicit)
    if batch == cfg.data.batch_size:
        return cfg
    if info.is_main:
        n = info.world_size
        log.info(f"dagman pretrain: resuming a run of {saved_world} process{'es' if saved_world > 1 else ''} on "
                    f"{n}: data.batch_size {cfg.data.batch_size} -> {batch} keeps the global batch of {batch * n} "
                    "(same schedules and data order)")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=batch))


def _peer_failure(err: BaseException, info: DistInfo, cfg: Config, during: str,
                  checkpoint: str | os.PathLike | None) -> PeerFailure:
    return peer_failure_error(err, rank=info.rank, world_size=info.world_size, during=during,
                              timeout_s=cfg.train.dist_timeout_s,
                              checkpoint=str(checkpoint) if checkpoint is not None else None)


def export_encoder(state: TrainState, out: Path) -> Path:
    """The teacher's backbone (the encoder DINO/iBOT evaluate), MONAI ``SwinTransformer`` key layout."""
    return ckpt.save_encoder_safetensors(out / ENCODER_FILE, state.teacher.backbone.state_dict(),
                                         ckpt.encoder_metadata(state.cfg, state.step, "teacher"))


def _batches(loader, start_step: int):
    """Endless batches from ``loader`` positioned at global step ``start_step`` (data epochs are the
    loader's own; the order depends only on (seed, epoch), so skipping recomputes nothing)."""
    sampler = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
    per_epoch = len(sampler)
    if per_epoch < 1:
        raise DagmanError("the data loader yields no batch per epoch (fewer volumes than the global batch?)")
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        if skip:
            sampler.skip_batches = skip
        for batch in loader:
            yield batch
        sampler.skip_batches = 0
        skip = 0
        epoch += 1


def pretrain(cfg: Config, out: str | os.PathLike, *, resume: bool = False, progress: bool = True,
             explicit_batch_size: bool = False) -> dict:
    """Pretrain ``cfg`` on ``cfg.data.cache`` into the run folder ``out``. Returns a summary dict.

    ``resume``: continue from the newest loadable checkpoint of ``out``. Resuming with another number of
    processes keeps the run's global batch (``data.batch_size`` becomes global / processes, one notice
    line on rank 0); ``explicit_batch_size`` (the user set ``data.batch_size`` for this resume) makes a
    ``data.batch_size`` that would change the global batch an error instead (see
    :func:`dagman.train.distributed.resume_batch_size`). Under a process group, a process that dies or
    stops answering ends the others with a one-line :class:`~dagman.train.distributed.PeerFailure`
    naming the step and the last checkpoint (within ``train.dist_timeout_s`` seconds at most)."""
    from dagman.data.views import TwoViewDataset, two_view_loader

    out = Path(out)
    if cfg.data.cache is None:
        raise DagmanError("no training data: pass <<data>> CACHE (a folder made by 'dagman data prepare')")
    info = init_distributed(timeout_s=cfg.train.dist_timeout_s)
    found = None
    if resume:
        found = ckpt.latest_checkpoint(out)
        if found is None:
            raise DagmanError(f"resume: no loadable checkpoint in {out / 'checkpoints'}", option="resume")
        cfg = _keep_global_batch(cfg, found, info, explicit_batch_size)
    elif (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):  # every rank refuses
        raise DagmanError(f"{out} already holds a run (checkpoints/); use <<resume>> to continue it or a new <<out>>")
    dataset = TwoViewDataset.from_config(cfg.data, seed=cfg.train.seed)
    # a small cache (fewer volumes than one global batch) draws several crops per volume per epoch
    n_volumes = dataset.n_volumes
    dataset.samples_per_volume = samples_per_volume(cfg, n_volumes, info.world_size)
    if cfg.data.samples_per_volume is None and dataset.samples_per_volume > 1 and info.is_main:
        log.info(f"dagman pretrain: the cache holds {n_volumes} volume{'s' if n_volumes > 1 else ''}, fewer than "
                    f"the global batch of {cfg.data.batch_size * info.world_size}: drawing {dataset.samples_per_volume} "
                    f"crop pairs per volume per epoch (data.samples_per_volume={dataset.samples_per_volume}) so that "
                    "an epoch holds one batch")
    plan = plan_steps(cfg, n_volumes, info.world_size)
    schedules = Schedules.from_config(cfg, plan)
    try:
        state = build_state(cfg, info, schedules)  # DDP broadcasts rank 0's weights: a collective
    except Exception as err:
        if info.distributed and is_peer_failure(err):
            raise _peer_failure(err, info, cfg, "start-up", found.path if found else None) from None
        raise
    if found is not None:
        restore_state(state, found.state, found.path)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        if progress:
            log.info(f"dagman pretrain: {step_path(cfg, info.device)}")

    loader = two_view_loader(dataset, cfg.data.batch_size, workers=cfg.data.num_workers, seed=cfg.train.seed,
                             distributed=info.distributed or None,
                             num_replicas=info.world_size if info.distributed else None,
                             rank=info.rank if info.distributed else None)
    total = plan.total_steps
    kill_after = int(os.environ.get(KILL_AFTER_STEP_ENV, "-1"))
    if os.environ.get(KILL_RANK_ENV, "").strip() not in ("", str(info.rank)):
        kill_after = -1  # the test hook names another rank
    logger = MetricsLogger(out, enabled=info.is_main, resume_step=state.step if found else None)
    bar = None
    if progress and info.is_main:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=state.step, desc=f"pretrain {cfg.method}/{cfg.size}", unit="step",
                   dynamic_ncols=True, disable=None, file=sys.stderr)
    every = max(1, cfg.train.checkpoint_every_steps)
    snapshot_steps = plan.steps(cfg.train.snapshot_every_epochs) if cfg.train.snapshot_every_epochs else 0
    diversity_every, crops = 0, None
    if cfg.train.diversity_every_epochs and info.is_main:
        from dagman.ssl.diversity import diversity_for_run, eval_crops, flatten_diversity

        diversity_every = max(1, plan.steps(cfg.train.diversity_every_epochs))
        crops = eval_crops(cfg.data.cache, cfg.train.diversity_crops, cfg.data.crop_size, seed=cfg.train.seed)
    from dagman.train.probe import probe_network, probe_set_for

    probe = probe_set_for(cfg) if info.is_main else None
    probe_every, last_probe = (cfg.train.probe_every_steps if probe is not None else 0), {}
    t_start = time.perf_counter()
    first_step = state.step
    collapse_warned = False
    last_metrics: dict = {}
    recent: collections.deque = collections.deque(maxlen=SUMMARY_STEPS)  # the learning monitor's last steps

    def last_checkpoint() -> Path | None:
        """Where rank 0 saved last (every rank knows the saving steps)."""
        saved = (state.step // every) * every
        if saved > first_step:
            return ckpt.checkpoint_dir(out) / ckpt.LAST_NAME
        return found.path if found is not None else None

    try:
        batches = _batches(loader, state.step)
        while state.step < total:
            batch = next(batches)
            metrics = train_step(state, batch["view1"], batch["view2"], missing=int((batch["missing"] >= 0).sum()))
            metrics["epoch"] = state.step / plan.steps_per_epoch
            measured = False  # a periodic measurement is logged at its step, whatever log_every_steps says
            if diversity_every and (state.step % diversity_every == 0 or state.step == total):
                measured = True
                # head diversity of the teacher on fixed eval crops (method notes, section 7)
                metrics.update(flatten_diversity(diversity_for_run(state.teacher, crops.to(info.device))))
            if probe_every and (state.step % probe_every == 0 or state.step == total):
                measured = True
                # k-NN probe of the teacher's frozen features on labelled crops (the learning monitor)
                last_probe = probe_network(state.teacher, probe, device=info.device)
                metrics.update(last_probe)
            last_metrics = metrics
            recent.append({k: v for k, v in metrics.items() if is_monitor_key(k)})
            if info.is_main and not collapse_warned and len(recent) == recent.maxlen:
                # judged on the mean of the last SUMMARY_STEPS steps: one batch of 2 can put both samples on
                # one prototype by chance (r12 in docs/RESULTS.md: 0.8% of healthy steps), 20 in a row cannot
                collapse_warned = _warn_if_collapsed(state.step, window_mean(recent), total,
                                                     cfg.loss.teacher_norm)
            if state.step % max(1, cfg.train.log_every_steps) == 0 or state.step == total or measured:
                logger.log(state.step, metrics)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", refresh=False)
            if info.is_main and (state.step % every == 0 or state.step == total):
                keep = bool(snapshot_steps) and state.step % snapshot_steps == 0
                ckpt.save_run_checkpoint(out, checkpoint_state(state), state.step, keep_periodic=keep)
            if state.step == kill_after:
                os._exit(137)
    except Exception as err:
        if info.distributed and is_peer_failure(err):
            raise _peer_failure(err, info, cfg, f"step {state.step + 1}", last_checkpoint()) from None
        raise
    finally:
        if bar is not None:
            bar.close()
        logger.close()
    encoder = export_encoder(state, out) if info.is_main else None
    seconds = time.perf_counter() - t_start
    summary = {"steps": state.step, "steps_this_run": state.step - first_step, "seconds": seconds,
               "skipped_steps": state.skipped_steps,
               "missing_volume_samples": state.missing_samples, "final": last_metrics,
               "learning": window_mean(recent) | last_probe,
               "encoder": str(encoder) if encoder else None, "run": str(out)}
    if info.distributed:
        # The DDP wrapper and the loader hold the process group; a group still referenced when the interpreter
        # shuts down can abort the process (gloo worker threads, "terminate called without an active
        # exception"), which torchrun reports as a failed run. Release them, then destroy the group.
        del state, loader, batches
        gc.collect()
        try:
            barrier()  # nobody tears the group down while rank 0 still writes
        except Exception as err:
            if is_peer_failure(err):
                raise _peer_failure(err, info, cfg, "the final synchronisation",
                                    ckpt.checkpoint_dir(out) / ckpt.LAST_NAME) from None
            raise
        cleanup()
    return summary
