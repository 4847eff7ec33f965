"""The driver: Ray, the trainer (Ray Train) and the solver farm, side by side.

    trainer (TorchTrainer) ──snapshots──▶ shards ──▶ Farm (SolverActors) ──proposals──▶ shards ──▶ trainer

The driver validates the input before anything starts, runs the farm in a thread
beside `TorchTrainer.fit()`, and writes summary.json (SPEC §7) when both are done,
from the trainer's last report (the `Result` of `fit()`) and the farm's figures.
"""
from __future__ import annotations

import _thread
import json
import math
import os
import threading
import time
import tomllib
import uuid
from typing import NamedTuple

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from shared import ray_session, storage
from shared.shard_store import ShardStore, parts_of
from shared.config import to_dict
from trainer.config import TrainConfig, check_eps
from shared.errors import UserError
from solver_service.farm import Farm, Pool, _free, solver_memory, solver_restarts
from trainer.architectures import checkpoint_arch, resolve_arch
from trainer.console import EpochLines, header
from shared.image_io import read_label
from shared.labels import UNLABELLED, scribble_length
from trainer.splits import check_samples, load_split, read_classes
from trainer.imagenet import IMAGENET, check_backbone_weights
from trainer.methods import METHODS
from trainer.process_group import torch_config
from trainer.loop import CHECKPOINT_SCORE, SUMMARY_KEY, phases, train_loop_per_worker, train_split
from trainer.run_folder import RunFolder
from trainer.runlog import load_checkpoint
from trainer.tomlio import dumps


class EndOnUserError(ray.train.UserCallback):
    """Ray Train retries every worker error as a lost worker (--max-failures); bad input
    or a diverged network (a UserError) fails the same way every time: end the run at
    once. Raised here, on the controller, it ends fit() as a ControllerError holding it."""

    def after_exception(self, run_context, worker_exceptions):
        for error in worker_exceptions.values():
            if isinstance(error, UserError):
                raise error


class Inputs(NamedTuple):
    num_classes: int
    train_images: int
    val_images: int
    largest_train_image: int  # pixels: what a solver actor must hold


def check_inputs(cfg: TrainConfig, overwrite: bool = False) -> Inputs:
    """Fail fast, with the file or option at fault. Resolves cfg.arch (see
    `trainer.architectures.resolve_arch`)."""
    cfg.validate()
    if not cfg.data or not os.path.exists(cfg.data):
        raise UserError(f"--data: no such data set folder: {cfg.data!r}")
    K = len(read_classes(cfg.data, cfg.format))
    check_eps(cfg.eps, K)
    train = train_split(cfg)
    val = load_split(cfg.data, cfg.format, "val", cfg.scribbles)
    largest = check_samples(train, K, cfg.max_image_pixels)
    check_samples(val, K, cfg.max_image_pixels)
    init_arch = None
    if cfg.init:
        state = load_checkpoint(cfg.init)
        if state["num_classes"] != K:
            raise UserError(f"--init {cfg.init}: a {state['num_classes']}-class model, but the data set has {K} classes")
        init_arch = checkpoint_arch(state)
    cfg.arch = resolve_arch(cfg.arch, init_arch, cfg.backbone_weights)
    check_backbone_weights(cfg.backbone_weights)
    if cfg.resume and not storage.exists(RunFolder(cfg.out).last):
        raise UserError(f"--resume: {RunFolder(cfg.out).last} does not exist")
    found = RunFolder(cfg.out).outputs()
    if found and not (cfg.resume or overwrite):
        raise UserError(f"--out {cfg.out}: holds another run's outputs ({', '.join(found[:3])}); "
                        f"continue it with --resume {cfg.out} or replace it with --overwrite")
    if cfg.shards:  # shards under --out went with the check above
        ShardStore(cfg.shards, recorded_run_id(cfg.out) if cfg.resume else "").claim(overwrite, cfg.resume, write=False)
    return Inputs(K, len(train), len(val), largest)


def images_without_scribbles(samples, num_classes: int) -> list[str]:
    """Ids of training images whose scribble file labels no pixel: not an error (SPEC §1:
    stage A then uses all K labels), but counted and reported."""
    return [s.image_id for s in samples if s.seeds_path and (read_label(s.seeds_path, num_classes) == UNLABELLED).all()]


RUN_FILE = RunFolder.RUN_FILE


def recorded_run_id(out: str) -> str:
    """The id in OUT/run.json ('' for a folder from before run ids)."""
    uri = RunFolder(out).run_file
    return json.loads(storage.read_bytes(uri))["run_id"] if storage.exists(uri) else ""


