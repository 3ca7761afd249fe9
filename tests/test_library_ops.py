"""The torch.library registration: opcheck on every op, torch.compile(fullgraph=True) equal to eager, and a
graph whose size does not depend on N (the tile loop stays inside the opaque op)."""

import time

import pytest
import torch

from fastpatchdiv import patch_contrastive_loss, patch_cosine_loss
from fastpatchdiv.contrastive import PatchContrastiveFunction
from fastpatchdiv.cosine import PatchCosineFunction
from tests.helpers import DEVICE, assert_close

OPS = {
    "cosine": lambda a, z, mask=None, backend="auto": patch_cosine_loss(
        z, mask=mask, reduction="none", backend=backend
    ),
    "mean": lambda a, z, mask=None, backend="auto": patch_contrastive_loss(
        a, z, negatives="mean", mask=mask, reduction="none", backend=backend
    ),
    "window": lambda a, z, mask=None, backend="auto": patch_contrastive_loss(
        a, z, negatives="window", reduction="none", backend=backend
    ),
    "all": lambda a, z, mask=None, backend="auto": patch_contrastive_loss(
        a, z, negatives="all", temperature=0.2, mask=mask, reduction="none", backend=backend
    ),
}


def _inputs(n=16, d=12, requires_grad=False):
    a = torch.randn(2, n, d, device=DEVICE)
    z = torch.randn(2, n, d, device=DEVICE, requires_grad=requires_grad)
    mask = torch.rand(2, n, device=DEVICE) > 0.3
    return a, z, mask


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_opcheck_cosine(backend, masked):
    a, z, mask = _inputs()
    mask = mask if masked else None
    for need_grad in (False, True):
        torch.library.opcheck(torch.ops.fastpatchdiv.cosine_forward.default, (z, mask, backend, need_grad, "fp32"))


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_opcheck_contrastive_all(backend, masked):
    a, z, mask = _inputs()
    mask = mask if masked else None
    for need_a, need_z in ((False, False), (False, True), (True, True)):
        args = (a, z, mask, 0.2, backend, need_a, need_z, "fp32")
        torch.library.opcheck(torch.ops.fastpatchdiv.contrastive_all_forward.default, args)


@pytest.mark.parametrize("op", OPS)
def test_compile_fullgraph_equals_eager(backend, op):
    """Values and gradients of torch.compile(fullgraph=True) equal eager, with and without a mask."""
    torch._dynamo.reset()
    a, z, mask = _inputs(requires_grad=True)
    masks = [None] if op == "window" else [None, mask]
    compiled = torch.compile(OPS[op], fullgraph=True)
    for m in masks:
        results = []
        for fn in (OPS[op], compiled):
            z.grad = None
            loss = fn(a, z, m, backend)
            (loss * torch.arange(1.0, 3.0, device=DEVICE)).sum().backward()
            results.append((loss.detach(), z.grad.clone()))
        assert_close(results[1][0], results[0][0], torch.float32, f"{op} compiled loss")
        assert_close(results[1][1], results[0][1], torch.float32, f"{op} compiled grad")


@pytest.mark.parametrize("op", ["cosine", "all"])
def test_compiled_graph_does_not_grow_with_n(op):
    """The fused ops are single graph nodes: the forward graph has as many nodes at N = 4096 as at 256,
    so compile time does not grow with N (the PyTorch path's tile loop is never unrolled)."""
    sizes, seconds = {}, {}
    for n in (256, 4096):
        torch._dynamo.reset()
        graphs = []

        def count_nodes(gm, example_inputs, graphs=graphs):
            graphs.append(len(gm.graph.nodes))
            return gm.forward

        a, z, _ = _inputs(n=n, d=32, requires_grad=True)
        fn = torch.compile(OPS[op], fullgraph=True, dynamic=False, backend=count_nodes)
        start = time.perf_counter()
        fn(a, z).sum().backward()
        seconds[n] = time.perf_counter() - start
        sizes[n] = graphs
    print(f"{op}: dynamo graph nodes {sizes}, first call (trace + run) {seconds}")
    assert sizes[256] == sizes[4096]


def test_functions_called_directly_never_send_cpu_tensors_to_triton():
    """The Functions default to backend="auto": a plain CPU call without the interpreter takes the PyTorch path."""
    from fastpatchdiv.kernels import INTERPRETER

    if INTERPRETER or torch.cuda.is_available():
        pytest.skip("only meaningful on a CPU-only pass")
    a, z, _ = _inputs(requires_grad=True)
    PatchCosineFunction.apply(z).sum().backward()
    PatchContrastiveFunction.apply(a, z).sum().backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("negatives", ["mean", "all"])
def test_dynamic_compile_takes_a_symbolic_temperature(backend, negatives):
    """torch.compile(fullgraph=True, dynamic=True) makes τ symbolic: the checks must not need its value."""
    torch._dynamo.reset()
    a, z, _ = _inputs(requires_grad=True)

    def fn(first, last, tau):
        return patch_contrastive_loss(first, last, negatives=negatives, temperature=tau, backend=backend)

    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for tau in (0.5, 0.7):
        got = compiled(a, z, tau)
        (grad,) = torch.autograd.grad(got, z)
        want = fn(a, z, tau)
        (want_grad,) = torch.autograd.grad(want, z)
        assert_close(got, want, torch.float32, f"τ = {tau} loss")
        assert_close(grad, want_grad, torch.float32, f"τ = {tau} grad")
