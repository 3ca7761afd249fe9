"""Patch diversification in an existing timm training loop, without editing the model.

Example:
    >>> import fastpatchdiv.timm
    >>> div = fastpatchdiv.timm.attach(model, cosine_weight=1.0, contrastive_weight=0.5)
    >>> logits = model(images)                          # the trainer's own forward, unchanged
    >>> loss = criterion(logits, targets) + div.loss()  # weighted diversity losses of that forward

Shape:
    Whatever the model takes; the hooked tokens are (B, N, D) (a (B, H, W, D) patch embedding is
    flattened), with N = the patch grid (N_b real patches per image for NaFlexVit's padded batches).

:func:`attach` puts forward hooks on the model's patch embedding and final norm (or a chosen block) that
keep references to the tokens of each ``model(...)`` call; :meth:`PatchDiversity.loss` feeds them to
:func:`fastpatchdiv.patch_cosine_loss` and :func:`fastpatchdiv.patch_contrastive_loss`. Tokens are
those of Gong et al. 2021 ("Vision Transformers with Patch Diversification", arXiv 2104.12753) and of
their official code: ``first`` = the patch-embedding output (before position embeddings and prefix
tokens), ``last`` = the final norm's output with the model's ``num_prefix_tokens`` class/register/
distillation tokens dropped.

With ``attach(..., mixing_weight=w)`` the patch mixing loss joins them: ``div.loss(patch_targets=...)``
classifies each last-layer patch token with a linear patch head (owned by ``div``: optimise
``div.parameters()`` too) as the image its pixels came from, after :func:`fastpatchdiv.cutmix_patches`.
"""

from __future__ import annotations

import importlib
import math
from numbers import Real

import torch
from torch import nn

try:
    import timm  # noqa: F401  (the check this module exists for)
    from timm.layers import PatchDropout
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError("fastpatchdiv.timm hooks into timm vision transformers and needs timm: pip install timm") from exc

from fastpatchdiv._common import check_flag, work_dtype
from fastpatchdiv.contrastive import check_settings, patch_contrastive_loss
from fastpatchdiv.cosine import patch_cosine_loss
from fastpatchdiv.mixing import PatchMixingLoss

# The model classes attach() knows, by module; a timm too old to have one simply lacks that family.
_FAMILY_MODULES = {
    "VisionTransformer": "timm.models.vision_transformer",  # ViT, DeiT, DeiT-3, distilled DeiT, registers
    "Eva": "timm.models.eva",
    "Beit": "timm.models.beit",
    "VisionTransformerRelPos": "timm.models.vision_transformer_relpos",
    "NaFlexVit": "timm.models.naflexvit",
}
SUPPORTED_FAMILIES = tuple(_FAMILY_MODULES)


def _family(model: nn.Module) -> str | None:
    for name, module in _FAMILY_MODULES.items():
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        if isinstance(model, cls):
            return name
    return None


def _unwrap(model):
    """The timm model inside DistributedDataParallel and torch.compile wrappers (in any nesting)."""
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


def _in_backward() -> bool:
    """True while the autograd engine runs a backward: where checkpointing recomputes a forward."""
    if torch.compiler.is_compiling():
        return False
    graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
    return graph_task_id is not None and graph_task_id() != -1


