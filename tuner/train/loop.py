"""The per-worker training function: plain PyTorch, metrics out through a `Reporter`.

`train_worker(cfg, ctx, reporter)` is what Ray Train runs on every worker (issue 3) and what
`tuner train` runs on its own. Distribution comes only through the `WorkerContext`; metrics only
through the reporter. One epoch: masked batches -> AMP step (unscale before clipping) ->
all-reduced validation -> early-stopping decision shared by all ranks -> atomic checkpoint on
rank 0 -> `reporter.log`. At the end the best weights are evaluated on the test split next to
the popularity baseline. With `train.refit` the validation targets are training data: no
validation, no early stopping, and the final weights are tested.
"""

from __future__ import annotations

import contextlib
import copy
import resource
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from tuner.config import Config, TrainConfig
from tuner.data.collate import num_train_batches, train_batches
from tuner.data.dataset import Dataset, EvalSplit, load_dataset
from tuner.errors import UserError
from tuner.losses import MaskedItemObjective, loss_config
from tuner.metrics import evaluate, finalize, metric_sums, popularity_counts, popularity_ranks
from tuner.model.bert4rec import count_parameters, last_rows
from tuner.model.build import build_model
from tuner.train.checkpoint import (BackgroundWriter, Snapshot, Snapshots, has_checkpoint, load_resume_state,
                                    save_checkpoint)
from tuner.train.master_adamw import MasterWeightAdamW
from tuner.train.optim import build_ema, build_scheduler, shorten_schedule, training_optimizer
from tuner.train.parallel import WorkerContext, weights_digest
from tuner.train.profiling import check_writable, profiled
from tuner.train.reporting import Reporter
from tuner.train.step import TrainStep, compile_options
from tuner.train.step_graph import resolve_step


