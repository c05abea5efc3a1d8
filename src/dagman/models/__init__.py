from dagman.models.swin import (
    MaskTokenEncoder,
    SwinBackbone,
    SwinFeatures,
    build_backbone,
    upsample_mask,
)

__all__ = ["MaskTokenEncoder", "SwinBackbone", "SwinFeatures", "build_backbone", "upsample_mask"]
