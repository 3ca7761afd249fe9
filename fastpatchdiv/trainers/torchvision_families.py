"""Registry entry for torchvision's ``VisionTransformer`` (vit_b_16 and its siblings).

``first`` = the output of ``model.conv_proj`` (the patch embedding, NCHW, taken as (B, H·W, D) row-major),
``last`` = ``model.encoder.ln``'s output without the class token.

Example:
    >>> div = fastpatchdiv.attach(torchvision.models.vit_b_16(num_classes=10))
"""

from __future__ import annotations

from torch import nn

from fastpatchdiv.trainers.registry import (
    Family,
    Tap,
    Wiring,
    is_instance,
    nchw_tokens,
    pair,
    register_family,
    tensor_of,
)


def wire_vit(model: nn.Module, last_block: int | None) -> Wiring:
    if last_block is not None:
        raise ValueError("last_block is for timm models; for torchvision pass tokens=TokenSpec(...)")
    return Wiring(
        start=model.conv_proj,
        first=Tap(model.conv_proj, nchw_tokens),
        last=Tap(model.encoder.ln, lambda args, kwargs, output: (tensor_of(output), None)),
        num_prefix_tokens=1,
        dim=int(model.hidden_dim),
        num_classes=int(model.num_classes),
        patch_size=pair(model.patch_size),
    )


register_family(
    Family(
        "torchvision.VisionTransformer",
        lambda m: is_instance(m, "torchvision.models.vision_transformer", ("VisionTransformer",)),
        wire_vit,
    )
)
