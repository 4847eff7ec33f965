"""Local paths and pyarrow filesystem URIs (s3://, gs://, hdfs://) behind one API.

Writes are atomic: a local file is written under a temporary name in the same folder
and renamed; an object appears in an object store only once its upload completes (one
PUT below the part size, a multipart upload above), so a reader never sees half a file
(SPEC §6).

Errors fall into three cases. "Not found" (FileNotFoundError) and refusals
(PermissionError, …, and an object store's missing bucket or denied access) are final
at once. Any other OSError (an S3 503, a reset connection, a listing that timed out)
is taken as transient: the call is repeated
with exponential backoff, ATTEMPTS times in all, and only then raised. Whether the
bytes make sense is not this module's business: `shared.shards` calls a file that
reads but does not parse corrupt.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import io
import os
import time
import urllib.parse
import uuid

import pyarrow.fs as pafs

ATTEMPTS = 5  # tries of one storage call
BACKOFF_S = 0.5  # wait after the first failure, doubled after each: 7.5 s in all
FINAL = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
# errors that pyarrow raises as plain OSError but that no retry mends (an object store's,
# and a local folder opened as a file)
FINAL_MESSAGES = ("NO_SUCH_BUCKET", "ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH",
                  "is a directory")


def retried(fn):
    """Repeat `fn` on transient OSErrors (see the module docstring)."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        for attempt in range(ATTEMPTS):
            try:
                return fn(*args, **kwargs)
            except FINAL:
                raise
            except OSError as e:
                if attempt == ATTEMPTS - 1 or any(m in str(e) for m in FINAL_MESSAGES):
                    raise
                wait = BACKOFF_S * 2 ** attempt
                print(f"warning: storage error ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                      f"trying again in {wait:g}s", flush=True)
                time.sleep(wait)

    return call


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


@functools.lru_cache(maxsize=16)
def _remote_filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    """One client per scheme, bucket and options (a new one per call costs a TLS handshake
    and a credential lookup): `root` is scheme://authority?query."""
    if root.startswith("s3://") and "allow_delayed_open=" not in root:
        # no multipart upload opened up front: a file below the part size is one PUT
        root += ("&" if "?" in root else "?") + "allow_delayed_open=true"
    return pafs.FileSystem.from_uri(root)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it for a local path or a URI."""
    if is_remote(uri):
        parts = urllib.parse.urlsplit(uri)
        fs, top = _remote_filesystem(f"{parts.scheme}://{parts.netloc}" + (f"?{parts.query}" if parts.query else ""))
        return fs, top.rstrip("/") + parts.path if top else parts.path
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(base: str, *parts: str) -> str:
    """base/part/...; a URI's query (s3://b/p?endpoint_override=...) stays at the end."""
    query = ""
    if is_remote(base) and "?" in base:
        base, query = base.split("?", 1)
        query = "?" + query
    return "/".join([base.rstrip("/"), *parts]) + query


@retried
def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file atomically."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{os.path.dirname(path)}/.tmp-{uuid.uuid4().hex}-{os.path.basename(path)}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:  # a full disk, ^C: leave no partial file behind
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def create_new(uri: str, data: bytes) -> bool:
    """Write a small file only if none exists; False if one does. Exclusive on a local
    filesystem (O_EXCL). An object store has no such call in pyarrow: there the file is
    written if absent and read back, which catches a writer that came first, not one
    racing within the same instant."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True
    if exists(uri):
        return False
    write_bytes(uri, data)
    return read_bytes(uri) == data


def write_csv(uri: str, header: list[str], rows) -> None:
    """A CSV file (the header, then one row per sequence of values; None is written
    empty) at a path or URI."""
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(header)
    w.writerows(rows)
    write_bytes(uri, text.getvalue().encode())


@retried
def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_if_exists(uri: str) -> bytes | None:
    """The file's bytes, or None if it does not exist: one request on an object store
    for an absent object, where `exists` costs two (pyarrow looks for a folder too)."""
    try:
        return read_bytes(uri)
    except FileNotFoundError:
        return None


@retried
def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


@retried
def list_dir(uri: str) -> list[str]:
    """Base names of the entries directly under uri (empty if it does not exist)."""
    fs, path = resolve(uri)
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=False)
    return sorted(info.base_name for info in fs.get_file_info(selector))


@retried
def delete_tree(uri: str) -> None:
    """Remove a file or a whole folder (prefix) if it exists."""
    fs, path = resolve(uri)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind != pafs.FileType.NotFound:
        fs.delete_file(path)


@retried
def delete(uri: str) -> None:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_file(path)
