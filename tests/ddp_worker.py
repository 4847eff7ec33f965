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
        json.dump({"epochs": epochs, **collectives(rank, world), "steps": one_steps(rank, world)}, f)
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


# ---------------------------------------------------------------- one step, two ranks vs one

K = 3
STEP_METHODS = ("grid-tr", "pce", "full", "grid-gd")
# seeded pixels per training image (of 16×16): very uneven, so the ranks' shares differ
# whatever the shuffle (with each rank's own count, the image-0 rank's pixels weigh less)
SEEDS_PER_IMAGE = (150, 4, 9, 20)
assert len(SEEDS_PER_IMAGE) == GLOBAL_BATCH  # one step on the whole set


class Scribbled(torch.utils.data.Dataset):
    """Training items as `trainer.datasets.TrainSet` gives them: seeds, proposals on the rest
    (some missing), full masks (some ignored)."""

    def __init__(self, n=GLOBAL_BATCH, seeds=SEEDS_PER_IMAGE, size=16, salt=0):
        self.n, self.seeds, self.size, self.salt = n, seeds, size, salt

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(1000 * self.salt + i)
        s = self.size
        labels = torch.randint(0, K, (s, s), generator=g, dtype=torch.uint8)
        seeds = torch.full((s * s,), 255, dtype=torch.uint8)
        where = torch.randperm(s * s, generator=g)[: self.seeds[i]] if self.seeds else torch.tensor([], dtype=torch.long)
        seeds[where] = labels.flatten()[where]
        proposal = torch.randint(0, K, (s, s), generator=g, dtype=torch.uint8)
        proposal[torch.rand(s, s, generator=g) < 0.2] = 255
        mask = labels.clone()
        mask[torch.rand(s, s, generator=g) < 0.1 * (i + 1)] = 255
        return {"image": torch.rand(3, s, s, generator=g) * 255, "seeds": seeds.view(s, s), "proposal": proposal,
                "mask": mask, "roi": torch.ones(s, s, dtype=torch.bool), "index": i}


class ValSet(Scribbled):
    """Three val images (odd: the ranks evaluate 2 and 1), full masks."""

    def __init__(self):
        super().__init__(n=3, seeds=(), salt=1)

    def __getitem__(self, i):
        item = super().__getitem__(i)
        return {"image": item["image"], "mask": item["mask"].long()}


def without_batchnorm(net: torch.nn.Module) -> torch.nn.Module:
    """The network with every BatchNorm an identity: BatchNorm's batch statistics are per
    rank under DDP (SyncBatchNorm is CUDA-only), the one part of a step that differs."""
    for name, child in net.named_children():
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
            setattr(net, name, torch.nn.Identity())
        else:
            without_batchnorm(child)
    return net


def fresh():
    """The network (a small UNet without BatchNorm) and the learned outlier model before the step."""
    from trainer.outliers import OutlierModel
    from trainer.unet import UNet

    torch.manual_seed(0)
    return without_batchnorm(UNet(K, width=4, depth=2)), OutlierModel("learned", 0.3, K)


def flat(net) -> list[float]:
    return torch.cat([p.detach().flatten() for p in net.parameters()]).tolist()


def initial_params() -> list[float]:
    return flat(fresh()[0])


def initial_theta() -> float:
    return float(fresh()[1].theta.detach())


def one_step(method: str, rank: int = 0, world: int = 1) -> dict:
    """One stage-B step of the trainer's own parts (its loader split, optimizer, outlier
    model, `engine.train_epoch`, DDP through Ray Train, `_evaluate`) on the global batch
    of `Scribbled`: the flat parameters after it, θ of the learned outlier model, val mIoU.
    SGD (the paper's): Adam's first step is blind to the gradient's scale."""
    import ray.train.torch

    from trainer import engine
    from trainer.loop import _evaluate, make_optimizer, set_loader_epoch, train_loader
    from trainer.methods import METHODS

    cfg = TrainConfig(data="x", batch_size=GLOBAL_BATCH, num_workers=world, seed=0, loader_workers=0, lr=0.5, optimizer="sgd",
                      seed_loss="l2" if method == "grid-gd" else "ce")
    net, outliers = fresh()
    proposals = METHODS[method].needs_proposals
    model = ray.train.torch.prepare_model(net) if world > 1 else net
    optimizer, base_lrs = make_optimizer(net, cfg, cfg.lr, None, outliers.param_groups(cfg.lr) if proposals else [])
    loader = train_loader(Scribbled(), cfg, rank, world)
    set_loader_epoch(loader, 0)
    engine.train_epoch(model, loader, optimizer, method=method, eps=outliers if proposals else 0.0, nu=None,
                       device=torch.device("cpu"), step=0, total_steps=10, base_lrs=base_lrs, seed_loss=cfg.seed_loss)
    return {"params": flat(net),
            "theta": outliers.theta.detach().tolist(),
            "val_miou": _evaluate(model, ValSet(), K, torch.device("cpu"), rank, world)["val_miou"]}


def one_steps(rank: int, world: int) -> dict:
    return {method: one_step(method, rank, world) for method in STEP_METHODS}
