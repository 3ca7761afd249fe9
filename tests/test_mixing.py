"""patch_mixing_loss against the float64 full-logits oracle: values, gradients, options, bad input, ops, memory."""

import pytest
import torch

import fastpatchdiv
import fastpatchdiv.mixing as mixing
from fastpatchdiv import PatchMixingFunction, PatchMixingLoss, patch_mixing_loss
from fastpatchdiv.kernels import INTERPRETER
from fastpatchdiv.reference import mixing_loss_reference, mixing_region_loss_reference
from tests.helpers import (
    DEVICE,
    KERNEL_DTYPES,
    assert_close,
    peak_rss_growth,
    rel_error,
)

# Chunks of 7 rows: B·N is never a multiple of it in the shapes below, so every run has a ragged chunk.
SMALL_CHUNK = 7


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(mixing, "_chunk_rows", lambda m, d, c, backend: min(SMALL_CHUNK, max(m, 1)))


def make_inputs(B, N, D, C, dtype, device="cpu", soft=False, ignore=True, masked=False, bias=True):
    """Tokens, head and targets with logits of spread ~2 (a softmax that is neither flat nor one-hot).

    Hard targets have ignore_index at a few patches (and one whole image ignored when B >= 3); soft targets
    are random probability rows. Returns float64 masters rounded through ``dtype``.
    """
    tokens = torch.randn(B, N, D, dtype=torch.float64)
    weight = torch.randn(C, D, dtype=torch.float64) * (2.0 / D**0.5)
    b = torch.randn(C, dtype=torch.float64) if bias else None
    if soft:
        targets = torch.softmax(2 * torch.randn(B, N, C, dtype=torch.float64), dim=-1).float()
    else:
        targets = torch.randint(0, C, (B, N))
        if ignore:
            targets[torch.rand(B, N) < 0.2] = -100
            if B >= 3:
                targets[2] = -100
    mask = torch.rand(B, N) > 0.25 if masked else None
    cast = [t.to(dtype).to(device) if t is not None else None for t in (tokens, weight, b)]
    return (*cast, targets.to(device), mask.to(device) if mask is not None else None)


def reference(tokens, weight, bias, targets, mask, label_smoothing, weights, mode="patch"):
    """float64 oracle on the same (rounded) inputs: per-image losses and the grads of Σ_b w_b loss_b."""
    leaves = [t.detach().double().cpu().requires_grad_() if t is not None else None for t in (tokens, weight, bias)]
    tg = targets.cpu().double() if targets.is_floating_point() else targets.cpu()
    fn = mixing_loss_reference if mode == "patch" else mixing_region_loss_reference
    loss = fn(*leaves, tg, mask.cpu() if mask is not None else None, label_smoothing)
    (loss * weights.double().cpu()).sum().backward()
    return loss, [t.grad if t is not None else None for t in leaves]


def check_against_reference(inputs, backend, label_smoothing=0.0, reduction="none", mode="patch"):
    tokens, weight, bias, targets, mask = inputs
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (tokens, weight, bias)]
    B = tokens.shape[0] if tokens.dim() == 3 else 1
    weights = torch.rand(B, dtype=torch.float64) + 0.5
    out = patch_mixing_loss(
        *leaves, targets, label_smoothing=label_smoothing, reduction=reduction, mask=mask, mode=mode, backend=backend
    )
    if reduction == "none":
        (out * weights.to(out)).sum().backward()
    else:
        weights = torch.full((B,), 1.0 / B if reduction == "mean" else 1.0, dtype=torch.float64)
        out.backward()
    ref_loss, ref_grads = reference(tokens, weight, bias, targets, mask, label_smoothing, weights, mode)
    dtype = tokens.dtype
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    expected = ref_loss if reduction == "none" else (ref_loss * weights).sum()
    assert_close(out, expected, dtype, "loss")
    for name, leaf, ref in zip(("tokens", "weight", "bias"), leaves, ref_grads, strict=True):
        if leaf is None:
            continue
        assert leaf.grad.dtype == leaf.dtype and leaf.grad.shape == leaf.shape, name
        assert_close(leaf.grad, ref, dtype, f"d{name}")


