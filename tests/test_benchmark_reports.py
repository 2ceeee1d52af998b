"""Benchmarks' report code: the result files' summaries are computed, not typed in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import multigpu_report  # noqa: E402


def _run_file(path: Path, device: str, rows: list[tuple[str, int, float]]) -> Path:
    batch = {"430M": 128, "130M": 256}
    path.write_text(json.dumps({
        "device": device, "torch": "2.11", "nccl_nvls_enable": "0", "num_items": 159750, "seq_len": 50,
        "compile": "default", "bucket_cap_mb": 100, "gradient_as_bucket_view": True, "command": f"python {path.name}",
        "rows": [{"size": s, "gpus": g, "batch_per_gpu": batch[s], "step_ms": ms,
                  "samples_per_s": g * batch[s] / (ms / 1e3), "ranks_agree": True} for s, g, ms in rows]}))
    return path


def test_efficiency_is_against_the_one_gpu_row_of_the_same_size_across_files(tmp_path):
    one = _run_file(tmp_path / "one.json", "1 x H200", [("430M", 1, 10.0), ("130M", 1, 5.0)])
    four = _run_file(tmp_path / "four.json", "4 x H200", [("430M", 4, 20.0), ("130M", 4, 6.25)])
    rows = {(r["size"], r["gpus"]): r for r in multigpu_report.scaling([one, four])["rows"]}
    assert rows[("430M", 4)]["scaling_efficiency"] == pytest.approx(0.5)
    assert rows[("130M", 4)]["scaling_efficiency"] == pytest.approx(0.8)
    assert rows[("430M", 1)]["scaling_efficiency"] is None


def test_runs_from_different_gpus_are_refused_in_one_line(tmp_path):
    one = _run_file(tmp_path / "one.json", "1 x H100", [("430M", 1, 10.0)])
    four = _run_file(tmp_path / "four.json", "4 x H200", [("430M", 4, 20.0)])
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "multigpu_report.py"), "--scaling", str(one),
                           str(four), "--out", str(tmp_path / "out.json")], capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "multigpu_report.py: --scaling files come from different GPUs (H100, H200)"]
    assert not (tmp_path / "out.json").exists()


def test_tuning_comparison_finds_when_each_search_reached_the_common_level():
    runs = [ROOT / "benchmarks" / "results" / "ml1m_runs" / f"4xH200_{n}.json" for n in ("concurrent", "ddp")]
    t = multigpu_report.tune(runs)
    assert t["common_level"] == min(r["best_val_ndcg_10"] for r in t["rows"])
    concurrent, ddp = t["rows"]
    assert concurrent["shared_config"] == ddp["shared_config"] is not None  # the same settings in both
    assert ddp["shared_config_s_per_epoch"] < concurrent["shared_config_s_per_epoch"]  # 4 GPUs against 1
    for row in t["rows"]:
        assert row["common_level_reached_s"] <= row["best_reached_s"]
        assert row["best_val_by_time"][-1] == [row["best_reached_s"], row["best_val_ndcg_10"]]


def test_a_one_gpu_ddp_row_is_measured_against_the_plain_step(tmp_path):
    plain = _run_file(tmp_path / "plain.json", "1 x H200", [("430M", 1, 10.0)])
    ddp = json.loads(_run_file(tmp_path / "ddp.json", "1 x H200", [("430M", 1, 12.5)]).read_text())
    (tmp_path / "ddp.json").write_text(json.dumps(dict(ddp, ddp_at_1_gpu=True)))
    rows = multigpu_report.scaling([tmp_path / "ddp.json", plain])["rows"]
    assert [(r["ddp"], r["scaling_efficiency"]) for r in rows] == [(False, None), (True, pytest.approx(0.8))]


def test_slot_gaps_pair_each_later_trial_with_the_slot_that_freed_first():
    def trial(start, first, last):
        return {"start": start, "epochs": [[1, 0.1, first], [2, 0.2, last]]}

    # two slots: trials a and b start together; a ends at 20 and c takes its slot, b ends at 50 and d
    trials = [trial(0, 5, 20), trial(0, 6, 50), trial(30, 40, 60), trial(55, 70, 80)]
    assert multigpu_report.slot_gaps(trials) == [20.0, 20.0]


def test_kernel_timeline_counts_overlapping_kernels_once_and_the_gaps_between_them():
    import gpu_throughput

    kernel = lambda ts, dur: {"cat": "kernel", "ph": "X", "ts": ts, "dur": dur}
    # two steps: kernels at [0, 100] and [50, 150] overlap (another stream), then a 50 us gap
    events = [kernel(0, 100), kernel(50, 100), kernel(200, 100), {"cat": "cpu_op", "ph": "X", "ts": 0, "dur": 999}]
    line = gpu_throughput.kernel_timeline({"traceEvents": events}, steps=2)
    assert line.startswith("Kernel timeline per step: 2 kernels, 0.12 ms with a kernel running, 0.03 ms between")


def test_gap_summary_splits_the_gpus_own_spacing_from_waits_and_counts_memsets():
    import gpu_throughput

    op = lambda cat, ts, dur: {"cat": cat, "ph": "X", "ts": ts, "dur": dur}  # noqa: E731
    # one step: a memset, 2 us, a long kernel with a short one inside it (another stream: no gap),
    # 1 us, a kernel, then 40 us waiting for the host, a last kernel
    events = [op("gpu_memset", 0, 1), op("kernel", 3, 100), op("kernel", 10, 5), op("kernel", 104, 10),
              op("kernel", 154, 10), op("cpu_op", 0, 500)]
    line = gpu_throughput.gap_summary({"traceEvents": events}, steps=1)
    assert line == ("GPU operations per step: 5 (1 memsets); gaps under 5 us: 2, 0.00 ms; "
                    "longer gaps: 1, 0.04 ms\n")


def test_the_sweeps_best_add_norm_settings_reach_the_throughput_run_and_a_bad_file_is_one_line(tmp_path):
    """add_norm_kernels.py's `best`: the fastest forward over the default and the forward rows, the
    fastest forward + backward over the default and the backward rows (all on the default forward);
    gpu_throughput.py --add-norm-settings reads it, and refuses a file without it in one line."""
    import add_norm_kernels
    import gpu_throughput

    default = [{"BLOCK_R": 4, "num_warps": 4}, {"BLOCK_R": 4, "ROWS_PER_PROGRAM": 32, "num_warps": 4, "STAGES": 3}]
    fast_forward = [{"BLOCK_R": 1, "num_warps": 2}, default[1]]
    fast_backward = [default[0], {"BLOCK_R": 2, "ROWS_PER_PROGRAM": 16, "num_warps": 8, "STAGES": 3}]
    rows = [{"impl": "inductor", "forward_us": 1.0, "forward_backward_us": 1.0},  # not a setting
            {"impl": "kernels default", "given": default, "forward_us": 22.3, "forward_backward_us": 54.5},
            {"impl": "kernels forward r1 w2", "given": fast_forward, "forward_us": 20.9, "forward_backward_us": 53.0},
            {"impl": "kernels backward r2 p16 w8 s3", "given": fast_backward, "forward_us": 21.7,
             "forward_backward_us": 53.9},
            {"impl": "kernels backward r9", "error": "OutOfResources"}]
    best = add_norm_kernels.best_settings(rows)
    assert best["forward"] == fast_forward[0] and best["backward"] == fast_backward[1]
    report = tmp_path / "sweep.json"
    report.write_text(json.dumps({"best": {"430M": best}}))
    assert gpu_throughput.read_add_norm_settings(str(report)) == {
        "430M": {"forward": fast_forward[0], "backward": fast_backward[1]}}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": []}))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_throughput.py"), "--add-norm-settings",
                           str(bad)], capture_output=True, text=True)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith(f"gpu_throughput.py: no add_norm launch settings in {bad}")


def test_the_ce_sweeps_best_settings_are_the_fastest_that_match_and_reach_the_throughput_run(tmp_path):
    """ce_kernel_tiles.py's `best`: the fastest setting whose results match the defaults' (a faster
    one that computes something else is passed over); gpu_throughput.py --ce-settings reads it and
    refuses a file without it in one line."""
    import ce_kernel_tiles
    import gpu_throughput

    rows = [{"BLOCK_N": 64, "BLOCK_V": 256, "COLUMN_PROGRAMS": 0, "STAGES": 1, "num_warps": 8, "ms": 0.40,
             "read_write_tb_per_s": 2.1, "grad_differ": 0.0, "bias_grad_differ": 0.0},
            {"BLOCK_N": 32, "BLOCK_V": 512, "COLUMN_PROGRAMS": 78, "STAGES": 2, "num_warps": 8, "ms": 0.30,
             "read_write_tb_per_s": 2.8, "grad_differ": 3e-3, "bias_grad_differ": 1e-5},
            {"BLOCK_N": 16, "BLOCK_V": 512, "COLUMN_PROGRAMS": 78, "STAGES": 3, "num_warps": 4, "ms": 0.20,
             "read_write_tb_per_s": 4.2, "grad_differ": 0.5, "bias_grad_differ": 0.0}]
    best = ce_kernel_tiles.best_setting(rows, ce_kernel_tiles.BACKWARDS)
    assert best == {"BLOCK_N": 32, "BLOCK_V": 512, "COLUMN_PROGRAMS": 78, "STAGES": 2, "num_warps": 8}
    forward = {"BLOCK_R": 4, "BLOCK": 2048, "SPLIT": 2, "STAGES": 2, "num_warps": 8}
    report = tmp_path / "tiles.json"
    report.write_text(json.dumps({"best": {"forward": forward, "backward": best}}))
    assert gpu_throughput.read_ce_settings(str(report)) == (forward, best)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_throughput.py"), "--ce-settings",
                           str(tmp_path / "missing.json")], capture_output=True, text=True)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("gpu_throughput.py: no ce_kernel launch settings in ")


def test_a_saved_trace_gives_time_by_kind_and_one_kernels_calls():
    import gpu_throughput

    kernel = lambda name, ts, dur: {"cat": "kernel", "ph": "X", "name": name, "ts": ts, "dur": dur}  # noqa: E731
    trace = {"traceEvents": [kernel("nvjet_sm90_tst_128x256", 0, 600), kernel("_ce_backward_kernel", 600, 400),
                             kernel("_add_norm_backward_kernel", 1000, 30),
                             kernel("_add_norm_backward_kernel", 1030, 40),
                             kernel("_sum_parts_kernel", 1070, 10), kernel("mystery", 1080, 20)]}
    kinds = gpu_throughput.trace_kinds(trace, steps=1)
    assert "GEMM                             0.60 ms" in kinds
    assert "catalog softmax (ce_kernel)      0.40 ms" in kinds
    assert "residual add+norm (add_norm)     0.08 ms" in kinds and "other" in kinds
    line = gpu_throughput.kernel_calls(trace, 1, "_add_norm_backward_kernel")
    assert line == ("_add_norm_backward_kernel: 2.0 calls per step, 30.0 / 40.0 / 40.0 us "
                    "(shortest / median / longest)\n")
    assert gpu_throughput.kernel_calls(trace, 1, "absent") == "absent: no calls\n"


def test_the_cpp_wrapper_bar_is_the_break_even_of_the_committed_gpu_runs():
    """train.cpp_wrapper=auto's bar (CPP_WRAPPER_MIN_STEPS) is where the H100 runs say the C++
    wrapper's faster steps repay its longer start on a warm cache: the summary's figures, recomputed
    from the committed result files, match the committed summary and the constant."""
    import compile_start

    from tuner.train.step import CPP_WRAPPER_MIN_STEPS

    committed = json.loads((ROOT / "benchmarks/results/compile_start_cuda/summary.json").read_text())
    again = compile_start.summarize([str(ROOT / f) for f in committed["files"]],
                                    [str(ROOT / f) for f in committed["break_even"]["step_files"]])
    assert again["medians"] == committed["medians"] and again["details"] == committed["details"]
    steps = again["break_even"]["steps"]
    assert steps == pytest.approx(committed["break_even"]["steps"])
    assert 0.9 * steps <= CPP_WRAPPER_MIN_STEPS <= 1.25 * steps  # 0 where the C++ start is no longer
    # what made it so: without the CPU-ISA checks (3bd5dc7) a warm C++ process starts >30 s sooner
    medians = again["medians"]
    assert medians["cpp_isa_checks_warm"]["start_s"] > medians["cpp_warm"]["start_s"] + 30


def test_start_summary_splits_cold_and_warm_processes_and_compares_repeats(tmp_path):
    import compile_start

    def row(wrapper, n, start, step_ms, losses, trial="a"):
        return {"wrapper": wrapper, "process": n, "cache": "cold" if n == 1 else "warm", "trial": trial,
                "start_s": start, "first_steps_s": start - 10, "step_ms": step_ms, "losses": losses,
                "phases_s": {"PyCodeCache.load_by_key_path": start / 2}}

    runs = tmp_path / "runs.json"
    runs.write_text(json.dumps({"rows": [row("python", 1, 60, 10.0, [5.0, 4.0]), row("python", 2, 20, 10.0, [5.0, 4.4]),
                                         row("python", 3, 30, 10.0, [6.0, 6.0], trial="b"),
                                         row("cpp", 1, 130, 8.0, [5.0, 4.0]), row("cpp", 2, 50, 8.0, [5.0, 4.0]),
                                         # under cProfile (--profile-dir): slower by the profiler, so left out
                                         {**row("cpp", 3, 90, 8.0, [5.0, 4.0]), "profiled": True},
                                         # --isa-checks: the C++ wrapper as before 3bd5dc7, apart
                                         row("cpp_isa_checks", 2, 70, 8.0, [5.0, 4.0])]}))
    steps = tmp_path / "steps.json"
    steps.write_text(json.dumps({"rows": [{"variant": "amp_compile", "step_ms": 8.0},
                                          {"variant": "amp_compile_python_wrapper", "step_ms": 10.0}]}))
    summary = compile_start.summarize([str(runs)], [str(steps)])
    assert summary["medians"]["python_warm"]["start_s"] == 25  # processes 2 and 3; process 1 is cold
    assert summary["medians"]["cpp_cold"]["start_s"] == 130
    assert summary["medians"]["cpp_warm"]["n"] == 1 and summary["medians"]["cpp_warm"]["start_s"] == 50
    assert summary["medians"]["cpp_isa_checks_warm"]["start_s"] == 70
    assert summary["break_even"]["steps"] == pytest.approx((50 - 25) / 2e-3)
    # a C++ wrapper whose warm start is no longer than the Python one's is ahead from the first step
    faster = tmp_path / "faster.json"
    faster.write_text(json.dumps({"rows": [row("python", 1, 60, 10.0, [5.0]), row("python", 2, 30, 10.0, [5.0]),
                                           row("cpp", 1, 90, 8.0, [5.0]), row("cpp", 2, 25, 8.0, [5.0])]}))
    assert compile_start.summarize([str(faster)], [str(steps)])["break_even"]["steps"] == 0
    assert summary["loss_rel_diff"] == {"step_1": 0.0, "step_2": pytest.approx(0.1)}  # trial b has no repeat
    assert summary["details"]["python_warm"]["shortest_listed_phase_s"] == [10, 15]  # each row's one phase: start / 2
    assert summary["details"]["python_warm"]["rows_with_caches"] == 0


def test_start_summary_keeps_a_control_apart_and_counts_its_cache_bypasses(tmp_path):
    """A control's rows (`--sdpa-unmarked`: wrapper python_sdpa_unmarked) get medians of their own,
    and `aot_cache` says which warm processes traced the step again (bypass) and which loaded it."""
    import compile_start

    def row(wrapper, n, start, caches):
        return {"wrapper": wrapper, "process": n, "cache": "cold" if n == 1 else "warm", "trial": "a",
                "start_s": start, "first_steps_s": start - 10, "step_ms": 9.0, "losses": [5.0], "caches": caches}

    runs = tmp_path / "runs.json"
    runs.write_text(json.dumps({"rows": [
        row("python", 1, 48, {"autograd_cache_miss": 2, "autograd_cache_saved": 2}),
        row("python", 2, 14, {"autograd_cache_hit": 2}),
        row("python_sdpa_unmarked", 1, 48, {"autograd_cache_bypass": 2}),
        row("python_sdpa_unmarked", 2, 20, {"autograd_cache_bypass": 2})]}))
    summary = compile_start.summarize([str(runs)], [])
    assert summary["medians"]["python_warm"]["start_s"] == 14
    assert summary["medians"]["python_sdpa_unmarked_warm"]["start_s"] == 20
    assert summary["aot_cache"]["python_warm"] == {"hit": 2, "miss": 0, "bypass": 0}
    assert summary["aot_cache"]["python_sdpa_unmarked_warm"] == {"hit": 0, "miss": 0, "bypass": 2}


def test_start_summary_of_a_file_that_is_not_a_result_file_is_one_line(tmp_path):
    bad = tmp_path / "notes.json"
    bad.write_text('{"device": "H100"}')
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/compile_start.py"), "--summarize", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"compile_start.py: {bad} is not a result file (no rows)"


def test_gpu_samples_are_summarized_over_the_busy_ones_only():
    """epoch_cycle.py's nvidia-smi samples: start-up and compile (low utilisation), unreadable and
    cut-off lines are left out of a row's GPU summary."""
    import epoch_cycle

    text = "\n".join(["1980, 120.5, 35, 0", "1980, 130.0, 36, 12",  # idle, compiling
                      "1755, 610.2, 61, 97", "1830, 640.0, 63, 99", "1900, 590.0, 62, 88",
                      "[N/A], [N/A], 60, 95", "1700, 55"])
    summary = epoch_cycle.gpu_summary(text)
    assert summary == {"busy_samples": 3, "sm_clock_mhz": 1830.0, "min_sm_clock_mhz": 1755.0, "power_w": 610.2,
                       "max_temperature_c": 63.0, "utilization_pct": 97.0}
    assert epoch_cycle.gpu_summary("1980, 120.5, 35, 0\n") is None


