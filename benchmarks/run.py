"""All benchmarks in one run: solver speed, epoch times, solver scaling, shard sizes.

    python benchmarks/run.py [--quick] [--only PART[,PART…]] [--out DIR]

Parts (run in this order; `--only` picks some):

- `sizes`: bytes per image of a snapshot row and of a proposal row for a VOC-sized
  image (375×500, 21 classes, 3 present), written through shared.shard_store.ShardStore.
- `solver`: benchmarks/solver.py's measure(): one 375×500, 3-label problem, cold and
  warm-started, and the raw pyGCO call on the same integer energy.
- `epochs`: real training through trainer.driver.run_train on the cached synthetic set:
  PCE from scratch, then Grid-TR (`--schedule sync` and `overlapped`) from the PCE
  checkpoint, the trainer on one CPU (one thread) and one solver actor on the other.
  Epoch time = (stage_b_s + stall_s + snapshot_s summed over the run's epochs, from
  its metrics.jsonl) / epochs: the trainer's time per epoch without Ray Train's fixed
  start/stop cost and without the validation pass. wall_s is reported beside it.
- `requests`: storage requests per image per stage-A round with the shards on S3: a
  Grid-TR run (the synthetic set, 64 images in parts of 8, two rounds, `--shards
  s3://…`) against moto's S3 server on 127.0.0.1, which counts every request it
  answers from every process of the run (benchmarks/s3_counter.py): reads (GET, HEAD),
  writes (PUT, POST, DELETE) and listings. `storage_requests_per_image_round` = all of
  them ÷ (training images × rounds), the run's fixed costs included.
- `scaling`: the solver farm (solve_round, Ray Data ActorPoolStrategy) on one snapshot
  round of 375×500 images with 1 and then 2 actors, on a fresh Ray each. Throughput
  counts the solving window only: from the earliest part start (arrival of its result
  in the driver minus the seconds the actor reports for it) to the last arrival, so
  actor start-up and Ray Data's set-up are excluded; the end-to-end figures are
  reported too.

Progress goes to stderr; the last line of stdout is one JSON object with every figure.
"""
from __future__ import annotations

import os

# Before ray is first imported: every Ray process then binds to 127.0.0.1 only.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from shared import shards  # noqa: E402
from shared.shard_store import ShardStore, parts_of  # noqa: E402
from trainer.run_folder import RunFolder  # noqa: E402

PARTS = ("sizes", "solver", "epochs", "requests", "scaling")

# VOC-sized shard rows (SPEC §6)
VOC_H, VOC_W, VOC_K, VOC_PRESENT = 375, 500, 21, 3
STRIDE = 4  # the network's output stride
SHARD_IMAGES = 8  # images per shard file: parquet has a fixed cost per file

AUTHORS_SOLVER_MS = 404.0  # the authors' C++ α-expansion per 375×500 image on this kind of machine (issue 8)

