"""The trainer-worker side of tests/test_ddp.py (Ray workers import it by name)."""
import json
import os
import time

import torch

from trainer.config import TrainConfig

N_IMAGES, GLOBAL_BATCH, EPOCHS = 12, 4, 3


class Indices(torch.utils.data.Dataset):
    def __len__(self):
        return N_IMAGES

    def __getitem__(self, i):
        return i


def draw(config):
    """One trainer worker: the batches `train_loader` gives it, epoch by epoch."""
    import ray.train
    import torch.distributed as dist

    from trainer.loop import set_loader_epoch, train_loader

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    assert dist.is_initialized() and dist.get_backend() == "gloo"
    cfg = TrainConfig(data="x", batch_size=GLOBAL_BATCH, num_workers=world, seed=0, loader_workers=0)
    loader = train_loader(Indices(), cfg, rank, world)
    epochs = []
    for epoch in range(EPOCHS):
        set_loader_epoch(loader, epoch)
        epochs.append([batch.tolist() for batch in loader])
    with open(os.path.join(config["out"], f"rank{rank}.json"), "w") as f:
        json.dump({"epochs": epochs, **collectives(rank, world)}, f)
    time.sleep(config.get("hold_s", 0))  # the process group stays up while the test looks at its sockets
    dist.barrier()


class OneValImage(torch.utils.data.Dataset):
    """A val set with fewer images than ranks: rank 1 evaluates none."""

    def __len__(self):
        return 1

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"image": torch.rand(3, 8, 8, generator=g) * 255, "mask": torch.randint(0, 2, (8, 8), generator=g)}


def collectives(rank: int, world: int) -> dict:
    """What every rank must agree on: rank 0's decision on rewriting a snapshot (the ranks
    disagree here), and evaluation after a training step of a DDP network with batch norm
    (DDP's next forward would broadcast its buffers, a collective rank 1 never joins)."""
    from torch.nn.parallel import DistributedDataParallel

    from trainer.loop import _evaluate
    from trainer.stage_a import rank0_decides

    decisions = [rank0_decides(rank == 0 if rank == 0 else None, world),
                 rank0_decides(rank == 1 if rank == 0 else None, world)]
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))
    model = DistributedDataParallel(net)
    model(torch.rand(2, 3, 8, 8)).sum().backward()
    scores = _evaluate(model, OneValImage(), 2, torch.device("cpu"), rank, world)
    return {"decisions": decisions, "val_miou": scores["val_miou"]}
