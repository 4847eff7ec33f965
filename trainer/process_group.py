"""The trainer workers' torch.distributed process group, as Ray Train sets it up, with
nothing listening beyond loopback where the workers share one machine.

Ray Train's default rendezvous is a TCPStore on rank 0, and `TCPStore('127.0.0.1', …)`
binds every interface ([::]:port); gloo's and NCCL's own sockets bind the interface of
the machine's hostname. On a private Ray (local mode promises loopback only) the ranks
meet in a FileStore in a private temporary folder instead, and gloo and NCCL use `lo`.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import ray
from ray.train.backend import Backend
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend


class NoProcessGroup(TorchConfig):
    """One trainer worker needs no torch.distributed: Ray Train's no-op backend."""

    @property
    def backend_cls(self):
        return Backend


class LoopbackProcessGroup(TorchConfig):
    """Ranks on one machine: a FileStore rendezvous and loopback transports."""

    @property
    def backend_cls(self):
        return _LoopbackBackend


def _use_loopback() -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    os.environ["NCCL_SOCKET_IFNAME"] = "lo"


class _LoopbackBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig):
        gpus = worker_group.get_resources_per_worker().get("GPU", 0)
        backend = backend_config.backend or ("nccl" if gpus > 0 else "gloo")
        # a new folder each start: a FileStore file must not outlive its process group
        self.folder = tempfile.mkdtemp(prefix="trseg-pg-")  # mode 0700
        worker_group.execute(_use_loopback)
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(
            i, _setup_torch_process_group, backend=backend, world_rank=i, world_size=len(worker_group),
            init_method=f"file://{os.path.join(self.folder, 'store')}", timeout_s=backend_config.timeout_s)
            for i in range(len(worker_group))])

    def on_shutdown(self, worker_group, backend_config):
        super().on_shutdown(worker_group, backend_config)
        shutil.rmtree(getattr(self, "folder", ""), ignore_errors=True)


def torch_config(num_workers: int, one_machine: bool) -> TorchConfig | None:
    """Ray Train's TorchConfig for `num_workers` ranks; `one_machine`: on a private Ray."""
    if num_workers == 1:
        return NoProcessGroup(backend="gloo")
    return LoopbackProcessGroup() if one_machine else None
