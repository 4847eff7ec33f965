"""Shards on a local S3 endpoint: moto's server on 127.0.0.1, reached through pyarrow's
S3FileSystem with the endpoint in the URI query (SPEC §6: one PUT per file, so a reader
never sees half a file)."""
import io
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from shared.errors import UserError
from shared.shard_store import ShardStore
from tests.helpers import BUCKET, s3_uri

pytestmark = pytest.mark.s3

@pytest.fixture
def base(s3_base):
    return s3_base


def _keys(client, prefix):
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _png(array) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _make_images(base, n, size, classes, rng):
    """n synthetic images (K vertical stripes of colour + noise) and scribble seeds on S3."""
    from shared import storage

    images = []
    for i in range(n):
        truth = np.minimum(np.arange(size) * classes // size, classes - 1)[None].repeat(size, 0).astype(np.uint8)
        colours = rng.integers(0, 256, (classes, 3))
        image = np.clip(colours[truth] + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)
        seeds = np.full((size, size), 255, np.uint8)
        for c in range(classes):
            cols = np.flatnonzero(truth[0] == c)
            seeds[size // 4: 3 * size // 4, cols[len(cols) // 2]] = c  # one vertical scribble per class
        image_uri = storage.join(base, "data", f"img{i}.png")
        seeds_uri = storage.join(base, "data", f"img{i}_seeds.png")
        storage.write_bytes(image_uri, _png(image))
        storage.write_bytes(seeds_uri, _png(seeds))
        images.append((f"img{i:03d}", image_uri, seeds_uri, truth, seeds))
    return images


def _write_snapshot_round(base, r, images, per_part, classes, rng, stride=2):
    from shared import shards

    parts = {}
    for k in range(0, len(images), per_part):
        rows = []
        for image_id, image_uri, seeds_uri, truth, seeds in images[k: k + per_part]:
            h, w = seeds.shape
            labels = shards.label_set(seeds, classes)
            q = rng.dirichlet(np.ones(len(labels)), size=(h // stride, w // stride)).transpose(2, 0, 1)
            rows.append(shards.Snapshot(
                image_id=image_id, round=r, image_uri=image_uri, seeds_uri=seeds_uri, height=h, width=w,
                num_classes=classes, label_set=labels, neg_log_q=(-np.log(q + 1e-6)).astype(np.float16)))
        uri = ShardStore(base).part("snapshots", r, k // per_part).uri
        shards.write_table(shards.snapshots_table(rows), uri)
        parts[k // per_part] = rows
    return parts


def test_query_uri_round_trip(base, s3_endpoint):
    """The endpoint query survives joining; pyarrow resolves it; objects land under the prefix."""
    from shared import storage

    _, client = s3_endpoint
    uri = ShardStore(base).part("proposals", 3, 7).uri
    assert uri.startswith(f"s3://{BUCKET}/") and "/proposals/round=3/part-7.parquet?" in uri
    fs, path = storage.resolve(uri)
    assert type(fs).__name__ == "S3FileSystem"
    assert path.endswith("/proposals/round=3/part-7.parquet")
    storage.write_bytes(uri, b"hello")
    assert storage.exists(uri) and storage.read_bytes(uri) == b"hello"
    prefix = base.split("?")[0][len(f"s3://{BUCKET}/"):]
    assert _keys(client, prefix) == [f"{prefix}/proposals/round=3/part-7.parquet"]
    assert storage.list_dir(ShardStore(base).round_dir("proposals", 3)) == ["part-7.parquet"]
    assert ShardStore(base).rounds("proposals") == [3]
    storage.delete(uri)
    assert not storage.exists(uri)


def test_whole_round_on_s3(base, s3_endpoint):
    """Snapshot shards, images and seeds on S3 → solve_part per part → proposals on S3."""
    from shared import shards
    from shared.config import SolverConfig

    from solver_service import parts as parts_mod
    rng = np.random.default_rng(0)
    classes, size = 3, 24
    images = _make_images(base, 6, size, classes, rng)
    written = _write_snapshot_round(base, 0, images, per_part=2, classes=classes, rng=rng)

    assert ShardStore(base).rounds("snapshots") == [0]
    snap_parts = ShardStore(base).parts("snapshots", 0)
    assert sorted(snap_parts) == [0, 1, 2]
    for k, part in snap_parts.items():
        back, _ = part.read_snapshots()
        assert [s.image_id for s in back] == [s.image_id for s in written[k]]
        for a, b in zip(back, written[k]):
            np.testing.assert_allclose(a.neg_log_q, b.neg_log_q.astype(np.float32), atol=shards.NEG_LOG_Q_STEP / 2 + 1e-6)
            assert a.image_uri == b.image_uri and "endpoint_override=" in a.image_uri

    cfg = SolverConfig(max_iter=2)
    for r in (0, 1):
        if r == 1:  # a second round, warm-started from round 0's proposals
            _write_snapshot_round(base, 1, images, per_part=2, classes=classes, rng=rng)
        for k, part in sorted(ShardStore(base).parts("snapshots", r).items()):
            init = ShardStore(base).part("proposals", 0, k) if r == 1 else None
            stats = parts_mod.solve_part(part, ShardStore(base).part("proposals", r, k), cfg, init, "test:1")
            assert stats["images"] == 2

    assert ShardStore(base).rounds("proposals") == [0, 1]
    seeds_of = {image_id: seeds for image_id, _, _, _, seeds in images}
    for r in (0, 1):
        done = ShardStore(base).parts("proposals", r)
        assert sorted(done) == [0, 1, 2]
        for k, part in done.items():
            props = part.read_proposals()
            assert [p.image_id for p in props] == [s.image_id for s in written[k]]
            for p in props:
                assert p.round == r and p.solver == "test:1"
                assert p.labels.shape == (size, size) and p.labels.max() < classes
                seeded = seeds_of[p.image_id] != 255
                np.testing.assert_array_equal(p.labels[seeded], seeds_of[p.image_id][seeded])
                assert np.isfinite(p.energy)
                assert p.warm_start == (r == 1)


_PARTIAL_WRITER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    from shared import storage
    fs, path = storage.resolve({uri!r})
    f = fs.open_output_stream(path)
    f.write(b"x" * {n})
    f.flush()
    os._exit(1)  # killed mid-write: no close, no commit
""")


@pytest.mark.parametrize("n_bytes", [1000, 12 * 2**20], ids=["small", "multipart"])
def test_killed_writer_leaves_no_object(base, s3_endpoint, n_bytes):
    """A writer that dies mid-file leaves nothing (and an older object untouched)."""
    from shared import storage

    _, client = s3_endpoint
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    fresh = ShardStore(base).part("proposals", 0, 0).uri
    old = ShardStore(base).part("proposals", 0, 1).uri
    storage.write_bytes(old, b"old whole file")
    for uri in (fresh, old):
        code = _PARTIAL_WRITER.format(root=root, uri=uri, n=n_bytes)
        proc = subprocess.run([sys.executable, "-c", code], env=os.environ.copy(), timeout=120,
                              capture_output=True, text=True)
        assert proc.returncode == 1, proc.stderr
    assert not storage.exists(fresh)
    assert storage.read_bytes(old) == b"old whole file"
    assert sorted(ShardStore(base).parts("proposals", 0)) == [1]
    prefix = base.split("?")[0][len(f"s3://{BUCKET}/"):]
    assert _keys(client, prefix) == [f"{prefix}/proposals/round=0/part-1.parquet"]


@pytest.mark.parametrize("ext", ["parquet", "arrow"])
def test_a_writer_failing_after_its_bytes_leaves_the_old_object(base, s3_endpoint, monkeypatch, ext):
    """The serialiser writes the whole new file into its sink and then fails (a disk-full
    close, a bug in a writer): write_table raises and the object on S3 is still the old
    one, byte for byte. A write_table that streamed to S3 would have replaced it."""
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    from shared import shards, storage

    def table(value):
        return shards.proposals_table([shards.Proposal(
            image_id="a", round=0, labels=np.full((5, 6), value, np.uint8), energy=1.0, unary_energy=0.5,
            smooth_energy=0.5, iterations=1, seconds=0.1, warm_start=False, solver="t:1")])

    uri = ShardStore(base).part("proposals", 0, 0, ext).uri
    shards.write_table(table(1), uri)
    old = storage.read_bytes(uri)
    real_parquet, real_new_file = pq.write_table, ipc.new_file

    def parquet_then_fail(t, sink, **kw):
        real_parquet(t, sink, **kw)
        raise OSError("the writer failed after its last byte")

    class ArrowThenFail:
        def __init__(self, sink, schema, **kw):
            self.writer = real_new_file(sink, schema, **kw)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.writer.close()

        def write_table(self, t):
            self.writer.write_table(t)
            raise OSError("the writer failed after its last byte")

    monkeypatch.setattr(pq, "write_table", parquet_then_fail)
    monkeypatch.setattr(ipc, "new_file", ArrowThenFail)
    with pytest.raises(OSError, match="after its last byte"):
        shards.write_table(table(2), uri)
    assert storage.read_bytes(uri) == old
    assert (shards.read_proposals(uri)[0].labels == 1).all()


def test_overwrite_is_whole(base, s3_endpoint):
    """A re-solved part replaces the old file in one PUT; readers see old or new, whole."""
    from shared import shards

    uri = ShardStore(base).part("proposals", 2, 0).uri
    for value in (1, 2):
        p = shards.Proposal(image_id="a", round=2, labels=np.full((5, 6), value, np.uint8), energy=1.0,
                            unary_energy=0.5, smooth_energy=0.5, iterations=1, seconds=0.1,
                            warm_start=False, solver="t:1")
        shards.write_table(shards.proposals_table([p]), uri)
        (back,) = shards.read_proposals(uri)
        assert (back.labels == value).all()


class FlakyProxy:
    """An HTTP proxy on 127.0.0.1 in front of moto that answers 503 SlowDown to the next
    `fail` requests whose path contains `match` (S3's throttling reply), and forwards
    everything else."""

    def __init__(self, endpoint: str):
        import http.client
        import http.server
        import threading

        self.fail, self.match, self.failed = 0, "", 0
        target = endpoint.split("//", 1)[1]
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                """The request body as sent; a chunked one (the AWS SDK's PUTs) with its framing."""
                if "chunked" not in self.headers.get("Transfer-Encoding", ""):
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                raw = b""
                while True:
                    line = self.rfile.readline()
                    raw += line
                    size = int(line.split(b";")[0].strip(), 16)
                    if size == 0:  # then trailers up to an empty line
                        while line not in (b"\r\n", b"\n", b""):
                            line = self.rfile.readline()
                            raw += line
                        return raw
                    raw += self.rfile.read(size + 2)

            def _any(self):
                body = self._body()
                if proxy.fail > 0 and proxy.match in self.path:
                    proxy.fail -= 1
                    proxy.failed += 1
                    reply = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply if self.command != "HEAD" else b"")
                    return
                conn = http.client.HTTPConnection(target, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}  # 100-continue is done
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                # a HEAD reply's length is the object's, not its (empty) body's
                self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD"
                                 else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky(s3_endpoint, monkeypatch):
    from shared import storage

    monkeypatch.setattr(storage, "BACKOFF_S", 0.05)
    proxy = FlakyProxy(s3_endpoint[0])
    yield proxy, s3_uri(proxy.endpoint, "flaky")
    proxy.close()


def test_transient_storage_errors_are_retried_with_backoff(flaky):
    """503s beyond the AWS SDK's own retries reach the storage layer, which tries again:
    the write and the read succeed; only a storm longer than every attempt is an error."""
    from shared import storage

    proxy, base = flaky
    uri = storage.join(base, "x.bin")
    proxy.fail, proxy.match = 4, "x.bin"  # the SDK tries 3 times: one storage-level retry needed
    storage.write_bytes(uri, b"payload")
    assert proxy.failed == 4
    proxy.fail = 4
    assert storage.read_bytes(uri) == b"payload"
    proxy.fail = 10**6
    with pytest.raises(OSError) as e:
        storage.read_bytes(uri)
    assert not isinstance(e.value, FileNotFoundError)
    proxy.fail = 0
    with pytest.raises(FileNotFoundError):  # "not found" is final at once: no retry
        storage.read_bytes(storage.join(base, "absent.bin"))


def test_feed_keeps_a_part_that_storage_cannot_deliver(flaky, monkeypatch, capsys):
    """A part whose reads keep failing is neither corrupt nor deleted: the feed tries it
    again at the next poll and takes it once storage answers."""
    from shared import shards, storage
    from trainer.proposals import ProposalFeed

    monkeypatch.setattr(storage, "ATTEMPTS", 2)
    proxy, base = flaky
    p = shards.Proposal(image_id="a", round=0, labels=np.full((5, 6), 1, np.uint8), energy=1.0, unary_energy=0.5,
                        smooth_energy=0.5, iterations=1, seconds=0.1, warm_start=False, solver="t:1")
    ShardStore(base, "r").write_proposals(0, 0, [p])
    ShardStore(base, "r").commit("proposals", 0, {0: ["a"]})
    uri = ShardStore(base).part("proposals", 0, 0).uri
    feed = ProposalFeed(ShardStore(base, "r"), [["a"]], sync=False, max_staleness=1)
    proxy.fail, proxy.match = 10**6, "part-0"
    feed.refresh(0, wait=False)
    assert feed.labels == {} and "trying again" in capsys.readouterr().out
    proxy.fail = 0
    assert storage.exists(uri)
    feed.refresh(0, wait=False)
    assert (feed.labels["a"] == 1).all()


def test_feed_waits_out_a_storage_outage_then_gives_up_after_its_patience(flaky, monkeypatch, capsys):
    """The trainer's proposal feed, waiting for a round (sync), rides out 503s on every
    proposals request (past the storage layer's own retries) with backoff and takes the
    part once storage answers; an outage past --storage-patience, of the round's manifest
    or of a part, ends the wait in one line naming the URI and the option."""
    from shared import shards, storage
    from trainer.proposals import ProposalFeed

    monkeypatch.setattr(storage, "ATTEMPTS", 1)  # the storage layer's own retries: the test above
    proxy, base = flaky
    p = shards.Proposal(image_id="a", round=0, labels=np.full((5, 6), 1, np.uint8), energy=1.0, unary_energy=0.5,
                        smooth_energy=0.5, iterations=1, seconds=0.1, warm_start=False, solver="t:1")
    ShardStore(base, "r").write_proposals(0, 0, [p])
    ShardStore(base, "r").commit("proposals", 0, {0: ["a"]})

    def feed(patience):
        return ProposalFeed(ShardStore(base, "r"), [["a"]], sync=True, max_staleness=0, poll_s=0.05,
                            storage_patience_s=patience)

    capsys.readouterr()
    proxy.fail, proxy.match = 10**6, "proposals"
    waiting, out = feed(600), ""
    refresh = threading.Thread(target=waiting.refresh, args=(0, True))  # until two tries failed, then storage answers
    refresh.start()
    deadline = time.monotonic() + 120
    while out.count("warning: proposals: storage error") < 2 and refresh.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
        out += capsys.readouterr().out
    proxy.fail = 0
    refresh.join(120)
    assert not refresh.is_alive() and waiting.current == {0: 0} and (waiting.labels["a"] == 1).all()
    assert out.count("warning: proposals: storage error") >= 2 and "HTTP status 503" in out, out
    for match, uri in (("proposals", ShardStore(base).manifest_uri("proposals", 0)),
                       ("part-0", ShardStore(base).part("proposals", 0, 0).uri)):
        proxy.fail, proxy.match = 10**6, match
        with pytest.raises(UserError) as e:
            feed(1).refresh(0, wait=True)
        proxy.fail = 0
        message = str(e.value)
        assert message.startswith(f"{uri}: storage failing for over 1s (--storage-patience)") and "\n" not in message
    assert not proxy.fail and storage.exists(ShardStore(base).part("proposals", 0, 0).uri)  # nothing deleted


def test_a_run_folder_on_s3_resumes_from_its_config_and_checkpoint(base, s3_endpoint):
    """`--resume s3://…` reads the run's config.toml and checkpoint through the storage
    layer (not open()), and every call on one bucket shares one filesystem client."""
    from shared import storage
    from shared.config import to_dict
    from trainer.config import TrainConfig
    from trainer.runlog import RunLog, load_checkpoint
    from trainer.tomlio import dumps, read_toml

    cfg = TrainConfig(data="/d", method="grid-tr", epochs=3, out=base)
    storage.write_bytes(storage.join(base, "config.toml"), dumps(to_dict(cfg)).encode())
    RunLog(base).save_checkpoint("last.pt", {"model": {}, "num_classes": 4, "global_epoch": 2})
    values = read_toml(storage.join(base, "config.toml"), "--resume")
    assert values["method"] == "grid-tr" and values["epochs"] == 3
    assert load_checkpoint(storage.join(base, "checkpoints", "last.pt"))["global_epoch"] == 2
    with pytest.raises(UserError, match="--resume: .*missing.*does not exist"):
        read_toml(storage.join(base, "missing", "config.toml"), "--resume")
    assert storage.resolve(storage.join(base, "a"))[0] is storage.resolve(storage.join(base, "b", "c"))[0]


def test_a_missing_bucket_is_final_at_once(s3_endpoint, capsys, monkeypatch):
    """No retry mends a bucket that does not exist: the first error is raised, with no
    wait before it (the waits are counted, not timed: a busy machine's request is slow)."""
    from shared import storage

    uri = f"s3://no-such-bucket-here/x.bin?endpoint_override={s3_endpoint[0]}&scheme=http&region=us-east-1"
    waits = []
    monkeypatch.setattr(storage.time, "sleep", waits.append)
    with pytest.raises(OSError, match="NO_SUCH_BUCKET"):
        storage.write_bytes(uri, b"x")
    assert waits == [] and "trying again" not in capsys.readouterr().out


def test_a_run_on_s3_killed_then_resumed_then_evaluated(base, synthetic_set, tmp_path):
    """`train --out s3://…` (PCE, then Grid-TR with its shards on S3 too), the driver killed
    once the first checkpoint is on S3 and resumed by `train --resume s3://…` on a machine without Ray Train's
    local state (only the object store survives): every epoch logged once, the run's
    outputs on S3, and `eval` of the S3 checkpoint gives the run's final val mIoU."""
    import json
    import signal

    from shared import storage
    from tests.helpers import cli_in_process, end_session, popen_cli, run_cli
    from trainer.driver import local_ray_train_dir
    from trainer.runlog import load_checkpoint

    data = synthetic_set(4, 2, 48)
    metrics_uri = storage.join(base, "metrics.jsonl")

    def epochs():
        raw = storage.read_if_exists(metrics_uri)
        return [json.loads(line)["epoch"] for line in (raw or b"").decode().splitlines() if line.strip()]

    last_pt = storage.join(base, "checkpoints", "last.pt")
    proc = popen_cli("train", "--data", data, "--method", "grid-tr", "--epochs", 2, "--pretrain-epochs", 1,
                     "--epochs-per-round", 1, "--schedule", "sync", "--solvers", 1, "--batch-size", 4,
                     "--shard-size", 2, "--max-iter", 3, "--out", base, log_path=str(tmp_path / "first.log"))
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and not storage.exists(last_pt):
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed:\n" + open(tmp_path / "first.log").read()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        end_session(proc)  # its local Ray too
    run_id = json.loads(storage.read_bytes(storage.join(base, "run.json")))["run_id"]
    killed_at = load_checkpoint(last_pt)["global_epoch"]
    assert 1 <= killed_at < 3 and epochs()[:killed_at] == list(range(1, killed_at + 1))
    local_state = local_ray_train_dir(run_id)
    assert os.path.isdir(local_state)
    shutil.rmtree(local_state)  # another machine: only S3 holds the run

    try:
        proc = run_cli("train", "--resume", base, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        shutil.rmtree(local_state, ignore_errors=True)
    assert epochs() == [1, 2, 3]
    assert load_checkpoint(last_pt)["global_epoch"] == 3
    summary = json.loads(storage.read_bytes(storage.join(base, "summary.json")))
    assert summary["run_id"] == run_id and summary["proposals_missing"] == 0 and summary["epochs"] == 2
    assert storage.list_dir(storage.join(base, "panels"))[-1] == "epoch-003"
    # TensorBoard's events: the killed run's file (uploaded after its epoch) and the resumed run's
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = set()
    for name in storage.list_dir(storage.join(base, "tensorboard")):
        (tmp_path / name).write_bytes(storage.read_bytes(storage.join(base, "tensorboard", name)))
        events = EventAccumulator(str(tmp_path / name))
        events.Reload()
        steps |= {e.step for e in events.Scalars("loss")}
    assert steps == {1, 2, 3}

    proc = cli_in_process("eval", "--checkpoint", last_pt, "--data", data, "--json")  # no Ray: in this process
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1])["val_miou"] == pytest.approx(summary["val_miou"], abs=1e-6)


def test_backbone_weights_from_s3(base, s3_endpoint):
    """--backbone-weights s3://… is read through the storage layer; a missing object is
    one error naming it."""
    import torch

    from shared import storage
    from trainer.model import DeepLabV3Plus, load_backbone_weights

    src = DeepLabV3Plus(3)
    with torch.no_grad():
        for p in src.backbone.parameters():
            p.normal_()
    buf = io.BytesIO()
    torch.save(src.backbone.state_dict(), buf)
    uri = storage.join(base, "mobilenet_v2.pth")
    storage.write_bytes(uri, buf.getvalue())
    dst = DeepLabV3Plus(3)
    load_backbone_weights(dst, uri)
    for k, v in src.backbone.state_dict().items():
        assert torch.equal(dst.backbone.state_dict()[k], v), k
    missing = storage.join(base, "absent.pth")
    with pytest.raises(UserError, match="absent.pth.*: backbone weights file not found"):
        load_backbone_weights(dst, missing)
