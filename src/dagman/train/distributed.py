"""Processes and devices: one plain process (no process group at all) or torchrun's DDP processes.

``init_distributed`` reads torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``). Without ``WORLD_SIZE`` or with ``WORLD_SIZE=1`` it creates *no* process
group, and every collective below is a no-op, so the same training code runs on one CPU process. With
several processes it uses NCCL when the device is CUDA (one GPU per process, chosen by ``LOCAL_RANK``)
and Gloo on CPUs, with a timeout so that a dead peer ends the run instead of hanging it forever.
"""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dagman.errors import DagmanError

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
        raise DagmanError("device cuda was asked for but CUDA is not available (use --device cpu or auto)")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DagmanError(f"LOCAL_RANK={local_rank} but only {count} CUDA device(s) are visible")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device_preference: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Set up this process from torchrun's environment and return its :class:`DistInfo`.

    ``device_preference``: ``auto`` (CUDA when available), ``cpu`` or ``cuda``. Single process
    (``WORLD_SIZE`` unset or 1): no process group. Otherwise ``init_process_group`` over ``env://`` with
    ``nccl`` on CUDA and ``gloo`` on CPU, ``timeout_s`` seconds for collectives. Calling it again while a
    group exists returns the current state. Bad or missing variables raise a one-line DagmanError."""
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
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=float(timeout_s)),
            **kwargs,
        )
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
