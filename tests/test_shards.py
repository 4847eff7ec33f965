"""The shard contract (SPEC §6) on local disk: round trips, corruption, atomic writes."""
import os

import numpy as np
import pyarrow as pa
import pytest

from shared.shard_store import ShardStore
from shared import shards
from shared.errors import CorruptShardError


def snap(i, r=2):
    rng = np.random.default_rng(i)
    L = np.array([0, 3], np.uint8)
    return shards.Snapshot(
        image_id=f"img{i}", round=r, image_uri=f"/d/images/img{i}.png", seeds_uri=f"/d/s/img{i}.png",
        height=10, width=12, num_classes=5, label_set=L,
        neg_log_q=rng.random((2, 5, 6)).astype(np.float16),
    )


def prop(i, r=2):
    rng = np.random.default_rng(i)
    return shards.Proposal(
        image_id=f"img{i}", round=r, labels=rng.integers(0, 4, (10, 12)).astype(np.uint8),
        energy=1.5 * i, unary_energy=0.5 * i, smooth_energy=1.0 * i, iterations=3, seconds=0.01,
        warm_start=bool(i % 2), solver="node:1",
    )


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_snapshot_round_trip(tmp_path, fmt):
    rows = [snap(i) for i in range(3)]
    uri = ShardStore(str(tmp_path)).part("snapshots", 2, 0, fmt).uri
    shards.write_table(shards.snapshots_table(rows), uri)
    back = shards.read_snapshots(uri)
    assert [b.image_id for b in back] == ["img0", "img1", "img2"]
    for a, b in zip(rows, back):
        # −log q travels as 8-bit codes: exact to half a quantisation step
        np.testing.assert_allclose(b.neg_log_q, a.neg_log_q.astype(np.float32), atol=shards.NEG_LOG_Q_STEP / 2 + 1e-6)
        np.testing.assert_array_equal(a.label_set, b.label_set)
        assert (b.round, b.height, b.width, b.num_classes) == (2, 10, 12, 5)
        q = b.probs()
        assert q.shape == (5, 5, 6) and np.all(q[[1, 2, 4]] == 0)
        np.testing.assert_allclose(q[3], np.exp(-a.neg_log_q[1].astype(np.float32)), rtol=shards.NEG_LOG_Q_STEP / 2 + 1e-3)
    assert ShardStore(str(tmp_path)).parts("snapshots", 2) == {0: ShardStore(str(tmp_path)).part("snapshots", 2, 0, fmt)}
    assert ShardStore(str(tmp_path)).rounds("snapshots") == [2]


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_proposal_round_trip(tmp_path, fmt):
    rows = [prop(i) for i in range(4)]
    uri = ShardStore(str(tmp_path)).part("proposals", 2, 1, fmt).uri
    shards.write_table(shards.proposals_table(rows), uri)
    back = shards.read_proposals(uri)
    for a, b in zip(rows, back):
        np.testing.assert_array_equal(a.labels, b.labels)
        assert (a.image_id, a.energy, a.warm_start, a.solver) == (b.image_id, b.energy, b.warm_start, b.solver)


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_truncated_shard_names_path(tmp_path, fmt):
    uri = str(tmp_path / f"part-0.{fmt}")
    shards.write_table(shards.proposals_table([prop(1)]), uri)
    data = open(uri, "rb").read()
    with open(uri, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CorruptShardError) as e:
        shards.read_proposals(uri)
    assert uri in str(e.value) and e.value.path == uri


