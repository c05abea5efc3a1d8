"""The typed configuration tree of a pretraining run, its presets, YAML I/O and ``key=value`` overrides.

A :class:`Config` is a tree of frozen dataclasses, one per concern::

    Config(method, size,                   names of the presets it started from
           model: ModelConfig,             3D Swin backbone = keyword arguments of MONAI's SwinTransformer
           sa:    SAConfig,                semantic-attention block ([CLS] class attention at one stage)
           data:  DataConfig,              spacing, HU window, crops, augmentation, loader
           mask:  MaskConfig,              student masks, teacher patch drop, blockwise (iBOT) masks
           heads: HeadsConfig,             DINO/iBOT projection heads and prototypes
           loss:  LossConfig,              which losses, weights, temperatures, centring
           optim: OptimConfig,             AdamW, lr / weight-decay schedules, clipping
           ema:   EMAConfig,               teacher momentum schedule, teacher drop path
           train: TrainConfig)             length, precision, seed, logging / checkpoint intervals

The dataclass defaults are exactly the defaults of the method specification (DAGMaN, MIDL 2025):
size ``paper`` x method ``dagman``. Every field carries a one-line help text with its unit
(``dataclasses.fields(...)[i].metadata["help"]``); :func:`to_yaml` writes it as a comment.

``model`` holds exactly keyword names of ``monai.networks.nets.swin_unetr.SwinTransformer`` so that
``SwinTransformer(spatial_dims=3, **dataclasses.asdict(cfg.model))`` builds the backbone (the student's;
the teacher uses ``ema.teacher_drop_path_rate`` instead of ``model.drop_path_rate``).

Presets: two independent axes, composed as ``defaults <- size preset <- method preset``
(:mod:`dagman.config_presets`, with the tables of what each preset sets).

Epochs and steps. Every duration in the config is in epochs (floats allowed) except the logging /
checkpoint intervals (optimiser steps). :func:`plan_steps` turns epochs into optimiser steps:
``global_batch = data.batch_size * world_size``; ``steps_per_epoch = train.steps_per_epoch`` if set, else
``train.total_steps / train.epochs`` if ``train.total_steps`` is set (the whole schedule is compressed or
stretched to that many steps, warm-ups keep their fraction), else
``max(1, n_volumes * samples_per_volume // global_batch)`` (last partial batch dropped), where
``samples_per_volume`` (:func:`samples_per_volume`) is ``data.samples_per_volume`` if set, else 1 pair of
views per volume per epoch, raised to ``ceil(global_batch / n_volumes)`` when the cache holds fewer
volumes than one global batch (one CT is enough to train on; the epoch stays a function of the cache size
and the global batch only, so the step plan is the same after a resume on another number of processes);
``total_steps = train.total_steps`` if set, else ``round(train.epochs * steps_per_epoch)``. The peak learning rate is
``optim.lr * global_batch / optim.lr_reference_batch`` (when ``optim.scale_lr``).

Loading: :func:`load_config` = presets, then an optional (partial, nested) YAML file, then ``key=value``
overrides with dotted keys (``optim.lr=1e-3``, ``model.depths=[2,2,2,2]``, ``mask.student=random``),
values read as YAML. Every problem is a one-line :class:`~dagman.errors.ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import yaml

from dagman.errors import ConfigError

__all__ = [
    "Config",
    "ModelConfig",
    "SAConfig",
    "DataConfig",
    "MaskConfig",
    "HeadsConfig",
    "LossConfig",
    "OptimConfig",
    "EMAConfig",
    "TrainConfig",
    "StepPlan",
    "SIZES",
    "METHODS",
    "SIZE_PRESETS",
    "METHOD_PRESETS",
    "NUM_STAGES",
    "load_config",
    "override_config",
    "preset_config",
    "from_dict",
    "to_dict",
    "to_yaml",
    "save_config",
    "validate",
    "config_keys",
    "parse_override",
    "stage_width",
    "token_size",
    "plan_steps",
    "samples_per_volume",
]

#: MONAI's SwinTransformer always builds four stages (layers1..layers4).
NUM_STAGES = 4

StudentMask = Literal["attention_hint", "attention_high", "attention_low", "random", "blockwise"]
ATTENTION_MASKS = ("attention_hint", "attention_high", "attention_low")


def _opt(default: Any, help: str) -> Any:
    """A dataclass field with a default and a one-line help text (what it is, its unit)."""
    return field(default=default, metadata={"help": help})


# ----------------------------------------------------------------------------------------------------------
# The tree
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """3D Swin backbone: exactly keyword arguments of ``monai.networks.nets.swin_unetr.SwinTransformer``
    (``spatial_dims`` is fixed at 3, ``norm_layer`` at LayerNorm). Stage i (0-based) has width
    ``embed_dim * 2**i``; the output after the i-th merging (1-based) has width ``embed_dim * 2**i`` and
    tokens of ``patch_size * 2**i`` voxels."""

    in_chans: int = _opt(1, "input channels (1 for CT)")
    embed_dim: int = _opt(48, "patch-embedding width (channels); stage widths are embed_dim*2**i")
    window_size: tuple[int, int, int] = _opt((4, 4, 4), "attention window per axis (tokens)")
    patch_size: tuple[int, int, int] = _opt((2, 2, 2), "patch-embedding size per axis (voxels)")
    depths: tuple[int, int, int, int] = _opt((2, 2, 8, 2), "Swin blocks per stage (4 stages)")
    num_heads: tuple[int, int, int, int] = _opt((4, 4, 8, 16), "attention heads per stage (must divide the width)")
    mlp_ratio: float = _opt(4.0, "MLP hidden width / block width (ratio)")
    qkv_bias: bool = _opt(True, "learnable bias on query/key/value projections")
    drop_rate: float = _opt(0.0, "dropout probability after embeddings and in MLPs")
    attn_drop_rate: float = _opt(0.0, "dropout probability on attention weights")
    drop_path_rate: float = _opt(0.1, "student stochastic-depth rate, linearly increasing over blocks (prob.)")
    patch_norm: bool = _opt(False, "LayerNorm after patch embedding (keep false: SwinUNETR.swinViT has none)")
    use_checkpoint: bool = _opt(False, "activation checkpointing in Swin blocks (less memory, ~30% slower)")
    downsample: Literal["merging", "mergingv2"] = _opt("merging", "patch-merging module (MONAI name)")
    use_v2: bool = _opt(False, "SwinUNETR-v2 residual conv block at the start of each stage")


@dataclass(frozen=True)
class SAConfig:
    """Semantic-attention block: CaiT-style class-attention blocks with a learnable [CLS] token on the
    layer-normed output of stage ``stage`` (width ``model.embed_dim * 2**stage``)."""

    enabled: bool = _opt(True, "build the SA block ([CLS] token, importance map, AITD image token)")
    stage: int = _opt(3, "backbone stage whose merged output feeds SA (1..4)")
    num_blocks: int = _opt(2, "class-attention blocks; the last one's [CLS] attention is the importance map")
    num_heads: int = _opt(8, "attention heads of the class-attention blocks (must divide the SA width)")
    mlp_ratio: float = _opt(4.0, "MLP hidden width / SA width (ratio)")
    layerscale_init: float = _opt(1e-4, "LayerScale initial value of both residual branches")
    qkv_bias: bool = _opt(True, "learnable bias on query/key/value projections")
    drop_path_rate: float = _opt(0.0, "stochastic-depth rate inside the SA blocks (prob.)")
    temperature: float = _opt(1.0, "class-attention logits q.k/sqrt(d_head) are divided by this (1 = CaiT)")


@dataclass(frozen=True)
class DataConfig:
    """Input volumes, crops, augmentation and the loader."""

    cache: str | None = _opt(None, "prepared cache folder (dagman data prepare --out); set by --data")
    spacing_mm: float = _opt(2.0, "isotropic voxel spacing the cache must have (mm)")
    hu_window: tuple[float, float] = _opt((-750.0, 1750.0), "HU clipped to [lo, hi] then scaled to [0, 1] (HU)")
    crop_size: int = _opt(128, "edge of the random cubic crops (voxels); divisible by patch*2**4")
    flip_prob: float = _opt(0.5, "probability of flipping each spatial axis, independently (prob.)")
    intensity_scale_range: tuple[float, float] = _opt((0.9, 1.1), "intensity multiplier drawn uniformly (factor)")
    intensity_shift_range: tuple[float, float] = _opt((-0.1, 0.1), "offset added, in [0,1]-scaled intensity units")
    intensity_prob: float = _opt(0.5, "probability of applying the scale and, independently, the shift (prob.)")
    batch_size: int = _opt(2, "volumes (view pairs) per process per step; global batch = batch_size*world_size")
    samples_per_volume: int | None = _opt(
        None, "view pairs drawn per volume per epoch; null = 1, or enough for one global batch per epoch"
    )
    num_workers: int = _opt(8, "data-loader worker processes per training process (0 = load in-process)")
    view_max_shift: int | None = _opt(
        None, "null: the two views' crop origins are independent (the paper); m: view 2 within m voxels of view 1 "
        "per axis, so the views overlap (voxels)"
    )
    slab_prob: float = _opt(
        0.0, "probability that a view keeps only a slab of contiguous z planes, the rest set to 0 (the bottom of the "
        "HU window, as the zero padding of a scan thinner than the crop); 0 = off, the paper (prob.)"
    )
    slab_fraction_range: tuple[float, float] = _opt(
        (0.25, 1.0), "slab thickness, a fraction of the crop's z edge drawn uniformly (fraction)"
    )


@dataclass(frozen=True)
class MaskConfig:
    """Student masks, teacher patch drop. One mask unit = one token of stage ``unit_stage``
    (``patch_size * 2**unit_stage`` voxels per axis: 16 at patch 2, stage 3)."""

    student: StudentMask = _opt("attention_hint", "student mask generator")
    ratio: float = _opt(0.7, "r: fraction of mask units masked for random / attention masks (fraction)")
    hint_fraction: float = _opt(0.1, "s: hints int(s*r*N) revealed from the top ceil(s*N) units (fraction)")
    teacher_drop_ratio: float = _opt(
        0.7, "r_t: random fraction of units dropped in teacher views; 0 = no noisy teacher"
    )
    unit_stage: int = _opt(3, "stage whose tokens are the mask units (1..4); equals sa.stage for attention masks")
    attention_view: Literal["dropped", "clean"] = _opt(
        "dropped", "teacher view the importance map comes from (clean costs one more teacher forward)"
    )
    block_ratio_range: tuple[float, float] = _opt((0.1, 0.5), "blockwise: masked fraction drawn uniformly (fraction)")
    block_min_tokens: int = _opt(4, "blockwise: smallest block (mask units)")
    block_min_aspect: float = _opt(0.3, "blockwise: smallest edge ratio of a block (ratio)")
    block_mask_prob: float = _opt(0.5, "blockwise: probability a view is masked at all, as iBOT (prob.)")
    student_slab_prob: float = _opt(
        0.0, "probability that a view's student input (not the teacher's) keeps only a random slab of z planes, the "
        "rest 0 (a thin series): the student then meets the teacher's full-crop targets from a thin crop; 0 = off, the "
        "paper (prob.)")
    student_slab_fraction_range: tuple[float, float] = _opt(
        (0.25, 1.0), "student slab thickness, a fraction of the crop's z edge drawn uniformly (fraction)")


@dataclass(frozen=True)
class HeadsConfig:
    """DINO/iBOT projection heads: MLP -> bottleneck -> L2 norm -> weight-normalised prototype layer."""

    num_prototypes: int = _opt(8192, "K: prototypes of the last layers (output dimension)")
    hidden_dim: int = _opt(2048, "hidden width of the projection MLPs")
    bottleneck_dim: int = _opt(256, "bottleneck width before L2 normalisation")
    num_layers: int = _opt(3, "linear layers in each projection MLP (GELU between)")
    norm_last_layer: bool = _opt(True, "fix the weight-norm gain of the prototype layers to 1")
    separate_patch_last_layer: bool = _opt(True, "patch tokens (AMPD) use their own prototype layer")
    share_image_last_layer: bool = _opt(True, "AITD and GITD share one image-level prototype layer")
    reconstruction_stage: int = _opt(
        4, "backbone map the AMIP reconstruction head reads (1..4; 4 = the last stage, method.md): each of its tokens "
        "predicts patch_size*2**stage voxels per axis")


@dataclass(frozen=True)
class LossConfig:
    """Which losses, their weights, temperatures and centring.
    Total: ``amip_weight*L_AMIP + ampd_weight*L_AMPD + aitd_weight*L_AITD + gitd_weight*L_GITD``
    (+ ``koleo_weight*L_KoLeo`` + ``koleo_cls_weight*L_KoLeo(SA [CLS])`` + ``koleo_head_weight*L_KoLeo(z)`` when
    set; not part of method.md)."""

    amip: bool = _opt(True, "AMIP: L1 masked-voxel reconstruction")
    ampd: bool = _opt(True, "AMPD: masked stage-3 patch-token distillation")
    aitd: bool = _opt(True, "AITD: SA [CLS] image-token distillation (needs sa.enabled)")
    gitd: bool = _opt(True, "GITD: avg-pooled global-token distillation")
    amip_weight: float = _opt(1.0, "weight of L_AMIP")
    ampd_weight: float = _opt(0.1, "weight of L_AMPD")
    aitd_weight: float = _opt(0.1, "weight of L_AITD")
    gitd_weight: float = _opt(0.1, "weight of L_GITD")
    student_temp: float = _opt(0.1, "student softmax temperature")
    teacher_temp_start: float = _opt(0.04, "image-token teacher temperature at epoch 0")
    teacher_temp_end: float = _opt(0.07, "image-token teacher temperature after the warm-up")
    teacher_temp_warmup_epochs: float = _opt(30.0, "linear teacher-temperature ramp length (epochs)")
    patch_teacher_temp_start: float = _opt(0.04, "patch-token teacher temperature while held")
    patch_teacher_temp_end: float = _opt(0.07, "patch-token teacher temperature after its ramp")
    patch_teacher_temp_hold_epochs: float = _opt(
        30.0, "patch temperature held at start this long, then the same ramp (epochs)"
    )
    center_momentum: float = _opt(0.9, "EMA momentum of the teacher output centres")
    teacher_norm: Literal["centering", "sinkhorn_knopp"] = _opt(
        "centering", "teacher-output normalisation: DINO centring (method.md) or Sinkhorn-Knopp (SwAV/DINOv2; "
        "equal prototype shares over the global batch)")
    sinkhorn_iterations: int = _opt(3, "Sinkhorn-Knopp normalisation rounds (loss.teacher_norm=sinkhorn_knopp)")
    sinkhorn_queue: int = _opt(
        0, "image-level terms (AITD, GITD) under Sinkhorn-Knopp: past teacher logits per process that join the "
        "batch being normalised (SwAV's queue for small batches; 0 = none)")
    global_token_stage: Literal[3, 4] = _opt(4, "GITD token = avg-pool of this stage's merged output")
    koleo_weight: float = _opt(
        0.0, "KoLeo regulariser (DINOv2): -mean log nearest-neighbour distance of the student's pooled "
        "global_token_stage tokens (L2-normalised) within each view's local batch, against dimensional collapse "
        "(needs data.batch_size >= 2; a forward pass of one crop has no term; 0 = off, method.md)")
    koleo_cls_weight: float = _opt(
        0.0, "the same KoLeo term on the student's SA [CLS] token (needs sa.enabled; 0 = off, method.md)")
    koleo_head_weight: float = _opt(
        0.0, "the same KoLeo term on the student's image-level projection outputs z (GITD's and AITD's, each "
        "its own term), against the projection collapse of docs/RESULTS.md (needs loss.gitd or loss.aitd; "
        "0 = off, method.md)")
    distill_start_epochs: float = _opt(
        0.0, "AMPD, AITD and GITD weighted 0 before this epoch, so the AMIP reconstruction trains alone first "
        "(0 = all four losses from the first step, method.md; epochs)")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with per-step cosine schedules (computed per global optimiser step)."""

    optimizer: Literal["adamw"] = _opt("adamw", "optimiser")
    lr: float = _opt(8e-4, "peak learning rate for a global batch of lr_reference_batch")
    lr_reference_batch: int = _opt(8, "global batch at which lr applies (volumes)")
    scale_lr: bool = _opt(True, "scale lr linearly by global_batch / lr_reference_batch")
    min_lr: float = _opt(1e-6, "learning rate at the end of the cosine decay")
    schedule: Literal["cosine"] = _opt("cosine", "lr decay after the linear warm-up")
    warmup_epochs: float = _opt(80.0, "linear lr warm-up from 0 (epochs)")
    weight_decay: float = _opt(0.04, "weight decay at the start (none on norms, biases, mask/CLS tokens)")
    weight_decay_end: float = _opt(0.4, "weight decay at the end (cosine schedule)")
    betas: tuple[float, float] = _opt((0.9, 0.999), "AdamW beta1, beta2")
    eps: float = _opt(1e-8, "AdamW epsilon")
    grad_clip: float = _opt(0.3, "max global gradient norm (0 = no clipping)")
    freeze_last_layer_epochs: float = _opt(1.0, "prototype layers get no update this long (epochs)")