# --------------------------------------------------------------------------------------- PyTorch path
@pytest.mark.parametrize("dtype", (torch.float64,) + KERNEL_DTYPES)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("C", [10, 1000, 1001])
def test_torch_path_matches_reference(small_chunks, dtype, soft, label_smoothing, C):
    inputs = make_inputs(3, 9, 20, C, dtype, soft=soft, masked=soft)
    reduction = "none" if C != 1000 else "mean"
    check_against_reference(inputs, "torch", label_smoothing, reduction)


def test_torch_path_default_chunks_and_gradcheck():
    """The real chunk rule (several chunks at M = 600, D = 4, C = 3), then gradcheck through the Function."""
    assert mixing._chunk_rows(600, 4, 3, "torch") == 512
    check_against_reference(make_inputs(2, 300, 4, 3, torch.float64), "torch", 0.1, "mean")
    t, w, b, y, _ = make_inputs(2, 5, 3, 4, torch.float64)
    for reduction in ("none", "sum"):

        def loss(t, w, b, reduction=reduction):
            return patch_mixing_loss(t, w, b, y, label_smoothing=0.2, reduction=reduction, backend="torch")

        assert torch.autograd.gradcheck(loss, tuple(x.requires_grad_() for x in (t, w, b)))


# --------------------------------------------------------------------------------------------- kernel
@pytest.mark.kernel
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_kernel_matches_reference(kernel_device, small_chunks, dtype, soft, label_smoothing):
    inputs = make_inputs(3, 6, 16, 10, dtype, kernel_device, soft=soft, masked=not soft)
    check_against_reference(inputs, "triton", label_smoothing, "none" if soft else "mean")


@pytest.mark.kernel
@pytest.mark.parametrize(
    "C, dtype, soft, label_smoothing",
    [
        (1000, torch.float32, False, 0.1),
        (1001, torch.float32, True, 0.0),
        (1001, torch.bfloat16, False, 0.1),
        (1000, torch.float16, True, 0.1),
    ],
)
def test_kernel_many_classes(kernel_device, small_chunks, C, dtype, soft, label_smoothing):
    """C crosses several class blocks (interpreter blocks are 256 wide); a handful of rows, two chunks."""
    inputs = make_inputs(1, 9, 16, C, dtype, kernel_device, soft=soft)
    check_against_reference(inputs, "triton", label_smoothing, "none")


@pytest.mark.kernel
def test_kernel_small_row_factors_keep_their_digits(kernel_device, small_chunks):
    """A row's factor s_b/n_b is below fp16's normal range from n_b ≈ 16k patches: no 16-bit operand may hold
    it. Emulated with image factors of 1e-6 on the op, whose dweight and dbias are still fp32."""
    tokens, weight, bias, targets, _ = make_inputs(2, 9, 16, 10, torch.float16, kernel_device, ignore=False)
    factors = (torch.rand(2, dtype=torch.float64) + 0.5) * 1e-6
    options = (0.0, -100, "triton", "fp16", False, True, True)
    out = torch.ops.fastpatchdiv.mixing_forward(
        tokens, weight, targets, bias, None, factors.float().to(kernel_device), *options
    )
    _, ref = reference(tokens, weight, bias, targets, None, 0.0, factors)
    assert out[2].dtype == out[3].dtype == torch.float32
    assert rel_error(out[2], ref[1]) < 3e-3 and rel_error(out[3], ref[2]) < 3e-3


