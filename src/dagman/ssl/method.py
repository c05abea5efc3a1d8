"""One student/teacher step of DAGMaN and of every baseline, from one code path.

The step reads in the order of the data flow (method notes, sections 4-5)::

    teacher(views, drop masks) -> importance map S -> student masks -> student(masked views) -> losses

A method preset (``dagman``, ``dagman-no-nt``, ``dagman-no-sa``, ``smit``, ``ibot``, ``attmask``) is only
configuration: which student mask generator runs, whether the teacher's input is patch-dropped, whether
the semantic-attention (SA) block exists, and which of the four losses are on.

Views are stacked: ``x = cat([u, v])`` ``(2B, 1, S, S, S)``, so each network runs once per step on both
views. Cross-view terms pair the student's view ``u`` with the teacher's view ``v`` and vice versa; each
distillation term is summed over its two view pairs.

Stage numbering follows the backbone's outputs: stage ``s`` is ``SwinFeatures.maps[s]`` (s = 3: after the
third merging, width ``8 * embed_dim``; ``128^3`` input -> ``8^3`` tokens). Mask units are the tokens of
``mask.unit_stage``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from dagman.models.heads import (
    PrototypeLayer,
    ProjectionMLP,
    ReconstructionHead,
    reconstruction_upsample,
)
from dagman.models.semantic_attention import SemanticAttention
from dagman.models.swin import DropPath, MaskTokenEncoder, SwinFeatures, build_backbone
from dagman.ssl.losses import DistillationLoss, MaskedReconstructionLoss, koleo_loss
from dagman.ssl.masking import slab_planes, student_mask_from_config, teacher_drop_mask
from dagman.ssl.monitor import entropy_ratio, teacher_monitor

ATTENTION_MASKS = ("attention_hint", "attention_high", "attention_low")


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _local_rows(rank: int, world: int, b: int, device) -> torch.Tensor:
    """This process's rows of a global ``(2 * world * b)`` batch ordered (view, rank, sample)."""
    base = torch.arange(b, device=device) + rank * b
    return torch.cat([base, base + world * b])


def _gather_rows(t: torch.Tensor | None, b: int, world: int) -> torch.Tensor | None:
    """All processes' ``(2b, ...)`` rows (view u then v) as one ``(2 * world * b, ...)`` tensor ordered
    (view, rank, sample); ``t`` itself without a process group."""
    if t is None or world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    stacked = torch.stack(parts).view(world, 2, b, *t.shape[1:])  # (rank, view, sample, ...)
    return stacked.transpose(0, 1).reshape(2 * world * b, *t.shape[1:])


@dataclass
class NetworkOutput:
    """What one network pass produced (absent parts are None). ``N`` = mask-unit tokens per sample.

    ``features``: the backbone's :class:`SwinFeatures`; ``cls`` ``(B, C_sa)`` SA [CLS] token;
    ``importance`` ``(B, N)`` SA importance map (sums to 1); ``cls_logits``, ``global_logits`` ``(B, K)``;
    ``patch_logits`` ``(B, N, K)``; ``reconstruction`` ``(B, 1, D, H, W)``; ``cls_z``, ``global_z``
    ``(B, bottleneck)``: the image-level projection outputs that the prototype layer reads (not normalised).
    """

    features: SwinFeatures
    cls: torch.Tensor | None = None
    importance: torch.Tensor | None = None
    cls_logits: torch.Tensor | None = None
    global_logits: torch.Tensor | None = None
    patch_logits: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None
    cls_z: torch.Tensor | None = None
    global_z: torch.Tensor | None = None


