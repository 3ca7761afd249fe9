"""Shared fixtures and markers.

Two passes run the suite (the README's test command):
- ``pytest``: the PyTorch paths, the ahead-of-time compile tests, memory tests; on a CUDA machine also
  every kernel test on the GPU.
- ``TRITON_INTERPRET=1 pytest -m kernel``: the Triton kernels on CPU tensors under the interpreter.
The variable must be set before triton is imported, so it comes from the command line, not from here.
A test that runs on both paths takes the ``backend`` fixture, whose "triton" value carries the
``kernel`` mark: the interpreter pass runs only that value, the first pass only "torch" (and "triton"
too on CUDA).
"""

import pytest
import torch

from fastpatchdiv import contrastive, cosine
from fastpatchdiv.kernels import INTERPRETER

KERNELS_RUN = torch.cuda.is_available() or INTERPRETER


def pytest_configure(config):
    config.addinivalue_line("markers", "kernel: runs the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1)")
    config.addinivalue_line("markers", "slow: spawns subprocesses or large inputs")


@pytest.fixture
def kernel_device() -> str:
    """The device the Triton kernels run on in this pass, or skip with the reason."""
    if torch.cuda.is_available():
        return "cuda"
    if INTERPRETER:
        return "cpu"
    pytest.skip("Triton kernels need CUDA or the interpreter: run `TRITON_INTERPRET=1 pytest -m kernel`")


@pytest.fixture(params=["torch", pytest.param("triton", marks=pytest.mark.kernel)])
def backend(request) -> str:
    """Both paths; the Triton one only where its kernels can run in this pass."""
    if request.param == "triton" and not KERNELS_RUN:
        pytest.skip("no kernel device in this pass: run `TRITON_INTERPRET=1 pytest -m kernel`")
    return request.param


@pytest.fixture
def small_torch_tiles(monkeypatch):
    """Shrink the PyTorch paths' tiles to 16 so small N crosses several tile edges."""
    monkeypatch.setattr(cosine, "_tile_size", lambda batch, n: min(16, n))
    monkeypatch.setattr(contrastive, "_TORCH_TILE_ELEMS", 16 * 16)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