@dataclass(frozen=True)
class EMAConfig:
    """Teacher = EMA of the student (starts as an exact copy)."""

    momentum_start: float = _opt(0.996, "teacher EMA momentum at step 0")
    momentum_end: float = _opt(1.0, "teacher EMA momentum at the last step (cosine by global step)")
    teacher_drop_path_rate: float = _opt(0.0, "teacher stochastic-depth rate (prob.)")


@dataclass(frozen=True)
class TrainConfig:
    """Length, numerics, reproducibility and bookkeeping."""

    epochs: int = _opt(800, "training length (epochs); see plan_steps for steps")
    steps_per_epoch: int | None = _opt(None, "optimiser steps per epoch; null = derived (see module doc)")
    total_steps: int | None = _opt(None, "training length override (optimiser steps; --steps); null = epochs")
    precision: Literal["fp32", "bf16", "fp16"] = _opt("bf16", "autocast dtype of forward passes (fp32 = none)")
    compile: Literal["auto", "on", "off"] = _opt(
        "auto", "torch.compile the student's and teacher's encoders: auto = on with CUDA, off on a CPU (there the "
        "compile takes minutes and the compiled tiny step measured slower, docs/RESULTS.md); a compile failure "
        "falls back to eager with one warning")
    max_nonfinite_steps: int = _opt(5, "non-finite losses are skipped; abort after this many in a row (steps)")
    dist_timeout_s: float = _opt(
        600.0, "multi-process runs: a process waiting this long for the others stops the run with an error "
        "(seconds; keep it above rank 0's longest lone pause, e.g. a checkpoint write)")
    seed: int = _opt(0, "random seed (python, numpy, torch; offset by rank)")
    log_every_steps: int = _opt(50, "metrics.jsonl / TensorBoard interval (steps)")
    checkpoint_every_steps: int = _opt(1000, "checkpoints/last.pt refresh interval (steps)")
    snapshot_every_epochs: float = _opt(100.0, "keep a numbered checkpoint this often (epochs; 0 = never)")
    diversity_every_epochs: float = _opt(50.0, "head-diversity measurement interval (epochs; 0 = never)")
    diversity_crops: int = _opt(4, "fixed eval crops for the head-diversity measure")
    probe: str | None = _opt(
        None, "k-NN probe set (.npz from 'dagman data probe'): labelled structure crops the teacher's features are "
        "scored on every probe_every_steps (probe/knn_* in metrics.jsonl); null = no probe")
    probe_every_steps: int = _opt(500, "k-NN probe interval (steps; 0 = never); used only with train.probe")