class SSLNetwork(nn.Module):
    """Backbone (+ mask token) with the SA block, projection heads and reconstruction head that ``cfg``
    asks for. The student is one of these; the teacher is an exact copy (:func:`make_teacher`)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.cfg = cfg
        model_kwargs = asdict(cfg.model)
        self.encoder = MaskTokenEncoder(build_backbone(**model_kwargs))
        widths = self.encoder.backbone.stage_widths
        heads, loss = cfg.heads, cfg.loss
        self.unit_stage = cfg.mask.unit_stage
        self.global_stage = loss.global_token_stage
        self.sa = None
        if cfg.sa.enabled:
            self.sa_stage = cfg.sa.stage
            self.sa = SemanticAttention.from_config(cfg.sa, widths[cfg.sa.stage])

        def mlp(width):
            return ProjectionMLP(width, heads.hidden_dim, heads.bottleneck_dim, heads.num_layers)

        def prototypes():
            return PrototypeLayer(heads.bottleneck_dim, heads.num_prototypes, heads.norm_last_layer)

        self.cls_mlp = mlp(widths[cfg.sa.stage]) if loss.aitd else None
        self.global_mlp = mlp(widths[self.global_stage]) if loss.gitd else None
        self.patch_mlp = mlp(widths[self.unit_stage]) if loss.ampd else None
        image_layer = prototypes() if (loss.aitd or loss.gitd) else None
        self.cls_prototypes = image_layer if loss.aitd else None
        self.global_prototypes = None
        if loss.gitd:
            self.global_prototypes = image_layer if heads.share_image_last_layer else prototypes()
        self.patch_prototypes = None
        if loss.ampd:
            shared = image_layer if (image_layer is not None and not heads.separate_patch_last_layer) else None
            self.patch_prototypes = shared if shared is not None else prototypes()

    @property
    def backbone(self):
        return self.encoder.backbone

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, *, heads: bool = True,
                outputs: tuple[int, ...] = ()) -> NetworkOutput:
        """x ``(B, C, D, H, W)``; mask bool over the mask-unit grid ``(B, d, h, w)`` or None. ``outputs``: the
        backbone maps needed beyond those the SA block and the heads read (the others are left out)."""
        needed = set(outputs)
        if self.sa is not None:
            needed.add(self.sa_stage)
        if heads:
            needed |= {s for s, m in ((self.global_stage, self.global_mlp), (self.unit_stage, self.patch_mlp))
                       if m is not None}
        feats = self.encoder(x, mask=mask, outputs=sorted(needed))
        out = NetworkOutput(features=feats)
        if self.sa is not None:
            sa = self.sa(feats.tokens[self.sa_stage])
            out.cls, out.importance = sa.cls, sa.importance
        if not heads:
            return out
        if self.cls_mlp is not None:
            out.cls_z = self.cls_mlp(out.cls)
            out.cls_logits = self.cls_prototypes(out.cls_z)
        if self.global_mlp is not None:
            out.global_z = self.global_mlp(feats.tokens[self.global_stage].mean(1))
            out.global_logits = self.global_prototypes(out.global_z)
        if self.patch_mlp is not None:
            out.patch_logits = self.patch_prototypes(self.patch_mlp(feats.tokens[self.unit_stage]))
        return out


class StudentNetwork(nn.Module):
    """The student: an :class:`SSLNetwork` (``net``, the part the teacher mirrors) plus the AMIP
    reconstruction head (1x1x1 conv + 3D pixel shuffle from the map of ``heads.reconstruction_stage``, the last
    stage by default, to voxels), which only the student has. Wrap this module in DDP; EMA pairs ``student.net`` with the teacher."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.net = SSLNetwork(cfg)
        self.reconstruction = None
        self.reconstruction_stage = cfg.heads.reconstruction_stage
        # backbone maps the student needs beyond the SA block's and the heads': the one the AMIP head reads, and
        # the one KoLeo (loss.koleo_weight) pools, needed even when GITD is off
        self.extra_outputs = tuple(stage for stage, used in ((self.reconstruction_stage, cfg.loss.amip),
                                                             (cfg.loss.global_token_stage, cfg.loss.koleo_weight > 0))
                                   if used)
        if cfg.loss.amip:
            width = self.net.backbone.stage_widths[self.reconstruction_stage]
            self.reconstruction = ReconstructionHead(width, cfg.model.in_chans,
                                                     reconstruction_upsample(cfg.model.patch_size,
                                                                             self.reconstruction_stage))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> NetworkOutput:
        out = self.net(x, mask, outputs=self.extra_outputs)
        if self.reconstruction is not None:
            out.reconstruction = self.reconstruction(out.features.maps[self.reconstruction_stage])
        return out


def make_teacher(student: StudentNetwork, drop_path_rate: float = 0.0) -> SSLNetwork:
    """The teacher at step 0: an exact copy of ``student.net`` (same weights and buffers), frozen, with
    stochastic depth ``drop_path_rate`` (the teacher's is 0)."""
    teacher = copy.deepcopy(getattr(student, "module", student).net)
    for p in teacher.parameters():
        p.requires_grad_(False)
    for m in teacher.modules():
        if isinstance(m, DropPath):
            m.p = float(drop_path_rate)
    return teacher


