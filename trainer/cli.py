"""The command line (SPEC §8). Every train option maps onto a field of TrainConfig."""
from __future__ import annotations

import json
import os
import sys
import traceback

import click

from shared import storage
from shared.errors import UserError, user_cause
from shared.labels import SCRIBBLE_LENGTHS, check_scribbles, length_name
from trainer.architectures import ARCHITECTURES
from trainer.splits import check_data_folder
from trainer.imagenet import backbone_weights_path
from trainer.config import (AUGMENTATIONS, EPS_MODELS, OPTIMIZERS, PRECISIONS, SCHEDULES, SEED_LOSSES, config_toml,
                            resolve_train_config)
from trainer.formats import LAYOUTS
from trainer.methods import METHODS
from trainer.presets import PRESETS


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--local", "local", is_flag=True, help="Start a private Ray bound to 127.0.0.1 (the default).")
@click.option("--address", default=None, help="Join a running Ray cluster (e.g. 'auto').")
@click.option("--out", default=None, help="Run folder of the default job [runs/<timestamp>].")
@click.option("--quick", is_flag=True, help="A reduced default job, for tests and CI.")
@click.option("--overwrite", is_flag=True, help="Replace the default job's earlier outputs in --out.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Training seed of the default job's cells (the data set stays the same).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.pass_context
def cli(ctx, local, address, out, quick, overwrite, seed, debug):
    """Trust-region training of segmentation networks with graph-cut solvers.

    With no command: the default job on the built-in synthetic data set (PCE-GD,
    then Grid-TR with solver actors), printing a comparison.
    """
    if local and address:
        raise UserError("--local and --address: give one of them")
    if not address:
        # Ray reads this when it is first imported: every Ray process then binds to
        # 127.0.0.1 only. Nothing has imported ray yet (the commands import it lazily).
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        # Token authentication is Ray's default for a new local cluster; said explicitly,
        # Ray keeps it and skips its warning about the default. A user's setting wins.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    ctx.obj = {"address": address}
    if ctx.invoked_subcommand is None:
        from experiments.default_job import check_out, run_default_job
        from shared.ray_session import connect

        out = check_out(out, overwrite)  # before Ray's start-up: a refused --out fails at once
        connect(address)
        run_default_job(out, quick=quick, overwrite=overwrite, seed=seed)


SCRIBBLES_HELP = f"Scribble length: 1 (full, also ''), {', '.join(SCRIBBLE_LENGTHS[-2:0:-1])}, 0 (clicks)."


def _scribbles(ctx, param, value):
    """Every command takes the same spellings of a scribble length (shared.labels)."""
    return None if value is None else check_scribbles(value)


PLAN_HELP = ("Resolve every run as it would train, write each config.toml into its folder under --out, print "
             "the plan and exit without training.")
WEIGHTS_HELP = ("ImageNet weights of the backbone: 'imagenet' (torchvision's mobilenet_v2 file, through torch's "
                "hub cache) or a torchvision mobilenet_v2 state_dict file.")


def _train_options(f):
    options = [
        click.option("--config", "config_file", default=None, help="TOML file with any of these options (flags override it)."),
        click.option("--data", default=None, help="Data set root."),
        click.option("--format", type=click.Choice(list(LAYOUTS)), default=None),
        click.option("--scribbles", default=None, callback=_scribbles, help=SCRIBBLES_HELP),
        click.option("--method", type=click.Choice(list(METHODS)), default=None),
        click.option("--epochs", type=int, default=None),
        click.option("--pretrain-epochs", type=int, default=None, help="PCE epochs first when there is no --init."),
        click.option("--pretrain-lr", type=float, default=None, help="Base LR of those PCE epochs [3e-3]."),
        click.option("--augmentation", type=click.Choice(AUGMENTATIONS), default=None,
                     help="Training crops: default (scale, crop, flip), reference (the authors' VOC recipe, SPEC §4), crop (crop only) [crop on --format synthetic, else default]."),
        click.option("--eps-model", type=click.Choice(EPS_MODELS), default=None,
                     help="Outlier model of the robust loss: ε fixed, learned, or learned per class [const]."),
        click.option("--batch-average/--no-batch-average", "batch_average", default=None,
                     help="Divide the data terms by the batch size, as the authors' code (SPEC §2) [off]."),
        click.option("--arch", type=click.Choice(list(ARCHITECTURES)), default=None,
                     help="Network [--init's; else the paper's with --backbone-weights; else unet]."),
        click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=None, help="sgd (the paper's) or adamw [adamw]."),
        click.option("--batch-size", type=int, default=None, help="Global batch, split over --workers."),
        click.option("--lr", type=float, default=None, help="Peak learning rate of the method's epochs, poly decay (DeepLab's decoder: 10×) "
                     "[3e-3; 3e-4 when they fine-tune: --init, or after PCE pretraining]."),
        click.option("--crop-size", type=int, default=None),
        click.option("--max-image-pixels", type=int, default=None, help="Refuse larger images [4096²]."),
        click.option("--init", default=None, help="Checkpoint to start from."),
        click.option("--backbone-weights", default=None, help=WEIGHTS_HELP),
        click.option("--out", default=None),
        click.option("--seed", type=int, default=None),
        click.option("--eps", type=float, default=None, help="Robust-loss outlier probability ε (SPEC §2)."),
        click.option("--nu", type=float, default=None, help="Regulariser weight of grid-gd/dense-gd."),
        click.option("--seed-loss", type=click.Choice(SEED_LOSSES), default=None,
                     help="Grid-GD's seed term: ce, the paper's eq. 8 (Table 1), or l2, the authors' script's [ce]."),
        click.option("--epochs-per-round", type=int, default=None, help="M: stage-B epochs per stage-A round."),
        click.option("--schedule", type=click.Choice(SCHEDULES), default=None),
        click.option("--max-staleness", type=int, default=None),
        click.option("--max-stall", type=float, default=None,
                     help="End the run after this many seconds without a new proposal [1800]."),
        click.option("--solver-wait", type=float, default=None,
                     help="End the run if no solver actor, or not every trainer worker, can be placed within this many seconds [600]."),
        click.option("--solver-retries", type=int, default=None,
                     help="Solver kills on one round's parts before the run ends [3]."),
        click.option("--storage-patience", type=float, default=None,
                     help="Seconds stage A waits out failing storage (an S3 outage) before the run ends [300]."),
        click.option("--solvers", default=None, help="Solver actors: N or MIN:MAX."),
        click.option("--solver-resource", default=None, help="Custom resource that solver nodes advertise."),
        click.option("--shards", default=None, help="Shard base URI (local path, s3://, gs://, hdfs://)."),
        click.option("--shared-fs", "shared_fs", is_flag=True, default=None,
                     help="With --address: local --out and --shards paths are on a filesystem every node mounts."),
        click.option("--shard-size", type=int, default=None),
        click.option("--workers", "num_workers", type=int, default=None, help="Trainer workers (DDP ranks)."),
        click.option("--trainer-resource", default=None, help="Custom resource that trainer nodes advertise."),
        click.option("--max-failures", type=int, default=None,
                     help="Trainer-worker losses recovered from the last checkpoint before the run ends [3]."),
        click.option("--loader-workers", type=int, default=None,
                     help="Data-loading processes per trainer worker, one CPU each [0 on CPU; on GPU what the GPU nodes' CPUs allow, at most 8]."),
        click.option("--sync-bn", "sync_bn", is_flag=True, default=None,
                     help="Synchronise batch-norm statistics across trainer workers (GPU)."),
        click.option("--gpu/--no-gpu", "use_gpu", default=None,
                     help="Trainer workers on GPUs [on a private Ray: this machine's; with --address: GPU if the cluster has one now, else give one of them]."),
        click.option("--deterministic", "deterministic", is_flag=True, default=None,
                     help="Deterministic torch kernels, so that a GPU run repeats itself (slower)."),
        click.option("--precision", type=click.Choice(PRECISIONS), default=None,
                     help="auto: bf16 autocast on GPUs that run it natively (Ampere on); fp32: float32 throughout, as the reference trains [auto; --preset paper: fp32]."),
        click.option("--eval-every", type=int, default=None),
        click.option("--tr-weight", type=float, default=None, help="λ of stage A."),
        click.option("--potts-weight", type=float, default=None, help="β of stage A."),
        click.option("--max-iter", type=int, default=None),
        click.option("--algorithm", type=click.Choice(["expansion", "swap"]), default=None),
        click.option("--resume", "resume_dir", default=None, help="Continue the run in this folder."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@cli.command()
@_train_options
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None,
              help="Settings per scribble length (paper: VOC, SPEC §4); --config and flags override it.")
@click.option("--overwrite", is_flag=True, help="Clear another run's outputs from --out first.")
@click.option("--print-config", is_flag=True,
              help="Print the resolved configuration as TOML (what config.toml would hold) and exit.")
@click.pass_context
def train(ctx, **params):
    """Train one method on one data set."""
    from shared.ray_session import connect
    from trainer.driver import check_inputs, run_train
    overwrite, print_config = params.pop("overwrite"), params.pop("print_config")
    cfg = resolve_train_config(params)
    if print_config:
        click.echo(config_toml(cfg), nl=False)
        return
    check_inputs(cfg, overwrite)  # before Ray starts: bad input fails in a second
    connect(ctx.obj["address"])
    summary = run_train(cfg, overwrite=overwrite)
    click.echo(json.dumps({k: summary[k] for k in ("method", "val_miou", "wall_s", "trainer_stall_s", "proposals_missing")}))


@cli.command("eval")
@click.option("--checkpoint", required=True)
@click.option("--data", required=True)
@click.option("--format", type=click.Choice(list(LAYOUTS)), default="synthetic")
@click.option("--scribbles", default="1", callback=_scribbles, help=SCRIBBLES_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last line.")
def eval_cmd(checkpoint, data, format, scribbles, as_json):
    """mIoU, per-class IoU and trimap accuracy of a checkpoint on the val split."""
    from trainer.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(checkpoint, data, format, scribbles)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"val mIoU {100 * result['val_miou']:.2f}")
    for name, iou in zip(result["class_names"], result["per_class_iou"]):
        click.echo(f"  {name:<16} {'—' if iou is None else f'{100 * iou:.2f}'}")
    click.echo("trimap mIoU by band width: " + ", ".join(f"{w}px {100 * v:.1f}" for w, v in result["trimap"].items()))


@cli.command()
@click.option("--checkpoint", required=True)
@click.argument("images", nargs=-1, required=True)
@click.option("--out", required=True)
def predict(checkpoint, images, out):
    """Write one palette label PNG per image, at the image's size."""
    from trainer.evaluate import predict_files

    for path in predict_files(checkpoint, images, out):
        click.echo(path)


@cli.command("make-synthetic")
@click.option("--out", required=True)
@click.option("--n-train", type=int, default=64)
@click.option("--n-val", type=int, default=32)
@click.option("--size", type=int, default=96)
@click.option("--classes", type=int, default=4)
@click.option("--seed", type=int, default=0)
@click.option("--variant", type=click.Choice(["default", "hard"]), default="default",
              help="hard: weak object boundaries, strong edges that are not boundaries, small objects.")
@click.option("--layout", type=click.Choice(["folder", "voc"]), default="folder",
              help="voc: VOC's folders, its 21 classes and VOC-like shapes with long side --size (--classes unused).")
def make_synthetic_cmd(out, n_train, n_val, size, classes, seed, variant, layout):
    """Generate the synthetic data set (every scribble length)."""
    from trainer.synthetic import make_synthetic

    make_synthetic(out, n_train=n_train, n_val=n_val, size=size, classes=classes, seed=seed, variant=variant,
                   layout=layout)
    click.echo(out)


@cli.command("shorten-scribbles")
@click.option("--src", required=True, help="Folder of full-length scribble PNGs.")
@click.option("--out", required=True)
@click.option("--ratio", type=float, required=True, help="Kept central fraction r (0 = clicks).")
def shorten_scribbles_cmd(src, out, ratio):
    """Shortened scribbles (SPEC §5) from full ones."""
    from trainer.scribbles import shorten_folder

    if not 0 <= ratio <= 1:
        raise UserError(f"--ratio: must be in [0, 1], got {ratio}")
    shorten_folder(src, out, ratio)
    click.echo(out)


@cli.command("convert-scribblesup")
@click.option("--src", required=True, help="Folder of ScribbleSup XML annotations.")
@click.option("--out", required=True)
@click.option("--width", type=int, default=3, help="Stroke width in pixels.")
def convert_scribblesup_cmd(src, out, width):
    """ScribbleSup XML annotations to label PNGs of the voc layout."""
    from trainer.scribbles import convert_scribblesup

    convert_scribblesup(src, out, width=width)
    click.echo(out)


@cli.command("table1")
@click.option("--data", default=None, help="Data set root [the built-in synthetic set].")
@click.option("--format", type=click.Choice(list(LAYOUTS)), default="synthetic")
@click.option("--quick", is_flag=True, help="A tiny synthetic table, for tests (minutes on 2 cores).")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None, help="Settings per scribble length (paper: VOC).")
@click.option("--epochs", type=int, default=None, help="Epochs of the GD/TR cells and the PCE control, after the PCE model.")
@click.option("--pretrain-epochs", type=int, default=None, help="Epochs of the PCE cells.")
@click.option("--solvers", default=None, help="Solver actors of the Grid-TR cells: N or MIN:MAX.")
@click.option("--lengths", default=",".join(SCRIBBLE_LENGTHS), help="Scribble lengths (columns) to train.")
@click.option("--variant", type=click.Choice(["default", "hard"]), default="default",
              help="The built-in synthetic set's variant (without --data).")
