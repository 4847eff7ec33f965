"""Every command in the README's code blocks: run here as the README writes it, in a
working folder laid out so that its paths exist (DIR, img1.jpg, scribble_annotation/...),
with sizes changed only through documented flags (`--quick`, `--epochs`); or marked in
the README, in a paragraph starting "Not run by the tests" just before its block, with
the reason (a VOC download, a cluster, an install, hours of training)."""
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests import helpers
from tests.helpers import ROOT
from tests.test_scribbles import XML

MARK = "Not run by the tests"

# the README lines run below, each as written; `--quick` and `--epochs 1 --pretrain-epochs 1`
# are the size substitutions (SIZES), nothing else changes
QUICK_START = "python -m trainer --local --quick"
MAIN_JOB = "python -m trainer --local"  # run as the quick start: --quick is its documented reduced size
FOLDER = [
    "python -m trainer --local train --data DIR --format folder --method grid-tr --epochs 20 --out runs/tr",
    "python -m trainer eval --checkpoint runs/tr/checkpoints/best.pt --data DIR --format folder",
    "python -m trainer predict --checkpoint runs/tr/checkpoints/best.pt img1.jpg img2.jpg --out preds/",
]
SIZES = {"--epochs 20": "--epochs 1 --pretrain-epochs 1"}
SCRIBBLES = [
    "python -m trainer convert-scribblesup --src scribble_annotation/pascal_2012 --out VOC/pascal_2012_scribble",
    "for r in 0.8 0.5 0.3 0; do",
    "python -m trainer shorten-scribbles --src VOC/pascal_2012_scribble --out VOC/pascal_2012_scribble$r --ratio $r",
    "done",
]
RUN = {QUICK_START, MAIN_JOB, *FOLDER, *SCRIBBLES}


def _paragraph(lines: list[str], start: int, step: int) -> str:
    """The paragraph next to a code block: from line `start` on, away from it by `step`."""
    while 0 <= start < len(lines) and not lines[start].strip():
        start += step
    text = []
    while 0 <= start < len(lines) and lines[start].strip() and not lines[start].startswith("```"):
        text.append(lines[start].strip())
        start += step
    return " ".join(text[::step])


def readme_blocks() -> list[tuple[list[str], bool]]:
    """(commands, marked) per ```bash block of the README: continuation lines joined,
    trailing comments dropped; marked when the paragraph just before or just after the
    block starts with MARK."""
    lines = open(os.path.join(ROOT, "README.md")).read().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() != "```bash":
            i += 1
            continue
        first = i
        body, i = [], i + 1
        while lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        i += 1
        commands, pending = [], ""
        for line in body:
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line.endswith("\\"):
                pending += line[:-1].strip() + " "
                continue
            if pending + line:
                commands.append(pending + line)
            pending = ""
        marked = any(_paragraph(lines, at, step).startswith(MARK) for at, step in ((first - 1, -1), (i, 1)))
        blocks.append((commands, marked))
    return blocks


def test_every_readme_command_is_run_here_or_marked_with_a_reason():
    blocks = readme_blocks()
    assert len(blocks) >= 10
    commands = [c for cmds, _ in blocks for c in cmds]
    assert RUN <= set(commands), RUN - set(commands)  # what the tests below run is in the README
    assert QUICK_START == f"{MAIN_JOB} --quick"
    unmarked = [c for cmds, marked in blocks if not marked for c in cmds if c not in RUN]
    assert unmarked == [], f"README commands neither run by tests/test_readme.py nor marked {MARK!r}: {unmarked}"


