"""Ray Train: the per-worker entry point and the driver that builds one `TorchTrainer`.

Ray's three layers live in three places: the per-worker function (`train_fn_per_worker`, which
calls `tuner.train.loop.train_worker`), the driver for one run or trial (`build_trainer`), and
the Tuner (`tuner.tune.experiment`). `ray_context` is the only place that knows about
`torch.distributed`: ranks, DDP wrapping and all-reduce; `RayReporter` hands checkpoints to Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from tuner.config import Config
from tuner.errors import UserError
from tuner.train.checkpoint import Snapshot
from tuner.train.parallel import WorkerContext, pick_device


def ray_context(cfg: Config) -> WorkerContext:
    import ray.train
    import torch.distributed as dist

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = pick_device(cfg.train)
    if device.type == "cuda":
        import ray.train.torch

        device = ray.train.torch.get_device()  # the CPU when Ray gave this worker no GPU (train.device=auto)
        if device.type == "cuda":
            torch.cuda.set_device(device)
    checkpoint = ray.train.get_checkpoint()
    resume_dir = checkpoint_dir(checkpoint) if checkpoint is not None else None
    fallbacks = older_checkpoints(checkpoint) if checkpoint is not None else ()

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        if world_size == 1:
            return module
        # the objective's buffers are the same on every rank by construction: the dropout rates
        # (config) and the items' log-frequencies (counted over the whole training split). DDP's
        # default broadcast sent the latter (0.6 MB at 160k items) from rank 0 before every forward
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                       broadcast_buffers=False)

    return WorkerContext(device=device, rank=rank, world_size=world_size, resume_dir=resume_dir,
                         resume_fallbacks=fallbacks,
                         all_reduce_fn=lambda t: dist.all_reduce(t) if world_size > 1 else None,
                         wrap_fn=wrap, reports_checkpoints=True)


def checkpoint_dir(checkpoint) -> str:
    """The directory to resume from: the checkpoint itself when this node sees it as a local path
    (local storage or a shared mount; it is only read), else a temporary copy that goes when the
    worker exits. (`Checkpoint.to_directory()` copies it into the temporary directory every time,
    and nothing removed the copy: every resume left the run's whole state behind, weights and
    optimizer moments, gigabytes at 430M.)"""
    import atexit

    from pyarrow.fs import LocalFileSystem

    if isinstance(checkpoint.filesystem, LocalFileSystem) and Path(checkpoint.path).is_dir():
        return checkpoint.path
    copy = tempfile.mkdtemp(prefix="resume-")
    atexit.register(shutil.rmtree, copy, True)
    return checkpoint.to_directory(copy)


def older_checkpoints(checkpoint) -> tuple[str, ...]:
    """The run's earlier Train checkpoints, newest first (Train keeps two), to resume from when
    the latest is corrupted or cut short; names sort by time. Local filesystems and mounts only."""
    latest = Path(checkpoint.path)
    return tuple(str(p) for p in sorted((p for p in latest.parent.glob("checkpoint_*")
                                         if p.is_dir() and p.name < latest.name), reverse=True))


class RayReporter:
    """Forwards each epoch to `ray.train.report` (every rank calls it; rank 0 adds the checkpoint).

    The checkpoint is a `Snapshot` (a CPU copy of the state): Ray's upload thread writes it while
    the next epoch trains, straight into the run's storage directory when this node sees it as a
    local path, else into a local directory that Ray copies to storage. Ray registers it only once
    complete (a crash meanwhile keeps the older one). A write that fails (a full disk) ends the
    run with the write's own error.
    """

    def __init__(self, final_dir: Optional[str], rank: int):
        self.final_dir, self.rank = final_dir, rank

    def log(self, epoch: int, metrics: dict[str, float], checkpoint: Optional[Snapshot] = None) -> None:
        from ray.train import Checkpoint, CheckpointUploadMode, get_context, report

        if checkpoint is None:
            report(dict(metrics))
            return

        def write_and_upload(local: Checkpoint, name: str) -> Checkpoint:
            from pyarrow.fs import LocalFileSystem

            storage = get_context().get_storage()
            target = Path(storage.build_checkpoint_path_from_name(name))
            if isinstance(storage.storage_filesystem, LocalFileSystem) and target.parent.is_dir():
                checkpoint.write(target)  # storage is a path this node sees: one write, no copy
                return Checkpoint(str(target), filesystem=storage.storage_filesystem)
            checkpoint.write(local.path)  # cloud storage, or a path only the head node has: Ray copies
            return storage.persist_current_checkpoint(local, name)  # (or explains that path)

        local = Checkpoint.from_directory(tempfile.mkdtemp(prefix=f"ckpt-e{epoch}-"))
        report(dict(metrics), checkpoint=local, checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
               checkpoint_upload_fn=write_and_upload)

    def final(self, metrics: dict[str, float]) -> None:
        # Train V2 drops the last report if it carries no checkpoint and the run ends right after
        # it, so final (test) metrics travel as files: every rank writes its own (they must agree)
        # and the driver or trial function reads rank 0's.
        if self.final_dir:
            path = Path(self.final_dir) / f"final_rank{self.rank}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(metrics, sort_keys=True))
            os.replace(tmp, path)


def read_final(final_dir: str | Path) -> Optional[dict[str, float]]:
    path = Path(final_dir) / "final_rank0.json"
    return json.loads(path.read_text()) if path.is_file() else None


def train_fn_per_worker(loop_config: dict[str, Any]) -> None:
    """What every Ray Train worker runs."""
    from tuner.train.loop import train_worker
    from tuner.train.reporting import ConsoleReporter, MultiReporter

    cfg = Config.from_dict(loop_config["config"])
    ctx = ray_context(cfg)
    reporters: list = []
    if ctx.is_main and loop_config.get("console"):
        reporters.append(ConsoleReporter())
    mlflow_args = loop_config.get("mlflow")
    if ctx.is_main and mlflow_args:
        from tuner.tracking import MlflowReporter
        from tuner.train.loop import resolve_precision

        dtype = resolve_precision(cfg.train.amp, ctx.device)
        tags = {"tuner.accelerator_type": node_accelerator_type() or "none",
                "tuner.precision": str(dtype).replace("torch.", "") if dtype else "fp32",
                "tuner.worker_niceness": str(os.nice(0))}
        reporters.append(MlflowReporter(**mlflow_args, tags=tags))
    # Ray last: once an epoch's checkpoint is reported the epoch never reruns, so MLflow must
    # already have it; an epoch rerun after a crash before the report is logged to MLflow once
    reporters.append(RayReporter(loop_config.get("final_dir"), ctx.rank))
    train_worker(cfg, ctx, MultiReporter(*reporters), deadline=loop_config.get("deadline"))


def node_accelerator_type() -> Optional[str]:
    """The GPU type of the node this process runs on, from Ray's `accelerator_type:<T>` resource."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id:
            kinds = sorted(k.split(":", 1)[1] for k in node.get("Resources", {}) if k.startswith("accelerator_type:"))
            return ",".join(kinds) or None
    return None


