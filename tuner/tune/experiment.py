"""`tuner tune`: Ray Tune drives one `TorchTrainer` per trial; Optuna proposes, ASHA prunes.

Layers (Ray 2.60's documented Train + Tune pattern; `Tuner(TorchTrainer)` no longer works):
1. `tuner.train.driver.train_fn_per_worker` runs on every Train worker;
2. `run_trial` (a Tune function trainable) builds and fits a `TorchTrainer` for one trial, with
   `tuner.tune.relay` forwarding each epoch's rank-0 report to Tune so ASHA sees every epoch;
3. `run_experiment` builds the `Tuner`: OptunaSearch (TPE, seeded) or random search, limited to
   the concurrency the cluster's resources allow, and ASHA on `val_ndcg_10` with the epoch as
   time attribute.

Names are stable (experiment name, Tune trial ids): `--resume` restores the Tuner, unfinished
trials continue their Train runs from their last checkpoints, and MLflow runs are found again
by tag, so nothing is rerun or duplicated.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from tuner.config import Config
from tuner.errors import UserError
from tuner.tune.search_space import space_hash, to_tune

# The trial function only waits on its TorchTrainer, whose workers hold the CPUs and GPUs; Ray
# refuses an empty request, so the trial asks for a token amount of memory instead of a CPU.
FINAL_KEY = "final"  # marks a trial's closing result (Tune's own `done` means something else)
TRIAL_RESOURCES = {"cpu": 0, "memory": 64 * 2**20}


@dataclass
class Plan:
    """What an experiment will run: printed by --dry-run, used by the real run."""

    experiment: str
    size: str
    num_samples: int
    max_epochs: int
    search: str
    scheduler: str
    metric: str
    workers_per_trial: int
    resources_per_worker: dict[str, float]
    resources_per_trial: dict[str, float]
    cluster_resources: dict[str, float]
    max_concurrent: int
    search_space: dict[str, Any]
    storage_path: str
    tracking_uri: str
    dataset: str
    notes: list[str] = field(default_factory=list)


def check_tunable(cfg: Config, space: dict[str, Any]) -> None:
    """Refuse settings that tuning cannot select by."""
    if cfg.train.refit or "train.refit" in space:
        raise UserError("train.refit trains on the validation targets, which tuning selects by; refit the "
                        "winner afterwards with `tuner train --refit --max-epochs <its best epoch>`")


def make_plan(cfg: Config, space: dict[str, Any], storage: str, cluster: dict[str, float],
              dataset: str) -> Plan:
    r = cfg.resources
    per_worker = {"CPU": r.cpus_per_worker}
    if r.gpus_per_worker:
        per_worker["GPU"] = r.gpus_per_worker
    per_trial = {k: v * r.workers for k, v in per_worker.items()}
    fits = []
    for resource, need in per_trial.items():
        have = cluster.get(resource, 0.0)
        if have < need:
            raise UserError(f"one trial needs {need:g} {resource} but the cluster has {have:g}; "
                            f"lower resources.workers or resources.{resource.lower()}s_per_worker")
        fits.append(math.floor(have / need + 1e-9))
    concurrent = min(fits + [cfg.tune.num_samples])
    if cfg.tune.max_concurrent:
        concurrent = min(concurrent, cfg.tune.max_concurrent)
    return Plan(experiment=cfg.tracking.experiment, size=cfg.model.size, num_samples=cfg.tune.num_samples,
                max_epochs=cfg.train.max_epochs, search=cfg.tune.search, scheduler=cfg.tune.scheduler,
                metric=cfg.tune.metric, workers_per_trial=r.workers, resources_per_worker=per_worker,
                resources_per_trial=per_trial, cluster_resources=cluster, max_concurrent=concurrent,
                search_space=space, storage_path=storage, tracking_uri=cfg.tracking.tracking_uri,
                dataset=dataset)


def local_resources() -> dict[str, float]:
    """What a local Ray instance started by `init_ray` would offer (for --dry-run without Ray)."""
    import os

    import torch

    cpus = float(max(4, os.cpu_count() or 1))
    gpus = float(torch.cuda.device_count()) if torch.cuda.is_available() else 0.0
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> Config:
    """The base config with a trial's sampled dotted keys applied, validated."""
    from tuner.config import coerce, section_keys

    merged = {section: dict(values) for section, values in base.items()}
    for key, value in params.items():
        section, name = key.split(".", 1)
        merged[section][name] = coerce(key, value, section_keys(section)[name])
    return Config.from_dict(merged)


