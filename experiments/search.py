"""`python -m trainer tune`: a hyper-parameter search over any configuration keys, as a
Ray Tune experiment of training runs (experiments/trials.py) on the val split.

The search space is a TOML file, one entry per configuration key (TrainConfig's or
stage A's flat names: tr_weight λ, potts_weight β, eps ε, nu ν, lr, …):

    tr_weight = { loguniform = [0.01, 1.0] }   # sampled: uniform, loguniform, randint [lo, hi)
    potts_weight = { choice = [10, 50, 100] }  #          or choice among values
    epochs_per_round = 2                       # a plain value: fixed for every trial

experiments/search_spaces/ holds a default space per method. Trials are sampled at
random (`--trials`); an ASHA scheduler on val mIoU (reported by the trainer every
epoch) stops the weaker ones early. Methods that start from a PCE-GD model get one
first, unless --init gives it: OUT/pce/, a trial of its own.

Outputs: OUT/trials/TRIAL_ID/ (each trial's run folder), OUT/trials.csv and
OUT/trials.md (every trial: its sampled values, val mIoU, epochs, whether ASHA stopped
it), OUT/best.toml (the best trial's whole configuration: `train --config
OUT/best.toml --out DIR` trains it again) and OUT/tune/ (Tune's state: the same
command again finishes an interrupted search, its interrupted trials continuing from
their last checkpoints). OUT may be an object store URI (s3://…).
"""
from __future__ import annotations

import dataclasses
import os

from shared import storage
from shared.config import SOLVER_FIELDS, from_dict, set_option, to_dict
from trainer.config import TrainConfig, typed_option
from shared.errors import UserError
from trainer.methods import METHODS

SPACES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "search_spaces")
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
# keys a search may not set: where the runs read and write, and how they are resumed
NOT_SEARCHED = ("data", "format", "out", "resume", "init", "shards", "method", "solver")
# `tune --quick`: what it trains unless an option says otherwise
QUICK_BUDGET = {"epochs": 2, "pretrain_epochs": 1, "epochs_per_round": 1, "batch_size": 4, "crop_size": 0}


def default_space(method: str) -> str:
    return os.path.join(SPACES, f"{method}.toml")


def read_space(path: str) -> tuple[dict, dict]:
    """(sampled: {key: Tune domain}, fixed: {key: value}) of a SPACE.toml; a key or value
    that TrainConfig would not take is an error naming the file and the key."""
    from ray import tune

    from trainer.tomlio import read_toml

    keys = {f.name for f in dataclasses.fields(TrainConfig)} | SOLVER_FIELDS
    sampled, fixed = {}, {}
    for key, value in read_toml(path, "--search").items():
        name = key.replace("-", "_")
        if name not in keys or name in NOT_SEARCHED:
            raise UserError(f"--search {path}: {key!r} is not a configuration key a search can set "
                            f"(TrainConfig's and stage A's, except {', '.join(NOT_SEARCHED)})")
        if not isinstance(value, dict):
            fixed[name] = _checked(path, name, value)
            continue
        if len(value) != 1 or next(iter(value)) not in DISTRIBUTIONS:
            raise UserError(f"--search {path}: {key} = {value!r}: expected one of "
                            f"{', '.join(f'{{ {d} = [...] }}' for d in DISTRIBUTIONS)}")
        kind, args = next(iter(value.items()))
        if not isinstance(args, list) or not args or (kind != "choice" and len(args) != 2):
            raise UserError(f"--search {path}: {key}.{kind}: expected "
                            f"{'a list of values' if kind == 'choice' else '[low, high]'}, got {args!r}")
        for v in args:  # every bound or choice must be a value of the key's type
            _checked(path, name, v)
        if kind != "choice" and not args[0] < args[1]:
            raise UserError(f"--search {path}: {key}.{kind}: needs low < high, got {args!r}")
        if kind == "loguniform" and args[0] <= 0:
            raise UserError(f"--search {path}: {key}.loguniform: needs low > 0, got {args!r}")
        sampled[name] = getattr(tune, kind)(args) if kind == "choice" else getattr(tune, kind)(*args)
    if not sampled:
        raise UserError(f"--search {path}: no key to search (give one as {{ uniform = [low, high] }} or the like)")
    return sampled, fixed


def _checked(path: str, key: str, value):
    """`value` as configuration key `key` takes it, or an error naming the file."""
    try:
        return typed_option(key, value)
    except UserError as e:
        raise UserError(f"--search {path}: {e}") from None


def prepare_search(params: dict, space: str | None, quick: bool) -> tuple[TrainConfig, str, str]:
    """(base config, search space file, OUT) of `tune` from its options as the CLI parsed
    them (the train options, None where not given): every check done before Ray starts.
    Without --data, the built-in synthetic set (as table1's); `quick`: tiny budgets."""
    from experiments.table1 import FULL, QUICK, prepare
    from trainer.config import resolve_train_config
    from trainer.splits import check_data_folder
    from trainer.imagenet import backbone_weights_path

    if params["resume_dir"]:
        raise UserError("--resume: not an option of tune; the same tune command again finishes an interrupted search")
    if not params["method"]:
        raise UserError("--method: required (the method whose options are searched)")
    if not params["out"]:
        raise UserError("--out: required (the search's folder)")
    space = space or default_space(params["method"])
    read_space(space)  # a bad space fails before Ray starts
    check_data_folder(params["data"])
    if not params["data"]:
        _, params["data"], params["format"] = prepare(params["out"], None, "synthetic", QUICK if quick else FULL)
    if quick:
        for key, value in QUICK_BUDGET.items():
            params[key] = value if params[key] is None else params[key]
    out = params.pop("out")
    cfg = resolve_train_config(params)
    cfg.backbone_weights = backbone_weights_path(cfg.backbone_weights)
    return cfg, space, out


