"""Processes and devices: one plain process (no process group at all) or torchrun's DDP processes.

``init_distributed`` reads torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``). Without ``WORLD_SIZE`` or with ``WORLD_SIZE=1`` it creates *no* process
group, and every collective below is a no-op, so the same training code runs on one CPU process. With
several processes it uses NCCL when the device is CUDA (one GPU per process, chosen by ``LOCAL_RANK``)
and Gloo on CPUs, with a timeout so that a dead peer ends the run instead of hanging it forever.

Faults: when a process of a run dies, the survivors' next collective fails (Gloo: "Connection closed by
peer", at once; a process that is alive but stuck: after the collective timeout, ``train.dist_timeout_s``).
:func:`is_peer_failure` recognises those errors and :func:`peer_failure_error` turns one into a one-line
:class:`PeerFailure` (a DagmanError) that names the step and the last checkpoint. On resume with another
number of processes, :func:`resume_batch_size` keeps the global batch (so the schedules and the data order
stay those of the run).
"""

from __future__ import annotations

import datetime
import os
import random
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dagman.errors import ConfigError, DagmanError

__all__ = [
    "DistInfo",
    "init_distributed",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "all_reduce_mean_",
    "all_reduce_sum_",
    "gather_object",
    "broadcast_object",
    "barrier",
    "cleanup",
    "seed_everything",
    "DEFAULT_TIMEOUT_S",
    "PeerFailure",
    "is_peer_failure",
    "peer_failure_error",
    "resume_batch_size",
]

DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` in ``0..world_size-1``, ``local_rank`` on its node, the
    ``device`` it computes on, and whether a process group exists (``distributed``)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that writes logs, checkpoints and the encoder)."""
        return self.rank == 0


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        if default is None:
            raise DagmanError(f"environment variable {name} is not set (start multi-process runs with torchrun)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise DagmanError(f"environment variable {name}={raw!r} is not an integer") from None


def _pick_device(preference: str, local_rank: int) -> torch.device:
    if preference not in ("auto", "cpu", "cuda"):
        raise DagmanError(f"device must be auto, cpu or cuda, got {preference!r}")
    want_cuda = preference == "cuda" or (preference == "auto" and torch.cuda.is_available())
    if not want_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DagmanError("device cuda was asked for but CUDA is not available (use <<device>> cpu or auto)")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DagmanError(f"LOCAL_RANK={local_rank} but only {count} CUDA device(s) are visible")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device_preference: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Set up this process from torchrun's environment and return its :class:`DistInfo`.

    ``device_preference``: ``auto`` (CUDA when available), ``cpu`` or ``cuda``. Single process
    (``WORLD_SIZE`` unset or 1): no process group. Otherwise ``init_process_group`` over ``env://`` with
    ``nccl`` on CUDA and ``gloo`` on CPU, ``timeout_s`` seconds for the rendezvous and for every collective
    (``train.dist_timeout_s``). Calling it again while a group exists returns the current state. Bad or
    missing variables, and a rendezvous that fails or times out, raise a one-line DagmanError."""
    if not float(timeout_s) > 0:
        raise DagmanError(f"the collective timeout must be > 0 seconds, got {timeout_s!r}")
    if device_preference not in ("auto", "cpu", "cuda"):
        raise DagmanError(f"device must be auto, cpu or cuda, got {device_preference!r}")
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size < 1:
        raise DagmanError(f"environment variable WORLD_SIZE={world_size} must be >= 1")
    if world_size == 1:
        local_rank = _env_int("LOCAL_RANK", 0)
        device = _pick_device(device_preference, local_rank if torch.cuda.is_available() else 0)
        return DistInfo(rank=0, world_size=1, local_rank=local_rank, device=device, distributed=False)
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK", rank)
    if not 0 <= rank < world_size:
        raise DagmanError(f"environment variable RANK={rank} must be in [0, WORLD_SIZE={world_size})")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise DagmanError(f"environment variable {name} is not set (start multi-process runs with torchrun)")
    device = _pick_device(device_preference, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {}
        if backend == "nccl":
            kwargs["device_id"] = device
        try:
            dist.init_process_group(
                backend=backend,
                init_method="env://",
                rank=rank,
                world_size=world_size,
                timeout=datetime.timedelta(seconds=float(timeout_s)),
                **kwargs,
            )
        except (RuntimeError, OSError) as err:  # rendezvous timeout, address in use, unreachable master
            where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
            raise DagmanError(
                f"distributed run: rank {rank} of {world_size} could not join the process group at {where} "
                f"within {float(timeout_s):g} s: {_first_line(err)}"
            ) from None
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=device,
        distributed=True,
        backend=dist.get_backend(),
    )


def is_distributed() -> bool:
    """True when a process group with more than one process exists."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In place: the sum of ``tensor`` over all processes (no-op without a group); returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """In place: the mean of ``tensor`` over all processes (no-op without a group); returns it. Used
    for the teacher-output centres, so every rank keeps the same centre. Floating tensors only."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without a group). Pickles between
    the run's own processes (trusted peers), e.g. to put every rank's RNG state into the checkpoint."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself without a group)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every process (no-op without a group)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def cleanup() -> None:
    """Destroy the process group if one exists (safe to call always)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python ``random``, numpy's global generator and torch (CPU and all CUDA devices) with
    ``seed + rank`` (mod 2**32), so ranks draw different crops and masks; returns the seed used."""
    value = (int(seed) + int(rank)) % 2**32
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)  # also seeds every CUDA device
    return value


# ----------------------------------------------------------------------------------------------------------
# Faults: a process of the run died or stopped answering
# ----------------------------------------------------------------------------------------------------------


class PeerFailure(DagmanError):
    """Another process of a distributed run stopped (died) or stopped answering (timeout)."""


# Words of the errors a collective raises when a peer is gone (Gloo: "Connection closed by peer",
# "Connection reset by peer", "Timed out waiting ...ms for recv operation"; NCCL: "NCCL error",
# watchdog "Watchdog caught collective operation timeout"). Matched in lower case, together with the
# source of the error, so that an unrelated RuntimeError (a shape mismatch, a DataLoader timeout) is
# never taken for a dead peer.
_PEER_SOURCES = ("gloo", "nccl", "processgroup", "c10d", "distributed")
_PEER_SYMPTOMS = ("connection closed", "connection reset", "broken pipe", "timed out", "timeout",
                  "connection refused", "socket", "peer", "remote", "abort")
_PEER_ALONE = ("connection closed by peer", "connection reset by peer")  # enough without a source
_LOCATION = re.compile(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*")  # "[.../pair.cc:553] " prefix of Gloo errors
_BOILERPLATE = re.compile(r"\.?\s+(?:This is typically|Check the logs)\b.*$")  # Gloo's advice after the cause


def _first_line(err: BaseException) -> str:
    """The first line of ``err``'s message without a C++ source-location prefix or Gloo's boilerplate
    advice, at most 200 characters (the type name when the message is empty)."""
    text = str(err).strip()
    line = text.splitlines()[0].strip() if text else ""
    line = _BOILERPLATE.sub("", _LOCATION.sub("", line))
    line = line[:200].rstrip(" .")
    return line or type(err).__name__


def _is_timeout(err: BaseException) -> bool:
    text = str(err).lower()
    return "timed out" in text or "timeout" in text


def is_peer_failure(err: BaseException) -> bool:
    """True when ``err`` is what a collective raises because another process of the run died or stopped
    answering: a ``torch.distributed.DistError`` (backend, network, store), or a RuntimeError from Gloo /
    NCCL / c10d whose message speaks of a closed connection, a reset, a timeout or an abort."""
    if isinstance(err, dist.DistError):
        return True
    if not isinstance(err, RuntimeError):
        return False
    text = str(err).lower()
    if any(s in text for s in _PEER_ALONE):
        return True
    return any(s in text for s in _PEER_SOURCES) and any(s in text for s in _PEER_SYMPTOMS)


def peer_failure_error(
    err: BaseException,
    *,
    rank: int,
    world_size: int,
    during: str,
    timeout_s: float | None = None,
    checkpoint: str | None = None,
) -> PeerFailure:
    """The one-line error for a collective that failed because of another process (see
    :func:`is_peer_failure`), e.g. ``distributed run: another process stopped (rank 1 of 2?) during step 7:
    Connection closed by peer [127.0.0.1]:4711; the last checkpoint is RUN/checkpoints/last.pt (step 6)``.

    ``rank``, ``world_size``: this process's; with two processes the other one is named, with more it
    cannot be told which one failed. ``during``: what this process was doing (``"step 7"``).
    ``timeout_s``: the collective timeout, named when the error is a timeout. ``checkpoint``: where the
    run can be resumed from (``None``: no checkpoint was written yet)."""
    if world_size == 2:
        who = f"rank {1 - rank} of 2?"
    else:
        who = f"one of the other {world_size - 1} processes; this is rank {rank} of {world_size}"
    if _is_timeout(err):
        limit = f" for train.dist_timeout_s={timeout_s:g} s" if timeout_s is not None else ""
        what = f"another process stopped answering ({who}){limit}"
    else:
        what = f"another process stopped ({who})"
    where = (f"the last checkpoint is {checkpoint} (continue with --resume)" if checkpoint
             else "no checkpoint was written yet")
    return PeerFailure(f"distributed run: {what} during {during}: {_first_line(err)}; {where}")


# ----------------------------------------------------------------------------------------------------------
# Resuming with another number of processes
# ----------------------------------------------------------------------------------------------------------


def _process_counts(global_batch: int, near: int, limit: int = 6) -> str:
    """``"1, 2 or 4"``: the process counts that split ``global_batch`` evenly (the ``limit`` nearest to
    ``near``)."""
    counts = [d for d in range(1, global_batch + 1) if global_batch % d == 0]
    counts = sorted(sorted(counts, key=lambda d: (abs(d - near), d))[:limit])
    text = [str(d) for d in counts]
    return text[0] if len(text) == 1 else ", ".join(text[:-1]) + " or " + text[-1]


def resume_batch_size(
    saved_batch_size: int, saved_world_size: int, world_size: int, batch_size: int, *, explicit: bool = False
) -> int:
    """The per-process batch (volumes) for resuming, on ``world_size`` processes, a run saved by
    ``saved_world_size`` processes of ``saved_batch_size`` each: the one that keeps the saved global batch
    ``G = saved_batch_size * saved_world_size``, so the learning-rate scaling, the step plan, the
    schedules and the data order (global batch ``k`` is the same volumes whatever the number of
    processes) stay the run's.

    ``batch_size`` is the configured per-process batch; ``explicit``: the user set it for this resume.
    Returns ``batch_size`` when ``batch_size * world_size == G``; otherwise, unless ``explicit``,
    ``G // world_size`` when that divides evenly. Raises a one-line ConfigError when the global batch
    cannot be kept: an explicit ``data.batch_size`` that changes it, or ``G`` not divisible by
    ``world_size`` (the message lists process counts that work, with their ``data.batch_size``)."""
    for name, value in (("saved data.batch_size", saved_batch_size), ("saved world size", saved_world_size),
                        ("world size", world_size), ("data.batch_size", batch_size)):
        if int(value) < 1:
            raise ConfigError(f"resume: {name} must be >= 1, got {value}", option="resume")
    global_batch = saved_batch_size * saved_world_size
    saved = (f"the run was trained with a global batch of {global_batch} ({saved_batch_size} per process x "
             f"{saved_world_size} process{'es' if saved_world_size > 1 else ''})")
    if batch_size * world_size == global_batch:
        return batch_size
    if explicit:
        keep = (f"use data.batch_size={global_batch // world_size} (or leave it out)"
                if global_batch % world_size == 0
                else f"use {_process_counts(global_batch, world_size)} processes with data.batch_size = "
                f"{global_batch} / processes")
        raise ConfigError(
            f"<<resume>>: data.batch_size={batch_size} on {world_size} process{'es' if world_size > 1 else ''} is a "
            f"global batch of {batch_size * world_size}, but {saved}; a different global batch would change the "
            f"schedules mid-run: {keep}, or start a new run"
        )
    if global_batch % world_size:
        raise ConfigError(
            f"<<resume>>: {saved}, which {world_size} processes cannot split evenly (no data.batch_size keeps it); "
            f"resume with {_process_counts(global_batch, world_size)} processes (data.batch_size is then set to "
            f"{global_batch} / processes)"
        )
    return global_batch // world_size