@click.option("--out", required=True,
              help="Folder or s3:// URI of the table, the plots and one run folder per cell.")
@click.option("--max-concurrent", type=click.IntRange(min=1), default=None,
              help="Cells trained at once [as many as the cluster holds].")
@click.option("--shared-fs", "shared_fs", is_flag=True, default=None,
              help="With --address: --out is on a filesystem every node mounts.")
@click.option("--seed", type=int, default=None,
              help="Seed of every cell's training (initial weights, batches, crops) [0]; the data set stays the same.")
@click.option("--gpu/--no-gpu", "use_gpu", default=None,
              help="Trainer workers on GPUs [as `train`: with --address, needed when the cluster has no GPU now].")
@click.option("--backbone-weights", default=None, help=WEIGHTS_HELP + " The cells that do not start from PCE-GD's model.")
@click.option("--set", "settings", multiple=True, metavar="METHOD.KEY=VALUE",
              help="A setting of one method's cells, e.g. dense-gd.nu=1.5e-6 (a value `tune` chose); repeatable.")
@click.option("--plan", "plan_only", is_flag=True, help=PLAN_HELP)
@click.pass_context
def table1_cmd(ctx, data, format, quick, preset, epochs, pretrain_epochs, solvers, lengths, variant, out, max_concurrent,
               shared_fs, seed, use_gpu, backbone_weights, settings, plan_only):
    """Paper Table 1, Fig. 5 and Fig. 6: every method at scribble lengths 0, 0.3, 0.5, 0.8, 1.

    Each cell is a Ray Tune trial. Resumes: the same command again finishes an interrupted table."""
    from trainer.presets import check_start
    from experiments.table1 import parse_settings, run_table1

    check_data_folder(data)
    check_start(preset, backbone_weights)
    overrides = {k: v for k, v in (("epochs", epochs), ("pretrain_epochs", pretrain_epochs), ("solvers", solvers),
                                   ("shared_fs", shared_fs), ("seed", seed), ("use_gpu", use_gpu),
                                   ("backbone_weights", backbone_weights_path(backbone_weights))) if v is not None}
    columns = [length_name(x, "--lengths") for x in lengths.split(",")]
    run_table1(out, data=data, fmt=format, quick=quick, preset=preset, overrides=overrides,
               log=lambda m: click.echo(m), lengths=tuple(columns), variant=variant, max_concurrent=max_concurrent,
               plan_only=plan_only, address=ctx.obj["address"], settings=parse_settings(settings))
    if plan_only:
        return
    click.echo(storage.read_bytes(storage.join(out, "table1.csv")).decode().rstrip())