# ------------------------------------------------------------------------------ both paths, each option
def test_deterministic(backend, small_chunks):
    inputs = make_inputs(2, 9, 16, 37, torch.float32, DEVICE)
    runs = []
    for reduction in ("mean", "mean", "none", "none"):
        leaves = [t.detach().requires_grad_() for t in inputs[:3]]
        loss = patch_mixing_loss(*leaves, inputs[3], reduction=reduction, label_smoothing=0.1, backend=backend)
        loss.sum().backward()
        runs.append([loss.detach()] + [t.grad for t in leaves])
    for first, second in ((runs[0], runs[1]), (runs[2], runs[3])):
        assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_module_and_function(backend, small_chunks, reduction):
    tokens, weight, bias, targets, _ = make_inputs(3, 5, 8, 6, torch.float32, DEVICE)
    ref_loss, _ = reference(tokens, weight, bias, targets, None, 0.0, torch.ones(3))
    expected = {"mean": ref_loss.mean(), "sum": ref_loss.sum(), "none": ref_loss}[reduction]
    grad_out = torch.rand(3, device=DEVICE) + 0.5 if reduction == "none" else torch.tensor(1.7, device=DEVICE)
    head = torch.nn.Linear(8, 6).to(DEVICE)
    calls = {
        "function": lambda t, w, b: patch_mixing_loss(t, w, b, targets, reduction=reduction, backend=backend),
        "module": None,
        "apply": lambda t, w, b: fastpatchdiv._common.reduce_images(
            PatchMixingFunction.apply(t, w, b, targets, None, 0.0, -100, backend, reduction != "none", True), reduction
        ),
    }
    results = []
    for name, call in calls.items():
        leaves = [x.detach().clone().requires_grad_() for x in (tokens, weight, bias)]
        if name == "module":
            with torch.no_grad():
                head.weight.copy_(weight)
                head.bias.copy_(bias)
            head.zero_grad()
            out = PatchMixingLoss(head=head, reduction=reduction, backend=backend)(leaves[0], targets)
            out.backward(grad_out)
            results.append((leaves[0].grad, head.weight.grad, head.bias.grad))
        else:
            out = call(*leaves)
            out.backward(grad_out)  # a non-scalar grad_output for "none"
            results.append(tuple(x.grad for x in leaves))
        assert_close(out, expected, torch.float32, f"{name} {reduction} loss")
    leaves = [x.detach().double().cpu().requires_grad_() for x in (tokens, weight, bias)]
    ref = mixing_loss_reference(*leaves, targets.cpu())
    ref = {"mean": ref.mean(), "sum": ref.sum(), "none": ref}[reduction]
    ref.backward(grad_out.double().cpu())
    for grads in results:
        for g, leaf in zip(grads, leaves, strict=True):
            assert_close(g, leaf.grad, torch.float32, f"{reduction} grad")


def test_shapes_and_edge_cases(backend):
    # (N, D) input; no bias; a non-contiguous view (class token dropped); only tokens need grad.
    tokens, weight, _, targets, _ = make_inputs(1, 12, 9, 5, torch.float32, DEVICE, bias=False)
    check_against_reference((tokens[0], weight, None, targets[0], None), backend)
    wide = torch.randn(2, 13, 9, device=DEVICE)
    view = wide[:, 1:]
    assert not view.is_contiguous()
    check_against_reference((view, weight, torch.zeros(5, device=DEVICE), targets.expand(2, -1), None), backend)
    x = view.clone().requires_grad_()
    patch_mixing_loss(x, weight, None, targets.expand(2, -1), backend=backend).backward()
    assert x.grad.shape == x.shape


