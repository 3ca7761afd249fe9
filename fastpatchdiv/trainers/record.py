"""One forward's tokens (:class:`Record`), its :class:`State`, and the hooks that fill it (:class:`Recorder`).

A forward is recorded when the attached model itself is called (``model(...)``, also through DDP or
torch.compile) in training mode (or in eval with ``in_eval``), or, outside such a call, when the token path
runs on its own (``forward_features`` then ``forward_head``): from the wiring's ``start`` module to its
``last`` tap. Calls made by the backward (gradient checkpointing's recomputation) are never recorded, and
``copy.deepcopy(model)`` (an EMA copy) keeps hooks that ignore the copy's calls.

Example:
    >>> recorder = Recorder(model, wiring, in_eval=False, keep_first=True)
    >>> handles = recorder.register()
    >>> model(images); record = recorder.take()
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass
from enum import Enum
from types import FrameType

import torch
from torch import nn

from fastpatchdiv.trainers.registry import Grid, Hook, Tap, Wiring

# The models that carry an attach's hooks now (weak: a model dropped by the user leaves the set).
_HOOKED: weakref.WeakSet = weakref.WeakSet()


class State(Enum):
    """What the latest forward left for ``loss()``; the value is what ``loss()`` says when it cannot go on."""

    FRESH = ""
    NONE = (
        "no forward of the {model} has been recorded since attach() or since the previous loss(): call "
        "model(images) (the model itself, or its DDP / torch.compile wrapper) before loss()"
    )
    CONSUMED = (
        "loss() was already called for the latest forward: run model(...) again before the next loss() "
        "(each loss() uses the tokens of one new forward, never stale ones)"
    )
    EVAL = (
        "the latest forward ran in eval mode, where no tokens are kept: call model.train() before the "
        "forward, or attach(..., in_eval=True) to compute the losses in eval mode too"
    )
    INCOMPLETE = (
        "the latest forward did not run the hooks inside the {model} (first/last token modules). The usual "
        "cause: the model was compiled and run before attach(), and torch.compile does not see hooks added to "
        "submodules later. Attach before torch.compile (or call torch._dynamo.reset() after attach)"
    )
    REPEATED = (
        "the latest forward of the {model} is not one attach() understands: {problem} (expected once); "
        "use the functional API for this model"
    )
    INTERRUPTED = (
        "the latest forward of the {model} did not finish (an exception such as KeyboardInterrupt went "
        "through it): run model(...) again before loss()"
    )


@dataclass
class Record:
    """The tokens and facts of one forward, as the hooks saw them (raw outputs, views taken in loss())."""

    grad_enabled: bool
    standalone: bool = False
    first: torch.Tensor | None = None
    first_version: int = 0
    first_grid: Grid | None = None
    first_calls: int = 0
    last: torch.Tensor | None = None
    last_version: int = 0
    last_grid: Grid | None = None
    last_calls: int = 0
    last_grad_enabled: bool = True
    patches: int | None = None  # patch count before any patch dropout (what patch_targets are given for)
    mask: torch.Tensor | None = None  # (B, N) bool of real patches (NaFlexVit's patch_valid)
    keep: torch.Tensor | None = None  # (B, kept) indices of the patches patch dropout kept
    flex: bool = False  # a NaFlex-mode forward (patch_coord): variable sizes, no grid


def in_backward() -> bool:
    """True while the autograd engine runs a backward: where checkpointing recomputes a forward."""
    if torch.compiler.is_compiling():
        return False
    graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
    return graph_task_id is not None and graph_task_id() != -1


def _on_stack(frame: FrameType | None) -> bool:
    if frame is None:  # recorded under torch.compile: no frame to check
        return True
    current = sys._getframe(1)
    while current is not None:
        if current is frame:
            return True
        current = current.f_back
    return False


def flat(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, D) -> (B, H·W, D) row-major; (B, N, D) as is."""
    return x.flatten(1, 2) if x.dim() == 4 else x


