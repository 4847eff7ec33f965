"""moto's S3 server on 127.0.0.1 that counts the requests it answers.

    python benchmarks/s3_counter.py PORT

`GET /__requests__` answers {"read", "write", "list", "by_request"} counted since the
start. `local_s3` runs it as a subprocess, so that the requests of every process of a
run (driver, farm, trainer worker, solver actors) are counted in one place:
benchmarks/run.py reads the counts, the tests' S3 endpoint (tests/conftest.py) is the
same server.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

COUNTS_PATH = "/__requests__"
_LISTING_KEYS = ("list-type", "prefix", "delimiter")


def classify(method: str, path: str, query: str) -> str:
    """read, write or list, for one request on a path-style endpoint (/bucket/key)."""
    if method in ("GET", "HEAD"):
        bucket_only = "/" not in path.strip("/")
        return "list" if bucket_only and any(k in urllib.parse.parse_qs(query) for k in _LISTING_KEYS) else "read"
    return "write"  # PUT, POST (multipart uploads), DELETE


def shape(path: str) -> str:
    """A request's path with round and part numbers blanked: what kind of object it is."""
    return re.sub(r"part-\d+", "part-K", re.sub(r"round=\d+", "round=R", path))


@contextlib.contextmanager
def local_s3(bucket: str):
    """This server in a subprocess on a free 127.0.0.1 port, with `bucket` created;
    yields (endpoint, counts()); stopped afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # creating the bucket is also the readiness probe
            try:
                urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{bucket}", method="PUT"), timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the local S3 server ({__file__}) did not start")
                time.sleep(0.2)
        yield endpoint, lambda: json.loads(urllib.request.urlopen(f"{endpoint}{COUNTS_PATH}", timeout=10).read())
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve(port: int) -> None:
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    moto = DomainDispatcherApplication(create_backend_app)
    counts: collections.Counter = collections.Counter()
    lock = threading.Lock()

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path == COUNTS_PATH:
            with lock:
                body = {k: counts[k] for k in ("read", "write", "list")}
                body["by_request"] = {k[1]: v for k, v in counts.most_common() if isinstance(k, tuple)}
            start_response("200 OK", [("Content-Type", "application/json")])
            return [json.dumps(body).encode()]
        method = environ["REQUEST_METHOD"]
        kind = classify(method, path, environ.get("QUERY_STRING", ""))
        with lock:
            counts[kind] += 1
            counts[("by", f"{kind} {method} {shape(path)}")] += 1
        return moto(environ, start_response)

    make_server("127.0.0.1", port, app, threaded=True).serve_forever()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
