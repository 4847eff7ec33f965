"""The shard contract between the trainer and the solver farm (SPEC §6): the rows.

Snapshot rows hold the network's −log q over the label set L; proposal rows hold the
stage-A labels, energies and timing. Arrays travel as raw little-endian bytes with
their shape in other columns: no pickle. Where the files live is `shared.shard_store`.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from shared import storage
from shared.errors import CorruptShardError, ForeignShardError
from shared.labels import UNLABELLED

FORMAT_VERSION = "2"
NEG_LOG_Q_STEP = 1 / 12  # nats per code: 255 codes reach 21.25 > −log(1e-8), the solver's floor
KINDS = ("snapshots", "proposals")
RUN_ID_KEY = b"trseg.run_id"  # schema metadata: the run that wrote the shard (SPEC §6)

SNAPSHOT_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("round", pa.int32()),
        ("image_uri", pa.string()),
        ("seeds_uri", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("num_classes", pa.int32()),
        ("label_set", pa.list_(pa.uint8())),
        ("prob_height", pa.int32()),
        ("prob_width", pa.int32()),
        # uint8 codes of -log q (code × neg_log_q_step nats), shape (|L|, prob_height, prob_width)
        ("neg_log_q", pa.binary()),
        ("neg_log_q_step", pa.float32()),
    ],
    metadata={"trseg.kind": "snapshots", "trseg.format_version": FORMAT_VERSION},
)

PROPOSAL_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("round", pa.int32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("labels", pa.binary()),  # uint8 (height, width), C order
        ("energy", pa.float64()),
        ("unary_energy", pa.float64()),
        ("smooth_energy", pa.float64()),
        ("iterations", pa.int32()),
        ("seconds", pa.float64()),
        ("warm_start", pa.bool_()),
        ("solver", pa.string()),  # "<node>:<pid>" of the process that solved it
        ("changed", pa.float32()),  # fraction of unseeded pixels where labels ≠ the network's argmax
    ],
    metadata={"trseg.kind": "proposals", "trseg.format_version": FORMAT_VERSION},
)

SCHEMAS = {"snapshots": SNAPSHOT_SCHEMA, "proposals": PROPOSAL_SCHEMA}


def label_set(seeds: np.ndarray, num_classes: int, restrict: bool = True) -> np.ndarray:
    """The solver's label set L (SPEC §1): the seed labels if there are two or more."""
    present = np.unique(seeds[seeds != UNLABELLED]).astype(np.uint8)
    if restrict and len(present) >= 2:
        return present
    return np.arange(num_classes, dtype=np.uint8)


@dataclass
class Snapshot:
    image_id: str
    round: int
    image_uri: str
    seeds_uri: str
    height: int
    width: int
    num_classes: int
    label_set: np.ndarray  # uint8 (|L|,)
    neg_log_q: np.ndarray  # float (|L|, h, w); stored as 8-bit codes, see quantize_neg_log_q

    def probs(self) -> np.ndarray:
        """K×h×w float32 probabilities; labels outside L get probability 0."""
        q = np.zeros((self.num_classes, *self.neg_log_q.shape[1:]), np.float32)
        q[self.label_set] = np.exp(-np.asarray(self.neg_log_q, np.float32))
        return q


@dataclass
class Proposal:
    image_id: str
    round: int
    labels: np.ndarray  # uint8 (H, W)
    energy: float
    unary_energy: float
    smooth_energy: float
    iterations: int
    seconds: float
    warm_start: bool
    solver: str
    changed: float = 0.0  # fraction of unseeded pixels where stage A overrode the network

def quantize_neg_log_q(neg_log_q: np.ndarray, step: float = NEG_LOG_Q_STEP) -> np.ndarray:
    """8-bit codes of −log q, rounded to `step` nats and clipped at 255 codes.

    The unary cost λ·(−log q) then changes by at most λ·step/2 per pixel (0.004 at
    λ = 0.1), against pairwise weights of order β·H·W/|N8| ≈ 25: negligible for
    stage A, and it keeps a VOC-sized snapshot near 20 KB instead of 63 KB in float16.
    """
    return np.clip(np.rint(np.asarray(neg_log_q, np.float32) / step), 0, 255).astype(np.uint8)


