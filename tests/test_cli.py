"""The `tuner` command as a user runs it: exit codes, one-line errors, `--json`."""

import json
import math
import statistics
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def tuner(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "tuner", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def assert_clean_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tuner: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.slow
def test_default_tiny_run_beats_popularity_twice_over():
    """The issue's acceptance run: `tuner train --size tiny` on the embedded synthetic data."""
    proc = tuner("train", "--size", "tiny", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["test_hr_10"] >= 2 * result["popularity_hr_10"]
    assert result["wall_s"] < 120
    assert "epoch   1" in proc.stderr  # one line per epoch


def test_train_json_last_line(tmp_path):
    proc = tuner("train", "--max-epochs", "1", "--synthetic-users", "200", "--synthetic-items", "50",
                 "--set", "model.max_len=8", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("test_hr_10", "test_ndcg_10", "val_ndcg_10", "popularity_hr_10", "epochs", "samples_per_s",
                "peak_mem_mb", "trainable_params", "total_params"):
        assert key in result


def test_bench_reports_consistent_timings_and_the_hosts_share():
    """`tuner bench` (issue 5's benchmark entry) on a CPU: the median step, samples/s from it, one
    timing per window of 5 steps, and the host's time to issue a step, which can never exceed the
    step's own (it is the same window before the wait for the device)."""
    proc = tuner("bench", "--size", "tiny", "--batch-size", "32", "--num-items", "500", "--steps", "11",
                 "--warmup", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result["window_ms"]) == 2  # 10 timed steps, windows of 5
    assert result["step_ms"] == pytest.approx(statistics.median(result["window_ms"]))
    assert result["samples_per_s"] == pytest.approx(32 / result["step_ms"] * 1e3)
    assert 0 < result["host_ms"] <= result["step_ms"]
    assert result["model_tflop_per_step"] > 0 and result["predicted_positions"] > 0
    text = tuner("bench", "--size", "tiny", "--batch-size", "8", "--num-items", "100", "--steps", "2", "--warmup", "1")
    assert text.returncode == 0, text.stderr
    assert " ms/step (host " in text.stdout and " ms to issue it), " in text.stdout, text.stdout


@pytest.mark.parametrize("amp, dtype", [((), "bfloat16"), (("--set", "train.amp=fp16"), "float16")])
def test_bench_autocasts_in_the_dtype_train_amp_names(amp, dtype):
    """`--amp` autocasts in bf16 where the device has it; `--set train.amp=fp16` times fp16 with
    its GradScaler instead (a V100's step, on any device), and it trains: a finite first loss."""
    proc = tuner("bench", "--size", "tiny", "--batch-size", "8", "--num-items", "100", "--steps", "2", "--warmup", "1",
                 "--amp", *amp, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["amp"] == dtype and math.isfinite(result["loss_first_step"]), result


@pytest.mark.parametrize("args, fragments", [
    (["bench", "--steps", "0"], ["--steps must be at least 1"]),
    (["bench", "--loss", "focal2"], ["unknown loss 'focal2'"]),
    (["train", "--set", "optim.lrr=1"], ["unknown config key 'optim.lrr'", "optim.lr"]),
    (["train", "--size", "12M"], ["model.size='12M' is not one of", "430M"]),
    (["train", "--set", "optim.lr=-3"], ["optim.lr=-3.0 must be positive"]),
    (["train", "--data", "/nonexistent/file.csv"], ["/nonexistent/file.csv", "no such file"]),
    (["prepare", "--input", "/nonexistent.txt", "--output", "/tmp/x"], ["no such file"]),
    (["train", "--bogus-flag"], ["unrecognized arguments"]),
    (["train", "--set", "train.profile_epoch=2"], ["train.profile_epoch needs train.profile_out"]),
    (["train", "--set", "train.profile_epoch=1", "--set", "train.profile_out=/proc/nope/p.txt", "--max-epochs", "1",
      "--synthetic-users", "100", "--synthetic-items", "50", "--set", "model.max_len=8"],
     ["/proc/nope/p.txt: cannot write the profile"]),
    (["frobnicate"], ["invalid choice"]),
    (["train", "--set", "train.step_graph=sometimes"], ["train.step_graph='sometimes' is not one of"]),
    (["train", "--set", "train.step_graph=on", "--set", "train.device=cpu", "--max-epochs", "1",
      "--synthetic-users", "100", "--synthetic-items", "50", "--set", "model.max_len=8"],
     ["train.step_graph=on needs a CUDA device (this run is on cpu)"]),
])
def test_bad_input_is_one_line_exit_2(args, fragments):
    assert_clean_error(tuner(*args), *fragments)


def test_prepare_cli_and_not_a_dataset(tmp_path):
    src = tmp_path / "seq.txt"
    src.write_text("".join(f"{u} {i}\n" for u in range(1, 4) for i in range(1, 6)))
    out = tmp_path / "prepared"
    proc = tuner("prepare", "--input", str(src), "--output", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["num_items"] == 5
    garbled = tmp_path / "garbled.txt"
    garbled.write_bytes(b"\xff\xfe\x00\x01 \x02\n\x99")
    assert_clean_error(tuner("prepare", "--input", str(garbled), "--output", str(tmp_path / "g")), str(garbled))
    assert not (tmp_path / "g").exists()
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    assert_clean_error(tuner("train", "--data", str(empty_dir)), "not a prepared dataset")
