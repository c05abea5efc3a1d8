"""Self-supervised building blocks: mask generators (:mod:`dagman.ssl.masking`) and losses
(:mod:`dagman.ssl.losses`). Pure tensor-in / tensor-out; the training step lives in ``dagman.ssl.method``."""

from dagman.ssl.losses import DistillationLoss, MaskedReconstructionLoss
from dagman.ssl.masking import (
    MASK_KINDS,
    attention_high_mask,
    attention_hint_mask,
    attention_low_mask,
    attention_mask_counts,
    blockwise_mask,
    make_student_mask,
    random_mask,
    random_mask_count,
    student_mask_from_config,
    teacher_drop_mask,
)

__all__ = [
    "DistillationLoss",
    "MaskedReconstructionLoss",
    "MASK_KINDS",
    "attention_high_mask",
    "attention_hint_mask",
    "attention_low_mask",
    "attention_mask_counts",
    "blockwise_mask",
    "make_student_mask",
    "random_mask",
    "random_mask_count",
    "student_mask_from_config",
    "teacher_drop_mask",
]