@dataclass(frozen=True)
class Config:
    """The full, resolved configuration of one pretraining run."""

    method: Literal["dagman", "dagman-no-nt", "dagman-no-sa", "smit", "ibot", "attmask"] = _opt(
        "dagman", "method preset this config started from"
    )
    size: Literal["tiny", "cpu", "small", "paper"] = _opt("paper", "size preset this config started from")
    model: ModelConfig = _opt(ModelConfig(), "3D Swin backbone (MONAI SwinTransformer keyword arguments)")
    sa: SAConfig = _opt(SAConfig(), "semantic-attention block")
    data: DataConfig = _opt(DataConfig(), "volumes, crops, augmentation, loader")
    mask: MaskConfig = _opt(MaskConfig(), "student masks and teacher patch drop")
    heads: HeadsConfig = _opt(HeadsConfig(), "projection heads and prototypes")
    loss: LossConfig = _opt(LossConfig(), "losses, weights, temperatures")
    optim: OptimConfig = _opt(OptimConfig(), "optimiser and schedules")
    ema: EMAConfig = _opt(EMAConfig(), "teacher EMA")
    train: TrainConfig = _opt(TrainConfig(), "length, precision, seed, logging")


SIZES: tuple[str, ...] = ("tiny", "cpu", "small", "paper")
METHODS: tuple[str, ...] = ("dagman", "dagman-no-nt", "dagman-no-sa", "smit", "ibot", "attmask")

