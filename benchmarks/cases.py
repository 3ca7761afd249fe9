"""What is benchmarked: the ops, the cost model, the sweeps and the rules that skip a case.

``python -m benchmarks`` and ``pytest benchmarks/`` take their cases from ``cases(sweep)``. A new op is
one ``Op`` in ``OPS``, plus its rows in ``COST`` when it is O(N²·D).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

import fastpatchdiv
from fastpatchdiv import reference

# A case's dtype names its inputs' dtype, or a mixed-precision setting ("amp-*"): then DTYPES gives the
# dtype of the inputs that stay full precision and AUTOCAST the dtype the step runs under.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "amp-bf16": torch.float32}
# Mixed precision as a timm ViT trains under torch.autocast(dtype=bfloat16): autocast runs layer_norm in
# fp32, so the final norm's tokens (``last``, the cosine loss's input) arrive in fp32, while the patch
# embedding (a conv) gives ``first`` in bf16 (Op.autocast_inputs). The loss runs under the same autocast,
# the backward outside it (as torch.autocast's documentation asks). CPU autocast runs it too.
AUTOCAST = {"amp-bf16": torch.bfloat16}
CPU_DTYPES = ("fp32", *AUTOCAST)  # 16-bit inputs are benchmarked on CUDA only
MODES = ("forward", "backward", "full")
NAIVE = ("torch", "torch.compile")  # the N x N formulas of fastpatchdiv.reference, eager and compiled
PEERS = ("keops", "inf-cl")  # libraries that also avoid N x N memory (providers.py)
PROVIDERS = ("fastpatchdiv", *NAIVE, *PEERS)
MUST_RUN = ("fastpatchdiv", "torch")  # a failure of these is an error; of the others (their own limits), a skip


def compute_dtype(dtype: str) -> str:
    """The dtype the matrix work of a case runs in (what its ceiling is measured in): the autocast dtype of an
    "amp-*" case, else the inputs' dtype."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}[AUTOCAST[dtype]] if dtype in AUTOCAST else dtype


def under_autocast(fn: Callable, dtype: str, device: str) -> Callable:
    """``fn`` itself, or for an "amp-*" dtype ``fn`` run under ``torch.autocast(device, AUTOCAST[dtype])``.

    Args:
        fn: a loss function of the case's inputs.
        dtype: the case's dtype name.
        device: "cpu" or "cuda".

    Returns:
        The function to time (for torch.compile: the one to compile, so that the graph holds the autocast).
    """
    if dtype not in AUTOCAST:
        return fn

    def autocast_fn(*inputs):
        with torch.autocast(device_type=device, dtype=AUTOCAST[dtype]):
            return fn(*inputs)

    return autocast_fn


def _tokens(shape, dtype, device, gen, requires_grad: bool) -> torch.Tensor:
    # Scaled by D^-1/4 so that token dot products (the contrastive logits) have unit variance.
    x = torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * shape[-1] ** -0.25
    return x.to(dtype).requires_grad_(requires_grad)


def one_input(B, N, D, dtype, device, gen):
    return (_tokens((B, N, D), dtype, device, gen, True),)


def first_last(B, N, D, dtype, device, gen):
    """``first`` is detached in training (detach_first=True): only ``last`` asks for a gradient."""
    return _tokens((B, N, D), dtype, device, gen, False), _tokens((B, N, D), dtype, device, gen, True)


def _pairs(B, N, D):
    return B * N * N * D


def _pair_matrices(case) -> float:
    """Peak RSS growth of the naive pairwise references on CPU, in bytes: B x N x N matrices (measured at
    N = 1024 and 4096, rounded up), plus 2 unbatched N x N masks and index grids (contrastive-window's)."""
    return ({"forward": 3.5, "backward": 3.0, "full": 4.5}[case.mode] * case.B + 2) * case.N**2 * 4


