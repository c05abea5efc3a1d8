"""Training checkpoints, the exported encoder, and RNG state — written atomically, loaded without ever
unpickling arbitrary objects.

Checkpoint (``RUN/checkpoints/last.pt``, and ``step_XXXXXXXX.pt`` snapshots): a ``torch.save`` zip file of a
dict that holds only tensors and plain python values (dict / list / tuple / str / int / float / bool /
None / torch dtypes), so that ``torch.load(weights_only=True)`` reads it back; :func:`save_checkpoint`
checks this *before* writing and names the offending key. The loop decides the keys; by convention
``student``, ``teacher``, ``optimizer``, ``scaler``, ``centres`` (state dicts), ``step`` (optimiser steps
completed), ``epoch``, ``config`` (``dagman.config.to_dict``), ``rng`` (:func:`capture_rng_state`, or a list
of them, one per rank). :func:`save_checkpoint` adds the marker ``"dagman_checkpoint": FORMAT_VERSION``.

Writes are atomic: a temporary ``.<name>.<random>.tmp`` in the same folder, flushed and fsynced, renamed
over the target, then the folder is fsynced — a killed process leaves the previous file intact (and at
worst a stray temporary file, removed by the next :func:`save_run_checkpoint`).

Encoder (``RUN/encoder.safetensors``): backbone weights only, in the key layout of
``monai.networks.nets.swin_unetr.SwinTransformer`` (loads into ``SwinUNETR(...).swinViT`` with
``strict=True``); safetensors metadata (:func:`encoder_metadata`) carries the config (YAML text), step,
method, which network it came from, and the preprocessing the encoder expects (``spacing_mm``, ``hu_window``,
``crop_size``), so that it travels with the weights.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np
import torch

from dagman.errors import DagmanError
from dagman.fileio import TMP_SUFFIX, WriteError, atomic_write, fsync_dir, remove_stale_temp_files

__all__ = [
    "FORMAT_VERSION",
    "MARKER",
    "CHECKPOINTS_DIR",
    "LAST_NAME",
    "save_checkpoint",
    "load_checkpoint",
    "checkpoint_dir",
    "periodic_checkpoint_name",
    "save_run_checkpoint",
    "latest_checkpoint",
    "FoundCheckpoint",
    "save_encoder_safetensors",
    "encoder_metadata",
    "BACKBONE_PREFIXES",
    "sub_state",
    "load_encoder",
    "read_encoder_metadata",
    "capture_rng_state",
    "restore_rng_state",
]

FORMAT_VERSION = 1
MARKER = "dagman_checkpoint"
CHECKPOINTS_DIR = "checkpoints"
LAST_NAME = "last.pt"
_PERIODIC = re.compile(r"^step_(\d{8,})\.pt$")
ENCODER_FORMAT = "dagman-encoder"
ENCODER_LAYOUT = "monai.networks.nets.swin_unetr.SwinTransformer"

_PLAIN_LEAVES = (bool, int, float, str, bytes, type(None), torch.dtype, torch.Size, torch.device)


# ----------------------------------------------------------------------------------------------------------
# Atomic files
# ----------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------
# Generic checkpoint files
# ----------------------------------------------------------------------------------------------------------


def _check_plain(obj: Any, where: str) -> None:
    """Raise TypeError naming ``where`` if ``obj`` holds anything weights-only loading would refuse."""
    if isinstance(obj, torch.Tensor):
        if type(obj) not in (torch.Tensor, torch.nn.Parameter):
            raise TypeError(f"checkpoint entry {where} is a tensor subclass {type(obj).__name__}; save a plain tensor")
        return
    if isinstance(obj, _PLAIN_LEAVES):
        return
    if isinstance(obj, Mapping):
        if not isinstance(obj, dict):
            raise TypeError(f"checkpoint entry {where} is a {type(obj).__name__}; use a dict")
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool, type(None))):
                raise TypeError(f"checkpoint entry {where} has a key of type {type(k).__name__}")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    hint = " (convert numpy values with torch.as_tensor or .tolist())" if type(obj).__module__.startswith("numpy") else ""
    raise TypeError(
        f"checkpoint entry {where} has type {type(obj).__module__}.{type(obj).__qualname__}, which "
        f"torch.load(weights_only=True) cannot read back{hint}"
    )


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Atomically ``torch.save`` ``state`` (plus the marker ``"dagman_checkpoint": FORMAT_VERSION``) to
    ``path``; returns the path. Raises TypeError, before writing anything, when ``state`` holds a value
    that weights-only loading would refuse (numpy arrays, custom classes, ...)."""
    path = Path(path)
    payload = dict(state)
    payload[MARKER] = FORMAT_VERSION
    _check_plain(payload, "state")
    atomic_write(path, lambda fh: torch.save(payload, fh))
    return path


