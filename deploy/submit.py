"""Entry script for `ray submit deploy/cluster.yaml deploy/submit.py -- <train args>`.

Runs on the head node, joins the running cluster (`--address auto`) and runs the same
training as local mode: `python -m trainer --address auto train <train args>`, with
`--solver-resource solver_node` and `--trainer-resource trainer_node` unless the
arguments name other resources, so that solver actors land only on the solver node type
of deploy/cluster.yaml and trainer workers only on the trainer type.
"""
from __future__ import annotations

import os
import sys

SOLVER_RESOURCE = "solver_node"  # advertised by the `solver` node type of deploy/cluster.yaml
TRAINER_RESOURCE = "trainer_node"  # advertised by the `trainer` node type
TOKEN_PATH = "~/.trseg/ray_auth_token"  # file_mounts of deploy/cluster.yaml put it there


def auth_env(environ: dict) -> None:
    """The cluster runs with token authentication: the driver joins it with the same token."""
    from shared.private_file import check_private

    token = os.path.expanduser(TOKEN_PATH)
    if os.path.exists(token):
        check_private(token)  # readable by others: anyone on the machine could control the cluster
        environ.setdefault("RAY_AUTH_MODE", "token")
        environ.setdefault("RAY_AUTH_TOKEN_PATH", token)


def build_argv(args: list[str], address: str = "auto") -> list[str]:
    """The trainer CLI's argv for these train arguments."""
    args = list(args)
    if args[:1] == ["--"]:
        args = args[1:]
    if args[:1] == ["train"]:  # tolerate `... submit.py -- train --data ...`
        args = args[1:]
    for option, resource in (("--solver-resource", SOLVER_RESOURCE), ("--trainer-resource", TRAINER_RESOURCE)):
        if not any(a == option or a.startswith(option + "=") for a in args):
            args += [option, resource]
    return ["--address", address, "train", *args]


def main(argv: list[str] | None = None) -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isdir(os.path.join(root, "trainer")) and root not in sys.path:
        sys.path.insert(0, root)  # run from a checkout; on the cluster the package is installed
    auth_env(os.environ)  # before Ray is imported
    from trainer.cli import main as trainer_main

    trainer_main(build_argv(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
