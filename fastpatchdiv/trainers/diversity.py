"""``attach``: the patch-diversification losses in an unchanged training loop, and the object it returns.

Example:
    >>> div = fastpatchdiv.attach(model, cosine_weight=1.0, contrastive_weight=0.5)
    >>> loss = criterion(model(images), targets) + div.loss()
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import torch
from torch import nn

from fastpatchdiv._common import check_flag, check_precision, work_dtype
from fastpatchdiv.contrastive import PatchContrastiveLoss
from fastpatchdiv.cosine import PatchCosineLoss
from fastpatchdiv.cutmix import cutmix_patches
from fastpatchdiv.mixing import PatchMixingLoss
from fastpatchdiv.trainers.record import Record, Recorder, flat
from fastpatchdiv.trainers.registry import FAMILIES, Grid, TokenSpec, Wiring, find_family, first_param

_NAMES = {PatchCosineLoss: "cosine", PatchContrastiveLoss: "contrastive", PatchMixingLoss: "mixing"}
PRECISIONS = ("auto", "fp32", "tf32", "bf16", "fp16")


@dataclass
class Batch:
    """One forward's tokens as the losses take them: (B, N, D) patch tokens, prefix tokens dropped."""

    last: torch.Tensor
    first: torch.Tensor | None
    mask: torch.Tensor | None
    keep: torch.Tensor | None
    grid: Grid | None


