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
