"""A Ray worker setup hook for tests/test_resume.py's best.pt test, active where the
environment names a folder (TRSEG_TEST_BEST): in a trainer worker val mIoU follows a
script (epoch 1: 0.5, 2: 0.7, 3: 0.6), the worker is killed (as an OOM kill would end it)
once, after epoch 2's report has reached Ray Train and before the loop goes on (where it
writes best.pt), and every report first notes what the run folder holds at that moment.

The folder's `seen` lines (JSON): at every report, the epoch, best.pt's (global_epoch,
val_miou) or None, and whether last.pt exists."""
import json
import os
import sys
import time

FOLDER = "TRSEG_TEST_BEST"
SCRIPT = {1: 0.5, 2: 0.7, 3: 0.6}
KILLED = "killed"  # the file, in the folder, that the kill leaves


def _best(out: str):
    from trainer.runlog import load_checkpoint

    path = os.path.join(out, "checkpoints", "best.pt")
    if not os.path.exists(path):
        return None
    state = load_checkpoint(path)
    return [state["global_epoch"], state["val_miou"]]


def install() -> None:
    folder = os.environ.get(FOLDER)
    if not folder:
        return
    import trainer.loop as loop

    evaluate, report = loop._evaluate, loop.report
    out = os.path.join(folder, "out")

    def scripted_evaluate(*args, **kwargs):
        epoch = sys._getframe(1).f_locals["record"]["epoch"]  # the loop's record of this epoch
        return {**evaluate(*args, **kwargs), "val_miou": SCRIPT[epoch]}

    def noting_report(metrics, blob):
        epoch = metrics["epoch"]
        with open(os.path.join(folder, "seen"), "a") as f:
            f.write(json.dumps({"epoch": epoch, "best": _best(out),
                                "last": os.path.exists(os.path.join(out, "checkpoints", "last.pt"))}) + "\n")
        report(metrics, blob)
        if epoch == 2 and not os.path.exists(os.path.join(folder, KILLED)):
            open(os.path.join(folder, KILLED), "w").close()
            time.sleep(3)  # Ray Train's controller polls the worker (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S) and keeps the checkpoint
            os._exit(1)

    loop._evaluate, loop.report = scripted_evaluate, noting_report