@cli.command("table1-compare")
@click.argument("run")
def table1_compare_cmd(run):
    """The paper's Table 1 beside a finished or partial table1 run (its --out), with the differences."""
    from experiments.table1 import compare

    click.echo(compare(run).rstrip())


@cli.command("table1-seeds")
@click.argument("runs", nargs=-1, required=True)
@click.option("--out", default=None, help="Also write the table to this file or URI (markdown).")
def table1_seeds_cmd(runs, out):
    """Mean and spread of Table 1 runs that differ only in --seed (their --out folders or URIs)."""
    from experiments.seeds import read_run, summarize

    text = summarize([read_run(r) for r in runs])
    if out:
        storage.write_bytes(out, text.encode())
    click.echo(text.rstrip())


@cli.command("report")
@click.argument("run_dir")
def report_cmd(run_dir):
    """What a finished or running run did (config, val mIoU, stage-A rounds, wall time),
    from its folder; writes its comparison.png and curves.png where missing."""
    from experiments.report import report

    click.echo("\n".join(report(run_dir)))


@cli.command("sweep-tr-weight")
@click.option("--data", default=None, help="Data set root [the built-in synthetic set].")
@click.option("--format", type=click.Choice(list(LAYOUTS)), default="synthetic")
@click.option("--quick", is_flag=True, help="A tiny synthetic sweep, for tests.")
@click.option("--values", default="0,0.01,0.05,0.1,0.5", help="Comma-separated λ values (0: fixed proposals).")
@click.option("--scribbles", "length", default="1", callback=_scribbles, help=SCRIBBLES_HELP)
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None)
@click.option("--potts-weight", type=float, default=None, help="β of stage A [SolverConfig's].")
@click.option("--variant", type=click.Choice(["default", "hard"]), default="default",
              help="The built-in synthetic set's variant (without --data).")
