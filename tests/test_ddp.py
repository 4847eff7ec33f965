"""Data-parallel stage B on two gloo workers of Ray Train on this machine: each rank
draws a disjoint share of the training set, a new shuffle every epoch, and the global
`--batch-size` is split over the ranks; rank 0 decides a snapshot rewrite for all, and
evaluation with fewer val images than ranks does not hang."""
import json
import os

import pytest

from trainer.config import TrainConfig
from shared.errors import UserError
from tests.ddp_worker import EPOCHS, GLOBAL_BATCH, N_IMAGES, STEP_METHODS, draw, initial_params, initial_theta, one_step
from tests import helpers
from tests.helpers import ROOT


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One run of two trainer workers (tests/ddp_worker.py's `draw`), shared by the tests
    below: its output folder and the listening sockets seen in its workers."""
    import threading

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trainer.process_group import LoopbackProcessGroup

    tmp_path = tmp_path_factory.mktemp("ddp")
    ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    sockets, done = set(), threading.Event()

    def watch():
        while not done.wait(0.05):
            workers = [p.pid for p in helpers.descendants(os.getpid()) if "RayTrainWorker" in p.cmdline]
            sockets.update(address for _, address in helpers.listening_sockets(workers))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        # a collective that one rank never joins fails in a minute instead of Ray Train's 30
        TorchTrainer(draw, train_loop_config={"out": str(tmp_path), "hold_s": 1.0},
                     torch_config=LoopbackProcessGroup(backend="gloo", timeout_s=60),
                     scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                     run_config=RunConfig(storage_path=str(tmp_path / "ray"))).fit()
    finally:
        done.set()
        watcher.join()
        ray.shutdown()
    return tmp_path, sockets


def test_two_workers_draw_disjoint_shares_of_a_new_shuffle_each_epoch(two_ranks):
    """Also: the process group of a private Ray (the driver's torch_config) opens no
    listening socket beyond loopback in the trainer workers (/proc/net/tcp{,6}): Ray
    Train's default TCPStore would bind every interface."""
    tmp_path, sockets = two_ranks
    assert sockets, "no listening socket seen in the trainer workers: the watch is broken"
    assert [a for a in sockets if not helpers.is_loopback(a)] == []
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # rank 0 decides the snapshot rewrite for all; one val image between two ranks evaluates
    # outside DDP (a collective in the forward would hang rank 0) and both ranks sum the same counts
    assert [r["decisions"] for r in ranks] == [[True, False]] * 2
    assert ranks[0]["val_miou"] == ranks[1]["val_miou"] >= 0
    ranks = [r["epochs"] for r in ranks]
    for epoch in range(EPOCHS):
        shares = [[i for batch in ranks[r][epoch] for i in batch] for r in range(2)]
        assert all(len(batch) == GLOBAL_BATCH // 2 for r in range(2) for batch in ranks[r][epoch])
        assert not set(shares[0]) & set(shares[1]) and sorted(shares[0] + shares[1]) == list(range(N_IMAGES))
    orders = [tuple(i for batch in ranks[0][epoch] for i in batch) for epoch in range(EPOCHS)]
    assert len(set(orders)) == EPOCHS, f"rank 0 saw the same order in two epochs: {orders}"


@pytest.mark.parametrize("method", STEP_METHODS)
def test_two_ranks_step_as_one_rank_on_the_global_batch(two_ranks, method):
    """One step of two DDP ranks equals one step of one rank on the global batch: the
    parameters, θ of the learned outlier model (Grid-TR) and val mIoU (summed over the
    ranks' shares of the val set). The ranks' seed counts differ a lot (SEEDS_PER_IMAGE):
    each normalising by its own count would weigh the seeds of the rank with fewer more.
    The network has no BatchNorm: its batch statistics are per rank on CPU (docs/scaling.md)."""
    import torch

    ranks = [json.loads((two_ranks[0] / f"rank{r}.json").read_text())["steps"][method] for r in range(2)]
    one = one_step(method)
    two, ref = torch.tensor(ranks[0]["params"]), torch.tensor(one["params"])
    assert torch.equal(two, torch.tensor(ranks[1]["params"]))  # DDP keeps the ranks in step
    initial = torch.tensor(initial_params())
    moved = (ref - initial).abs().max()
    assert moved > 1e-3, "the step did not move the parameters: the comparison below would be vacuous"
    assert (two - ref).abs().max() <= 1e-4 * moved
    assert ranks[0]["theta"] == pytest.approx(one["theta"], rel=1e-5, abs=1e-7)
    if method == "grid-tr":
        assert abs(one["theta"][0] - initial_theta()) > 1e-3  # θ learned something to compare
    assert ranks[0]["val_miou"] == ranks[1]["val_miou"] == pytest.approx(one["val_miou"], abs=1e-12)


def test_the_global_batch_must_split_over_the_workers():
    with pytest.raises(UserError, match="--batch-size.*global batch: 12 .*--workers 5"):
        TrainConfig(data="x", batch_size=12, num_workers=5).validate()
    with pytest.raises(UserError, match="--loader-workers"):
        TrainConfig(data="x", loader_workers=-1).validate()