def claim_run_folder(cfg: TrainConfig) -> str:
    """A run folder belongs to one run (SPEC §7): returns this run's id. A folder holding
    another run's outputs is an error, unless --resume continues it or --overwrite
    clears them first."""
    run_uri = RunFolder(cfg.out).run_file
    if cfg.resume:
        if storage.exists(run_uri):
            return recorded_run_id(cfg.out)
        run_id = uuid.uuid4().hex[:12]  # a folder from before run ids: adopt it
    else:
        for name in RunFolder(cfg.out).outputs():  # check_inputs refused them unless overwrite
            storage.delete_tree(storage.join(cfg.out, name))
        run_id = uuid.uuid4().hex[:12]
    record = {"run_id": run_id, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "method": cfg.method}
    storage.write_bytes(run_uri, (json.dumps(record) + "\n").encode())
    return run_id


def run_train(cfg: TrainConfig, dataset_name: str | None = None, overwrite: bool = False, callbacks=(),
              resume_unfinished: bool = False) -> dict:
    """One training run end to end; returns the summary (also written to OUT/summary.json).
    `overwrite`: clear another run's outputs from --out first (else that is an error).
    `callbacks`: Ray Train's, e.g. a Tune trial's TuneReportCallback (experiments/trials.py).
    `resume_unfinished`: when --out holds a run of this same configuration (a Tune trial
    started again), continue it as --resume would, or return its summary if it finished."""
    cfg.out = cfg.out if storage.is_remote(cfg.out) else os.path.abspath(cfg.out)
    # workers run in other folders: every local path they read must be absolute
    cfg.data, cfg.init, cfg.backbone_weights, cfg.shards = (
        p if not p or storage.is_remote(p) or p == IMAGENET else os.path.abspath(p)
        for p in (cfg.data, cfg.init, cfg.backbone_weights, cfg.shards))
    K, n_train, n_val, largest = check_inputs(cfg, overwrite)
    resolve_devices(cfg)
    if resume_unfinished and (summary := finished_run(cfg)) is not None:
        print(f"{cfg.out}: this run finished already; its summary.json is kept", flush=True)
        return summary
    if resume_unfinished and unfinished_run(cfg):
        cfg.resume = True
        print(f"{cfg.out}: resuming this run from its last checkpoint", flush=True)
    check_cluster_paths(cfg)
    run_id = claim_run_folder(cfg)
    storage.write_bytes(RunFolder(cfg.out).config, dumps(to_dict(cfg)).encode())
    unscribbled = [] if METHODS[cfg.method].uses_masks else images_without_scribbles(train_split(cfg), K)
    if unscribbled:
        print(f"{len(unscribbled)} training image(s) without any scribble, trained on without seeds "
              f"(stage A over all labels): {', '.join(unscribbled[:10])}{' …' if len(unscribbled) > 10 else ''}", flush=True)
    store = ShardStore(cfg.shard_base(), run_id)
    store.claim(overwrite, adopt=cfg.resume)
    store.clear_failure()
    parts = parts_of(n_train, cfg.shard_size)
    t0 = time.perf_counter()
    farm = None
    use_gpu = cfg.use_gpu
    check_trainer_resource(cfg)
    if cfg.sync_bn and not use_gpu:
        raise UserError("--sync-bn: needs GPU trainer workers (torch's SyncBatchNorm runs on CUDA only)")
    if ray_session.started_here():
        check_capacity(cfg, use_gpu)
    print(header(cfg, dataset_name or cfg.data, n_train, n_val, K,
                 cfg.solver_range()[1] if METHODS[cfg.method].needs_proposals else 0, use_gpu), flush=True)
    if METHODS[cfg.method].needs_proposals:
        pool = Pool(cfg.solver_range(), cfg.solver_resource, solver_memory(largest, K), cfg.solver_retries,
                    cfg.solver_wait)
        farm = Farm(
            store, len(parts), cfg.solver, pool, on_round=lambda r, rows, s: _report_round(r, rows, s, cfg),
            # in a Tune trial run_train is not on the main thread, which is the actor's own: there the
            # farm's failure marker alone stops the trainer
            on_error=_thread.interrupt_main if threading.current_thread() is threading.main_thread() else None,
            n_images=n_train, storage_patience_s=cfg.storage_patience,
        )
        farm.start()
    trainer = TorchTrainer(
        train_loop_per_worker,
        torch_config=torch_config(cfg.num_workers, one_machine=ray_session.started_here()),
        train_loop_config={**to_dict(cfg), "run_id": run_id},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker=trainer_resources(cfg)),
        run_config=RunConfig(
            name="ray_train",
            storage_path=ray_train_storage(cfg.out, run_id),
            # Ray Train retries a worker group that cannot be placed (a controller failure every
            # WORKER_START_S) without end: bound it by --solver-wait, as the farm's actors are
            failure_config=FailureConfig(max_failures=cfg.max_failures,
                                         controller_failure_limit=math.ceil(cfg.solver_wait / WORKER_START_S)),
            # the latest checkpoint (Ray Train never deletes it) and the best by val mIoU
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=CHECKPOINT_SCORE,
                                               checkpoint_score_order="max"),
            callbacks=[EndOnUserError(), *callbacks],
        ),
    )
    epochs = EpochLines(cfg.out, sum(n for _, n in phases(cfg)))
    epochs.start()
    trained_to_end = False
    try:
        result = trainer.fit()
        trained_to_end = True
    except (KeyboardInterrupt, ray.train.TrainingFailedError) as e:
        if farm is None or farm.error is None:  # not stopped by the farm: the user's ^C or the trainer's own error
            raise _unplaced(e, cfg, use_gpu) or e
    finally:
        epochs.finish()
        # a trainer that ended (^C, an error) no longer needs proposals: stop at once, not after --max-stall
        if farm is not None:
            farm.finish(cfg.max_stall if trained_to_end else STOP_S)
    if farm is not None and farm.error is not None:
        raise UserError(f"stage A failed: {farm.error}")
    trained = result.metrics.get(SUMMARY_KEY) if result.metrics else None
    if trained is None:
        raise UserError(f"--out {cfg.out}: the trainer ended without its last epoch's report"
                        + (" (--resume of a run that had finished)" if cfg.resume else ""))
    summary = {
        "method": cfg.method,
        "dataset": dataset_name or cfg.data,
        "scribble_length": scribble_length(cfg.scribbles),
        "epochs": cfg.epochs,
        "seed": cfg.seed,
        "train_images": n_train,
        "images_without_scribbles": len(unscribbled),
        "val_images": n_val,
        "val_miou": trained["val_miou"],
        "per_class_iou": trained["per_class_iou"],
        "trimap": trained["trimap"],
        "wall_s": time.perf_counter() - t0,
        "stage_b_s": trained["stage_b_s"],
        "trainer_stall_s": trained["stall_s"],
        "stage_a_images": farm.images if farm else 0,
        "proposals_missing": store.images_missing(parts) if farm else 0,
        "solvers": cfg.solver_range()[1] if farm else 0,
        "solver_restarts": solver_restarts() if farm else 0,
        "mean_staleness": trained["mean_staleness"],
        "max_staleness": trained["max_staleness"],
        "schedule": cfg.schedule if farm else None,
        "run_id": run_id,
    }
    storage.write_bytes(RunFolder(cfg.out).summary, (json.dumps(summary, indent=2) + "\n").encode())
    return summary


