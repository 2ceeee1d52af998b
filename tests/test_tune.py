"""`tuner tune` end to end: real local Ray, real Optuna, real MLflow (sqlite)."""

import json
import re
from pathlib import Path

import pytest

from tests.tune_helpers import SMALL, last_json, mlflow_runs, run_tuner, run_tuner_logged


@pytest.mark.slow
def test_tune_records_every_trial_and_registers_the_best(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = last_json(run_tuner(
        "tune", "--size", "tiny", "--num-samples", "6", "--max-epochs", "4", "--tracking-uri", uri,
        "--storage", str(tmp_path / "ray"), "--experiment", "E", "--json",
        "--set", "tune.grace_period=1", *SMALL))
    assert summary["num_trials"] == 6
    assert summary["trials_stopped_early"] >= 1, summary["trials"]  # ASHA pruned something
    assert summary["trials_error"] == 0
    client, parents, children = mlflow_runs(uri, "E")
    assert len(parents) == 1 and len(children) == 6
    parent = parents[0]
    for tag in ("size", "dataset", "search_space_hash", "git_commit"):
        assert parent.data.tags.get(tag), tag
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert len({c.data.tags["tuner.trial_id"] for c in children}) == 6
    for child in children:
        params = child.data.params
        assert {"optim.lr", "model.dropout", "optim.weight_decay"} <= set(params)
        history = client.get_metric_history(child.info.run_id, "val_ndcg_10")
        epochs = sorted(m.step for m in history)
        assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) >= 1  # once per epoch, no repeats
        for metric in ("train_loss", "val_hr_10", "samples_per_s", "epoch_s", "peak_mem_mb"):
            assert len(client.get_metric_history(child.info.run_id, metric)) == len(epochs)
        assert "config.yaml" in [a.path for a in client.list_artifacts(child.info.run_id)]
    # the best trial's test metrics and model sit on the parent run; the model is registered
    assert "test_ndcg_10" in client.get_run(parent.info.run_id).data.metrics
    versions = client.search_model_versions("name='bert4rec-tiny'")
    assert len(versions) == 1
    import mlflow.pyfunc
    import pandas as pd

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/bert4rec-tiny/{versions[0].version}")
    out = model.predict(pd.DataFrame({"history": ["1 2 3"]}), params={"k": 7})
    assert len(out["items"][0]) == 7 and set(out["items"][0]) <= {str(i) for i in range(1, 151)}
    # a second run with the same experiment name refuses instead of interleaving trials
    again = run_tuner("tune", "--num-samples", "1", "--tracking-uri", uri, "--storage", str(tmp_path / "ray"),
                      "--experiment", "E", *SMALL)
    assert again.returncode == 2 and "already exists" in again.stderr and "--resume" in again.stderr


@pytest.mark.slow
def test_refit_registers_the_winner_retrained_on_its_validation_targets(tmp_path):
    import mlflow
    import torch

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = last_json(run_tuner(
        "tune", "--num-samples", "2", "--max-epochs", "3", "--scheduler", "none", "--refit", "--tracking-uri", uri,
        "--storage", str(tmp_path / "ray"), "--experiment", "F", "--json", *SMALL))
    best = next(t for t in summary["trials"] if t["trial_id"] == summary["best_trial_id"])
    refit = summary["refit"]
    assert 1 <= refit["epochs"] <= best["epochs"] and refit["test_ndcg_10"] > 0
    # its training loss was checked against the trial's (a diverged refit is not registered)
    assert refit["train_loss"] > 0 and "rejected" not in refit, refit
    client, parents, children = mlflow_runs(uri, "F")
    assert len(children) == 2  # the refit is not a trial
    exp = client.get_experiment_by_name("F")
    [run] = client.search_runs([exp.experiment_id], "tags.`tuner.role` = 'refit'")
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss"))
    assert steps == list(range(1, refit["epochs"] + 1))  # every refit epoch once
    assert not any(k.startswith("val_") for k in run.data.metrics)  # nothing held out to validate on
    parent = client.get_run(parents[0].info.run_id).data.metrics
    assert parent["refit_test_ndcg_10"] == pytest.approx(refit["test_ndcg_10"])
    # the registered model is the refitted one: its weights were trained with train.refit
    mlflow.set_tracking_uri(uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri="models:/bert4rec-tiny/1",
                                                     dst_path=str(tmp_path / "m")))
    [state_file] = local.rglob("model.pt")
    config = torch.load(state_file, weights_only=False)["config"]
    assert config["train"]["refit"] is True and config["train"]["max_epochs"] == refit["epochs"]