@dataclass(frozen=True)
class Op:
    """``fused(*inputs)``: fastpatchdiv's scalar loss; ``reference(*inputs)``: the naive per-image losses;
    ``min_bytes(B, N, D, itemsize, mode)``: the traffic an O(N·D) op cannot avoid (None: a compute-bound op,
    charged its ``COST`` in units of ``unit(B, N, D)`` multiply-adds); ``naive_bytes(case)``: the naive
    form's memory on CPU (what decides "oom" before a run); ``check_n(N)``: why an N cannot run;
    ``autocast_inputs``: the indices of the inputs that an "amp-*" case gives in the autocast dtype (the patch
    embedding's output; the others stay in full precision, as the final norm's tokens and the parameters do)."""

    name: str
    fused: Callable
    reference: Callable
    make_inputs: Callable
    min_bytes: Callable | None = None
    check_n: Callable[[int], str | None] = lambda n: None
    unit: Callable[[int, int, int], float] = _pairs
    unit_label: str = "N²·D"
    naive_bytes: Callable = _pair_matrices
    autocast_inputs: tuple[int, ...] = ()

    @property
    def rate_unit(self) -> str:
        """The throughput's unit: TFLOP/s of ``COST``'s multiply-adds, or GB/s of ``min_bytes``."""
        return "TFLOP/s" if self.min_bytes is None else "GB/s"


def _contrastive(negatives: str, **kw) -> Op:
    fused = lambda a, z: fastpatchdiv.patch_contrastive_loss(a, z, negatives=negatives)  # noqa: E731
    naive = lambda a, z: reference.contrastive_loss_reference(a, z, negatives=negatives)  # noqa: E731
    return Op(f"contrastive-{negatives}", fused, naive, first_last, autocast_inputs=(0,), **kw)


def _square(n: int) -> str | None:
    return None if math.isqrt(n) ** 2 == n else f"negatives='window' needs a square N (an H x W = N grid), got N={n}"


def _pair_bytes(B, N, D, itemsize, mode):  # read A and Z; the backward reads them and writes dZ
    return B * N * D * itemsize * {"forward": 2, "backward": 3, "full": 5}[mode]


CLASSES = 1000  # the mixing loss's patch head: ImageNet's classes


def mixing_inputs(B, N, D, dtype, device, gen):
    """Tokens, a patch head (weight (C, D) scaled by D^-1/2, zero bias; both trained) and per-patch labels."""
    head = torch.randn((CLASSES, D), generator=gen, device=device) * D**-0.5
    labels = torch.randint(0, CLASSES, (B, N), generator=gen, device=device)
    bias = torch.zeros(CLASSES, device=device, dtype=dtype, requires_grad=True)
    return _tokens((B, N, D), dtype, device, gen, True), head.to(dtype).requires_grad_(), bias, labels


def _logits(case) -> float:
    """The naive mixing form's (B·N, C) fp32 logits, their log-softmax and gradient."""
    return 3 * case.B * case.N * CLASSES * 4


OPS: dict[str, Op] = {
    op.name: op
    for op in (
        Op("cosine", fastpatchdiv.patch_cosine_loss, reference.cosine_loss_reference, one_input),
        _contrastive("mean", min_bytes=_pair_bytes),
        _contrastive("window", min_bytes=_pair_bytes, check_n=_square),
        _contrastive("all"),
        Op(
            "mixing",
            fastpatchdiv.patch_mixing_loss,
            reference.mixing_loss_reference,
            mixing_inputs,
            unit=lambda B, N, D: B * N * D * CLASSES,
            unit_label=f"N·D·C, C = {CLASSES}",
            naive_bytes=_logits,
        ),
    )
}


def make_inputs(op: str, B: int, N: int, D: int, dtype: str, device: str, gen: torch.Generator) -> tuple:
    """The inputs of ``op`` at a case's shape and dtype name: ``Op.make_inputs`` in ``DTYPES[dtype]``, then for
    an "amp-*" dtype the ``Op.autocast_inputs`` cast to the autocast dtype (drawn in fp32 first, so that an
    "amp-bf16" case's values are the fp32 case's, rounded)."""
    inputs = OPS[op].make_inputs(B, N, D, DTYPES[dtype], device, gen)
    if dtype not in AUTOCAST:
        return inputs
    low = set(OPS[op].autocast_inputs)
    cast = lambda t: t.detach().to(AUTOCAST[dtype]).requires_grad_(t.requires_grad)  # noqa: E731
    return tuple(cast(t) if i in low else t for i, t in enumerate(inputs))


# The cost model: multiply-adds (MACs) each provider's path actually performs per image, in units of N²·D,
# as (forward, backward), each a number or a function of the case; full = both. "forward" is a training
# step's (grad enabled): fastpatchdiv's PyTorch path forms the gradient there from the same tiles, so its
# backward is an O(N·D) scale: 0 here, "n/a" in the tables. Keyed by (op, provider, path), path = the
# records' ``backend``. Update a row when a path changes (e.g. a dense path for N <= one tile).


