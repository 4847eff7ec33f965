"""deploy/: the cluster-launcher config passes Ray's validator; submit.py builds the CLI argv."""
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT
CLUSTER_YAML = os.path.join(ROOT, "deploy", "cluster.yaml")
sys.path.insert(0, os.path.join(ROOT, "deploy"))

import submit  # noqa: E402  deploy/submit.py


@pytest.fixture(scope="module")
def config():
    yaml = pytest.importorskip("yaml")  # pyyaml comes with ray
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


def test_cluster_yaml_passes_rays_validator(config):
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import validate_config

    validate_config(config)


def test_node_types(config):
    types = config["available_node_types"]
    assert config["head_node_type"] == "head"
    assert {"head", "trainer", "solver"} <= set(types)
    for name in ("trainer", "solver"):
        assert 0 <= types[name]["min_workers"] <= types[name]["max_workers"], name
    assert sum(t.get("min_workers", 0) for t in types.values()) <= config["max_workers"]
    assert types["solver"]["resources"].get("solver_node", 0) >= 1
    assert types["solver"]["resources"]["solver_node"] <= types["solver"]["resources"]["CPU"]
    assert types["solver"]["resources"].get("GPU", 0) == 0
    assert types["trainer"]["resources"].get("GPU", 0) >= 1
    assert "solver_node" not in types["trainer"]["resources"]
    assert "solver_node" not in types["head"]["resources"]


def test_setup_installs_the_working_tree(config):
    mounts = config["file_mounts"]
    remote = [dst for dst, src in mounts.items() if src == "."]
    assert remote, "the working tree is not among file_mounts"
    assert any("pip install" in c and remote[0] in c for c in config["setup_commands"])


def _resolved(argv: list[str]) -> dict:
    """The configuration the real trainer CLI resolves from argv (`train --print-config`)."""
    import tomllib

    from click.testing import CliRunner
    from trainer.cli import cli

    saved = dict(os.environ)  # the CLI sets Ray's environment (auth mode, token path) for this process
    try:
        result = CliRunner().invoke(cli, [*argv, "--print-config"], catch_exceptions=False)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert result.exit_code == 0, result.output
    return tomllib.loads(result.output)


def _only(types: dict, name: str) -> set:
    """The resources that node type `name` advertises and no other type does."""
    return set(types[name]["resources"]).difference(
        {"CPU", "GPU", "memory"}, *(t["resources"] for other, t in types.items() if other != name))


def test_node_resources_are_what_only_their_node_types_advertise_and_the_cli_lacks(config):
    """The CLI's own defaults name no resource (solver actors and trainer workers would
    land anywhere), so submit.py must add the ones only the solver and trainer node types
    of cluster.yaml advertise; what the CLI then resolves is those resources."""
    types = config["available_node_types"]
    assert _only(types, "solver") == {submit.SOLVER_RESOURCE}
    assert _only(types, "trainer") == {submit.TRAINER_RESOURCE}
    args = ["--data", "/data/voc", "--method", "grid-tr"]
    plain, submitted = _resolved(["train", *args]), _resolved(submit.build_argv(args))
    assert plain.get("solver_resource") is None and plain.get("trainer_resource") is None
    assert (submitted["solver_resource"], submitted["trainer_resource"]) == (submit.SOLVER_RESOURCE, submit.TRAINER_RESOURCE)


DEFAULTS = ["--solver-resource", "solver_node", "--trainer-resource", "trainer_node"]


def test_build_argv_defaults_the_node_type_resources():
    args = ["--data", "/data/voc", "--method", "grid-tr", "--solvers", "4:64", "--shards", "s3://b/p"]
    assert submit.build_argv(args) == ["--address", "auto", "train", *args, *DEFAULTS]


@pytest.mark.parametrize("given", [["--solver-resource", "big_solver"], ["--solver-resource=big_solver"]])
def test_build_argv_keeps_a_given_solver_resource(given):
    args = ["--data", "d", *given]
    argv = submit.build_argv(args)
    assert argv == ["--address", "auto", "train", *args, "--trainer-resource", "trainer_node"]
    assert "solver_node" not in argv


def test_build_argv_tolerates_separator_and_subcommand():
    assert submit.build_argv(["--", "train", "--data", "d"]) == ["--address", "auto", "train", "--data", "d", *DEFAULTS]