def test_dry_run_prints_the_plan_without_ray(tmp_path):
    plan = last_json(run_tuner("tune", "--dry-run", "--json", "--num-samples", "5",
                               "--storage", str(tmp_path), "--set", "resources.cpus_per_worker=2"))
    assert plan["num_samples"] == 5 and plan["resources_per_trial"] == {"CPU": 2.0}
    assert plan["max_concurrent"] == plan["cluster_resources"]["CPU"] // 2
    assert set(plan["search_space"]) >= {"optim.lr", "model.dropout", "optim.weight_decay"}
    assert not (tmp_path / "bert4rec-tiny").exists()


@pytest.mark.slow
def test_time_budget_ends_the_experiment_with_tested_trials(tmp_path):
    """Random search without early stopping under a 60 s budget: no trial is cut off before it
    tests its best weights, no new trial starts late, and the run ends soon after the budget."""
    import time

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t0 = time.monotonic()
    summary = last_json(run_tuner(
        "tune", "--size", "tiny", "--search", "random", "--scheduler", "none", "--num-samples", "40",
        "--max-epochs", "1000", "--time-budget", "60", "--tracking-uri", uri, "--storage", str(tmp_path / "ray"),
        "--experiment", "B", "--json", "--set", "train.patience=0", *SMALL))
    wall = time.monotonic() - t0
    assert 1 <= summary["num_trials"] < 40 and summary["trials_completed"] >= 1
    # every trial that started tested its best weights; none was cut off by Tune
    assert summary["trials_completed"] + summary["trials_not_started"] == summary["num_trials"], summary["trials"]
    ran = [t for t in summary["trials"] if t["status"] == "completed"]
    assert all(t["epochs"] and t["epochs"] < 1000 for t in ran)
    assert summary["test_ndcg_10"] > 0
    assert len({json.dumps(t["params"], sort_keys=True) for t in summary["trials"]}) == summary["num_trials"]
    assert wall < 60 + 100, wall  # start-up, last epochs, testing and registration included
    _, _, children = mlflow_runs(uri, "B")
    assert len(children) == len(ran)


def test_trials_started_after_the_budget_end_in_a_clear_error_not_a_tune_traceback(tmp_path):
    """Every trial starts after the budget's start-by time and returns without a result: Tune's
    strict metric check once turned the first such trial into a TuneError that ended the run
    (losing the finished trials of a real search, as on the GPU); now the trials count as not
    started and, with none left, the user gets one line."""
    proc = run_tuner("tune", "--size", "tiny", "--num-samples", "3", "--time-budget", "30",
                     "--set", "tune.final_fraction=0.99", "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
                     "--storage", str(tmp_path / "ray"), "--experiment", "late", *SMALL, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    # the driver ends with one line (Ray may print a trial actor's ignored SIGTERM traceback
    # while it shuts the idle actors down; that is its workers' noise, not the driver failing)
    assert proc.stderr.strip().splitlines()[-1].startswith("tuner: error: no trial reported a validation metric")
    assert "TuneError" not in proc.stderr and "did not include the specified metric" not in proc.stderr, \
        proc.stderr[-3000:]


@pytest.mark.parametrize("args, message", [
    (["--tracking-uri", "http://127.0.0.1:9"], "unreachable"),
    (["--size", "nope"], "model.size='nope' is not one of"),
    (["--search-space", "/nonexistent.yaml"], "not found"),
    (["--resume", "--experiment", "never-ran"], "nothing to resume"),
    (["--set", "train.refit=true"], "train.refit trains on the validation targets"),
])
def test_bad_tune_input_fails_fast(tmp_path, args, message):
    proc = run_tuner("tune", "--storage", str(tmp_path), "--tracking-uri", f"sqlite:///{tmp_path}/m.db", *args,
                     timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.slow
def test_driver_killed_mid_experiment_resumes_without_duplicates(tmp_path):
    import os
    import signal
    import subprocess
    import time

    from tests.tune_helpers import tuner_cmd

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "ray"
    args = ["tune", "--num-samples", "4", "--max-epochs", "5", "--tracking-uri", uri, "--storage", str(storage),
            "--experiment", "R", "--scheduler", "none", "--set", "tune.max_concurrent=2", *SMALL]
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(tuner_cmd(*args), start_new_session=True, stdout=log, stderr=log)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:  # kill once a trial is mid-way (2+ epochs reported)
            results = list((storage / "R").glob("run_trial_*/result.json"))
            if any(len(r.read_text().splitlines()) >= 2 for r in results):
                break
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.5)
        else:
            pytest.fail("no trial progressed in 300 s")
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)  # the driver and the local Ray it started
        first.wait()
    summary = last_json(run_tuner_logged(*args, "--resume", "--json", log_dir=tmp_path, watch=storage / "R"))
    assert summary["num_trials"] == 4 and summary["trials_completed"] == 4, summary["trials"]
    client, parents, children = mlflow_runs(uri, "R")
    assert len(parents) == 1 and len(children) == 4
    assert len({c.data.tags["tuner.trial_id"] for c in children}) == 4
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_ndcg_10")]
        assert sorted(steps) == [1, 2, 3, 4, 5], steps  # every epoch once: none lost, none double-counted
    assert len(client.search_model_versions("name='bert4rec-tiny'")) == 1