def _cpu_triangle(case: Case) -> float:
    """The PyTorch cosine path forms tiles J >= I with the diagonal tiles whole: (nb + 1) / (2 nb) of N²·D for
    nb row blocks of its own tile rule (1 when one tile holds the image; 1/2 as N grows)."""
    from fastpatchdiv.cosine import _tile_size

    nb = math.ceil(case.N / _tile_size(case.B, case.N))
    return (nb + 1) / (2 * nb)


COST: dict[tuple[str, str, str], tuple] = {
    # the triangle, and with grad sign(S_IJ) X̂_J into G_I and sign(S_IJ)ᵀ X̂_I into G_J (N²D); no_grad: triangle
    ("cosine", "fastpatchdiv", "torch"): (lambda c: _cpu_triangle(c) + 1, 0),
    # with grad, row strips of S (all of it), then sign(S) X̂; the backward is an O(N·D) scale
    ("cosine", "fastpatchdiv", "triton"): (2, 0),
    ("cosine", "torch", "eager"): (1, 2),  # the whole Gram; autograd: dS X̂ and dSᵀ X̂
    ("cosine", "torch.compile", "inductor"): (1, 2),
    # Our count of our KeOps formula (providers.py): no symmetry in its reduction; one gradient reduction
    # over j, recomputing x̂_i·x̂_j and summing sign·x̂_j.
    ("cosine", "keops", "keops"): (1, 2),
    ("contrastive-all", "fastpatchdiv", "torch"): (2, 0),  # S strips, and dZ = Pᵀ A from the same strips
    # with grad, the lse pass, the P strips (S again), then Pᵀ A; the backward is an O(N·D) scale
    ("contrastive-all", "fastpatchdiv", "triton"): (3, 0),
    ("contrastive-all", "torch", "eager"): (1, 1),  # S = A Zᵀ; autograd with A detached: dSᵀ A alone
    ("contrastive-all", "torch.compile", "inductor"): (1, 1),
    ("contrastive-all", "keops", "keops"): (1, 2),  # our count of KeOps' LogSumExp gradient: one reduction over i
    ("contrastive-all", "inf-cl", "inf-cl"): (1, 4),  # dQ and dK passes each recompute S (dQ although A is detached)
    # mixing, in units of B·N·D·C: logits H Wᵀ, then G W, Gᵀ H. With grad, fastpatchdiv forms all three in the
    # forward, chunk by chunk ("mean" reduction), and its backward only scales them.
    ("mixing", "fastpatchdiv", "torch"): (3, 0),
    ("mixing", "fastpatchdiv", "triton"): (3, 0),
    ("mixing", "torch", "eager"): (1, 2),
    ("mixing", "torch.compile", "inductor"): (1, 2),
}


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
    def shape_key(self) -> tuple:
        """The cases that share inputs, one compiled graph and one value check."""
        return (self.op, self.provider, self.dtype, self.B, self.N, self.D, self.device)

    def label(self) -> str:
        return f"{self.op} {self.mode} {self.provider} {self.dtype} B={self.B} N={self.N} D={self.D}"


def macs(case: Case, path: str) -> float | None:
    """Multiply-adds of one step of ``case`` on ``path``; None when ``COST`` has no row for it."""
    if (row := COST.get((case.op, case.provider, path))) is None:
        return None
    fwd, bwd = (f(case) if callable(f) else f for f in row)
    return OPS[case.op].unit(case.B, case.N, case.D) * {"forward": fwd, "backward": bwd, "full": fwd + bwd}[case.mode]


