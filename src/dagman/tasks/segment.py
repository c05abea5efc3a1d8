"""Segmentation on a pretrained encoder (method notes section 9, item 3): MONAI ``SwinUNETR`` whose Swin encoder
(``swinViT``) is loaded strictly from the pretrained backbone and whose U-Net-style decoder starts random; the
whole network is fine-tuned (or the decoder only, ``freeze_encoder``) with Dice + cross-entropy on random ROI crops,
then evaluated by sliding-window inference with per-class Dice and HD95, and its predictions are written back in
the geometry of the source files.

Pipeline, in order (each step is one function here):

1. :func:`read_dataset` -- an MSD ``dataset.json`` or an ``image,label`` CSV -> :class:`SegDataset` (cases, paths
   checked to exist, declared labels).
2. :func:`prepare_case` -- deterministic preprocessing of one case, as pretraining saw CT: canonical RAS+
   (:func:`dagman.data.io.read_ct`), isotropic resampling (image: linear,
   :func:`~dagman.data.prepare.resample_isotropic`; label map: nearest neighbour onto the same grid), HU window
   to [0, 1] (:func:`~dagman.data.prepare.window_hu`). The result keeps the source geometry
   (:class:`SourceGeometry`) to write predictions back.
3. :class:`PatchSampler` -- random ROI crops, half of them centred on a foreground voxel (a present class chosen
   uniformly, then a voxel of it), half anywhere; random flips along each axis.
4. :func:`build_model` -- ``SwinUNETR`` with the encoder's architecture, ``swinViT.load_state_dict(strict=True)``.
5. :func:`train_model` -- AdamW, linear warm-up + cosine learning rate, Dice + cross-entropy (:func:`make_loss`:
   per-crop Dice with background, or batch Dice over the foreground), gradient clipping, bf16 autocast on CUDA
   (or everywhere with ``precision="bf16"``).
6. :func:`predict_volume` -- MONAI ``sliding_window_inference`` (ROI windows, overlap 0.5, Gaussian weights) ->
   class map on the isotropic grid; :func:`case_metrics` -> per-class Dice and HD95 (mm, at the resampled spacing).
7. :func:`to_source_labels` + :func:`write_label_map` -- class map -> label values on the source grid (nearest
   neighbour back from the isotropic grid, canonical reorientation undone) -> NIfTI with the source's shape and
   affine.

:func:`run_segmentation` runs 1-7 and writes ``OUT/metrics.json``, ``OUT/predictions/<name>.nii.gz`` and
``OUT/model.safetensors`` (:func:`save_model` / :func:`load_model`; :func:`predict_images` reuses it).

Arrays: ``(X, Y, Z)`` in canonical RAS+ voxel order unless said otherwise; networks see ``(B, 1, X, Y, Z)``.
Memory: the training cases are kept in memory as float16 images + uint8 class maps at the isotropic spacing.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from dagman.data.labels import read_label_map, resample_labels_nearest
from dagman.errors import DagmanError, DataError
from dagman.tasks.finetune import Tuner
from dagman.tasks.segdata import (LabelSpec, PatchSampler, PreparedCase, SegCase, SegDataset, SourceGeometry,
                                  _unique_names, case_order, check_label_values, check_labelled_case,
                                  image_header_shape, image_stem, label_spec, prepare_case, read_dataset)

__all__ = [
    "SegCase",
    "SegDataset",
    "LabelSpec",
    "SourceGeometry",
    "PreparedCase",
    "PatchSampler",
    "SegmentOptions",
    "SegmentResult",
    "ModelInfo",
    "TrainLog",
    "image_stem",
    "read_dataset",
    "label_spec",
    "check_label_values",
    "read_label_map",
    "image_header_shape",
    "check_labelled_case",
    "prepare_case",
    "roi_multiple",
    "check_roi",
    "build_model",
    "LOSSES",
    "PRECISIONS",
    "make_loss",
    "use_bf16",
    "train_model",
    "predict_volume",
    "case_metrics",
    "summarise",
    "to_source_labels",
    "write_label_map",
    "lesion_crop",
    "save_model",
    "load_model",
    "split_cases",
    "run_segmentation",
    "predict_images",
    "format_table",
    "summary_line",
]

MODEL_FORMAT = "dagman-segmentation-swinunetr"
FINE_TUNE_DROP_PATH = 0.0  # stochastic depth while fine-tuning (MONAI SwinUNETR's default)
OVERLAP = 0.5  # sliding-window overlap at inference
GRAD_CLIP = 1.0
DEFAULT_EPOCHS = 100


# ----------------------------------------------------------------------------------------------------------
# 4. Model
# ----------------------------------------------------------------------------------------------------------


def roi_multiple(cfg) -> int:
    """ROI edges must be multiples of this: patch size * 2**4 (SwinUNETR downsamples by 2**5 in all)."""
    return int(max(cfg.model.patch_size)) * 16


def check_roi(roi: int, cfg) -> int:
    """``roi`` if it is a multiple of :func:`roi_multiple` and at least twice it (the deepest SwinUNETR feature
    map needs more than one voxel while training); else a one-line DagmanError."""
    m = roi_multiple(cfg)
    if roi <= 0 or roi % m or roi < 2 * m:
        raise DagmanError(f"roi {roi} must be a multiple of {m} (patch size {m // 16} x 2**4) and at least {2 * m}",
                          option="roi")
    return int(roi)


def build_model(source, num_classes: int, freeze_encoder: bool = False) -> nn.Module:
    """MONAI ``SwinUNETR`` (``out_channels = num_classes``) with the architecture of ``source.cfg.model``
    (feature_size = embed_dim, depths, heads, window, patch size, merging, v2 blocks) and ``swinViT`` loaded
    from ``source.backbone`` with ``strict=True`` (random init when None); the decoder is random (seeded by
    the torch global generator). ``freeze_encoder``: the encoder's parameters do not train. Weights that do
    not fit raise a one-line DagmanError naming the encoder file."""
    from monai.networks.nets import SwinUNETR

    m = source.cfg.model
    if len(set(m.patch_size)) != 1:
        raise DagmanError(f"{source.path or 'encoder'}: SwinUNETR needs an isotropic patch size, got {m.patch_size}")
    net = SwinUNETR(
        in_channels=m.in_chans, out_channels=num_classes, patch_size=int(m.patch_size[0]), depths=tuple(m.depths),
        num_heads=tuple(m.num_heads), window_size=tuple(m.window_size), qkv_bias=m.qkv_bias, mlp_ratio=m.mlp_ratio,
        feature_size=m.embed_dim, drop_rate=m.drop_rate, attn_drop_rate=m.attn_drop_rate,
        dropout_path_rate=FINE_TUNE_DROP_PATH, normalize=True, patch_norm=m.patch_norm,
        use_checkpoint=m.use_checkpoint, spatial_dims=3, downsample=m.downsample, use_v2=m.use_v2,
    )
    if source.backbone is not None:
        try:
            net.swinViT.load_state_dict(source.backbone, strict=True)
        except RuntimeError as err:
            first = " ".join(str(err).strip().splitlines()[:2])[:300]
            raise DagmanError(f"{source.path}: encoder weights do not match the SwinUNETR encoder ({first})") from None
    if freeze_encoder:
        for p in net.swinViT.parameters():
            p.requires_grad_(False)
    return net


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    # 3D convolutions (and their backward) are several times faster channels-last on CPU (oneDNN) and with
    # cuDNN in bf16; MONAI's blocks accept either layout.
    # (``.to`` restrides even a one-channel tensor, which ``.contiguous`` would leave as it is)
    return x.to(memory_format=torch.channels_last_3d)


# ----------------------------------------------------------------------------------------------------------
# 5. Training
# ----------------------------------------------------------------------------------------------------------


@dataclass
class TrainLog:
    """``losses``: Dice-CE loss per step (NaN for a skipped non-finite step); ``skipped``: such steps;
    ``seconds``: wall time."""

    losses: list[float] = field(default_factory=list)
    skipped: int = 0
    seconds: float = 0.0


LOSSES = {
    "dicece": "DiceCE (softmax, one-hot; Dice per crop, background included)",
    "dicece-batch": "DiceCE (softmax, one-hot; Dice over the batch, foreground classes only)",
}
PRECISIONS = ("auto", "bf16", "fp32")


def make_loss(name: str) -> nn.Module:
    """The training loss :data:`LOSSES` names. ``dicece``: MONAI ``DiceCELoss`` as in MONAI's SwinUNETR recipes;
    ``dicece-batch``: the same with the Dice computed over the whole batch and the background class left out
    (a small foreground, such as a nodule, then carries the Dice term from the first steps)."""
    from monai.losses import DiceCELoss

    if name == "dicece":
        return DiceCELoss(to_onehot_y=True, softmax=True)
    if name == "dicece-batch":
        return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    raise DagmanError(f"loss {name}: unknown (choose from {', '.join(LOSSES)})", option="loss")


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast or not: ``auto`` = on CUDA only; ``bf16`` = on any device (CPUs with AMX / AVX512-BF16 run
    the convolutions and attention faster); ``fp32`` = never."""
    if precision not in PRECISIONS:
        raise DagmanError(f"precision {precision}: unknown (choose from {', '.join(PRECISIONS)})", option="precision")
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def train_model(model: nn.Module, sampler: PatchSampler, steps: int, batch_size: int = 2, lr: float = 1e-4,
                weight_decay: float = 1e-5, device: str | torch.device = "cpu", seed: int = 0,
                progress: bool = True, loss: str = "dicece", bf16: bool | None = None) -> TrainLog:
    """Fine-tune ``model`` for ``steps`` AdamW steps on crops from ``sampler`` (cases drawn epoch by epoch in
    random order, ``batch_size`` crops per step) with the :func:`make_loss` loss, through the shared
    :class:`~dagman.tasks.finetune.Tuner` (warm-up + cosine learning rate, the pretraining weight-decay rule,
    gradient-norm clipping at ``GRAD_CLIP``), bf16 autocast when ``bf16`` (None: on CUDA only); a non-finite
    loss skips its step. Crop randomness comes from ``seed``. Leaves the model in eval mode."""
    from tqdm import tqdm

    device = torch.device(device)
    bf16 = use_bf16("auto", device) if bf16 is None else bool(bf16)
    model.to(device).to(memory_format=torch.channels_last_3d).train()
    tuner = Tuner(model, lr, weight_decay, steps, GRAD_CLIP)
    loss_fn = make_loss(loss)
    rng = np.random.default_rng(seed)
    order = case_order(len(sampler), steps * batch_size, rng)
    log = TrainLog()
    t0 = time.time()
    bar = tqdm(range(steps), desc="fine-tune", unit="step", disable=None if progress else True, leave=False)
    for step in bar:
        x, y = sampler.batch(order[step * batch_size:(step + 1) * batch_size], rng)
        x, y = _channels_last(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        value_t = loss_fn(logits.float(), y)
        if not tuner.step(value_t):
            log.losses.append(float("nan"))
            continue
        value = float(value_t.detach())
        log.losses.append(value)
        bar.set_postfix(loss=f"{value:.4f}")
    bar.close()
    log.skipped = tuner.skipped
    log.seconds = time.time() - t0
    model.eval()
    return log


# ----------------------------------------------------------------------------------------------------------
# 6. Inference and metrics
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict_volume(model: nn.Module | Callable[[torch.Tensor], torch.Tensor], image: np.ndarray, roi: int,
                   device: str | torch.device = "cpu", sw_batch_size: int = 2, overlap: float = OVERLAP,
                   bf16: bool | None = None) -> np.ndarray:
    """Class map ``(X, Y, Z) uint8`` of an isotropic windowed image ``(X, Y, Z)`` by MONAI sliding-window
    inference with ``roi``-edged windows (``overlap``, Gaussian blending; volumes smaller than ``roi`` are
    padded) and argmax over the logits ``(1, C, X, Y, Z)`` of ``model``; bf16 autocast when ``bf16`` (None: on
    CUDA only)."""
    from monai.inferers import sliding_window_inference

    device = torch.device(device)
    bf16 = use_bf16("auto", device) if bf16 is None else bool(bf16)
    if isinstance(model, nn.Module):
        model.to(device).to(memory_format=torch.channels_last_3d).eval()

    def predictor(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return model(_channels_last(x)).float()

    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(device)
    logits = sliding_window_inference(x, (roi,) * 3, sw_batch_size, predictor, overlap=overlap, mode="gaussian")
    return logits.argmax(1)[0].to(torch.uint8).cpu().numpy()


def case_metrics(pred: np.ndarray, target: np.ndarray, num_classes: int, spacing: float) -> dict[int, dict]:
    """Per foreground class ``k``: ``{"dice": Dice of (pred == k) vs (target == k), "hd95_mm": HD95 in mm at
    ``spacing``}`` (:func:`~dagman.tasks.metrics.dice_score` / :func:`~dagman.tasks.metrics.hd95`; both masks
    empty -> Dice 1, HD95 0; one empty -> Dice 0, HD95 inf). ``pred``/``target``: class maps ``(X, Y, Z)``."""
    from dagman.tasks.metrics import dice_score, hd95

    out = {}
    for k in range(1, num_classes):
        p, t = pred == k, target == k
        out[k] = {"dice": dice_score(p, t), "hd95_mm": hd95(p, t, spacing)}
    return out


def summarise(per_case: Sequence[dict[int, dict]], num_classes: int) -> dict[int, dict]:
    """Per class over cases: Dice mean/std, HD95 mean/std over the cases where it is finite, and the count
    ``hd95_undefined`` of cases where exactly one mask was empty (HD95 inf)."""
    out = {}
    for k in range(1, num_classes):
        dice = np.array([c[k]["dice"] for c in per_case], dtype=np.float64)
        hd = np.array([c[k]["hd95_mm"] for c in per_case], dtype=np.float64)
        fin = hd[np.isfinite(hd)]
        out[k] = {
            "dice_mean": float(dice.mean()) if dice.size else float("nan"),
            "dice_std": float(dice.std()) if dice.size else float("nan"),
            "hd95_mm_mean": float(fin.mean()) if fin.size else float("nan"),
            "hd95_mm_std": float(fin.std()) if fin.size else float("nan"),
            "hd95_undefined": int(hd.size - fin.size),
            "n_cases": int(dice.size),
        }
    return out


# ----------------------------------------------------------------------------------------------------------
# 7. Back to the source geometry
# ----------------------------------------------------------------------------------------------------------


def to_source_labels(classes_iso: np.ndarray, geometry: SourceGeometry, spec: LabelSpec | None = None) -> np.ndarray:
    """Class map on the isotropic grid ``geometry.iso_shape`` -> label map in the source file's voxel order and
    shape ``geometry.source_shape``: nearest neighbour onto the canonical grid, then the canonical
    reorientation undone; class ``k`` becomes label value ``spec.values[k - 1]`` (classes kept when ``spec`` is
    None). dtype uint8 when the values fit, else uint16."""
    from nibabel.orientations import apply_orientation, ornt_transform

    if tuple(classes_iso.shape) != tuple(geometry.iso_shape):
        raise ValueError(f"prediction shape {classes_iso.shape} is not the isotropic grid {geometry.iso_shape}")
    canonical = resample_labels_nearest(np.ascontiguousarray(classes_iso), geometry.iso_affine,
                                        geometry.canonical_affine, geometry.canonical_shape, outside="edge")
    identity = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
    back = ornt_transform(identity, geometry.to_canonical)
    source = np.ascontiguousarray(apply_orientation(canonical, back))
    if spec is not None:
        values = np.array((0, *spec.values), dtype=np.uint16 if max(spec.values) > 255 else np.uint8)
        source = values[source]
    if tuple(source.shape) != tuple(geometry.source_shape):  # pragma: no cover - guarded by construction
        raise AssertionError(f"{source.shape} != {geometry.source_shape}")
    return source


def write_label_map(path: str | os.PathLike, labels: np.ndarray, geometry: SourceGeometry) -> Path:
    """Write a label map ``(X, Y, Z)`` in the source's voxel order as NIfTI (``.nii.gz``) with the source's
    affine, atomically. A NIfTI source's header is reused (same qform/sform and codes, so the affine on disk is
    identical), with the data type set to the labels' and no intensity scaling."""
    import nibabel as nib

    from dagman.fileio import atomic_write

    path = Path(path)
    if geometry.nifti_header is not None:
        header = geometry.nifti_header.copy()
        header.set_data_dtype(labels.dtype)
        header.set_slope_inter(1.0, 0.0)
        header["cal_min"], header["cal_max"] = 0, 0
        header["descrip"] = b"dagman segment prediction"
        if isinstance(header, nib.Nifti2Header):
            img = nib.Nifti2Image(labels, None, header=header)
        else:
            img = nib.Nifti1Image(labels, None, header=header)
    else:
        img = nib.Nifti1Image(labels, geometry.source_affine)
        img.header.set_xyzt_units("mm")
        img.set_qform(geometry.source_affine, code=1)
        img.set_sform(geometry.source_affine, code=1)
    data = img.to_bytes()
    if path.name.lower().endswith(".gz"):
        data = gzip.compress(data, compresslevel=6)
    atomic_write(path, lambda fh: fh.write(data))
    return path


# ----------------------------------------------------------------------------------------------------------
# Saved model
# ----------------------------------------------------------------------------------------------------------


def lesion_crop(image: str | os.PathLike, label: str | os.PathLike, out_image: str | os.PathLike,
                out_label: str | os.PathLike, size: int = 64, spacing: float = 1.0, value: int | None = None) -> dict:
    """A lesion-centred cube of a labelled CT, in the geometry of the semi-synthetic nodule set (``size``^3 voxels
    of ``spacing`` mm, RAS-aligned, centred on the lesion's centroid): the CT sampled trilinearly (-1024 HU beyond
    the field of view) and the lesion mask (``label == value``, or ``> 0``) sampled trilinearly and kept where
    >= 0.5, written as NIfTI (int16 HU, uint8 0/1). Lets a model trained on nodule crops be scored on real
    hand-drawn lesions. Returns ``{"voxels", "equivalent_diameter_mm", "inside_fraction"}`` (the share of the
    lesion's volume inside the cube). One-line DataError when the label map has no such voxel."""
    from dagman.data.io import read_ct
    from dagman.data.nodule_render import OUTSIDE_HU, crop_affine, sample_volume, write_nifti

    values, lab_affine, _ = read_label_map(label)
    mask = values > 0 if value is None else values == int(value)
    voxels = np.argwhere(mask)
    if voxels.size == 0:
        raise DataError(f"{label}: no lesion voxel ({'label > 0' if value is None else f'label == {value}'})")
    centre = (lab_affine @ np.append(voxels.mean(0), 1.0))[:3]
    affine = crop_affine(centre, int(size), float(spacing))
    vol = read_ct(image)
    hu = sample_volume(vol.array, vol.affine, affine, (size,) * 3, cval=OUTSIDE_HU)
    lesion = sample_volume(mask.astype(np.float32), lab_affine, affine, (size,) * 3, cval=0.0) >= 0.5
    write_nifti(out_image, np.clip(np.rint(hu), -32768, 32767).astype(np.int16), affine)
    write_nifti(out_label, lesion.astype(np.uint8), affine)
    volume_mm3 = float(mask.sum() * abs(np.linalg.det(lab_affine[:3, :3])))
    return {"voxels": int(lesion.sum()), "equivalent_diameter_mm": float((6.0 * volume_mm3 / np.pi) ** (1 / 3)),
            "inside_fraction": float(lesion.sum() * spacing ** 3 / volume_mm3)}


@dataclass
class ModelInfo:
    """What a saved segmentation model needs to predict: the encoder config (architecture, spacing, window),
    the label spec, the ROI and spacing it was trained with, the encoder description."""

    cfg: object
    spec: LabelSpec
    roi: int
    spacing: float
    hu_window: tuple[float, float]
    encoder: str


def save_model(path: str | os.PathLike, model: nn.Module, info: ModelInfo) -> Path:
    """Whole SwinUNETR state dict (MONAI key layout) + :class:`ModelInfo` as string metadata, to a
    ``.safetensors`` file, atomically."""
    from safetensors.torch import save

    from dagman.config import to_yaml
    from dagman.fileio import atomic_write

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    meta = {
        "format": MODEL_FORMAT,
        "config": to_yaml(info.cfg, comments=False),
        "label_values": json.dumps(list(info.spec.values)),
        "label_names": json.dumps(list(info.spec.names)),
        "label_allowed": json.dumps(list(info.spec.allowed)),
        "label_source": info.spec.source,
        "roi": str(info.roi),
        "spacing_mm": repr(float(info.spacing)),
        "hu_window": json.dumps([float(v) for v in info.hu_window]),
        "encoder": info.encoder,
    }
    data = save(tensors, metadata=meta)
    path = Path(path)
    atomic_write(path, lambda fh: fh.write(data))
    return path


def load_model(path: str | os.PathLike) -> tuple[nn.Module, ModelInfo]:
    """Rebuild a model saved by :func:`save_model` (strict load). One-line DagmanError for anything else."""
    import yaml
    from safetensors import safe_open
    from safetensors.torch import load_file

    from dagman.config import from_dict

    path = Path(path)
    if not path.is_file():
        raise DagmanError(f"{path}: no such segmentation model file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = dict(fh.metadata() or {})
        state = load_file(str(path), device="cpu")
    except Exception as err:  # noqa: BLE001
        raise DagmanError(f"{path}: not a safetensors file ({' '.join(str(err).split())[:100]})") from None
    if meta.get("format") != MODEL_FORMAT:
        raise DagmanError(f"{path}: not a dagman segmentation model (format {meta.get('format')!r}); "
                          "pass OUT/model.safetensors of an earlier `dagman segment` run")
    try:
        cfg = from_dict(yaml.safe_load(meta["config"]))
        spec = LabelSpec(values=tuple(json.loads(meta["label_values"])), names=tuple(json.loads(meta["label_names"])),
                         allowed=tuple(json.loads(meta["label_allowed"])), source=meta.get("label_source", ""))
        info = ModelInfo(cfg=cfg, spec=spec, roi=int(meta["roi"]), spacing=float(meta["spacing_mm"]),
                         hu_window=tuple(json.loads(meta["hu_window"])), encoder=meta.get("encoder", ""))
    except Exception as err:  # noqa: BLE001
        raise DagmanError(f"{path}: damaged model metadata ({type(err).__name__}: {err})") from None

    from dagman.tasks.encoder import EncoderSource

    arch = EncoderSource(cfg=cfg, backbone=None, sa=None, kind="none", path=path, method=None, step=None)
    model = build_model(arch, spec.num_classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise DagmanError(f"{path}: weights do not match the stored architecture "
                          f"({str(err).strip().splitlines()[0]})") from None
    return model.eval(), info


# ----------------------------------------------------------------------------------------------------------
# The whole task
# ----------------------------------------------------------------------------------------------------------


@dataclass
class SegmentOptions:
    """Settings of :func:`run_segmentation` (CLI flags of ``dagman segment``). ``steps`` wins over ``epochs``
    (an epoch = one crop of every training case, ``ceil(cases / batch_size)`` steps); ``spacing`` None = the
    encoder's ``data.spacing_mm``; ``eval_train`` also scores the training cases (a sanity check, reported as
    such)."""

    data: Path
    checkpoint: str | None
    out: Path
    size: str = "tiny"
    fraction: float = 1.0
    val_fraction: float = 0.2
    epochs: int | None = None
    steps: int | None = None
    lr: float = 1e-4
    weight_decay: float = 1e-5
    batch_size: int = 2
    roi: int = 64
    spacing: float | None = None
    labels: str | None = None
    num_classes: int | None = None
    predict: tuple[Path, ...] = ()
    freeze_encoder: bool = False
    eval_train: bool = False
    seed: int = 0
    device: str | None = None
    progress: bool = True
    loss: str = "dicece"
    precision: str = "auto"


@dataclass
class SegmentResult:
    """``metrics``: the ``metrics.json`` dict; ``metrics_path``, ``model_path``; ``predictions``: written files."""

    metrics: dict
    metrics_path: Path
    model_path: Path | None
    predictions: list[Path]


SPLIT_TITLES = {"held_out": "held-out", "test": "test", "train": "training (sanity check)"}


def _check_fraction(name: str, value: float, low_open: bool) -> None:
    ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value < 1.0)
    if not ok:
        rng = "(0, 1]" if low_open else "[0, 1)"
        raise DagmanError(f"{name} {value}: must be in {rng}")


def split_cases(n: int, val_fraction: float, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of ``n`` case indices into ``(train, held_out)``: ``round(val_fraction * n)`` cases held out
    (at least 1 when ``val_fraction > 0`` and ``n >= 2``, always leaving one to train on), then ``fraction`` of
    the rest kept for training (at least 1). Both lists sorted."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_val = 0
    if val_fraction > 0 and n >= 2:
        n_val = min(n - 1, max(1, int(round(val_fraction * n))))
    held, pool = perm[:n_val], perm[n_val:]
    n_train = max(1, int(round(fraction * len(pool))))
    train = rng.permutation(pool)[:n_train]
    return sorted(int(i) for i in train), sorted(int(i) for i in held)


def _device(name: str | None) -> torch.device:
    if name:
        try:
            return torch.device(name)
        except RuntimeError as err:
            raise DagmanError(f"device {name}: {err}", option="device") from None
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _json_case(name: str, image: Path, pred: Path | None, metrics: dict[int, dict]) -> dict:
    return {
        "name": name,
        "image": str(image),
        "prediction": str(pred) if pred else None,
        "per_class": {str(k): {"dice": m["dice"], "hd95_mm": _finite_or_none(m["hd95_mm"])}
                      for k, m in metrics.items()},
    }


def _json_summary(summary: dict[int, dict]) -> dict:
    return {str(k): {kk: (_finite_or_none(v) if isinstance(v, float) else v) for kk, v in s.items()}
            for k, s in summary.items()}


def _progress(items, desc: str, progress: bool):
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="case", disable=None if progress else True, leave=False)


def run_segmentation(opts: SegmentOptions, log: Callable[[str], None] = print) -> SegmentResult:
    """The whole task (module docstring): list, split, prepare, build, train, evaluate, predict, write
    ``OUT/metrics.json``, ``OUT/predictions/*.nii.gz`` and ``OUT/model.safetensors``. Input problems raise
    one-line DagmanErrors before any training starts. ``log`` receives short progress notes."""
    from dagman.tasks.encoder import open_encoder

    _check_fraction("--fraction", opts.fraction, low_open=True)
    _check_fraction("--val-fraction", opts.val_fraction, low_open=False)
    if opts.batch_size < 1:
        raise DagmanError(f"batch_size {opts.batch_size}: must be >= 1", option="batch_size")
    if (opts.steps is not None and opts.steps < 1) or (opts.epochs is not None and opts.epochs < 1):
        raise DagmanError("steps (or epochs) must be >= 1", option="steps")
    if not opts.lr > 0:
        raise DagmanError(f"lr {opts.lr}: must be > 0", option="lr")
    for p in opts.predict:
        if not Path(p).exists():
            raise DagmanError(f"predict {p}: no such file or folder", option="predict")
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise DagmanError(f"out {out}: exists and is not a folder", option="out")
    dataset = read_dataset(opts.data)
    source = open_encoder(opts.checkpoint, size=opts.size)
    cfg = source.cfg
    roi = check_roi(opts.roi, cfg)
    spacing = float(opts.spacing if opts.spacing is not None else cfg.data.spacing_mm)
    if not spacing > 0:
        raise DagmanError(f"spacing {opts.spacing}: must be > 0 mm", option="spacing")
    hu_window = tuple(float(v) for v in cfg.data.hu_window)
    spec = None
    if dataset.declared is not None or opts.labels is not None or opts.num_classes is not None:
        spec = label_spec(dataset.declared, opts.labels, opts.num_classes, source=dataset.path.name)
    device = _device(opts.device)
    make_loss(opts.loss)  # unknown names fail before any loading
    bf16 = use_bf16(opts.precision, device)

    train_idx, held_idx = split_cases(len(dataset.training), opts.val_fraction, opts.fraction, opts.seed)
    train_cases = [dataset.training[i] for i in train_idx]
    held_cases = [dataset.training[i] for i in held_idx]

    # build first (provisional class count when the labels are still to be inferred): an encoder that does not
    # fit fails before the slow data loading
    torch.manual_seed(opts.seed)
    model = build_model(source, spec.num_classes if spec else 2, freeze_encoder=opts.freeze_encoder)
    prepared: list[PreparedCase] = []
    for case in _progress(train_cases, "load training cases", opts.progress):
        pc = prepare_case(case.image, case.label, spacing, hu_window, name=case.name, origin=case.origin)
        if spec is not None:
            pc.to_classes(spec)
        prepared.append(pc)
    if spec is None:
        observed = sorted({int(v) for pc in prepared for v in np.unique(pc.labels)})
        spec = label_spec(None, observed=observed, source=dataset.path.name)
        for pc in prepared:
            pc.to_classes(spec)
        if spec.num_classes != 2:
            torch.manual_seed(opts.seed)
            model = build_model(source, spec.num_classes, freeze_encoder=opts.freeze_encoder)

    for case in _progress(held_cases + dataset.test, "check evaluation cases", opts.progress):
        check_labelled_case(case, spec)  # fail now, not after training

    steps_per_epoch = math.ceil(len(prepared) / opts.batch_size)
    steps = opts.steps if opts.steps is not None else (opts.epochs or DEFAULT_EPOCHS) * steps_per_epoch
    log(f"segment: {len(prepared)} training case(s), {len(held_cases)} held out, {len(dataset.test)} test; "
        f"{spec.num_classes - 1} class(es); encoder {source.description}; {steps} steps on {device.type}")
    if dataset.unlabelled:
        log(f"segment: {len(dataset.unlabelled)} unlabelled test image(s) in {dataset.path.name} not used "
            "(pass them with --predict)")
    out.mkdir(parents=True, exist_ok=True)
    sampler = PatchSampler(prepared, roi, seed=opts.seed + 1)
    if not opts.eval_train:
        prepared = []  # the sampler holds its own (float16) copies
    train_log = train_model(model, sampler, steps, batch_size=opts.batch_size, lr=opts.lr,
                            weight_decay=opts.weight_decay, device=device, seed=opts.seed + 2,
                            progress=opts.progress, loss=opts.loss, bf16=bf16)
    info = ModelInfo(cfg=cfg, spec=spec, roi=roi, spacing=spacing, hu_window=hu_window, encoder=source.description)
    model_path = save_model(out / "model.safetensors", model, info)

    pred_dir = out / "predictions"
    written: list[Path] = []
    splits: dict[str, dict] = {}
    to_eval: list[tuple[str, list[SegCase]]] = [("held_out", held_cases), ("test", dataset.test)]
    if opts.eval_train:
        to_eval.append(("train", train_cases))
    for split, cases in to_eval:
        if not cases:
            continue
        rows, per_case = [], []
        for case in _progress(cases, f"evaluate {SPLIT_TITLES[split]}", opts.progress):
            pc = next((p for p in prepared if p.name == case.name), None) if split == "train" else None
            if pc is None:
                pc = prepare_case(case.image, case.label, spacing, hu_window, name=case.name, origin=case.origin)
                pc.to_classes(spec)
            pred = predict_volume(model, pc.image, roi, device=device, sw_batch_size=opts.batch_size, bf16=bf16)
            metrics = case_metrics(pred, pc.labels, spec.num_classes, spacing)
            pred_path = None
            if split != "train":
                pred_path = write_label_map(pred_dir / f"{case.name}.nii.gz", to_source_labels(pred, pc.geometry, spec),
                                            pc.geometry)
                written.append(pred_path)
            per_case.append(metrics)
            rows.append(_json_case(case.name, case.image, pred_path, metrics))
        splits[split] = {"title": SPLIT_TITLES[split], "n_cases": len(cases), "cases": rows,
                         "summary": _json_summary(summarise(per_case, spec.num_classes))}
    predicted = []
    if opts.predict:
        predicted = _predict_paths(model, info, opts.predict, pred_dir, device, opts.batch_size, opts.progress,
                                   taken={p.name for p in written})
        written += [p for _, p in predicted]

    metrics = {
        "task": "segment",
        "encoder": {"description": source.description, "kind": source.kind, "method": source.method,
                    "path": str(source.path) if source.path else None, "step": source.step},
        "classes": {str(k): {"value": v, "name": n} for k, (v, n) in enumerate(zip(spec.values, spec.names), 1)},
        "labels_from": spec.source,
        "settings": {
            "data": str(dataset.path), "checkpoint": opts.checkpoint, "size": cfg.size, "fraction": opts.fraction,
            "val_fraction": opts.val_fraction, "seed": opts.seed, "steps": steps, "epochs": opts.epochs,
            "batch_size": opts.batch_size, "lr": opts.lr, "weight_decay": opts.weight_decay, "roi": roi,
            "spacing_mm": spacing, "hu_window": list(hu_window), "freeze_encoder": opts.freeze_encoder,
            "device": device.type, "precision": "bf16 autocast" if bf16 else "fp32",
            "overlap": OVERLAP, "loss": opts.loss, "loss_definition": LOSSES[opts.loss],
            "optimizer": "AdamW, warm-up + cosine",
            "steps_per_epoch": steps_per_epoch,
            "train_cases": [c.name for c in train_cases], "held_out_cases": [c.name for c in held_cases],
            "unlabelled_test_images": len(dataset.unlabelled),
        },
        "training": {"steps": steps, "first_loss": _finite_or_none(train_log.losses[0]) if train_log.losses else None,
                     "last_loss": _finite_or_none(train_log.losses[-1]) if train_log.losses else None,
                     "skipped_steps": train_log.skipped, "seconds": round(train_log.seconds, 2)},
        "splits": splits,
        "predictions": [str(p) for p in written],
        "model": str(model_path),
    }
    metrics_path = out / "metrics.json"
    from dagman.fileio import atomic_write

    atomic_write(metrics_path, lambda fh: json.dump(metrics, fh, indent=2), text=True)
    return SegmentResult(metrics=metrics, metrics_path=metrics_path, model_path=model_path, predictions=written)


def _predict_paths(model, info: ModelInfo, images: Sequence[Path], pred_dir: Path, device, sw_batch_size: int,
                   progress: bool, taken: set[str] | None = None) -> list[tuple[Path, Path]]:
    taken = {n.removesuffix(".nii.gz") for n in (taken or set())}
    names = _unique_names([image_stem(p) for p in images], taken)
    out = []
    for image, name in zip(_progress(list(images), "predict", progress), names):
        pc = prepare_case(image, None, info.spacing, info.hu_window, name=name)
        pred = predict_volume(model, pc.image, info.roi, device=device, sw_batch_size=sw_batch_size)
        path = write_label_map(pred_dir / f"{name}.nii.gz", to_source_labels(pred, pc.geometry, info.spec), pc.geometry)
        out.append((Path(image), path))
    return out


def predict_images(model_path: str | os.PathLike, images: Sequence[str | os.PathLike], out: str | os.PathLike,
                   device: str | None = None, batch_size: int = 2, progress: bool = True) -> list[tuple[Path, Path]]:
    """Predict label maps for ``images`` with a model saved by :func:`run_segmentation`
    (``OUT/model.safetensors``) -> ``OUT/predictions/<name>.nii.gz`` in each image's source geometry. Returns
    ``[(image, prediction path)]``."""
    for p in images:
        if not Path(p).exists():
            raise DagmanError(f"predict {p}: no such file or folder", option="predict")
    model, info = load_model(model_path)
    dev = _device(device)
    return _predict_paths(model, info, [Path(p) for p in images], Path(out) / "predictions", dev, batch_size, progress)


def format_table(metrics: dict) -> str:
    """The evaluation of ``metrics.json`` as a text table: one row per case and class, then mean ± std per
    class (HD95 over the cases where it is defined)."""
    classes = metrics["classes"]

    def cname(k: str) -> str:
        c = classes[k]
        head = k if c["value"] == int(k) else f"{k} (value {c['value']})"
        return f"{head} {c['name']}".strip()

    def num(v, fmt: str) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    lines = [f"{'split':<24} {'case':<22} {'class':<16} {'Dice':<15} HD95 mm"]
    for s in metrics["splits"].values():
        for row in s["cases"]:
            for k, m in row["per_class"].items():
                hd = "inf" if m["hd95_mm"] is None else num(m["hd95_mm"], ".2f")
                lines.append(f"{s['title']:<24} {row['name'][:22]:<22} {cname(k)[:16]:<16} {m['dice']:<15.3f} "
                             f"{hd}")
        for k, m in s["summary"].items():
            dice = f"{num(m['dice_mean'], '.3f')} ± {num(m['dice_std'], '.3f')}"
            hd = f"{num(m['hd95_mm_mean'], '.2f')} ± {num(m['hd95_mm_std'], '.2f')}"
            undefined = m["hd95_undefined"]
            note = f"  ({undefined} case(s) with one empty mask: HD95 undefined)" if undefined else ""
            lines.append(f"{s['title']:<24} {'mean ± std (' + str(s['n_cases']) + ')':<22} {cname(k)[:16]:<16} "
                         f"{dice:<15} {hd:<15}{note}".rstrip())
    return "\n".join(lines) if metrics["splits"] else ""


def summary_line(result: SegmentResult) -> str:
    """``dagman segment: mean Dice 0.83 (class 1 tumour) on 2 held-out cases -> OUT/metrics.json``."""
    m = result.metrics
    split = next((s for s in ("held_out", "test", "train") if s in m["splits"]), None)
    if split is None:
        return (f"dagman segment: trained {m['training']['steps']} steps, no labelled case to evaluate "
                f"(use --val-fraction > 0 or --eval-train); model -> {result.model_path}")
    s = m["splits"][split]
    summ = s["summary"]
    dice = [v["dice_mean"] for v in summ.values() if v["dice_mean"] is not None]
    mean = float(np.mean(dice)) if dice else float("nan")
    classes = m["classes"]
    if len(summ) == 1:
        k = next(iter(summ))
        detail = f"class {k} {classes[k]['name']}".strip()
    else:
        detail = ", ".join(f"{k} {classes[k]['name']} {summ[k]['dice_mean']:.2f}".replace("  ", " ") for k in summ)
    n = s["n_cases"]
    what = {"held_out": "held-out", "test": "test", "train": "training"}[split]
    tail = " (sanity check on training data)" if split == "train" else ""
    return (f"dagman segment: mean Dice {mean:.2f} ({detail}) on {n} {what} case{'s' if n != 1 else ''}{tail} "
            f"-> {result.metrics_path}")
