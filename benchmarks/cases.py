"""What is benchmarked: the op registry, the providers, the sweep and the workloads.

The CLI (``python -m benchmarks``) and the pytest-benchmark tests (``pytest benchmarks/``) both read
their cases from here, so there is one definition of every case. A new op plugs in as one ``Op`` entry
in ``OPS``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import itertools
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("forward", "backward", "full")
PROVIDERS = ("fastpatchdiv", "torch", "torch.compile")
# The baselines: the naive N x N reference of fastpatchdiv.reference, eager and compiled.
NAIVE = ("torch", "torch.compile")


def quiet() -> None:
    """Silence torch's one-line warnings that are noise here (no CUDA runtime on a CPU machine, deprecations)."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.")


def compile_in_process() -> None:
    """Make inductor compile in this process: no worker-pool processes (on a 2-core machine they compete
    with the timed runs, and their pool's helper prints "leaked semaphore" warnings at exit)."""
    import torch._inductor.config

    torch._inductor.config.compile_threads = 1


class Unavailable(Exception):
    """A provider cannot run a case; the message says why (an op not written yet, no compiler, ...)."""


# ----------------------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------------------


def _tokens(shape, dtype, device, gen, requires_grad: bool) -> torch.Tensor:
    # Scaled by D^-1/4 so that token dot products (the contrastive logits) have unit variance.
    x = torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * shape[-1] ** -0.25
    return x.to(dtype).requires_grad_(requires_grad)


def _one_input(B, N, D, dtype, device, gen):
    return (_tokens((B, N, D), dtype, device, gen, True),)


def _first_last(B, N, D, dtype, device, gen):
    """``first`` is detached in training (detach_first=True), so only ``last`` asks for a gradient."""
    return _tokens((B, N, D), dtype, device, gen, False), _tokens((B, N, D), dtype, device, gen, True)


def _square_n(n: int) -> str | None:
    return None if math.isqrt(n) ** 2 == n else f"negatives='window' needs a square N (an H x W = N grid), got N={n}"


@dataclass(frozen=True)
class Op:
    """One benchmarked op.

    ``fused`` and ``reference`` are dotted names resolved when a case runs, so an op that is not
    written yet turns into skipped records instead of an import error. ``reference`` returns per-image
    losses (B,); the benchmark takes their mean, as ``reduction="mean"`` does. ``macs(B, N, D, mode)``
    counts the multiply-adds the op cannot avoid; ``None`` marks an O(N·D) op, judged by
    ``min_bytes(B, N, D, itemsize, mode)`` (each input read once, each gradient written once) instead.
    """

    name: str
    fused: str
    reference: str
    make_inputs: Callable
    macs: Callable | None
    min_bytes: Callable
    kwargs: dict = field(default_factory=dict)
    check_n: Callable[[int], str | None] = lambda n: None

    @property
    def compute_bound(self) -> bool:
        return self.macs is not None


def _per_mode(fwd: float, bwd: float) -> dict:
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}


def _cosine_macs(B, N, D, mode):
    # Forward: the upper triangle of the symmetric Gram matrix. Backward: sign(S) X̂ (both halves of S);
    # recomputing S's triangle (N²·D/2 more) is not counted.
    return B * N * N * D * _per_mode(0.5, 1.0)[mode]


def _all_macs(B, N, D, mode):
    # Forward: S = A Zᵀ. Backward with A detached: recompute S (the softmax P needs it), then dZ = Pᵀ A
    # (3 with dA = P Z too).
    return B * N * N * D * _per_mode(1.0, 2.0)[mode]


def _cosine_bytes(B, N, D, itemsize, mode):
    return B * N * D * itemsize * _per_mode(1, 2)[mode]  # read x; backward reads x, writes dx


def _pair_bytes(B, N, D, itemsize, mode):
    return B * N * D * itemsize * _per_mode(2, 3)[mode]  # read A, Z; backward reads A, Z, writes dZ


def _contrastive(negatives: str, macs, check_n=lambda n: None) -> Op:
    return Op(
        name=f"contrastive-{negatives}",
        fused="fastpatchdiv.patch_contrastive_loss",
        reference="fastpatchdiv.reference.contrastive_loss_reference",
        make_inputs=_first_last,
        macs=macs,
        min_bytes=_pair_bytes,
        kwargs={"negatives": negatives},
        check_n=check_n,
    )