def test_fully_ignored_image_and_empty_batch(backend):
    tokens, weight, bias, targets, _ = make_inputs(2, 6, 8, 4, torch.float32, DEVICE, ignore=False)
    targets[1] = -100
    x = tokens.clone().requires_grad_()
    loss = patch_mixing_loss(x, weight, bias, targets, reduction="none", backend=backend)
    loss.sum().backward()
    assert loss[1] == 0 and torch.isfinite(loss).all()
    assert (x.grad[1] == 0).all() and (x.grad[0] != 0).any()
    empty = torch.zeros(0, 6, 8, device=DEVICE, requires_grad=True)
    w = weight.clone().requires_grad_()
    none = patch_mixing_loss(empty, w, bias, targets[:0], reduction="none", backend=backend)
    assert none.shape == (0,)
    mean = patch_mixing_loss(empty, w, bias, targets[:0], backend=backend)
    assert torch.isnan(mean)
    mean.backward()
    assert empty.grad.shape == empty.shape and (w.grad == 0).all()


# The NaN is the input: the interpreter's numpy warns as it flows through the NaN image's rows.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_stays_in_its_image(backend):
    tokens, weight, bias, targets, _ = make_inputs(3, 6, 8, 5, torch.float32, DEVICE, ignore=False)
    tokens[1, 2, 3] = float("nan")
    x = tokens.clone().requires_grad_()
    loss = patch_mixing_loss(x, weight, bias, targets, reduction="none", backend=backend)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    ref, _ = reference(tokens[[0, 2]], weight, bias, targets[[0, 2]], None, 0.0, torch.ones(2))
    assert_close(loss[[0, 2]], ref, torch.float32, "clean images")


@pytest.mark.parametrize("mode", ["patch", "region"])
def test_masked_tokens_may_hold_anything(backend, mode):
    """NaN, inf and huge padding give the bits of zero padding: loss, every gradient (the shared head's
    too), and exactly 0 on masked tokens."""
    if backend == "triton" and mode == "region":
        pytest.skip("mode='region' is plain torch on every backend")
    tokens, weight, bias, targets, _ = make_inputs(3, 16, 8, 5, torch.float32, DEVICE, ignore=False)
    mask = torch.rand(3, 16, device=DEVICE) > 0.3
    mask[1] = False  # an image without real patches
    results = []
    for fill in (0.0, float("nan"), float("inf"), 1e30):
        leaves = [tokens.masked_fill(~mask.unsqueeze(-1), fill), weight.clone(), bias.clone()]
        leaves = [t.requires_grad_() for t in leaves]
        loss = patch_mixing_loss(*leaves, targets, mask=mask, reduction="none", mode=mode, backend=backend)
        loss.sum().backward()
        grads = [t.grad for t in leaves]
        assert all(torch.isfinite(g).all() for g in grads), f"non-finite gradient with padding {fill}"
        assert grads[0][~mask].eq(0).all(), f"masked tokens got a gradient with padding {fill}"
        results.append([loss.detach(), *grads])
    for other in results[1:]:
        for got, want in zip(other, results[0], strict=True):
            assert torch.equal(got, want)


def test_mixed_dtypes_promote_and_autocast():
    tokens, weight, bias, targets, _ = make_inputs(2, 7, 8, 5, torch.float32)
    t16 = tokens.bfloat16().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = patch_mixing_loss(t16, w, bias, targets)
    loss.backward()
    assert loss.dtype == torch.float32 and t16.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    ref, grads = reference(t16.float(), weight, bias, targets, None, 0.0, torch.full((2,), 0.5))
    assert_close(loss, ref.mean(), torch.float32, "promoted loss")
    assert_close(w.grad, grads[1], torch.float32, "promoted dweight")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = patch_mixing_loss(t16.detach(), weight, bias, targets)
    # Under autocast the GEMMs take bf16 operands, as F.linear would: the bits of precision="bf16".
    assert torch.equal(under, patch_mixing_loss(t16.detach(), weight, bias, targets, precision="bf16"))
    assert_close(under, ref.mean(), torch.bfloat16, "loss under autocast")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("trains", ["tokens", "head"])