def bash(script: str, cwd, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """The README's lines in bash, `python` being this interpreter, the checkout importable."""
    env = {**helpers.cli_env(), **(env or {})}
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (script, proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


def test_train_eval_predict_on_a_folder(synthetic_set, tmp_path):
    """"Train on your data": DIR a small folder-layout set, img1.jpg and img2.jpg two of
    its images as JPEGs; the run's best checkpoint evaluates and predicts."""
    shutil.copytree(synthetic_set(8, 4, 48, seed=1), tmp_path / "DIR")  # test_pipeline's set
    for k, path in enumerate(sorted(glob.glob(str(tmp_path / "DIR" / "images" / "*.png")))[:2], start=1):
        Image.open(path).convert("RGB").save(tmp_path / f"img{k}.jpg")
    script = "\n".join(FOLDER)
    for written, small in SIZES.items():
        script = script.replace(written, small)
    proc = bash(script, tmp_path, timeout=600)
    summary = json.load(open(tmp_path / "runs" / "tr" / "summary.json"))
    assert summary["method"] == "grid-tr" and summary["stage_a_images"] == 8 and summary["proposals_missing"] == 0
    evaluated = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert any("val_miou" in e for e in evaluated), proc.stdout[-2000:]
    preds = sorted(os.listdir(tmp_path / "preds"))
    assert [os.path.splitext(p)[0] for p in preds] == ["img1", "img2"]
    for p in preds:
        labels = np.asarray(Image.open(tmp_path / "preds" / p))
        assert labels.shape == (48, 48) and set(np.unique(labels)) <= {0, 1, 2, 3}


def test_scribblesup_conversion_and_shortened_sets(tmp_path):
    """The VOC block's scribble lines on a one-file ScribbleSup folder."""
    src = tmp_path / "scribble_annotation" / "pascal_2012"
    src.mkdir(parents=True)
    (src / "2007_000032.xml").write_text(XML)
    bash("\n".join(SCRIBBLES), tmp_path, timeout=300)
    full = np.asarray(Image.open(tmp_path / "VOC" / "pascal_2012_scribble" / "2007_000032.png"))
    counts = [int((full != 255).sum())]
    for r in ("0.8", "0.5", "0.3", "0"):
        short = np.asarray(Image.open(tmp_path / "VOC" / f"pascal_2012_scribble{r}" / "2007_000032.png"))
        assert short.shape == full.shape and set(np.unique(short)) <= set(np.unique(full))
        counts.append(int((short != 255).sum()))
    assert counts == sorted(counts, reverse=True) and counts[-1] > 0, counts  # shorter with r, clicks last


@pytest.mark.slow
def test_readme_quick_start(tmp_path):
    """The quick start as a user types it, and what the README says of it: the folders
    and files of runs/<timestamp>/{pce-init,pce,grid-tr}/, 16 training and 16 val images,
    a header per run, an epoch line per epoch from the driver (no Ray prefix), a line per
    stage-A round, the comparison and its two pictures; a pipeline that learns (the two
    compared cells above the majority-class baseline), stage A's labels good and changing
    the network's, and Grid-TR above the same-budget PCE-GD (by 12.5 points at this seed,
    2.5 to 19.1 at seeds 0-4; the test asks for 2)."""
    proc = bash(QUICK_START, tmp_path, timeout=900, env={"TRSEG_CACHE": str(tmp_path / "cache")})
    (run,) = glob.glob(str(tmp_path / "runs" / "*"))  # runs/<timestamp>
    summaries = {}
    for cell in ("pce-init", "pce", "grid-tr"):
        for name in ("summary.json", "metrics.jsonl", "checkpoints", "tensorboard", "panels"):
            assert os.path.exists(os.path.join(run, cell, name)), (cell, name)
        summaries[cell] = json.load(open(os.path.join(run, cell, "summary.json")))
        assert (summaries[cell]["train_images"], summaries[cell]["val_images"]) == (16, 16)
    out = proc.stdout + proc.stderr
    data = re.search(r"^data: (.*)$", out, re.M).group(1)
    assert len(re.findall(r"^(pce|grid-tr) on .* · out ", proc.stdout, re.M)) == 3  # a header per run
    n_epochs = sum(len(open(os.path.join(run, c, "metrics.jsonl")).readlines()) for c in summaries)
    assert len(re.findall(r"^epoch \d+/\d+ \[", proc.stdout, re.M)) == n_epochs  # the driver's, unprefixed
    for picture in ("comparison.png", "curves.png"):
        path = os.path.join(run, picture)
        assert os.path.exists(path) and path in proc.stdout, picture
    tr = summaries["grid-tr"]
    rounds = [json.loads(line) for line in open(os.path.join(run, "grid-tr", "metrics.jsonl"))]
    proposals = [r for r in rounds if "proposal_miou" in r]
    printed = re.findall(r"stage A round (\d+):", out)
    assert proposals and len(printed) == len(set(printed)) >= len({r["round"] for r in proposals})
    assert re.search(r"^method +epochs +val mIoU", out, re.M)
    assert tr["proposals_missing"] == 0 and tr["stage_a_images"] > 0
    assert min(r["proposal_miou"] for r in proposals) > 0.6 and all(r["proposal_changed"] > 0 for r in proposals)
    baseline = helpers.majority_class_miou(data, "synthetic", 4)
    for cell in ("pce", "grid-tr"):
        assert summaries[cell]["val_miou"] > baseline + 0.05, (cell, summaries[cell]["val_miou"], baseline)
    assert summaries["grid-tr"]["val_miou"] > summaries["pce"]["val_miou"] + 0.02, summaries