OPS: dict[str, Op] = {
    op.name: op
    for op in (
        Op(
            name="cosine",
            fused="fastpatchdiv.patch_cosine_loss",
            reference="fastpatchdiv.reference.cosine_loss_reference",
            make_inputs=_one_input,
            macs=_cosine_macs,
            min_bytes=_cosine_bytes,
        ),
        _contrastive("mean", None),
        _contrastive("window", None, _square_n),
        _contrastive("all", _all_macs),
    )
}


# ----------------------------------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------------------------------


def _resolve(dotted: str):
    module, _, attr = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise Unavailable(f"{dotted} is not importable yet ({type(e).__name__}: {e})") from None
    except Exception as e:  # a module half-written by someone else: report, do not crash the sweep
        raise Unavailable(f"importing {module} failed ({type(e).__name__}: {e})") from None


def loss_fn(op_name: str, provider: str) -> Callable[..., torch.Tensor]:
    """The scalar loss ``provider`` computes for ``op_name``: ``fn(*inputs) -> tensor of shape ()``.

    torch.compile compiles on the first call (``dynamic=False``: one graph per shape, as in training).
    Raises ``Unavailable`` when the op or reference cannot be imported.
    """
    op = OPS[op_name]
    if provider == "fastpatchdiv":
        fused = _resolve(op.fused)
        return lambda *xs: fused(*xs, **op.kwargs, reduction="mean")
    reference = _resolve(op.reference)

    def naive(*xs):
        return reference(*xs, **op.kwargs).mean()

    if provider == "torch":
        return naive
    if provider == "torch.compile":
        return torch.compile(naive, dynamic=False)
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


class LossFns:
    """``loss_fn`` as a benchmark needs it: torch.compile is tried once on a toy function (a missing C++
    compiler then skips every compile case with that reason), and each shape gets one compiled function
    shared by its modes, after a ``torch._dynamo.reset()`` so the recompile limit is never reached."""

    def __init__(self, log=print):
        self.log = log
        self._compiled: tuple | None = None  # (shape_key, compiled fn)
        self._broken: str | None = None
        self._probed = False

    def __call__(self, case: Case) -> Callable[..., torch.Tensor]:
        if case.provider != "torch.compile":
            return loss_fn(case.op, case.provider)
        self._probe(case.device)
        if self._compiled is None or self._compiled[0] != case.shape_key:
            torch._dynamo.reset()
            self._compiled = (case.shape_key, loss_fn(case.op, case.provider))
        return self._compiled[1]

    def _probe(self, device: str) -> None:
        if not self._probed:
            self._probed = True
            try:
                torch.compile(lambda x: (x * 2).sin().sum(), dynamic=False)(torch.randn(8, device=device))
            except Exception as e:
                self._broken = f"torch.compile is unavailable here ({type(e).__name__}: {str(e).strip()[:200]})"
                self.log(f"skipping every torch.compile case: {self._broken}")
        if self._broken:
            raise Unavailable(self._broken)


@functools.cache
def fastpatchdiv_backend(device: str, dtype: str) -> str:
    """Which path ``backend="auto"`` takes for these inputs ("triton" or "torch"), for the records."""
    try:
        from fastpatchdiv._common import pick_backend

        return pick_backend(torch.empty(2, 2, 2, device=device, dtype=DTYPES[dtype]), "auto")
    except Exception:
        return "unknown"


# ----------------------------------------------------------------------------------------------------
# Cases and sweeps
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    op: str
    provider: str
    mode: str
    dtype: str
    B: int
    N: int
    D: int
    device: str

    @property
    def series(self) -> tuple:
        """The cases that differ only in N: one line of a plot, one column of a table."""
        return (self.op, self.provider, self.mode, self.dtype, self.D, self.device)

    @property
    def cost_key(self) -> tuple:
        """The cases whose times scale into each other by ``work`` (any N and D)."""
        return (self.op, self.provider, self.mode, self.dtype, self.device)

    @property
    def shape_key(self) -> tuple:
        """The cases that share inputs and one compiled graph per mode."""
        return (self.op, self.dtype, self.B, self.N, self.D, self.device)

    def label(self) -> str:
        return f"{self.op} {self.mode} {self.provider} {self.dtype} B={self.B} N={self.N} D={self.D}"