def test_double_backward_is_refused(reduction, trains):
    """A gradient penalty through the loss raises, on both backward paths (uniform and recomputing)."""
    tokens, weight, bias, targets, _ = make_inputs(2, 5, 4, 3, torch.float64)
    leaf = tokens if trains == "tokens" else weight
    leaf.requires_grad_()
    (g,) = torch.autograd.grad(
        patch_mixing_loss(tokens, weight, bias, targets, reduction=reduction).sum(), leaf, create_graph=True
    )
    with pytest.raises(RuntimeError, match="patch_mixing_loss: double backward"):
        g.sum().backward()


def test_uniform_grad_refuses_uneven_image_weights(backend):
    """uniform_grad=True forms dweight/dbias for one factor per batch: unequal per-image weights must raise,
    not give a wrong gradient; dtokens alone is exact for any weights (it is scaled image by image)."""
    inputs = make_inputs(3, 5, 8, 6, torch.float32, DEVICE)
    tokens, weight, bias, targets, _ = inputs
    weights = torch.tensor([0.5, 1.0, 2.0], device=DEVICE)
    leaves = [x.detach().clone().requires_grad_() for x in (tokens, weight, bias)]
    per_image = PatchMixingFunction.apply(*leaves, targets, None, 0.0, -100, backend, True, True)
    with pytest.raises(RuntimeError, match="uniform_grad=True .* different gradients"):
        (per_image * weights).sum().backward()
    x = tokens.detach().clone().requires_grad_()
    per_image = PatchMixingFunction.apply(x, weight, bias, targets, None, 0.0, -100, backend, True, True)
    (per_image * weights).sum().backward()
    _, ref_grads = reference(tokens, weight, bias, targets, None, 0.0, weights.double())
    assert_close(x.grad, ref_grads[0], torch.float32, "dtokens, uneven weights")


