"""The shard store: the one owner of the shard layout of SPEC §6.

    {base}/snapshots/round={r}/part-{k}.{parquet|arrow}
    {base}/snapshots/round={r}/manifest.json             the round's commit record, written last
    {base}/proposals/round={r}/part-{k}.{parquet|arrow}
    {base}/proposals/round={r}/manifest.json
    {base}/FARM_FAILED                                   stage A failed: stop waiting
    {base}/RUN                                           the id of the run that owns the base

Part k always holds the same images (chunk k of the training ids, `parts_of`), so
proposal part k of round r answers snapshot part k of round r, and the warm start of
an image is part k of an earlier proposal round. The trainer, the solver farm, the
driver, the solver's command line and the benchmarks reach shards only through this
class; the row formats themselves are `shared.shards`. Outside this module a part is a
`Part` (a reference: round folder, kind, index, format) handed out by the store, and a
part to solve is a `PartJob`; no other module builds a part's path or lists a round.

Readers that poll (the farm waiting for a snapshot round, the trainer waiting for
proposals) read one manifest per round (`Manifest`, below: the parts, their image
ids, the run) instead of listing folders: on an object store a listing is a billed,
throttled request per poll. A round is visible to them once its manifest exists; the
trainer commits a snapshot round when all its parts are written, the farm a proposal
round when it has solved what it could of it. Listings remain for the checks that run
once a round (what is left to solve, what was left by a killed run).

A base belongs to one run (SPEC §6, §7): `claim` records the run's id in RUN, every
part written through a store carries it in its schema metadata, and the store's
checks treat a part of another run as absent (it is solved or written again, never
read as this run's).
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass

import numpy as np

from shared import shards, storage
from shared.errors import CorruptShardError, UserError

_PART = re.compile(r"^part-(\d+)\.(parquet|arrow)$")
_ROUND = re.compile(r"^round=(\d+)$")
_MANIFEST = "manifest.json"
_FAILED = "FARM_FAILED"
_RUN = "RUN"
MANIFEST_VERSION = 1


@dataclass
class Manifest:
    """The commit record of one round of one kind (SPEC §6): its parts, their files and
    image ids, and the run that wrote them. Written after every part it names, so a
    reader that finds it reads one small object instead of listing the round."""

    kind: str
    round: int
    run_id: str
    parts: dict[int, tuple[str, list[str]]]  # k -> (file name in the round folder, image ids)

    def image_ids(self) -> dict[int, list[str]]:
        return {k: ids for k, (_, ids) in self.parts.items()}

    def to_bytes(self) -> bytes:
        parts = {str(k): {"file": f, "image_ids": ids} for k, (f, ids) in sorted(self.parts.items())}
        return json.dumps({"version": MANIFEST_VERSION, "kind": self.kind, "round": self.round,
                           "run_id": self.run_id, "parts": parts}).encode()

    @staticmethod
    def from_bytes(uri: str, data: bytes) -> "Manifest":
        """CorruptShardError (naming `uri`) unless it is a manifest of this format."""
        try:
            m = json.loads(data)
            if m["version"] != MANIFEST_VERSION or m["kind"] not in shards.KINDS:
                raise ValueError(f"version {m['version']!r}, kind {m['kind']!r}")
            parts = {int(k): (str(p["file"]), [str(i) for i in p["image_ids"]]) for k, p in m["parts"].items()}
            for k, (name, _) in parts.items():
                if not (f := _PART.match(name)) or int(f.group(1)) != k:
                    raise ValueError(f"part {k} is file {name!r}")
            return Manifest(m["kind"], int(m["round"]), str(m["run_id"]), parts)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptShardError(uri, f"not a round manifest: {e}") from None


def parts_of(n_images: int, shard_size: int) -> list[range]:
    """Image indices of every part: part k holds chunk k of the sorted ids."""
    return [range(i, min(i + shard_size, n_images)) for i in range(0, n_images, shard_size)]


@dataclass(frozen=True)
class Part:
    """One part file, as the store names it: what the farm hands a solver and the
    feed reads, instead of a path. A small frozen value, so it pickles into Ray Data
    rows and tasks; its URI is built here and nowhere else."""

    folder: str  # the round folder
    kind: str  # "snapshots" | "proposals"
    k: int
    fmt: str = "parquet"  # | "arrow"

    @property
    def uri(self) -> str:
        return storage.join(self.folder, f"part-{self.k}.{self.fmt}")

    def check(self, run_id: str = "", rows: bool = False) -> None:
        """CorruptShardError unless it reads as a part of its kind (and of run `run_id`,
        if given): footer and schema, or every row; FileNotFoundError if absent."""
        if rows:
            shards.read_table(self.uri, self.kind, run_id)
        else:
            shards.check_shard(self.uri, self.kind, run_id)

    def read_snapshots(self) -> tuple[list[shards.Snapshot], str]:
        """Its rows and the run that wrote them: a solver answers any run's snapshots,
        in that run's name."""
        assert self.kind == "snapshots", self.kind
        table = shards.read_table(self.uri, "snapshots")
        return shards.snapshot_rows(table, self.uri), shards.run_of(table.schema)

    def read_proposals(self, run_id: str = "") -> list[shards.Proposal]:
        """Its rows; ForeignShardError if another run than `run_id` (if given) wrote it."""
        assert self.kind == "proposals", self.kind
        return shards.read_proposals(self.uri, run_id)

    def warm_starts(self, run_id: str) -> dict[str, np.ndarray]:
        """Labels by image id to start stage A from: {} if the part is gone, or does not
        read, or is another run's (a warm start is an optimisation: the solver starts cold)."""
        try:
            return {p.image_id: p.labels for p in self.read_proposals(run_id)}
        except FileNotFoundError:
            return {}
        except CorruptShardError as e:
            warnings.warn(f"ignoring warm starts: {e}")
            return {}

    def write(self, rows: list, run_id: str = "") -> None:
        """Write its rows (of its kind), carrying `run_id`, atomically."""
        table = shards.snapshots_table(rows, run_id) if self.kind == "snapshots" else shards.proposals_table(rows, run_id)
        shards.write_table(table, self.uri)

    def delete(self) -> None:
        storage.delete(self.uri)


