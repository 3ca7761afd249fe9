"""One rank of tests/test_ddp.py's task test: ``python tests/_ddp_task_worker.py RANK WORLD_SIZE PORT``.

timm's train.py under torchrun, with the task from ``wrap_task``: every rank seeds its own RNG (train.py's
``random_seed(seed, rank)``), so each creates a different model and patch head and draws its own batch
and patch CutMix. The optimizer is built from ``task.get_trainable_module()`` before
``task.prepare_distributed()`` (gloo on CPU: ``device_ids=None``; train.py's ``[device]`` is refused by DDP
for a CPU module). Three updates follow, the first accumulating two batches under ``task.no_sync()``.
Checks: the model and the patch head are identical on every rank (DDP broadcast rank 0's and averaged
every gradient), the head trained, and the logged parts are the mean of the ranks' own. Prints "rank R: ok".
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fastpatchdiv from source

import timm  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from timm.loss import LabelSmoothingCrossEntropy  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402
from timm.task import ClassificationTask  # noqa: E402

from fastpatchdiv.trainers.timm_task import wrap_task  # noqa: E402

OPTIONS = dict(cosine_weight=1.0, contrastive_weight=0.5, mixing_weight=0.5, normalize=True)
PARTS = ("patch_cosine", "patch_contrastive", "patch_mixing")


def gathered(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.detach().contiguous())
    return out


def step(task, optimizer, rank: int, update: bool) -> dict:
    images, labels = torch.randn(3, 3, 32, 32), torch.randint(0, 10, (3,))  # this rank's own batch
    result = task(images, labels)
    result["loss"].backward()
    local = task.div.losses()  # this rank's own parts, before the average
    for key, name in zip(PARTS, ("cosine", "contrastive", "mixing"), strict=True):
        mean = torch.stack(gathered(local[name].reshape(1))).mean()
        assert torch.allclose(result[key], mean), f"rank {rank}: {key} is not the mean over ranks"
    if update:
        optimizer.step()
        optimizer.zero_grad()
    return result


def main() -> None:
    rank, world, port = (int(a) for a in sys.argv[1:4])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(42 + rank)  # train.py: utils.random_seed(args.seed, args.rank)
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2, num_classes=10
    )
    task = ClassificationTask(model, criterion=LabelSmoothingCrossEntropy(0.1), verbose=False)
    task = wrap_task(task, **OPTIONS)
    optimizer = create_optimizer_v2(task.get_trainable_module(), "adamw", lr=1e-2, weight_decay=0.05)
    task.prepare_distributed(device_ids=None)
    head = task.div.mixing.head
    initial = head.weight.detach().clone()
    for w in gathered(head.weight):
        assert torch.equal(w, head.weight), f"rank {rank}: the patch head was not broadcast from rank 0"

    task.get_trainable_module().train()
    with task.no_sync():  # gradient accumulation: no all-reduce for this batch
        step(task, optimizer, rank, update=False)
    step(task, optimizer, rank, update=True)
    for _ in range(2):
        step(task, optimizer, rank, update=True)

    assert not torch.equal(head.weight, initial), f"rank {rank}: the patch head did not train"
    for name, p in task.get_trainable_module().named_parameters():
        for other in gathered(p):
            assert torch.equal(other, p), f"rank {rank}: {name} differs between ranks"
    dist.destroy_process_group()
    print(f"rank {rank}: ok", flush=True)


if __name__ == "__main__":
    main()