def run_trial(params: dict[str, Any], base: dict[str, Any], storage_path: str,
              mlflow_info: Optional[dict[str, str]], deadline: Optional[float] = None,
              start_by: Optional[float] = None) -> None:
    """Tune function trainable: one TorchTrainer for one trial."""
    import yaml
    from ray import tune

    from tuner.train.driver import build_trainer, read_final
    from tuner.tune.relay import ReportRelay, fit_relaying

    context = tune.get_context()
    trial_id, trial_name = context.get_trial_id(), context.get_trial_name()
    if start_by and time.time() > start_by:
        return  # proposed in time but started (after waiting for resources) in the budget's last part
    cfg = trial_config(base, params)
    extra: dict[str, Any] = {}
    if mlflow_info:
        extra["mlflow"] = {**mlflow_info, "trial_id": trial_id, "trial_name": trial_name,
                           "params": cfg.flat(), "config_text": yaml.safe_dump(cfg.to_dict(), sort_keys=False)}
    final_dir = Path(storage_path) / f"trial-{trial_id}" / "final"
    extra["final_dir"] = str(final_dir)
    if deadline:
        extra["deadline"] = deadline
    relay = ReportRelay()
    trainer = build_trainer(cfg, name=f"trial-{trial_id}", storage_path=storage_path,
                            loop_extra=extra, callbacks=[relay])
    fit_relaying(trainer.fit, relay, tune.report)
    final = read_final(final_dir)
    if final is not None:  # test metrics of the best weights, as the trial's last result
        tune.report({**final, "epoch": final["epochs"], FINAL_KEY: 1})


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _searcher(cfg: Config, plan: Plan):
    """Optuna proposes every trial: TPE (seeded) or, for `tune.search=random`, its RandomSampler,
    so both searches share the concurrency limit and the time budget."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from tuner.tune.budget import BudgetedLimiter

    sampler = (optuna.samplers.RandomSampler(seed=cfg.tune.seed) if cfg.tune.search == "random"
               else optuna.samplers.TPESampler(seed=cfg.tune.seed, n_startup_trials=cfg.tune.startup_trials))
    searcher = OptunaSearch(metric=cfg.tune.metric, mode="max", sampler=sampler)
    budget = cfg.tune.time_budget_s * (1 - cfg.tune.final_fraction)
    return BudgetedLimiter(searcher, max_concurrent=plan.max_concurrent, budget_s=budget)


def _scheduler(cfg: Config):
    if cfg.tune.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # max_t one past the last epoch: ASHA stops any trial that reaches max_t, which would kill a
    # finished trial before it reports its test metrics
    return ASHAScheduler(time_attr="epoch", max_t=cfg.train.max_epochs + 1, grace_period=cfg.tune.grace_period,
                         reduction_factor=cfg.tune.reduction_factor)


def run_experiment(cfg: Config, space: dict[str, Any], storage: str, resume: bool,
                   quiet: bool = False) -> dict[str, Any]:
    """Run (or resume) the experiment; log and register the best model; return a summary."""
    import ray
    import yaml
    from ray import tune

    from tuner import tracking
    from tuner.data.dataset import load_dataset
    from tuner.train.driver import absolute_paths, init_ray
    from tuner.tune.cleanup import PlacementGroupReaper

    check_tunable(cfg, space)
    if "://" in storage:
        raise UserError(f"--storage {storage}: only filesystem paths are supported so far "
                        f"(use a mount every node sees, e.g. NFS or EFS)")
    storage_path = str(Path(storage).resolve())
    exp_dir = Path(storage_path) / cfg.tracking.experiment
    uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
    cfg.tracking.tracking_uri = uri
    exists = exp_dir.exists() and any(exp_dir.glob("experiment_state*.json"))
    if exists and not resume:
        raise UserError(f"experiment {cfg.tracking.experiment!r} already exists in {storage_path}; "
                        f"pass --resume to continue it or choose another --experiment")
    if resume and not exists:
        raise UserError(f"nothing to resume: no experiment {cfg.tracking.experiment!r} in {storage_path}")
    absolute_paths(cfg)
    dataset = load_dataset(cfg.data)  # fail on bad data before anything starts
    lock = _ExperimentLock(exp_dir)
    started = init_ray()
    try:
        plan = make_plan(cfg, space, storage_path, {k: float(v) for k, v in ray.cluster_resources().items()
                                                    if k in ("CPU", "GPU")}, dataset.name)
        exp_id, parent_id = tracking.parent_run(uri, cfg.tracking.experiment, {
            "size": cfg.model.size, "dataset": dataset.name, "search_space_hash": space_hash(space),
            "git_commit": git_commit(), "search": cfg.tune.search, "scheduler": cfg.tune.scheduler},
            search_space_text=yaml.safe_dump(space, sort_keys=False))
        mlflow_info = {"uri": uri, "exp_id": exp_id, "parent_id": parent_id}
        budget = cfg.tune.time_budget_s
        deadline = time.time() + budget if budget else None
        start_by = time.time() + budget * (1 - cfg.tune.final_fraction) if budget else None
        base = cfg.to_dict()
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base=base, storage_path=str(exp_dir / "train"),
                                 mlflow_info=mlflow_info, deadline=deadline, start_by=start_by),
            TRIAL_RESOURCES)
        if resume:
            tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable, param_space=to_tune(space),
                tune_config=tune.TuneConfig(metric=cfg.tune.metric, mode="max", num_samples=cfg.tune.num_samples,
                                            search_alg=_searcher(cfg, plan), scheduler=_scheduler(cfg)),
                run_config=tune.RunConfig(name=cfg.tracking.experiment, storage_path=storage_path,
                                          failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures),
                                          callbacks=[PlacementGroupReaper()], verbose=0 if quiet else 1))
        # a trial that starts after `start_by` (or is stopped before its first epoch) returns
        # without a result; Tune's strict metric check would turn that into a TuneError that ends
        # the whole experiment, losing its finished trials. ASHA ignores such results and Optuna
        # records the trial as pruned; _summarize counts it as not started.
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        results = tuner.fit()
        summary = _summarize(results, cfg, plan, uri, exp_id, parent_id, dataset)
    finally:
        lock.release()
        if started:
            ray.shutdown()
    return summary


class _ExperimentLock:
    """One `tuner tune` per experiment at a time: a second one refuses instead of interleaving."""

    def __init__(self, exp_dir: Path):
        import fcntl

        exp_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(exp_dir / ".tuner.lock", "w")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.close()
            raise UserError(f"experiment {exp_dir.name!r} is being run by another `tuner tune`; "
                            f"wait for it or choose another --experiment") from None

    def release(self) -> None:
        self.file.close()


def _summarize(results, cfg: Config, plan: Plan, uri: str, exp_id: str, parent_id: str, dataset) -> dict[str, Any]:
    from tuner import tracking

    trials, statuses = [], {}
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        done = bool(metrics.get(FINAL_KEY))
        reported = cfg.tune.metric in metrics or done
        status = ("error" if result.error else "completed" if done else "stopped_early" if reported
                  else "not_started")
        statuses[trial_id] = status
        trials.append({"trial_id": metrics.get("trial_id"), "status": status,
                       "epochs": metrics.get("epoch"), "val_ndcg_10": metrics.get("val_ndcg_10"),
                       "params": dict(result.config or {}),
                       "result": result})
    tracking.finish_trial_runs(uri, exp_id, parent_id, statuses)
    candidates = [t for t in trials if t["status"] == "completed" and t["val_ndcg_10"] is not None] or \
                 [t for t in trials if t["val_ndcg_10"] is not None]
    if not candidates:
        raise UserError("no trial reported a validation metric; see the errors above")
    best = max(candidates, key=lambda t: t["val_ndcg_10"])
    best_metrics = {k: v for k, v in best["result"].metrics.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)}
    train_root = Path(plan.storage_path) / cfg.tracking.experiment / "train"
    checkpoint = _last_checkpoint(best["result"], train_root, best["trial_id"])
    if checkpoint is None:
        raise UserError(f"best trial {best['trial_id']} left no checkpoint; nothing to register")
    logged = {k: v for k, v in best_metrics.items() if k.startswith(("test_", "val_", "popularity_"))}
    refit = None
    if cfg.tune.refit:
        epochs = int(best_metrics.get("best_epoch") or best["epochs"] or cfg.train.max_epochs)
        try:
            refit_checkpoint, refit = _refit(cfg, best["params"], epochs, train_root,
                                             {"uri": uri, "exp_id": exp_id, "parent_id": parent_id})
        except Exception as exc:  # the search's results stand: register the trial's weights instead
            from tuner.train.driver import user_error_in

            line = (str(user_error_in(exc)).strip().splitlines() or [exc.__class__.__name__])[0][:300]
            print(f"tuner: warning: the refit failed ({line}); registering the best trial's weights",
                  file=sys.stderr)
            refit = {"error": line}
        else:
            trial_loss = _train_loss_at(best["result"], epochs)
            if refit_diverged(refit.get("train_loss"), trial_loss):
                trial = "(not recorded)" if trial_loss is None else f"{trial_loss:.3f}"
                refit["rejected"] = (f"training loss {refit['train_loss']:.3f} at epoch {epochs} against the best "
                                     f"trial's {trial}: diverged")
                print(f"tuner: warning: the refit {refit['rejected']}; registering the best trial's weights",
                      file=sys.stderr)
            else:
                checkpoint = refit_checkpoint
                logged |= {f"refit_{k}": v for k, v in refit.items() if k.startswith("test_")}
    import tempfile

    from tuner.serving import write_item_map

    registered = f"bert4rec-{cfg.model.size}" if cfg.tracking.register_model else None
    with tempfile.TemporaryDirectory() as tmp:
        items = write_item_map(dataset, Path(tmp) / "items.parquet")
        model_uri = tracking.log_best_model(uri, parent_id, checkpoint, str(items), logged, best["params"],
                                            registered)
    tracking.client(uri).set_terminated(parent_id, "FINISHED")
    counts = {s: sum(1 for t in trials if t["status"] == s)
              for s in ("completed", "stopped_early", "error", "not_started")}
    return {
        "experiment": cfg.tracking.experiment, "num_trials": len(trials),
        **{f"trials_{k}": v for k, v in counts.items()},
        "best_trial_id": best["trial_id"], "best_config": best["params"],
        "best_val_ndcg_10": best["val_ndcg_10"],
        **{k: best_metrics[k] for k in ("test_hr_10", "test_ndcg_10", "popularity_hr_10") if k in best_metrics},
        **({"refit": {k: refit[k] for k in ("test_hr_10", "test_ndcg_10", "epochs", "wall_s", "train_loss", "error",
                                            "rejected") if k in refit}}
           if refit else {}),
        "model_uri": model_uri, "registered_model": f"bert4rec-{cfg.model.size}" if model_uri and
        cfg.tracking.register_model else None,
        "tracking_uri": uri, "mlflow_ui": f"mlflow ui --backend-store-uri {uri}",
        "storage_path": str(Path(plan.storage_path) / cfg.tracking.experiment),
        "trials": [{k: v for k, v in t.items() if k != "result"} for t in trials],
    }


REFIT_RUN = "refit"  # the Train run (and MLflow child run) that refits the winner


def _refit(cfg: Config, params: dict[str, Any], epochs: int, train_root: Path,
           mlflow_info: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """Retrain the winning configuration on the validation targets too for `epochs` epochs
    (`train.refit`) through Ray Train, as its own MLflow child run; (checkpoint, final metrics)."""
    import yaml

    from tuner.train.driver import build_trainer, read_final

    refit_cfg = trial_config(cfg.to_dict(), {**params, "train.refit": True, "train.max_epochs": epochs,
                                             "train.time_budget_s": 0.0})
    final_dir = train_root / REFIT_RUN / "final"
    extra = {"final_dir": str(final_dir), "mlflow": {
        **mlflow_info, "trial_id": REFIT_RUN, "trial_name": REFIT_RUN, "role": REFIT_RUN, "params": refit_cfg.flat(),
        "config_text": yaml.safe_dump(refit_cfg.to_dict(), sort_keys=False)}}
    last = build_trainer(refit_cfg, name=REFIT_RUN, storage_path=str(train_root), loop_extra=extra).fit().metrics
    final = read_final(final_dir)
    checkpoint = _newest_checkpoint(train_root / REFIT_RUN)
    if final is None or checkpoint is None:
        raise UserError(f"the refit of the best configuration left no result in {train_root / REFIT_RUN}")
    from tuner import tracking

    tracking.finish_trial_runs(mlflow_info["uri"], mlflow_info["exp_id"], mlflow_info["parent_id"],
                               {REFIT_RUN: "completed"})
    if last and "train_loss" in last:
        final = {**final, "train_loss": float(last["train_loss"])}
    return checkpoint, final


def refit_diverged(refit_loss: Optional[float], trial_loss: Optional[float], tolerance: float = 1.2) -> bool:
    """True when the refit's last training loss is not finite or worse than `tolerance` x the best
    trial's at the same epoch. The refit has no validation set, so its training loss is the only
    sign left that it went wrong (on ML-1M, lr 5.7e-3 diverged in the refit at epoch ~20 while
    the trial with the same configuration trained fine); the test set must not decide."""
    if refit_loss is None or trial_loss is None:
        return refit_loss is not None and not math.isfinite(refit_loss)
    return not math.isfinite(refit_loss) or refit_loss > tolerance * trial_loss


def _train_loss_at(result, epoch: int) -> Optional[float]:
    """The trial's reported training loss at `epoch` (else its last one), from Tune's history."""
    frame = result.metrics_dataframe
    if frame is None or "train_loss" not in frame:
        return None
    rows = frame.dropna(subset=["train_loss"])
    if "epoch" in rows:
        at = rows[rows["epoch"] == epoch]
        rows = at if len(at) else rows
    return float(rows["train_loss"].iloc[-1]) if len(rows) else None


def _newest_checkpoint(run_dir: Path) -> Optional[str]:
    """A Ray Train run directory's newest complete checkpoint (names sort by time), if any."""
    found = sorted(p for p in run_dir.glob("checkpoint_*") if (p / "state.pt").is_file())
    return str(found[-1]) if found else None


