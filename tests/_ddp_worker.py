"""One rank of tests/test_ddp.py: ``python tests/_ddp_worker.py RANK WORLD_SIZE PORT``.

Builds the same small ViT on every rank, attaches the diversity losses (before wrapping on rank 0, to
the DDP wrapper on rank 1), runs one DistributedDataParallel step (gloo, CPU, loopback) on this rank's
share of a batch, and checks that DDP's averaged gradients equal a single-process step on the whole
batch. Prints "rank R: ok".
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.helpers, and fastpatchdiv from source

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

import fastpatchdiv.timm  # noqa: E402
from tests.helpers import assert_close  # noqa: E402

PER_RANK = 3
OPTIONS = dict(cosine_weight=1.0, contrastive_weight=0.5, temperature=0.5, normalize=True)


def build() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)


def step(model, div, images, targets) -> None:
    loss = F.cross_entropy(model(images), targets) + div.loss()
    loss.backward()


def main() -> None:
    rank, world, port = (int(a) for a in sys.argv[1:4])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(1234)  # the same global batch on every rank
    images = torch.randn(PER_RANK * world, 3, 32, 32, generator=gen)
    targets = torch.randint(0, 10, (PER_RANK * world,), generator=gen)

    single = build()
    step(single, fastpatchdiv.timm.attach(single, **OPTIONS), images, targets)

    model = build()
    if rank == 0:  # attach before wrapping on one rank, to the DDP wrapper (hooks go on .module) on the other
        div = fastpatchdiv.timm.attach(model, **OPTIONS)
        ddp = DistributedDataParallel(model)
    else:
        ddp = DistributedDataParallel(model)
        div = fastpatchdiv.timm.attach(ddp, **OPTIONS)
    assert div.model is model
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    step(ddp, div, images[mine], targets[mine])

    for (name, p), q in zip(model.named_parameters(), single.parameters(), strict=True):
        assert_close(p.grad, q.grad, torch.float32, f"rank {rank} d/d{name}")
    # The diversity part must matter: without it the gradients would differ.
    assert div.losses()["cosine"] > 0 and div.losses()["contrastive"] > 0
    dist.destroy_process_group()
    print(f"rank {rank}: ok", flush=True)


if __name__ == "__main__":
    main()
