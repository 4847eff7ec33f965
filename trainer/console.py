"""What the driver's terminal shows of a training run: a header, then each epoch as
rank 0 records it in OUT/metrics.jsonl, without Ray's worker prefix.

The driver reads the records back from the run folder (the file rank 0 rewrites after
every epoch), so the lines come from the driver's own process wherever the trainer
runs. On a terminal they drive one progress bar per run (epochs, last val mIoU, stage-A
round); elsewhere (CI, a file) they are printed as plain lines.
"""
from __future__ import annotations

import json
import sys
import threading

from tqdm import tqdm

from shared import storage
from trainer.run_folder import RunFolder

POLL_S = 1.0  # a local run folder: one small read a second
POLL_REMOTE_S = 5.0  # an object store: one GET per 5 s


def progress_line(record: dict, epoch: int, total: int) -> str:
    """One epoch's line: loss, val mIoU, and the stage-A figures of a Grid-TR epoch."""
    parts = [f"epoch {epoch}/{total} [{record['phase']}]", f"loss {record['loss']:.4f}"]
    if "val_miou" in record:
        parts.append(f"val mIoU {100 * record['val_miou']:.1f}")
    if "round" in record:
        parts.append(f"round {record['round']} stall {record['stall_s']:.1f}s staleness {record['mean_staleness']:.2f}")
    if "proposal_changed" in record:
        parts.append(f"proposals: {100 * record['proposal_changed']:.1f}% changed from the network")
    if "proposal_miou" in record:
        parts.append(f"mIoU vs masks {100 * record['proposal_miou']:.1f}")
    return "  ".join(parts)


def header(cfg, dataset: str, n_train: int, n_val: int, num_classes: int, solvers: int, use_gpu: bool) -> str:
    """The line a run starts with: what trains on what, where, into which folder."""
    arch = cfg.arch or "default network"
    farm = f"{solvers} solver actor(s)" if solvers else "no stage A"
    device = "GPU" if use_gpu else "CPU"
    return (f"{cfg.method} on {dataset} ({n_train} train / {n_val} val images, {num_classes} classes, "
            f"scribbles {cfg.scribbles or 'full'}) · {arch} on {cfg.num_workers} {device} worker(s) · {farm} · "
            f"out {cfg.out}")


class EpochLines(threading.Thread):
    """Follows OUT/metrics.jsonl while the run trains and shows every new epoch once
    (a resumed run: the epochs it trains, not those it had)."""

    def __init__(self, out: str, total_epochs: int, tty: bool | None = None):
        super().__init__(daemon=True, name="trseg-epoch-lines")
        self.uri = RunFolder(out).metrics
        self.total = total_epochs
        self.interval = POLL_REMOTE_S if storage.is_remote(out) else POLL_S
        self.seen = {line for line, _ in self._records()}  # a resumed run's earlier epochs
        self._done = threading.Event()
        tty = sys.stdout.isatty() if tty is None else tty
        done = max((r["epoch"] for _, r in self._records()), default=0)
        self.bar = tqdm(total=total_epochs, initial=done, unit="epoch", file=sys.stdout,
                        dynamic_ncols=True, disable=False) if tty else None

    def _records(self) -> list[tuple[str, dict]]:
        try:
            raw = storage.read_bytes(self.uri)
        except FileNotFoundError:
            return []
        # the file is replaced whole after each epoch; a half-read last line waits for the next poll
        out = []
        for line in raw.decode(errors="replace").splitlines():
            try:
                out.append((line, json.loads(line)))
            except json.JSONDecodeError:
                break
        return out

    def show_new(self) -> None:
        for line, record in self._records():
            if line in self.seen:  # a resumed epoch trains again: its new line differs (loss, time)
                continue
            self.seen.add(line)
            if self.bar is None:
                print(progress_line(record, record["epoch"], self.total), flush=True)
                continue
            self.bar.set_description(record["phase"])
            post = {"loss": f"{record['loss']:.3f}"}
            if "val_miou" in record:
                post["val mIoU"] = f"{100 * record['val_miou']:.1f}"
            if "round" in record:
                post["round"] = record["round"]
            self.bar.set_postfix(post)
            self.bar.update(record["epoch"] - self.bar.n)

    def run(self) -> None:
        while not self._done.wait(self.interval):
            try:
                self.show_new()
            except OSError:  # a storage hiccup: the next poll reads the file again
                pass

    def finish(self) -> None:
        """Stop following, after showing what the run recorded last."""
        self._done.set()
        self.join()
        self.show_new()
        if self.bar is not None:
            self.bar.close()