def _with_run(table: pa.Table, run_id: str) -> pa.Table:
    return table.replace_schema_metadata({**table.schema.metadata, RUN_ID_KEY: run_id.encode()}) if run_id else table


def snapshots_table(rows: list[Snapshot], run_id: str = "") -> pa.Table:
    cols = {
        "image_id": [s.image_id for s in rows],
        "round": [s.round for s in rows],
        "image_uri": [s.image_uri for s in rows],
        "seeds_uri": [s.seeds_uri for s in rows],
        "height": [s.height for s in rows],
        "width": [s.width for s in rows],
        "num_classes": [s.num_classes for s in rows],
        "label_set": [s.label_set.astype(np.uint8).tolist() for s in rows],
        "prob_height": [s.neg_log_q.shape[1] for s in rows],
        "prob_width": [s.neg_log_q.shape[2] for s in rows],
        "neg_log_q": [quantize_neg_log_q(s.neg_log_q).tobytes() for s in rows],
        "neg_log_q_step": [NEG_LOG_Q_STEP] * len(rows),
    }
    return _with_run(pa.table(cols, schema=SNAPSHOT_SCHEMA), run_id)


def proposals_table(rows: list[Proposal], run_id: str = "") -> pa.Table:
    cols = {
        "image_id": [p.image_id for p in rows],
        "round": [p.round for p in rows],
        "height": [p.labels.shape[0] for p in rows],
        "width": [p.labels.shape[1] for p in rows],
        "labels": [np.ascontiguousarray(p.labels, np.uint8).tobytes() for p in rows],
        "energy": [p.energy for p in rows],
        "unary_energy": [p.unary_energy for p in rows],
        "smooth_energy": [p.smooth_energy for p in rows],
        "iterations": [p.iterations for p in rows],
        "seconds": [p.seconds for p in rows],
        "warm_start": [p.warm_start for p in rows],
        "solver": [p.solver for p in rows],
        "changed": [p.changed for p in rows],
    }
    return _with_run(pa.table(cols, schema=PROPOSAL_SCHEMA), run_id)


def write_table(table: pa.Table, uri: str) -> None:
    """Serialise in memory, then commit the whole file atomically."""
    buf = io.BytesIO()
    if _is_arrow(uri):
        with ipc.new_file(buf, table.schema) as writer:
            writer.write_table(table)
    else:
        pq.write_table(table, buf, compression="zstd", compression_level=ZSTD_LEVEL[kind_of(table)])
    storage.write_bytes(uri, buf.getvalue())


# Label maps compress to 3.0 KB a VOC image at level 15 (4.1 KB at 1) for ~7 ms;
# snapshot codes gain little past level 1.
ZSTD_LEVEL = {"snapshots": 1, "proposals": 15}


def kind_of(table: pa.Table) -> str:
    return (table.schema.metadata or {}).get(b"trseg.kind", b"snapshots").decode()


def _is_arrow(uri: str) -> bool:
    return uri.split("?", 1)[0].endswith(".arrow")


def read_table(uri: str, kind: str, run_id: str = "") -> pa.Table:
    """Read one shard and check it against the contract.

    FileNotFoundError if it is absent, OSError if storage kept failing (transient: see
    `shared.storage`), CorruptShardError if its bytes do not parse or break the
    contract, ForeignShardError if `run_id` is given and another run wrote it.
    """
    data = pa.py_buffer(storage.read_bytes(uri))
    try:
        if _is_arrow(uri):
            table = ipc.open_file(data).read_all()
        else:
            table = pq.read_table(pa.BufferReader(data))
    except (OSError, pa.ArrowException) as e:  # the bytes are here: any failure is the file's
        raise CorruptShardError(uri, str(e).splitlines()[0] if str(e) else type(e).__name__)
    _check_schema(uri, table.schema, kind, run_id)
    return table


