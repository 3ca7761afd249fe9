"""Registry entries for Hugging Face transformers: ViT, DeiT, Dinov2 (with or without registers) and Swin.

Any model whose ``base_model`` is one of ``ViTModel``, ``DeiTModel``, ``Dinov2Model``,
``Dinov2WithRegistersModel`` or ``SwinModel`` (``...ForImageClassification`` included). ``first`` = the
output of ``base.embeddings.patch_embeddings`` (before the class/distillation/register tokens and position
embeddings), ``last`` = ``base.layernorm``'s output without the prefix tokens (1 for ViT and Dinov2, 2 for
DeiT's class and distillation tokens, 1 + ``config.num_register_tokens`` with registers). Swin, as timm's
(see ``timm_families``): ``last`` = the final layernorm's (B, N, C) last-stage tokens with that stage's
grid, ``first`` = the tokens entering the last stage (the input of ``base.encoder.layers[-1]``).

Example:
    >>> model = transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=10))
    >>> div = fastpatchdiv.attach(model, cosine_weight=1.0, contrastive_weight=0.5)
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
    pair,
    register_family,
    tensor_of,
)

_PREFIX_TOKENS = {  # base model class -> (its module, class and distillation tokens before any registers)
    "ViTModel": ("transformers.models.vit.modeling_vit", 1),
    "DeiTModel": ("transformers.models.deit.modeling_deit", 2),
    "Dinov2Model": ("transformers.models.dinov2.modeling_dinov2", 1),
    "Dinov2WithRegistersModel": ("transformers.models.dinov2_with_registers.modeling_dinov2_with_registers", 1),
}
_SWIN = ("transformers.models.swin.modeling_swin", ("SwinModel",))


def _base(model: nn.Module) -> nn.Module | None:
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else None


def _vit_class(model: nn.Module) -> str | None:
    base = _base(model)
    return next((name for name, (mod, _) in _PREFIX_TOKENS.items() if is_instance(base, mod, (name,))), None)


def _classes(model: nn.Module, base: nn.Module) -> int:
    return 0 if model is base else int(getattr(model.config, "num_labels", 0) or 0)


def wire_vit(model: nn.Module, last_block: int | None) -> Wiring:
    if last_block is not None:
        raise ValueError("last_block is for timm models; for a Hugging Face model pass tokens=TokenSpec(...)")
    base, config = _base(model), model.config
    patch = pair(config.patch_size)
    embed = base.embeddings.patch_embeddings

    def first(args, kwargs, output):
        pixels = args[0] if args else kwargs["pixel_values"]
        return tensor_of(output), (pixels.shape[-2] // patch[0], pixels.shape[-1] // patch[1])

    prefix = _PREFIX_TOKENS[_vit_class(model)][1] + int(getattr(config, "num_register_tokens", 0) or 0)
    return Wiring(
        start=embed,
        first=Tap(embed, first),
        last=Tap(base.layernorm, lambda args, kwargs, output: (tensor_of(output), None)),
        num_prefix_tokens=prefix,
        dim=int(config.hidden_size),
        num_classes=_classes(model, base),
        patch_size=patch,
    )


def wire_swin(model: nn.Module, last_block: int | None) -> Wiring:
    if last_block is not None:
        raise ValueError("last_block is for timm models; Swin's last tokens are the final layernorm's")
    base, config = _base(model), model.config
    stage = base.encoder.layers[-1]

    def first(args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        dims = args[1] if len(args) > 1 else kwargs["input_dimensions"]
        return hidden, (int(dims[0]), int(dims[1]))

    def last_grid(rec, args, kwargs, output):  # the last stage has no patch merging: its grid is its input's
        dims = args[1] if len(args) > 1 else kwargs["input_dimensions"]
        rec.last_grid = (int(dims[0]), int(dims[1]))

    patch, merges = pair(config.patch_size), len(config.depths) - 1
    return Wiring(
        start=base.embeddings,
        first=Tap(stage, first, Hook.PRE),
        last=Tap(base.layernorm, lambda args, kwargs, output: (tensor_of(output), None)),
        num_prefix_tokens=0,
        dim=int(base.num_features),
        num_classes=_classes(model, base),
        patch_size=(patch[0] * 2**merges, patch[1] * 2**merges),
        notes=(Note(stage, last_grid, Hook.PRE),),
    )


register_family(Family("transformers.ViT", lambda m: _vit_class(m) is not None, wire_vit))
register_family(Family("transformers.Swin", lambda m: is_instance(_base(m), *_SWIN), wire_swin))
