"""A run's folder (SPEC §7): the one place that knows where a run keeps each of its files.

A run folder is a local path or a URI of `shared.storage` (s3://…). Every module that
reads or writes a run's outputs asks a `RunFolder` for the path: `RunFolder(out).last`
is the run's `checkpoints/last.pt`, wherever it is needed (--init from a PCE-GD model,
--resume, the report, the pictures).
"""
from __future__ import annotations

from dataclasses import dataclass

from shared import storage


@dataclass(frozen=True)
class RunFolder:
    root: str

    RUN_FILE = "run.json"  # the run id: which run owns the folder
    # what a run writes into its folder; anything else in it is left alone
    OUTPUTS = (RUN_FILE, "config.toml", "summary.json", "trainer_summary.json", "metrics.jsonl",
               "checkpoints", "tensorboard", "panels", "shards", "ray_train")

    def join(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    @property
    def run_file(self) -> str:
        return self.join(self.RUN_FILE)

    @property
    def config(self) -> str:
        """config.toml: the resolved configuration (`train --config` on it repeats the run)."""
        return self.join("config.toml")

    @property
    def summary(self) -> str:
        """summary.json: written once, when the run has finished."""
        return self.join("summary.json")

    @property
    def metrics(self) -> str:
        """metrics.jsonl: one record per epoch (and per stage-A round)."""
        return self.join("metrics.jsonl")

    def checkpoint(self, name: str) -> str:
        """checkpoints/NAME."""
        return self.join("checkpoints", name)

    @property
    def last(self) -> str:
        """checkpoints/last.pt: the latest epoch's state (--init, --resume, eval)."""
        return self.checkpoint("last.pt")

    @property
    def best(self) -> str:
        """checkpoints/best.pt: the epoch of the best val mIoU."""
        return self.checkpoint("best.pt")

    def phase_end(self, method: str) -> str:
        """checkpoints/METHOD.pt: the model a phase ended with, when another phase follows
        (a pretraining phase's: the PCE-GD model)."""
        return self.checkpoint(f"{method}.pt")

    @property
    def panels(self) -> str:
        return self.join("panels")

    @property
    def tensorboard(self) -> str:
        return self.join("tensorboard")

    @property
    def shards(self) -> str:
        """The default shard base (--shards unset)."""
        return self.join("shards")

    def outputs(self) -> list[str]:
        """The run outputs the folder holds now (another run's, before a new one starts)."""
        return [name for name in storage.list_dir(self.root) if name in self.OUTPUTS]