@dataclass(frozen=True)
class Sweep:
    """A sweep and how to time it. ``default_sweep`` gives the per-device defaults (see README)."""

    device: str
    ops: tuple = tuple(OPS)
    providers: tuple = PROVIDERS
    modes: tuple = MODES
    dtypes: tuple = ("fp32",)
    ns: tuple = (196, 576, 1024, 4096, 16384, 65536)
    ds: tuple = (384, 768)
    # D -> the largest N it runs at (CPU keeps the big D to small N); ignored when --d is given.
    d_max_n: tuple = ()
    # Every case holds B * N = tokens patch tokens (B = 1 once N > tokens).
    tokens: int = 65536
    # CPU timing: first run discarded, then at least min_reps and until budget_s of samples (<= max_reps).
    cpu_budget_s: float = 1.0
    cpu_min_reps: int = 3
    cpu_max_reps: int = 50
    # CUDA timing: triton.testing.do_bench's warm-up and repetition times.
    cuda_warmup_ms: int = 25
    cuda_rep_ms: int = 100
    # CPU only: skip a case whose single call is estimated slower than this ...
    time_cap_s: float | None = None
    # ... except full-mode (forward + backward) cases at N >= long_min_n, the rows the sweep exists for
    # (the headline ratios at N = 4096 and the high-resolution rows), which get this cap instead.
    long_cap_s: float | None = None
    long_min_n: int = 4096
    # ... or whose naive N x N footprint is estimated above this.
    mem_cap_gib: float = 8.0
    measure_memory: bool = True
    quick: bool = False

    def batch(self, n: int) -> int:
        return max(1, self.tokens // n)

    def ds_for(self, n: int) -> tuple:
        limits = dict(self.d_max_n)
        return tuple(d for d in self.ds if n <= limits.get(d, n))


def default_sweep(device: str, quick: bool = False) -> Sweep:
    """Per-device defaults: the full GPU sweep, a CPU sweep that fits in 20 minutes on 2 cores, a smoke run."""
    if quick:
        return Sweep(
            device=device,
            ns=(64, 144),
            ds=(32,),
            tokens=576,
            cpu_budget_s=0.1,
            cpu_max_reps=10,
            cuda_warmup_ms=5,
            cuda_rep_ms=20,
            time_cap_s=5.0 if device == "cpu" else None,
            quick=True,
        )
    if device == "cuda":
        return Sweep(device=device, dtypes=("fp32", "bf16", "fp16"))
    # CPU: D = 768 only at N = 196 (ViT-B/16 at 224 px); --d 768 lifts that.
    return Sweep(device=device, tokens=16384, d_max_n=((768, 196),), cpu_budget_s=0.3, time_cap_s=1.0, long_cap_s=90.0)


def cases(sweep: Sweep) -> list[Case]:
    """Every case of the sweep, grouped by shape so the providers and modes of one shape run together."""
    out = []
    for op, dtype in itertools.product(sweep.ops, sweep.dtypes):
        for d in sorted(set(sweep.ds)):
            for n in sorted(set(sweep.ns)):
                if d not in sweep.ds_for(n):
                    continue
                for provider, mode in itertools.product(sweep.providers, sweep.modes):
                    out.append(Case(op, provider, mode, dtype, sweep.batch(n), n, d, sweep.device))
    return out


def precheck(case: Case, sweep: Sweep) -> tuple[str, str] | None:
    """(status, note) for a case that must not run, from its shape alone; None if it may run."""
    reason = OPS[case.op].check_n(case.N)
    if reason:
        return "skipped", reason
    if case.device == "cpu" and case.dtype != "fp32":
        return "skipped", f"{case.dtype} is benchmarked on CUDA only"
    if case.device == "cpu" and case.provider in NAIVE:
        need = naive_footprint(case)
        cap = sweep.mem_cap_gib * 2**30
        if need > cap:
            return (
                "oom",
                f"out of memory: the N x N reference needs ~{need / 2**30:.3g} GiB"
                f" > cap {sweep.mem_cap_gib:g} GiB (not run)",
            )
    return None


# Peak RSS growth of the references on CPU, in B x N x N matrices of the input dtype, measured at
# N = 1024 and 4096 (B = 16, 4, 1) and rounded up: per image (the largest over the four ops) plus a
# constant for the unbatched N x N masks and index grids (contrastive-window's, in int64, at B = 1).
_NAIVE_MATRICES = {"forward": 3.5, "backward": 3.0, "full": 4.5}
_NAIVE_UNBATCHED = 2.0


def naive_footprint(case: Case) -> float:
    """Estimated peak bytes above the inputs of the naive reference for one step."""
    itemsize = torch.empty((), dtype=DTYPES[case.dtype]).element_size()
    return (_NAIVE_MATRICES[case.mode] * case.B + _NAIVE_UNBATCHED) * case.N**2 * itemsize


def estimate_s(case: Case, history: dict) -> tuple[float, tuple[int, int]] | None:
    """(seconds, (N, D) it was scaled from): a CPU case's single call, estimated before it runs.

    Scales the measured median of the same op, provider, mode and dtype at the nearest ``work``
    (``remember``; another N or D) by the ratio of ``work``: the nearest, because the O(N·D) ops are
    not exactly linear, and an estimate carried from N = 65536 down to N = 196 would be off. None for
    the first case of each.
    """
    seen = history.get(case.cost_key)
    if not seen:
        return None
    w = work(case)
    shape, work_prev, seconds = min(seen, key=lambda s: abs(math.log(s[1] / w)))
    return seconds * w / work_prev, shape


def too_slow(case: Case, sweep: Sweep, history: dict) -> tuple[str, str] | None:
    """("skipped", reason) when a CPU case's single call is estimated (``estimate_s``) above its cap.

    A backward call is charged the forward that must run (untimed) before it, here and in the memory
    child: at N = 65536 that forward takes a minute on CPU while the backward only scales a gradient.
    """
    cap = sweep.time_cap_s
    if sweep.long_cap_s is not None and case.mode == "full" and case.N >= sweep.long_min_n:
        cap = sweep.long_cap_s
    guesses = [estimate_s(case, history)]
    if case.mode == "backward":
        guesses.append(estimate_s(dataclasses.replace(case, mode="forward"), history))
    guesses = [g for g in guesses if g is not None]
    seconds = sum(g[0] for g in guesses)
    if cap is None or not guesses or seconds <= cap:
        return None
    n_prev, d_prev = guesses[0][1]
    what = "per call with the forward it needs" if case.mode == "backward" else "per call"
    return (
        "skipped",
        f"skipped: estimated {seconds:.1f} s {what} > {cap:g} s cap on CPU (scaled from N={n_prev}, D={d_prev})",
    )


def remember(history: dict, case: Case, seconds: float) -> None:
    history.setdefault(case.cost_key, []).append(((case.N, case.D), work(case), seconds))


def work(case: Case) -> float:
    """What a provider's time scales with: B·N²·D for the N x N references and pairwise ops, else B·N·D."""
    quadratic = case.provider in NAIVE or OPS[case.op].compute_bound
    return case.B * case.N * case.D * (case.N if quadratic else 1)


# ----------------------------------------------------------------------------------------------------
# Workloads
# ----------------------------------------------------------------------------------------------------


@dataclass
class Workload:
    """A timed step: ``clear()`` drops input gradients (outside the timed region), ``step()`` runs the mode."""

    step: Callable[[], object]
    grads: list

    def clear(self) -> None:
        for t in self.grads:
            t.grad = None


def workload(case: Case, fn: Callable, n_sets: int = 1, seed: int = 0) -> Workload:
    """Inputs for ``case`` and the step its mode times.

    forward and full rotate among ``n_sets`` input sets so caches do not flatter. backward runs the
    forward once here, outside the timed region, and times ``loss.backward(retain_graph=True)`` on one
    set (more sets would keep more graphs, and with them N x N matrices, alive).
    """
    op = OPS[case.op]
    gen = torch.Generator(device=case.device).manual_seed(seed)
    n_sets = 1 if case.mode == "backward" else n_sets
    sets = [op.make_inputs(case.B, case.N, case.D, DTYPES[case.dtype], case.device, gen) for _ in range(n_sets)]
    grads = [t for s in sets for t in s if t.requires_grad]
    if case.mode == "backward":
        loss = fn(*sets[0])
        return Workload(lambda: loss.backward(retain_graph=True), grads)
    order = itertools.cycle(sets)
    if case.mode == "forward":
        return Workload(lambda: fn(*next(order)), grads)
    return Workload(lambda: fn(*next(order)).backward(), grads)


# The eager providers' warm-up shape: one image of 64 patches (a square, as negatives="window" needs).
WARMUP_N = 64


def warmup_case(case: Case) -> Case:
    """A small copy of an eager case, to warm up on where a same-shape warm-up would be too costly.

    Eager code does its one-time work (thread pools, lazy initialisation, kernel selection) whatever the
    shape, so a small copy warms it up as well. torch.compile compiles one graph per shape: it gets
    the case itself.
    """
    if case.provider == "torch.compile":
        return case
    return dataclasses.replace(case, B=1, N=min(case.N, WARMUP_N))


def n_input_sets(case: Case) -> int:
    """3 input sets to rotate among while one input tensor is at most 256 MiB (a cache could hold it), else 1."""
    itemsize = torch.empty((), dtype=DTYPES[case.dtype]).element_size()
    return 3 if case.B * case.N * case.D * itemsize <= 256 * 2**20 else 1
