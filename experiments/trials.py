"""Training runs as the trials of a Ray Tune experiment: what Table 1, the λ sweep and
the hyper-parameter search (`experiments.search`) share.

A trial is one `trainer.driver.run_train`: its trainer on Ray Train and, for Grid-TR,
its own solver farm, in its own run folder. Every epoch's report of the trainer goes
on to Tune (`TuneReportCallback`), so Tune's status table and schedulers see val mIoU
as it comes; the trial's last result is the run's summary.json.

Resources. Ray Train places the trainer workers in a placement group of its own,
outside the trial's, and the farm's solver actors are placed by Ray Data; a trial
reserves only its driver (`TRIAL_RESOURCES`). What bounds the runs at once is Tune's
concurrency limit, as Ray documents for Ray Train inside Tune trials ("Set
max_concurrent_trials to limit the number of Ray Train driver processes", Ray Train
user guide "Hyperparameter Tuning with Ray Tune",
https://docs.ray.io/en/latest/train/user-guides/hyperparameter-optimization.html):
by default as many runs as the cluster's CPUs and GPUs hold (`runs_that_fit`), each
counted at what its trainer workers and its first solver actors ask for.

State. An experiment lives in OUT/tune/NAME-DIGEST, DIGEST a hash of its runs'
configurations: the same command finds it again and Tune's own restore
(`Tuner.restore`) finishes it; finished trials are not run again, interrupted or
failed ones continue their run from its last checkpoint (`run_train`'s
`resume_unfinished`). Other runs (another --lengths, another budget) are another
experiment. OUT may be an object store URI (s3://…): the run folders, Tune's state
and the outputs all go there, through shared/storage.py's filesystem.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import posixpath
import time

from ray import tune

from shared import storage
from shared.config import from_dict, to_dict
from trainer.config import TrainConfig
from shared.errors import UserError, user_cause
from trainer.methods import METHODS

# What a trial reserves for itself: its driver waits on TorchTrainer.fit() and polls
# shards, a Python process with torch loaded. No CPU: a fraction would leave a node
# short of the whole CPU its trainer worker asks for. (Tune needs a non-empty request.)
TRIAL_RESOURCES = {"CPU": 0, "memory": 512 * 2**20}
ORPHAN_CHECK_S = 2.0  # how often the driver looks for placement groups of stopped trials
# Tune saves its experiment state at most every 10 s by default; a driver killed in
# between would run a trial again that had finished. The state of a few dozen trials
# is small: save it after every step.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
# Tune's own SIGINT handler ends its loop quietly and stays installed after the
# experiment: a Ctrl-C between a table's two experiments would be swallowed and the
# next one run. Ctrl-C is a KeyboardInterrupt instead (`fit` says what to do next); the
# state saved after every step is what a rerun restores.
os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")


def demand(cfg: TrainConfig) -> dict[str, float]:
    """CPUs and GPUs one run holds at once: its trainer workers (as driver.run_train's
    ScalingConfig asks; cfg's devices resolved, `trainer.driver.resolve_devices`) and, with
    stage A, its first solver actors."""
    cpus = cfg.num_workers * (1 + cfg.loader_workers)
    if METHODS[cfg.method].needs_proposals:
        cpus += cfg.solver_range()[0]
    return {"CPU": cpus, "GPU": cfg.num_workers if cfg.use_gpu else 0}


def runs_that_fit(cfgs: list[TrainConfig]) -> int:
    """How many of the largest of these runs the cluster holds at once (at least one:
    an autoscaling cluster adds nodes for it)."""
    import ray

    from trainer.driver import resolve_devices

    total = ray.cluster_resources()
    resolved = [resolve_devices(copy.deepcopy(c)) for c in cfgs]  # as each run's run_train will
    need = {k: max(demand(c)[k] for c in resolved) for k in ("CPU", "GPU")}
    fits = [math.floor(total.get(k, 0) / v) for k, v in need.items() if v > 0]
    return max(1, min(fits)) if fits else 1


def grid_config(max_concurrent: int) -> tune.TuneConfig:
    """Tune's settings for a grid of runs that all train to the end (Table 1, the λ
    sweep): the next trial reuses a finished trial's process, which has torch and the
    trainer imported already. (Not for a search: a trial its scheduler stops keeps
    training in a reused process.)"""
    return tune.TuneConfig(max_concurrent_trials=max_concurrent, reuse_actors=True)


def train_trial(config: dict, base: dict, dataset: str, per_trial_folders: bool = False) -> dict:
    """A trial: the run `config["run"]` of `base` ({name: TrainConfig as a dict}), with
    the search's sampled options (every other key of `config`) set on it;
    `per_trial_folders`: in the folder OUT/TRIAL_ID of the run's OUT (a search's trials
    all train the same run)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from trainer.driver import run_train

    cfg = trial_config(config, base, tune.get_context().get_trial_id() if per_trial_folders else None)
    started = time.time()
    # a trial that Tune starts again (after a lost driver or node) continues its run from
    # the last checkpoint; another run's outputs in the folder are cleared
    summary = run_train(cfg, dataset, overwrite=True, callbacks=[TuneReportCallback()], resume_unfinished=True)
    # the summary as one JSON string: Tune prints every key of a result, nested ones too
    summary.update(trial_started=started, trial_ended=time.time())
    return {"val_miou": summary["val_miou"], "wall_s": summary["wall_s"], "summary": json.dumps(summary)}