@dataclass
class StepResult:
    """``loss``: the weighted total (0-dim, differentiable). ``parts``: every active loss by name
    (``amip``, ``ampd``, ``aitd``, ``gitd``), detached 0-dim tensors (on the loss's device: reading them
    is left to the trainer, which does it in one host sync). ``stats``: masked fractions etc. (0-dim tensors).
    ``masks``: the student mask, teacher drop mask and importance map (for pictures).
    ``teacher_logits``: for :meth:`SSLMethod.update_centers`. ``reconstruction``: the student's AMIP output
    ``(2B, 1, S, S, S)``, detached (None without AMIP; for pictures)."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    masks: dict[str, torch.Tensor | None] = field(default_factory=dict)
    teacher_logits: dict[str, torch.Tensor | None] = field(default_factory=dict)
    reconstruction: torch.Tensor | None = None


class SSLMethod(nn.Module):
    """The loss side of a method: the four losses with their centres (buffers, saved with the state dict)
    and the step :meth:`forward` that runs teacher -> masks -> student -> losses."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.cfg = cfg
        k = cfg.heads.num_prototypes
        norm = {"center_momentum": cfg.loss.center_momentum, "norm": cfg.loss.teacher_norm,
                "sinkhorn_iterations": cfg.loss.sinkhorn_iterations}
        image = {**norm, "queue_size": cfg.loss.sinkhorn_queue}
        self.aitd_loss = DistillationLoss(k, **image) if cfg.loss.aitd else None
        self.gitd_loss = DistillationLoss(k, **image) if cfg.loss.gitd else None
        self.ampd_loss = DistillationLoss(k, **norm) if cfg.loss.ampd else None
        self.amip_loss = MaskedReconstructionLoss() if cfg.loss.amip else None
        self.uses_attention = cfg.mask.student in ATTENTION_MASKS

    def unit_grid(self, spatial: tuple[int, int, int]) -> tuple[int, int, int]:
        """Mask-unit token grid for an input of ``spatial`` voxels (as the backbone computes it)."""
        patch = self.cfg.model.patch_size
        grid = [-(-s // p) for s, p in zip(spatial, patch)]
        for _ in range(self.cfg.mask.unit_stage):
            grid = [-(-g // 2) for g in grid]
        return tuple(grid)  # type: ignore[return-value]

    def forward(self, student: StudentNetwork, teacher: SSLNetwork, view1: torch.Tensor, view2: torch.Tensor,
                values, generator: torch.Generator) -> StepResult:
        """One step's losses. ``view1``, ``view2`` ``(B, 1, S, S, S)``: two views of the same volumes.
        ``values``: this step's schedule values (``teacher_temp``, ``patch_teacher_temp``, and ``distill_on``,
        True when absent; see :class:`dagman.train.schedules.StepValues`). ``generator``: all mask randomness."""
        cfg = self.cfg
        b = view1.shape[0]
        x = torch.cat([view1, view2], 0)  # (2B, 1, S, S, S): view u then view v
        grid = self.unit_grid(tuple(x.shape[2:]))

        # Masks are drawn for the global batch, rows ordered (view, global sample), and each process keeps
        # its rows: a sample gets the same mask whatever the number of processes (same generator on all).
        rank, world = _rank_world()
        rows = _local_rows(rank, world, b, x.device)
        n_global = 2 * b * world

        # 1. teacher on the (patch-dropped) views: distillation targets and, from the same pass, S
        drop = None
        if cfg.mask.teacher_drop_ratio > 0:
            drop = teacher_drop_mask(n_global, grid, cfg.mask.teacher_drop_ratio, generator).to(x.device)[rows]
        with torch.no_grad():
            t_out = teacher(x, mask=drop)
            # 2. importance map -> attention-guided student masks
            scores = None
            if self.uses_attention:
                if cfg.mask.attention_view == "clean" and drop is not None:
                    scores = teacher(x, mask=None, heads=False).importance
                else:
                    scores = t_out.importance
                scores = scores.float()
        # 3. student masks
        s_mask = student_mask_from_config(cfg.mask, batch=n_global, grid=grid, generator=generator,
                                          scores=_gather_rows(scores, b, world), device=x.device)
        s_mask = s_mask.to(x.device)[rows]
        # 4. student on the masked views (thinned to a slab of z planes where mask.student_slab_prob says so; the
        # teacher's targets and the reconstruction target stay those of the full crop); drawn last, and only when
        # on, so every other draw is the same as without the option
        s_in = x
        if cfg.mask.student_slab_prob > 0:
            keep = slab_planes(n_global, x.shape[-1], cfg.mask.student_slab_prob,
                               tuple(cfg.mask.student_slab_fraction_range), generator).to(x.device)[rows]
            s_in = x * keep[:, None, None, None, :].to(x.dtype)
        s_out = student(s_in, mask=s_mask)

        # 5. named losses
        parts: dict[str, torch.Tensor] = {}
        tt, pt, st = values.teacher_temp, values.patch_teacher_temp, cfg.loss.student_temp

        targets: dict[str, torch.Tensor] = {}  # each term's teacher targets, for the learning monitor

        def cross_view(name, loss_fn, s_logits, t_logits, temp):
            # the student's view u learns the teacher's view v and vice versa
            p_v, p_u = loss_fn.teacher_probs(t_logits[b:], temp), loss_fn.teacher_probs(t_logits[:b], temp)
            targets[name] = torch.cat([p_u, p_v])
            return (loss_fn.cross_entropy(s_logits[:b], p_v, st) + loss_fn.cross_entropy(s_logits[b:], p_u, st))

        if self.aitd_loss is not None:
            parts["aitd"] = cross_view("aitd", self.aitd_loss, s_out.cls_logits, t_out.cls_logits, tt)
        if self.gitd_loss is not None:
            parts["gitd"] = cross_view("gitd", self.gitd_loss, s_out.global_logits, t_out.global_logits, tt)
        if self.ampd_loss is not None:
            w = s_mask.reshape(2 * b, -1)
            f = self.ampd_loss
            p_u, p_v = (f.teacher_probs(t_out.patch_logits[:b], pt, w[:b]),
                        f.teacher_probs(t_out.patch_logits[b:], pt, w[b:]))
            parts["ampd"] = (f.cross_entropy(s_out.patch_logits[:b], p_u, st, w[:b])
                             + f.cross_entropy(s_out.patch_logits[b:], p_v, st, w[b:]))
            targets["ampd"] = torch.cat([p_u, p_v])[w]  # the masked tokens' targets
        if self.amip_loss is not None:
            parts["amip"] = self.amip_loss(s_out.reconstruction, x, s_mask)
        # KoLeo on the pooled global-stage token, the SA [CLS] token and/or the image-level projection outputs z
        # (GITD's and AITD's, each its own term): each view's rows apart from one another (DINOv2: per global
        # crop); a batch of one crop (the held-out measures, `dagman attention`) has no neighbour, and no KoLeo term
        stage = cfg.loss.global_token_stage
        koleo_rows = {"koleo": (cfg.loss.koleo_weight, lambda: [s_out.features.tokens[stage].mean(1)]),
                      "koleo_cls": (cfg.loss.koleo_cls_weight, lambda: [s_out.cls]),
                      "koleo_head": (cfg.loss.koleo_head_weight,
                                     lambda: [z for z in (s_out.global_z, s_out.cls_z) if z is not None])}
        for name, (weight, rows_of) in koleo_rows.items():
            if weight > 0 and b >= 2:
                parts[name] = sum(koleo_loss(feats[:b]) + koleo_loss(feats[b:]) for feats in rows_of())
        # before loss.distill_start_epochs the distillation terms are computed (the monitor reads them) but weigh 0
        distill = 1.0 if getattr(values, "distill_on", True) else 0.0
        weights = {"amip": cfg.loss.amip_weight, "ampd": distill * cfg.loss.ampd_weight,
                   "aitd": distill * cfg.loss.aitd_weight, "gitd": distill * cfg.loss.gitd_weight,
                   **{name: weight for name, (weight, _) in koleo_rows.items()}}
        total = sum(weights[name] * value for name, value in parts.items())

        stats = {"student_mask_fraction": s_mask.float().mean()}
        if drop is not None:
            stats["teacher_drop_fraction"] = drop.float().mean()
        # collapse monitor: spread of the teacher's image-level logits across the inputs of this batch (mean over
        # prototypes of the std across rows); ~0 means the teacher says the same for every input
        for name, logits in (("cls", t_out.cls_logits), ("global", t_out.global_logits)):
            if logits is not None and logits.shape[0] > 1:
                stats[f"teacher_{name}_spread"] = logits.detach().float().std(0).mean()
        # the learning monitor (dagman.ssl.monitor): each term against its uniform value 2 ln K, the entropy of
        # the teacher's targets and of their batch mean, the centre's norm; the importance map's entropy
        uniform = 2 * math.log(cfg.heads.num_prototypes)
        for name, probs in targets.items():
            stats[f"{name}_uniform_ratio"] = parts[name].detach() / uniform
            stats.update(teacher_monitor(probs, name))
            stats[f"center_{name}_norm"] = getattr(self, f"{name}_loss").center.norm()
        importance = scores if scores is not None else t_out.importance
        if importance is not None:
            stats["importance_entropy"] = entropy_ratio(importance.detach()).mean()
        return StepResult(
            loss=total,
            parts={k: v.detach() for k, v in parts.items()},
            stats=stats,
            masks={"student": s_mask, "teacher_drop": drop, "importance": scores},
            teacher_logits={"aitd": t_out.cls_logits, "gitd": t_out.global_logits, "ampd": t_out.patch_logits},
            reconstruction=s_out.reconstruction.detach() if s_out.reconstruction is not None else None,
        )

    @torch.no_grad()
    def update_centers(self, result: StepResult) -> None:
        """EMA of the teacher-output centres with this step's teacher logits (all-reduced under DDP), and the
        Sinkhorn-Knopp queues (loss.sinkhorn_queue) take them in.
        Called by the trainer once the step is known to be finite, after the losses used the old centres."""
        for name, loss_fn in (("aitd", self.aitd_loss), ("gitd", self.gitd_loss), ("ampd", self.ampd_loss)):
            if loss_fn is not None:
                loss_fn.update_center(result.teacher_logits[name])
                loss_fn.update_queue(result.teacher_logits[name])