def scaling_config(cfg: Config):
    from ray.train import ScalingConfig

    gpus = cfg.resources.gpus_per_worker
    if gpus == 0 and cfg.train.device == "cuda":
        gpus = 1.0
    resources = {"CPU": cfg.resources.cpus_per_worker}
    if gpus:
        resources["GPU"] = gpus
    return ScalingConfig(num_workers=cfg.resources.workers, use_gpu=gpus > 0, resources_per_worker=resources,
                         accelerator_type=cfg.resources.accelerator_type)


# Ray Train's controller takes one report per worker per poll (the worker's queue holds one), every
# 2 s by default: a loop that reports faster, as short epochs do, waits up to 2 s in every
# `ray.train.report` (ML-1M epochs of 0.5 s took 2.0 s). Train passes this variable on from the
# process that calls `fit()` to its controller; a value the user set is kept.
POLL_ENV, POLL_INTERVAL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1"

# Ray starts its workers at nice 15 (the raylet's `worker_niceness`), below the node's own processes.
# A step that is not one CUDA graph waits on its host thread, and on an H200 at 130M the nice-15
# worker paid for it: a Ray Train epoch cycle took 2.24 s at nice 15 against 1.91 and 2.00 s at nice 0,
# and the bare loop 1.77 s at nice 15 against 1.44 s at 0, one run
# (benchmarks/results/ray_overhead_h200/niceness.json). The raylet reads this variable from a
# worker's runtime env, so Train workers get it on any cluster, however its nodes were started;
# a value set in the environment of the process that calls `fit()` is kept.
NICENESS_ENV, WORKER_NICENESS = "RAY_worker_niceness", "0"