def resolve_precision(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for fp32 (fp16 also runs on the CPU, slowly: for simulations)."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def _peak_mem_mb(device: torch.device, rss_base_kb: int) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_base_kb) / 1024


@dataclass
class _Progress:
    """Early-stopping and position state, saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    best_metric: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0


def train_worker(cfg: Config, ctx: WorkerContext, reporter: Reporter,
                 dataset: Optional[Dataset] = None, deadline: Optional[float] = None) -> dict[str, float]:
    """Train, validate each epoch, test the best weights; return the final metrics.

    `deadline` (Unix time) and `train.time_budget_s` end training before an epoch that would
    finish past them (judged by the last epoch's duration); the best weights are still tested.
    """
    t_start = time.perf_counter()
    if cfg.train.time_budget_s:
        own = time.time() + cfg.train.time_budget_s
        deadline = min(deadline, own) if deadline else own
    torch.manual_seed(cfg.train.seed)
    device = ctx.device
    dataset = dataset if dataset is not None else load_dataset(cfg.data)
    refit = cfg.train.refit
    train, val, test = dataset.split(include_val=refit)
    if len(val.targets) == 0:
        raise UserError(f"dataset {dataset.name}: no user has the 3 interactions a leave-one-out split needs")
    dtype = resolve_precision(cfg.train.amp, device)
    use_compile = cfg.train.compile == "on" or (cfg.train.compile == "auto" and device.type == "cuda")
    batch_size = rank_batch_size(cfg.train, ctx.world_size)
    steps_per_epoch = num_train_batches(train, batch_size, ctx.world_size)
    if steps_per_epoch == 0:
        raise UserError(f"{int((train.lengths >= 1).sum())} training users cannot be shared by {ctx.world_size} "
                        f"workers (resources.workers)")
    # the step graph and static shapes decided here: the model's kernels and the batches follow them
    cfg = resolve_step(cfg, device, ctx.world_size, use_compile, steps_per_epoch)
    model = build_model(cfg, dataset.num_items, pretrained=not has_checkpoint(ctx.resume_dir)).to(device)
    loss_cfg = loss_config(cfg.train)
    popularity = popularity_counts(train, dataset.num_items)  # popularity negatives, sampled metrics, baseline
    item_counts = torch.from_numpy(popularity[1:dataset.num_items + 1])
    objective = MaskedItemObjective(model, loss_cfg, item_counts).to(device)
    optimizer = training_optimizer(model, cfg, dtype, device, use_compile)
    total_steps = steps_per_epoch * cfg.train.max_epochs
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    options = compile_options(cfg.train, device, ctx.world_size, total_steps) if use_compile else None
    params = [p for p in model.parameters() if p.requires_grad]  # iLoRA: the adapters only
    step = TrainStep(objective, params, optimizer, scheduler, dtype, cfg.optim.grad_clip, device,
                     cfg.train.compile_mode if use_compile else None, wrap=ctx.wrap,
                     fused_clip=cfg.optim.fused_clip, compile_options=options,
                     step_graph=cfg.train.step_graph == "on")
    scaler = step.scaler
    ema = build_ema(model, cfg.optim.ema_decay)
    net = ema.module if ema is not None else model  # the weights that are validated, tested, served
    progress, best_state = _Progress(), None

    if has_checkpoint(ctx.resume_dir):
        state = load_resume_state(ctx.resume_dir, ctx.resume_fallbacks)
        _check_compatible(state, cfg, dataset.num_items, ctx.resume_dir)
        _check_weights(state, isinstance(optimizer, MasterWeightAdamW), ctx.resume_dir)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        progress = _Progress(**state["progress"])
        best_state = resumed_best(state, model, refit)
        if ema is not None and state.get("ema") is not None:  # else the average starts here
            ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)

    autocast = step.autocast
    # what train.step_graph and train.static_shapes came to on this run's device: every epoch's
    # metrics and the final ones say so
    shapes = {"step_graph": float(cfg.train.step_graph == "on"), "static_shapes": float(cfg.train.fixed_shapes)}
    val_rows = _val_rows(val, cfg.eval.max_val_users, cfg.train.seed)
    rss_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def run_eval(split: EvalSplit, rows: np.ndarray, prefix: str, sampled: bool) -> dict[str, float]:
        net.eval()
        mine = rows[ctx.rank::ctx.world_size]  # each rank ranks its share; sums are all-reduced

        def encode(ids: torch.Tensor) -> torch.Tensor:
            with autocast():
                return net(ids, rows=last_rows(ids))

        weight, bias = net.output_embedding()
        sums = evaluate(encode, weight.detach(), bias.detach(), split, dataset.num_items, cfg.model.max_len,
                        device, cfg.eval.batch_size, cfg.eval.catalog_chunk, popularity,
                        cfg.eval.num_negatives, cfg.eval.exclude_history, mine,
                        seed=cfg.train.seed + ctx.rank, sampled=sampled)
        return finalize(ctx.sum(sums), prefix)

    if cfg.train.profile_epoch and ctx.is_main:
        check_writable(cfg.train.profile_out)
    snapshots = Snapshots(pin_memory=device.type == "cuda")
    # one process: checkpoints written on a thread while the next epoch trains (None: in line)
    background = cfg.train.checkpoint_writer == "background" or (cfg.train.checkpoint_writer == "auto"
                                                                  and device.type == "cuda")
    writer = BackgroundWriter(ctx.checkpoint_root) if ctx.checkpoint_root and ctx.is_main and background else None
    try:
        last_checkpoint: Optional[float] = None  # when the last checkpoint was taken (perf_counter)
        written: Optional[Snapshot] = None  # the last snapshot, whose write Ray or `writer` times
        write_s: Optional[float] = None  # how long the last timed checkpoint write took
        samples_per_s: list[float] = []
        cycles: list[float] = []  # seconds per epoch this run: train, validate, checkpoint
        out_of_time = False
        stop = progress.epoch >= cfg.train.max_epochs or (cfg.train.max_steps and progress.step >= cfg.train.max_steps)
        while not stop:
            epoch = progress.epoch
            model.train()
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            batches = samples = 0
            profiling = cfg.train.profile_epoch == epoch + 1 and ctx.is_main
            with (profiled(cfg.train.profile_out, f"training epoch {epoch + 1}, {ctx.world_size} worker(s), {device}",
                           device) if profiling else contextlib.nullcontext()):
                for batch in train_batches(train, dataset.num_items, batch_size, cfg.model.max_len,
                                           cfg.train.mask_prob, cfg.train.last_item_prob, cfg.train.seed, epoch,
                                           ctx.rank, ctx.world_size, pin_memory=device.type == "cuda",
                                           static_shapes=cfg.train.fixed_shapes,
                                           window_prob=cfg.train.window_prob):
                    loss = step(batch.to(device))
                    if ema is not None:
                        ema.update_parameters(model)
                    loss_sum += loss.float()
                    batches += 1
                    samples += batch.num_samples
                    progress.step += 1
                    if cfg.train.log_every and progress.step % cfg.train.log_every == 0 and ctx.is_main:
                        print(f"step {progress.step}  loss {loss.item():.4f}", flush=True)
                    if cfg.train.max_steps and progress.step >= cfg.train.max_steps:
                        break
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                epoch_s = time.perf_counter() - t0  # without the profiler's own summary work
            totals = ctx.sum({"loss": loss_sum.item(), "batches": batches, "samples": samples})
            progress.epoch = epoch + 1
            metrics = {"epoch": progress.epoch, "train_loss": totals["loss"] / max(totals["batches"], 1),
                       "samples_per_s": totals["samples"] / epoch_s, "epoch_s": epoch_s,
                       "lr": scheduler.get_last_lr()[0], **shapes}
            samples_per_s.append(metrics["samples_per_s"])
            t_eval = time.perf_counter()
            if not refit:
                metrics |= run_eval(val, val_rows, "val_", sampled=False)
            metrics["eval_s"] = time.perf_counter() - t_eval
            metrics["peak_mem_mb"] = ctx.sum({"m": _peak_mem_mb(device, rss_base)})["m"] / ctx.world_size
            if refit:  # the final weights are the model: nothing to select by
                progress.best_epoch = progress.epoch
            elif metrics["val_ndcg_10"] > progress.best_metric:
                progress.best_metric, progress.best_epoch = metrics["val_ndcg_10"], progress.epoch
                progress.bad_epochs = 0
                best_state = _cpu_copy(net)
            else:
                progress.bad_epochs += 1
            cycles.append(time.perf_counter() - t0)
            if deadline:  # would the next epoch (as long as this one) end past the deadline on any rank?
                left = deadline - time.time()
                fit = epochs_that_fit(cycles, left)
                agreed = ctx.sum({"late": float(cycles[-1] > left), "fit": float(fit if fit is not None else -1)})
                out_of_time = agreed["late"] > 0
                if cfg.train.anneal_to_deadline and not out_of_time and agreed["fit"] >= 0:  # mean over ranks
                    epochs = progress.epoch + int(agreed["fit"] / ctx.world_size)
                    shorten_schedule(scheduler, epochs * steps_per_epoch)
            # every rank computed the same all-reduced metrics, so every rank takes the same decision
            stop = ((cfg.train.patience and not refit and progress.bad_epochs >= cfg.train.patience)
                    or progress.epoch >= cfg.train.max_epochs or out_of_time
                    or bool(cfg.train.max_steps and progress.step >= cfg.train.max_steps))
            if written is not None and written.write_s is not None:
                write_s = written.write_s
            since_s = time.perf_counter() - last_checkpoint if last_checkpoint is not None else None
            # spaced checkpoints are not due while the last one is still being written here (a
            # checkpoint every epoch, or the last one, waits for it)
            busy = (writer is not None and written is not None and not written.released
                    and cfg.train.checkpoint_share > 0)
            due = stop or (progress.epoch % cfg.train.checkpoint_every == 0 and not busy
                           and checkpoint_spaced(cfg.train.checkpoint_share, since_s, write_s))
            checkpoint = None
            if due and ctx.is_main and (ctx.checkpoint_root or ctx.reports_checkpoints):
                last_checkpoint = time.perf_counter()
                state = {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                    "progress": vars(progress).copy(),
                    # served from the checkpoint's best weights; a refit serves its final weights, which
                    # with the average on are the average's (copied here, only when a checkpoint is due).
                    # In an epoch that set a new best without the average they are the model's own
                    # weights: None writes them once (a smaller write), and readers take "model"
                    "best_model": (_cpu_copy(net) if refit and ema is not None
                                   else None if not refit and ema is None and progress.best_epoch == progress.epoch
                                   else best_state),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    "config": cfg.to_dict(), "num_items": dataset.num_items,
                    "ema": ema.state_dict() if ema is not None else None,
                }
                if ctx.checkpoint_root and writer is None:  # one process, in line: written here and now
                    save_checkpoint(ctx.checkpoint_root, state)
                    write_s = time.perf_counter() - last_checkpoint
                else:  # a copy, written by `writer` (one process) or Ray's upload thread while the next epoch trains
                    written = snapshots.take(state, as_is=("best_model",))  # best_model: replaced, never updated
                    if writer is not None:
                        writer.submit(written)
                    else:
                        checkpoint = written
            if not refit:
                metrics["best_val_ndcg_10"] = progress.best_metric
            if cfg.train.release_memory:  # the seed's between-epoch clean-up, behind a flag
                import gc

                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            reporter.log(progress.epoch, metrics, checkpoint)

        if best_state is not None and not refit:
            net.load_state_dict(best_state)
        # DDP keeps ranks identical only if each rank's optimizer starts from and applies the same
        # thing (bf16 weights: each rank keeps its own fp32 masters); a rank that drifted would make the
        # all-reduced test metrics an average over different models
        agree = ctx.agree(weights_digest(net.state_dict().values())) if ctx.world_size > 1 else True
        if not agree and ctx.is_main:
            print(f"warning: the {ctx.world_size} ranks ended with different weights; the test metrics mix "
                  f"their models (the final metrics say ranks_agree=0)", file=sys.stderr)
        all_rows = np.arange(len(test.targets))
        final = run_eval(test, all_rows, "test_", sampled=True)
        if not refit:  # refitted on the validation targets: their metrics would not be held out
            final |= run_eval(val, all_rows, "val_", sampled=False)
        pop = finalize(metric_sums(popularity_ranks(test, popularity, dataset.num_items)), "popularity_")
        trainable, total = count_parameters(model)
        final |= pop | {
            "epochs": progress.epoch, "best_epoch": progress.best_epoch, "steps": progress.step,
            "samples_per_s": float(np.median(samples_per_s)) if samples_per_s else 0.0,
            "peak_mem_mb": _peak_mem_mb(device, rss_base), "trainable_params": trainable,
            "total_params": total, "num_items": dataset.num_items, "num_users": dataset.sequences.num_users,
            "wall_s": time.perf_counter() - t_start, "out_of_time": float(out_of_time), "refit": float(refit),
            **shapes,
        }
        if ctx.world_size > 1:
            final["ranks_agree"] = float(agree)
        if writer is not None:  # the last checkpoint is on disk before the run reports its end
            writer.wait()
        reporter.final(final)
        return final
    finally:
        if writer is not None:  # an error or Ctrl-C: the write under way still ends before a resume reads
            writer.join_quietly()


def resumed_best(state: dict, model: torch.nn.Module, refit: bool) -> Optional[dict[str, torch.Tensor]]:
    """The best weights so far of a checkpoint whose weights `model` now holds: its `best_model`,
    or, where that is None in an epoch that set the best (written once, as the model's own), a
    copy of the model's; None for a refit, which selects nothing."""
    best = state["best_model"]
    if best is None and not refit and state["progress"]["best_epoch"] == state["progress"]["epoch"] > 0:
        return _cpu_copy(model)
    return best


def _cpu_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's weights copied to the CPU: a new dict each time, never updated in place."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def rank_batch_size(cfg: TrainConfig, world_size: int) -> int:
    """Each rank's batch: train.batch_size, or its share of it with train.batch_scope=global (the
    config check makes it divide evenly)."""
    return cfg.batch_size // world_size if cfg.batch_scope == "global" else cfg.batch_size


def checkpoint_spaced(share: float, since_s: Optional[float], write_s: Optional[float]) -> bool:
    """Whether a checkpoint may be taken `since_s` seconds after the last one began, when the last
    write took `write_s` (train.checkpoint_share): always with `share` 0, or before a first
    checkpoint or a timed write; else once the writes would take at most `share` of the time."""
    return not share or since_s is None or write_s is None or write_s <= share * since_s


def epochs_that_fit(cycles: list[float], left_s: float) -> Optional[int]:
    """Whole epochs that fit in `left_s`, judged by the median of the last five epochs after the
    first (which pays for compilation and CUDA-graph capture); None until two such epochs ran."""
    recent = cycles[1:][-5:]
    if len(recent) < 2:
        return None
    return max(0, int(left_s / max(float(np.median(recent)), 1e-6)))


def _val_rows(val: EvalSplit, max_users: int, seed: int) -> np.ndarray:
    rows = np.arange(len(val.targets))
    if max_users and max_users < len(rows):
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=max_users, replace=False))
    return rows


# the phrase of the incompatible-checkpoint error; the Ray driver recognises it (a worker's
# exception reaches the driver as text) to name the run instead of a worker's temporary directory
INCOMPATIBLE = "another model or catalog"


def _check_weights(state: dict, bf16: bool, where) -> None:
    """The checkpoint's optimizer keeps fp32 masters exactly when this run's weights are bf16."""
    saved_bf16 = any("master" in s for s in state["optimizer"]["state"].values())
    if saved_bf16 != bf16:
        saved, now = ("bf16", "fp32") if saved_bf16 else ("fp32", "bf16")
        raise UserError(f"{where}: checkpoint was trained with {saved} weights and this run's are {now}; "
                        f"set train.weights={saved} or use a new checkpoint directory")


def _check_compatible(state: dict, cfg: Config, num_items: int, where) -> None:
    import dataclasses

    from tuner.config import IloraConfig

    saved = state.get("config", {}).get("model", {})
    saved_ilora = state.get("config", {}).get("ilora", dataclasses.asdict(IloraConfig()))
    if (saved != copy.deepcopy(cfg.to_dict()["model"]) or state.get("num_items") != num_items
            or saved_ilora != cfg.to_dict()["ilora"]):
        raise UserError(f"{where}: checkpoint was trained with {INCOMPATIBLE} "
                        f"(size {saved.get('size')!r}, {state.get('num_items')} items); "
                        f"use a new checkpoint directory")
