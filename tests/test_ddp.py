"""Data-parallel stage B on two gloo workers of Ray Train on this machine: each rank
draws a disjoint share of the training set, a new shuffle every epoch, and the global
`--batch-size` is split over the ranks; rank 0 decides a snapshot rewrite for all, and
evaluation with fewer val images than ranks does not hang."""
import json
import os

import pytest

from trainer.config import TrainConfig
from shared.errors import UserError
from tests.ddp_worker import EPOCHS, GLOBAL_BATCH, N_IMAGES, draw
from tests import helpers
from tests.helpers import ROOT


def test_two_workers_draw_disjoint_shares_of_a_new_shuffle_each_epoch(tmp_path):
    """Also: the process group of a private Ray (the driver's torch_config) opens no
    listening socket beyond loopback in the trainer workers (/proc/net/tcp{,6}): Ray
    Train's default TCPStore would bind every interface."""
    import threading

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trainer.process_group import LoopbackProcessGroup

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


def test_the_global_batch_must_split_over_the_workers():
    with pytest.raises(UserError, match="--batch-size.*global batch: 12 .*--workers 5"):
        TrainConfig(data="x", batch_size=12, num_workers=5).validate()
    with pytest.raises(UserError, match="--loader-workers"):
        TrainConfig(data="x", loader_workers=-1).validate()