class PatchDiversity(nn.Module):
    """The losses of the attached model's latest forward; made by :func:`attach`.

    ``loss(patch_targets=None)`` is the weighted sum of the losses in ``terms`` (a list of (weight, loss
    Module)) on the latest forward's tokens; ``losses()`` its unweighted parts; ``remove()`` (or leaving a
    ``with`` block) takes the hooks off. An nn.Module holding the mixing loss's patch head (``div.mixing``):
    ``div.parameters()``, ``div.state_dict()`` and ``div.load_state_dict()`` cover it and nothing of the
    model's; ``forward(patch_targets=None)`` is ``loss()``, so DistributedDataParallel can wrap ``div``.
    ``div.cutmix(images, targets)`` mixes a batch for the mixing loss on the model's own patch grid.
    """

    def __init__(self, recorder: Recorder, weights: dict, terms: list, mixing, owned: bool, reduction: str):
        super().__init__()
        self._recorder = recorder
        self._weights = weights
        self._reduction = reduction
        self._handles = recorder.register()
        self.terms: list[tuple[float, nn.Module]] = terms
        self._parts: dict[str, torch.Tensor] = {}
        self._removed = False
        self._placed = not owned  # an owned head moves to the tokens at the first loss()
        self.mixing = None
        if owned:
            self.mixing = mixing
        else:
            # The head is one of the model's modules: bypass nn.Module's registration so that parameters()
            # and state_dict() do not list the model's parameters a second time.
            self.__dict__["mixing"] = mixing

    @property
    def model(self) -> nn.Module:
        """The model the hooks are on (unwrapped from DDP / torch.compile)."""
        return self._recorder.root

    @property
    def weights(self) -> dict[str, float]:
        """The weight of each loss, by the names ``losses()`` uses (weights of 0 included)."""
        return dict(self._weights)

    @property
    def patch_size(self) -> Grid | None:
        """Pixels per last-layer token (H, W): the cell ``cutmix`` mixes by."""
        return self._recorder.wiring.patch_size

    def loss(self, *, patch_targets: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted losses of the latest forward: a scalar (or (B,) with ``reduction="none"``).

        Args:
            patch_targets: the mixing loss's (B, N) class indices or (B, N, C) probabilities, one per patch
                of the full grid in row-major order (``div.cutmix`` returns them); required while the
                mixing loss is on, refused otherwise.

        Returns:
            Σ weight · loss, float32 (float64 for a float64 model); zeros when every weight is 0.

        Raises:
            RuntimeError: no new forward since the last ``loss()`` (the message says why), removed hooks,
                a forward without gradients under a loss() with them, a head on another device.
            ValueError: ``patch_targets`` missing, unexpected or of the wrong shape; ``negatives="window"``
                without a full patch grid.
        """
        if self._removed:
            raise RuntimeError("this PatchDiversity was removed from its model: call fastpatchdiv.attach again")
        self._check_targets_given(patch_targets)
        rec = self._recorder.take()
        batch = self._batch(rec)
        parts, total = {}, None
        for weight, module in self.terms:
            value = self._evaluate(module, rec, batch, patch_targets)
            parts[_NAMES[type(module)]] = value.detach()
            total = weight * value if total is None else total + weight * value
        if total is None:  # every weight is 0: a zero of the right shape, no losses computed
            shape = (batch.last.shape[0],) if self._reduction == "none" else ()
            total = torch.zeros(shape, dtype=work_dtype(batch.last.dtype), device=batch.last.device)
        self._parts = parts
        return total

    def forward(self, *, patch_targets: torch.Tensor | None = None) -> torch.Tensor:
        """Same as :meth:`loss` (the call DistributedDataParallel makes when it wraps ``div``)."""
        return self.loss(patch_targets=patch_targets)

    def losses(self) -> dict[str, torch.Tensor]:
        """The unweighted parts of the latest ``loss()``, detached, by name ("cosine", "contrastive",
        "mixing"); a part whose weight is 0 is not computed and not listed; empty before the first loss()."""
        return dict(self._parts)

    def cutmix(self, images: torch.Tensor, targets: torch.Tensor, **kwargs):
        """:func:`fastpatchdiv.cutmix_patches` with the model's patch size and class count.

        Args:
            images: (B, C, H, W), H and W multiples of :attr:`patch_size`.
            targets: (B,) class indices.
            **kwargs: ``alpha``, ``per_image``, ``generator``.

        Returns:
            (mixed images, (B, N) patch targets for ``loss(patch_targets=...)``, (B, C) soft targets).

        Raises:
            ValueError: the model's patch size or class count is unknown (``TokenSpec(patch_size=...,
                num_classes=...)``), and what ``cutmix_patches`` raises.
        """
        classes = self.mixing.head.out_features if self.mixing is not None else self._recorder.wiring.num_classes
        if self.patch_size is None or not classes:
            raise ValueError(
                f"div.cutmix needs the patch size and class count of the {type(self.model).__name__} "
                f"(known: patch_size={self.patch_size}, num_classes={classes or None}); call "
                "fastpatchdiv.cutmix_patches(images, targets, patch_size, num_classes=...) yourself"
            )
        return cutmix_patches(images, targets, self.patch_size, num_classes=classes, **kwargs)

    def remove(self) -> None:
        """Take every hook off the model and drop any kept tokens; the model is as it was before attach."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._recorder.clear()
        self._recorder.release()
        self._removed = True

    def __enter__(self) -> PatchDiversity:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def extra_repr(self) -> str:
        terms = ", ".join(f"{w} * {type(m).__name__}" for w, m in self.terms)
        return f"model={type(self.model).__name__}, terms=[{terms}]" + (", removed" if self._removed else "")

    # -- helpers -----------------------------------------------------------------------------------------

    def _check_targets_given(self, patch_targets) -> None:
        if self.mixing is not None and patch_targets is None:
            raise ValueError(
                f"attach(..., mixing_weight={self._weights['mixing']}) needs the per-patch labels of this batch: "
                "div.loss(patch_targets=...), e.g. those of div.cutmix(images, targets)"
            )
        if self.mixing is None and patch_targets is not None:
            raise ValueError(
                "patch_targets were given but the mixing loss is off (mixing_weight=0): attach with "
                "mixing_weight > 0 to train on them, or drop the argument"
            )
        if patch_targets is not None and not isinstance(patch_targets, torch.Tensor):
            raise TypeError(f"patch_targets must be a torch.Tensor, got {type(patch_targets).__name__}")

    def _batch(self, rec: Record) -> Batch:
        _check_unchanged(rec.last, rec.last_version, "last")
        last = flat(rec.last)[:, self._recorder.wiring.num_prefix_tokens :]
        if torch.is_grad_enabled() and not last.requires_grad:
            self._check_gradients(rec)
        first = None
        if rec.first is not None:
            _check_unchanged(rec.first, rec.first_version, "first")
            first = flat(rec.first)
        mask, keep = rec.mask, rec.keep
        if keep is not None:
            mask = None if mask is None else mask.gather(1, keep)
            if first is not None:
                first = first.gather(1, keep.unsqueeze(-1).expand(-1, -1, first.shape[-1]))
        grid = None if rec.flex or keep is not None else (rec.last_grid or rec.first_grid)
        return Batch(last, first, mask, keep, grid)

    def _check_gradients(self, rec: Record) -> None:
        """Tokens without gradient under a loss() with gradients: fine for a frozen backbone, else an error."""
        if not any(p.requires_grad for p in self.model.parameters()):
            return
        if not rec.grad_enabled:
            raise RuntimeError(
                "the latest forward ran without gradients (torch.no_grad, inference_mode, or a reentrant "
                "checkpoint around the whole model) but loss() runs with gradients enabled, so the diversity "
                "term would silently add no gradient; to only read the values, call loss() under "
                "torch.no_grad() too"
            )
        if not rec.last_grad_enabled:
            raise RuntimeError(
                "the recorded last-layer tokens carry no gradient: the hooked module ran inside a reentrant "
                "gradient checkpoint that spans several blocks (its inner outputs are computed without autograd "
                "and recomputed in the backward); hook the final norm (last_block=None) or the last block of a "
                "checkpoint segment, or use non-reentrant checkpointing (timm's default)"
            )
        # Otherwise nothing before the last tokens trains (a frozen backbone): their losses are constants.

    def _evaluate(self, module: nn.Module, rec: Record, batch: Batch, patch_targets) -> torch.Tensor:
        if isinstance(module, PatchCosineLoss):
            return module(batch.last, batch.mask)
        if isinstance(module, PatchContrastiveLoss):
            if module.negatives == "window":
                module.grid = _window_grid(batch, rec)  # each forward's own grid (dynamic image sizes)
            # Under autocast first may be bf16/fp16 and last fp32: the loss promotes them to the wider one.
            return module(batch.first, batch.last, batch.mask)
        self._place_head(batch.last)
        return module(batch.last, _targets_for(rec, patch_targets, batch), batch.mask)

    def _place_head(self, last: torch.Tensor) -> None:
        head = self.mixing.head
        if not self._placed:
            param = first_param(self.model)
            dtype = last.dtype if param is None else param.dtype  # the model's: fp32 master weights under AMP
            self.mixing.to(device=last.device, dtype=dtype)
            self._placed = True
        elif head.weight.device != last.device:
            raise RuntimeError(
                f"the patch head is on {head.weight.device} but the model's tokens are on {last.device}: "
                f"move it with div.to({str(last.device)!r}) (the first loss() put it where the tokens were)"
            )


