"""benchmarks/cache_keys.py: which parts of the compiled step's cache keys differ between a bare run
and a Ray Train worker, and whether the worker loads what the bare run compiled."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "cache_keys.py"
STATIC = ("TensorMetadata(dtype=torch.float32, shape=torch.Size([32]), stride=(1,), "
          "device=device(type='cuda', index=0), memory_format=torch.contiguous_format, requires_grad=True)")
SYMBOLIC = ("TensorMetadata(dtype=torch.float32, shape=torch.Size([s65, 32]), stride=(32, 1), "
            "device=device(type='cuda', index=0), memory_format=None, requires_grad=False)")


def _key_log(key: str, static_hash: str, static_bytes: bytes, result: str, prefix: str = "") -> str:
    """One AOTAutograd key as torch's debug log prints it (with cache_keys.py's PICKLE lines)."""
    head = f"{prefix}V1202 02:36:33.752000 640 torch/_functorch/_aot_autograd/autograd_cache.py:632] [0/0] "
    parts = [("a" * 52, "aot_config", "(0, True)", pickle.dumps((0, True))),
             (static_hash, "example_inputs[0]", STATIC, static_bytes),
             ("c" * 52, "example_inputs[1]", SYMBOLIC, pickle.dumps(("s65", 32)))]
    lines = [f"Autograd graph cache hash details for key {key}:"]
    lines += [f"[{h}] {name}: {text}" for h, name, text, _ in parts]
    lines += [f"PICKLE {name} {data.hex()}" for _, name, _, data in parts]
    lines = [head + line for line in lines]
    lines.append(f"{prefix}I1202 02:36:34.000000 640 autograd_cache.py:1055] [0/0] "
                 f"AOTAutograd cache {result} for key {key}")
    return "\n".join(lines) + "\n"


def _compare(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(folder), "--from-logs", "NVIDIA H200", "2.11"],
                          capture_output=True, text=True, cwd=ROOT)


def test_a_part_with_the_same_text_but_other_bytes_is_shown_byte_by_byte(tmp_path):
    (tmp_path / "bare.log").write_text(_key_log("akeybare", "b" * 52, pickle.dumps((32,)), "miss"))
    (tmp_path / "train.log").write_text(_key_log("akeyworker", "d" * 52, pickle.dumps(("32",)), "miss",
                                                 prefix="\x1b[36m(RayTrainWorker pid=2076)\x1b[0m [rank0]:"))
    proc = _compare(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("worker: 0 cache hits, 1 misses; 1 of its 1 keys differ")
    report = json.loads((tmp_path / "cache_keys.json").read_text())
    assert report["device"] == "NVIDIA H200"
    assert report["runs"]["train"] == {"keys": 1, "hit": 0, "miss": 1, "bypass": 0}
    (row,) = report["rows"]
    assert (row["kind"], row["frame"], row["worker_result"], row["same_key"]) == ("aot", "0/0", "miss", False)
    assert row["differing"] == ["example_inputs[0]"] and row["differing_with_the_same_text"] == 1
    assert row["example_inputs"] == {"static": 1, "static_differ": 1, "static_with_a_memory_format": 1,
                                     "symbolic": 1, "symbolic_differ": 0, "symbolic_with_a_memory_format": 0}
    diff = row["explained"][0]["pickle_diff"]
    assert any(line.startswith("-") and "BININT1" in line and "32" in line for line in diff)
    assert any(line.startswith("+") and "UNICODE" in line and "'32'" in line for line in diff)


def test_a_folder_without_both_logs_is_one_line(tmp_path):
    (tmp_path / "bare.log").write_text("")
    proc = _compare(tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"cache_keys.py: {tmp_path} holds no bare.log and train.log (or .log.gz) to compare"]
    assert not (tmp_path / "cache_keys.json").exists()


@pytest.mark.slow
def test_a_ray_train_worker_loads_the_step_a_bare_run_compiled(tmp_path):
    """A trial's worker runs with another thread count than a bare `tuner train` (OMP_NUM_THREADS=1):
    it must still find every graph of the compiled step in the cache instead of compiling again."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--", "--size", "tiny",
                           "--device", "cpu", "--max-epochs", "1", "--set", "train.compile=on"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "cache_keys.json").read_text())
    assert report["exit_codes"] == {"bare": 0, "train": 0}
    bare, worker = report["runs"]["bare"], report["runs"]["train"]
    assert bare["miss"] >= 3 and bare["hit"] == 0  # the bare run compiled (an AOTAutograd key, two FX graphs)
    assert worker == {**worker, "hit": bare["miss"], "miss": 0}, report["runs"]
    assert report["keys_that_differ"] == 0
