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


def _epoch(epoch: int, start: float, end: float, epoch_s: float, handed: bool = True, write_during: bool = False,
           write_wait_s: float = 0.0) -> dict:
    return {"epoch": epoch, "start": start, "end": end, "epoch_s": epoch_s, "handed": handed,
            "write_during": write_during, "write_wait_s": write_wait_s}


def test_each_train_epoch_is_set_against_the_bare_epochs_just_before_and_after_it_in_time():
    bare = [_epoch(1, 0, 10, 9), _epoch(2, 12, 14, 1.8), _epoch(3, 16, 18, 2.2)]
    train = [_epoch(1, 10, 12, 1.5), _epoch(2, 14, 16, 2.2, write_during=True), _epoch(3, 18, 21, 2.7)]
    rows = ray_turns.ratios(bare, train, skip=1, key="epoch_s")
    # epoch 2 ran between bare epochs 2 and 3 (mean 2.0); epoch 3 after bare 3 only (the last)
    assert [(r["epoch"], r["bare_around"], round(r["ratio"], 3), r["write_during"]) for r in rows] == [
        (2, 2.0, 1.1, True), (3, 2.2, 1.227, False)]
    assert ray_turns.summary(rows)["median"] == pytest.approx((1.1 + 2.7 / 2.2) / 2)
    assert ray_turns.overlaps(bare, train) == 0
    assert ray_turns.overlaps(bare, [_epoch(2, 13, 15, 2)]) == 1


def test_a_turn_runs_to_the_epoch_that_handed_the_token_on_and_may_add_its_checkpoint_write():
    epochs = [_epoch(1, 0, 5, 4, handed=False), _epoch(2, 5, 7, 1.9, write_wait_s=0.5),
              _epoch(3, 9, 11, 1.8, handed=False), _epoch(4, 11, 13, 1.9, handed=False)]  # 4: the last
    assert [(t["epoch"], t["epochs"], t["turn_s"], t["turn_with_write_s"]) for t in ray_turns.turns_of(epochs)] == [
        (1, 2, 7, 7.5), (3, 2, 4, 4)]


def test_arguments_that_would_change_the_pairing_are_one_line_errors(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "t.json"), "--", "--size", "tiny",
                           "--workers", "2"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "ray_turns.py: give the bare run's `tuner train` arguments, without --workers, --storage, --run-name "
        "or --max-epochs (--epochs sets it)"]
    assert not (tmp_path / "t.json").exists()


def _turns_on_the_cpu(tmp_path, *options: str) -> dict:
    """ray_turns.py with `options` over 4 epochs of the tiny model on the CPU (the first skipped): its result.
    Every due checkpoint is written (train.checkpoint_share=0), so which epochs train beside one is fixed."""
    out = tmp_path / "turns.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--epochs", "4", "--skip", "1", *options,
                           "--", "--size", "tiny", "--device", "cpu", "--set", "train.checkpoint_share=0"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


@pytest.mark.slow
def test_the_bare_loop_and_a_ray_train_worker_train_in_turns(tmp_path):
    result = _turns_on_the_cpu(tmp_path)
    assert (result["bare"]["rc"], result["train"]["rc"]) == (0, 0)
    epochs = sorted([("bare", e) for e in result["bare"]["epochs"]] + [("train", e) for e in result["train"]["epochs"]],
                    key=lambda named: named[1]["start"])
    # two epochs each in turn, the bare run first, and never two at once
    assert [(name, e["epoch"]) for name, e in epochs] == [
        ("bare", 1), ("bare", 2), ("train", 1), ("train", 2), ("bare", 3), ("bare", 4), ("train", 3), ("train", 4)]
    assert all(a["end"] <= b["start"] for (_, a), (_, b) in zip(epochs, epochs[1:]))
    assert result["overlapping_turns"] == 0
    # the second epoch of a Train turn trains while the first one's checkpoint is written
    assert [e["write_during"] for e in result["train"]["epochs"]] == [False, True, False, True]
    assert not any(e["write_during"] for e in result["bare"]["epochs"])  # no checkpoints without --checkpoint-dir
    handed = [e for e in result["train"]["epochs"] if e["handed"]]  # epoch 2 (4 is the last: its turn runs on)
    assert [e["epoch"] for e in handed] == [2] and handed[0]["write_s"] > 0  # the write it waited for, timed by tuner
    ratio = result["train_over_bare"]
    assert ratio["training"]["n"] == 3 and [r["epoch"] for r in ratio["training"]["epochs"]] == [2, 3, 4]
    assert (ratio["training_while_writing"]["n"], ratio["training_not_writing"]["n"], ratio["turn"]["n"]) == (2, 1, 1)
    assert 0.2 < ratio["training"]["median"] < 5  # the same model, data and device: of one order
    assert result["bare"]["first_epoch_s"] > 0 and result["train"]["first_epoch_s"] > 0
    assert result["bare"]["final"]["test_ndcg_10"] > 0  # the bare run's --json line, read after its last turn


@pytest.mark.slow
def test_the_bare_run_may_checkpoint_too_and_the_train_run_take_its_own_settings(tmp_path):
    result = _turns_on_the_cpu(tmp_path, "--bare-checkpoints", "--train-set", "train.checkpoint_every=2")
    assert result["bare_checkpoint_epoch"] == 4  # the bare run wrote its checkpoints, the last at epoch 4
    # a checkpoint every second epoch, each waited for at its turn's end: no epoch trains beside a write
    assert [e["write_during"] for e in result["train"]["epochs"]] == [False, False, False, False]
    assert result["overlapping_turns"] == 0 and result["train_set"] == ["train.checkpoint_every=2"]
