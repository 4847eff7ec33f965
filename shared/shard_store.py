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
class; the row formats themselves are `shared.shards`.

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
from dataclasses import dataclass

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
            return Manifest(m["kind"], int(m["round"]), str(m["run_id"]), parts)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptShardError(uri, f"not a round manifest: {e}") from None


def parts_of(n_images: int, shard_size: int) -> list[range]:
    """Image indices of every part: part k holds chunk k of the sorted ids."""
    return [range(i, min(i + shard_size, n_images)) for i in range(0, n_images, shard_size)]


def part_in(round_dir: str, k: int, fmt: str = "parquet") -> str:
    """The URI of part k in a round folder."""
    return storage.join(round_dir, f"part-{k}.{fmt}")


def parts_in(round_dir: str) -> dict[int, str]:
    """Part index -> URI of every committed part file in one round folder."""
    return {int(m.group(1)): storage.join(round_dir, name)
            for name in storage.list_dir(round_dir) if (m := _PART.match(name))}


def extension(uri: str) -> str:
    """A part file's format: 'parquet' or 'arrow'."""
    return uri.split("?", 1)[0].rsplit(".", 1)[1]


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

    def part_uri(self, kind: str, r: int, k: int, fmt: str = "parquet") -> str:
        return part_in(self.round_dir(kind, r), k, fmt)

    def rounds(self, kind: str) -> list[int]:
        names = storage.list_dir(storage.join(self.base, kind))
        return sorted(int(m.group(1)) for n in names if (m := _ROUND.match(n)))

    def parts(self, kind: str, r: int) -> dict[int, str]:
        return parts_in(self.round_dir(kind, r))

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

    def committed(self, kind: str, r: int) -> dict[int, str]:
        """Part index -> URI of every part that round r's manifest names ({} if none)."""
        m = self.manifest(kind, r)
        return {k: storage.join(self.round_dir(kind, r), name) for k, (name, _) in m.parts.items()} if m else {}

    # -- rows
    def write_snapshots(self, r: int, k: int, rows: list[shards.Snapshot]) -> None:
        shards.write_table(shards.snapshots_table(rows, self.run_id), self.part_uri("snapshots", r, k))

    def write_proposals(self, r: int, k: int, rows: list[shards.Proposal], fmt: str = "parquet") -> None:
        shards.write_table(shards.proposals_table(rows, self.run_id), self.part_uri("proposals", r, k, fmt))

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
        for k, uri in self.parts(kind, r).items():
            if only is not None and k not in only:
                continue
            try:
                if read_rows:
                    shards.read_table(uri, kind, self.run_id)
                else:
                    shards.check_shard(uri, kind, self.run_id)
            except CorruptShardError as e:
                bad[k] = e
            except FileNotFoundError:
                pass
        return bad

    def unsolved(self, r: int, verify: bool = False) -> dict[int, str]:
        """Snapshot parts of round r whose proposal is absent (or unreadable, if verify)."""
        done = self.parts("proposals", r)
        bad = self.unreadable("proposals", r) if done and verify else {}
        for e in bad.values():
            print(f"warning: {e}; solving it again", flush=True)
        return {k: uri for k, uri in self.parts("snapshots", r).items() if k not in done or k in bad}

    def newest_proposals(self, r: int, n_parts: int, since: int = -1) -> dict[int, tuple[int, str]]:
        """part -> (round p, URI) of its newest committed proposal with since < p ≤ r.
        Reads the manifests from round r down, and stops once every part has one (a
        poller that holds round `since` of every part reads only the rounds after it)."""
        best: dict[int, tuple[int, str]] = {}
        for p in range(r, since, -1):
            for k, uri in self.committed("proposals", p).items():
                if k < n_parts:
                    best.setdefault(k, (p, uri))
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