@dataclass(frozen=True)
class Sweep:
    """A sweep and how to time it (``default_sweep``; benchmarks/README.md, "The sweeps")."""

    device: str
    kind: str = "full"  # quick, default or full
    ops: tuple = tuple(OPS)
    providers: tuple = PROVIDERS
    modes: tuple = MODES
    dtypes: tuple = ("fp32",)
    ns: tuple = (196, 576, 1024, 4096, 16384, 65536)
    ds: tuple = (384, 768)
    d_max_n: tuple = ()  # (D, largest N it runs at); lifted by --d
    max_n: tuple = ()  # (provider, largest N it runs at, why)
    tokens: int = 65536  # every case holds B·N = tokens patch tokens (B = 1 once N > tokens)
    cpu_budget_s: float = 0.3  # CPU timing: runner.time_samples
    cpu_min_reps: int = 3
    cpu_max_reps: int = 50
    long_call_s: float = 5.0
    cuda_warmup_ms: int = 25  # CUDA timing: do_bench's warm-up and repetition times
    cuda_rep_ms: int = 100
    time_cap_s: float | None = None  # CPU: skip a case estimated slower per call (too_slow) ...
    long_cap_s: float | None = None  # ... or this for full mode at N >= long_min_n (the rows the sweep is for)
    long_min_n: int = 4096
    peer_cap_s: float | None = None  # ... or this for the peers' full mode (KeOps on CPU: 10-25 s at N = 196)
    mem_cap_gib: float = 8.0  # CPU: skip a naive case whose N x N footprint is estimated above this
    measure_memory: bool = True
    budget_s: float | None = None  # start no case after this many seconds (the rest: skipped, with why)


_REFERENCES = "the default run stops the N x N references at N = 4096 (--full runs them)"
_KEOPS_CPU = "left out of the CPU default: KeOps' CPU code does ~0.1 GMAC/s here (--full runs it where it fits)"


def default_sweep(device: str, kind: str = "default") -> Sweep:
    """``quick``: the CI smoke run. ``default``: every op, N = 196..16384 (65536 on CUDA), forward + backward,
    <= 5 minutes on 2 CPU cores. ``full``: every mode, N and D of the device."""
    cpu = device == "cpu"
    if kind == "quick":  # KeOps builds each formula with g++ (~10 s): only when --providers names it
        keep = tuple(p for p in PROVIDERS if p != "keops")
        fast = dict(
            cpu_budget_s=0.1, cpu_max_reps=10, cuda_warmup_ms=5, cuda_rep_ms=20, time_cap_s=5.0 if cpu else None
        )
        return Sweep(device, "quick", providers=keep, ns=(64, 144), ds=(32,), tokens=576, **fast)
    if kind == "default" and cpu:
        limits = (("torch", 4096, _REFERENCES), ("torch.compile", 4096, _REFERENCES), ("keops", 0, _KEOPS_CPU))
        short = dict(cpu_budget_s=0.2, long_call_s=2.5, max_n=limits, tokens=16384)
        return Sweep(device, "default", modes=("full",), ns=(196, 576, 4096, 16384), ds=(384,), **short)
    if kind == "default":  # amp-bf16: the setting a timm ViT trains in (see AUTOCAST)
        amp = ("amp-bf16", "fp32", "bf16")
        return Sweep(device, "default", modes=("full",), ns=(196, 576, 4096, 16384, 65536), ds=(384,), dtypes=amp)
    if cpu:  # D = 768 only at N = 196 (ViT-B/16 at 224 px)
        caps = dict(time_cap_s=1.0, long_cap_s=90.0, peer_cap_s=30.0)
        return Sweep(device, "full", tokens=16384, d_max_n=((768, 196),), **caps)
    return Sweep(device, "full", dtypes=("amp-bf16", "fp32", "bf16", "fp16"))


def implements(provider: str, op: str) -> bool:
    """A peer runs the ops it has a form of in ``providers.PEER_FORMS``; every other provider runs every op."""
    from benchmarks.providers import PEER_FORMS  # providers imports this module

    return provider not in PEERS or (provider, op) in PEER_FORMS