@click.option("--out", required=True)
@click.option("--max-concurrent", type=click.IntRange(min=1), default=None,
              help="λ runs trained at once [as many as the cluster holds].")
@click.option("--gpu/--no-gpu", "use_gpu", default=None,
              help="Trainer workers on GPUs [as `train`: with --address, needed when the cluster has no GPU now].")
@click.option("--backbone-weights", default=None, help=WEIGHTS_HELP + " The PCE-GD model's start.")
@click.option("--plan", "plan_only", is_flag=True, help=PLAN_HELP)
@click.pass_context
def sweep_tr_weight_cmd(ctx, data, format, quick, values, length, preset, potts_weight, variant, out, max_concurrent,
                        use_gpu, backbone_weights, plan_only):
    """Grid-TR against λ from one PCE model (paper Sec. 5.1, Fig. 7): sweep.csv, .md, .png."""
    from trainer.presets import check_start
    from experiments.sweep import parse_values, run_sweep

    lams = parse_values(values)
    check_data_folder(data)
    check_start(preset, backbone_weights)
    run_sweep(out, lams, data=data, fmt=format, quick=quick, scribbles=length, preset=preset,
              log=lambda m: click.echo(m), variant=variant, potts_weight=potts_weight, max_concurrent=max_concurrent,
              use_gpu=use_gpu, backbone_weights=backbone_weights_path(backbone_weights), plan_only=plan_only,
              address=ctx.obj["address"])
    if plan_only:
        return
    click.echo(storage.read_bytes(storage.join(out, "sweep.csv")).decode().rstrip())


