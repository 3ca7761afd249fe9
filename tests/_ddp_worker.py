"""One rank of tests/test_ddp.py: ``python tests/_ddp_worker.py RANK WORLD_SIZE PORT``.

Builds the same small ViT on every rank, attaches the diversity losses with the patch mixing loss
(before wrapping on rank 0, to the DDP wrapper on rank 1), runs one DistributedDataParallel step (gloo,
CPU, loopback) on this rank's share of a CutMix batch, and checks that DDP's averaged gradients equal a
single-process step on the whole batch. The mixing loss's patch head lives in ``div``, outside the
model's wrapper: ``div`` is wrapped in DistributedDataParallel too, which must broadcast rank 0's head
(each rank creates its own from a different seed here, as timm's train.py seeds ranks) and average its
gradients. Prints "rank R: ok".
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
from fastpatchdiv import cutmix_patches  # noqa: E402
from tests.helpers import assert_close  # noqa: E402

PER_RANK = 3
OPTIONS = dict(cosine_weight=1.0, contrastive_weight=0.5, mixing_weight=0.5, temperature=0.5, normalize=True)
HEAD_SEED = 100


def build() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)


def step(model, div, images, patch_labels, soft) -> None:
    loss = F.cross_entropy(model(images), soft) + div(patch_targets=patch_labels)
    loss.backward()


def main() -> None:
    rank, world, port = (int(a) for a in sys.argv[1:4])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(1234)  # the same global batch on every rank
    images = torch.randn(PER_RANK * world, 3, 32, 32, generator=gen)
    targets = torch.randint(0, 10, (PER_RANK * world,), generator=gen)
    batch = cutmix_patches(images, targets, 8, num_classes=10, generator=gen)  # mixed, (B, 16) labels, (B, 10)

    single = build()
    torch.manual_seed(HEAD_SEED)  # the patch head attach() creates
    single_div = fastpatchdiv.timm.attach(single, **OPTIONS)
    step(single, single_div, *batch)

    model = build()
    torch.manual_seed(HEAD_SEED + rank)  # a different head on each rank until DDP broadcasts rank 0's
    if rank == 0:  # attach before wrapping on one rank, to the DDP wrapper (hooks go on .module) on the other
        div = fastpatchdiv.timm.attach(model, **OPTIONS)
        ddp = DistributedDataParallel(model)
    else:
        ddp = DistributedDataParallel(model)
        div = fastpatchdiv.timm.attach(ddp, **OPTIONS)
    assert div.model is model
    ddp_div = DistributedDataParallel(div)  # the patch head: broadcast now, gradients averaged in backward
    for p, q in zip(div.parameters(), single_div.parameters(), strict=True):
        assert torch.equal(p, q), f"rank {rank}: the patch head was not broadcast from rank 0"
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    step(ddp, ddp_div, *(t[mine] for t in batch))

    for (name, p), q in zip(model.named_parameters(), single.parameters(), strict=True):
        assert_close(p.grad, q.grad, torch.float32, f"rank {rank} d/d{name}")
    for (name, p), q in zip(div.named_parameters(), single_div.parameters(), strict=True):
        assert_close(p.grad, q.grad, torch.float32, f"rank {rank} d/d{name}")
    # Every part must matter: without it the gradients would differ.
    assert all(div.losses()[name] > 0 for name in ("cosine", "contrastive", "mixing"))
    dist.destroy_process_group()
    print(f"rank {rank}: ok", flush=True)


if __name__ == "__main__":
    main()