class Recorder:
    """The hooks, and the state of the latest forward (:class:`State`, :class:`Record`).

    Args:
        root: the model (unwrapped); its own calls delimit a forward.
        wiring: where the tokens come from.
        in_eval: also record eval-mode forwards.
        keep_first: keep the first-layer tokens (the contrastive loss is on).
    """

    def __init__(self, root: nn.Module, wiring: Wiring, *, in_eval: bool, keep_first: bool):
        self.root = root
        self.wiring = wiring
        self.in_eval = in_eval
        self.keep_first = keep_first
        self.state = State.NONE
        self.problem = ""
        self.latest: Record | None = None
        self.pending: Record | None = None
        # One entry per call of root in flight: (is it recorded, the frame that called it).
        self.calls: list[tuple[bool, FrameType | None]] = []
        names = {id(m): f"model.{n}" if n else "model" for n, m in root.named_modules()}
        self.names = (names.get(id(getattr(wiring.first, "module", None)), "first"), names.get(id(wiring.last.module)))

    def __deepcopy__(self, memo):
        return self

    def register(self) -> list:
        """Put every hook on the model; returns their handles.

        Raises:
            RuntimeError: the model already carries another attach's hooks (both would add their losses).
        """
        if self.root in _HOOKED:
            raise RuntimeError(
                "fastpatchdiv.attach: this model already has a PatchDiversity attached, whose losses would be "
                "added twice; call .remove() on it first (one attach per model)"
            )
        _HOOKED.add(self.root)
        w = self.wiring
        handles = [
            self.root.register_forward_pre_hook(self._root_pre, with_kwargs=True),
            self.root.register_forward_hook(self._root_post, with_kwargs=True, always_call=True),
            _hook(w.start, Hook.PRE, self._start),
            _hook(w.last.module, w.last.hook, self._tap_hook(w.last, self._on_last)),
        ]
        if w.first is not None:
            handles.append(_hook(w.first.module, w.first.hook, self._tap_hook(w.first, self._on_first)))
        for note in w.notes:
            handles.append(_hook(note.module, note.hook, self._note_hook(note)))
        return handles

    def clear(self) -> None:
        self.pending = self.latest = None
        self.calls.clear()

    def release(self) -> None:
        """The hooks are off: the model may be attached again."""
        _HOOKED.discard(self.root)

    # -- the model's own calls ---------------------------------------------------------------------------

    def _records(self) -> bool:
        return self.root.training or self.in_eval

    def _root_pre(self, module, args, kwargs):
        if module is not self.root:
            return
        if self.calls and not _on_stack(self.calls[0][1]):
            self._interrupted()
        if self.calls or in_backward():  # a nested call, or checkpointing that wraps the whole model
            self.calls.append((False, None))
            return
        record = self._records()
        self.calls.append((record, None if torch.compiler.is_compiling() else sys._getframe(1)))
        if record:
            self.pending = Record(grad_enabled=torch.is_grad_enabled())
        else:
            self._set(None, State.EVAL)

    def _root_post(self, module, args, kwargs, output):
        if module is not self.root or not self.calls:
            return
        recorded, _ = self.calls.pop()
        if recorded and not self.calls:
            rec, self.pending = self.pending, None
            self._finish(rec, failed=output is None)  # output is None: the forward raised

    def _start(self, module, args, kwargs):
        """The token path runs outside a call of the model (forward_features): begin a record."""
        if module is not self.wiring.start or self.calls or in_backward():
            return
        if self._records():
            self.pending = Record(grad_enabled=torch.is_grad_enabled(), standalone=True)
        else:
            self._set(None, State.EVAL)

    def _interrupted(self) -> None:
        self.clear()
        self._set(None, State.INTERRUPTED)

    def _set(self, rec: Record | None, state: State) -> None:
        self.latest, self.state = rec, state

    def _finish(self, rec: Record | None, failed: bool = False) -> None:
        if rec is None or failed:
            self._set(None, State.NONE)
        elif rec.last is None or (self.keep_first and rec.first is None):
            # The root's hooks ran but the inner ones did not: code compiled before attach() (dynamo does not
            # guard on the hooks of submodules) or a forward that skips the hooked modules.
            self._set(None, State.INCOMPLETE)
        elif rec.first_calls > 1 or rec.last_calls > 1:  # reported by loss(): the trainer's forward goes on
            counts = zip(self.names, (rec.first_calls, rec.last_calls), strict=True)
            self.problem = ", ".join(f"{name} ran {n} times" for name, n in counts if n > 1) + " in one forward"
            self._set(None, State.REPEATED)
        else:
            self._set(rec, State.FRESH)

    # -- token sources -----------------------------------------------------------------------------------

    def _tap_hook(self, tap: Tap, on):
        def hook(module, args, kwargs, output=None):
            if module is tap.module and self.pending is not None:
                on(self.pending, *tap.read(args, kwargs, output))

        return hook

    def _note_hook(self, note):
        def hook(module, args, kwargs, output=None):
            if module is note.module and self.pending is not None:
                note.apply(self.pending, args, kwargs, output)

        return hook

    def _on_first(self, rec: Record, x: torch.Tensor, grid: Grid | None) -> None:
        rec.first_calls += 1
        rec.first_grid = rec.first_grid or grid
        rec.patches = flat(x).shape[1] if rec.patches is None else rec.patches
        if self.keep_first:
            rec.first, rec.first_version = x, x._version

    def _on_last(self, rec: Record, x: torch.Tensor, grid: Grid | None) -> None:
        rec.last_calls += 1
        rec.last_grid = grid or rec.last_grid
        # The prefix tokens are sliced off in loss(), not here: a reentrant checkpoint turns this very tensor
        # into its autograd output only after the hook ran, and a view taken now would miss that.
        rec.last, rec.last_version = x, x._version
        rec.last_grad_enabled = torch.is_grad_enabled()
        if rec.standalone and not self.calls:
            self.pending = None
            self._finish(rec)

    # -- what loss() takes -------------------------------------------------------------------------------

    def take(self) -> Record:
        """The latest forward's record, once.

        Raises:
            RuntimeError: there is none to take; the message says why (:class:`State`).
        """
        if self.calls and not _on_stack(self.calls[0][1]):
            self._interrupted()
        if self.state is State.FRESH:
            rec = self.latest
            self._set(None, State.CONSUMED)
            return rec
        raise RuntimeError(self.state.value.format(model=type(self.root).__name__, problem=self.problem))


def _hook(module: nn.Module, where: Hook, fn):
    if where is Hook.PRE:
        return module.register_forward_pre_hook(fn, with_kwargs=True)
    return module.register_forward_hook(fn, with_kwargs=True)
