"""MLflow: one parent run per experiment, one child run per trial, the best model registered.

Names carry no timestamps: the parent run is found again by its `tuner.experiment` tag and a
trial's child run by its `tuner.trial_id` tag, so a resumed experiment or a retried trial keeps
logging into the runs it already has instead of creating duplicates. Only rank 0 logs.

The default tracking URI is a sqlite file under `./mlruns`; relative sqlite paths are made
absolute in the driver, because trials run in other working directories. An `http(s)://` URI
is checked before anything starts, so an unreachable server is an immediate, clear error.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

from tuner.errors import UserError

PARENT_TAG = "tuner.experiment"
TRIAL_TAG = "tuner.trial_id"
ROLE_TAG = "tuner.role"
# step_graph, static_shapes: what train.step_graph and train.static_shapes came to on the trial's
# device (1 or 0), with every epoch so trials that ASHA stops have them too
EPOCH_METRICS = ("train_loss", "val_hr_10", "val_ndcg_10", "samples_per_s", "epoch_s", "peak_mem_mb", "lr",
                 "step_graph", "static_shapes")


def _quiet_http() -> None:
    # fail fast instead of MLflow's default minutes of retries; callers handle errors themselves
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def resolve_tracking_uri(uri: str) -> str:
    """Absolute sqlite paths (directory created); http(s) servers checked for reachability."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_absolute():
            path = Path.cwd() / path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"tracking URI {uri}: cannot create {path.parent} ({exc.strerror})") from None
        return f"sqlite:///{path}"
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
                if response.status != 200:
                    raise UserError(f"MLflow server {uri} answered {response.status} on /health")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UserError(f"MLflow server {uri} is unreachable ({reason}); "
                            f"start it or pass another --tracking-uri") from None
        return uri
    if "://" not in uri:
        raise UserError(f"tracking URI {uri!r}: expected sqlite:///PATH or http(s)://HOST:PORT")
    return uri


def client(uri: str):
    _quiet_http()
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(mlflow_client, name: str) -> str:
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise UserError(f"MLflow experiment {name!r} is deleted; restore it or choose another name")
        return found.experiment_id
    return mlflow_client.create_experiment(name)


def _find_run(mlflow_client, exp_id: str, tag: str, value: str):
    runs = mlflow_client.search_runs([exp_id], filter_string=f"tags.`{tag}` = '{value}'", max_results=2)
    return runs[0] if runs else None


def parent_run(uri: str, experiment: str, tags: dict[str, str],
               search_space_text: Optional[str] = None) -> tuple[str, str]:
    """(experiment_id, parent_run_id), reusing the parent run of a resumed experiment."""
    c = client(uri)
    exp_id = experiment_id(c, experiment)
    run = _find_run(c, exp_id, PARENT_TAG, experiment)
    if run is None:
        run = c.create_run(exp_id, run_name=experiment, tags={PARENT_TAG: experiment, ROLE_TAG: "parent", **tags})
    else:
        for key, value in tags.items():
            c.set_tag(run.info.run_id, key, value)
        if run.info.status != "RUNNING":
            c.update_run(run.info.run_id, status="RUNNING")
    if search_space_text is not None:
        c.log_text(run.info.run_id, search_space_text, "search_space.yaml")
    return exp_id, run.info.run_id


class MlflowReporter:
    """A `Reporter` backend: per-epoch metrics into the trial's child run (rank 0 only).

    Logging failures (a server that went away) never stop training: they are counted, printed
    once, and the count is recorded as the `mlflow_lost_batches` metric when the server answers.
    """

    def __init__(self, uri: str, exp_id: str, parent_id: str, trial_id: str, trial_name: str,
                 params: dict[str, Any], config_text: str, tags: Optional[dict[str, str]] = None,
                 role: str = "trial"):
        from mlflow.entities import Param

        self.client = client(uri)
        self.lost = 0
        run = _find_run(self.client, exp_id, TRIAL_TAG, trial_id)
        if run is None:
            run = self.client.create_run(exp_id, run_name=trial_name, tags={
                TRIAL_TAG: trial_id, ROLE_TAG: role, "mlflow.parentRunId": parent_id})
            self.client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())])
            self.client.log_text(run.info.run_id, config_text, "config.yaml")
        elif run.info.status != "RUNNING":
            self.client.update_run(run.info.run_id, status="RUNNING")
        self.run_id = run.info.run_id
        for key, value in (tags or {}).items():  # where this attempt runs (a retry may move)
            self.client.set_tag(self.run_id, key, value)
        # a retried or resumed trial may redo an epoch logged just before the crash: log it once
        # (train_loss: every epoch has it, a refit without validation too)
        history = self.client.get_metric_history(self.run_id, "train_loss")
        self.logged_up_to = max((m.step for m in history), default=0)

    def _log(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if self.lost:
            batch.append(Metric("mlflow_lost_batches", float(self.lost), now, step))
        try:
            self.client.log_batch(self.run_id, metrics=batch)
        except Exception as exc:  # noqa: BLE001 - any tracking failure must not kill training
            self.lost += 1
            if self.lost == 1:
                print(f"tuner: warning: MLflow logging failed ({exc.__class__.__name__}); "
                      f"training continues", file=sys.stderr)

    def log(self, epoch: int, metrics: dict[str, float], checkpoint=None) -> None:
        if epoch <= self.logged_up_to:
            return
        self._log({k: metrics[k] for k in EPOCH_METRICS if k in metrics}, epoch)

    def final(self, metrics: dict[str, float]) -> None:
        keep = {k: v for k, v in metrics.items() if k.startswith(("test_", "popularity_"))
                or k in ("best_epoch", "trainable_params", "total_params", "epochs", "ranks_agree")}
        self._log(keep, int(metrics.get("epochs", 0)))
        try:
            self.client.set_terminated(self.run_id, "FINISHED")
        except Exception:  # noqa: BLE001
            self.lost += 1


def finish_trial_runs(uri: str, exp_id: str, parent_id: str, statuses: dict[str, str]) -> None:
    """Close child runs Tune stopped early (their workers were killed before `final`)."""
    c = client(uri)
    for trial_id, status in statuses.items():
        run = _find_run(c, exp_id, TRIAL_TAG, trial_id)
        if run is None:
            continue
        c.set_tag(run.info.run_id, "tuner.outcome", status)
        if run.info.status == "RUNNING":
            c.set_terminated(run.info.run_id, {"stopped_early": "KILLED", "error": "FAILED"}.get(status, "FINISHED"))


def log_best_model(uri: str, parent_id: str, checkpoint_path: str, items_path: str, metrics: dict[str, float],
                   params: dict[str, Any], registered_name: Optional[str]) -> Optional[str]:
    """Log the best trial as a recommender pyfunc on the parent run and register it; returns its URI."""
    import mlflow

    from tuner.serving import log_recommender

    _quiet_http()
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=parent_id):
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
        mlflow.log_params({f"best.{k}": str(v) for k, v in params.items()})
        info = log_recommender(checkpoint_path, items_path, registered_name)
    return info.model_uri