def trial_config(config: dict, base: dict, trial_id: str | None = None) -> TrainConfig:
    """The configuration of a trial (see train_trial); `trial_id`: its own folder OUT/TRIAL_ID.
    A --shards base that the user named is shared by every trial: each trial gets its own
    folder under it (RUN/ or RUN/TRIAL_ID), since a run claims its shard base and clears
    whatever another run left there."""
    from shared.config import set_option

    cfg = from_dict(TrainConfig, base[config["run"]])
    for key, value in config.items():
        if key != "run":
            set_option(cfg, key, value)
    if trial_id is not None:
        cfg.out = storage.join(cfg.out, trial_id)
    if cfg.shards:
        cfg.shards = storage.join(cfg.shards, config["run"], *([trial_id] if trial_id is not None else []))
    return cfg


def summary_of(result) -> dict:
    """The run's summary (summary.json, and when its trial started and ended) from a
    trial's result."""
    return json.loads(result.metrics["summary"])


class Progress(tune.Callback):
    """One line per finished trial: its run (and sampled options), val mIoU, wall time;
    and the trainer placement groups of stopped trials freed. Tune keeps it with the
    experiment, so a restored experiment does the same."""

    def __init__(self, total: int):
        self.total = total
        self.checked = 0.0

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self.checked > ORPHAN_CHECK_S:
            self.checked = time.monotonic()
            remove_orphaned_placement_groups()

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = trial.last_result
        if "summary" in r:
            line = f"val mIoU {r['val_miou']:.4f} in {r['wall_s']:.0f}s"
        else:  # stopped early by the scheduler
            line = f"stopped after epoch {r.get('epoch', '?')}, val mIoU {r.get('val_miou', float('nan')):.4f}"
        done = 1 + sum(t.status == "TERMINATED" for t in trials if t is not trial)
        print(f"[{done}/{self.total}] {run_name(trial.config, trial.trial_id)}: {line}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"{run_name(trial.config, trial.trial_id)}: failed (Tune's log: {trial.local_path})", flush=True)


def remove_orphaned_placement_groups() -> int:
    """Remove the placement groups whose creating actor is dead: the trainer workers'
    of a trial that Tune stopped (ASHA) or lost, whose Ray Train V2 controller died
    with the trial's actor. Still needed with Train V2: its own cleaner (a detached
    actor) asks the state API whether the controller lives, which a private Ray does
    not serve (shared/ray_session.py), and a group outlives the actor that made it
    until the job ends (tests/test_tune.py shows it): the trainer's CPUs would stay
    held and the next trials wait for ever. Reads the GCS table directly, as
    `solver_restarts` does."""
    import ray
    from ray._private import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job = ray.get_runtime_context().get_job_id()  # this experiment's: other jobs' groups are theirs
    removed = 0
    for raw in state.state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        made_by_actor = not ray.ActorID(pg.creator_actor_id).is_nil()  # Tune's own are the driver's
        if (pg.creator_job_id.hex() == job and made_by_actor and pg.creator_actor_dead and not pg.is_detached
                and pg.state != gcs_pb2.PlacementGroupTableData.REMOVED):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
            removed += 1
    return removed


def run_name(config: dict, trial_id: str) -> str:
    """The run a trial trains and the options the search sampled for it."""
    sampled = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items() if k != "run"]
    return config.get("run", trial_id) + (f" ({', '.join(sampled)})" if sampled else "")


def experiment_path(out: str, name: str, runs: dict[str, TrainConfig], extra=None) -> str:
    """OUT/tune/NAME-DIGEST: the same runs (and `extra`: a search space) find the same experiment."""
    digest = hashlib.sha256(json.dumps([{k: to_dict(c) for k, c in sorted(runs.items())}, extra],
                                       sort_keys=True, default=str).encode()).hexdigest()[:8]
    return storage.join(out, "tune", f"{name}-{digest}")


def fit(path: str, runs: dict[str, TrainConfig], dataset: str, param_space: dict,
        tune_config: tune.TuneConfig, total: int, log=print, per_trial_folders: bool = False) -> tune.ResultGrid:
    """Run the Tune experiment at `path`, or finish it (Tune's restore), and return its
    results; failed trials are an error naming their runs. `total`: the trials the
    experiment will have."""
    from trainer.driver import resolve_devices

    for cfg in runs.values():  # a bad option is one line here, not a traceback from every trial
        copy.deepcopy(cfg).validate()
        # devices decided here, by the Ray this driver started or joined: a trial runs in an
        # actor, which did not start Ray and would take a private Ray for a cluster
        resolve_devices(cfg)
    base = {name: to_dict(cfg) for name, cfg in runs.items()}
    trainable = tune.with_resources(tune.with_parameters(
        train_trial, base=base, dataset=dataset, per_trial_folders=per_trial_folders), TRIAL_RESOURCES)
    fs, fs_path = tune_storage(path)
    restorable = tune.Tuner.can_restore(fs_path, storage_filesystem=fs)
    if restorable and not saved_state_readable(path):
        # each trial's run keeps its own progress (run_train's resume_unfinished), so a new
        # experiment loses nothing: finished runs return at once, interrupted ones go on
        log(f"{path}: Tune's saved state is empty (its driver was killed as it wrote it): a new Tune "
            "experiment, whose finished runs are kept and interrupted ones continue")
        restorable = False
    if restorable:
        log(f"{path}: resuming the Tune experiment there (finished trials are kept)")
        tuner = tune.Tuner.restore(fs_path, trainable=trainable, restart_errored=True, storage_filesystem=fs)
    else:
        log(f"{path}: new Tune experiment")
        tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=tune.RunConfig(
            name=posixpath.basename(fs_path), storage_path=posixpath.dirname(fs_path), storage_filesystem=fs,
            # Progress prints a line per finished trial; Tune's own status tables (every
            # trial's config and result, each half a minute) would bury the epoch lines
            verbose=0, callbacks=[Progress(total)]))
    try:
        results = tuner.fit()
    except KeyboardInterrupt:
        raise UserError(f"interrupted; the same command again finishes the experiment {path} "
                        "(its finished trials are kept)") from None
    unfinished = len(results) - results.num_terminated - results.num_errors
    if unfinished:  # Tune's own handler (SIGUSR1) ends its loop with the experiment's state saved
        raise UserError(f"interrupted with {unfinished} of {len(results)} trials unfinished; the same command "
                        f"again finishes them (finished trials are kept, under {path})")
    failed = [r for r in results if r.error is not None]
    if failed:
        names = ", ".join(run_name(r.config, "?") for r in failed)
        raise UserError(f"{len(failed)} trial(s) failed: {names} ({_first_line(failed[0].error)}); Tune's logs are "
                        f"under {path}; the same command again runs them again")
    log(f"{posixpath.basename(fs_path)}: {len(results)} trials, at most {most_at_once(results)} at once")
    return results


