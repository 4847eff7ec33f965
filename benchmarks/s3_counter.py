"""moto's S3 server on 127.0.0.1 that counts the requests it answers (benchmarks only).

    python benchmarks/s3_counter.py PORT

`GET /__requests__` answers {"read", "write", "list", "by_request"} counted since the
start. benchmarks/run.py runs it as a subprocess, so that the requests of every process
of a run (driver, farm, trainer worker, solver actors) are counted in one place.
"""
from __future__ import annotations

import collections
import json
import re
import sys
import threading
import urllib.parse

from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server

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


def serve(port: int) -> None:
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