def test_garbage_and_wrong_kind(tmp_path):
    bad = tmp_path / "part-0.parquet"
    bad.write_bytes(b"not a parquet file at all")
    with pytest.raises(CorruptShardError, match="part-0.parquet"):
        shards.read_snapshots(str(bad))
    uri = str(tmp_path / "part-1.parquet")
    shards.write_table(shards.proposals_table([prop(1)]), uri)
    with pytest.raises(CorruptShardError, match="not a snapshots shard"):
        shards.read_snapshots(uri)
    # right metadata, wrong schema
    t = pa.table({"image_id": ["a"]}).replace_schema_metadata(shards.PROPOSAL_SCHEMA.metadata)
    shards.write_table(t, uri)
    with pytest.raises(CorruptShardError, match="schema"):
        shards.read_proposals(uri)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    folder = tmp_path / "proposals" / "round=0"
    for k in range(3):
        shards.write_table(shards.proposals_table([prop(k)]), str(folder / f"part-{k}.parquet"))
    shards.write_table(shards.proposals_table([prop(9)]), str(folder / "part-0.parquet"))  # overwrite
    assert sorted(os.listdir(folder)) == ["part-0.parquet", "part-1.parquet", "part-2.parquet"]
    assert shards.read_proposals(str(folder / "part-0.parquet"))[0].image_id == "img9"


def test_label_set():
    seeds = np.full((4, 4), 255, np.uint8)
    assert list(shards.label_set(seeds, 3)) == [0, 1, 2]
    seeds[0, 0] = 2
    assert list(shards.label_set(seeds, 3)) == [0, 1, 2]
    seeds[1, 1] = 0
    assert list(shards.label_set(seeds, 3)) == [0, 2]
    assert list(shards.label_set(seeds, 3, restrict=False)) == [0, 1, 2]


def test_neg_log_q_codes_cover_the_solver_floor():
    codes = shards.quantize_neg_log_q(np.array([0.0, 0.04, 18.42, 1e4], np.float32))
    assert codes.tolist() == [0, 0, 221, 255]
    assert 255 * shards.NEG_LOG_Q_STEP > -np.log(1e-8)


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_check_shard_reads_only_the_footer_and_catches_truncation(tmp_path, fmt):
    uri = ShardStore(str(tmp_path)).part("snapshots", 0, 0, fmt).uri
    shards.write_table(shards.snapshots_table([snap(0)]), uri)
    shards.check_shard(uri, "snapshots")
    with pytest.raises(shards.CorruptShardError, match="not a proposals shard"):
        shards.check_shard(uri, "proposals")
    path = tmp_path / "snapshots" / "round=0" / f"part-0.{fmt}"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(shards.CorruptShardError, match=f"part-0.{fmt}"):
        shards.check_shard(uri, "snapshots")



@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_a_round_is_visible_once_its_manifest_commits_it(tmp_path, fmt):
    """Pollers read the manifest only: parts written but not committed are not there
    for them; the manifest names each part's file and image ids and the run."""
    store = ShardStore(str(tmp_path), "run-a")
    for k in range(2):
        shards.write_table(shards.proposals_table([prop(2 * k), prop(2 * k + 1)], "run-a"),
                           store.part("proposals", 2, k, fmt).uri)
    assert store.newest_proposals(2, 2) == {} and not store.round_complete("proposals", 2, 2)
    assert sorted(store.parts("proposals", 2)) == [0, 1]  # the listing (once-a-round checks) sees them
    store.commit("proposals", 2, {0: ["img0", "img1"], 1: ["img2", "img3"]}, fmt)
    m = store.manifest("proposals", 2)
    assert (m.kind, m.round, m.run_id) == ("proposals", 2, "run-a")
    assert m.image_ids() == {0: ["img0", "img1"], 1: ["img2", "img3"]}
    assert store.round_complete("proposals", 2, 2) and not store.round_complete("proposals", 2, 3)
    newest = store.newest_proposals(3, 2)
    assert newest == {k: (2, store.part("proposals", 2, k, fmt)) for k in range(2)}
    assert [p.image_id for p in store.read_proposals(newest[1][1])] == ["img2", "img3"]
    assert sorted(os.listdir(tmp_path / "proposals" / "round=2")) == ["manifest.json", f"part-0.{fmt}", f"part-1.{fmt}"]
    assert store.parts("proposals", 2) == store.committed("proposals", 2)  # the manifest is not a part
    store.uncommit("proposals", 2)
    assert store.manifest("proposals", 2) is None and store.newest_proposals(2, 2) == {}


