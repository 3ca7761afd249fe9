"""The family registry: for each kind of model, where its ``first`` and ``last`` tokens come from.

A :class:`Family` says whether a model is of that family (``matches``) and how to hook it (``wire``, which
returns a :class:`Wiring`: the module whose output is ``first``, the one whose output is ``last``, the
number of prefix tokens, how to read the grid, the mask and the kept patches). The entries live in
``timm_families``, ``hf`` and ``torchvision`` beside this module; :func:`register_family` adds one, and
:class:`TokenSpec` is the generic form for any model.

Example:
    >>> spec = TokenSpec(first="patch_embed", last="norm", num_prefix_tokens=1)
    >>> div = fastpatchdiv.attach(model, tokens=spec)
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import nn

Grid = tuple[int, int]


class Hook(Enum):
    """Where a module is watched: before its forward (its inputs) or after (its output)."""

    PRE = "forward pre-hook"
    POST = "forward hook"


@dataclass(frozen=True)
class Tap:
    """A module whose forward gives tokens.

    ``read(args, kwargs, output)`` returns ``(x, grid)``: x is (B, N, D) or NHWC (B, H, W, D) (flattened
    row-major later), prefix tokens included for ``last``; grid is the (H, W) patch grid or None when the
    shape does not tell. ``output`` is None for a ``Hook.PRE`` tap.
    """

    module: nn.Module
    read: Callable[[tuple, dict, Any], tuple[torch.Tensor, Grid | None]]
    hook: Hook = Hook.POST


@dataclass(frozen=True)
class Note:
    """A module whose forward tells something about the batch: ``apply(record, args, kwargs, output)``."""

    module: nn.Module
    apply: Callable[[Any, tuple, dict, Any], None]
    hook: Hook = Hook.POST


@dataclass(frozen=True)
class Wiring:
    """Where one model's tokens come from: what a :class:`Family` returns for that model.

    Args:
        start: the first module of the token path; a call of it outside a call of the model itself
            (``forward_features`` + ``forward_head``, as timm's FeatureDistillationTask runs) begins a record.
        first: the tap of the first-layer tokens (None: only the cosine and mixing losses can be used).
        last: the tap of the last-layer tokens.
        num_prefix_tokens: leading class/register/distillation tokens of ``last`` to drop.
        dim: the width D of ``last`` (the patch head's in_features), None if unknown.
        num_classes: the model's classifier size, 0 if none.
        patch_size: pixels per last-layer token (H, W), what ``div.cutmix`` mixes by; None if unknown.
        notes: further hooks (mask, kept patches, grid).
        blind_drop: why first and last tokens cannot be paired (patch dropout that does not say which
            patches it kept), or "" when they can.
    """

    start: nn.Module
    first: Tap | None
    last: Tap
    num_prefix_tokens: int
    dim: int | None
    num_classes: int
    patch_size: Grid | None
    notes: tuple[Note, ...] = ()
    blind_drop: str = ""


@dataclass(frozen=True)
class Family:
    """A registry entry: ``matches(model)`` and ``wire(model, last_block) -> Wiring``."""

    name: str
    matches: Callable[[nn.Module], bool]
    wire: Callable[[nn.Module, int | None], Wiring]


@dataclass(frozen=True)
class TokenSpec:
    """The generic form, for a model no registry entry knows.

    Args:
        last: the module (or its dotted name in the model) whose output is the last-layer tokens,
            (B, P + N, D) with P prefix tokens, or NHWC (B, H, W, D); a tuple output's first item is taken.
        first: the module (or name) whose output is the first-layer tokens (B, N, D) or (B, H, W, D), or
            None (then ``contrastive_weight`` must be 0).
        num_prefix_tokens: P, the leading tokens of ``last`` that are not patches.
        grid: the (H, W) patch grid, for ``negatives="window"`` when the outputs are not NHWC.
        dim: D, for the patch head of the mixing loss (else pass ``head=``).
        num_classes: the class count, for the patch head and ``div.cutmix``.
        patch_size: pixels per last-layer token, for ``div.cutmix``.
    """

    last: nn.Module | str
    first: nn.Module | str | None = None
    num_prefix_tokens: int = 0
    grid: Grid | None = None
    dim: int | None = None
    num_classes: int = 0
    patch_size: int | Grid | None = None

    def wire(self, model: nn.Module, last_block: int | None) -> Wiring:
        if last_block is not None:
            raise ValueError("last_block is for the registry's families; with tokens= name the last module itself")
        if isinstance(self.num_prefix_tokens, bool) or not isinstance(self.num_prefix_tokens, int):
            raise TypeError(f"num_prefix_tokens must be an int >= 0, got {self.num_prefix_tokens!r}")
        if self.num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be an int >= 0, got {self.num_prefix_tokens!r}")
        grid = None if self.grid is None else pair(self.grid)
        last = _module(model, self.last, "last")
        first = None if self.first is None else _module(model, self.first, "first")

        def read(args, kwargs, output):
            x, shape_grid = nhwc_tokens(args, kwargs, output)
            return x, shape_grid or grid

        return Wiring(
            start=first if first is not None else last,
            first=None if first is None else Tap(first, read),
            last=Tap(last, read),
            num_prefix_tokens=self.num_prefix_tokens,
            dim=self.dim,
            num_classes=int(self.num_classes or 0),
            patch_size=None if self.patch_size is None else pair(self.patch_size),
        )


FAMILIES: list[Family] = []


def register_family(family: Family) -> Family:
    """Add (or replace, by name) a family; entries registered later are tried first.

    Args:
        family: the entry.

    Returns:
        The entry, so this works as a decorator-like call at import time.

    Example:
        >>> register_family(Family("MyViT", lambda m: isinstance(m, MyViT), wire_my_vit))
    """
    FAMILIES[:] = [f for f in FAMILIES if f.name != family.name]
    FAMILIES.insert(0, family)
    return family


def find_family(model: nn.Module) -> Family | None:
    """The first registered family that matches the model, or None."""
    return next((family for family in FAMILIES if family.matches(model)), None)


# -- helpers for the entries -----------------------------------------------------------------------------


def loaded_class(module: str, name: str) -> type | None:
    """``module.name`` if that module is already imported, else None (a model of it cannot exist then)."""
    mod = sys.modules.get(module)
    return getattr(mod, name, None) if mod is not None else None


def is_instance(model: nn.Module, module: str, names: Sequence[str]) -> bool:
    """Whether the model is an instance of one of ``module``'s classes ``names`` (loaded lazily)."""
    classes = tuple(c for c in (loaded_class(module, n) for n in names) if isinstance(c, type))
    return bool(classes) and isinstance(model, classes)


def pair(value) -> Grid:
    """(h, w) from an int or a 2-sequence of ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    h, w = value
    return (int(h), int(w))


def tensor_of(output) -> torch.Tensor:
    """The token tensor of a module output: the tensor itself, or the first item of a tuple/list/ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output[0]  # transformers' ModelOutput indexes like a tuple


def nhwc_tokens(args, kwargs, output) -> tuple[torch.Tensor, Grid | None]:
    """A (B, N, D) output as is; an NHWC (B, H, W, D) output with its grid."""
    x = tensor_of(output)
    return x, (tuple(x.shape[1:3]) if x.dim() == 4 else None)


def nchw_tokens(args, kwargs, output) -> tuple[torch.Tensor, Grid | None]:
    """A convolution's (B, D, H, W) output as NHWC (a view) with its grid."""
    x = tensor_of(output).permute(0, 2, 3, 1)
    return x, tuple(x.shape[1:3])


def first_param(model: nn.Module) -> torch.Tensor | None:
    return next((p for p in model.parameters() if p.is_floating_point()), None)


def _module(model: nn.Module, ref, role: str) -> nn.Module:
    if isinstance(ref, nn.Module):
        if not any(m is ref for m in model.modules()):
            raise ValueError(f"TokenSpec.{role} is a {type(ref).__name__} that is not a module of the model")
        return ref
    if not isinstance(ref, str):
        raise TypeError(f"TokenSpec.{role} must be an nn.Module of the model or its dotted name, got {ref!r}")
    try:
        return model.get_submodule(ref)
    except AttributeError as exc:
        raise ValueError(f"TokenSpec.{role}={ref!r} names no module of the {type(model).__name__}") from exc
