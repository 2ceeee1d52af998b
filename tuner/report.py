"""`tuner report`: an experiment's trials from MLflow, ranked, with Optuna's pictures.

Reads the parent run and its child runs back from the tracking store (so it works for any past
experiment, on any machine that reaches the store), prints the trials sorted by their best
validation NDCG@10, and draws the optimization history and the parameter importances (fANOVA
via Optuna) into PNG files that are also logged on the parent run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from tuner.errors import UserError

SPACE_ARTIFACT = "search_space.yaml"


def collect(uri: str, experiment: str) -> dict[str, Any]:
    from tuner import tracking

    client = tracking.client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise UserError(f"no MLflow experiment {experiment!r} at {uri}")
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    parents = [r for r in runs if r.data.tags.get(tracking.ROLE_TAG) == "parent"]
    if not parents:
        raise UserError(f"MLflow experiment {experiment!r} has no `tuner tune` parent run")
    parent = parents[0]
    trials = []
    for run in runs:
        if run.data.tags.get("mlflow.parentRunId") != parent.info.run_id:
            continue
        history = client.get_metric_history(run.info.run_id, "val_ndcg_10")
        if not history:
            continue
        trials.append({
            "run_id": run.info.run_id, "name": run.info.run_name, "status": run.info.status,
            "outcome": run.data.tags.get("tuner.outcome", "completed" if run.info.status == "FINISHED" else
                                         run.info.status.lower()),
            "start_time": run.info.start_time, "epochs": max(m.step for m in history),
            "best_val_ndcg_10": max(m.value for m in history),
            "test_ndcg_10": run.data.metrics.get("test_ndcg_10"),
            "params": dict(run.data.params),
        })
    trials.sort(key=lambda t: t["best_val_ndcg_10"], reverse=True)
    space = _read_space(client, parent.info.run_id)
    return {"parent_run_id": parent.info.run_id, "trials": trials, "space": space}


def _read_space(client, run_id: str) -> dict[str, Any]:
    import tempfile

    import yaml

    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run_id, SPACE_ARTIFACT, tmp)
            return yaml.safe_load(Path(path).read_text()) or {}
    except Exception:  # noqa: BLE001 - an experiment from before the artifact existed
        return {}


def study_from_trials(trials: list[dict[str, Any]], space: dict[str, Any]):
    """An in-memory Optuna study replaying the trials in start order (for the pictures)."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    distributions = {}
    for key, spec in space.items():
        (dist, args), = spec.items()
        if dist == "choice":
            distributions[key] = CategoricalDistribution(args)
        elif dist == "randint":
            distributions[key] = IntDistribution(args[0], args[1] - 1)
        else:
            distributions[key] = FloatDistribution(args[0], args[1], log="log" in dist)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for trial in sorted(trials, key=lambda t: t["start_time"]):
        params = {}
        for key, dist in distributions.items():
            raw = trial["params"].get(key)
            if raw is None:
                break
            params[key] = raw if isinstance(dist, CategoricalDistribution) else type(dist.low)(float(raw))
        else:
            study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions,
                                                      value=trial["best_val_ndcg_10"]))
    return study


def draw(study, output_dir: Path) -> list[Path]:
    """Optimization history and parameter importances as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    ax = ovm.plot_optimization_history(study, target_name="val_ndcg_10")
    path = output_dir / "optimization_history.png"
    ax.figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(ax.figure)
    paths.append(path)
    if len(study.trials) >= 2 and len(study.trials[0].params) >= 2:
        ax = ovm.plot_param_importances(study, target_name="val_ndcg_10")
        path = output_dir / "param_importances.png"
        ax.figure.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(ax.figure)
        paths.append(path)
    return paths


def report(uri: str, experiment: str, output_dir: Optional[str] = None) -> dict[str, Any]:
    from tuner import tracking

    data = collect(uri, experiment)
    if not data["trials"]:
        raise UserError(f"MLflow experiment {experiment!r} has no trial with validation metrics yet")
    pictures: list[str] = []
    if data["space"]:
        study = study_from_trials(data["trials"], data["space"])
        out = Path(output_dir or f"reports/{experiment}")
        paths = draw(study, out)
        client = tracking.client(uri)
        for path in paths:
            client.log_artifact(data["parent_run_id"], str(path), "report")
        pictures = [str(p) for p in paths]
    return {"experiment": experiment, "parent_run_id": data["parent_run_id"], "pictures": pictures,
            "trials": [{k: v for k, v in t.items() if k != "start_time"} for t in data["trials"]]}


def format_table(result: dict[str, Any], keys: list[str]) -> str:
    lines = [f"{'trial':<24} {'outcome':<14} {'epochs':>6} {'best val_ndcg_10':>17} {'test_ndcg_10':>13}  "
             + "  ".join(keys)]
    for t in result["trials"]:
        test = f"{t['test_ndcg_10']:.4f}" if t["test_ndcg_10"] is not None else "-"
        params = "  ".join(f"{float(t['params'][k]):.4g}" if _is_number(t["params"].get(k)) else
                           str(t["params"].get(k)) for k in keys)
        lines.append(f"{t['name'][:24]:<24} {t['outcome']:<14} {t['epochs']:>6} {t['best_val_ndcg_10']:>17.4f} "
                     f"{test:>13}  {params}")
    return "\n".join(lines)


def _is_number(value: Any) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False
