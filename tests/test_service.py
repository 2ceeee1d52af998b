"""The service against real servers: an `mlflow server` process and a `ray start --head` cluster."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import ROOT
from tests.tune_helpers import SMALL, last_json, mlflow_runs, run_tuner


def free_ports(count: int) -> list[int]:
    """Distinct free ports (all sockets held open until every port is chosen)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def wait_http(url: str, timeout: float, proc: subprocess.Popen, log) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, open(log).read()[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers (Ray's dashboard asks for the token: 401)
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{url} did not come up in {timeout} s: {open(log).read()[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    """Stop a server we started, by its process group (it was started in a new session)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def stop_session(head_log) -> None:
    """Kill, by pid, every process of the Ray session a head node logged (some daemonise)."""
    import re

    match = re.search(r"/tmp/ray/(session_[0-9_-]+)", open(head_log).read())
    if not match:
        return
    ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    for line in ps.splitlines():
        pid, _, args = line.strip().partition(" ")
        if match.group(1) in args and int(pid) != os.getpid():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    log = tmp_path / "mlflow-server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 120, proc, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


@pytest.mark.slow
def test_tune_logs_to_a_remote_mlflow_server(tmp_path, mlflow_server):
    summary = last_json(run_tuner(
        "tune", "--num-samples", "2", "--max-epochs", "2", "--scheduler", "none", "--tracking-uri", mlflow_server,
        "--storage", str(tmp_path / "ray"), "--experiment", "remote", "--json", *SMALL))
    assert summary["trials_completed"] == 2 and summary["registered_model"] == "bert4rec-tiny"
    client, parents, children = mlflow_runs(mlflow_server, "remote")
    assert len(parents) == 1 and len(children) == 2
    for child in children:  # artifacts went through the server's artifact proxy
        assert "config.yaml" in [a.path for a in client.list_artifacts(child.info.run_id)]
    assert len(client.search_model_versions("name='bert4rec-tiny'")) == 1
    report = last_json(run_tuner("report", "--experiment", "remote", "--tracking-uri", mlflow_server,
                                 "--output", str(tmp_path / "report"), "--json"))
    assert [t["best_val_ndcg_10"] for t in report["trials"]] == sorted(
        (t["best_val_ndcg_10"] for t in report["trials"]), reverse=True)
    assert any(p.endswith("optimization_history.png") for p in report["pictures"])
    assert (tmp_path / "report" / "optimization_history.png").stat().st_size > 1000
    artifacts = [a.path for a in client.list_artifacts(parents[0].info.run_id, "report")]
    assert "report/optimization_history.png" in artifacts


@pytest.mark.slow
def test_ray_job_submit_against_a_head_node(tmp_path):
    """`ray job submit --working-dir . -- tuner tune ...` against `ray start --head` on 127.0.0.1."""
    gcs_port, dashboard_port, agent_http, agent_grpc, metrics, runtime_env = free_ports(6)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    log = tmp_path / "head.log"
    ports = [f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}"]
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=4", *ports,
         "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard_port}", "--disable-usage-stats"],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        address = f"http://127.0.0.1:{dashboard_port}"
        wait_http(f"{address}/api/version", 120, head, log)
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        # token authentication is on (Ray 2.60's default): the client finds ~/.ray/auth_token once
        # told to use tokens; from another machine, RAY_AUTH_TOKEN carries the token itself
        env["RAY_AUTH_MODE"] = "token"
        deadline = time.time() + 120  # the head's job agent comes up a little after the dashboard
        while True:
            probe = subprocess.run(["ray", "job", "list", "--address", address], capture_output=True, text=True,
                                   env=env, timeout=60)
            if probe.returncode == 0 or time.time() > deadline:
                break
            time.sleep(2)
        job = subprocess.run(
            ["ray", "job", "submit", "--address", address, "--working-dir", ".", "--",
             "tuner", "tune", "--num-samples", "2", "--max-epochs", "2", "--tracking-uri", uri,
             "--storage", str(tmp_path / "ray"), "--experiment", "submitted", *SMALL],
            capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout.lower()
        _, parents, children = mlflow_runs(uri, "submitted")
        assert len(parents) == 1 and len(children) == 2
    finally:
        stop(head)
        stop_session(log)


@pytest.mark.slow
def test_mlflow_server_outage_mid_run_loses_nothing_silently(tmp_path):
    """Stop the tracking server between epochs, bring it back: training logging never raises,
    the failed batch is counted and recorded as `mlflow_lost_batches` once the server answers."""
    from tuner import tracking

    port = free_port()
    uri = f"http://127.0.0.1:{port}"

    def start():
        log = tmp_path / f"server-{time.time()}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
             "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_http(f"{uri}/health", 120, proc, log)
        return proc

    server = start()
    try:
        exp_id, parent = tracking.parent_run(uri, "outage", {})
        reporter = tracking.MlflowReporter(uri, exp_id, parent, "t1", "trial-1", {"optim.lr": 1e-3}, "x: 1\n")
        reporter.log(1, {"val_ndcg_10": 0.1, "train_loss": 5.0})
        stop(server)
        reporter.log(2, {"val_ndcg_10": 0.2, "train_loss": 4.0})  # server down: counted, not raised
        assert reporter.lost == 1
        server = start()
        reporter.log(3, {"val_ndcg_10": 0.3, "train_loss": 3.0})
        client = tracking.client(uri)
        steps = [m.step for m in client.get_metric_history(reporter.run_id, "val_ndcg_10")]
        assert steps == [1, 3]  # epoch 2 is recorded as lost, not silently missing
        lost = client.get_metric_history(reporter.run_id, "mlflow_lost_batches")
        assert [(m.step, m.value) for m in lost] == [(3, 1.0)]
    finally:
        stop(server)


def test_trial_run_keeps_the_final_test_metrics_and_whether_the_ranks_agreed(tmp_path):
    """A DDP trial whose ranks drifted must say so where users compare trials: in its MLflow run."""
    from tuner import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id, parent = tracking.parent_run(uri, "ddp", {})
    reporter = tracking.MlflowReporter(uri, exp_id, parent, "t1", "trial-1", {"optim.lr": 1e-3}, "x: 1\n")
    reporter.final({"test_ndcg_10": 0.15, "ranks_agree": 0.0, "epochs": 3, "wall_s": 12.0, "num_users": 400})
    run = tracking.client(uri).get_run(reporter.run_id)
    assert run.data.metrics["ranks_agree"] == 0.0
    assert run.data.metrics["test_ndcg_10"] == 0.15
    assert "wall_s" not in run.data.metrics  # per-process figures stay out of the comparison
    assert run.info.status == "FINISHED"
