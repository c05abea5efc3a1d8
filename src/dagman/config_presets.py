"""The presets of :mod:`dagman.config`: partial nested dicts laid over the dataclass defaults (= paper x dagman).

Presets: two independent axes, composed as ``defaults <- size preset <- method preset``. A size preset
only touches model / data / heads / schedule lengths / precision / logging; a method preset only touches
the student mask, the teacher noise, the SA block and the losses (never code paths).

======== ===== ============ ============ ====== ========== ======== ===== ======== ======== ==========
size     embed depths       heads        SA hd  crop (vox) batch/pr protos hidden/bn epochs  precision
======== ===== ============ ============ ====== ========== ======== ===== ======== ======== ==========
paper    48    (2,2,8,2)    (4,4,8,16)   8      128        2        8192  2048/256 800      bf16
small    24    (2,2,2,2)    (3,6,12,24)  8      96         4        4096  1024/256 100      bf16
tiny     12    (1,1,2,1)    (2,2,4,8)    4      64         2        1024  256/64   10       fp32
cpu      12    (1,1,2,1)    (2,2,4,8)    4      32         8        1024  256/64   10       fp32
======== ===== ============ ============ ====== ========== ======== ===== ======== ======== ==========

``paper`` is method.md verbatim (4 processes x batch 2 = the reference global batch 8, so lr 8e-4);
``small`` trains on one GPU in hours; ``tiny`` runs a step in about a second on 2 CPU cores (tests, demo).
``cpu`` is tiny's network set up to learn on a 2-core CPU (issue 14, docs/RESULTS.md "Why the tiny runs
collapse" and "Dimensional collapse"): 32^3 crops (the evaluations' input size) in batches of 8, stage-2 mask
units (8^3 voxels, 64 per crop) scored by an SA block on stage 2 (LayerScale 1, class-attention temperature
0.01: the first setting whose importance map passes issue 14's S <= 0.9 ln N on the held-out CT, run d4) and
reconstructed by the AMIP head from the stage-2 map; Sinkhorn-Knopp teacher targets with a 256-row queue for
the image-level terms (temperature 0.005) and patch temperature 0.02; and DINOv2's KoLeo term (weight 0.1) on
the pooled last stage, without which GITD collapses the features' rank and takes the organ information away
(runs s1, s12, s12b).
Warm-ups scale with the length: paper 80 lr-warm-up / 30 teacher-temperature epochs of 800; small 10 / 10
of 100; tiny 1 / 2 of 10.

============= ==================== =================== ===== ============================ ================
method        student mask         teacher noise (r_t) SA    losses                       weights
============= ==================== =================== ===== ============================ ================
dagman        attention_hint r .7  patch drop 0.7      yes   AMIP+AMPD+AITD+GITD          1, 0.1, 0.1, 0.1
dagman-no-nt  attention_hint       none (0)            yes   AMIP+AMPD+AITD+GITD          1, 0.1, 0.1, 0.1
dagman-no-sa  random 0.7           patch drop 0.7      no    AMIP+AMPD+GITD               1, 0.1, -, 0.1
smit          random 0.7           none                no    AMIP+AMPD+GITD               1, 0.1, -, 0.1
ibot          blockwise            none                no    AMPD+GITD                    -, 1, -, 1
attmask       attention_hint       none                yes   AMPD+AITD                    -, 1, 1, -
============= ==================== =================== ===== ============================ ================

(weights in the order amip, ampd, aitd, gitd.) Without AMIP, ``ibot`` and ``attmask`` weight their
distillation terms 1 as the original iBOT / AttMask recipes do; with AMIP the DAGMaN total
``L = L_AMIP + 0.1 (L_AMPD + L_AITD + L_GITD)`` applies. ``mask.student=attention_high`` turns ``attmask``
into AttMask-High. Loss ablations: ``loss.amip=false`` etc.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DEFAULT_WEIGHTS", "METHOD_PRESETS", "SIZE_PRESETS"]

#: the loss weights of the dataclass defaults (LossConfig), kept by a method preset for the losses it turns off
DEFAULT_WEIGHTS = {"amip": 1.0, "ampd": 0.1, "aitd": 0.1, "gitd": 0.1}

SIZE_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {},
    "small": {
        "model": {"embed_dim": 24, "depths": [2, 2, 2, 2], "num_heads": [3, 6, 12, 24]},
        "sa": {"num_heads": 8},
        "data": {"crop_size": 96, "batch_size": 4, "num_workers": 4},
        "heads": {"num_prototypes": 4096, "hidden_dim": 1024, "bottleneck_dim": 256},
        "loss": {"teacher_temp_warmup_epochs": 10, "patch_teacher_temp_hold_epochs": 10},
        "optim": {"warmup_epochs": 10},
        "train": {
            "epochs": 100,
            "precision": "bf16",
            "log_every_steps": 20,
            "checkpoint_every_steps": 500,
            "snapshot_every_epochs": 25,
            "diversity_every_epochs": 10,
        },
    },
    # what learns on a 2-core CPU (issue 14; docs/RESULTS.md "Why the tiny runs collapse", "Dimensional
    # collapse"): tiny's network on 32^3 crops in batches of 8, 8^3-voxel mask units (stage 2: 64 per crop) that
    # the SA block scores and the AMIP head reconstructs from the same map, the SA gammas at 1, Sinkhorn-Knopp
    # teacher targets with a queue for the image-level terms, and KoLeo against the rank collapse GITD causes
    "cpu": {
        "model": {"embed_dim": 12, "depths": [1, 1, 2, 1], "num_heads": [2, 2, 4, 8]},
        "sa": {"num_heads": 4, "stage": 2, "layerscale_init": 1.0, "temperature": 0.01},
        "mask": {"unit_stage": 2},
        "data": {"crop_size": 32, "batch_size": 8, "num_workers": 1},
        "heads": {"num_prototypes": 1024, "hidden_dim": 256, "bottleneck_dim": 64, "reconstruction_stage": 2},
        "loss": {"teacher_norm": "sinkhorn_knopp", "sinkhorn_queue": 256, "koleo_weight": 0.1,
                 "teacher_temp_start": 0.005, "teacher_temp_end": 0.005,
                 "patch_teacher_temp_start": 0.02, "patch_teacher_temp_end": 0.02,
                 "teacher_temp_warmup_epochs": 2, "patch_teacher_temp_hold_epochs": 2},
        "optim": {"warmup_epochs": 1},
        "train": {
            "epochs": 10,
            "precision": "fp32",
            "log_every_steps": 10,
            "checkpoint_every_steps": 500,
            "snapshot_every_epochs": 0,
            "diversity_every_epochs": 5,
            "diversity_crops": 2,
        },
    },
    "tiny": {
        "model": {"embed_dim": 12, "depths": [1, 1, 2, 1], "num_heads": [2, 2, 4, 8]},
        "sa": {"num_heads": 4},
        "data": {"crop_size": 64, "batch_size": 2, "num_workers": 0},
        "heads": {"num_prototypes": 1024, "hidden_dim": 256, "bottleneck_dim": 64},
        "loss": {"teacher_temp_warmup_epochs": 2, "patch_teacher_temp_hold_epochs": 2},
        "optim": {"warmup_epochs": 1},
        "train": {
            "epochs": 10,
            "precision": "fp32",
            "log_every_steps": 1,
            "checkpoint_every_steps": 20,
            "snapshot_every_epochs": 0,
            "diversity_every_epochs": 5,
            "diversity_crops": 2,
        },
    },
}


def _method(student: str, drop: float, sa: bool, losses: dict[str, float]) -> dict[str, dict[str, Any]]:
    """A method preset: student mask kind, teacher drop ratio, SA on/off and the weight of each enabled loss.
    Every method preset sets the same keys, so the table is explicit."""
    loss: dict[str, Any] = {}
    for name in ("amip", "ampd", "aitd", "gitd"):
        loss[name] = name in losses
        loss[f"{name}_weight"] = losses.get(name, DEFAULT_WEIGHTS[name])
    return {
        "mask": {"student": student, "teacher_drop_ratio": drop},
        "sa": {"enabled": sa},
        "loss": loss,
    }


_DAGMAN_LOSSES = {"amip": 1.0, "ampd": 0.1, "aitd": 0.1, "gitd": 0.1}
_SMIT_LOSSES = {"amip": 1.0, "ampd": 0.1, "gitd": 0.1}

METHOD_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "dagman": _method("attention_hint", 0.7, True, _DAGMAN_LOSSES),
    "dagman-no-nt": _method("attention_hint", 0.0, True, _DAGMAN_LOSSES),
    "dagman-no-sa": _method("random", 0.7, False, _SMIT_LOSSES),
    "smit": _method("random", 0.0, False, _SMIT_LOSSES),
    "ibot": _method("blockwise", 0.0, False, {"ampd": 1.0, "gitd": 1.0}),
    "attmask": _method("attention_hint", 0.0, True, {"ampd": 1.0, "aitd": 1.0}),
}
