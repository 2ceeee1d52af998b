"""benchmarks/ray_turns.py: a bare `tuner train` and a Ray Train run taking turns epoch by epoch, so their
ratio is free of the machine's drift between rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "ray_turns.py"
sys.path.insert(0, str(ROOT / "benchmarks"))

import ray_turns  # noqa: E402


def _turn(epoch: int, start: float, end: float, epoch_s: float) -> dict:
    return {"epoch": epoch, "start": start, "end": end, "epoch_s": epoch_s, "turn_s": end - start}


def test_each_train_epoch_is_set_against_the_bare_epochs_on_either_side_of_it():
    bare = [_turn(1, 0, 10, 9), _turn(2, 12, 14, 1.8), _turn(3, 16, 18, 2.2)]
    train = [_turn(1, 10, 12, 1.5), _turn(2, 14, 16, 2.2), _turn(3, 18, 21, 2.7)]
    rows = ray_turns.ratios(bare, train, skip=1, key="epoch_s")
    # epoch 2 runs between bare epochs 2 and 3 (mean 2.0); epoch 3 after bare 3 only (the last)
    assert [(r["epoch"], r["bare_around"], round(r["ratio"], 3)) for r in rows] == [(2, 2.0, 1.1), (3, 2.2, 1.227)]
    assert ray_turns.summary(rows)["median"] == pytest.approx((1.1 + 2.7 / 2.2) / 2)
    assert ray_turns.overlaps(bare, train) == 0
    assert ray_turns.overlaps(bare, [_turn(2, 13, 15, 2)]) == 1


def test_arguments_that_would_change_the_pairing_are_one_line_errors(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "t.json"), "--", "--size", "tiny",
                           "--workers", "2"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "ray_turns.py: give the bare run's `tuner train` arguments, without --workers, --storage, --run-name "
        "or --max-epochs (--epochs sets it)"]
    assert not (tmp_path / "t.json").exists()


@pytest.mark.slow
def test_the_bare_loop_and_a_ray_train_worker_train_in_turns(tmp_path):
    out = tmp_path / "turns.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--epochs", "4", "--skip", "1", "--",
                           "--size", "tiny", "--device", "cpu"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert (result["bare"]["rc"], result["train"]["rc"]) == (0, 0)
    turns = sorted([("bare", t) for t in result["bare"]["turns"]] + [("train", t) for t in result["train"]["turns"]],
                   key=lambda named: named[1]["start"])
    # one epoch each in turn, the bare run first, and never two at once
    assert [(name, t["epoch"]) for name, t in turns] == [(n, e) for e in range(1, 5) for n in ("bare", "train")]
    assert all(a["end"] <= b["start"] for (_, a), (_, b) in zip(turns, turns[1:]))
    assert result["overlapping_turns"] == 0
    for key in ("epoch_s", "turn_s"):
        ratio = result[f"train_over_bare_{key}"]
        assert ratio["n"] == 3 and [r["epoch"] for r in ratio["epochs"]] == [2, 3, 4]
        assert 0.2 < ratio["median"] < 5  # the same model, data and device: of one order
    assert result["bare"]["first_epoch_s"] > 0 and result["train"]["first_epoch_s"] > 0
    assert result["bare"]["final"]["test_ndcg_10"] > 0  # the bare run's --json line, read after its last turn
