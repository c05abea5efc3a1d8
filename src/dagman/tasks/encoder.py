"""Pretrained encoders for the downstream tasks: open any weight source, build a feature extractor, and
turn CT images into network inputs the same way pretraining saw them.

Sources (:func:`open_encoder`):

* a run folder or a checkpoint ``.pt`` written by ``dagman pretrain`` -> the teacher's backbone (the
  exported encoder) and, when the run has one, the teacher's semantic-attention block;
* an encoder ``.safetensors`` file (``encoder.safetensors`` of a run, or ``dagman export``) -> the backbone;
  the architecture comes from the config stored in its metadata, else from ``size``;
* ``"none"`` (or None) -> a randomly initialised backbone of preset ``size`` (the random-init baseline).

Anything else is a one-line :class:`~dagman.errors.DagmanError` ("unknown checkpoint format").

Image-level features (:class:`TaskEncoder`): the SA block's [CLS] token when the source has an SA block,
else the mean over the last stage's tokens (layer-normalised, as MONAI's ``normalize=True``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from dagman.errors import DagmanError

NONE_WORDS = ("none", "random", "")


@dataclass
class EncoderSource:
    """Weights and architecture of a downstream encoder.

    ``cfg``: the :class:`~dagman.config.Config` that built it (model, sa, data spacing/window); ``backbone``:
    MONAI-layout backbone state dict, None for random init; ``sa``: the SA block's state dict or None;
    ``kind``: ``"run" | "encoder" | "none"``; ``description``: one phrase for logs and reports."""

    cfg: object
    backbone: dict | None
    sa: dict | None
    kind: str
    path: Path | None
    method: str | None
    step: int | None

    @property
    def description(self) -> str:
        if self.kind == "none":
            return f"random init ({self.cfg.size} architecture)"
        what = f"{self.method or 'unknown method'}"
        if self.step is not None and self.step >= 0:
            what += f", step {self.step}"
        return f"{what} ({self.path})"

    @property
    def label(self) -> str:
        """Short name for tables: the method, or ``random``."""
        return "random" if self.kind == "none" else (self.method or "pretrained")


def open_encoder(checkpoint: str | Path | None, size: str = "tiny") -> EncoderSource:
    """Open a downstream encoder source (see the module docstring). ``size``: the preset of a random-init
    encoder, and of an encoder file that carries no config. One-line DagmanError on any problem."""
    from dagman.config import load_config

    if checkpoint is None or str(checkpoint).strip().lower() in NONE_WORDS:
        cfg = load_config(size=size, method="smit")
        return EncoderSource(cfg=cfg, backbone=None, sa=None, kind="none", path=None, method=None, step=None)
    path = Path(checkpoint)
    if not path.exists():
        raise DagmanError(f"{path}: no such checkpoint (pass a run folder, a checkpoint .pt, an encoder "
                          ".safetensors, or 'none' for random init)")
    if path.suffix == ".safetensors":
        return _open_encoder_file(path, size)
    if path.is_dir() or path.suffix in (".pt", ".pth", ".ckpt"):
        from dagman.train.runs import load_pretrained

        try:
            pre = load_pretrained(path)
        except DagmanError as err:
            if not path.is_file():
                raise
            try:  # a plain {name: tensor} backbone state dict saved with torch.save
                return _open_flat_state(path, size)
            except DagmanError:
                reason = str(err).split(": ", 1)[-1]
                raise DagmanError(f"{path}: unknown checkpoint format ({reason})") from None
        from dagman.train.checkpoint import BACKBONE_PREFIXES, sub_state

        teacher = pre.state["teacher"]
        backbone = sub_state(teacher, BACKBONE_PREFIXES["teacher"])
        sa = sub_state(teacher, "sa.") if pre.cfg.sa.enabled else None
        return EncoderSource(cfg=pre.cfg, backbone=backbone, sa=sa or None, kind="run", path=pre.path,
                             method=pre.cfg.method, step=pre.step)
    raise DagmanError(f"{path}: unknown checkpoint format '{path.suffix or path.name}' (expected a run folder, "
                      "a dagman checkpoint .pt, an encoder .safetensors, or 'none')")


def _open_encoder_file(path: Path, size: str) -> EncoderSource:
    import yaml

    from dagman.config import from_dict, load_config
    from dagman.train.checkpoint import load_encoder, read_encoder_metadata

    state = load_encoder(path)
    meta = read_encoder_metadata(path)
    if meta.get("config"):
        try:
            cfg = from_dict(yaml.safe_load(meta["config"]))
        except Exception as err:  # noqa: BLE001 - a foreign or damaged config: one line
            raise DagmanError(f"{path}: the config stored in the encoder file is not valid ({err})") from None
    else:
        cfg = load_config(size=size, method="smit")
    step = meta.get("step")
    return EncoderSource(cfg=cfg, backbone=state, sa=None, kind="encoder", path=path,
                         method=meta.get("method"), step=int(step) if step and step.isdigit() else None)


def _open_flat_state(path: Path, size: str) -> EncoderSource:
    from dagman.config import load_config
    from dagman.train.checkpoint import load_encoder

    state = load_encoder(path)
    return EncoderSource(cfg=load_config(size=size, method="smit"), backbone=state, sa=None, kind="encoder",
                         path=path, method=None, step=None)


class TaskEncoder(nn.Module):
    """Backbone (+ SA block) -> one feature vector per image.

    ``forward(x (B, 1, D, H, W))`` -> ``(B, feature_dim)``: the mean of the last stage's layer-normalised tokens
    (default, for every encoder), or the SA [CLS] token when ``use_sa`` (encoders pretrained with an SA block).
    The default was chosen on validation data (docs/RESULTS.md, "Which feature downstream: the mean tokens or the
    SA [CLS] token"): on a DAGMaN encoder the mean tokens beat its SA [CLS] token on the organ probe and on the
    nodule training pool, linear probe and fine-tuning alike. ``feature_source`` says which, in words."""

    def __init__(self, source: EncoderSource, use_sa: bool = False) -> None:
        super().__init__()
        from dataclasses import asdict

        from dagman.models.semantic_attention import SemanticAttention
        from dagman.models.swin import build_backbone

        cfg = source.cfg
        self.source = source
        self.backbone = build_backbone(**asdict(cfg.model))
        if source.backbone is not None:
            try:
                self.backbone.load_state_dict(source.backbone, strict=True)
            except RuntimeError as err:
                first = str(err).strip().splitlines()[0]
                raise DagmanError(f"{source.path}: encoder weights do not match the architecture ({first})") from None
        if use_sa and source.sa is None:
            raise DagmanError(f"{source.path or 'random init'}: no semantic-attention block in this encoder")
        self.sa = None
        self.sa_stage = cfg.sa.stage
        widths = self.backbone.stage_widths
        if use_sa:
            self.sa = SemanticAttention.from_config(cfg.sa, widths[cfg.sa.stage])
            self.sa.load_state_dict(source.sa, strict=True)
            self.feature_dim = widths[cfg.sa.stage]
            self.feature_source = f"SA [CLS] token (stage {cfg.sa.stage})"
        else:
            self.feature_dim = widths[-1]
            self.feature_source = "mean of the last stage's tokens"

    @property
    def input_multiple(self) -> int:
        """Input edges must be multiples of this (patch size * 2**4)."""
        return max(p * 16 for p in self.source.cfg.model.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone.forward_features(x)
        if self.sa is not None:
            return self.sa(feats.tokens[self.sa_stage]).cls
        return feats.tokens[-1].mean(1)


def build_task_encoder(checkpoint: str | Path | None, size: str = "tiny", use_sa: bool = False) -> TaskEncoder:
    """:func:`open_encoder` + :class:`TaskEncoder` in one call."""
    return TaskEncoder(open_encoder(checkpoint, size=size), use_sa=use_sa)


# ----------------------------------------------------------------------------------------------------------
# Images -> network inputs
# ----------------------------------------------------------------------------------------------------------


def fit_to_size(array: np.ndarray, size: Sequence[int], center: Sequence[float] | None = None,
                pad_value: float = 0.0) -> np.ndarray:
    """Crop/pad a 3D array to ``size`` around ``center`` (voxel coordinates; default: the array's centre).
    Padding uses ``pad_value`` (0 = air after windowing)."""
    out = np.full(tuple(size), pad_value, dtype=array.dtype)
    center = [(n - 1) / 2.0 for n in array.shape] if center is None else center
    src, dst = [], []
    for n, s, c in zip(array.shape, size, center):
        start = int(math.floor(c - (s - 1) / 2.0))
        lo, hi = max(start, 0), min(start + s, n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    out[tuple(dst)] = array[tuple(src)]
    return out


def image_to_input(image, spacing: float, hu_window: tuple[float, float], size: int | Sequence[int],
                   center_mm: Sequence[float] | None = None) -> np.ndarray:
    """A CT (path, :class:`~dagman.data.io.CTVolume`) -> float32 ``(D, H, W)`` network input: canonical RAS,
    resampled to isotropic ``spacing`` mm, HU windowed to [0, 1], centre-cropped/padded to ``size``
    (around the world point ``center_mm`` when given)."""
    from dagman.data.io import CTVolume, read_ct
    from dagman.data.prepare import resample_isotropic, window_hu

    vol = image if isinstance(image, CTVolume) else read_ct(image)
    hu, affine = resample_isotropic(vol.array.astype(np.float32), vol.affine, spacing)
    size = (size,) * 3 if isinstance(size, int) else tuple(size)
    center = None
    if center_mm is not None:
        center = (np.linalg.inv(affine) @ np.r_[np.asarray(center_mm, float), 1.0])[:3]
    x = window_hu(hu, hu_window).astype(np.float32)
    return fit_to_size(x, size, center)


def default_input_size(encoder: TaskEncoder, requested: int | None, default_mm: float = 64.0) -> int:
    """``requested`` checked to be a multiple of ``encoder.input_multiple``, else the smallest multiple that
    covers ``default_mm`` at the encoder's spacing."""
    m = encoder.input_multiple
    if requested is not None:
        if requested < m or requested % m:
            raise DagmanError(f"crop_size {requested} must be a positive multiple of {m} (patch size * 2**4)",
                              option="crop_size")
        return requested
    spacing = encoder.source.cfg.data.spacing_mm
    return max(m, int(math.ceil(default_mm / spacing / m)) * m)


@torch.no_grad()
def extract_features(encoder: TaskEncoder, inputs: Iterable[np.ndarray] | np.ndarray, batch_size: int = 8,
                     device: str | torch.device | None = None, progress: bool = True,
                     desc: str = "features") -> np.ndarray:
    """Features ``(N, feature_dim)`` float32 of ``inputs`` (each ``(D, H, W)``, same shape), in eval mode,
    batch by batch, under bf16 autocast on CUDA."""
    from tqdm import tqdm

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    encoder = encoder.to(device).eval()
    items = list(inputs)
    out = []
    bar = tqdm(total=len(items), desc=desc, unit="img", disable=None if progress else True, leave=False)
    for i in range(0, len(items), batch_size):
        x = torch.from_numpy(np.stack(items[i:i + batch_size])[:, None]).float().to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            f = encoder(x)
        out.append(f.float().cpu().numpy())
        bar.update(len(x))
    bar.close()
    if not out:
        return np.zeros((0, encoder.feature_dim), np.float32)
    return np.concatenate(out)
