"""Registry entries for timm: the VisionTransformer family, Eva, Beit, RelPos, NaFlexVit, Swin and SwinV2.

Non-hierarchical models: ``first`` = ``model.patch_embed``'s output (before position embeddings and
prefix tokens; NaFlexVit: the patch projection inside ``model.embeds``), ``last`` = ``model.norm``'s output
(or ``model.blocks[last_block]``'s) with ``model.num_prefix_tokens`` dropped.

Swin and SwinV2 (hierarchical): ``last`` = ``model.norm``'s output, the last stage's tokens in NHWC
(e.g. 7 x 7 x 768 for swin_tiny at 224 px) with that stage's grid; ``first`` = the tokens entering the last
stage (the output of its patch merging, ``model.layers[-1].downsample``): the earliest tokens with the last
stage's grid and width. The contrastive loss pairs each last token with its own patch's first token by dot
products, so both need the same grid and D; the patch-embedding output (56 x 56 x 96 there) has neither, and
pooling plus a projection would add a map the model does not have. One-stage models: the patch embedding.

Example:
    >>> div = fastpatchdiv.attach(timm.create_model("swin_tiny_patch4_window7_224"))
"""

from __future__ import annotations

from torch import nn

from fastpatchdiv.trainers.registry import (
    Family,
    Hook,
    Note,
    Tap,
    Wiring,
    is_instance,
    loaded_class,
    nhwc_tokens,
    pair,
    register_family,
    tensor_of,
)

_VIT_CLASSES = {
    "timm.models.vision_transformer": ("VisionTransformer",),  # ViT, DeiT, DeiT-3, distilled DeiT, registers
    "timm.models.eva": ("Eva",),
    "timm.models.beit": ("Beit",),
    "timm.models.vision_transformer_relpos": ("VisionTransformerRelPos",),
}


def _patch_embed_read(module: nn.Module):
    """timm PatchEmbed: (B, N, D), (B, H, W, D) with dynamic_img_size (NHWC), or NCHW without flatten."""

    def read(args, kwargs, output):
        x = tensor_of(output)
        if x.dim() == 4:
            if str(getattr(getattr(module, "output_fmt", None), "value", "NHWC")) == "NCHW":
                x = x.permute(0, 2, 3, 1)
            return x, tuple(x.shape[1:3])
        hw = tuple(args[0].shape[-2:]) if args and args[0].dim() == 4 else None
        if hw is not None and hasattr(module, "dynamic_feat_size"):
            grid = module.dynamic_feat_size(hw)
        else:
            grid = getattr(module, "grid_size", None) or ()
        return x, (tuple(int(g) for g in grid) if len(grid) == 2 else None)

    return read


def _last_tap(model: nn.Module, last_block: int | None) -> Tap:
    if last_block is None:
        return Tap(model.norm, nhwc_tokens)
    blocks = model.blocks
    if isinstance(last_block, bool) or not isinstance(last_block, int):
        raise TypeError(f"last_block must be None or an int, got {last_block!r}")
    if not -len(blocks) <= last_block < len(blocks):
        raise ValueError(f"last_block={last_block} is out of range for a model with {len(blocks)} blocks")
    return Tap(blocks[last_block], nhwc_tokens)


def _keep_note(model: nn.Module) -> tuple[Note, ...]:
    patch_drop = getattr(model, "patch_drop", None)
    if not isinstance(patch_drop, nn.Module):
        return ()

    def apply(rec, args, kwargs, output):
        if isinstance(output, tuple) and len(output) > 1:
            rec.keep = output[1]  # (B, kept) patch indices, prefix tokens excluded; None when not dropping

    return (Note(patch_drop, apply),)


def _blind_drop(model: nn.Module) -> str:
    patch_dropout = loaded_class("timm.layers.patch_dropout", "PatchDropout")
    drop = getattr(model, "patch_drop", None)
    if patch_dropout is not None and isinstance(drop, patch_dropout) and drop.prob > 0:
        return f"{type(model).__name__} drops patches (patch_drop_rate={drop.prob}) without telling which"
    return ""


def _size(model: nn.Module) -> tuple[int, int]:
    return int(model.embed_dim), int(getattr(model, "num_classes", 0) or 0)


def wire_vit(model: nn.Module, last_block: int | None) -> Wiring:
    dim, classes = _size(model)
    return Wiring(
        start=model.patch_embed,
        first=Tap(model.patch_embed, _patch_embed_read(model.patch_embed)),
        last=_last_tap(model, last_block),
        num_prefix_tokens=int(model.num_prefix_tokens),
        dim=dim,
        num_classes=classes,
        patch_size=pair(model.patch_embed.patch_size),
        notes=_keep_note(model),
        blind_drop=_blind_drop(model),
    )


def wire_naflex(model: nn.Module, last_block: int | None) -> Wiring:
    embeds = model.embeds

    def inputs(rec, args, kwargs, output):
        valid = kwargs.get("patch_valid")
        rec.mask = None if valid is None else valid.bool()
        rec.flex = kwargs.get("patch_coord") is not None

    def grid(rec, args, kwargs, output):
        size = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        rec.first_grid = None if size is None or rec.flex else (int(size[0]), int(size[1]))

    def projection(args, kwargs, output):
        # NaFlexEmbeds adds the position embedding to this very tensor in place: keep a copy.
        return output.clone(), None

    dim, classes = _size(model)
    return Wiring(
        start=embeds,
        first=Tap(embeds.norm, projection),
        last=_last_tap(model, last_block),
        num_prefix_tokens=int(model.num_prefix_tokens),
        dim=dim,
        num_classes=classes,
        patch_size=pair(embeds.patch_size),
        notes=(Note(embeds, inputs, Hook.PRE), Note(embeds, grid)) + _keep_note(model),
    )


def wire_swin(model: nn.Module, last_block: int | None) -> Wiring:
    if last_block is not None:
        raise ValueError("last_block is for models with a flat list of blocks; Swin's last tokens are model.norm's")
    stride = pair(model.patch_embed.patch_size)
    merges = sum(not isinstance(stage.downsample, nn.Identity) for stage in model.layers)
    first = model.layers[-1].downsample if len(model.layers) > 1 else model.patch_embed
    return Wiring(
        start=model.patch_embed,
        first=Tap(first, nhwc_tokens),
        last=Tap(model.norm, nhwc_tokens),
        num_prefix_tokens=0,
        dim=int(model.num_features),
        num_classes=int(getattr(model, "num_classes", 0) or 0),
        patch_size=(stride[0] * 2**merges, stride[1] * 2**merges),
    )


register_family(
    Family("timm.VisionTransformer", lambda m: any(is_instance(m, k, v) for k, v in _VIT_CLASSES.items()), wire_vit)
)
register_family(
    Family("timm.NaFlexVit", lambda m: is_instance(m, "timm.models.naflexvit", ("NaFlexVit",)), wire_naflex)
)
register_family(
    Family(
        "timm.SwinTransformer",
        lambda m: (
            is_instance(m, "timm.models.swin_transformer", ("SwinTransformer",))
            or is_instance(m, "timm.models.swin_transformer_v2", ("SwinTransformerV2",))
        ),
        wire_swin,
    )
)