def test_build_argv_parses_with_the_trainer_cli():
    """The argv is one the trainer's click group accepts (without running anything)."""
    from trainer.cli import cli

    argv = submit.build_argv(["--data", "d", "--method", "grid-tr", "--solvers", "2:8", "--shards", "s3://b/p"])
    ctx = cli.make_context("trainer", list(argv), resilient_parsing=True)
    assert ctx.params["address"] == "auto"
    sub = cli.get_command(ctx, "train")
    sub_ctx = sub.make_context("train", argv[3:], parent=ctx, resilient_parsing=True)
    assert sub_ctx.params["solver_resource"] == "solver_node"
    assert sub_ctx.params["trainer_resource"] == "trainer_node"
    assert sub_ctx.params["solvers"] == "2:8"
    assert sub_ctx.params["shards"] == "s3://b/p"


def test_submit_help_runs_without_a_cluster():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "deploy", "submit.py"), "--help"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "--solver-resource" in out.stdout and "--shards" in out.stdout


def test_nodes_boot_pinned_authenticated_with_the_data_and_no_idle_gpu(config):
    types = config["available_node_types"]
    assert types["trainer"]["min_workers"] == 0
    assert not any("labels" in t for t in types.values()), "node labels that nothing selects on"
    pins = dict(line.split("#")[0].strip().split("==") for line in open(os.path.join(ROOT, "deploy", "constraints.txt"))
                if "==" in line.split("#")[0])
    assert {"torch", "ray", "gco-wrapper", "pyarrow", "numpy"} <= set(pins)
    installs = [c for c in config["setup_commands"] + config["head_setup_commands"] if "pip install" in c]
    assert installs and all("-c /home/ubuntu/trseg/deploy/constraints.txt" in c for c in installs)
    for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in c:
            assert "RAY_AUTH_MODE=token" in c and "RAY_AUTH_TOKEN_PATH=/home/ubuntu/.trseg/ray_auth_token" in c
    assert "/home/ubuntu/.trseg/ray_auth_token" in config["file_mounts"]
    assert "/home/ubuntu/data" in config["file_mounts"]  # solvers open images by path


def test_submit_joins_with_the_clusters_token(tmp_path, monkeypatch):
    monkeypatch.setattr(submit, "TOKEN_PATH", str(tmp_path / "token"))
    env = {}
    submit.auth_env(env)
    assert env == {}  # no token file: a cluster without authentication
    (tmp_path / "token").write_text("secret\n")
    (tmp_path / "token").chmod(0o600)
    submit.auth_env(env)
    assert env == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "token")}


def test_ray_token_files_are_private(tmp_path, monkeypatch):
    """Anyone who reads the token controls the cluster: a private Ray gets a token file of
    mode 0600 (Ray's own ~/.ray/auth_token is 0644), and one that others can read is refused.
    The file appears whole: another command started at the same moment never reads it empty."""
    import secrets

    from shared.errors import UserError
    from shared.ray_session import private_token

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):  # set, then deleted: teardown restores what was there
        monkeypatch.setenv(name, "")                    # (private_token sets the path in os.environ)
        monkeypatch.delenv(name)
    made = tmp_path / ".trseg" / "ray_auth_token"
    seen_while_made = []
    token_hex = secrets.token_hex
    monkeypatch.setattr(secrets, "token_hex", lambda n: seen_while_made.append(made.exists()) or token_hex(n))
    private_token(local=True)
    assert seen_while_made == [False]  # not there (empty) while its token was being made
    assert os.environ["RAY_AUTH_TOKEN_PATH"] == str(made) and os.listdir(made.parent) == [made.name]
    assert os.stat(made).st_mode & 0o777 == 0o600 and len(made.read_text().strip()) == 64
    made.chmod(0o644)
    with pytest.raises(UserError, match=f"{made}: the Ray token file can be read by other users \\(mode 0644\\)"):
        private_token(local=False)
    monkeypatch.setattr(submit, "TOKEN_PATH", str(made))
    with pytest.raises(UserError, match="chmod 600"):
        submit.auth_env({})


def test_the_deploy_docs_keep_the_driver_alive_and_say_how_to_continue():
    """A driver started by a plain `ray submit` dies with the SSH connection; a lost head
    is continued from the run's store with `--resume`."""
    import re

    docs = {name: open(os.path.join(ROOT, "deploy", name)).read() for name in ("README.md", "cluster.yaml")}
    submits = [line for text in docs.values() for line in text.splitlines() if "ray submit " in line]
    assert submits and all("ray submit --tmux " in line for line in submits), submits
    assert re.search(r"ray submit --tmux deploy/cluster.yaml deploy/submit.py -- --resume s3://", docs["README.md"])
    assert "ray attach --tmux" in docs["README.md"]
