"""`python -m trainer sweep-tr-weight`: the λ values and their configurations, and the
quick sweep end to end, interrupted and finished by the same command."""
import csv
import os
import re
import signal
import time

import pytest

from experiments import table1
from tests.helpers import end_session, popen_cli, run_cli


def test_sweep_values():
    from shared.errors import UserError
    from experiments.sweep import _config, parse_values

    assert parse_values("0,0.1, 0.05,0.1") == [0.0, 0.05, 0.1]
    with pytest.raises(UserError):
        parse_values("a")
    with pytest.raises(UserError):
        parse_values("-1")
    size = table1.QUICK
    zero = _config("/o", "grid-tr", "d", "synthetic", size, "", None, 0.0)
    assert zero.solver.tr_weight == 0 and zero.epochs_per_round >= zero.epochs  # one stage A
    some = _config("/o", "grid-tr", "d", "synthetic", size, "", None, 0.1)
    assert some.solver.tr_weight == 0.1 and some.init == "/o/pce/checkpoints/last.pt"


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sweep_quick_lambda_zero_is_one_stage_a(tmp_path):
    """The quick λ sweep, Ctrl-C'd (SIGINT) once its PCE model is trained: one line that
    says so, then the same command finishes it without training the PCE model again."""
    out = tmp_path / "sweep"
    args = ("--local", "sweep-tr-weight", "--quick", "--values", "0,0.1", "--out", str(out))
    pce = out / "pce" / "summary.json"
    proc = popen_cli(*args, log_path=str(tmp_path / "first.log"))
    try:
        deadline = time.monotonic() + 600
        while not pce.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None and pce.exists(), (tmp_path / "first.log").read_text()[-3000:]
        pce_summary = pce.read_text()
        os.kill(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=120)
    finally:
        end_session(proc)
    last = (tmp_path / "first.log").read_text().strip().splitlines()[-1]
    assert rc == 2 and re.fullmatch(r"error: interrupted; the same command again finishes the experiment "
                                    r".*/sweep-(pce|tr)-[0-9a-f]{8} \(its finished trials are kept\)", last), last
    res = run_cli(*args, timeout=1100)
    assert res.returncode == 0, res.stderr[-3000:]
    assert pce.read_text() == pce_summary  # kept, not trained again
    with open(out / "sweep.csv") as f:
        rows = {r["tr_weight"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"0", "0.1"}
    assert rows["0"]["stage_a_rounds"] == "1" and int(rows["0"]["stage_a_images"]) > 0  # fixed proposals
    assert int(rows["0.1"]["stage_a_rounds"]) >= 2  # the network in the loop
    assert all(0 <= float(r["val_miou"]) <= 1 for r in rows.values())
    assert "λ = 0" in (out / "sweep.md").read_text()
    assert (out / "sweep.png").stat().st_size > 1000