# ----------------------------------------------------------------------------------------------------------
# Presets (partial nested dicts on top of the dataclass defaults = paper x dagman)
# ----------------------------------------------------------------------------------------------------------

from dagman.config_presets import METHOD_PRESETS, SIZE_PRESETS  # noqa: E402 - after the dataclasses it fills

# ----------------------------------------------------------------------------------------------------------
# Schema helpers
# ----------------------------------------------------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _leaf_types(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> type annotation, for every leaf of the tree, in declaration order."""
    out: dict[str, Any] = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = prefix + f.name
        if _is_section(tp):
            out.update(_leaf_types(tp, key + "."))
        else:
            out[key] = tp
    return out


def _sections(cls: type = Config) -> dict[str, type]:
    hints = _hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if _is_section(hints[f.name])}


def config_keys() -> list[str]:
    """Every valid dotted leaf key (``"optim.lr"``, ``"model.depths"``, ...), in declaration order."""
    return list(_leaf_types())


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_type_name(a) for a in inner) + " or null"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {args[0].__name__}s"
        return f"a list of {len(args)} {args[0].__name__}s"
    return getattr(tp, "__name__", str(tp))


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f"'{value}'"
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    if value is None:
        return "null"
    return str(value)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """``value`` converted to annotation ``tp`` or a one-line ConfigError naming ``key``.
    int is accepted for float; lists become tuples (length-checked when the tuple length is fixed);
    strings that parse as numbers are accepted for numbers (YAML reads ``1e-3`` as a string)."""

    def bad() -> ConfigError:
        return ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {_show(value)}")

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for a in inner:
            try:
                return _coerce(key, value, a)
            except ConfigError:
                pass
        raise bad()
    if origin is Literal:
        if isinstance(value, bool) or value not in args:
            hint = ""
            if isinstance(value, str):
                close = difflib.get_close_matches(value, [str(a) for a in args], n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"config key '{key}' must be one of {', '.join(str(a) for a in args)}; got {_show(value)}{hint}"
            )
        return args[args.index(value)]  # the declared choice itself (3, not 3.0)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad()
        variable = len(args) == 2 and args[1] is Ellipsis
        if not variable and len(value) != len(args):
            raise bad()
        elem_types = [args[0]] * len(value) if variable else list(args)
        try:
            return tuple(_coerce(key, v, t) for v, t in zip(value, elem_types))
        except ConfigError:
            raise bad() from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise bad()
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float)):
            result = float(value)
        elif isinstance(value, str):
            try:
                result = float(value.strip())
            except ValueError:
                raise bad() from None
        else:
            raise bad()
        if not math.isfinite(result):
            raise bad()
        return result
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # programming error