def saved_state_readable(path: str) -> bool:
    """Whether the newest experiment state Tune saved at `path` reads. Tune rewrites it in
    place after every step; a driver killed in that instant leaves it empty (seen once in a
    suite run), and Tune would then restore an experiment without its trials."""
    names = sorted(n for n in storage.list_dir(path) if n.startswith("experiment_state-") and n.endswith(".json"))
    try:
        return bool(names) and isinstance(json.loads(storage.read_bytes(storage.join(path, names[-1]))), dict)
    except ValueError:
        return False


def tune_storage(path: str):
    """(filesystem, path in it) of an experiment for Tune: None and the path for a local
    one; for a URI, shared/storage.py's filesystem (the endpoint and options of the URI's
    query, one PUT per small file), which Tune's own parsing of s3://…?query would miss."""
    if not storage.is_remote(path):
        return None, path
    return storage.resolve(path)


def most_at_once(results) -> int:
    """The most trials that trained at the same time (from their start and end times;
    for a trial stopped early, Tune's: its last result's time, to the second)."""
    spans = []
    for r in results:
        if "summary" in r.metrics:
            s = summary_of(r)
            spans.append((s["trial_started"], s["trial_ended"]))
        elif "timestamp" in r.metrics:
            spans.append((r.metrics["timestamp"] - r.metrics["time_total_s"], r.metrics["timestamp"]))
    events = sorted(e for start, end in spans for e in ((start, 1), (end, -1)))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def _first_line(error: BaseException) -> str:
    """The user's error in a trial's failure, else its first line."""
    if isinstance(error, str):  # what Tune keeps of some failures
        return error.splitlines()[0] if error else "failed"
    cause = user_cause(error)
    text = str(cause if cause is not None else error)
    return text.splitlines()[0] if text else type(error).__name__