def check_shard(uri: str, kind: str, run_id: str = "") -> None:
    """Check a shard's footer and schema without decoding its rows (a truncated file
    fails here); the errors of `read_table`."""
    data = pa.py_buffer(storage.read_bytes(uri))
    try:
        schema = ipc.open_file(data).schema if _is_arrow(uri) else pq.read_schema(pa.BufferReader(data))
    except (OSError, pa.ArrowException) as e:
        raise CorruptShardError(uri, str(e).splitlines()[0] if str(e) else type(e).__name__)
    _check_schema(uri, schema, kind, run_id)


def run_of(schema: pa.Schema) -> str:
    """The id of the run that wrote a shard ('' for a shard written outside a run)."""
    return (schema.metadata or {}).get(RUN_ID_KEY, b"").decode()


def _check_schema(uri: str, schema: pa.Schema, kind: str, run_id: str = "") -> None:
    meta = schema.metadata or {}
    if meta.get(b"trseg.kind") != kind.encode():
        raise CorruptShardError(uri, f"not a {kind} shard")
    if meta.get(b"trseg.format_version") != FORMAT_VERSION.encode():
        raise CorruptShardError(uri, f"format version {meta.get(b'trseg.format_version')!r}")
    if not schema.remove_metadata().equals(SCHEMAS[kind].remove_metadata()):
        raise CorruptShardError(uri, "schema differs from the contract")
    if run_id and run_of(schema) != run_id:
        raise ForeignShardError(uri, run_of(schema), run_id)


def read_snapshots(uri: str, run_id: str = "") -> list[Snapshot]:
    return snapshot_rows(read_table(uri, "snapshots", run_id), uri)


def snapshot_rows(table: pa.Table, uri: str) -> list[Snapshot]:
    """The rows of a snapshot table that `read_table` returned for `uri`."""
    t = table.to_pydict()
    out = []
    for i in range(len(t["image_id"])):
        labels = np.asarray(t["label_set"][i], np.uint8)
        shape = (len(labels), t["prob_height"][i], t["prob_width"][i])
        arr = np.frombuffer(t["neg_log_q"][i], np.uint8)
        if arr.size != np.prod(shape):
            raise CorruptShardError(uri, f"row {i}: neg_log_q holds {arr.size} values, not {shape}")
        arr = arr.astype(np.float32) * np.float32(t["neg_log_q_step"][i])
        out.append(
            Snapshot(
                image_id=t["image_id"][i], round=t["round"][i], image_uri=t["image_uri"][i],
                seeds_uri=t["seeds_uri"][i], height=t["height"][i], width=t["width"][i],
                num_classes=t["num_classes"][i], label_set=labels, neg_log_q=arr.reshape(shape),
            )
        )
    return out


def read_proposals(uri: str, run_id: str = "") -> list[Proposal]:
    t = read_table(uri, "proposals", run_id).to_pydict()
    out = []
    for i in range(len(t["image_id"])):
        shape = (t["height"][i], t["width"][i])
        arr = np.frombuffer(t["labels"][i], np.uint8)
        if arr.size != shape[0] * shape[1]:
            raise CorruptShardError(uri, f"row {i}: labels hold {arr.size} values, not {shape}")
        out.append(
            Proposal(
                image_id=t["image_id"][i], round=t["round"][i], labels=arr.reshape(shape),
                energy=t["energy"][i], unary_energy=t["unary_energy"][i],
                smooth_energy=t["smooth_energy"][i], iterations=t["iterations"][i],
                seconds=t["seconds"][i], warm_start=t["warm_start"][i], solver=t["solver"][i],
                changed=t["changed"][i],
            )
        )
    return out
