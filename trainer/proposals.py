"""Stage B's input: the freshest proposal of every training image, staleness bounded.

The trainer reads proposals only from the shards (SPEC §6), through the rounds'
manifests (one read a poll: `ShardStore.newest_proposals`). At round r it uses, for
each part, the newest committed proposal round p ≤ r. `sync` needs p = r (Alg. 1 exactly);
`overlapped` accepts p ≥ r − max_staleness and waits otherwise; that wait is stall.
No proposal at all counts as round −1, i.e. the image is trained on its seeds alone,
which `overlapped` allows in round 0 when max_staleness ≥ 1.

Nothing waits forever: a failed farm (its marker) ends the wait at once, and
`max_stall_s` seconds without a new part end it with an error naming the round and
the parts missing. Polls back off from `poll_s` to MAX_POLL_S. A part of another run
is ignored, a corrupt one deleted with its round's manifest so that the farm solves it
again, and one that storage could not deliver is tried again at
the next poll (nothing is deleted on a transient error).

Storage errors (an S3 outage, a lost mount: what `shared.storage` still raises after its
own retries) are ridden out as stage A's farm does: a wait tries again with backoff (up
to MAX_STORAGE_WAIT_S between tries), a refresh that need not wait goes on with the
proposals it holds, and storage failing for over `storage_patience_s` (--storage-patience)
in a row ends the run with one line naming the URI.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from shared.shard_store import Part, ShardStore
from shared.errors import CorruptShardError, ForeignShardError, UserError
from shared.labels import UNLABELLED
from trainer.metrics import confusion_matrix, miou

MAX_POLL_S = 1.0  # a long wait polls storage at most this often
MAX_STORAGE_WAIT_S = 30.0  # the longest wait between tries while storage fails (as stage A's)
MaskReader = Callable[[str], "np.ndarray | None"]


class ProposalFeed:
    """`mask_of(image_id)` (optional) gives an image's full mask, or None: then the
    proposals in use are scored against the masks (`diagnostics`)."""

    def __init__(self, store: ShardStore, parts: list[list[str]], *, sync: bool, max_staleness: int,
                 max_stall_s: float = float("inf"), poll_s: float = 0.2, num_classes: int = 0,
                 mask_of: MaskReader | None = None, storage_patience_s: float = 300.0):
        self.store = store
        self.parts = parts  # image ids of every part
        self.min_lag = 0 if sync else max_staleness
        self.max_stall_s = max_stall_s
        self.poll_s = poll_s
        self.storage_patience_s = storage_patience_s
        self._failing_since: float | None = None  # monotonic time storage began failing, None: it answers
        self._failed = False  # a storage error in this pass of refresh
        self._warned: set[str] = set()
        self.current: dict[int, int] = {}  # part -> proposal round in use
        self.labels: dict[str, np.ndarray] = {}
        self.stall_s = 0.0
        self.num_classes = num_classes
        self.mask_of = mask_of
        self._changed: dict[int, list[float]] = {}  # part -> per-image changed fraction
        self._confusion: dict[int, np.ndarray] = {}  # part -> proposals vs masks

    def refresh(self, r: int, wait: bool, on_wait: Callable[[list[int]], None] = lambda missing: None) -> dict:
        """Load newer proposals for round r; wait (stall) while the bound is not met,
        calling `on_wait(parts missing)` now and then (the trainer repairs snapshots)."""
        start = progress = time.perf_counter()
        poll_s, storage_wait = self.poll_s, self.poll_s
        while True:
            self._failed = False
            held = min(self.current.get(k, -1) for k in range(len(self.parts)))  # every part has this round
            asked = time.monotonic()
            try:
                newest = self.store.newest_proposals(r, len(self.parts), since=held)
            except OSError as e:
                self._storage_failed(self.store.manifest_uri("proposals", r), e, asked)
                newest = {}
            for k, (p, part) in newest.items():
                if p > self.current.get(k, -1) and self._load(k, p, part):
                    progress = time.perf_counter()
            lags = [r - self.current.get(k, -1) for k in range(len(self.parts))]
            if not wait or max(lags) <= self.min_lag:
                break
            asked = time.monotonic()
            try:
                why = self.store.failure()
            except OSError as e:  # the farm's failure marker, under the shard base
                self._storage_failed(self.store.base, e, asked)
                why = None
            if why is not None:
                raise UserError(f"stage A failed, no proposals for round {r}: {why}")
            missing = [k for k, lag in enumerate(lags) if lag > self.min_lag]
            if time.perf_counter() - progress > self.max_stall_s:
                raise UserError(self._stall_error(r, missing))
            if not self._failed:
                self._failing_since, storage_wait = None, self.poll_s
            on_wait(missing)
            if self._failed:  # back off while storage fails, within --storage-patience
                left = self.storage_patience_s - (time.monotonic() - self._failing_since)
                storage_wait = min(2 * storage_wait, MAX_STORAGE_WAIT_S, max(left, 0.0))
                time.sleep(storage_wait)
                continue
            time.sleep(poll_s)
            poll_s = min(2 * poll_s, max(self.poll_s, MAX_POLL_S))
        if not self._failed:
            self._failing_since = None
        stall = time.perf_counter() - start if wait else 0.0
        self.stall_s += stall
        per_image = [lag for k, lag in enumerate(lags) for _ in self.parts[k]]
        return {
            "stall_s": stall,
            "mean_staleness": float(np.mean(per_image)),
            "max_staleness": int(max(per_image)),
        }

    def _stall_error(self, r: int, missing: list[int]) -> str:
        oldest = r - self.min_lag
        names = ", ".join(f"{k} ({self.parts[k][0]}…)" for k in missing[:5]) + (" …" if len(missing) > 5 else "")
        return (f"no new proposals for {self.max_stall_s:g}s (--max-stall): round {r} needs proposal round ≥ {oldest} "
                f"for {len(missing)} part(s): {names}; are the solver actors placed and alive?")

    def _storage_failed(self, uri: str, e: OSError, asked: float) -> None:
        """A storage error reading `uri` (a call made at monotonic time `asked`, which the
        storage layer retried before it gave up): a warning while storage has failed for
        less than --storage-patience in a row, then the run's end in one line naming the URI."""
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = asked
        self._failed = True
        cause = str(e).splitlines()[0] if str(e) else type(e).__name__
        left = self.storage_patience_s - (now - self._failing_since)
        if left <= 0:
            raise UserError(f"{uri}: storage failing for over {self.storage_patience_s:g}s (--storage-patience) "
                            f"while reading proposals: {cause}")
        print(f"warning: proposals: storage error on {uri} ({cause}); trying again "
              f"({left:.0f}s of --storage-patience left)", flush=True)

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            print(f"warning: {message}", flush=True)

    def _load(self, k: int, p: int, part: Part) -> bool:
        """Take part k's proposals of round p; False if they cannot be used (yet)."""
        asked = time.monotonic()
        try:
            rows = self.store.read_proposals(part)
        except FileNotFoundError:  # replaced or deleted since the listing
            return False
        except ForeignShardError as e:
            self._warn_once(f"{e}; ignored")
            return False
        except CorruptShardError as e:  # the farm re-checks every part of a round and recomputes bad ones
            self._warn_once(f"{e}; deleting it so that stage A recomputes it")
            self.store.discard(p, part)
            return False
        except OSError as e:  # storage kept failing: try again at the next poll, within --storage-patience
            self._storage_failed(part.uri, e, asked)
            return False
        if [row.image_id for row in rows] != self.parts[k]:
            raise UserError(f"{part.uri}: answers images {[row.image_id for row in rows][:3]}…, but part {k} "
                            f"holds {self.parts[k][:3]}…: shards of another data set or --shard-size")
        for row in rows:
            self.labels[row.image_id] = row.labels
        self.current[k] = p
        self._changed[k] = [row.changed for row in rows]
        if self.mask_of is not None:
            conf = np.zeros((self.num_classes, self.num_classes), np.int64)
            for row in rows:
                mask = self.mask_of(row.image_id)
                if mask is not None:
                    conf += confusion_matrix(row.labels, np.where(row.labels == UNLABELLED, UNLABELLED, mask), self.num_classes)
            self._confusion[k] = conf
        return True

    def diagnostics(self) -> dict:
        """What stage A did to the proposals in use (SPEC §4 diagnostics): the mean fraction
        of unseeded pixels where they differ from the network's own argmax
        (`proposal_changed`) and, where masks exist, their mIoU against the masks
        (`proposal_miou`, over the pixels that have a proposal)."""
        changed = [c for values in self._changed.values() for c in values]
        out = {"proposal_changed": float(np.mean(changed))} if changed else {}
        if self._confusion:
            conf = sum(self._confusion.values())
            if conf.sum():
                out["proposal_miou"] = float(miou(conf)[0])
        return out
