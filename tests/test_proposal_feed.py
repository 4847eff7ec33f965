"""The trainer's proposal feed: freshest proposal per part, staleness bounded (SPEC §4)."""
import threading
import time

import numpy as np
import pytest

from shared.shard_store import ShardStore
from shared import shards
from shared.errors import UserError
from trainer.proposals import ProposalFeed

PARTS = [["a", "b"], ["c"]]


def write_proposals(base, r, k, value):
    rows = [
        shards.Proposal(image_id=i, round=r, labels=np.full((4, 4), value, np.uint8), energy=1.0,
                        unary_energy=0.5, smooth_energy=0.5, iterations=1, seconds=0.1, warm_start=False, solver="t")
        for i in PARTS[k]
    ]
    store = ShardStore(base)
    shards.write_table(shards.proposals_table(rows), store.part("proposals", r, k).uri)
    committed = store.manifest("proposals", r)
    store.commit("proposals", r, {**(committed.image_ids() if committed else {}), k: PARTS[k]})


def test_overlapped_round0_trains_on_seeds_until_proposals_arrive(tmp_path):
    feed = ProposalFeed(ShardStore(str(tmp_path)), PARTS, sync=False, max_staleness=1)
    got = feed.refresh(0, wait=True)
    assert got["max_staleness"] == 1 and feed.labels == {}


def test_freshest_round_is_used_and_staleness_measured(tmp_path):
    base = str(tmp_path)
    for k in range(2):
        write_proposals(base, 0, k, 0)
    write_proposals(base, 1, 0, 1)
    write_proposals(base, 3, 0, 3)  # from the future: not usable at round 2
    feed = ProposalFeed(ShardStore(base), PARTS, sync=False, max_staleness=2)
    got = feed.refresh(2, wait=True)
    assert feed.labels["a"][0, 0] == 1 and feed.labels["c"][0, 0] == 0
    assert got["max_staleness"] == 2
    assert got["mean_staleness"] == pytest.approx((1 + 1 + 2) / 3)


def test_waits_past_the_bound_and_reports_stall(tmp_path):
    base = str(tmp_path)
    for k in range(2):
        write_proposals(base, 0, k, 0)
    feed = ProposalFeed(ShardStore(base), PARTS, sync=False, max_staleness=1, poll_s=0.05)
    writer = threading.Timer(0.5, lambda: [write_proposals(base, 1, k, 1) for k in range(2)])
    writer.start()
    got = feed.refresh(2, wait=True)  # round 0 is 2 rounds old: must wait for round 1
    writer.join()
    assert got["stall_s"] >= 0.4
    assert got["max_staleness"] <= 1
    assert all(v[0, 0] == 1 for v in feed.labels.values())


def test_sync_needs_the_current_round(tmp_path):
    base = str(tmp_path)
    for k in range(2):
        write_proposals(base, 0, k, 0)
    feed = ProposalFeed(ShardStore(base), PARTS, sync=True, max_staleness=5, poll_s=0.05)
    threading.Timer(0.3, lambda: [write_proposals(base, 1, k, 1) for k in range(2)]).start()
    t0 = time.perf_counter()
    got = feed.refresh(1, wait=True)
    assert time.perf_counter() - t0 >= 0.25
    assert got["max_staleness"] == 0


def test_farm_failure_stops_the_wait(tmp_path):
    base = str(tmp_path)
    ShardStore(base).mark_failed("RuntimeError: boom")
    feed = ProposalFeed(ShardStore(base), PARTS, sync=True, max_staleness=1, poll_s=0.05)
    with pytest.raises(UserError, match="boom"):
        feed.refresh(0, wait=True)


def test_corrupt_proposal_is_reported_and_removed(tmp_path, capsys):
    base = str(tmp_path)
    write_proposals(base, 0, 0, 0)
    uri = ShardStore(base).part("proposals", 0, 1).uri
    (tmp_path / "proposals" / "round=0" / "part-1.parquet").write_bytes(b"not parquet")
    ShardStore(base).commit("proposals", 0, {0: PARTS[0], 1: PARTS[1]})
    feed = ProposalFeed(ShardStore(base), PARTS, sync=False, max_staleness=1)
    feed.refresh(0, wait=False)
    assert "part-1.parquet" in capsys.readouterr().out
    assert "c" not in feed.labels and not (tmp_path / "proposals" / "round=0" / "part-1.parquet").exists(), uri
    # the round is uncommitted: the farm sees it unfinished and solves the part again
    assert ShardStore(base).manifest("proposals", 0) is None


def test_uncommitted_proposals_are_not_read(tmp_path):
    """A part is visible once its round's manifest names it (written after the parts)."""
    base = str(tmp_path)
    write_proposals(base, 0, 0, 0)
    rows = [shards.Proposal(image_id="c", round=0, labels=np.full((4, 4), 7, np.uint8), energy=1.0, unary_energy=0.5,
                            smooth_energy=0.5, iterations=1, seconds=0.1, warm_start=False, solver="t")]
    ShardStore(base).write_proposals(0, 1, rows)  # written, not yet committed
    feed = ProposalFeed(ShardStore(base), PARTS, sync=False, max_staleness=1)
    feed.refresh(0, wait=False)
    assert sorted(feed.labels) == ["a", "b"]
    ShardStore(base).commit("proposals", 0, {0: PARTS[0], 1: PARTS[1]})
    feed.refresh(0, wait=False)
    assert feed.labels["c"][0, 0] == 7


def test_diagnostics_score_the_proposals_in_use_against_masks(tmp_path):
    base = str(tmp_path)
    rows = []
    for i, changed in (("a", 0.1), ("b", 0.3)):
        labels = np.zeros((4, 4), np.uint8)
        labels[:, 2:] = 1
        rows.append(shards.Proposal(image_id=i, round=0, labels=labels, energy=1.0, unary_energy=0.5,
                                    smooth_energy=0.5, iterations=1, seconds=0.1, warm_start=False, solver="t",
                                    changed=changed))
    shards.write_table(shards.proposals_table(rows), ShardStore(base).part("proposals", 0, 0).uri)
    ShardStore(base).commit("proposals", 0, {0: ["a", "b"]})
    mask = np.zeros((4, 4), np.uint8)
    mask[:, 1:] = 1  # the proposals miss one column of class 1: IoU 8/12 (class 1), 4/8 (class 0)
    feed = ProposalFeed(ShardStore(base), [["a", "b"]], sync=True, max_staleness=0, num_classes=2,
                        mask_of=lambda image_id: mask if image_id == "a" else None)
    feed.refresh(0, wait=True)
    d = feed.diagnostics()
    assert d["proposal_changed"] == pytest.approx(0.2)
    assert d["proposal_miou"] == pytest.approx((8 / 12 + 4 / 8) / 2)