def build_trainer(cfg: Config, name: str, storage_path: str, loop_extra: Optional[dict] = None,
                  callbacks: Optional[list] = None):
    """One `TorchTrainer` for one run or trial. Same (storage_path, name) -> Train resumes itself."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.v2.api.config import LoggingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    os.environ.setdefault(POLL_ENV, POLL_INTERVAL_S)
    loop_config = {"config": cfg.to_dict(), **(loop_extra or {})}
    # train.device=cpu on GPU resources (a simulated cluster, or GPUs held but unused): gloo, not NCCL
    torch_config = TorchConfig(backend="gloo") if cfg.train.device == "cpu" else None
    worker_env = {NICENESS_ENV: os.environ.get(NICENESS_ENV, WORKER_NICENESS)}
    run_config = RunConfig(name=name, storage_path=storage_path,
                           failure_config=FailureConfig(max_failures=cfg.tune.max_failures),
                           checkpoint_config=CheckpointConfig(num_to_keep=2),
                           callbacks=callbacks, logging_config=LoggingConfig(log_level="WARNING"),
                           worker_runtime_env={"env_vars": worker_env})
    return TorchTrainer(train_fn_per_worker, train_loop_config=loop_config, torch_config=torch_config,
                        scaling_config=scaling_config(cfg), run_config=run_config)


def absolute_paths(cfg: Config) -> None:
    """Make local relative paths absolute: Ray workers run in their own working directories."""
    for section, key in (("data", "path"), ("train", "init_from"), ("train", "checkpoint_dir"),
                         ("train", "profile_out")):
        value = getattr(getattr(cfg, section), key)
        if value and "://" not in value and ":/" not in value and not Path(value).is_absolute():
            setattr(getattr(cfg, section), key, str(Path(value).resolve()))


def init_ray(num_cpus: Optional[int] = None) -> bool:
    """Connect to RAY_ADDRESS if set, else start a local instance. Returns True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return False
    _forget_dead_cluster()
    # on small machines give Ray more logical CPUs than cores, or trials wait forever for workers
    cpus = num_cpus or max(4, os.cpu_count() or 1)
    # the dashboard serves the State API that Train V2 uses to clean up placement groups;
    # it listens on 127.0.0.1 only
    # address="local": a new instance even if `ray start` left a cluster behind on this machine
    # (use RAY_ADDRESS=auto to run on that one)
    try:
        ray.init(address="local", num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 log_to_driver=True)
    except Exception as exc:  # a minimal Ray install (no dashboard packages): run without it
        if "dashboard" not in str(exc):
            raise
        import sys

        ray.shutdown()
        print("tuner: warning: Ray's dashboard packages are missing; running without the dashboard "
              "(Ray Train may log that it cannot query its controller state)", file=sys.stderr)
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=True)
    return True


def _forget_dead_cluster(path: str = "/tmp/ray/ray_current_cluster") -> None:
    """Remove Ray's pointer to a `ray start` cluster that no longer runs.

    Ray Train's placement-group cleaner finds the State API through that file; when it points to
    a dead cluster the cleaner fails, finished trials keep their placement groups, and later
    trials starve waiting for workers. `ray stop` removes the file; a killed cluster leaves it.
    """
    import socket
    import sys

    try:
        address = Path(path).read_text().strip()
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=1):
            return  # alive: leave it
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        pass
    try:
        Path(path).unlink()
        print(f"tuner: removed {path}, which pointed to a Ray cluster that is not running", file=sys.stderr)
    except OSError:
        pass


def fit(cfg: Config, quiet: bool = False, storage: Optional[str] = None,
        name: Optional[str] = None) -> dict[str, float]:
    """`tuner train --workers N`: one TorchTrainer run; returns rank 0's final metrics.

    A run is `storage/name`; starting one that exists continues it from its last checkpoint.
    """
    import ray

    storage_path = str(Path(storage or "ray_results").resolve())
    absolute_paths(cfg)
    name = name or f"train-{cfg.model.size}"
    final_dir = Path(storage_path) / name / "final"
    shutil.rmtree(final_dir, ignore_errors=True)
    started = init_ray(max(4, cfg.resources.workers * int(cfg.resources.cpus_per_worker) + 1))
    if cfg.resources.gpus_per_worker == 0 and cfg.train.device == "auto" and ray.cluster_resources().get("GPU"):
        cfg.resources.gpus_per_worker = 1.0  # auto means the GPU where the cluster has one, as without Ray
    try:
        trainer = build_trainer(cfg, name, storage_path, {"final_dir": str(final_dir), "console": not quiet})
        try:
            trainer.fit()
        except Exception as exc:  # Ray wraps worker errors; surface ours as one line
            from tuner.train.loop import INCOMPATIBLE

            error = user_error_in(exc)
            if isinstance(error, UserError) and INCOMPATIBLE in str(error):
                error = UserError(f"Ray Train run {Path(storage_path) / name} holds a checkpoint of "
                                  f"{INCOMPATIBLE}; pass --run-name NEW or remove that directory")
            raise error from None
        final = read_final(final_dir)
        if final is None:
            raise UserError(f"training run {name} ended without final metrics (see the Ray logs)")
        return final
    finally:
        if started:
            ray.shutdown()


def user_error_in(exc: BaseException) -> BaseException:
    """Find a UserError raised inside a worker in Ray's wrapped exception chain."""
    seen = exc
    while seen is not None:
        if isinstance(seen, UserError):
            return seen
        text = str(seen)
        if "UserError:" in text:
            line = next((ln for ln in text.splitlines() if "UserError:" in ln), "")
            return UserError(line.split("UserError:", 1)[1].strip())
        seen = seen.__cause__ or seen.__context__
    return exc