@cli.command("tune")
@_train_options
@click.option("--search", "space", default=None,
              help="Search space TOML [experiments/search_spaces/METHOD.toml]; docs/experiments.md: the format.")
@click.option("--trials", type=click.IntRange(min=1), default=8, help="Configurations sampled [8].")
@click.option("--grace-period", type=click.IntRange(min=1), default=1,
              help="Epochs every trial trains before ASHA may stop it [1].")
@click.option("--max-concurrent", type=click.IntRange(min=1), default=None,
              help="Trials trained at once [as many as the cluster holds].")
@click.option("--quick", is_flag=True, help="Tiny budgets on a tiny synthetic set, for tests.")
@click.option("--plan", "plan_only", is_flag=True, help=PLAN_HELP)
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None,
              help="Settings per scribble length (paper: VOC, SPEC §4); --config, flags and the search override it.")
@click.pass_context
def tune_cmd(ctx, space, trials, grace_period, max_concurrent, quick, plan_only, **params):
    """Search configuration keys (λ, β, ε, ν, LR, …) on the val split: Ray Tune with ASHA
    on val mIoU. Writes OUT/best.toml (for train --config), OUT/trials.csv and .md."""
    from shared.ray_session import connect
    from experiments.search import prepare_search, run_search

    cfg, space, out = prepare_search(params, space, quick)  # every check before Ray starts
    if not plan_only:
        connect(ctx.obj["address"])
    run_search(cfg, space, trials, out, max_concurrent=max_concurrent, grace_period=grace_period,
               log=lambda m: click.echo(m), plan_only=plan_only)


def main(argv=None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except SystemExit:  # an exit, or Ctrl-C under Ray Train's SIGINT handler (it exits)
        _quiet_ray_teardown()
        raise
    except KeyboardInterrupt:  # Ctrl-C anywhere else: one line, not a traceback
        _quiet_ray_teardown()
        _fail("interrupted", debug, 130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except UserError as e:
        _fail(str(e), debug, 2)
    except Exception as e:  # noqa: BLE001 - the CLI boundary: one line, not a traceback
        cause = user_cause(e)
        if cause is not None:
            _fail(str(cause), debug, 2)
        _fail(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (--debug shows the traceback)", debug, 1)
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def _quiet_ray_teardown() -> None:
    """Ray's log lines from here on are not shown (errors included): after Ctrl-C the
    farm's Ray Data threads are still at work when Ray shuts down, and they log its
    teardown (a traceback of their stats thread, a Ray they cannot reach) under the one
    line that says the run was interrupted."""
    import logging

    for name in ["ray", *(n for n in logging.root.manager.loggerDict if n.startswith("ray."))]:
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)


def _fail(message: str, debug: bool, code: int) -> None:
    if debug:
        traceback.print_exc()
    click.echo(f"error: {message}", err=True)
    sys.exit(code)
