"""The providers of each op: fastpatchdiv, the naive reference (eager and torch.compile) and the peers
(``pip install -e ".[peers]"``): ``keops`` (pykeops LazyTensor reductions, CPU and CUDA, fp32) and ``inf-cl``
(Inf-CL's ``cal_flash_loss``, CUDA only), each checked against the float64 reference before it is timed."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import os
import time
import warnings

import torch

from benchmarks.cases import AUTOCAST, OPS, PEERS, Case, make_inputs, remember, under_autocast

# Relative error allowed against the float64 reference (of the loss and of each gradient, in norm): far above
# fp32 rounding and Inf-CL's TF32 gradient tiles, far below what a wrong formula gives.
TOLERANCE = {"fp32": 1e-2, "bf16": 5e-2, "fp16": 5e-2, "amp-bf16": 5e-2}
INSTALL = 'pip install -e ".[peers]"'


def setup(device: str) -> None:
    """Silence messages that are noise here (no CUDA runtime on a CPU machine, deprecations); on CPU, inductor
    compiles in this process: on 2 cores a worker pool would compete with the timed runs."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.")
    os.environ.update(PYKEOPS_VERBOSE="0", KEOPS_VERBOSE="0")  # read when pykeops is imported
    import torch._functorch.config

    # The backward mode times loss.backward(retain_graph=True) on one compiled graph per shape; donated
    # buffers (torch >= 2.6) refuse a retained graph.
    if hasattr(torch._functorch.config, "donated_buffer"):
        torch._functorch.config.donated_buffer = False
    if device == "cpu":
        import torch._inductor.config

        torch._inductor.config.compile_threads = 1


def keops_cosine(x: torch.Tensor) -> torch.Tensor:
    """mean_b 1/(N(N-1)) Σ_{i≠j} |x̂_i·x̂_j| with Σ_j as a KeOps Sum reduction. S is symmetric, so the j side
    is detached and the gradient doubled (2h − h.detach()): one gradient reduction instead of two."""
    from pykeops.torch import LazyTensor

    n = x.shape[-2]
    xn = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    rows = (LazyTensor(xn[:, :, None, :]) | LazyTensor(xn.detach()[:, None, :, :])).abs().sum(dim=2)
    half = rows.sum((-1, -2)) - (xn * xn.detach()).sum((-1, -2))  # the reduction includes i = j
    return ((2 * half - half.detach()) / (n * (n - 1))).mean()