TARGETS = {
    "solver_vs_raw_gco": ("<=", 1.15),
    "solver_vs_authors": ("<=", 0.5),
    "tr_vs_pce": ("<=", 1.10),
    "stall_fraction": ("<=", 0.05),
    "solver_scaling_2": (">=", 0.85),
    "snapshot_bytes_per_image": ("<=", 100_000),
    "proposal_bytes_per_image": ("<=", 20_000),
    "storage_requests_per_image_round": ("<=", 3.0),
}
# credentials for moto, set before Ray starts so that its workers inherit them
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _load_solver_bench():
    spec = importlib.util.spec_from_file_location("trseg_bench_solver", os.path.join(HERE, "solver.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------- sizes


def _smooth(field: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of the last two axes (periodic, through the FFT)."""
    h, w = field.shape[-2:]
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    kernel = np.exp(-2 * (np.pi * sigma) ** 2 * (fy**2 + fx**2))
    return np.real(np.fft.ifft2(np.fft.fft2(field) * kernel))


def voc_label_map(rng: np.random.Generator, h: int = VOC_H, w: int = VOC_W, present: int = VOC_PRESENT) -> tuple[np.ndarray, np.ndarray]:
    """A piecewise-constant label map like a proposal: background and a few blobs.

    Objects of `present − 1` classes drawn from 1..K−1 are smooth random blobs
    (thresholded smoothed noise: irregular outlines, a few components each).
    Returns (labels H×W uint8, the present classes).
    """
    classes = np.concatenate([[0], np.sort(rng.choice(np.arange(1, VOC_K), present - 1, replace=False))]).astype(np.uint8)
    labels = np.zeros((h, w), np.uint8)
    for c in classes[1:]:
        field = _smooth(rng.normal(size=(h, w)), 25.0)
        mask = field > np.quantile(field, 0.8)
        labels[mask] = c
    return labels, classes


def voc_snapshot(rng: np.random.Generator, labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """−log q over the label set at stride 4, as trainer/stage_a.py writes it.

    The probabilities look like a trained network's: 21-class logits that favour each
    pixel's class by a margin of about 8, blurred (soft boundaries a few output pixels
    wide) plus a smooth per-class noise field, softmaxed, clamped at 20, float16.
    """
    h, w = -(-labels.shape[0] // STRIDE), -(-labels.shape[1] // STRIDE)
    small = labels[::STRIDE, ::STRIDE][:h, :w]
    onehot = (small[None] == np.arange(VOC_K)[:, None, None]).astype(np.float64)
    noise = _smooth(rng.normal(size=(VOC_K, h, w)), 4.0)
    logits = 8.0 * _smooth(onehot, 2.0) + 1.5 * noise / noise.std()
    logits -= logits.max(0, keepdims=True)
    log_q = logits - np.log(np.exp(logits).sum(0, keepdims=True))
    neg_log_q = np.minimum(-log_q, 20.0)  # trainer.stage_a.NEG_LOG_Q_MAX
    return neg_log_q[classes].astype(np.float16)


def measure_sizes(n_images: int = SHARD_IMAGES, seed: int = 0, workdir: str | None = None) -> dict:
    """Bytes per image of snapshot and proposal parquet shards of `n_images` VOC rows."""
    rng = np.random.default_rng(seed)
    snaps, props = [], []
    for i in range(n_images):
        labels, classes = voc_label_map(rng)
        neg_log_q = voc_snapshot(rng, labels, classes)
        image_id = f"2007_{i:06d}"
        snaps.append(shards.Snapshot(
            image_id=image_id, round=3, image_uri=f"/data/VOC2012/JPEGImages/{image_id}.jpg",
            seeds_uri=f"/data/VOC2012/pascal_2012_scribble/{image_id}.png", height=VOC_H, width=VOC_W,
            num_classes=VOC_K, label_set=classes, neg_log_q=neg_log_q,
        ))
        props.append(shards.Proposal(
            image_id=image_id, round=3, labels=labels, energy=12345.678, unary_energy=2345.6,
            smooth_energy=10000.078, iterations=2, seconds=0.2, warm_start=True, solver="10.0.0.12:41234",
        ))
    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="trseg-sizes-")
    try:
        store = ShardStore(workdir)
        snap, prop = store.part("snapshots", 3, 0), store.part("proposals", 3, 0)
        store.write_snapshots(3, 0, snaps)
        store.write_proposals(3, 0, props)
        # the shards must read back as the contract says
        assert len(snap.read_snapshots()[0]) == n_images and len(prop.read_proposals()) == n_images
        snap_bytes, prop_bytes = os.path.getsize(snap.uri), os.path.getsize(prop.uri)
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    return {
        "snapshot_bytes_per_image": round(snap_bytes / n_images),
        "proposal_bytes_per_image": round(prop_bytes / n_images),
        "snapshot_raw_bytes_per_image": int(snaps[0].neg_log_q.nbytes),
        "proposal_raw_bytes_per_image": int(props[0].labels.nbytes),
        "shard_images": n_images,
        "snapshot_shape": list(snaps[0].neg_log_q.shape),
    }


# ---------------------------------------------------------------------------- epochs


def _epoch_stats(out: str) -> dict:
    with open(RunFolder(out).metrics) as f:
        records = [json.loads(line) for line in f if line.strip()]
    stage_b = sum(r.get("stage_b_s", 0.0) for r in records)
    stall = sum(r.get("stall_s", 0.0) for r in records)
    snapshot = sum(r.get("snapshot_s", 0.0) for r in records)
    n = len(records)
    return {
        "epochs": n,
        "epoch_s": (stage_b + stall + snapshot) / n,
        "stage_b_s": stage_b,
        "stall_s": stall,
        "snapshot_s": snapshot,
        "stage_b_epoch_s": stage_b / n,
    }


def measure_epochs(quick: bool, workdir: str, per_round: int = 2) -> dict:
    from trainer.config import TrainConfig
    from experiments.default_job import synthetic_dataset
    from trainer.driver import run_train

    n_train, n_val, size = 64, 32, 96  # the default job's full synthetic set
    pce_epochs = 4 if quick else 8
    tr_epochs = 2 * per_round if quick else max(10, 2 * per_round)  # at least two stage-A rounds
    log(f"epochs: synthetic set {n_train}/{n_val} images of {size}×{size}")
    data = synthetic_dataset(n_train, n_val, size)
    common = dict(data=data, format="synthetic", epochs_per_round=per_round, solvers="1", num_workers=1,
                  use_gpu=False, eval_every=10**6)  # evaluate only after the last epoch
    runs = {}

    def one(name: str, **kw):
        out = os.path.join(workdir, name)
        log(f"epochs: {name} ({kw.get('epochs')} epochs)")
        t0 = time.perf_counter()
        summary = run_train(TrainConfig(**common, out=out, **kw), "synthetic")
        stats = _epoch_stats(out)
        stats.update(wall_s=summary["wall_s"], trainer_stall_s=summary["trainer_stall_s"], val_miou=summary["val_miou"],
                     stage_a_images=summary["stage_a_images"], proposals_missing=summary["proposals_missing"])
        runs[name] = stats
        log(f"epochs: {name}: {stats['epoch_s']:.2f} s/epoch (stage B {stats['stage_b_s']:.1f} s, stall "
            f"{stats['stall_s']:.1f} s, snapshots {stats['snapshot_s']:.1f} s), wall {time.perf_counter() - t0:.1f} s")
        return out

    pce_out = one("pce", method="pce", epochs=pce_epochs)
    init = RunFolder(pce_out).last
    one("tr-sync", method="grid-tr", epochs=tr_epochs, init=init, schedule="sync")
    one("tr-overlapped", method="grid-tr", epochs=tr_epochs, init=init, schedule="overlapped")
    pce, sync, ovl = runs["pce"], runs["tr-sync"], runs["tr-overlapped"]
    ovl_time = ovl["epoch_s"] * ovl["epochs"]
    return {
        "pce_epoch_s": round(pce["epoch_s"], 3),
        "tr_sync_epoch_s": round(sync["epoch_s"], 3),
        "tr_overlapped_epoch_s": round(ovl["epoch_s"], 3),
        "tr_vs_pce": round(ovl["epoch_s"] / pce["epoch_s"], 3),
        "tr_sync_vs_pce": round(sync["epoch_s"] / pce["epoch_s"], 3),
        # where the overlapped run's epoch goes: stage B, stall, snapshot (all per epoch)
        "tr_overlapped_stage_b_epoch_s": round(ovl["stage_b_s"] / ovl["epochs"], 3),
        "tr_overlapped_snapshot_epoch_s": round(ovl["snapshot_s"] / ovl["epochs"], 3),
        "tr_overlapped_stall_epoch_s": round(ovl["stall_s"] / ovl["epochs"], 3),
        "stall_fraction": round(ovl["stall_s"] / ovl_time, 4) if ovl_time > 0 else 0.0,
        "stall_fraction_of_wall": round(ovl["trainer_stall_s"] / ovl["wall_s"], 4),
        "pce_wall_s": round(pce["wall_s"], 1),
        "tr_sync_wall_s": round(sync["wall_s"], 1),
        "tr_overlapped_wall_s": round(ovl["wall_s"], 1),
        "epoch_runs": {k: {kk: (round(v, 3) if isinstance(v, float) else v) for kk, v in r.items()} for k, r in runs.items()},
        "epoch_setup": {"train_images": n_train, "size": size, "crop_size": 64, "batch_size": 8,
                        "epochs_per_round": per_round, "pce_epochs": pce_epochs, "tr_epochs": tr_epochs,
                        "trainer_cpus": 1, "solver_actors": 1},
    }


# ---------------------------------------------------------------------------- requests


def measure_requests(workdir: str, per_round: int = 2, rounds: int = 2) -> dict:
    from benchmarks.s3_counter import local_s3
    from trainer.config import TrainConfig
    from experiments.default_job import synthetic_dataset
    from trainer.driver import run_train

    n_train, n_val, size = 64, 32, 96
    data = synthetic_dataset(n_train, n_val, size)
    with local_s3("trseg-bench") as (endpoint, counts):
        shards_uri = f"s3://trseg-bench/shards?endpoint_override={endpoint}&scheme=http&region=us-east-1"
        before = counts()
        log(f"requests: Grid-TR, {rounds} rounds of {n_train} images, shards on {shards_uri}")
        cfg = TrainConfig(
            data=data, format="synthetic", method="grid-tr", pretrain_epochs=0, epochs=rounds * per_round,
            epochs_per_round=per_round, solvers="1", num_workers=1, use_gpu=False, eval_every=10**6,
            shards=shards_uri, out=os.path.join(workdir, "requests"))
        summary = run_train(cfg, "synthetic")
        after = counts()
    assert summary["proposals_missing"] == 0, summary
    made = {k: after[k] - before[k] for k in ("read", "write", "list")}
    total = sum(made.values())
    per = n_train * rounds
    log(f"requests: {made} in {summary['wall_s']:.0f} s: {total / per:.2f} per image per round")
    return {
        "storage_requests_per_image_round": round(total / per, 3),
        "storage_requests": {**made, "images": n_train, "rounds": rounds, "parts_per_round": -(-n_train // cfg.shard_size),
                             "wall_s": round(summary["wall_s"], 1),
                             "by_request": {k: v - before["by_request"].get(k, 0)
                                            for k, v in after["by_request"].items() if v > before["by_request"].get(k, 0)}},
    }


# ---------------------------------------------------------------------------- scaling


def _write_scaling_round(base: str, n_images: int, per_part: int) -> None:
    """Snapshot round 0 of `n_images` 375×500, 3-label problems (benchmarks/solver.py's)."""
    from PIL import Image

    bench = _load_solver_bench()
    files = os.path.join(base, "files")
    os.makedirs(files, exist_ok=True)
    rows = []
    for i in range(n_images):
        image, probs, seeds = bench.make_problem(seed=i)
        image_uri, seeds_uri = os.path.join(files, f"img{i:03d}.png"), os.path.join(files, f"seeds{i:03d}.png")
        Image.fromarray(image).save(image_uri)
        Image.fromarray(seeds).save(seeds_uri)
        neg_log_q = np.minimum(-np.log(np.maximum(probs, 1e-30)), 20.0).astype(np.float16)
        rows.append(shards.Snapshot(
            image_id=f"img{i:03d}", round=0, image_uri=image_uri, seeds_uri=seeds_uri, height=image.shape[0],
            width=image.shape[1], num_classes=probs.shape[0], label_set=np.arange(probs.shape[0], dtype=np.uint8),
            neg_log_q=neg_log_q,
        ))
    for k, part in enumerate(parts_of(n_images, per_part)):
        ShardStore(base).write_snapshots(0, k, rows[part.start:part.stop])


def _timed_round(base: str, actors: int) -> dict:
    """The farm's solve_parts on snapshot round 0 with `actors` actors; times every result's arrival."""
    from shared.config import SolverConfig
    from solver_service import farm

    shutil.rmtree(os.path.join(base, "proposals"), ignore_errors=True)
    store = ShardStore(base)
    jobs = store.jobs(0, store.unsolved(0))
    t0 = time.perf_counter()
    arrivals, rows = [], []
    for row in farm.solve_parts(jobs, SolverConfig(), farm.Pool(solvers=(actors, actors))):
        arrivals.append(time.perf_counter() - t0)
        rows.append(row)
    total = time.perf_counter() - t0
    assert not store.unsolved(0), "solve_parts left parts unsolved"
    images = sum(int(r["images"]) for r in rows)
    starts = [a - float(r["seconds"]) for a, r in zip(arrivals, rows)]
    window = max(arrivals) - max(0.0, min(starts))
    return {
        "actors": actors,
        "solvers_seen": len({r["solver"] for r in rows}),
        "images": images,
        "end_to_end_s": round(total, 2),
        "window_s": round(window, 2),
        "first_start_s": round(min(starts), 2),
        "images_per_s": round(images / window, 3),
        "images_per_s_end_to_end": round(images / total, 3),
        "solve_s_per_image": round(sum(float(r["seconds"]) for r in rows) / images, 3),
    }


def measure_scaling(quick: bool, workdir: str) -> dict:
    import ray

    from shared.ray_session import connect

    n_images, per_part = (16, 2) if quick else (32, 2)
    base = os.path.join(workdir, "scaling")
    log(f"scaling: writing a snapshot round of {n_images} images 375×500 ({per_part} per part)")
    _write_scaling_round(base, n_images, per_part)
    runs = {}
    for actors in (1, 2):
        if ray.is_initialized():
            ray.shutdown()
        connect(None)  # a fresh private Ray on 127.0.0.1
        log(f"scaling: {actors} actor(s)")
        runs[actors] = _timed_round(base, actors)
        log(f"scaling: {actors} actor(s): {runs[actors]}")
        ray.shutdown()
    one, two = runs[1]["images_per_s"], runs[2]["images_per_s"]
    return {
        "solver_scaling_2": round(two / (2 * one), 3),
        "solver_scaling_2_end_to_end": round(runs[2]["images_per_s_end_to_end"] / (2 * runs[1]["images_per_s_end_to_end"]), 3),
        # seconds one image takes inside an actor, 2 actors ÷ 1: 1.0 when each actor has its own core
        "solver_contention_2": round(runs[2]["solve_s_per_image"] / runs[1]["solve_s_per_image"], 3),
        "scaling_runs": {str(k): v for k, v in runs.items()},
    }


# ---------------------------------------------------------------------------- main


def check_targets(result: dict) -> dict:
    """Which targets each present figure meets: {key: true|false}."""
    met = {}
    for key, (op, bound) in TARGETS.items():
        if key in result:
            met[key] = bool(result[key] <= bound if op == "<=" else result[key] >= bound)
    return met


def machine(load_before: float | None = None) -> dict:
    import torch

    return {
        "cpus": os.cpu_count(),
        "load_avg_1m_start": load_before,
        "load_avg_1m_end": round(os.getloadavg()[0], 2),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def run(parts=PARTS, quick: bool = False, out: str | None = None, repeats: int | None = None, epochs_per_round: int = 2) -> dict:
    t_start = time.perf_counter()
    load_before = round(os.getloadavg()[0], 2)  # a busy machine makes every timing here noisy
    workdir = out or tempfile.mkdtemp(prefix="trseg-bench-")
    if "requests" in parts:
        os.environ.update(S3_ENV)
    os.makedirs(workdir, exist_ok=True)
    result: dict = {"quick": quick}
    try:
        # Ray workers' output (log_to_driver) goes to the driver's stdout: keep stdout for the JSON.
        with contextlib.redirect_stdout(sys.stderr):
            if "sizes" in parts:
                log("sizes: VOC-sized snapshot and proposal shards")
                result.update(measure_sizes(workdir=os.path.join(workdir, "sizes")))
                log(f"sizes: snapshot {result['snapshot_bytes_per_image']} B/image, proposal {result['proposal_bytes_per_image']} B/image")
            if "solver" in parts:
                log("solver: benchmarks/solver.py measure()")
                s = _load_solver_bench().measure(repeats or (3 if quick else 5))
                result.update({k: s[k] for k in ("solver_ms_per_image", "solver_cold_ms", "solver_warm_ms", "raw_gco_ms", "solver_vs_raw_gco")})
                result["solver_vs_authors"] = round(s["solver_ms_per_image"] / AUTHORS_SOLVER_MS, 3)
                result["solver_detail"] = {k: v for k, v in s.items() if k not in result}
                log(f"solver: {s['solver_ms_per_image']} ms/image (cold {s['solver_cold_ms']}, raw GCO {s['raw_gco_ms']})")
            if "epochs" in parts or "requests" in parts or "scaling" in parts:
                from shared.ray_session import connect

                connect(None)
            if "epochs" in parts:
                result.update(measure_epochs(quick, os.path.join(workdir, "epochs"), epochs_per_round))
            if "requests" in parts:
                result.update(measure_requests(workdir, epochs_per_round))
            if "scaling" in parts:
                result.update(measure_scaling(quick, workdir))
            import ray

            if ray.is_initialized():
                ray.shutdown()
    finally:
        if out is None:
            shutil.rmtree(workdir, ignore_errors=True)
    result["targets_met"] = check_targets(result)
    result["machine"] = machine(load_before)
    result["runtime_s"] = round(time.perf_counter() - t_start, 1)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="The last line of stdout is the JSON.")
    ap.add_argument("--quick", action="store_true", help="fewer epochs and images (at most 15 minutes on 2 cores)")
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts to run, of {','.join(PARTS)} [all]")
    ap.add_argument("--out", default=None, help="keep the runs and shards in DIR (default: a temporary folder, deleted)")
    ap.add_argument("--repeats", type=int, default=None, help="repeats of the solver timing [3 quick, 5 full]")
    ap.add_argument("--epochs-per-round", type=int, default=2, help="M, Grid-TR epochs per stage-A round [2]")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"--only: unknown part(s) {bad}; choose from {list(PARTS)}")
    if args.epochs_per_round < 1:
        ap.error("--epochs-per-round: must be ≥ 1")
    result = run(parts, quick=args.quick, out=args.out, repeats=args.repeats, epochs_per_round=args.epochs_per_round)
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
