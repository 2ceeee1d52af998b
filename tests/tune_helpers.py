"""Helpers for the tuning tests: run the CLI, read MLflow back."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT

SMALL = ["--synthetic-users", "500", "--synthetic-items", "150", "--set", "model.max_len=16",
         "--set", "train.batch_size=64", "--set", "eval.num_negatives=20"]


def tuner_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tuner", *args]


def run_tuner(*args: str, timeout: int = 600, cwd=ROOT, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(tuner_cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, **(env or {})})


def run_tuner_logged(*args: str, log_dir, timeout: int = 420, watch=None) -> subprocess.CompletedProcess:
    """`run_tuner`, but its own session with output in files: on a timeout the whole session (the
    driver and the local Ray it started) is killed, so nothing outlives the test, and the failure
    shows the output's tail and what `watch` (an experiment directory) holds."""
    from pathlib import Path

    log_dir = Path(log_dir)
    out, err = log_dir / "resume.out", log_dir / "resume.err"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(tuner_cmd(*args), cwd=ROOT, stdout=o, stderr=e, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_session(proc.pid)
            proc.wait()
            raise AssertionError(f"tuner {' '.join(args[:1])} still running after {timeout} s\n"
                                 f"{experiment_snapshot(watch) if watch else ''}\n"
                                 f"stderr tail:\n{err.read_text()[-4000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.read_text(), err.read_text())


def experiment_snapshot(exp_dir) -> str:
    """Per Tune trial: results reported; per Train run: what its directory holds."""
    from pathlib import Path

    exp_dir = Path(exp_dir)
    def results(trial: Path) -> int:
        path = trial / "result.json"
        return len(path.read_text().splitlines()) if path.exists() else 0

    lines = [f"{d.name[:40]}: {results(d)} results" for d in sorted(exp_dir.glob("run_trial_*"))]
    lines += [f"{d.name}: {sorted(x.name for x in d.iterdir())}" for d in sorted((exp_dir / "train").glob("trial-*"))]
    return "\n".join(lines)


def session_processes(sid: int) -> list[tuple[int, str]]:
    """(pid, title) of the live processes in session `sid`: a driver started with
    `start_new_session=True` and the local Ray it started (whose workers have process groups of
    their own, so `killpg` alone misses them)."""
    ps = subprocess.run(["ps", "-eo", "pid=,sid=,stat=,args="], capture_output=True, text=True).stdout
    rows = [line.split(None, 3) for line in ps.splitlines()]
    return [(int(r[0]), r[3] if len(r) > 3 else "") for r in rows
            if len(r) >= 3 and r[1] == str(sid) and not r[2].startswith("Z")]


def kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid`: the driver's process group first (so it starts
    nothing more), then what is left, Ray's workers among it."""
    import contextlib
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(sid, signal.SIGKILL)
    for pid, _ in session_processes(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mlflow_runs(uri: str, experiment: str):
    """(parent runs, child runs) of an experiment."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment}"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("tuner.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("tuner.role") == "trial"]
    return client, parents, children
