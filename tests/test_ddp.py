"""DistributedDataParallel with fastpatchdiv.timm.attach: 2 gloo processes on CPU over loopback.

The losses are per image, so DDP needs nothing special: each rank's loss is the mean over its own images,
DDP averages the gradients, and with equal shares that is the gradient of the mean over the whole batch.
tests/_ddp_worker.py runs one rank and checks its gradients against a single-process step;
tests/_ddp_task_worker.py runs timm's ClassificationTask through wrap_task as train.py does under torchrun.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("timm")
dist = pytest.importorskip("torch.distributed")

HERE = Path(__file__).resolve().parent
needs_gloo = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo"
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(worker: str, world: int = 2) -> None:
    """Run ``worker`` as ``world`` gloo processes on loopback; each must exit 0 and print "rank R: ok"."""
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only: no other network is needed
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / worker), str(rank), str(world), str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for rank in range(world)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=240)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, out) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0 and f"rank {rank}: ok" in out, f"rank {rank} failed:\n{out[-4000:]}"


@pytest.mark.slow
@needs_gloo
def test_ddp_gradients_equal_single_process_gradients():
    _run_ranks("_ddp_worker.py")


@pytest.mark.slow
@needs_gloo
def test_ddp_through_a_wrapped_timm_task_keeps_heads_identical():
    pytest.importorskip("timm.task", reason="timm < 1.0.23 has no training tasks")
    _run_ranks("_ddp_task_worker.py")