def _check_unchanged(x: torch.Tensor, version: int, name: str) -> None:
    # A view shares its base's version counter, so this also sees in-place writes to the full output.
    if not torch.compiler.is_compiling() and x._version != version:
        raise RuntimeError(
            f"the recorded {name}-layer tokens were modified in place after the hook saw them; "
            "this model does something attach() does not expect: use the functional API"
        )


def _window_grid(batch: Batch, rec: Record) -> Grid:
    if batch.keep is not None:
        raise ValueError(
            "negatives='window' needs every patch of the grid, and patch dropout removed some: "
            "use negatives='mean' or 'all', or turn patch dropout off"
        )
    if batch.grid is None:
        raise ValueError(
            "negatives='window' needs the patch grid, and this forward has none (a NaFlex-mode forward with "
            "patch_coord/patch_valid, or a TokenSpec without grid=): use negatives='mean' or 'all'"
        )
    n = batch.last.shape[1]
    if batch.grid[0] * batch.grid[1] != n:
        raise ValueError(f"negatives='window': the patch grid {batch.grid} does not match the N = {n} tokens")
    return batch.grid


def _targets_for(rec: Record, patch_targets: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The labels of the tokens in ``last``: checked against the forward, gathered by the kept indices."""
    b, keep = batch.last.shape[0], batch.keep
    n = batch.last.shape[1] if keep is None else (rec.patches or keep.shape[1])
    if patch_targets.dim() not in (2, 3) or tuple(patch_targets.shape[:2]) != (b, n):
        grid = rec.last_grid or rec.first_grid
        where = f" (a {grid[0]} x {grid[1]} grid)" if grid is not None and grid[0] * grid[1] == n else ""
        raise ValueError(
            f"patch_targets must be (B, N) class indices or (B, N, C) probabilities for the latest forward's "
            f"B = {b} images of N = {n} patches{where}, one per patch token; got shape "
            f"{tuple(patch_targets.shape)}"
        )
    if keep is None:
        return patch_targets
    index = keep.to(patch_targets.device)
    if patch_targets.dim() == 3:
        index = index.unsqueeze(-1).expand(-1, -1, patch_targets.shape[-1])
    return patch_targets.gather(1, index)


def attach(
    model: nn.Module,
    *,
    cosine_weight: float = 1.0,
    contrastive_weight: float = 1.0,
    mixing_weight: float = 0.0,
    head: nn.Linear | None = None,
    label_smoothing: float = 0.0,
    negatives: str = "mean",
    temperature: float = 1.0,
    normalize: bool = False,
    window: int = 7,
    detach_first: bool = True,
    reduction: str = "mean",
    last_block: int | None = None,
    tokens: TokenSpec | None = None,
    in_eval: bool = False,
    backend: str = "auto",
    precision: str = "auto",
) -> PatchDiversity:
    """Add the patch-diversification losses to a model's own forward, through forward hooks.

    Every training-mode ``model(x)`` (or ``forward_features`` + ``forward_head``) records the tokens
    ``first`` and ``last`` its family's registry entry names (README, "Use it in your trainer"), and
    ``div.loss()`` returns ``cosine_weight · PatchCosineLoss(last) + contrastive_weight ·
    PatchContrastiveLoss(first, last) + mixing_weight · PatchMixingLoss(last, patch_targets)``.

    Args:
        model: a model of a registered family (timm ViT/DeiT/Eva/Beit/RelPos/NaFlexVit/Swin/SwinV2,
            transformers ViT/DeiT/Dinov2/Swin, torchvision ViT), or any model with ``tokens=``; also its DDP
            or torch.compile wrapper (attach before the compiled model's first call).
        cosine_weight, contrastive_weight, mixing_weight: finite weights >= 0; 0 skips that loss.
        head: the mixing loss's nn.Linear(D, C); None creates one (std 0.02, zero bias) that ``div`` owns
            and moves to the tokens' device and the model's dtype at the first ``loss()``.
        label_smoothing: the mixing loss's, as ``F.cross_entropy``.
        negatives, temperature, normalize, window, detach_first: the contrastive loss's.
        reduction, backend, precision: passed to every loss.
        last_block: timm ViT families: ``model.blocks[last_block]``'s output as ``last``.
        tokens: a :class:`TokenSpec` (the generic form); overrides the registry.
        in_eval: also record eval-mode forwards.

    Returns:
        A :class:`PatchDiversity`, also a context manager that removes the hooks on exit.

    Raises:
        TypeError: a model no family knows (without ``tokens=``), nn.DataParallel, wrong argument types.
        ValueError: bad weights or loss settings; the contrastive or mixing loss where the model cannot
            supply its tokens (patch dropout without indices, no ``first``); a head of the wrong size.

    Example:
        >>> div = fastpatchdiv.attach(model, cosine_weight=1.0, contrastive_weight=0.5)
        >>> loss = F.cross_entropy(model(images), targets) + div.loss()
    """
    inner = _unwrap(model)
    wiring = _wiring(inner, tokens, last_block)
    weights = {
        "cosine": _check_weight("cosine_weight", cosine_weight),
        "contrastive": _check_weight("contrastive_weight", contrastive_weight),
        "mixing": _check_weight("mixing_weight", mixing_weight),
    }
    check_flag("in_eval", in_eval)
    check_precision(precision)
    _check_sources(inner, wiring, weights)
    contrastive = PatchContrastiveLoss(
        temperature=temperature,
        normalize=normalize,
        negatives=negatives,
        detach_first=detach_first,
        reduction=reduction,
        window=window,
        backend=backend,
        precision=precision,
    )
    cosine = PatchCosineLoss(reduction=reduction, backend=backend, precision=precision)
    terms = [(weights["cosine"], cosine)]
    terms.append((weights["contrastive"], contrastive))
    settings = dict(label_smoothing=label_smoothing, reduction=reduction, backend=backend, precision=precision)
    mixing, owned = _mixing_loss(inner, wiring, weights["mixing"], head, settings)
    terms.append((weights["mixing"], mixing))
    recorder = Recorder(inner, wiring, in_eval=in_eval, keep_first=weights["contrastive"] > 0)
    terms = [(w, m) for w, m in terms if w > 0]
    return PatchDiversity(recorder, weights, terms, mixing, owned, reduction)


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel and torch.compile wrappers (in any nesting)."""
    while True:
        if isinstance(model, nn.DataParallel):
            raise TypeError(
                "attach() does not support nn.DataParallel (its replicas run in threads on copies of the "
                "model); use DistributedDataParallel, one process per device"
            )
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def _wiring(model: nn.Module, tokens: TokenSpec | None, last_block) -> Wiring:
    if tokens is not None:
        if not isinstance(tokens, TokenSpec):
            raise TypeError(f"tokens must be a fastpatchdiv.TokenSpec, got {type(tokens).__name__}")
        return tokens.wire(model, last_block)
    family = find_family(model)
    if family is None:
        raise TypeError(
            f"fastpatchdiv.attach knows the families {', '.join(f.name for f in FAMILIES)}; got "
            f"{type(model).__name__}. Name its token modules with tokens=fastpatchdiv.TokenSpec(first=..., "
            "last=..., num_prefix_tokens=...), or call the functional API: fastpatchdiv.patch_cosine_loss(last)"
        )
    return family.wire(model, last_block)


def _check_weight(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a finite number >= 0, got {value!r}")
    if not (math.isfinite(float(value)) and float(value) >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_sources(model: nn.Module, wiring: Wiring, weights: dict) -> None:
    """The contrastive and mixing losses need tokens the model may not give: refuse them at attach."""
    if wiring.blind_drop:
        if weights["contrastive"] > 0:
            raise ValueError(
                f"{wiring.blind_drop}, so first- and last-layer tokens cannot be paired: use contrastive_weight=0 "
                "(the cosine loss works on the kept tokens), or a model without patch dropout"
            )
        if weights["mixing"] > 0:
            raise ValueError(
                f"{wiring.blind_drop}, so the kept tokens cannot be matched to their patch labels: use "
                "mixing_weight=0, or a model without patch dropout"
            )
    if wiring.first is None and weights["contrastive"] > 0:
        raise ValueError("the contrastive loss needs the first-layer tokens: give TokenSpec(first=...)")


def _mixing_loss(model: nn.Module, wiring: Wiring, weight: float, head, settings: dict):
    """(the PatchMixingLoss or None, whether div owns its head); checks ``head`` against the model."""
    if weight == 0:
        if head is not None:
            raise ValueError(
                "head is the patch head of the mixing loss, which is off (mixing_weight=0): pass mixing_weight > 0"
            )
        return None, True
    dim, classes = wiring.dim, wiring.num_classes
    if head is None:
        if not classes or dim is None:
            raise ValueError(
                f"the {type(model).__name__} has no classifier (num_classes={classes}) or no known width "
                f"(D = {dim}), so attach() cannot size the patch head of the mixing loss: pass "
                f"head=nn.Linear({dim or 'D'}, num_classes)"
            )
        mixing = PatchMixingLoss(dim, classes, **settings)  # the official code's patch_head initialisation
        param = first_param(model)
        if param is not None and not param.is_meta:  # a meta model: the head stays real, on the CPU
            mixing.to(device=param.device, dtype=param.dtype)
        return mixing, True
    if not isinstance(head, nn.Linear):
        raise TypeError(f"head must be an nn.Linear(D, num_classes), got {type(head).__name__}")
    if (dim is not None and head.in_features != dim) or (classes and head.out_features != classes):
        raise ValueError(
            f"head must be nn.Linear({dim or 'D'}, {classes or 'C'}) for this {type(model).__name__} (width "
            f"{dim}, num_classes={classes}); got nn.Linear({head.in_features}, {head.out_features})"
        )
    owned = not any(m is head for m in model.modules())
    return PatchMixingLoss(head=head, **settings), owned