def _is_text_type(tp: Any) -> bool:
    """Annotations whose override values are taken as raw text (no YAML parsing)."""
    if tp is str:
        return True
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return all(isinstance(a, str) for a in args)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return len(inner) == 1 and _is_text_type(inner[0])
    return False


def _unknown_key(key: str, where: str = "") -> ConfigError:
    """ConfigError for an unknown dotted key, suggesting the closest valid key (difflib)."""
    leaves = config_keys()
    head, _, leaf = key.rpartition(".")
    candidates = leaves if head else leaves + list(_sections())
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not close and head in _sections():  # a typo in the leaf name of a known section
        names = [k.rpartition(".")[2] for k in leaves if k.startswith(head + ".")]
        near = difflib.get_close_matches(leaf, names, n=1, cutoff=0.6)
        if near:
            close = [f"{head}.{near[0]}"]
        else:
            return ConfigError(f"unknown config key '{key}'{where} (keys of {head}: {', '.join(names)})")
    if not close and not head:  # a leaf name without its section: 'lr' -> 'optim.lr'
        by_leaf = {k.rpartition(".")[2]: k for k in reversed(leaves)}
        near = difflib.get_close_matches(key, list(by_leaf), n=1, cutoff=0.75)
        close = [by_leaf[near[0]]] if near else []
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{where}{hint}")


# ----------------------------------------------------------------------------------------------------------
# dict <-> Config
# ----------------------------------------------------------------------------------------------------------


