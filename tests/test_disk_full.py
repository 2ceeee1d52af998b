"""A full disk while writing Parquet or checkpoints: one clear line, exit 2, the previous output
intact. The file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored) makes writes fail the way a full
disk does (EFBIG instead of ENOSPC) without root or a special filesystem."""

import hashlib
import random
import resource
import signal
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT


def run_limited(max_bytes: int, *args: str) -> subprocess.CompletedProcess:
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return subprocess.run([sys.executable, "-m", "tuner", *args], preexec_fn=limit, capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def digests(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_full_disk_while_preparing_keeps_the_previous_dataset(tmp_path):
    rng = random.Random(0)
    small, big, out = tmp_path / "small.txt", tmp_path / "big.txt", tmp_path / "prepared"
    small.write_text("".join(f"{u} {rng.randint(1, 30)}\n" for u in range(50) for _ in range(5)))
    big.write_text("".join(f"{u} {rng.randint(1, 3000)}\n" for u in range(3000) for _ in range(30)))
    first = subprocess.run([sys.executable, "-m", "tuner", "prepare", "--input", str(small), "--output", str(out)],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert first.returncode == 0, first.stderr
    before = digests(out)
    proc = run_limited(30_000, "prepare", "--input", str(big), "--output", str(out))
    assert proc.returncode == 2 and "cannot write the dataset" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert digests(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.txt", "prepared", "small.txt"]  # no debris


@pytest.mark.parametrize("writer", ["inline", "background"])
def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, writer):
    """Written in line or on a thread (train.checkpoint_writer), a failed write ends the run with one
    line and exit 2 (the thread's error is raised in the training thread) and the previous
    checkpoint stays as it was."""
    ckpt = tmp_path / "ckpt"
    common = ["train", "--checkpoint-dir", str(ckpt), "--synthetic-users", "300", "--synthetic-items", "80",
              "--set", "model.max_len=16", "--set", f"train.checkpoint_writer={writer}"]
    first = subprocess.run([sys.executable, "-m", "tuner", *common, "--max-epochs", "1"], capture_output=True,
                           text=True, cwd=ROOT, timeout=120)
    assert first.returncode == 0, first.stderr
    before = digests(ckpt)
    proc = run_limited(20_000, *common, "--max-epochs", "3")  # far below one checkpoint's size
    assert proc.returncode == 2 and "cannot write a checkpoint" in proc.stderr, proc.stderr
    assert "previous checkpoint is intact" in proc.stderr and "Traceback" not in proc.stderr
    assert digests(ckpt) == before  # no temporary file left, the epoch-1 checkpoint untouched
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert state["progress"]["epoch"] == 1