GPU_LOADERS_MAX = 8  # default loader processes per GPU trainer worker, at most
# ... when no GPU node is up yet (an autoscaling cluster): what the smallest GPU instances
# (4 vCPUs, one GPU) leave beside the trainer worker
GPU_LOADERS_UNSEEN = 3


def resolve_use_gpu(use_gpu: bool | None, private: bool, cluster_gpus: float) -> bool:
    """--gpu/--no-gpu; without either: on a private Ray, whether this machine has GPUs; in a
    cluster (--address), GPU when it has GPUs now, and an error when it has none now, rather
    than training on CPU without a word: its GPU nodes may just not have started yet (an
    autoscaler's `min_workers: 0`, deploy/cluster.yaml)."""
    if use_gpu is not None:
        return use_gpu
    if private or cluster_gpus > 0:
        return cluster_gpus > 0
    raise UserError("--gpu or --no-gpu: the cluster (--address) has no GPU now; its GPU nodes may not have "
                    "started yet. Give --gpu to train on GPUs (the autoscaler starts them) or --no-gpu to train on CPUs")


def default_loader_workers(use_gpu: bool, nodes: list[dict]) -> int:
    """--loader-workers when not given: 0 on CPU (the trainer shares the CPUs with the
    solvers); on GPU, enough to keep the GPU fed where the CPUs allow it: what each GPU of
    the smallest GPU node in `nodes` (ray.nodes()) leaves beside its trainer worker, at most
    GPU_LOADERS_MAX; GPU_LOADERS_UNSEEN while no GPU node is up."""
    if not use_gpu:
        return 0
    per_gpu = [int(n["Resources"].get("CPU", 0) // n["Resources"]["GPU"]) - 1
               for n in nodes if n.get("Alive") and n["Resources"].get("GPU", 0) > 0]
    if not per_gpu:
        print(f"no GPU node up yet: --loader-workers {GPU_LOADERS_UNSEEN} (give it to fit your GPU nodes' CPUs)",
              flush=True)
        return GPU_LOADERS_UNSEEN
    return max(0, min(GPU_LOADERS_MAX, min(per_gpu)))


def resolve_devices(cfg: TrainConfig) -> TrainConfig:
    """cfg with `use_gpu` and `loader_workers` decided where the options left them to the
    Ray it is connected to; config.toml records them, so a --resume keeps them."""
    cfg.use_gpu = resolve_use_gpu(cfg.use_gpu, ray_session.started_here(), ray.cluster_resources().get("GPU", 0))
    if cfg.loader_workers is None:
        cfg.loader_workers = default_loader_workers(cfg.use_gpu, ray.nodes())
    return cfg


def same_run(cfg: TrainConfig) -> bool:
    """Whether --out holds a run of this configuration: its config.toml, written from the
    configuration as check_inputs and resolve_devices resolved it, is cfg's but for `resume`."""
    raw = storage.read_if_exists(RunFolder(cfg.out).config)
    if raw is None:
        return False
    saved, wanted = tomllib.loads(raw.decode()), tomllib.loads(dumps(to_dict(cfg)))  # one writer: same text, same values
    saved.pop("resume", None)
    wanted.pop("resume", None)
    return saved == wanted


def finished_run(cfg: TrainConfig) -> dict | None:
    """The summary of a finished run of this configuration in --out, else None."""
    raw = storage.read_if_exists(RunFolder(cfg.out).summary)
    return json.loads(raw) if raw is not None and same_run(cfg) else None


def unfinished_run(cfg: TrainConfig) -> bool:
    """Whether --out holds a run of this configuration that stopped before its last
    epoch: a checkpoints/last.pt short of it and no summary.json. A run whose last epoch
    is in last.pt but which wrote no summary trains again: --resume would have no epoch
    left to report from."""
    folder = RunFolder(cfg.out)
    if storage.exists(folder.summary) or not storage.exists(folder.last) or not same_run(cfg):
        return False
    return load_checkpoint(folder.last)["global_epoch"] < sum(epochs for _, epochs in phases(cfg))


def ray_train_storage(out: str, run_id: str) -> str:
    """Where Ray Train keeps its own state and checkpoints (it restores them on a restart,
    and from an earlier fit() of the same folder on `--resume`): the run folder; for a
    remote --out, the object store only in a cluster, where every node must reach it, and
    a local folder of this run on a private Ray (Ray Train's own multipart uploads are not
    needed there and not every S3 endpoint takes them)."""
    if not storage.is_remote(out):
        return storage.resolve(out)[1]
    return local_ray_train_dir(run_id) if ray_session.started_here() else out


def local_ray_train_dir(run_id: str) -> str:
    """Ray Train's state of a run with a remote --out on a private Ray (see ray_train_storage)."""
    return os.path.join(os.path.expanduser("~"), ".cache", "trseg", "ray_train", run_id)


def check_cluster_paths(cfg: TrainConfig) -> None:
    """In a cluster of several nodes, every path a run uses must mean the same thing on
    each of them: rank 0 writes --out and snapshots on its node, the farm on the driver's
    node reads them, and solvers read --data on theirs."""
    if ray_session.started_here() or len([n for n in ray.nodes() if n["Alive"]]) < 2:
        return
    if not cfg.shared_fs:
        for option, path in (("--out", cfg.out), ("--shards", cfg.shards)):
            if path and not storage.is_remote(path):
                raise UserError(f"{option} {path}: a local path in a cluster of several nodes, where each node "
                                f"would write its own copy; give an s3://, gs:// or hdfs:// URI, or --shared-fs "
                                f"if every node mounts it")
    for option, path in (("--data", cfg.data), ("--init", cfg.init), ("--backbone-weights", cfg.backbone_weights)):
        if path and not storage.is_remote(path) and path != IMAGENET:  # each node's torch cache fetches that
            lacking = ray_session.nodes_lacking(path)
            if lacking:
                raise UserError(f"{option} {path}: not on cluster node(s) {', '.join(sorted(set(lacking)))}; "
                                f"copy it to every node (file_mounts in deploy/cluster.yaml) or use a URI")


def check_trainer_resource(cfg: TrainConfig) -> None:
    """No node of a private Ray advertises a custom resource: Ray Train would wait forever."""
    if cfg.trainer_resource and ray_session.started_here():
        raise UserError(f"--trainer-resource {cfg.trainer_resource}: a private Ray has no trainer nodes; "
                        f"use it with --address")


def trainer_resources(cfg: TrainConfig) -> dict:
    """What one trainer worker asks for besides its GPU: a CPU for itself and each loader
    process, and one of the resource that only trainer nodes advertise, if given."""
    return {"CPU": 1 + cfg.loader_workers, **({cfg.trainer_resource: 1} if cfg.trainer_resource else {})}


# Ray Train's wait for a worker group to be placed before it counts a controller failure
WORKER_START_S = float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", 60))
STOP_S = 5.0  # the farm's wait for its current part after the trainer stopped (^C, an error)


def _unplaced(error: BaseException, cfg: TrainConfig, use_gpu: bool) -> UserError | None:
    """Ray Train's error once it gave up placing the trainer workers (a cluster that never
    offered them within --solver-wait), as the one line that names what they ask for."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    if not isinstance(getattr(error, "controller_failure", None), WorkerGroupStartupTimeoutError):
        return None
    return UserError(f"--workers {cfg.num_workers}: the trainer workers ({1 + cfg.loader_workers} CPU"
                     f"{' and 1 GPU' if use_gpu else ''} each) could not be placed within --solver-wait "
                     f"{cfg.solver_wait:g}s; free: {_free()}")


def check_capacity(cfg: TrainConfig, use_gpu: bool) -> None:
    """A private Ray never grows: it must hold the trainer workers (and their GPUs) and, for
    a method with stage A, at least one solver actor at once, or the run would wait
    forever (a cluster's waits are bounded by --solver-wait instead)."""
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    if use_gpu and gpus < cfg.num_workers:
        raise UserError(f"--gpu: {cfg.num_workers} trainer worker(s) need a GPU each, this machine gives Ray "
                        f"{gpus:g}; {'leave out --gpu' if cfg.use_gpu else 'give --no-gpu'}"
                        + (f" or use --workers {int(gpus)}" if gpus >= 1 else ""))
    cpus = resources.get("CPU", 0)
    trainer_cpus = cfg.num_workers * (1 + cfg.loader_workers)  # as ScalingConfig below asks
    solvers = cfg.solver_range()[0] if METHODS[cfg.method].needs_proposals else 0
    if trainer_cpus > cpus and not solvers:
        raise UserError(f"--workers {cfg.num_workers}" + (f" --loader-workers {cfg.loader_workers}" if cfg.loader_workers else "")
                        + f": need {trainer_cpus} CPUs at once, this machine gives Ray {cpus:g}; use --workers "
                        f"{max(1, int(cpus))}" + (" --loader-workers 0" if cfg.loader_workers else ""))
    if cpus - trainer_cpus < solvers:
        loaders = f" --loader-workers {cfg.loader_workers}" if cfg.loader_workers else ""
        raise UserError(f"--workers {cfg.num_workers}{loaders} and --solvers {cfg.solvers}: need "
                        f"{trainer_cpus + solvers} CPUs at once, this machine gives Ray {cpus:g}; use "
                        f"--workers {max(1, int(cpus) - 1)}{' --loader-workers 0' if loaders else ''} --solvers 1"
                        + ("" if use_gpu else " (or a cluster, --address)"))


def _report_round(r: int, rows: list[dict], seconds: float, cfg: TrainConfig) -> None:
    """One line a round, with the farm size that would keep the trainer from waiting."""
    images = sum(row["images"] for row in rows)
    per_image = sum(row["seconds"] for row in rows) / max(images, 1)
    changed = sum(row.get("changed_sum", 0.0) for row in rows) / max(images, 1)
    line = (f"stage A round {r}: {images} images in {seconds:.1f}s, {per_image:.3f} s/image on one solver, "
            f"{100 * changed:.1f}% of unseeded pixels changed from the network's argmax")
    stage_b = _stage_b_seconds_per_round(cfg)
    if images and stage_b:
        needed = math.ceil(images * per_image / stage_b)
        line += (f"; {needed} solver actor(s) keep the trainer from waiting "
                 f"({images} images × {per_image:.3f} s ÷ {stage_b:.1f} s of stage B a round)")
    print(line, flush=True)


def _stage_b_seconds_per_round(cfg: TrainConfig) -> float | None:
    """Mean stage-B seconds of a Grid-TR epoch so far × epochs per round."""
    uri = RunFolder(cfg.out).metrics
    if not storage.exists(uri):
        return None
    lines = [json.loads(x) for x in storage.read_bytes(uri).decode().splitlines() if x.strip()]
    seconds = [e["stage_b_s"] for e in lines if e.get("phase") == cfg.method]
    return sum(seconds) / len(seconds) * cfg.epochs_per_round if seconds else None
