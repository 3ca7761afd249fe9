"""Triton kernels of fastpatchdiv, installed as ``fastpatchdiv.kernels``.

One op per module: its ``@triton.jit`` kernels first, then the host launchers that allocate, pick block
sizes and launch. Nothing here knows about autograd; ``fastpatchdiv/<op>.py`` wraps the launchers.
"""

import os

# triton.jit reads TRITON_INTERPRET when a kernel is decorated, so this must match what it saw.
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