def _last_checkpoint(result, train_root: Path, trial_id: Optional[str]) -> Optional[str]:
    """The trial's newest Train checkpoint: from its Train run directory (names sort by time),
    else from the `checkpoint_path` that the relay adds to results."""
    found = _newest_checkpoint(train_root / f"trial-{trial_id}") if trial_id else None
    if found:
        return found
    from tuner.tune.relay import CHECKPOINT_PATH_KEY

    frame = result.metrics_dataframe
    if frame is None or CHECKPOINT_PATH_KEY not in frame:
        return None
    paths = frame[CHECKPOINT_PATH_KEY].dropna()
    return str(paths.iloc[-1]) if len(paths) else None


def describe(plan: Plan) -> str:
    """Human-readable --dry-run output."""
    out = io.StringIO()
    print(f"experiment {plan.experiment}: {plan.num_samples} trials of size {plan.size} on {plan.dataset}, "
          f"up to {plan.max_epochs} epochs each", file=out)
    print(f"search {plan.search}, scheduler {plan.scheduler}, metric {plan.metric}", file=out)
    print(f"per trial: {plan.workers_per_trial} worker(s) x {plan.resources_per_worker} "
          f"= {plan.resources_per_trial}", file=out)
    print(f"cluster: {plan.cluster_resources} -> up to {plan.max_concurrent} trial(s) at once", file=out)
    for key, spec in plan.search_space.items():
        print(f"  {key}: {spec}", file=out)
    print(f"storage {plan.storage_path}, tracking {plan.tracking_uri}", file=out)
    return out.getvalue()


def plan_dict(plan: Plan) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(plan)))