def _check_weight(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a finite number >= 0, got {value!r}")
    if not (math.isfinite(float(value)) and float(value) >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


class _Recorder:
    """The hooks, as bound methods, and the tokens of the model's latest recorded forward.

    A forward is recorded when the attached model itself is called (``model(...)``, also through DDP or
    torch.compile) in training mode (or in eval with ``in_eval``), not from inside a backward: gradient
    checkpointing re-runs blocks during the backward, and those calls must not replace the tokens.
    ``copy.deepcopy(model)`` (an EMA copy, for instance) copies the hooks; they then still point to
    this recorder (``__deepcopy__`` returns it), which ignores every call made by the copy.
    """

    def __init__(self, root: nn.Module, num_prefix_tokens: int, in_eval: bool, keep_first: bool, last_name: str):
        self.root = root
        self.num_prefix_tokens = num_prefix_tokens
        self.in_eval = in_eval
        self.keep_first = keep_first
        self.problem = ""
        self.last_name = last_name
        self.stack: list[bool] = []  # one entry per root call in flight: is it being recorded
        self.pending: dict | None = None
        self.latest: dict | None = None
        self.status = "no forward"

    def __deepcopy__(self, memo):
        return self

    # -- the root model ---------------------------------------------------------------------------------

    def root_pre(self, module, args):
        if module is not self.root:
            return
        if self.stack or _in_backward():  # a nested call, or checkpointing that wraps the whole model
            self.stack.append(False)
            return
        record = module.training or self.in_eval
        self.stack.append(record)
        if record:
            self.pending = {"grad_enabled": torch.is_grad_enabled(), "calls": {}}
        else:
            self.pending, self.latest, self.status = None, None, "eval"

    def root_post(self, module, args, output):
        if module is not self.root or not self.stack:
            return
        recorded = self.stack.pop()
        if not recorded or self.stack:
            return
        rec, self.pending = self.pending, None
        if output is None:  # the forward raised (this hook is always called)
            self.latest, self.status = None, "no forward"
            return
        if "last" not in rec or (self.keep_first and "first" not in rec):
            # The root's hooks ran but the inner ones did not: code compiled before attach() (dynamo does not
            # guard on the hooks of submodules) or a forward that skips the hooked modules.
            self.latest, self.status = None, "incomplete"
            return
        repeated = {what: n for what, n in rec["calls"].items() if n != 1}
        if repeated:  # reported by loss(), not here: the trainer's own forward should not fail
            self.latest, self.status = None, "repeated"
            self.problem = f"{', '.join(f'{k} ran {n} times' for k, n in repeated.items())} in one forward"
            return
        self.latest, self.status = rec, "fresh"

    # -- token sources ----------------------------------------------------------------------------------

    def _count(self, rec: dict, what: str) -> None:
        rec["calls"][what] = rec["calls"].get(what, 0) + 1

    def patch_embed_post(self, module, args, output):
        """PatchEmbed: (B, N, D), or (B, H, W, D) with dynamic_img_size (NHWC), or NCHW without flatten."""
        rec = self.pending
        if rec is None:
            return
        self._count(rec, "model.patch_embed")
        x = output
        if x.dim() == 4:
            if str(getattr(getattr(module, "output_fmt", None), "value", "NHWC")) == "NCHW":
                x = x.permute(0, 2, 3, 1)
            B, H, W, D = x.shape
            grid = (H, W)
            x = x.reshape(B, H * W, D)
        else:
            hw = tuple(args[0].shape[-2:]) if args and torch.is_tensor(args[0]) and args[0].dim() == 4 else None
            if hw is not None and hasattr(module, "dynamic_feat_size"):
                grid = tuple(module.dynamic_feat_size(hw))
            else:
                grid = tuple(getattr(module, "grid_size", None) or ())
        rec["grid"] = tuple(int(g) for g in grid) if len(grid) == 2 else None
        rec["patches"] = x.shape[1]  # before patch dropout: the count patch_targets are given for
        if self.keep_first:
            rec["first"], rec["first_version"] = x, x._version

    def naflex_embeds_pre(self, module, args, kwargs):
        rec = self.pending
        if rec is None:
            return
        valid = kwargs.get("patch_valid")
        rec["mask"] = None if valid is None else valid.bool()
        rec["naflex_mode"] = kwargs.get("patch_coord") is not None

    def naflex_embeds_post(self, module, args, output):
        rec = self.pending
        if rec is None:
            return
        grid = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        rec["grid"] = None if grid is None else (int(grid[0]), int(grid[1]))
        x = output[0] if isinstance(output, tuple) else output
        rec["patches"] = x.shape[1] - self.num_prefix_tokens  # the sequence (padding included), before dropout

    def naflex_proj_post(self, module, args, output):
        """NaFlexEmbeds.norm: the patch projection (conv or linear), flattened, before position embeddings."""
        rec = self.pending
        if rec is None:
            return
        self._count(rec, "model.embeds.norm")
        if self.keep_first:
            # NaFlexEmbeds adds the position embedding to this very tensor in place: keep a copy.
            rec["first"] = output.clone()
            rec["first_version"] = rec["first"]._version

    def patch_drop_post(self, module, args, output):
        rec = self.pending
        if rec is None:
            return
        if isinstance(output, tuple) and len(output) > 1:
            rec["keep"] = output[1]  # (B, kept) patch indices, prefix tokens excluded; None when not dropping

    def last_post(self, module, args, output):
        rec = self.pending
        if rec is None:
            return
        self._count(rec, self.last_name)
        x = output[0] if isinstance(output, (tuple, list)) else output
        # The prefix tokens are sliced off in loss(), not here: a reentrant checkpoint turns this very tensor
        # into its autograd output only after the hook ran, and a view taken now would miss that.
        rec["last"], rec["last_version"] = x, x._version


class PatchDiversity(nn.Module):
    """The diversity losses of the attached model's latest forward; made by :func:`attach`.

    ``loss(patch_targets=None)`` returns ``cosine_weight · patch_cosine_loss(last) + contrastive_weight ·
    patch_contrastive_loss(first, last) + mixing_weight · patch_mixing_loss(last, W, b, patch_targets)``
    for the tokens of the latest ``model(...)`` call, in float32 (float64 for a float64 model), computed
    with autocast off. ``losses()`` gives the unweighted parts of the latest ``loss()``. ``remove()`` (or
    leaving a ``with`` block) takes every hook off the model.

    An nn.Module that owns the patch head of the mixing loss: with ``mixing_weight > 0``, ``div.mixing``
    is a :class:`fastpatchdiv.PatchMixingLoss` and ``div.parameters()`` lists its head (W, b), which the
    optimiser must update too; ``div.state_dict()`` saves it. A head passed to :func:`attach` that is a
    module of the model (``head=model.head``) is the model's: it is used but not registered, so
    ``div.parameters()`` is empty and nothing is listed twice. The attached model is not a submodule:
    ``div.parameters()`` never lists the model's. ``forward(patch_targets=None)`` is ``loss()``, so
    DistributedDataParallel can wrap ``div`` to average the head's gradients over ranks.
    """

    def __init__(self, recorder: _Recorder, handles: list, options: dict, mixing: PatchMixingLoss | None, owned: bool):
        super().__init__()
        self._recorder = recorder
        self._handles = handles
        self._options = options
        self._parts: dict[str, torch.Tensor] = {}
        self._removed = False
        self.mixing = None
        if owned:
            self.mixing = mixing
        else:
            # The head is one of the model's modules: bypass nn.Module's registration so that parameters()
            # and state_dict() do not list the model's parameters a second time.
            self.__dict__["mixing"] = mixing

    @property
    def model(self) -> nn.Module:
        """The timm model the hooks are on (unwrapped from DDP / torch.compile)."""
        return self._recorder.root

    @property
    def weights(self) -> dict[str, float]:
        """The weights given to attach(), by loss name (the keys of ``losses()``)."""
        opt = self._options
        return {
            "cosine": opt["cosine_weight"],
            "contrastive": opt["contrastive_weight"],
            "mixing": opt["mixing_weight"],
        }

    def _check_not_removed(self) -> None:
        if self._removed:
            raise RuntimeError("this PatchDiversity was removed from its model: call fastpatchdiv.timm.attach again")

    def _take(self) -> dict:
        rec = self._recorder
        if rec.status == "fresh":
            latest, rec.latest, rec.status = rec.latest, None, "consumed"
            return latest
        if rec.status == "consumed":
            raise RuntimeError(
                "loss() was already called for the latest forward: run model(...) again before the next loss() "
                "(each loss() uses the tokens of one new forward, never stale ones)"
            )
        if rec.status == "eval":
            raise RuntimeError(
                "the latest forward ran in eval mode, where no tokens are kept: call model.train() before the "
                "forward, or attach(..., in_eval=True) to compute the losses in eval mode too"
            )
        if rec.status == "incomplete":
            raise RuntimeError(
                "the latest forward did not run the hooks inside the model (patch embedding / final norm). "
                "The usual cause: the model was compiled and run before attach(), and torch.compile does not "
                "see hooks added to submodules later. Attach before torch.compile (or call "
                "torch._dynamo.reset() after attach)"
            )
        if rec.status == "repeated":
            raise RuntimeError(
                f"the latest forward of the {type(rec.root).__name__} is not one attach() understands: "
                f"{rec.problem} (expected once); use the functional API for this model"
            )
        raise RuntimeError(
            f"no forward of the {type(rec.root).__name__} has been recorded since attach(): call model(images) "
            "(the model itself, or its DDP / torch.compile wrapper) before loss(); model.forward_features() "
            "and forward_intermediates() are not recorded"
        )

    def loss(self, *, patch_targets: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted diversity loss of the latest forward: a scalar (or (B,) with ``reduction="none"``).

        Args:
            patch_targets: the mixing loss's per-patch labels, required when ``mixing_weight > 0`` and
                refused otherwise: (B, N) class indices (``ignore_index=-100`` allowed), or (B, N, C)
                probabilities, one row per patch token of the latest forward in the patch embedding's
                row-major order, for the full grid, before any patch dropout (the kept patches' labels
                are picked here). ``fastpatchdiv.cutmix_patches`` returns them for the mixed images.

        Raises:
            RuntimeError: no ``model(...)`` call since attach or since the previous ``loss()``, the latest
                forward ran in eval mode (without ``in_eval``), the hooks were removed, or the patch head
                is on another device than the tokens.
            ValueError: ``negatives="window"`` for a forward without a full patch grid (NaFlex-mode input,
                patch dropout); ``patch_targets`` missing while ``mixing_weight > 0``, given while it is 0,
                or not (B, N) / (B, N, C) for the latest forward (and what ``patch_mixing_loss`` raises).
            TypeError: ``patch_targets`` not a tensor.
        """
        self._check_not_removed()
        opt = self._options
        if opt["mixing_weight"] > 0 and patch_targets is None:
            raise ValueError(
                f"attach(..., mixing_weight={opt['mixing_weight']}) needs the per-patch labels of this batch: "
                "div.loss(patch_targets=...), e.g. the (B, N) labels of fastpatchdiv.cutmix_patches"
            )
        if opt["mixing_weight"] == 0 and patch_targets is not None:
            raise ValueError(
                "patch_targets were given but the mixing loss is off (mixing_weight=0): attach with "
                "mixing_weight > 0 to train on them, or drop the argument"
            )
        if patch_targets is not None and not isinstance(patch_targets, torch.Tensor):
            raise TypeError(f"patch_targets must be a torch.Tensor, got {type(patch_targets).__name__}")
        rec = self._take()
        self._check_unchanged(rec, "last")
        last = rec["last"][:, self._recorder.num_prefix_tokens :]
        if (
            torch.is_grad_enabled()
            and not last.requires_grad
            and any(p.requires_grad for p in self._recorder.root.parameters())
        ):
            if not rec["grad_enabled"]:
                raise RuntimeError(
                    "the latest forward ran without gradients (torch.no_grad, inference_mode, or a reentrant "
                    "checkpoint around the whole model) but loss() runs with gradients enabled, so the diversity "
                    "term would silently add no gradient; to only read the values, call loss() under "
                    "torch.no_grad() too"
                )
            raise RuntimeError(
                "the recorded last-layer tokens carry no gradient although the forward ran with gradients "
                "enabled: the hooked block ran inside a reentrant gradient checkpoint that spans several blocks "
                "(its inner outputs are computed without autograd and recomputed in the backward); hook the final "
                "norm (last_block=None) or the last block of a checkpoint segment, or use non-reentrant "
                "checkpointing (timm's default)"
            )
        mask = rec.get("mask")
        keep = rec.get("keep")
        if mask is not None and keep is not None:
            mask = mask.gather(1, keep)
        common = {"reduction": opt["reduction"], "backend": opt["backend"], "mask": mask}

        grid = None
        if opt["contrastive_weight"] > 0 and opt["negatives"] == "window":
            grid = self._window_grid(rec, keep, last.shape[1])

        parts: dict[str, torch.Tensor] = {}
        total = None
        # Each loss runs with autocast off itself (fp32 accumulation, an fp32 loss).
        if opt["cosine_weight"] > 0:
            parts["cosine"] = patch_cosine_loss(last, **common)
            total = opt["cosine_weight"] * parts["cosine"]
        if opt["contrastive_weight"] > 0:
            self._check_unchanged(rec, "first")
            first = rec["first"]
            if keep is not None:
                first = first.gather(1, keep.unsqueeze(-1).expand(-1, -1, first.shape[-1]))
            # Under autocast first may be bf16/fp16 and last fp32: the loss promotes them to the wider one.
            parts["contrastive"] = patch_contrastive_loss(
                first,
                last,
                temperature=opt["temperature"],
                normalize=opt["normalize"],
                negatives=opt["negatives"],
                detach_first=opt["detach_first"],
                grid=grid,
                window=opt["window"],
                **common,
            )
            term = opt["contrastive_weight"] * parts["contrastive"]
            total = term if total is None else total + term
        if opt["mixing_weight"] > 0:
            targets = self._targets_for(rec, patch_targets, keep, last)
            head = self.mixing.head
            if head.weight.device != last.device:
                raise RuntimeError(
                    f"the patch head is on {head.weight.device} but the model's tokens are on {last.device}: "
                    f"move it with div.to({str(last.device)!r}) (attach() creates it where the model is then)"
                )
            parts["mixing"] = self.mixing(last, targets, mask)
            term = opt["mixing_weight"] * parts["mixing"]
            total = term if total is None else total + term
        if total is None:  # every weight is 0: a zero of the right shape, no losses computed
            shape = (last.shape[0],) if opt["reduction"] == "none" else ()
            total = torch.zeros(shape, dtype=work_dtype(last.dtype), device=last.device)
        self._parts = {k: v.detach() for k, v in parts.items()}
        return total

    def forward(self, *, patch_targets: torch.Tensor | None = None) -> torch.Tensor:
        """Same as :meth:`loss` (the call DistributedDataParallel makes when it wraps ``div``)."""
        return self.loss(patch_targets=patch_targets)

    def losses(self) -> dict[str, torch.Tensor]:
        """Unweighted parts of the latest ``loss()``, detached, for logging: ``{"cosine": ..., "contrastive":
        ..., "mixing": ...}`` (a part whose weight is 0 is not computed and not listed; empty before the first
        ``loss()``).
        """
        return dict(self._parts)

    def remove(self) -> None:
        """Take every hook off the model and drop any kept tokens; the model is as it was before attach."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        rec = self._recorder
        rec.pending = rec.latest = None
        rec.stack.clear()
        self._removed = True

    def __enter__(self) -> PatchDiversity:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def extra_repr(self) -> str:
        opt = ", ".join(f"{k}={v!r}" for k, v in self._options.items())
        return f"model={type(self._recorder.root).__name__}, {opt}" + (", removed" if self._removed else "")

    # -- helpers ----------------------------------------------------------------------------------------

    @staticmethod
    def _check_unchanged(rec: dict, name: str) -> None:
        # A view shares its base's version counter, so this also sees in-place writes to the full output.
        if not torch.compiler.is_compiling() and rec[name]._version != rec[name + "_version"]:
            raise RuntimeError(
                f"the recorded {name}-layer tokens were modified in place after the hook saw them; "
                "this model does something attach() does not expect: use the functional API"
            )

    @staticmethod
    def _targets_for(rec: dict, patch_targets: torch.Tensor, keep, last: torch.Tensor) -> torch.Tensor:
        """The labels of the tokens in ``last``: checked against the forward, gathered by the kept indices."""
        b = last.shape[0]
        n = last.shape[1] if keep is None else rec.get("patches", keep.shape[1])
        if patch_targets.dim() not in (2, 3) or tuple(patch_targets.shape[:2]) != (b, n):
            grid = rec.get("grid")
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

    def _window_grid(self, rec: dict, keep, n: int) -> tuple[int, int]:
        if keep is not None:
            raise ValueError(
                "negatives='window' needs every patch of the grid, and patch dropout removed some: "
                "use negatives='mean' or 'all', or turn patch dropout off"
            )
        grid = rec.get("grid")
        if rec.get("naflex_mode") or grid is None:
            raise ValueError(
                "negatives='window' needs the patch grid, and a NaFlex-mode forward (patch_coord/patch_valid, "
                "variable sizes and padding) has none: use negatives='mean' or 'all'"
            )
        if grid[0] * grid[1] != n:
            raise ValueError(f"negatives='window': the patch grid {grid} does not match the N = {n} tokens")
        return grid


def attach(
    model: nn.Module,
    *,
    cosine_weight: float = 1.0,
    contrastive_weight: float = 1.0,
    mixing_weight: float = 0.0,
    head: nn.Linear | None = None,
    negatives: str = "mean",
    temperature: float = 1.0,
    normalize: bool = False,
    window: int = 7,
    detach_first: bool = True,
    reduction: str = "mean",
    last_block: int | None = None,
    in_eval: bool = False,
    backend: str = "auto",
) -> PatchDiversity:
    """Add the patch-diversification losses to a timm vision transformer's own forward, via hooks.

    After ``div = attach(model, ...)``, every training-mode ``model(x)`` (or a call of its DDP /
    torch.compile wrapper) records two token sets of shape (B, N, D), prefix tokens excluded:

    - first = ``model.patch_embed``'s output, before position embeddings and prefix tokens
      ((B, H, W, D) outputs of ``dynamic_img_size=True`` models are flattened row-major to (B, H·W, D));
      for NaFlexVit the patch projection inside ``model.embeds`` (after its optional projection norm);
    - last = ``model.norm``'s output (an Identity for models that norm after pooling, which is then the
      last block's output), or ``model.blocks[last_block]``'s output; in both cases
      ``model.num_prefix_tokens`` leading class/register/distillation tokens are dropped (a view).

    and ``div.loss()`` returns, in float32 (float64 for a float64 model),

        cosine_weight · patch_cosine_loss(last) + contrastive_weight · patch_contrastive_loss(first, last)

    with the options below passed through. NaFlexVit's ``patch_valid`` (B, N) mask, given to
    ``model(...)``, is passed to every loss as ``mask=``, so padded patches count for nothing.

    The patch mixing loss (the paper's third, Gong et al. 2021 sec. 4) is off by default; with
    ``mixing_weight > 0``, ``div.loss(patch_targets=...)`` adds

        mixing_weight · patch_mixing_loss(last, head.weight, head.bias, patch_targets)

    for per-patch labels (B, N) (or probabilities (B, N, C)), those of :func:`fastpatchdiv.cutmix_patches`
    for the CutMix images the forward saw. ``head`` is a linear patch head nn.Linear(D, C) (D = the
    model's ``embed_dim``): the one passed, or a new one (truncated normal std 0.02, zero bias, as the
    official code's ``patch_head``) for the model's ``num_classes``, on the model's device and dtype at
    attach time. ``div.mixing`` is the :class:`fastpatchdiv.PatchMixingLoss` holding it, and
    ``div.parameters()`` lists it: give them to the optimiser too. Under DistributedDataParallel wrap
    ``div`` as well (``DistributedDataParallel(div)``, then ``div(patch_targets=...)``): the head lives
    outside the model's DDP wrapper, and this broadcasts rank 0's head and averages its gradients. A head
    that is a module of the model (``head=model.head``) is not listed by ``div.parameters()``: it is
    already the model's.

    Behaviour:

    - Each ``loss()`` uses the latest forward; a second ``loss()`` without a new forward raises
      RuntimeError (tokens are never reused). Several forwards before a ``loss()``: the last one counts.
    - In ``model.eval()`` nothing is kept (the hooks return at once) unless ``in_eval=True``.
    - Gradient checkpointing (``model.set_grad_checkpointing()``): calls during the backward's
      recomputation are ignored, so gradients equal those without checkpointing.
    - Under ``torch.autocast`` the tokens keep the dtypes autocast gave them and the losses run with
      autocast off: the loss is float32 (float64 for a float64 model).
    - A weight of 0 skips that loss (it is neither computed nor listed by ``losses()``); with both weights
      0, ``loss()`` returns zeros (no graph) and still needs a fresh forward, so one training loop can run
      the baseline and the regularised model.
    - Patch dropout: handled through its kept indices for Eva and NaFlexVit; timm's VisionTransformer
      drops patches without reporting which, so there only the cosine loss can be used. ``patch_targets``
      are given for every patch; ``loss()`` picks those of the kept ones.

    Args:
        model: a timm ``VisionTransformer`` (ViT, DeiT, DeiT-3, distilled DeiT, register-token models),
            ``Eva``, ``Beit``, ``VisionTransformerRelPos`` or ``NaFlexVit``, or a DistributedDataParallel
            or ``torch.compile`` wrapper of one. The hooks go on the model itself, so DDP may wrap it before
            or after attach; a compiled model must not have run before attach (torch.compile does not see
            hooks added to submodules of code it already compiled: ``loss()`` then raises).
        cosine_weight: weight of :func:`fastpatchdiv.patch_cosine_loss` on the last tokens, finite, >= 0.
        contrastive_weight: weight of :func:`fastpatchdiv.patch_contrastive_loss`, finite, >= 0.
        mixing_weight: weight of :func:`fastpatchdiv.patch_mixing_loss` on the last tokens, finite, >= 0
            (default 0: off, and ``loss()`` takes no ``patch_targets``).
        head: the patch head nn.Linear(D, C) of the mixing loss (``bias=False`` allowed), C the
            model's ``num_classes`` when it has a classifier; None creates one. Only with
            ``mixing_weight > 0``.
        negatives, temperature, normalize, window, detach_first: passed to ``patch_contrastive_loss``
            ("window" takes the (H, W) grid from the patch embedding of each forward).
        reduction: "mean" over images (default), "sum", or "none" for (B,) per-image losses.
        last_block: None (default) for the final norm's output, or an int: ``model.blocks[last_block]``'s
            output (Python indexing: -1 is the last block's output *before* the final norm).
        in_eval: also record forwards in eval mode.
        backend: passed to every loss ("auto", "triton", "torch").

    Returns:
        A :class:`PatchDiversity`; also a context manager that removes the hooks on exit.

    Raises:
        TypeError: a model outside the supported families (use the functional API:
            ``fastpatchdiv.patch_cosine_loss`` / ``patch_contrastive_loss``), nn.DataParallel, non-numeric
            weights or temperature, non-bool flags, a non-int ``last_block``, a ``head`` that is not an
            nn.Linear.
        ValueError: a weight < 0 or not finite, unknown ``negatives``, ``reduction`` or ``backend``,
            temperature <= 0 or not finite, ``window`` even or < 3, ``last_block`` out of range, the
            contrastive or mixing loss with a VisionTransformer that drops patches (``patch_drop_rate >
            0``), a ``head`` whose in_features is not the model's ``embed_dim`` or whose out_features is
            not its ``num_classes``, a ``head`` with ``mixing_weight=0``, ``mixing_weight > 0`` without a
            ``head`` for a model without a classifier (``num_classes=0``).

    Example:
        >>> model = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=10)
        >>> with fastpatchdiv.timm.attach(model, cosine_weight=1.0, contrastive_weight=0.5) as div:
        ...     logits = model(torch.randn(2, 3, 64, 64))
        ...     loss = F.cross_entropy(logits, torch.tensor([1, 2])) + div.loss()
        >>> sorted(div.losses())
        ['contrastive', 'cosine']
    """
    inner = _unwrap(model)
    family = _family(inner)
    if family is None:
        raise TypeError(
            f"fastpatchdiv.timm.attach supports the timm families {', '.join(SUPPORTED_FAMILIES)}; got "
            f"{type(inner).__name__}. For other models compute the tokens yourself and call the functional "
            "API: fastpatchdiv.patch_cosine_loss(last) / fastpatchdiv.patch_contrastive_loss(first, last)"
        )
    cosine_weight = _check_weight("cosine_weight", cosine_weight)
    contrastive_weight = _check_weight("contrastive_weight", contrastive_weight)
    mixing_weight = _check_weight("mixing_weight", mixing_weight)
    # The contrastive loss's own checks (grid: each forward's own), so attach refuses what loss() would.
    temperature, _ = check_settings(temperature, normalize, negatives, detach_first, reduction, None, window, backend)
    check_flag("in_eval", in_eval)

    blocks = getattr(inner, "blocks", None)
    if last_block is not None:
        if isinstance(last_block, bool) or not isinstance(last_block, int):
            raise TypeError(f"last_block must be None or an int, got {last_block!r}")
        depth = len(blocks)
        if not -depth <= last_block < depth:
            raise ValueError(f"last_block={last_block} is out of range for a model with {depth} blocks")

    patch_drop = getattr(inner, "patch_drop", None)
    if isinstance(patch_drop, PatchDropout) and patch_drop.prob > 0:
        if contrastive_weight > 0:
            raise ValueError(
                f"{type(inner).__name__} drops patches (patch_drop_rate={patch_drop.prob}) without telling which, "
                "so first- and last-layer tokens cannot be paired: use contrastive_weight=0 (the cosine loss "
                "works on the kept tokens), or a model without patch dropout"
            )
        if mixing_weight > 0:
            raise ValueError(
                f"{type(inner).__name__} drops patches (patch_drop_rate={patch_drop.prob}) without telling which, "
                "so the kept tokens cannot be matched to their patch labels: use mixing_weight=0, or a model "
                "without patch dropout"
            )

    mixing, owned = _mixing_loss(inner, mixing_weight, head, reduction, backend)

    naflex = family == "NaFlexVit"
    keep_first = contrastive_weight > 0
    last_name = "model.norm" if last_block is None else f"model.blocks[{last_block}]"
    recorder = _Recorder(inner, int(inner.num_prefix_tokens), in_eval, keep_first, last_name)
    handles = [
        inner.register_forward_pre_hook(recorder.root_pre),
        inner.register_forward_hook(recorder.root_post, always_call=True),
    ]
    if naflex:
        handles.append(inner.embeds.register_forward_pre_hook(recorder.naflex_embeds_pre, with_kwargs=True))
        handles.append(inner.embeds.register_forward_hook(recorder.naflex_embeds_post))
        if keep_first:
            handles.append(inner.embeds.norm.register_forward_hook(recorder.naflex_proj_post))
    elif keep_first or mixing is not None:  # mixing: the patch count before dropout
        handles.append(inner.patch_embed.register_forward_hook(recorder.patch_embed_post))
    if isinstance(patch_drop, nn.Module):
        handles.append(patch_drop.register_forward_hook(recorder.patch_drop_post))
    last_module = inner.norm if last_block is None else blocks[last_block]
    handles.append(last_module.register_forward_hook(recorder.last_post))

    options = {
        "cosine_weight": cosine_weight,
        "contrastive_weight": contrastive_weight,
        "mixing_weight": mixing_weight,
        "negatives": negatives,
        "temperature": temperature,
        "normalize": normalize,
        "window": window,
        "detach_first": detach_first,
        "reduction": reduction,
        "last_block": last_block,
        "in_eval": in_eval,
        "backend": backend,
    }
    return PatchDiversity(recorder, handles, options, mixing, owned)


def _mixing_loss(model: nn.Module, weight: float, head, reduction: str, backend: str):
    """(the PatchMixingLoss or None, whether div owns its head); checks ``head`` against the model."""
    if weight == 0:
        if head is not None:
            raise ValueError(
                "head is the patch head of the mixing loss, which is off (mixing_weight=0): pass mixing_weight > 0"
            )
        return None, True
    dim, classes = int(model.embed_dim), int(getattr(model, "num_classes", 0) or 0)
    if head is None:
        if classes == 0:
            raise ValueError(
                f"the {type(model).__name__} has no classifier (num_classes=0), so attach() cannot size the patch "
                f"head of the mixing loss: pass head=nn.Linear({dim}, num_classes)"
            )
        # PatchMixingLoss initialises its head as the official code's patch_head: truncated normal (std 0.02)
        # weights, zero bias.
        mixing = PatchMixingLoss(dim, classes, reduction=reduction, backend=backend)
        param = next((p for p in model.parameters() if p.is_floating_point()), None)
        return (mixing if param is None else mixing.to(device=param.device, dtype=param.dtype)), True
    if not isinstance(head, nn.Linear):
        raise TypeError(f"head must be an nn.Linear(embed_dim, num_classes), got {type(head).__name__}")
    if head.in_features != dim or (classes and head.out_features != classes):
        raise ValueError(
            f"head must be nn.Linear({dim}, {classes or 'C'}) for this {type(model).__name__} (embed_dim={dim}, "
            f"num_classes={classes}); got nn.Linear({head.in_features}, {head.out_features})"
        )
    owned = not any(m is head for m in model.modules())
    return PatchMixingLoss(reduction=reduction, backend=backend, head=head), owned


__all__ = ["attach", "PatchDiversity", "SUPPORTED_FAMILIES"]
