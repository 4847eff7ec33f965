"""What a run writes into --out (SPEC §7): metrics.jsonl, TensorBoard events, checkpoints.

Everything goes through shared.storage, so --out may be a local folder or an object
store URI. TensorBoard's writer appends to a local file: for a remote --out it writes
into a local temporary folder whose event files are uploaded whole (one PUT each)
after every epoch.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile

import torch

from shared import storage
from shared.errors import UserError
from trainer.run_folder import RunFolder


class RunLog:
    def __init__(self, out: str, enabled: bool = True):
        self.out = out.rstrip("/")
        self.enabled = enabled
        self.metrics_uri = RunFolder(self.out).metrics
        self._lines = []
        self._tb = None
        self._tb_dir = None  # the local folder of TensorBoard's events for a remote --out
        if enabled and storage.exists(self.metrics_uri):  # a resumed run keeps its history
            self._lines = storage.read_bytes(self.metrics_uri).decode().splitlines()
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            if storage.is_remote(out):
                self._tb_dir = tempfile.mkdtemp(prefix="trseg-tensorboard-")
            self._tb = SummaryWriter(self._tb_dir or storage.resolve(RunFolder(self.out).tensorboard)[1])

    def log_epoch(self, record: dict, step: int) -> None:
        """Append one epoch's record to metrics.jsonl and its numbers to TensorBoard."""
        if not self.enabled:
            return
        self._lines.append(json.dumps(record))
        storage.write_bytes(self.metrics_uri, ("\n".join(self._lines) + "\n").encode())
        if self._tb is not None:
            for key, value in _flatten(record):
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
            self._upload_events()

    def drop_epochs_after(self, epoch: int) -> None:
        """Forget records past `epoch`: a resumed run trains them again."""
        self._lines = [line for line in self._lines if json.loads(line).get("epoch", 0) <= epoch]

    def log_image(self, tag: str, image_hwc, step: int) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_image(tag, image_hwc, step, dataformats="HWC")

    def save_checkpoint(self, name: str, state: dict | bytes) -> None:
        """checkpoints/NAME: `state`, or its `checkpoint_bytes`."""
        self.write_checkpoint(RunFolder(self.out).checkpoint(name), state)

    def write_checkpoint(self, uri: str, state: dict | bytes) -> None:
        """A checkpoint file of the run folder (`RunFolder.last`, `.best`, …): `state`, or
        its `checkpoint_bytes` (serialised once for several files)."""
        if self.enabled:
            storage.write_bytes(uri, state if isinstance(state, bytes) else checkpoint_bytes(state))

    def _upload_events(self) -> None:
        """A remote --out: the event files written so far, each whole (a resumed run's
        writer starts a new file, so the earlier ones stay)."""
        if self._tb_dir is None:
            return
        for name in os.listdir(self._tb_dir):
            with open(os.path.join(self._tb_dir, name), "rb") as f:
                storage.write_bytes(storage.join(RunFolder(self.out).tensorboard, name), f.read())

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._upload_events()
        if self._tb_dir is not None:
            shutil.rmtree(self._tb_dir, ignore_errors=True)


def checkpoint_bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def load_checkpoint(uri: str) -> dict:
    """A checkpoint written by RunLog.save_checkpoint (weights_only: never unpickles code)."""
    try:
        state = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{uri}: checkpoint not found") from None
    except Exception as e:  # torch raises many types for garbage files
        raise UserError(f"{uri}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or "model" not in state or "num_classes" not in state:
        raise UserError(f"{uri}: not a trseg checkpoint (no model weights)")
    return state


def _flatten(record: dict, prefix: str = ""):
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            yield name, value
        elif isinstance(value, dict):
            yield from _flatten(value, name + "/")
        elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
            for i, v in enumerate(value):
                yield f"{name}/{i}", v