def to_dict(cfg: Config) -> dict[str, Any]:
    """Nested plain dict (tuples as lists), keys in declaration order."""

    def conv(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj):
            return {f.name: conv(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, tuple):
            return [conv(v) for v in obj]
        return obj

    return conv(cfg)


def _merge(base: dict[str, Any], patch: Mapping[str, Any], where: str = "", prefix: str = "") -> dict[str, Any]:
    """``base`` (a full to_dict tree) updated with the partial nested ``patch``; unknown keys and
    section/leaf mix-ups raise ConfigError."""
    out = dict(base)
    for k, v in patch.items():
        key = prefix + str(k)
        if k not in base:
            raise _unknown_key(key, where)
        if isinstance(base[k], dict):
            if not isinstance(v, Mapping):
                raise ConfigError(
                    f"config key '{key}'{where} is a section; set its keys, e.g. '{key}.{next(iter(base[k]))}=...'"
                )
            out[k] = _merge(base[k], v, where, key + ".")
        else:
            if isinstance(v, Mapping):
                raise ConfigError(f"config key '{key}'{where} is a value, not a section")
            out[k] = v
    return out


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        key = prefix + f.name
        if _is_section(tp):
            kwargs[f.name] = _build(tp, data[f.name], key + ".")
        else:
            kwargs[f.name] = _coerce(key, data[f.name], tp)
    return cls(**kwargs)


def from_dict(data: Mapping[str, Any], *, check: bool = True) -> Config:
    """A Config from a nested dict (full or partial: missing keys keep the dataclass defaults, which are
    paper x dagman, not a preset chosen by the dict's ``size``/``method``: use :func:`load_config` for
    that). Types are checked and converted; ``check`` runs the cross-field :func:`validate`."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"a config must be a mapping of sections, got {_show(data)}")
    merged = _merge(to_dict(Config()), data)
    cfg = _build(Config, merged, "")
    if check:
        validate(cfg)
    return cfg


# ----------------------------------------------------------------------------------------------------------
# YAML
# ----------------------------------------------------------------------------------------------------------


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, list):
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    text = yaml.safe_dump(value, width=10**6)
    return text.removesuffix("\n...\n").strip()


def to_yaml(cfg: Config, comments: bool = True) -> str:
    """The full config as YAML in declaration order (``method``, ``size``, then the sections), each key
    with its help text as a trailing comment when ``comments``. ``load_config(file=...)`` of the
    result gives back an equal Config."""
    from dagman import __version__

    tree = to_dict(cfg)
    lines: list[str] = []
    if comments:
        lines.append(f"# dagman {__version__} pretraining config: size {cfg.size}, method {cfg.method}")
        lines.append("# (resolved: presets + file + overrides; every key below is in effect)")

    def emit(cls: type, values: dict[str, Any], indent: str) -> None:
        hints = _hints(cls)
        rows: list[tuple[str, str]] = []
        for f in dataclasses.fields(cls):
            if _is_section(hints[f.name]):
                continue
            rows.append((f"{indent}{f.name}: {_yaml_scalar(values[f.name])}", f.metadata.get("help", "")))
        width = max((len(r[0]) for r in rows), default=0)
        for text, help_text in rows:
            lines.append(f"{text.ljust(width)}  # {help_text}" if comments and help_text else text)
        for f in dataclasses.fields(cls):
            if _is_section(hints[f.name]):
                head = f"{indent}{f.name}:"
                help_text = f.metadata.get("help", "")
                lines.append(f"{head}  # {help_text}" if comments and help_text else head)
                emit(hints[f.name], values[f.name], indent + "  ")

    emit(Config, tree, "")
    return "\n".join(lines) + "\n"


def save_config(cfg: Config, path: str | Path) -> None:
    """Write :func:`to_yaml` of ``cfg`` atomically to ``path`` (e.g. ``RUN/config.yaml``)."""
    from dagman.data.cache import atomic_write_text

    atomic_write_text(path, to_yaml(cfg))


def _read_yaml_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {p}: {err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"config file {p} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections, got {_show(data)}")
    return data


# ----------------------------------------------------------------------------------------------------------
# Overrides and loading
# ----------------------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=1e-3"`` -> ``("optim.lr", 0.001)``-ready value. The key must exist; the value is read as
    YAML (numbers, booleans, ``[2,2,2,2]``, ``null``) except for text-valued keys, which take the raw text
    (``null`` still means None where allowed). Type conversion happens later in :func:`from_dict`."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{text}' must look like key=value (e.g. optim.lr=1e-3)")
    types_by_key = _leaf_types()
    if key not in types_by_key:
        if key in _sections():
            raise ConfigError(f"config key '{key}' is a section; set one of its keys, e.g. '{key}.<name>=...'")
        raise _unknown_key(key)
    tp = types_by_key[key]
    raw = raw.strip()
    if _is_text_type(tp):
        allows_none = typing.get_origin(tp) in (typing.Union, types.UnionType)
        if allows_none and raw in ("null", "~", "None", ""):
            return key, None
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
            raw = raw[1:-1]
        return key, raw
    try:
        return key, yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        raise ConfigError(f"cannot read the value of override '{text}' as YAML") from None


def _nest(key: str, value: Any) -> dict[str, Any]:
    parts = key.split(".")
    out: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        out = {part: out}
    return out


def _choose(kind: str, valid: tuple[str, ...], candidates: list[tuple[str, Any]]) -> str | None:
    """The preset name given by the first source, checking that all sources agree and that it exists."""
    chosen: tuple[str, Any] | None = None
    for source, value in candidates:
        if value is None:
            continue
        if not isinstance(value, str) or value not in valid:
            raise ConfigError(f"unknown {kind} {_show(value)}{source}; valid: {', '.join(valid)}")
        if chosen is None:
            chosen = (source, value)
        elif chosen[1] != value:
            raise ConfigError(
                f"conflicting {kind}: '{chosen[1]}'{chosen[0]} but '{value}'{source}"
            )
    return None if chosen is None else chosen[1]


def preset_config(size: str = "paper", method: str = "dagman") -> Config:
    """The composed preset ``defaults <- SIZE_PRESETS[size] <- METHOD_PRESETS[method]``, validated."""
    return load_config(size=size, method=method)


def load_config(
    size: str | None = None,
    method: str | None = None,
    file: str | Path | None = None,
    overrides: Iterable[str] = (),
) -> Config:
    """Resolve a config: size preset, method preset, then the (partial, nested) YAML ``file``, then the
    ``key=value`` ``overrides`` in order; types converted, everything validated.

    ``size``/``method`` choose the presets; when None they come from a ``size=``/``method=`` override,
    else from the file's ``size``/``method`` keys, else ``paper``/``dagman``. Sources that name different
    presets are an error. Raises ConfigError (one line) on any problem."""
    where = f" in {file}" if file is not None else ""
    file_data = _read_yaml_file(file) if file is not None else {}
    parsed = [parse_override(o) for o in overrides]
    override_size = [v for k, v in parsed if k == "size"]
    override_method = [v for k, v in parsed if k == "method"]
    chosen_size = _choose(
        "size",
        SIZES,
        [(" (--size)", size)]
        + [(" (override)", v) for v in override_size]
        + [(where, file_data.get("size"))],
    ) or "paper"
    chosen_method = _choose(
        "method",
        METHODS,
        [(" (--method)", method)]
        + [(" (override)", v) for v in override_method]
        + [(where, file_data.get("method"))],
    ) or "dagman"

    tree = to_dict(Config())
    tree = _merge(tree, SIZE_PRESETS[chosen_size])
    tree = _merge(tree, METHOD_PRESETS[chosen_method])
    tree["size"], tree["method"] = chosen_size, chosen_method
    tree = _merge(tree, file_data, where)
    return from_dict(_apply_overrides(tree, parsed))


def _apply_overrides(tree: dict[str, Any], parsed: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """``tree`` with the parsed ``(key, value)`` overrides merged in, in order."""
    for key, value in parsed:
        tree = _merge(tree, _nest(key, value))
    return tree


def override_config(data: Mapping[str, Any], overrides: Iterable[str] = ()) -> Config:
    """A saved config (a :func:`to_dict` tree, e.g. a checkpoint's ``config``) with the ``key=value``
    ``overrides`` applied on top, in order, and validated. Raises ConfigError (one line) on any problem."""
    return from_dict(_apply_overrides(to_dict(from_dict(data)), [parse_override(o) for o in overrides]))


# ----------------------------------------------------------------------------------------------------------
# Derived quantities and cross-field validation
# ----------------------------------------------------------------------------------------------------------


def stage_width(model: ModelConfig, stage: int) -> int:
    """Channels of the backbone output after ``stage`` patch mergings (``stage`` in 0..4): embed_dim*2**stage
    (48/96/192/384/768 for the paper model)."""
    return model.embed_dim * 2**stage


def token_size(model: ModelConfig, stage: int) -> tuple[int, int, int]:
    """Voxels per axis covered by one token after ``stage`` mergings: patch_size*2**stage (16 for stage 3)."""
    return tuple(p * 2**stage for p in model.patch_size)  # type: ignore[return-value]


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _in_unit(key: str, value: float, *, low_open: bool = False, high_open: bool = True) -> None:
    lo_ok = value > 0 if low_open else value >= 0
    hi_ok = value < 1 if high_open else value <= 1
    interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
    _require(lo_ok and hi_ok, f"config key '{key}' must be in {interval}, got {value}")


def _positive(key: str, value: float, *, zero: bool = False) -> None:
    ok = value >= 0 if zero else value > 0
    _require(ok, f"config key '{key}' must be {'>= 0' if zero else '> 0'}, got {value}")


def validate(cfg: Config) -> Config:
    """Cross-field checks; returns ``cfg`` or raises a one-line ConfigError naming the key(s)."""
    m = cfg.model
    _positive("model.in_chans", m.in_chans)
    _positive("model.embed_dim", m.embed_dim)
    for key, values in (("model.window_size", m.window_size), ("model.patch_size", m.patch_size),
                        ("model.depths", m.depths), ("model.num_heads", m.num_heads)):
        _require(all(v >= 1 for v in values), f"config key '{key}' needs values >= 1, got {_show(values)}")
    for i, heads in enumerate(m.num_heads):
        width = stage_width(m, i)
        _require(
            width % heads == 0,
            f"model.num_heads[{i}]={heads} must divide stage {i + 1} width {width} (model.embed_dim*2**{i})",
        )
    _positive("model.mlp_ratio", m.mlp_ratio)
    for key in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
        _in_unit(f"model.{key}", getattr(m, key))

    d = cfg.data
    if d.cache is not None:
        _require(d.cache.strip() != "", "config key 'data.cache' must be a folder path or null, got ''")
    _positive("data.spacing_mm", d.spacing_mm)
    _require(d.hu_window[0] < d.hu_window[1], f"data.hu_window must be [lo, hi] with lo < hi, got {_show(d.hu_window)}")
    _positive("data.crop_size", d.crop_size)
    for axis, p in enumerate(m.patch_size):
        unit = p * 2**NUM_STAGES
        _require(
            d.crop_size % unit == 0,
            f"data.crop_size {d.crop_size} must be divisible by {unit} "
            f"(model.patch_size[{axis}]={p} * 2**{NUM_STAGES} stages)",
        )
    _in_unit("data.flip_prob", d.flip_prob, high_open=False)
    _in_unit("data.intensity_prob", d.intensity_prob, high_open=False)
    for where, section, prob_key, range_key in (("data", d, "slab_prob", "slab_fraction_range"),
                                                ("mask", cfg.mask, "student_slab_prob", "student_slab_fraction_range")):
        _in_unit(f"{where}.{prob_key}", getattr(section, prob_key), high_open=False)
        lo, hi = getattr(section, range_key)
        _require(0 < lo <= hi <= 1, f"{where}.{range_key} must satisfy 0 < lo <= hi <= 1, got "
                 f"{_show((lo, hi))}")
    lo, hi = d.intensity_scale_range
    _require(0 < lo <= hi, f"data.intensity_scale_range must satisfy 0 < lo <= hi, got {_show((lo, hi))}")
    lo, hi = d.intensity_shift_range
    _require(lo <= hi, f"data.intensity_shift_range must satisfy lo <= hi, got {_show(d.intensity_shift_range)}")
    _positive("data.batch_size", d.batch_size)
    for key in ("koleo_weight", "koleo_cls_weight", "koleo_head_weight"):
        weight = getattr(cfg.loss, key)
        _positive(f"loss.{key}", weight, zero=True)
        _require(weight == 0 or d.batch_size >= 2,
                 f"loss.{key}={weight:g} needs data.batch_size >= 2 (a nearest neighbour in the batch), got "
                 f"{d.batch_size}")
    _require(cfg.loss.koleo_cls_weight == 0 or cfg.sa.enabled,
             "loss.koleo_cls_weight needs the SA block (sa.enabled=true): it spreads the SA [CLS] tokens")
    _require(cfg.loss.koleo_head_weight == 0 or cfg.loss.gitd or cfg.loss.aitd,
             "loss.koleo_head_weight needs loss.gitd or loss.aitd: it spreads their projection outputs")
    if d.samples_per_volume is not None:
        _positive("data.samples_per_volume", d.samples_per_volume)
    _positive("data.num_workers", d.num_workers, zero=True)
    if d.view_max_shift is not None:
        _positive("data.view_max_shift", d.view_max_shift, zero=True)

    s = cfg.sa
    _require(1 <= s.stage <= NUM_STAGES, f"config key 'sa.stage' must be in 1..{NUM_STAGES}, got {s.stage}")
    _positive("sa.num_blocks", s.num_blocks)
    _positive("sa.num_heads", s.num_heads)
    sa_width = stage_width(m, s.stage)
    _require(
        sa_width % s.num_heads == 0,
        f"sa.num_heads={s.num_heads} must divide the SA width {sa_width} (model.embed_dim*2**sa.stage)",
    )
    _positive("sa.mlp_ratio", s.mlp_ratio)
    _positive("sa.layerscale_init", s.layerscale_init)
    _in_unit("sa.drop_path_rate", s.drop_path_rate)

    k = cfg.mask
    _in_unit("mask.ratio", k.ratio, low_open=True)
    _require(
        0 <= k.hint_fraction <= k.ratio,
        f"mask.hint_fraction (s={k.hint_fraction}) must be in [0, mask.ratio={k.ratio}]",
    )
    _in_unit("mask.teacher_drop_ratio", k.teacher_drop_ratio)
    _require(
        1 <= k.unit_stage <= NUM_STAGES, f"config key 'mask.unit_stage' must be in 1..{NUM_STAGES}, got {k.unit_stage}"
    )
    lo, hi = k.block_ratio_range
    _require(0 < lo <= hi < 1, f"mask.block_ratio_range must satisfy 0 < lo <= hi < 1, got {_show((lo, hi))}")
    _positive("mask.block_min_tokens", k.block_min_tokens)
    _in_unit("mask.block_min_aspect", k.block_min_aspect, low_open=True, high_open=False)
    _in_unit("mask.block_mask_prob", k.block_mask_prob, low_open=True, high_open=False)
    if k.student in ATTENTION_MASKS:
        _require(s.enabled, f"mask.student={k.student} needs the SA block's attention map: set sa.enabled=true")
        _require(
            k.unit_stage == s.stage,
            f"mask.unit_stage={k.unit_stage} must equal sa.stage={s.stage} for attention masks (set both)",
        )

    h = cfg.heads
    for key in ("num_prototypes", "hidden_dim", "bottleneck_dim", "num_layers"):
        _positive(f"heads.{key}", getattr(h, key))

    L = cfg.loss
    names = ("amip", "ampd", "aitd", "gitd")
    _require(
        any(getattr(L, n) for n in names), "at least one of loss.amip, loss.ampd, loss.aitd, loss.gitd must be true"
    )
    for n in names:
        w = getattr(L, f"{n}_weight")
        _positive(f"loss.{n}_weight", w, zero=not getattr(L, n))
    _require(
        not L.aitd or s.enabled, "loss.aitd needs the SA block's [CLS] token: set sa.enabled=true or loss.aitd=false"
    )
    for key in ("student_temp", "teacher_temp_start", "teacher_temp_end", "patch_teacher_temp_start",
                "patch_teacher_temp_end"):
        _positive(f"loss.{key}", getattr(L, key))
    _positive("loss.teacher_temp_warmup_epochs", L.teacher_temp_warmup_epochs, zero=True)
    _positive("loss.distill_start_epochs", L.distill_start_epochs, zero=True)
    _positive("loss.patch_teacher_temp_hold_epochs", L.patch_teacher_temp_hold_epochs, zero=True)
    _in_unit("loss.center_momentum", L.center_momentum)
    _positive("loss.sinkhorn_iterations", L.sinkhorn_iterations)
    _positive("loss.sinkhorn_queue", L.sinkhorn_queue, zero=True)
    _require(1 <= cfg.heads.reconstruction_stage <= NUM_STAGES,
             f"config key 'heads.reconstruction_stage' must be in 1..{NUM_STAGES}, got {cfg.heads.reconstruction_stage}")

    o = cfg.optim
    _positive("optim.lr", o.lr)
    _positive("optim.lr_reference_batch", o.lr_reference_batch)
    _require(0 <= o.min_lr <= o.lr, f"optim.min_lr={o.min_lr} must be in [0, optim.lr={o.lr}]")
    _positive("optim.warmup_epochs", o.warmup_epochs, zero=True)
    _positive("optim.weight_decay", o.weight_decay, zero=True)
    _positive("optim.weight_decay_end", o.weight_decay_end, zero=True)
    _require(all(0 <= b < 1 for b in o.betas), f"optim.betas must be in [0, 1), got {_show(o.betas)}")
    _positive("optim.eps", o.eps)
    _positive("optim.grad_clip", o.grad_clip, zero=True)
    _positive("optim.freeze_last_layer_epochs", o.freeze_last_layer_epochs, zero=True)

    e = cfg.ema
    _require(
        0 <= e.momentum_start <= e.momentum_end <= 1,
        f"ema momenta must satisfy 0 <= ema.momentum_start ({e.momentum_start}) <= ema.momentum_end "
        f"({e.momentum_end}) <= 1",
    )
    _in_unit("ema.teacher_drop_path_rate", e.teacher_drop_path_rate)

    t = cfg.train
    _positive("train.epochs", t.epochs)
    if t.steps_per_epoch is not None:
        _positive("train.steps_per_epoch", t.steps_per_epoch)
    if t.total_steps is not None:
        _positive("train.total_steps", t.total_steps)
    # schedule points given in epochs lie inside the run
    for key, value in (("optim.warmup_epochs", o.warmup_epochs),
                       ("loss.teacher_temp_warmup_epochs", L.teacher_temp_warmup_epochs),
                       ("loss.patch_teacher_temp_hold_epochs", L.patch_teacher_temp_hold_epochs),
                       ("loss.distill_start_epochs", L.distill_start_epochs)):
        _require(value <= t.epochs, f"{key}={value} must not exceed train.epochs={t.epochs}")
    _positive("train.max_nonfinite_steps", t.max_nonfinite_steps)
    _positive("train.dist_timeout_s", t.dist_timeout_s)
    _positive("train.seed", t.seed, zero=True)
    _positive("train.log_every_steps", t.log_every_steps)
    _positive("train.checkpoint_every_steps", t.checkpoint_every_steps)
    _positive("train.snapshot_every_epochs", t.snapshot_every_epochs, zero=True)
    _positive("train.diversity_every_epochs", t.diversity_every_epochs, zero=True)
    _positive("train.diversity_crops", t.diversity_crops)
    _positive("train.probe_every_steps", t.probe_every_steps, zero=True)
    if t.probe is not None:
        _require(t.probe.strip() != "", "config key 'train.probe' must be a file path or null, got ''")
    return cfg


# ----------------------------------------------------------------------------------------------------------
# Epochs -> steps
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepPlan:
    """How a run's epochs map to optimiser steps (see the module docstring)."""

    global_batch: int  # volumes per optimiser step over all processes
    steps_per_epoch: float  # optimiser steps per epoch (fractional when total_steps compresses the schedule)
    total_steps: int  # optimiser steps of the whole run
    peak_lr: float  # learning rate after linear batch scaling

    def steps(self, epochs: float) -> int:
        """An epoch-valued duration (warm-up, freeze, interval) in optimiser steps, rounded."""
        return int(round(epochs * self.steps_per_epoch))


def samples_per_volume(cfg: Config, num_volumes: int, world_size: int = 1) -> int:
    """View pairs drawn from each volume per epoch: ``data.samples_per_volume`` when set; else 1, or
    ``ceil(global_batch / num_volumes)`` when the cache holds fewer volumes than one global batch."""
    if cfg.data.samples_per_volume is not None:
        return int(cfg.data.samples_per_volume)
    global_batch = cfg.data.batch_size * max(1, int(world_size))
    if num_volumes < 1 or num_volumes >= global_batch:
        return 1
    return -(-global_batch // num_volumes)


def plan_steps(cfg: Config, num_volumes: int, world_size: int = 1) -> StepPlan:
    """Turn the epoch-based config into steps for ``num_volumes`` volumes and ``world_size`` processes."""
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    global_batch = cfg.data.batch_size * world_size
    t = cfg.train
    if t.steps_per_epoch is not None:
        spe: float = float(t.steps_per_epoch)
    elif t.total_steps is not None:
        spe = t.total_steps / t.epochs
    else:
        if num_volumes < 1:
            raise ConfigError("cannot derive train.steps_per_epoch: the data set has no volumes")
        spe = float(max(1, num_volumes * samples_per_volume(cfg, num_volumes, world_size) // global_batch))
    total = t.total_steps if t.total_steps is not None else max(1, int(round(t.epochs * spe)))
    o = cfg.optim
    peak = o.lr * global_batch / o.lr_reference_batch if o.scale_lr else o.lr
    return StepPlan(global_batch=global_batch, steps_per_epoch=spe, total_steps=total, peak_lr=peak)
