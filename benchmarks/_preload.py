"""Imported once by the memory forkserver (see memory.py), never by the benchmark process itself.

Loads what every child needs, so a child starts in milliseconds, then moves those objects out of the
garbage collector's reach: a child's gc.collect() then costs microseconds instead of 0.3 s.
"""

import gc

import torch  # noqa: F401

from benchmarks.cases import quiet

quiet()

import torch._dynamo  # noqa: E402, F401
import torch._inductor.compile_fx  # noqa: E402, F401  (3-4 s to import: once here, not in every torch.compile child)
import torch._inductor.select_algorithm  # noqa: E402, F401  (imported by every generated module)
from torch._inductor import async_compile, codecache, cpu_vec_isa  # noqa: E402, F401

try:
    import fastpatchdiv  # noqa: F401
    import fastpatchdiv.reference  # noqa: F401
except Exception:  # a half-written op is reported by the child that needs it
    pass

# Per-process caches that every compilation consults: the hash of torch's sources (~1 s), the system
# description in cache keys (~0.4 s) and the CPU's vector ISA (a probe built with the C++ compiler).
try:
    codecache.torch_key()
    codecache.CacheBase.get_system()
    cpu_vec_isa.pick_vec_isa()
except Exception:  # a private API moved: children pay the cost themselves
    pass

# tqdm (used by torch.fx while compiling) makes a multiprocessing lock on first use; made in a child it
# would be registered with the forkserver's resource tracker and reported as leaked at exit.
try:
    from tqdm import tqdm

    tqdm.get_lock()
except ImportError:
    pass

gc.freeze()
