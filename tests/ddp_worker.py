"""The trainer-worker side of tests/test_ddp.py (Ray workers import it by name)."""
import json
import os
import time

import torch

from shared.config import TrainConfig

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
    cfg = TrainConfig(data="x", batch_size=GLOBAL_BATCH, num_workers=world, seed=0)
    loader = train_loader(Indices(), cfg, rank, world)
    epochs = []
    for epoch in range(EPOCHS):
        set_loader_epoch(loader, epoch)
        epochs.append([batch.tolist() for batch in loader])
    with open(os.path.join(config["out"], f"rank{rank}.json"), "w") as f:
        json.dump(epochs, f)
    time.sleep(config.get("hold_s", 0))  # the process group stays up while the test looks at its sockets
    dist.barrier()
