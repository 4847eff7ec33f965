"""The driver's epoch lines, read back from a run folder's metrics.jsonl (no Ray)."""
import json

from trainer.console import EpochLines, progress_line


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_each_epoch_is_shown_once_and_a_resumed_epoch_again(tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    one = {"phase": "pce", "epoch": 1, "loss": 0.5}
    two = {"phase": "grid-tr", "epoch": 2, "loss": 0.4, "val_miou": 0.61, "round": 0, "stall_s": 1.0,
           "mean_staleness": 0.0, "proposal_changed": 0.1, "proposal_miou": 0.8}
    _write(metrics, [one])  # a resumed run's earlier epoch: not shown again
    lines = EpochLines(str(tmp_path), total_epochs=3, tty=False)
    _write(metrics, [one, two])
    lines.show_new()
    lines.show_new()  # nothing new
    redone = {**two, "loss": 0.45}  # killed after epoch 2's line: epoch 2 trains again
    _write(metrics, [one, redone])
    lines.show_new()
    metrics.write_text(metrics.read_text() + '{"phase": "grid-tr", "ep')  # a half-written line waits
    lines.show_new()
    out = capsys.readouterr().out.splitlines()
    assert out == [progress_line(two, 2, 3), progress_line(redone, 2, 3)]
    assert out[0] == ("epoch 2/3 [grid-tr]  loss 0.4000  val mIoU 61.0  round 0 stall 1.0s staleness 0.00  "
                      "proposals: 10.0% changed from the network  mIoU vs masks 80.0")


def test_on_a_terminal_one_bar_counts_the_epochs(tmp_path, capsys):
    lines = EpochLines(str(tmp_path), total_epochs=4, tty=True)  # no metrics.jsonl yet
    _write(tmp_path / "metrics.jsonl", [{"phase": "pce", "epoch": e, "loss": 0.5, "val_miou": 0.5} for e in (1, 2)])
    lines.start()
    lines.finish()
    assert lines.bar.n == 2
    out = capsys.readouterr().out
    assert "2/4" in out and "val mIoU=50.0" in out and "epoch 1/4" not in out