def cases(sweep: Sweep) -> list[Case]:
    """Every case, grouped by shape so that the providers and modes of one shape run together; by dtype, then D,
    then op, so that a run cut by its time budget has every op at the first dtype and smallest D."""
    out = []
    for dtype, d, op, n in itertools.product(sweep.dtypes, sorted(set(sweep.ds)), sweep.ops, sorted(set(sweep.ns))):
        if n <= dict(sweep.d_max_n).get(d, n):
            B, pm = max(1, sweep.tokens // n), itertools.product(sweep.providers, sweep.modes)
            out += [Case(op, p, m, dtype, B, n, d, sweep.device) for p, m in pm if implements(p, op)]
    return out


def precheck(case: Case, sweep: Sweep) -> tuple[str, str] | None:
    """(status, note) for a case that must not run, from its shape alone; None if it may run."""
    if reason := OPS[case.op].check_n(case.N):
        return "skipped", reason
    if why := next((w for p, n, w in sweep.max_n if p == case.provider and case.N > n), None):
        return "skipped", why
    if case.device == "cpu" and case.dtype not in CPU_DTYPES:
        return "skipped", f"{case.dtype} is benchmarked on CUDA only"
    need = OPS[case.op].naive_bytes(case)
    if case.device == "cpu" and case.provider in NAIVE and need > sweep.mem_cap_gib * 2**30:
        return (
            "oom",
            f"out of memory: the naive form needs ~{need / 2**30:.3g} GiB > {sweep.mem_cap_gib:g} GiB (not run)",
        )
    return None


# The CPU time estimate: a static rule per provider does not predict the same (KeOps' CPU code runs some 500x
# below the matmul rate; the O(N·D) ops are not linear in N). So a time is scaled from the same op, provider
# and mode measured at the nearest work (the op's unit of multiply-adds, or B·N·D for an O(N·D) path).


def work(case: Case) -> float:
    op = OPS[case.op]
    return (
        op.unit(case.B, case.N, case.D)
        if case.provider != "fastpatchdiv" or op.min_bytes is None
        else case.B * case.N * case.D
    )


def remember(history: dict, case: Case, seconds: float) -> None:
    history.setdefault((case.op, case.provider, case.mode, case.dtype), []).append((case, work(case), seconds))


def estimate_s(case: Case, history: dict) -> tuple[float, Case] | None:
    """(seconds, the case it was scaled from) for one call of ``case``; None before any of its kind ran."""
    if not (seen := history.get((case.op, case.provider, case.mode, case.dtype))):
        return None
    near, w_near, seconds = min(seen, key=lambda s: abs(math.log(s[1] / work(case))))
    return seconds * work(case) / w_near, near


def too_slow(case: Case, sweep: Sweep, history: dict) -> tuple[str, str] | None:
    """("skipped", why) when a CPU case's call is estimated over its cap; a backward is charged the forward
    that must run (untimed) before it, here and in the memory child."""
    long = case.mode == "full" and case.N >= sweep.long_min_n and sweep.long_cap_s is not None
    cap = sweep.long_cap_s if long else sweep.time_cap_s
    if case.mode == "full" and case.provider in PEERS and sweep.peer_cap_s is not None:
        cap = sweep.peer_cap_s
    modes = ("backward", "forward") if case.mode == "backward" else (case.mode,)
    guesses = [g for m in modes if (g := estimate_s(dataclasses.replace(case, mode=m), history))]
    if case.device != "cpu" or cap is None or not guesses or (seconds := sum(g[0] for g in guesses)) <= cap:
        return None
    return "skipped", f"estimated {seconds:.3g} s per call > {cap:g} s cap (from N={guesses[0][1].N}, D={case.D})"


@dataclass
class Workload:
    """A timed step: ``clear()`` drops input gradients (outside the timed region), ``step()`` runs the mode."""

    step: Callable[[], object]
    grads: list

    def clear(self) -> None:
        for t in self.grads:
            t.grad = None


def workload(case: Case, fn: Callable, rotate: bool = False) -> Workload:
    """Inputs and the step of ``case``'s mode. With ``rotate``, forward and full cycle through 3 input sets
    while one input is <= 256 MiB, so that caches do not flatter. backward runs the forward here, untimed,
    and times ``loss.backward(retain_graph=True)`` on one set (more would keep more N x N graphs alive)."""
    gen, dtype = torch.Generator(device=case.device).manual_seed(0), DTYPES[case.dtype]
    rotate = rotate and case.mode != "backward" and case.B * case.N * case.D * dtype.itemsize <= 2**28
    shape = (case.op, case.B, case.N, case.D, case.dtype, case.device)
    sets = [make_inputs(*shape, gen) for _ in range(3 if rotate else 1)]
    grads, order = [t for s in sets for t in s if t.requires_grad], itertools.cycle(sets)
    if case.mode == "backward":
        loss = fn(*sets[0])
        return Workload(lambda: loss.backward(retain_graph=True), grads)
    if case.mode == "forward":
        return Workload(lambda: fn(*next(order)), grads)
    return Workload(lambda: fn(*next(order)).backward(), grads)


def warmup_case(case: Case) -> Case:
    """A small copy (one image of 64 patches) to warm an eager provider up on: its one-time work does not
    depend on the shape. torch.compile compiles one graph per shape: it warms up on the case itself."""
    return case if case.provider == "torch.compile" else dataclasses.replace(case, B=1, N=min(case.N, 64))