def keops_all(first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """mean over images and patches of lse_j(a_i·z_j) − a_i·z_i, lse as a KeOps LogSumExp reduction (τ = 1)."""
    from pykeops.torch import LazyTensor

    lse = (LazyTensor(first[:, :, None, :]) | LazyTensor(last[:, None, :, :])).logsumexp(dim=2)[..., 0]
    return (lse - (first * last).sum(-1)).mean()


def infcl_head_dim(d: int) -> int:
    """Inf-CL views D as heads of ``head_dim`` features, unmasked: a power of two dividing D (<= 256)."""
    return min(d & -d, 256)


def infcl_all(first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    from inf_cl import cal_flash_loss

    head = infcl_head_dim(first.shape[-1])
    return torch.stack([cal_flash_loss(a, z, head_dim=head).mean() for a, z in zip(first, last, strict=True)]).mean()


PEER_FORMS = {("keops", "cosine"): keops_cosine, ("keops", "contrastive-all"): keops_all}
PEER_FORMS[("inf-cl", "contrastive-all")] = infcl_all


def unavailable(case: Case) -> tuple[str, str] | None:
    """("skipped", why) when ``case.provider`` cannot run ``case`` here (not installed, device, dtype); None if
    it can."""
    if case.provider in PEERS and case.dtype in AUTOCAST:
        return "skipped", "the autocast case compares fastpatchdiv with the naive formula, eager and compiled"
    if case.provider == "keops":
        if not importlib.util.find_spec("pykeops"):
            return "skipped", f"pykeops is not installed ({INSTALL})"
        if case.dtype != "fp32":
            return "skipped", "KeOps runs fp32 only here (it has no bfloat16; its float16 sums in half precision)"
        if case.device == "cuda" and not __import__("pykeops").config.gpu_available:
            return "skipped", "pykeops finds no CUDA toolkit here (it compiles with nvrtc)"
    if case.provider == "inf-cl":
        if case.device != "cuda":
            return "skipped", "CUDA only"
        if not importlib.util.find_spec("inf_cl"):
            return "skipped", f"inf-cl is not installed ({INSTALL})"
        if infcl_head_dim(case.D) < 16:
            return "skipped", f"Inf-CL needs a head_dim (a power of two >= 16) dividing D, got D={case.D}"
    return None


class Providers:
    """The scalar loss of each case, ``fn(*inputs) -> ()``: torch.compile is probed once (no C++ compiler: every
    compile case is skipped with that reason) and compiles once per shape; a peer is checked once per shape. An
    "amp-*" case's function runs under its autocast (torch.compile compiles the function that enters it)."""

    def __init__(self):
        self._compiled: tuple = (None, None)
        self._compile_broken: str | None = None
        self._checked: dict[tuple, str | None] = {}

    def loss_fn(self, case: Case):
        op = OPS[case.op]
        if case.provider in ("fastpatchdiv", *PEERS):
            fn = op.fused if case.provider == "fastpatchdiv" else PEER_FORMS[(case.provider, case.op)]
            return under_autocast(fn, case.dtype, case.device)

        def reference_mean(*xs):
            return op.reference(*xs).mean()

        naive = under_autocast(reference_mean, case.dtype, case.device)
        if case.provider == "torch":
            return naive
        if self._compile_broken is None:
            try:
                torch.compile(lambda x: (x * 2).sin().sum(), dynamic=False)(torch.randn(8, device=case.device))
                self._compile_broken = ""
            except Exception as e:
                self._compile_broken = f"torch.compile is unavailable here ({first_line(e, 200)})"
        if self._compile_broken:
            raise RuntimeError(self._compile_broken)
        if self._compiled[0] != case.shape_key:
            torch._dynamo.reset()  # one graph per shape, as in training, and never the recompile limit
            self._compiled = (case.shape_key, torch.compile(naive, dynamic=False))
        return self._compiled[1]

    def check(self, case: Case, fn, history: dict) -> tuple[str | None, float | None]:
        """(why the peer disagrees with the float64 reference or None, its first call's compile seconds or None).

        Loss and input gradients, on fresh inputs of the case's D and dtype, (b, n) <= (B, N) with
        b·n² <= 2^16 so that the reference stays small. A formula's first call (per op, D, dtype) is timed
        against a second one: the difference is compilation. The warm call's forward and backward times
        seed the CPU time estimate (cases.estimate_s)."""
        if case.shape_key in self._checked:
            return self._checked[case.shape_key], None
        first = not any(k[:3] == case.shape_key[:3] and k[5:] == case.shape_key[5:] for k in self._checked)
        n = min(case.N, 256)
        b = max(1, min(case.B, 2**16 // n**2))
        inputs = make_inputs(case.op, b, n, case.D, case.dtype, case.device, torch.Generator(case.device))
        calls = []
        for _ in range(2 if first else 1):
            for t in inputs:
                t.grad = None
            t0 = _now(case.device)
            loss = fn(*inputs)
            t1 = _now(case.device)
            loss.backward()
            calls.append((t1 - t0, _now(case.device) - t1))
        for mode, seconds in zip(("forward", "backward", "full"), (*calls[-1], sum(calls[-1])), strict=True):
            remember(history, dataclasses.replace(case, mode=mode, B=b, N=n), seconds)
        ref_inputs = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
        (ref := OPS[case.op].reference(*ref_inputs).mean()).backward()
        pairs = [("loss", loss, ref)] + [
            (f"gradient of input {i}", x.grad, r.grad) for i, (x, r) in enumerate(zip(inputs, ref_inputs, strict=True))
        ]
        errors = {k: ((x.double() - y).norm() / y.norm().clamp_min(1e-30)).item() for k, x, y in pairs if y is not None}
        k, tol = max(errors, key=lambda k: errors[k] if errors[k] == errors[k] else math.inf), TOLERANCE[case.dtype]
        bad = f"disagrees with the float64 reference at B={b}, N={n}, D={case.D}: relative error of the {k} "
        self._checked[case.shape_key] = None if errors[k] <= tol else bad + f"{errors[k]:.3g} > {tol:g} (not timed)"
        return self._checked[case.shape_key], max(0.0, sum(calls[0]) - sum(calls[-1])) if first else None


def _now(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:limit]