def test_newest_proposals_per_part_across_rounds(tmp_path):
    store = ShardStore(str(tmp_path))
    for r, ks in ((0, [0, 1]), (1, [0]), (3, [0, 1])):
        for k in ks:
            store.write_proposals(r, k, [prop(k, r)])
        store.commit("proposals", r, {k: [f"img{k}"] for k in ks})
    assert {k: p for k, (p, _) in store.newest_proposals(2, 2).items()} == {0: 1, 1: 0}
    assert {k: p for k, (p, _) in store.newest_proposals(3, 2).items()} == {0: 3, 1: 3}
    assert store.newest_proposals(2, 2, since=0) == {0: (1, store.part("proposals", 1, 0))}


def test_manifests_of_another_run_are_ignored_and_garbage_is_named(tmp_path):
    store = ShardStore(str(tmp_path), "mine")
    store.write_snapshots(0, 0, [snap(0, 0)])
    ShardStore(str(tmp_path), "other").commit("snapshots", 0, {0: ["img0"]})
    assert store.manifest("snapshots", 0) is None and not store.round_complete("snapshots", 0, 1)
    assert ShardStore(str(tmp_path)).round_complete("snapshots", 0, 1)  # a store outside a run takes any
    (tmp_path / "snapshots" / "round=0" / "manifest.json").write_bytes(b'{"version": 1}')
    with pytest.raises(CorruptShardError, match=r"round=0/manifest.json.*not a round manifest"):
        store.manifest("snapshots", 0)
    (tmp_path / "snapshots" / "round=0" / "manifest.json").write_bytes(
        b'{"version": 1, "kind": "snapshots", "round": 0, "run_id": "mine", '
        b'"parts": {"0": {"file": "../elsewhere.parquet", "image_ids": ["img0"]}}}')
    with pytest.raises(CorruptShardError, match=r"part 0 is file '../elsewhere.parquet'"):
        store.manifest("snapshots", 0)


def test_parts_are_references_the_store_hands_out(tmp_path):
    """A Part names its file (built in the store only), pickles (Ray Data rows carry
    PartJobs), and reads, writes and deletes itself; a round's jobs pair snapshot part k
    with proposal part k and its newest earlier proposal."""
    import pickle

    store = ShardStore(str(tmp_path), "run-a")
    store.write_snapshots(1, 0, [snap(0, 1)])
    store.write_snapshots(1, 1, [snap(1, 1)])
    store.write_proposals(0, 1, [prop(1, 0)])
    store.commit("proposals", 0, {1: ["img1"]})
    jobs = store.jobs(1, store.unsolved(1))
    assert pickle.loads(pickle.dumps(jobs)) == jobs
    assert [(j.snapshot.k, j.proposal, j.init) for j in jobs] == [
        (0, store.part("proposals", 1, 0), None), (1, store.part("proposals", 1, 1), store.part("proposals", 0, 1))]
    assert jobs[1].snapshot.uri == str(tmp_path / "snapshots" / "round=1" / "part-1.parquet")
    rows, run_id = jobs[1].snapshot.read_snapshots()
    assert [r.image_id for r in rows] == ["img1"] and run_id == "run-a"
    assert list(jobs[1].init.warm_starts("run-a")) == ["img1"]
    with pytest.warns(UserWarning, match="ignoring warm starts.*not by this run run-b"):
        assert jobs[1].init.warm_starts("run-b") == {}
    store.discard(0, jobs[1].init)
    assert store.parts("proposals", 0) == {} and store.manifest("proposals", 0) is None
    assert jobs[0].init is None and jobs[1].init.warm_starts("run-a") == {}  # gone: a cold start