@dataclass(frozen=True)
class PartJob:
    """One part to solve: the snapshot part, the proposal part that answers it (same
    index), and where its warm starts come from (None: a cold start)."""

    snapshot: Part
    proposal: Part
    init: Part | None = None


def folder_parts(folder: str, kind: str) -> dict[int, Part]:
    """Part index -> Part of every part file in one round folder (one listing)."""
    return {int(m.group(1)): Part(folder, kind, int(m.group(1)), m.group(2))
            for name in storage.list_dir(folder) if (m := _PART.match(name))}


def folder_jobs(snapshot_dir: str, proposal_dir: str, init_dir: str | None = None) -> list[PartJob]:
    """Solving a snapshot round folder outside a run's store (the solver's command
    line): part k goes to part k of `proposal_dir` in the same format, warm-started from
    part k of `init_dir` where there is one."""
    inits = folder_parts(init_dir, "proposals") if init_dir else {}
    return [PartJob(s, Part(proposal_dir, "proposals", k, s.fmt), inits.get(k))
            for k, s in sorted(folder_parts(snapshot_dir, "snapshots").items())]


class ShardStore:
    def __init__(self, base: str, run_id: str = ""):
        self.base = base
        self.run_id = run_id  # "" : a store outside a run (the solver's command line, tests)

    # -- ownership
    def owner(self) -> str | None:
        """The run that owns this base: its id, '' for parts of no recorded run, None if empty."""
        uri = storage.join(self.base, _RUN)
        if storage.exists(uri):
            return storage.read_bytes(uri).decode().strip()
        return "" if self.rounds("snapshots") or self.rounds("proposals") else None

    def claim(self, overwrite: bool = False, adopt: bool = False, write: bool = True) -> None:
        """Make this run the owner of the base. Another run's shards are an error naming
        it, unless `overwrite` (they are deleted) or, with `adopt` (a resumed run), they
        belong to no recorded run. `write=False` only checks."""
        owner = self.owner()
        if owner is not None and owner != self.run_id and not (adopt and owner == ""):
            if not overwrite:
                raise UserError(f"--shards {self.base}: holds the shards of another run ({owner or 'unrecorded'}); "
                                f"give another --shards, or --overwrite to delete them")
            if write:
                for kind in shards.KINDS:
                    storage.delete_tree(storage.join(self.base, kind))
        if not write:
            return
        record = (self.run_id + "\n").encode()
        if owner is not None:
            storage.write_bytes(storage.join(self.base, _RUN), record)
        elif not storage.create_new(storage.join(self.base, _RUN), record):  # checked, then another run came first
            raise UserError(f"--shards {self.base}: another run ({self.owner()}) claimed it just now; give another --shards")

    # -- layout
    def round_dir(self, kind: str, r: int) -> str:
        assert kind in shards.KINDS, kind
        return storage.join(self.base, kind, f"round={r}")

    def part(self, kind: str, r: int, k: int, fmt: str = "parquet") -> Part:
        return Part(self.round_dir(kind, r), kind, k, fmt)

    def rounds(self, kind: str) -> list[int]:
        names = storage.list_dir(storage.join(self.base, kind))
        return sorted(int(m.group(1)) for n in names if (m := _ROUND.match(n)))

    def parts(self, kind: str, r: int) -> dict[int, Part]:
        """Every part file of round r, committed or not (one listing)."""
        return folder_parts(self.round_dir(kind, r), kind)

    # -- commit records
    def manifest_uri(self, kind: str, r: int) -> str:
        return storage.join(self.round_dir(kind, r), _MANIFEST)

    def manifest(self, kind: str, r: int) -> Manifest | None:
        """Round r's commit record (one read); None if the round is not committed, or
        committed by another run."""
        uri = self.manifest_uri(kind, r)
        data = storage.read_if_exists(uri)
        if data is None:
            return None
        m = Manifest.from_bytes(uri, data)
        return m if not self.run_id or m.run_id == self.run_id else None

    def commit(self, kind: str, r: int, image_ids: dict[int, list[str]], fmt: str = "parquet") -> None:
        """Commit round r: its parts (part index -> image ids), all written before."""
        m = Manifest(kind, r, self.run_id, {k: (f"part-{k}.{fmt}", ids) for k, ids in image_ids.items()})
        storage.write_bytes(self.manifest_uri(kind, r), m.to_bytes())

    def uncommit(self, kind: str, r: int) -> None:
        """Hide round r from the pollers until it is committed again (a part was found bad)."""
        storage.delete(self.manifest_uri(kind, r))

    def committed(self, kind: str, r: int) -> dict[int, Part]:
        """Every part that round r's manifest names ({} if none)."""
        m = self.manifest(kind, r)
        return {k: self.part(kind, r, k, _PART.match(name).group(2)) for k, (name, _) in m.parts.items()} if m else {}

    # -- rows
    def write_snapshots(self, r: int, k: int, rows: list[shards.Snapshot]) -> None:
        self.part("snapshots", r, k).write(rows, self.run_id)

    def write_proposals(self, r: int, k: int, rows: list[shards.Proposal], fmt: str = "parquet") -> None:
        self.part("proposals", r, k, fmt).write(rows, self.run_id)

    def read_proposals(self, part: Part) -> list[shards.Proposal]:
        """This run's rows of a proposal part; ForeignShardError if another run wrote it."""
        return part.read_proposals(self.run_id)

    def discard(self, r: int, part: Part) -> None:
        """Delete a corrupt proposal part of round r and hide the round from the pollers
        (its manifest), so that the farm, which re-checks the round, solves it again."""
        part.delete()
        self.uncommit("proposals", r)

    # -- state of a round
    def round_complete(self, kind: str, r: int, n_parts: int) -> bool:
        """Round r is committed with at least n_parts parts."""
        m = self.manifest(kind, r)
        return m is not None and len(m.parts) >= n_parts

    def solved(self, r: int, snapshots: Manifest) -> bool:
        """Snapshot round r (its manifest) has every part's proposal committed."""
        return self.round_complete("proposals", r, len(snapshots.parts))

    def round_intact(self, kind: str, r: int, n_parts: int) -> dict[int, CorruptShardError] | None:
        """Round r checked part by part, every row read: None while fewer than n_parts
        parts are there, else the parts that do not read or are another run's ({}: the
        round is whole)."""
        if len(self.parts(kind, r)) < n_parts:
            return None
        return self.unreadable(kind, r, read_rows=True)

    def unreadable(self, kind: str, r: int, read_rows: bool = False, only=None) -> dict[int, CorruptShardError]:
        """The parts of a round that do not read (footer and schema, or every row) or
        belong to another run. A part that vanished meanwhile is not listed; storage that
        keeps failing raises (transient errors are retried first, see `shared.storage`)."""
        bad = {}
        for k, part in self.parts(kind, r).items():
            if only is not None and k not in only:
                continue
            try:
                part.check(self.run_id, rows=read_rows)
            except CorruptShardError as e:
                bad[k] = e
            except FileNotFoundError:
                pass
        return bad

    def unsolved(self, r: int, verify: bool = False) -> dict[int, Part]:
        """Snapshot parts of round r whose proposal is absent (or unreadable, if verify)."""
        done = self.parts("proposals", r)
        bad = self.unreadable("proposals", r) if done and verify else {}
        for e in bad.values():
            print(f"warning: {e}; solving it again", flush=True)
        return {k: part for k, part in self.parts("snapshots", r).items() if k not in done or k in bad}

    def jobs(self, r: int, snapshots: dict[int, Part]) -> list[PartJob]:
        """Solving these snapshot parts of round r: part k's answer is part k of proposal
        round r, warm-started from part k's newest committed proposal of an earlier round."""
        inits = self.newest_proposals(r - 1, max(snapshots) + 1)
        return [PartJob(part, self.part("proposals", r, k), inits[k][1] if k in inits else None)
                for k, part in sorted(snapshots.items())]

    def newest_proposals(self, r: int, n_parts: int, since: int = -1) -> dict[int, tuple[int, Part]]:
        """part -> (round p, Part) of its newest committed proposal with since < p ≤ r.
        Reads the manifests from round r down, and stops once every part has one (a
        poller that holds round `since` of every part reads only the rounds after it)."""
        best: dict[int, tuple[int, Part]] = {}
        for p in range(r, since, -1):
            for k, part in self.committed("proposals", p).items():
                if k < n_parts:
                    best.setdefault(k, (p, part))
            if len(best) == n_parts:
                break
        return best

    def images_missing(self, parts: list[range]) -> int:
        """Images of every snapshot round without a proposal of that round."""
        missing = 0
        for r in self.rounds("snapshots"):
            done = self.parts("proposals", r)
            missing += sum(len(part) for k, part in enumerate(parts) if k not in done)
        return missing

    # -- the failure marker
    def mark_failed(self, why: str) -> None:
        storage.write_bytes(storage.join(self.base, _FAILED), (why.strip() + "\n").encode())

    def failure(self) -> str | None:
        data = storage.read_if_exists(storage.join(self.base, _FAILED))  # polled: one request
        return data.decode().strip() if data is not None else None

    def clear_failure(self) -> None:
        storage.delete(storage.join(self.base, _FAILED))
