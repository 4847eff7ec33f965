"""Fixtures every test file can use. Ray always binds to 127.0.0.1 in tests (see the
developers' guide): the environment below is set before anything imports Ray."""
import os

import pytest

from tests.helpers import AWS_ENV, BUCKET, s3_uri

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# What shared.ray_session gives a private Ray's Ray Train runs, for the multi-node
# clusters the tests start too (their processes inherit this environment)
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# One token for every Ray this process starts, as the CLI would use: Ray caches the token
# it first reads, so a test that starts Ray with the mode unset (Ray then turns token mode
# on and writes ~/.ray/auth_token) would leave a later `connect()`, which names
# ~/.trseg/ray_auth_token, with a driver and a GCS holding different tokens.
os.environ.setdefault("RAY_AUTH_MODE", "token")
from shared.ray_session import private_token  # noqa: E402 (after the environment above)

private_token(local=True)


@pytest.fixture(scope="session")
def synthetic_set(tmp_path_factory):
    """make(n_train, n_val, size, seed=0) -> the root of a synthetic set (K = 4), made once
    per argument tuple in a test session. Tests that change files copy it first."""
    from trainer.synthetic import make_synthetic

    made = {}

    def make(n_train: int, n_val: int, size: int, seed: int = 0) -> str:
        key = (n_train, n_val, size, seed)
        if key not in made:
            root = tmp_path_factory.mktemp("synthetic") / "data"
            make_synthetic(str(root), n_train=n_train, n_val=n_val, size=size, classes=4, seed=seed)
            made[key] = str(root)
        return made[key]

    return make


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 in a subprocess (benchmarks/s3_counter.py's), with a
    bucket, and test credentials in this process's environment (which CLI subprocesses
    inherit); stopped afterwards."""
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("moto")
    from benchmarks.s3_counter import local_s3

    saved = {k: os.environ.get(k) for k in AWS_ENV}
    os.environ.update(AWS_ENV)
    try:
        with local_s3(BUCKET) as (endpoint, _):
            yield endpoint, boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_base(s3_endpoint):
    """A fresh s3:// base URI on the moto server."""
    return s3_uri(s3_endpoint[0])