@pytest.mark.slow
def test_training_worker_killed_mid_trial_resumes_from_its_checkpoint(tmp_path):
    import os
    import signal
    import subprocess
    import time

    from tests.tune_helpers import experiment_snapshot, kill_session, session_processes, tuner_cmd

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "ray"
    args = ["tune", "--num-samples", "1", "--max-epochs", "6", "--scheduler", "none", "--tracking-uri", uri,
            "--storage", str(storage), "--experiment", "K", "--json", *SMALL]
    log = open(tmp_path / "run.log", "w")
    run = subprocess.Popen(tuner_cmd(*args), start_new_session=True, stdout=subprocess.PIPE, stderr=log, text=True)
    killed = None
    deadline = time.time() + 300
    try:
        while time.time() < deadline and killed is None:
            checkpoints = list((storage / "K" / "train").glob("trial-*/checkpoint_*"))
            if len(checkpoints) >= 2:  # two epochs done: kill the worker mid-training
                # this run's worker only: Ray's processes share the session of the driver that started them
                workers = [pid for pid, title in session_processes(run.pid) if "RayTrainWorker" in title]
                if workers:
                    os.kill(workers[0], signal.SIGKILL)
                    killed = workers[0]
            assert run.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            time.sleep(0.2)
        assert killed, "never saw a training worker to kill"
        try:  # the whole run takes about a minute on 2 cores; a hang fails with what the run was doing
            out, _ = run.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            titles = "\n".join(f"{pid} {title}" for pid, title in session_processes(run.pid))
            pytest.fail(f"tuner tune still running 240 s after the worker {killed} was killed\n"
                        f"{experiment_snapshot(storage / 'K')}\nprocesses:\n{titles}\n"
                        f"stderr tail:\n{(tmp_path / 'run.log').read_text()[-4000:]}")
    finally:
        if run.poll() is None:
            kill_session(run.pid)  # Ray's workers have process groups of their own
    assert run.returncode == 0, (tmp_path / "run.log").read_text()[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["trials_completed"] == 1 and summary["trials_error"] == 0
    client, parents, children = mlflow_runs(uri, "K")
    assert len(children) == 1  # the retried trial kept its MLflow run
    steps = [m.step for m in client.get_metric_history(children[0].info.run_id, "val_ndcg_10")]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6], steps  # no epoch lost or counted twice
    reporters = set(re.findall(r"RayTrainWorker pid=(\d+)\).*Reporting training result",
                               (tmp_path / "run.log").read_text()))
    assert str(killed) in reporters and len(reporters) >= 2  # a new worker took over after the kill


def test_a_diverged_refit_is_recognised_from_its_training_loss():
    """The refit keeps the trial's weights when its last training loss is non-finite or clearly
    worse than the trial's at the same epoch (the ML-1M GPU refit: 7.95 against ~4.7)."""
    import types

    import pandas as pd

    from tuner.tune.experiment import _train_loss_at, refit_diverged

    history = types.SimpleNamespace(metrics_dataframe=pd.DataFrame(
        {"epoch": [1, 2, 3, 3], "train_loss": [8.0, 5.0, 4.7, None], "val_ndcg_10": [0.1, 0.12, 0.15, 0.15]}))
    assert _train_loss_at(history, 2) == 5.0
    assert _train_loss_at(history, 3) == 4.7  # the final result row (no train_loss) is skipped
    assert _train_loss_at(history, 99) == 4.7  # past the history: its last loss
    assert refit_diverged(7.95, 4.7) and refit_diverged(float("nan"), 4.7) and refit_diverged(float("inf"), None)
    assert not refit_diverged(4.5, 4.7) and not refit_diverged(5.4, 4.7) and not refit_diverged(None, 4.7)
