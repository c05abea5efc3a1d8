"""Training metrics: ``RUN/metrics.jsonl`` (one JSON object per logged step) and TensorBoard scalars
under ``RUN/tensorboard`` (``tensorboard --logdir RUN``).

Step convention: the ``step`` of a log entry is the number of optimiser steps completed when it was
logged (the first update logs step 1), the same number a checkpoint stores as ``step``. On resume from a
checkpoint at step ``S`` the entries with ``step > S`` belong to work that is about to be redone, so
:class:`MetricsLogger` drops them from ``metrics.jsonl`` and rebuilds the TensorBoard event files from the kept
entries, keeping both consistent with the resumed run. (TensorBoard's own ``purge_step`` is not used: it relies on
event files sorting by creation, which their names do not guarantee.)

Each JSON line is ``{"step": int, "time": unix seconds, <name>: value, ...}``; nested dicts are flattened with
``/`` (``{"loss": {"amip": 0.1}}`` -> ``"loss/amip"``), tensors become numbers, non-finite floats become
``null`` (strict JSON). Every line is flushed when written, so a killed run loses at most the line in
progress (a torn last line is dropped on resume).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = ["MetricsLogger", "METRICS_FILE", "TENSORBOARD_DIR", "flatten_metrics", "read_metrics"]

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric tensors must hold one value, got shape {tuple(value.shape)}")
        value = value.item()
    elif hasattr(value, "item") and callable(value.item):  # numpy scalars / 1-element arrays
        value = value.item()
    return value


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"loss": {"amip": t}}`` -> ``{"loss/amip": float}``; tensors and numpy scalars become python
    numbers; strings, bools and None pass through."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_metrics(value, name + "/"))
        else:
            out[name] = _scalar(value)
    return out


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The entries of a ``metrics.jsonl`` file (``RUN/metrics.jsonl`` or the run folder itself); lines
    that do not parse (a torn last line of a killed run) are skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    entries = []
    if path.exists():
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(entry, dict):
                    entries.append(entry)
    return entries


class MetricsLogger:
    """Append per-step scalars to ``RUN/metrics.jsonl`` and TensorBoard event files in ``RUN/tensorboard``.

    ``enabled=False`` (every rank but the main one) makes every method a no-op and touches no file.
    ``resume_step=None`` starts a new run: an existing ``metrics.jsonl`` is emptied. ``resume_step=S`` keeps
    the entries with ``step <= S`` (rewritten atomically; torn lines dropped) and rewrites the TensorBoard
    events from them. ``tensorboard=False`` (or the package missing: warning) writes only the JSON lines.
    Use as a context manager or call :meth:`close`."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        enabled: bool = True,
        resume_step: int | None = None,
        tensorboard: bool = True,
    ) -> None:
        self.enabled = bool(enabled)
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self._fh = None
        self._writer = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self._fh = open(self.path, "w", encoding="utf-8")
        else:
            self._truncate_after(int(resume_step))
            self._fh = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception as err:  # pragma: no cover - tensorboard is a dependency
                warnings.warn(f"TensorBoard logging disabled ({err}); metrics go to {self.path} only", stacklevel=2)
            else:
                tb_dir = self.run_dir / TENSORBOARD_DIR
                # Event files are read in name order, and their names (time, host, pid, counter) do not sort
                # reliably by creation, so TensorBoard's purge_step cannot be trusted to drop the redone
                # steps. metrics.jsonl is the record: rebuild the event files from its kept entries.
                if tb_dir.is_dir():
                    for old in tb_dir.glob("events.out.tfevents.*"):
                        old.unlink()
                self._writer = SummaryWriter(str(tb_dir), flush_secs=30)
                if resume_step is not None and self.path.exists():
                    for entry in read_metrics(self.path):
                        for name, value in entry.items():
                            if name not in ("step", "time") and isinstance(value, (int, float)):
                                self._writer.add_scalar(name, float(value), global_step=int(entry["step"]))
                    self._writer.flush()

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [e for e in read_metrics(self.path) if isinstance(e.get("step"), int) and e["step"] <= step]
        text = "".join(json.dumps(e) + "\n" for e in kept)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any] | None:
        """Write one entry for ``step`` (optimiser steps completed); returns the JSON object written
        (None when disabled). Numbers (python, numpy, 1-element tensors; bools as 0/1) also go to
        TensorBoard under their flattened names; strings go to the JSON line only."""
        if not self.enabled:
            return None
        flat = flatten_metrics(metrics)
        if "step" in flat or "time" in flat:
            raise ValueError("metric names 'step' and 'time' are reserved")
        entry = {"step": int(step), "time": round(time.time(), 3)}
        entry.update({k: _json_value(v) for k, v in flat.items()})
        try:
            self._fh.write(json.dumps(entry, allow_nan=False) + "\n")
            self._fh.flush()
        except OSError as err:  # disk full, quota, size limit: one line naming the file, not a traceback
            from dagman.fileio import write_error

            raise write_error(self.path, err) from None
        if self._writer is not None:
            for name, value in flat.items():
                if isinstance(value, (bool, int, float)):
                    self._writer.add_scalar(name, float(value), global_step=int(step))
        return entry

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close both outputs (idempotent)."""
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                fh.close()
            except OSError as err:
                from dagman.fileio import write_error

                raise write_error(self.path, err) from None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