_REFUSED = re.compile(r"(Trying to load unsupported GLOBAL \S+|Unsupported global: GLOBAL \S+|Unsupported operand \d+)")


def _reason(err: BaseException) -> str:
    text = str(err).strip()
    if isinstance(err, pickle.UnpicklingError) and "weights only" in text.lower():
        found = _REFUSED.search(text)
        detail = f": {found.group(1)}" if found else ""
        return f"it holds objects other than tensors and plain values, refused without running them{detail}"
    if "PytorchStreamReader" in text or "zip archive" in text:
        return "truncated or corrupt: the zip archive cannot be read"
    first = text.splitlines()[0] if text else ""
    if len(first) > 160:
        first = first[:157] + "..."
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _invalid(path: Path, reason: str) -> DagmanError:
    return DagmanError(f"{path}: not a valid dagman checkpoint ({reason})")


def _torch_load_safely(path: Path, what: Callable[[Path, str], DagmanError]) -> Any:
    if not path.is_file():
        raise what(path, "no such file" if not path.exists() else "not a file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as err:
        raise what(path, f"cannot read: {err.strerror or err}") from None
    # torch.save writes a zip archive ("PK\x03\x04"), or a pickle (protocol opcode 0x80) in the legacy format
    if not head:
        raise what(path, "empty file")
    if head[:2] != b"PK" and head[:1] != b"\x80":
        raise what(path, "not a PyTorch file: neither a zip archive nor a pickle")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # anything at all: truncated zip, bad pickle, refused global, ...
        raise what(path, _reason(err)) from None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`: ``torch.load(weights_only=True)`` on the CPU,
    so no arbitrary object is ever unpickled. Any problem (missing, truncated, corrupt, not a dagman
    checkpoint, newer format, would need to unpickle code) raises
    ``DagmanError("<path>: not a valid dagman checkpoint (<reason>)")``."""
    path = Path(path)
    state = _torch_load_safely(path, _invalid)
    if not isinstance(state, dict):
        raise _invalid(path, f"holds a {type(state).__name__}, not a dict")
    version = state.get(MARKER)
    if version is None:
        raise _invalid(path, f"no '{MARKER}' marker: not written by dagman")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise _invalid(path, f"format version {version!r}; this dagman reads up to {FORMAT_VERSION}, upgrade it")
    return state


# ----------------------------------------------------------------------------------------------------------
# Run folder
# ----------------------------------------------------------------------------------------------------------


def checkpoint_dir(run: str | os.PathLike) -> Path:
    """``RUN/checkpoints``."""
    return Path(run) / CHECKPOINTS_DIR


def periodic_checkpoint_name(step: int) -> str:
    """``step_00001000.pt`` for step 1000."""
    return f"step_{int(step):08d}.pt"


def save_run_checkpoint(run: str | os.PathLike, state: Mapping[str, Any], step: int, keep_periodic: bool = False) -> Path:
    """Write ``RUN/checkpoints/last.pt`` atomically (and, with ``keep_periodic``, the snapshot
    ``step_XXXXXXXX.pt``, hard-linked to ``last.pt`` when the file system allows); returns the path of
    ``last.pt``. ``step`` (optimiser steps completed) is stored as ``state["step"]``; a different
    ``state["step"]`` is a ValueError. Stray temporary files of a killed writer are removed first."""
    state = dict(state)
    if "step" in state and state["step"] != step:
        raise ValueError(f"state['step']={state['step']} disagrees with step={step}")
    state["step"] = int(step)
    folder = checkpoint_dir(run)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(folder)
    last = folder / LAST_NAME
    try:
        if not keep_periodic:
            return save_checkpoint(last, state)
        snapshot = save_checkpoint(folder / periodic_checkpoint_name(step), state)
    except WriteError as err:
        then = ("the previous checkpoint is kept: make room and continue with --resume" if last.is_file()
                else "no checkpoint was written yet: make room and start again")
        raise WriteError(f"{err}; training stopped at step {step}, {then}") from None
    # last.pt <- the same bytes, atomically: a hard link under a temporary name renamed over last.pt.
    tmp = folder / f".{LAST_NAME}.link{os.getpid()}{TMP_SUFFIX}"
    try:
        tmp.unlink(missing_ok=True)
        os.link(snapshot, tmp)
        os.replace(tmp, last)
        fsync_dir(folder)
    except OSError:
        tmp.unlink(missing_ok=True)
        save_checkpoint(last, state)
    return last


class FoundCheckpoint(NamedTuple):
    path: Path
    state: dict[str, Any]


def _periodic_steps(folder: Path) -> list[tuple[int, Path]]:
    out = []
    if folder.is_dir():
        for p in folder.iterdir():
            m = _PERIODIC.match(p.name)
            if m and p.is_file():
                out.append((int(m.group(1)), p))
    return sorted(out, reverse=True)


def latest_checkpoint(run: str | os.PathLike) -> FoundCheckpoint | None:
    """The newest *loadable* checkpoint of ``RUN``, or None when there is none.

    Tries ``last.pt``, then the snapshots ``step_XXXXXXXX.pt`` by descending step; a snapshot newer than a
    good ``last.pt`` (a writer killed between the two files) wins. Unreadable files are skipped with a
    warning that names them and says why."""
    folder = checkpoint_dir(run)
    last_state: dict[str, Any] | None = None
    last_step = -1
    last = folder / LAST_NAME
    if last.exists():
        try:
            last_state = load_checkpoint(last)
            last_step = int(last_state.get("step", -1))
        except DagmanError as err:
            warnings.warn(f"skipping {err}", stacklevel=2)
    for step, p in _periodic_steps(folder):
        if step <= last_step:
            break
        try:
            return FoundCheckpoint(p, load_checkpoint(p))
        except DagmanError as err:
            warnings.warn(f"skipping {err}", stacklevel=2)
    if last_state is not None:
        return FoundCheckpoint(last, last_state)
    return None


# ----------------------------------------------------------------------------------------------------------
# Encoder export (safetensors)
# ----------------------------------------------------------------------------------------------------------


def save_encoder_safetensors(
    path: str | os.PathLike, backbone_state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None
) -> Path:
    """Atomically write the backbone weights (MONAI ``SwinTransformer`` key layout, e.g.
    ``patch_embed.proj.weight``, ``layers1.0.blocks.0.attn.qkv.weight``) to a ``.safetensors`` file.

    Tensors are copied to contiguous CPU tensors (shared storage is fine). ``metadata`` values that are not
    strings are stored as JSON (``step`` 1000 -> ``"1000"``); ``format`` and ``layout`` entries are added.
    Raises ValueError on keys with a DDP/compile prefix (``module.``, ``_orig_mod.``) or non-tensor values."""
    from safetensors.torch import save as safetensors_bytes

    tensors: dict[str, torch.Tensor] = {}
    for key, value in backbone_state_dict.items():
        if key.startswith(("module.", "_orig_mod.")):
            raise ValueError(f"encoder key '{key}' has a wrapper prefix; pass the unwrapped backbone's state dict")
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"encoder entry '{key}' is a {type(value).__name__}, not a tensor")
        tensors[key] = value.detach().to("cpu").contiguous().clone()
    meta = {"format": ENCODER_FORMAT, "layout": ENCODER_LAYOUT}
    for k, v in (metadata or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    data = safetensors_bytes(tensors, metadata=meta)
    path = Path(path)
    atomic_write(path, lambda fh: fh.write(data))
    return path


#: where each network's backbone sits in a pretraining checkpoint's state dicts
BACKBONE_PREFIXES = {"teacher": "encoder.backbone.", "student": "net.encoder.backbone."}


def sub_state(state: Mapping[str, Any], prefix: str) -> dict:
    """The entries of ``state`` under ``prefix``, with the prefix removed (e.g. a backbone out of a network)."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def encoder_metadata(cfg: Any, step: int, network: str = "teacher") -> dict[str, Any]:
    """The metadata an exported encoder carries: where it came from (method, size, step, network, the run's
    config as YAML) and the preprocessing its inputs need (isotropic ``spacing_mm``, the ``hu_window`` scaled
    to [0, 1], the pretraining ``crop_size`` in voxels)."""
    from dagman.config import to_yaml

    return {"step": str(int(step)), "method": cfg.method, "size": cfg.size, "network": network,
            "source": f"{network} backbone", "spacing_mm": float(cfg.data.spacing_mm),
            "hu_window": [float(v) for v in cfg.data.hu_window], "crop_size": int(cfg.data.crop_size),
            "config": to_yaml(cfg)}


def _invalid_encoder(path: Path, reason: str) -> DagmanError:
    return DagmanError(f"{path}: not a valid encoder weight file ({reason})")


def load_encoder(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Backbone state dict (CPU tensors) from a ``.safetensors`` file, or from a ``.pt``/``.pth`` file only
    when it is a flat ``{name: tensor}`` dict readable with ``torch.load(weights_only=True)``. Any problem
    raises ``DagmanError("<path>: not a valid encoder weight file (<reason>)")``."""
    path = Path(path)
    if not path.is_file():
        raise _invalid_encoder(path, "no such file" if not path.exists() else "not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:
            raise _invalid_encoder(path, _reason(err)) from None
    state = _torch_load_safely(path, _invalid_encoder)
    if isinstance(state, dict) and MARKER in state:
        raise _invalid_encoder(path, "this is a training checkpoint; export its encoder with "
                                     "`dagman export --checkpoint CHECKPOINT --out FILE.safetensors`")
    if not isinstance(state, dict) or not state or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise _invalid_encoder(path, "expected a flat {name: tensor} state dict")
    return dict(state)


def read_encoder_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of an encoder ``.safetensors`` file (config YAML, step, method, format, layout)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise _invalid_encoder(path, "no such file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return dict(fh.metadata() or {})
    except Exception as err:
        raise _invalid_encoder(path, _reason(err)) from None


# ----------------------------------------------------------------------------------------------------------
# RNG state
# ----------------------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """The state of every global generator, as weights-only-loadable values:
    ``python`` (``random``: version int, 625-entry int64 tensor, gauss_next float|None), ``numpy`` (legacy
    global MT19937: 624-entry int64 key tensor, pos, has_gauss, cached_gaussian), ``torch`` (CPU ByteTensor)
    and ``cuda`` (list of ByteTensors, one per visible device; empty without CUDA)."""
    version, internal, gauss_next = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    cuda = [s.clone() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": str(name),
            "key": torch.from_numpy(np.asarray(key, dtype=np.int64).copy()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state().clone(),
        "cuda": cuda,
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` captured. CUDA states are restored on as many devices as both
    the saved list and this machine have (a warning if the counts differ); missing parts are left alone."""
    if "python" in state:
        py = state["python"]
        random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    if "numpy" in state:
        npy = state["numpy"]
        np.random.set_state(
            (
                npy["bit_generator"],
                np.asarray(npy["key"].numpy() if isinstance(npy["key"], torch.Tensor) else npy["key"], dtype=np.uint32),
                int(npy["pos"]),
                int(npy["has_gauss"]),
                float(npy["cached_gaussian"]),
            )
        )
    if "torch" in state:
        torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    saved = list(state.get("cuda") or [])
    if saved and torch.cuda.is_available():
        n = torch.cuda.device_count()
        if n != len(saved):
            warnings.warn(f"checkpoint has CUDA RNG states for {len(saved)} devices, this machine has {n}", stacklevel=2)
        for i, s in enumerate(saved[:n]):
            torch.cuda.set_rng_state(s.to(torch.uint8).cpu(), device=i)
