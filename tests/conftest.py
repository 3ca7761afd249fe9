"""Shared fixtures.

Two passes run the suite (the README's test command):
- ``pytest``: the PyTorch paths, the ahead-of-time compile test, memory tests; on a CUDA machine also
  every kernel test on the GPU.
- ``TRITON_INTERPRET=1 pytest -m kernel``: the Triton kernels on CPU tensors under the interpreter.
The variable must be set before triton is imported, so it comes from the command line, not from here.
"""

import pytest
import torch
from fastpatchdiv.kernels import INTERPRETER


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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