def test_the_gpu_sampler_keeps_what_nvidia_smi_printed_until_the_row_ended(tmp_path, monkeypatch):
    import epoch_cycle

    fake = tmp_path / "nvidia-smi"  # prints two samples, then keeps sampling (sleeps) until stopped
    fake.write_text("#!/bin/sh\necho '1830, 640.0, 63, 99'\necho '1755, 610.0, 61, 97'\nexec sleep 60\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    sampler = epoch_cycle.GpuSampler()
    time.sleep(1.0)
    assert sampler.summary()["busy_samples"] == 2
    assert sampler.proc.poll() is not None  # stopped with the row
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert epoch_cycle.GpuSampler().summary() is None  # no nvidia-smi: no GPU figures, no error


def test_the_gpu_sampler_keeps_every_sample_of_a_long_row(tmp_path, monkeypatch):
    """A row's samples are read as they come: more than a pipe holds (64 KiB: about 3,000 samples,
    under an hour at one a second) must not stop nvidia-smi or be lost."""
    import epoch_cycle

    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\ni=0\nwhile [ $i -lt 5000 ]; do echo '1830, 640.0, 63, 99'; i=$((i+1)); done\n"
                    "exec sleep 60\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    sampler = epoch_cycle.GpuSampler()
    time.sleep(2.0)
    assert sampler.summary()["busy_samples"] == 5000


def test_every_readme_table_renders_from_the_committed_result_files():
    """Each `render_tables.py` option rebuilds its README table from files in benchmarks/results:
    a renamed or moved result file shows here, not as a traceback for a reader."""
    import render_tables

    for option, render in render_tables.TABLES.items():
        assert render().strip(), option
    # session 26's three H100 runs of the 430M step: the median of the runs' own ratios
    assert "| median of 3 runs' ratios | | | | | | **3.96x** |" in render_tables.TABLES["--gpu-h100-430M-runs"]()
    settings = render_tables.TABLES["--step-settings-h200"]().splitlines()
    # runs grouped by what they changed, whatever the settings file was called on the machine
    assert sum("BLOCK_V=128, COLUMN_PROGRAMS=312" in line for line in settings) == 2
    assert any(line.startswith("| the defaults of the run's commit | - | 13.626, 13.234, 13.243, 13.263 |")
               for line in settings)
    # session 30's two process_ab.py runs: six rounds, each side in a process of its own
    assert ("| median | all 6 | 47.89 | 13.431 | **3.57x** | 13.183 | **3.63x** | **0.981** |"
            in render_tables.TABLES["--process-ab-h200"]())
    # session 32: the last block pruned to the scored rows, against the whole block, in the same runs
    prune = render_tables.TABLES["--prune-h200"]()
    assert "| 430M | amp_compile_graphs | 12.63, 12.70 | 13.08 | 0.969 | 48.2 | 3.80x | 3.69x |" in prune
    assert "| 5M | amp_compile_graphs | 3.13, 3.09 | 2.97, 3.03 | 1.038 | - | - | - |" in prune
    assert "| 5M | amp_compile_graphs | 2.63, 2.62, 2.62 | 2.67, 2.77, 2.66 | 0.983 | - | - | - |" in prune
    assert ("| median | all 2 | 47.83 | 12.566 | **3.81x** | 12.455 | **3.84x** | **0.991** |"
            in render_tables.TABLES["--process-ab-h200-session32"]())
    # session 33: the whole step as one CUDA graph against inductor's graphs alone, in the same runs
    graphs = render_tables.TABLES["--step-graph-h200"]()
    assert ("| 85M | amp_compile_graphs | 4.09, 4.08 | 4.83, 4.86 | 0.843 | 42.5 | 10.41x | 8.77x | 0.33, 0.30 | "
            "4.77, 4.83 | 2,709 | 2,610 |") in graphs
    assert "| 430M | amp_compile_graphs | 12.53, 12.46 | 12.69, 12.77 | 0.982 | 47.5 | 3.80x | 3.73x |" in graphs
    assert "| no_step_graph_seed1 | 0.1591 | 0.3175 | 172 | 15,380 | 162 | 513 |" in render_tables.TABLES["--ml1m-step-graph"]()
    # session 34: the default trial (the step graph, fixed shapes) against plain compile, pairs across calls
    defaults = render_tables.TABLES["--defaults-h200"]()
    assert "| 130M | 20.0 / 92.4 | 0.843 / 1.666 | 1.98x | 3,212 / 2,333 |" in defaults
    assert "| 130M_ray_train | 23.4 / not run | 0.848 / not run | | - / - |" in defaults
    ml1m = render_tables.TABLES["--ml1m-defaults"]()  # sessions 34 and 35: 16 seeds an arm, paired
    assert "| 3 | 0.1517 | 0.1678 | -0.0162 | 0.3036 | 0.3311 | 34 |" in ml1m
    assert "| 15 | 0.1483 | 0.1493 | -0.0010 | 0.3015 | 0.3038 | 35 |" in ml1m
    assert "default 0.1585 (0.1483-0.1663, 16 seeds, sd 0.0053); before 0.1611 (0.1493-0.1678, 16 seeds" in ml1m
    assert "-0.0026 (standard error 0.0013, t = -2.09 over 16 seeds); default lower in 12 of 16." in ml1m
    assert ("default: best epoch median 154, test HR@10 mean 0.3152, wall 122-212 s; before: best epoch median "
            "172.5" in ml1m)
    ml1m = render_tables.TABLES["--ml1m-defaults-session37"]()  # session 37: the last batch filled, 12 seeds
    assert "| 9 | 0.1502 | 0.1635 | -0.0133 | 0.3035 | 0.3255 | 37 |" in ml1m
    assert "-0.0011 (standard error 0.0018, t = -0.65 over 12 seeds); default lower in 7 of 12." in ml1m
    assert "default: best epoch median 165.5" in ml1m and "before: best epoch median 172," in ml1m
    assert ("before rerun at the same 12 seeds (h200_session37/defaults_call*.json minus ml1m_defaults.json): "
            "mean -0.0005, sd 0.0033, largest +0.0057, so one run's own sd 0.0023; the seeds' own sd in "
            "ml1m_defaults.json 0.0044." == render_tables.TABLES["--ml1m-reruns"]())
    assert ("default minus before: h200_session37/defaults_call*.json -0.0011 (95% interval -0.0050 to +0.0027, "
            "12 seeds); ml1m_defaults.json -0.0026 (16 seeds); the two +0.0015 apart, combined standard error 0.0022."
            == render_tables.TABLES["--ml1m-gap-change"]())
    filled = render_tables.TABLES["--ml1m-defaults-filled"]()  # sessions 37 and 38 pooled: 18 seeds
    assert "| 15 | 0.1632 | 0.1519 | +0.0113 | 0.3228 | 0.3018 | 38 |" in filled
    assert "| 17 | 0.1585 | 0.1685 | -0.0100 | 0.3169 | 0.3296 | 38 |" in filled
    assert "-0.0014 (standard error 0.0015, t = -0.91 over 18 seeds); default lower in 11 of 18." in filled
    assert ("default minus before: h200_session3[78]/defaults_call*.json -0.0014 (95% interval -0.0046 to +0.0018, "
            "18 seeds)" in render_tables.TABLES["--ml1m-gap-change-filled"]())
    # session 38: fp16 with its GradScaler as one CUDA graph against inductor's graphs, and bf16 beside it
    fp16 = render_tables.TABLES["--fp16-step-graph-h200"]()
    assert ("| gpu_throughput_5M_fp16 (call 2, e576415) | 5M | amp_compile_graphs_fp16 | 2.71, 2.70 | 3.59, 3.61 | "
            "0.751 |") in fp16
    assert ("- gpu_throughput_130M_fp16, 130M: amp_compile_graphs 5.42 ms a step; "
            "amp_compile_graphs_no_step_graph_fp16 6.01 (1.108x), amp_compile_graphs_fp16 5.90 (1.087x).") in fp16
    # call 3: bf16 autocast with fp32 weights, against fp16 and bf16 weights (medians of the times each ran)
    assert ("130M: amp_compile_graphs 5.41 ms a step; amp_compile_graphs_fp32_weights 5.44 (1.005x), "
            "amp_compile_graphs_fp16 5.87 (1.084x)." in render_tables.TABLES["--fp16-weights-h200"]())
    # the eb4dafa H100 run: the fp32 residual stream against bf16, the figure session 38's fp16 reading cites
    assert ("amp_compile_graphs 15.22 ms a step; amp_compile_graphs_torch_ce 15.28 (1.004x), "
            "amp_compile_graphs_fp32_residual 15.59 (1.024x)." in render_tables.TABLES["--fp32-residual-h100"]())
    assert ("before rerun at the same 16 seeds" in render_tables.TABLES["--ml1m-reruns-filled"]()
            and "so one run's own sd 0.0021;" in render_tables.TABLES["--ml1m-reruns-filled"]())
    masks = render_tables.TABLES["--kernel-masks-h200"]().splitlines()  # compiled for the GPU: 7 dropout cases
    assert sum(line.startswith(("| add_norm |", "| short_attention |")) for line in masks) == 7
    assert "| short_attention | bf16_ml1m_tiled | 0.9000 | +0.00045 (batch) |" in masks
    # session 35: the default with the prediction slots sized from the data
    assert ("| 130M | 21.4 / 115.4 | 0.663 / 1.717 | 2.59x | 2,327 / 2,333 |"
            in render_tables.TABLES["--defaults-h200-session35"]())
    slots = render_tables.TABLES["--static-slots"]()
    assert "| ML-1M, benchmarks/ml1m.yaml | 128, 200 | 92 | 8,256 | 5,248 | 4,205 / 5,254 | 1 of 2,350 |" in slots
    # session 31: every tile of the GELU epilogues lost to the step's kernels
    gelu = render_tables.TABLES["--gelu-gemm-h200"]()
    assert "| 430M (6,400 x 1,024 -> 4,096) | forward | 0.078 | 0.118 | 0.098 | 0.153 (64x128x64" in gelu
    assert "| gelu_forward | 40.8 (2.57) | 31.2 (2.52) |" in render_tables.TABLES["--gelu-elementwise-h200"]()
    start = render_tables.TABLES["--start-h200"]()
    assert "| cpp_isa_checks | 2 | warm | 66.0 | 53.0 | 41.5 | 10.11 |" in start


def test_render_tables_names_its_tables_and_refuses_an_unknown_one():
    """`render_tables.py --help` lists every table; an unknown name is a one-line error (it used to
    print the default table, so a mistyped option looked like an answer)."""
    script = str(ROOT / "benchmarks" / "render_tables.py")
    import render_tables

    listed = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and all(option in listed.stdout for option in render_tables.TABLES)
    wrong = subprocess.run([sys.executable, script, "--gpu-h100-sesion26"], capture_output=True, text=True,
                           timeout=120)
    assert wrong.returncode != 0 and not wrong.stdout
    assert wrong.stderr.strip().splitlines() == ["render_tables.py: no table '--gpu-h100-sesion26'; run with --help "
                                                 "for the list"]


def test_process_ab_takes_each_rounds_ratio_and_skips_failed_processes():
    """Per arm: our step in each round against the seed's of the same round, the median of those
    ratios, and the step against the first arm's; a process that failed (None) drops out."""
    import process_ab

    rounds = [{"seed": 47.6, "default": 13.24, "none": 13.08},
              {"seed": 46.9, "default": 13.26, "none": None},
              {"seed": None, "default": 13.20, "none": 12.96}]
    out = process_ab.summarize(rounds, ["default", "none"])
    assert out["seed_median_ms"] == pytest.approx(47.25)
    default, none = out["arms"]["default"], out["arms"]["none"]
    assert default["median_ms"] == 13.24 and none["median_ms"] == pytest.approx(13.02)
    assert default["speedup_vs_seed"][2] is None and none["speedup_vs_seed"][1] is None
    assert none["median_speedup_vs_seed"] == pytest.approx(47.6 / 13.08)
    assert none["step_vs_default"] == [pytest.approx(13.08 / 13.24), None, pytest.approx(12.96 / 13.20)]
    assert process_ab.parse_arm("none=CUBLAS_WORKSPACE_CONFIG=:0:0,CUBLASLT_WORKSPACE_SIZE=0") == (
        "none", {"CUBLAS_WORKSPACE_CONFIG": ":0:0", "CUBLASLT_WORKSPACE_SIZE": "0"})
    assert process_ab.parse_arm("default=") == ("default", {})


@pytest.mark.parametrize("argv, message", [
    (["--arm", "no equals sign"], "process_ab.py: --arm takes NAME=KEY=VALUE,KEY=VALUE or NAME=, not 'no equals sign'"),
    (["--arm", "a=", "--rounds", "0"], "process_ab.py: --rounds must be at least 1")])
def test_process_ab_refuses_bad_arguments_in_one_line(tmp_path, argv, message):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/process_ab.py"), *argv, "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip() == message


def test_a_process_ab_process_that_fails_leaves_its_error_and_no_step(tmp_path):
    """A gpu_throughput.py process that cannot run (here: no CUDA device) gives no report: the
    round records None and the process's last lines stay beside where its report would be."""
    import process_ab

    output = tmp_path / "none_1.json"
    assert process_ab.run(["--sizes", "430M", "--seed-variants", "--variants", "amp_compile_graphs"],
                          {"CUBLASLT_WORKSPACE_SIZE": "0"}, output, timeout=120) is None
    assert not output.exists() and output.with_suffix(".err").read_text().strip()


def _ml1m_variants(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    """benchmarks/ml1m_variants.py on a small file in ML-1M's form (`user item` lines, in order)."""
    data = tmp_path / "small.txt"
    if not data.exists():
        rng = np.random.default_rng(0)
        data.write_text("".join(f"{user} {item}\n" for user in range(1, 61)
                                for item in rng.choice(np.arange(1, 41), size=12, replace=False)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks/ml1m_variants.py"), "--data", str(data), *argv],
                          capture_output=True, text=True, env=env, timeout=600)


def test_ml1m_variants_runs_variants_side_by_side_and_stamps_every_row(tmp_path):
    """--parallel 2 runs both arms at once (each process's span overlaps the other's), every row
    carries the --stamp fields, and the file says how many ran at once."""
    out = tmp_path / "r.json"
    proc = _ml1m_variants(tmp_path, "--group", "defaults", "--epochs", "1", "--set", "model.max_len=8",
                          "--parallel", "2", "--stamp", "session=36", "--stamp", "code_commit=abc1234",
                          "--only", "default", "before", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert result["parallel"] == 2 and set(rows) == {"default", "before"}
    for row in rows.values():
        assert row["rc"] == 0 and row["session"] == 36 and row["code_commit"] == "abc1234", row
        assert 0 <= row["test_ndcg_10"] <= 1 and row["epochs"] == 1
    ends = {name: (row["started"], row["started"] + row["process_s"]) for name, row in rows.items()}
    assert ends["default"][0] < ends["before"][1] and ends["before"][0] < ends["default"][1], ends


@pytest.mark.parametrize("argv, message", [
    (["--parallel", "0"], "ml1m_variants.py: --parallel 0: must be at least 1"),
    (["--timeout", "0"], "ml1m_variants.py: --timeout 0: must be positive"),
    (["--stamp", "session"], "ml1m_variants.py: --stamp session: expected KEY=VALUE, KEY not a result field"),
    (["--stamp", "rc=0"], "ml1m_variants.py: --stamp rc=0: expected KEY=VALUE, KEY not a result field")])
def test_ml1m_variants_refuses_bad_arguments_in_one_line(tmp_path, argv, message):
    proc = _ml1m_variants(tmp_path, "--group", "defaults", *argv, "--out", str(tmp_path / "r.json"))
    assert proc.returncode == 1 and proc.stderr.strip() == message
    assert not (tmp_path / "r.json").exists()


def test_paired_table_joins_the_seeds_of_several_calls_and_refuses_a_seed_run_twice(tmp_path, monkeypatch):
    """A glob of ml1m_variants.py files (one per device call) pairs each seed's two arms across
    them; the header names each file's command; the same arm and seed in two files is an error."""
    import render_tables

    def write(name: str, ndcgs: dict[str, float]) -> None:
        rows = [{"variant": variant, "rc": 0, "test_ndcg_10": value, "test_hr_10": 2 * value, "best_epoch": 10,
                 "wall_s": 100.0, "session": 36} for variant, value in ndcgs.items()]
        (tmp_path / "s36").mkdir(exist_ok=True)
        (tmp_path / "s36" / name).write_text(json.dumps({"device": "GPU X", "torch": "2.11", "command": f"run {name}",
                                                         "rows": rows}))

    monkeypatch.setattr(render_tables, "RESULTS", tmp_path)
    write("call1.json", {"default": 0.15, "before": 0.16, "default_seed1": 0.17, "before_seed1": 0.16})
    write("call2.json", {"default_seed2": 0.14, "before_seed2": 0.16, "before_seed3": 0.2})
    table = render_tables.paired_table("s36/call*.json", ("default", "before"))
    assert table.startswith("Device: GPU X (torch 2.11); s36/call1.json: `run call1.json`; "
                            "s36/call2.json: `run call2.json`.")
    assert "| 2 | 0.1400 | 0.1600 | -0.0200 |" in table and "| 3 |" not in table  # seed 3 has one arm only
    assert "-0.0067 (standard error 0.0088, t = -0.76 over 3 seeds); default lower in 2 of 3." in table
    write("call3.json", {"default_seed1": 0.18})
    with pytest.raises(ValueError, match="default_seed1 ran twice"):
        render_tables.paired_table("s36/*.json", ("default", "before"))
    with pytest.raises(FileNotFoundError, match="no results file matches"):
        render_tables.paired_table("s37/*.json", ("default", "before"))


def test_ml1m_variants_kills_a_variant_past_its_timeout_and_keeps_its_row(tmp_path):
    out = tmp_path / "r.json"
    proc = _ml1m_variants(tmp_path, "--group", "defaults", "--epochs", "50", "--timeout", "1", "--only", "before",
                          "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["rc"] == -9 and row["error"] == ["killed after the --timeout of 1 s"] and row["process_s"] < 30, row


def test_every_benchmark_variant_is_a_config_the_service_accepts():
    """Each ml1m_variants.py variant (on benchmarks/ml1m.yaml) and each gpu_throughput.py suffix
    loads as a config: a misspelt key or value fails here, not minutes into a GPU call."""
    import gpu_throughput
    import ml1m_variants

    from tuner.config import load_config

    variants = [ov for group in ml1m_variants.GROUPS.values() for ov in group.values()]
    suffixes = [list(kwargs.get("overrides", ())) for kwargs in gpu_throughput.SUFFIXES.values()]
    assert len(variants) > 100 and ["model.residual=half"] in suffixes
    for overrides in variants:
        load_config(str(ROOT / "benchmarks/ml1m.yaml"), overrides=overrides)
    for overrides in suffixes:
        load_config(overrides=overrides)


def test_gpu_throughput_variants_stack_their_suffixes():
    """`amp_compile_graphs_no_step_graph_fp16`: a V100's fp16 step with inductor's graphs alone, timed
    on any GPU; an unknown base is one line."""
    import gpu_throughput

    spec = gpu_throughput.variant_spec("amp_compile_graphs_no_step_graph_fp16", "130M", 256, 20, 5)
    assert spec.overrides == ("train.amp=fp16", "train.step_graph=off")
    assert spec.amp and spec.compile and spec.static_shapes and spec.compile_mode == "reduce-overhead"
    spec = gpu_throughput.variant_spec("amp_compile_graphs_fp16_half_residual", "130M", 256, 20, 5)
    assert spec.overrides == ("model.residual=half", "train.amp=fp16")
    with pytest.raises(SystemExit, match="^gpu_throughput.py: unknown variant 'fp16_fp16'$"):
        gpu_throughput.variant_spec("fp16_fp16", "130M", 256, 20, 5)
