"""The patch-diversification losses inside a timm training task (``timm.task``, timm >= 1.0.23).

timm's ``train.py`` builds a task (``ClassificationTask``, ``LogitDistillationTask``, ...) and calls
``task(input, target)`` for a ``{"loss": ..., "output": ...}`` dict; the task also owns distributed
wrapping, EMA, compilation and the checkpoint entries. :func:`wrap_task` returns a task that does all of
that and adds the losses, so ``train.py`` changes by two lines (see the README, "Use it in your trainer").

Example:
    >>> task = ClassificationTask(model, criterion=LabelSmoothingCrossEntropy(0.1))
    >>> task = wrap_task(task, cosine_weight=1.0, contrastive_weight=0.5, mixing_weight=0.5)
    >>> optimizer = create_optimizer_v2(task.get_trainable_module(), "adamw", lr=1e-3, weight_decay=0.05)
    >>> result = task(images, labels)  # patch CutMix, soft targets and all three losses inside
    >>> result["loss"].backward()
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

try:
    from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.models import group_parameters
    from timm.task import TrainingTask
    from timm.task.distillation import FeatureDistillationTrainableModule
    from timm.utils import unwrap_model
except ImportError as exc:  # pragma: no cover - timm < 1.0.23 has no timm.task
    raise ImportError(
        "fastpatchdiv's wrap_task needs timm >= 1.0.23 (timm.task); with an older timm use fastpatchdiv.timm.attach "
        "in your own loop"
    ) from exc

from fastpatchdiv.trainers import attach

_logger = logging.getLogger(__name__)

# The key of the head's state inside timm's ``task_state`` checkpoint entry.
STATE_KEY = "fastpatchdiv"
# Result-dict keys of the unweighted parts (averaged over ranks), by div.losses() name.
PART_KEYS = {"cosine": "patch_cosine", "contrastive": "patch_contrastive", "mixing": "patch_mixing"}


def _student(task: TrainingTask) -> nn.Module:
    """The timm model the task trains (the student of a distillation task), unwrapped."""
    module = unwrap_model(task.get_trainable_module())
    if isinstance(module, FeatureDistillationTrainableModule):  # student + projection in one module
        module = unwrap_model(module.student)
    return module


def _soft_criterion(criterion) -> tuple[nn.Module, float]:
    """(a criterion for (B, C) soft targets, the smoothing the task's criterion applied to hard ones).

    The patch CutMix turns every target into λ·y + (1 − λ)·y_partner, which timm's default
    ``LabelSmoothingCrossEntropy`` (train.py's pick when Mixup is off) cannot take; its smoothing moves
    into the soft targets instead, so an unmixed image (λ = 1) gets exactly the old loss.
    """
    if isinstance(criterion, LabelSmoothingCrossEntropy):
        return SoftTargetCrossEntropy(), float(criterion.smoothing)
    if isinstance(criterion, SoftTargetCrossEntropy):
        return criterion, 0.0
    if isinstance(criterion, BinaryCrossEntropy):  # takes dense (B, C) targets as they are
        return criterion, float(criterion.smoothing)
    if type(criterion) is nn.CrossEntropyLoss and criterion.weight is None and criterion.reduction == "mean":
        return SoftTargetCrossEntropy(), float(criterion.label_smoothing)
    raise TypeError(
        f"with mixing_weight > 0 the task trains on the patch CutMix's soft targets, and its criterion "
        f"{type(criterion).__name__} is not one wrap_task knows how to turn into a soft-target loss "
        "(LabelSmoothingCrossEntropy, SoftTargetCrossEntropy, BinaryCrossEntropy, nn.CrossEntropyLoss): "
        "build the task with one of those"
    )


def _mean_over_ranks(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The parts averaged over the default process group, in one all_reduce (each rank's own without one)."""
    if not parts or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return parts
    stacked = torch.stack([v.detach().float().reshape(()) for v in parts.values()])
    dist.all_reduce(stacked)
    stacked /= dist.get_world_size()
    return dict(zip(parts, stacked.unbind(), strict=True))


class TrainableWithHead(nn.Module):
    """What ``task.get_trainable_module()`` returns with a patch head: the task's trainable module plus the head.

    train.py builds its optimizer from this module (``create_optimizer_v2(model, ...)``), so the head's W
    and b join the model's parameters there, in timm's weight-decay groups: ``no_weight_decay()`` and
    ``group_matcher()`` forward the model's own under this module's names, and the head is the last
    layer-decay group, as timm's ``FeatureDistillationTrainableModule`` places its projection.
    ``forward`` is the model's: the head is used by the task, after the model's forward.
    """

    def __init__(self, model: nn.Module, patch_diversity: nn.Module):
        super().__init__()
        self.model = model
        self.patch_diversity = patch_diversity

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def _prefix(self, target: nn.Module) -> str:
        # Under DDP or torch.compile the model's names gain "module." / "_orig_mod.": find where it sits now.
        name = next(name for name, m in self.named_modules() if m is target)
        return f"{name}." if name else ""

    def no_weight_decay(self) -> set[str]:
        """The model's ``no_weight_decay()`` names, as this module names those parameters."""
        inner = unwrap_model(self.model)
        if not hasattr(inner, "no_weight_decay"):
            return set()
        prefix = self._prefix(inner)
        return {prefix + name for name in inner.no_weight_decay()}

    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        """Layer-decay groups: the model's own for its parameters, the last group for the patch head."""
        inner = unwrap_model(self.model)
        if not hasattr(inner, "group_matcher"):
            return lambda name: 0
        layers = group_parameters(inner, inner.group_matcher(coarse=coarse), reverse=True)
        last, prefix = max(layers.values(), default=0), self._prefix(inner)
        return lambda name: layers.get(name[len(prefix) :], last) if name.startswith(prefix) else last

    def no_sync(self):
        """Both DDP wrappers' ``no_sync()`` at once (gradient accumulation)."""
        stack = contextlib.ExitStack()
        for module in (self.model, self.patch_diversity):
            if hasattr(module, "no_sync"):
                stack.enter_context(module.no_sync())
        return stack


class PatchDiversityTask(TrainingTask):
    """A timm training task plus the patch-diversification losses; made by :func:`wrap_task`.

    ``forward(input, target)`` returns the wrapped task's dict with ``loss`` increased by the weighted
    losses, its own loss kept as ``base_loss`` (detached, comparable with a run without them), and the
    unweighted parts, averaged over ranks, as ``patch_cosine``, ``patch_contrastive``, ``patch_mixing``.
    Every other ``TrainingTask`` method is the wrapped task's, plus the head where one exists:
    ``get_trainable_module()`` (a :class:`TrainableWithHead`), ``prepare_distributed`` (DDP on the head),
    ``get_task_state`` / ``load_task_state`` (its state under ``"fastpatchdiv"``), ``no_sync``,
    ``get_clip_parameters``. ``self.task`` is the wrapped task, ``self.div`` what ``attach`` returned.
    """

    def __init__(self, task: TrainingTask, div: nn.Module, label_smoothing: float | None):
        super().__init__(device=task.device, dtype=task.dtype, verbose=task.verbose)
        self.task = task
        self.div = div
        self.label_smoothing = label_smoothing  # None: mixing off (no soft targets made here)
        has_head = any(p.requires_grad for p in div.parameters())
        # Plain attributes, not submodules: they hold the task's module and div a second time.
        self.__dict__["_div_call"] = div  # DistributedDataParallel(div) after prepare_distributed
        self.__dict__["_trainable"] = TrainableWithHead(task.get_trainable_module(), div) if has_head else None

    @property
    def mixing(self) -> bool:
        """Whether the mixing loss is on: the task then does the patch CutMix and trains on soft targets."""
        return self.label_smoothing is not None

    # -- the step ------------------------------------------------------------------------------------

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """One training step's losses: the wrapped task's on the (mixed) batch plus the diversity losses.

        Args:
            input: (B, C, H, W) images, as the loader gives them.
            target: (B,) class indices; with the mixing loss on, the task mixes them itself, so timm's
                Mixup/CutMix must be off (train.py's default ``--mixup 0 --cutmix 0``).

        Returns:
            The wrapped task's dict, with ``loss`` = its loss + the weighted diversity losses, ``base_loss``
            = its loss (detached) and the unweighted parts (``patch_cosine`` ...), each the mean over ranks.

        Raises:
            ValueError: soft (floating) targets with the mixing loss on; what ``div.loss()`` raises.
        """
        if self.mixing:
            input, patch_targets, target = self._cutmix(input, target)
            result = self.task(input, target)
            extra = self._div_call(patch_targets=patch_targets)
        else:
            result = self.task(input, target)
            extra = self._div_call()
        parts = _mean_over_ranks(self.div.losses())
        out = dict(result)
        out["base_loss"] = result["loss"].detach()
        out["loss"] = result["loss"] + extra
        out.update({PART_KEYS.get(name, f"patch_{name}"): value for name, value in parts.items()})
        return out

    def _cutmix(self, images: torch.Tensor, targets: torch.Tensor):
        """(mixed images, (B, N) patch labels, (B, C) smoothed soft targets) of the patch CutMix."""
        if targets.is_floating_point() or targets.dim() != 1:
            raise ValueError(
                f"the mixing loss needs (B,) class indices, got {tuple(targets.shape)} {targets.dtype} targets: "
                "the task does the patch CutMix itself, so turn timm's Mixup/CutMix off (--mixup 0 --cutmix 0, "
                "train.py's defaults)"
            )
        mixed, patch_targets, soft = self.div.cutmix(images, targets)
        eps = self.label_smoothing
        if eps:  # as timm's mixup_target: (1 − ε)·soft + ε/C
            soft = soft * (1.0 - eps) + eps / soft.shape[-1]
        return mixed, patch_targets, soft

    # -- the head: optimizer, DDP, checkpoints ---------------------------------------------------------

    def get_trainable_module(self, ema: bool = False) -> nn.Module | None:
        """The wrapped task's trainable module; with a patch head, a :class:`TrainableWithHead` of both."""
        module = self.task.get_trainable_module(ema=ema)
        if ema or self._trainable is None:
            return module
        self._trainable.model = module  # compile() and prepare_distributed() replace the task's module
        return self._trainable

    def prepare_distributed(self, device_ids: list | None = None, **ddp_kwargs) -> PatchDiversityTask:
        """The wrapped task's DDP wrapping, and DDP on the patch head (rank 0's head, averaged gradients).

        Args:
            device_ids: passed to both DistributedDataParallel wrappers (``[local_rank]``; None on CPU).
            **ddp_kwargs: passed to both wrappers.

        Returns:
            self.
        """
        self.task.prepare_distributed(device_ids=device_ids, **ddp_kwargs)
        if self._trainable is not None:
            self.__dict__["_div_call"] = DistributedDataParallel(self.div, device_ids=device_ids, **ddp_kwargs)
            self._trainable.patch_diversity = self._div_call
        return self

    def no_sync(self):
        """No gradient all-reduce for the model nor the head (gradient accumulation)."""
        module = self.get_trainable_module()
        return module.no_sync() if hasattr(module, "no_sync") else contextlib.nullcontext()

    def get_clip_parameters(self, exclude_head: bool = False):
        """The wrapped task's, plus the patch head unless heads are excluded (AGC)."""
        params = list(self.task.get_clip_parameters(exclude_head=exclude_head))
        return params if exclude_head else params + [p for p in self.div.parameters() if p.requires_grad]

    def get_task_state(self, module: nn.Module | None = None, ema: bool = False) -> dict:
        """The wrapped task's state, plus the patch head's ``state_dict`` under ``"fastpatchdiv"`` (not for EMA)."""
        state = dict(self.task.get_task_state(module=module, ema=ema))
        if not ema and self._trainable is not None:
            state[STATE_KEY] = self.div.state_dict()
        return state

    def load_task_state(self, state: dict | None, strict: bool = True, module=None, ema: bool = False) -> None:
        """Load what :meth:`get_task_state` saved.

        Raises:
            RuntimeError: with ``strict``, a task state without the head's entry while this task has a head,
                or with one while it has none.
        """
        state = dict(state or {})
        head_state = state.pop(STATE_KEY, None)
        self.task.load_task_state(state, strict=strict, module=module, ema=ema)
        if ema:
            return
        if head_state is not None and self._trainable is not None:
            self.div.load_state_dict(head_state, strict=strict)
        elif head_state is None and self._trainable is not None:
            # A checkpoint from before wrap_task (or timm's bare state dicts): the head stays as created.
            message = "the checkpoint has no fastpatchdiv patch head; the head keeps its fresh initialisation"
            if strict and state:
                raise RuntimeError(message + " (load with strict=False to accept that)")
            _logger.warning(message)
        elif head_state is not None and strict:
            raise RuntimeError("the checkpoint holds a fastpatchdiv patch head but this task has none (mixing off)")

    # -- everything else is the wrapped task's ---------------------------------------------------------

    def compile(self, backend: str = "inductor", mode: str | None = None, **compile_kwargs):
        return self.task.compile(backend=backend, mode=mode, **compile_kwargs)

    def get_eval_model(self, module: nn.Module | None = None, ema: bool = False):
        return self.task.get_eval_model(module=module, ema=ema)

    def setup_ema(self, *args, **kwargs):
        return self.task.setup_ema(*args, **kwargs)

    def has_ema(self) -> bool:
        return self.task.has_ema()

    def compile_ema(self, *args, **kwargs):
        return self.task.compile_ema(*args, **kwargs)

    def update_ema(self, step: int | None = None) -> None:
        self.task.update_ema(step=step)

    def create_evaluator(self, **kwargs):
        return self.task.create_evaluator(**kwargs)


def wrap_task(task: TrainingTask, *, label_smoothing: float | None = None, **options) -> PatchDiversityTask:
    """Add the patch-diversification losses to a timm training task (``timm.task``, timm >= 1.0.23).

    Hooks the task's model (the student of a distillation task) with ``fastpatchdiv.attach(model,
    **options)`` and returns a task whose ``loss`` adds ``div.loss()``. With ``mixing_weight > 0``, each
    step first mixes the batch with :func:`fastpatchdiv.cutmix_patches` (the model's patch size and class
    count), smooths the soft targets by ``label_smoothing`` and replaces the task's criterion by its
    soft-target form (``LabelSmoothingCrossEntropy`` → ``SoftTargetCrossEntropy``); the patch head then
    joins ``get_trainable_module()``, so the optimizer train.py builds from it trains the head in timm's
    weight-decay groups, and the checkpoint's ``task_state`` saves it. Call it before ``compile``,
    ``setup_ema`` and ``prepare_distributed``: right after the task is built.

    Args:
        task: a ``timm.task.TrainingTask`` (Classification, LogitDistillation, FeatureDistillation,
            TokenDistillation; MultiLabelClassification without the mixing loss), not yet distributed.
        label_smoothing: ε for the soft image targets and the mixing loss; None takes the task criterion's
            own (train.py's ``--smoothing``, 0.1 by default). Only with ``mixing_weight > 0``.
        **options: ``attach``'s keyword arguments (``cosine_weight``, ``contrastive_weight``, ``mixing_weight``,
            ``normalize``, ...).

    Returns:
        A :class:`PatchDiversityTask` that owns ``task``.

    Raises:
        TypeError: ``task`` not a TrainingTask; with the mixing loss, a criterion with no soft-target form;
            what ``attach`` raises (a model outside its families).
        ValueError: a task already prepared for DDP; ``label_smoothing`` without the mixing loss or outside
            [0, 1); the mixing loss on a multi-label task; what ``attach`` raises.

    Example:
        >>> task = wrap_task(ClassificationTask(model), cosine_weight=1.0, mixing_weight=0.5)
        >>> result = task(images, labels)  # result["loss"], result["patch_mixing"], ...
    """
    if not isinstance(task, TrainingTask):
        raise TypeError(f"task must be a timm.task.TrainingTask, got {type(task).__name__}")
    if isinstance(task, PatchDiversityTask):
        raise TypeError("task is already a wrap_task result: wrap the task timm built once")
    if isinstance(task.get_trainable_module(), DistributedDataParallel):
        raise ValueError("wrap the task before task.prepare_distributed(): the patch head needs its own DDP wrapper")
    mixing = float(options.get("mixing_weight", 0) or 0) > 0
    if not mixing:
        if label_smoothing is not None:
            raise ValueError("label_smoothing is for the mixing loss, which is off: pass mixing_weight > 0")
        div = attach(_student(task), **options)
        return PatchDiversityTask(task, div, None)
    if getattr(task, "multi_label", False):
        raise ValueError("the mixing loss labels each patch with one class: it does not apply to multi-label tasks")
    criterion, smoothing = _soft_criterion(task.criterion)
    if label_smoothing is not None:
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        smoothing = float(label_smoothing)
    div = attach(_student(task), label_smoothing=smoothing, **options)
    task.criterion = criterion
    return PatchDiversityTask(task, div, smoothing)


__all__ = ["wrap_task", "PatchDiversityTask", "TrainableWithHead"]