def run_search(base: TrainConfig, space_path: str, trials: int, out: str, max_concurrent: int | None = None,
               grace_period: int = 1, log=print, plan_only: bool = False) -> dict:
    """Sample `trials` configurations of `base` from the space, train them under ASHA,
    write the table and best.toml; returns the best trial's {val_miou, config}.
    `plan_only`: write the PCE model's and the trials' base config.toml, print the plan
    and the sampled keys, train nothing."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from experiments import trials as runs_as_trials
    from trainer.tomlio import dumps

    sampled, fixed = read_space(space_path)
    out = out if storage.is_remote(out) else os.path.abspath(out)
    for key, value in fixed.items():
        set_option(base, key, value)
    base.eval_every = 1  # ASHA compares the trials' val mIoU at every epoch
    base.validate()
    dataset = os.path.basename(base.data.rstrip("/"))
    pce = None
    if base.pretrains():
        pce = from_dict(TrainConfig, to_dict(base))
        # the PCE model trains as `train` pretrains: its epochs at --pretrain-lr (base.lr,
        # resolved above, is the fine-tuning's)
        pce.method, pce.epochs, pce.lr = METHODS[base.method].pretrain, base.pretrain_epochs, base.pretrain_lr
        pce.out = storage.join(out, pce.method)
        base.fine_tune_from(pce)
    base.out = storage.join(out, "trials")
    if plan_only:
        from experiments.plan import write_plan

        write_plan({**({"pce": pce} if pce else {}), "trials (each in trials/TRIAL_ID)": base}, log)
        log(f"{trials} trials sample {', '.join(sampled)} from {space_path}")
        return {}
    if pce is not None:
        runs_as_trials.fit(runs_as_trials.experiment_path(out, "tune-pce", {"pce": pce}), {"pce": pce}, dataset,
                           {"run": "pce"}, tune.TuneConfig(num_samples=1), 1, log)
    search = {"search": base}
    at_once = max_concurrent or runs_as_trials.runs_that_fit([base])
    log(f"{trials} trials, at most {at_once} at once")
    # rungs by the trainer's epoch, not Tune's iteration count: a trial started again
    # continues its run from last.pt (experiments/trials.py) and its iterations restart
    # at 1; max_t past the last epoch, so that the last epoch is not a stop
    scheduler = ASHAScheduler(time_attr="epoch", max_t=base.epochs + 1, grace_period=grace_period,
                              reduction_factor=2)
    with open(space_path) as f:  # the same space and budget find the same experiment
        path = runs_as_trials.experiment_path(out, f"tune-{base.method}", search, [f.read(), trials, grace_period])
    results = runs_as_trials.fit(
        path, search, dataset, {"run": "search", **sampled},
        # the generator bounds the trials at once itself: Tune ignores max_concurrent_trials beside it
        tune.TuneConfig(metric="val_miou", mode="max", num_samples=trials, scheduler=scheduler,
                        search_alg=BasicVariantGenerator(max_concurrent=at_once, random_state=base.seed)),
        trials, log, per_trial_folders=True)
    rows = write_table(out, results, list(sampled))
    best = results.get_best_result(metric="val_miou", mode="max", scope="last")
    cfg = from_dict(TrainConfig, to_dict(base))
    for key in sampled:
        set_option(cfg, key, best.config[key])
    best_toml = {k: v for k, v in to_dict(cfg).items() if k not in ("out", "resume")}
    storage.write_bytes(storage.join(out, "best.toml"), (
        f"# best of {len(rows)} trials of {space_path}: val mIoU {best.metrics['val_miou']:.4f}\n"
        + dumps(best_toml)).encode())
    log(f"best: val mIoU {best.metrics['val_miou']:.4f} with "
        f"{', '.join(f'{k} = {best.config[k]:.4g}' if isinstance(best.config[k], float) else f'{k} = {best.config[k]}' for k in sampled)}"
        f" -> {storage.join(out, 'best.toml')}")
    return {"val_miou": best.metrics["val_miou"], "config": best_toml}


def write_table(out: str, results, keys: list[str]) -> list[dict]:
    """OUT/trials.csv and OUT/trials.md: every trial, best first."""
    from experiments.trials import summary_of

    rows = []
    for r in results:
        m = r.metrics
        done = "summary" in m
        rows.append({"trial": m.get("trial_id"), **{k: r.config[k] for k in keys}, "val_miou": m.get("val_miou"),
                     "epochs": summary_of(r)["epochs"] if done else m.get("epoch"), "stopped_early": not done,
                     "wall_s": m["wall_s"] if done else m.get("time_total_s")})
    rows.sort(key=lambda row: -(row["val_miou"] if row["val_miou"] is not None else -1))
    columns = ["trial", *keys, "val_miou", "epochs", "stopped_early", "wall_s"]
    storage.write_csv(storage.join(out, "trials.csv"), columns, ([row[c] for c in columns] for row in rows))
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |"
              for row in rows]
    storage.write_bytes(storage.join(out, "trials.md"), (
        "# Hyper-parameter search: every trial, best val mIoU first\n\n"
        "`stopped_early`: ASHA stopped the trial after `epochs` epochs (its val mIoU then).\n\n"
        + "\n".join(lines) + "\n").encode())
    return rows