# -------------------------------------------------------------------------------------------- region
def region_targets(B, gh, gw, C):
    """Per-patch labels of a CutMix box: image b's box keeps its class, the rest has its partner's."""
    own = torch.randint(0, C, (B,))
    partner = own.roll(1)
    keep = torch.zeros(B, gh, gw, dtype=torch.bool)
    keep[:, 1:3, 0:4] = True
    return torch.where(keep, own.view(B, 1, 1), partner.view(B, 1, 1)).reshape(B, gh * gw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_region_matches_reference(dtype, label_smoothing):
    tokens, weight, bias, _, _ = make_inputs(3, 20, 12, 7, dtype)
    hard = region_targets(3, 4, 5, 7)
    hard[0, :3] = -100
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[1, -4:] = False
    check_against_reference((tokens, weight, bias, hard, mask), "torch", label_smoothing, "none", mode="region")
    # Soft targets: each region's rows are one mixed probability vector.
    table = torch.softmax(torch.randn(4, 7), dim=-1)
    soft = table[torch.randint(0, 3, (3, 1)) + (hard.clamp_min(0) % 2)]
    check_against_reference((tokens, weight, bias, soft, None), "torch", label_smoothing, "mean", mode="region")


def test_region_with_one_region_is_pooled_cross_entropy():
    tokens, weight, bias, _, _ = make_inputs(2, 6, 5, 4, torch.float64)
    y = torch.tensor([1, 3])
    out = patch_mixing_loss(tokens, weight, bias, y[:, None].expand(2, 6), mode="region", reduction="none")
    expected = torch.nn.functional.cross_entropy(tokens.mean(1) @ weight.T + bias, y, reduction="none")
    assert_close(out, expected, torch.float64, "one region")


# ------------------------------------------------------------------------------------------ bad input
def _bad_cases():
    t, w, b, y = (
        torch.randn(2, 5, 4),
        torch.randn(3, 4),
        torch.randn(3),
        torch.tensor([[0, 1, 2, 0, 1], [2, 2, 1, 0, 0]]),
    )
    return [
        (([1.0], w, b, y), {}, TypeError, "tokens must be a torch.Tensor"),
        ((t.long(), w, b, y), {}, TypeError, "floating dtype"),
        ((torch.randn(5), w, b, y), {}, ValueError, "got 1 dims"),
        ((torch.randn(2, 5, 0), w, b, y), {}, ValueError, "D = 0"),
        ((torch.randn(2, 1, 4), w, b, y[:, :1]), {}, ValueError, r"N >= 2"),
        ((t, torch.randn(3, 5), b, y), {}, ValueError, r"weight must be a floating \(C, D\)"),
        ((t, w, torch.randn(4), y), {}, ValueError, r"bias must be None or a floating tensor of shape \(3,\)"),
        ((t, w, b, y[:, :4]), {}, ValueError, r"must have shape \(2, 5\)"),
        ((t, w, b, torch.rand(2, 5, 4)), {}, ValueError, r"soft patch_targets must have shape \(2, 5, 3\)"),
        ((t, w, b, y.bool()), {}, TypeError, "class indices or float probabilities"),
        ((t, w, b, y + 3), {}, ValueError, r"class indices in \[0, 3\) or ignore_index=-100; got 3 at \(0, 0\)"),
        ((t, w, b, y - 5), {"mode": "region"}, ValueError, r"class indices in \[0, 3\)"),
        ((t, w, b, torch.rand(2, 5, 3, requires_grad=True)), {}, ValueError, "must not require grad"),
        ((t, w, b, y), {"mask": torch.ones(2, 5)}, TypeError, "mask must have dtype torch.bool"),
        ((t, w, b, y), {"mask": torch.ones(2, 4, dtype=torch.bool)}, ValueError, r"mask must have shape \(2, 5\)"),
        ((t, w, b, y), {"label_smoothing": 1.5}, ValueError, r"label_smoothing must be a float in \[0, 1\]"),
        ((t, w, b, y), {"ignore_index": 1.0}, TypeError, "ignore_index must be an int"),
        ((t, w, b, y), {"reduction": "avg"}, ValueError, "reduction must be one of"),
        ((t, w, b, y), {"mode": "pixel"}, ValueError, "mode must be one of"),
        ((t, w, b, y), {"backend": "cuda"}, ValueError, "backend must be one of"),
    ]


@pytest.mark.parametrize("args, kwargs, error, match", _bad_cases())
def test_bad_input_raises(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        patch_mixing_loss(*args, **kwargs)


def test_module_owns_its_head():
    crit = PatchMixingLoss(64, 80, label_smoothing=0.1)
    assert [n for n, _ in crit.named_parameters()] == ["head.weight", "head.bias"]
    assert 0.015 < crit.head.weight.std() < 0.025 and (crit.head.bias == 0).all()  # std 0.02, as the official head
    crit = PatchMixingLoss(8, 5, label_smoothing=0.1)
    loss = crit(torch.randn(2, 6, 8), torch.randint(0, 5, (2, 6)))
    loss.backward()
    assert crit.head.weight.grad is not None and crit.head.bias.grad is not None
    with pytest.raises(ValueError, match="in_features and num_classes"):
        PatchMixingLoss()
    with pytest.raises(ValueError, match="backend must be one of"):  # settings are checked at construction
        PatchMixingLoss(8, 5, backend="cuda")
    assert "label_smoothing=0.1, reduction='mean'" in repr(crit)


# ------------------------------------------------------------------------------- library ops, compile
def test_opcheck_forward_and_backward_ops(backend):
    tokens, weight, bias, targets, mask = make_inputs(2, 5, 4, 3, torch.float32, DEVICE, masked=True)
    soft = torch.softmax(torch.randn(2, 5, 3, device=DEVICE), dim=-1)
    options = (0.1, -100, backend, "fp32")
    cases = ((targets, bias, (True, True, True)), (soft, None, (True, False, False)), (targets, bias, (False,) * 3))
    for tg, b, need in cases:
        for factors in (None, torch.rand(2, device=DEVICE)):  # the forward; the backward of uniform_grad=False
            args = (tokens, weight, tg, b, mask, factors, *options, *need)
            torch.library.opcheck(torch.ops.fastpatchdiv.mixing_forward.default, args)
    _, dt, dw, db = torch.ops.fastpatchdiv.mixing_forward(
        tokens, weight, targets, bias, mask, None, *options, True, True, True
    )
    uniform = torch.full((2,), 0.5, device=DEVICE)
    for formed in ((dt, dw, db), (dt.new_empty(0), dw, db), (dt, dw.new_empty(0), db.new_empty(0))):
        torch.library.opcheck(torch.ops.fastpatchdiv.mixing_backward.default, (uniform, *formed))


@pytest.mark.parametrize("reduction, compiler", [("mean", "inductor"), ("none", "aot_eager")])
def test_compile_fullgraph_matches_eager(backend, reduction, compiler):
    if backend == "triton" and compiler == "inductor" and INTERPRETER:
        pytest.skip("inductor's own CPU kernels are covered by the first pass; the op is what changes here")
    torch._dynamo.reset()
    tokens, weight, bias, targets, mask = make_inputs(2, 6, 8, 5, torch.float32, DEVICE, masked=True)

    def run(fn):
        leaves = [x.detach().clone().requires_grad_() for x in (tokens, weight, bias)]
        out = fn(*leaves)
        out.sum().backward()
        return [out.detach()] + [x.grad for x in leaves]

    def loss(t, w, b):
        return patch_mixing_loss(t, w, b, targets, mask=mask, label_smoothing=0.1, reduction=reduction, backend=backend)

    eager = run(loss)
    compiled = run(torch.compile(loss, fullgraph=True, backend=compiler))
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- memory
@pytest.mark.slow
def test_torch_path_memory_is_far_below_the_logits():
    """B·N = 65536, D = 192, C = 1000: the full fp32 logits alone would be 250 MiB (500 with their grad)."""
    grown = peak_rss_growth(
        setup="""
            m, d, c = 65536, 192, 1000
            tokens = torch.randn(1, m, d, requires_grad=True)
            head = torch.nn.Linear(d, c)
            targets = torch.randint(0, c, (1, m))
            """,
        warmup="""
            fastpatchdiv.patch_mixing_loss(
                tokens[:, :4096], head.weight, head.bias, targets[:, :4096], backend="torch"
            ).backward()
            tokens.grad = None
            head.zero_grad()
            """,
        call="""
            loss = fastpatchdiv.patch_mixing_loss(
                tokens, head.weight, head.bias, targets, label_smoothing=0.1, backend="torch"
            )
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(tokens.grad).all()
            """,
    )
    logits = 65536 * 1000 * 4
    # What must exist: dtokens (48 MiB) held for the backward and the backward's scaled copy (48 MiB), plus
    # one 4096 x 1000 chunk and its softmax temporaries.
    assert grown < logits / 2, f"peak RSS grew by {grown / 2**20:.0f} MiB; the logits are {logits / 2**20:.0f} MiB"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA memory accounting needs a GPU")
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_kernel_memory_is_far_below_the_logits(dtype):
    m, d, c = 65536, 192, 1000
    tokens = torch.randn(1, m, d, device="cuda", dtype=dtype, requires_grad=True)
    head = torch.nn.Linear(d, c, device="cuda", dtype=dtype)
    targets = torch.randint(0, c, (1, m), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    patch_mixing_loss(tokens, head.weight, head.bias, targets).backward()
    torch.cuda.synchronize()
    grown = torch.cuda.max_memory_allocated() - base
    assert grown < m * c * dtype.itemsize / 2, f"peak grew by {grown / 2**20:.1f} MiB"


def test_readme_mixing_example_runs():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "cutmix_patches" in b)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    loss, mixing_loss = namespace["loss"], namespace["mixing"]
    assert loss.ndim == 0 and loss.isfinite()
    assert mixing_loss.head.weight.grad is not None
