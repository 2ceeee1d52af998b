"""AdamW (no decay on biases and LayerNorm), warm-up + cosine schedule, and the optional weight average.

The AdamW is PyTorch's (fused on CUDA) over fp32 weights, or `MasterWeightAdamW` over bf16 weights
with fp32 masters (`train.weights`, chosen by `bf16_weights`) and fp32 or bf16 moments (`optim.moments`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from tuner.config import Config, OptimConfig
from tuner.errors import UserError
from tuner.model.bert4rec import count_parameters
from tuner.train.master_adamw import MasterWeightAdamW


# auto stores weights in bf16 from this many trainable ones: below it the bytes saved are fewer
# than the compiled update's host work costs (H100: 430M, 266M weights, 1.08x faster per step; 130M,
# 68M, 1.03x with CUDA graphs but 0.83x without; a 2.5M ML-1M model 5% slower: benchmarks/results/
# gpu_throughput_weights.json, ml1m_weights.json)
BF16_WEIGHTS_MIN = 100_000_000


def bf16_weights(cfg: Config, autocast_dtype: Optional[torch.dtype], device: torch.device, model: nn.Module,
                 compiled: bool = True) -> bool:
    """Whether `train.weights` (auto | fp32 | bf16) stores the trainable weights in bf16.

    auto picks bf16 only where it is the fast path and keeps every other setup as it was: CUDA,
    bf16 autocast, no weight average (which would be kept in bf16 too), BF16_WEIGHTS_MIN weights,
    and a `compiled` update. Uncompiled, the masters' update is some twenty foreach passes over
    every weight where the fused AdamW makes one: the 430M eager AMP step took 48.1 ms with bf16
    weights against 29.9 with fp32 ones (H100, benchmarks/results/gpu_throughput_plain_06ca3e7.json)."""
    choice = cfg.train.weights
    if choice == "bf16":
        if autocast_dtype != torch.bfloat16:
            raise UserError(f"train.weights=bf16 needs bf16 autocast, but train.amp gives "
                            f"{autocast_dtype or 'fp32'} on {device.type}: set train.amp=bf16")
        return True
    trainable, _ = count_parameters(model)
    return (choice == "auto" and autocast_dtype == torch.bfloat16 and device.type == "cuda" and compiled
            and not cfg.optim.ema_decay and trainable >= BF16_WEIGHTS_MIN)


def training_optimizer(model: nn.Module, cfg: Config, autocast_dtype: Optional[torch.dtype], device: torch.device,
                       compile: bool = False) -> torch.optim.Optimizer:
    """The optimizer of the training loop and of `tuner bench` (so both time the same update):
    `build_optimizer` with bf16 weights where `train.weights` picks them (`bf16_weights`; `compile`:
    the step, and so the masters' update, is compiled)."""
    return build_optimizer(model, cfg.optim, device, bf16_weights(cfg, autocast_dtype, device, model, compile),
                           compile)


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device, bf16: bool = False,
                    compile: bool = False) -> torch.optim.Optimizer:
    """AdamW over the trainable weights; with `bf16` a `MasterWeightAdamW`, which turns them into
    bf16 (call it before DDP or torch.compile see the model) and, with `compile`, compiles its update."""
    decay, no_decay, embeddings = [], [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if isinstance(module, nn.Embedding):
                embeddings.append(param)  # decayed, at lr x embedding_lr_mult (the seed's option)
                continue
            skip = isinstance(module, nn.LayerNorm) or name.endswith("bias")
            (no_decay if skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0},
              {"params": embeddings, "weight_decay": cfg.weight_decay, "lr": cfg.lr * cfg.embedding_lr_mult}]
    groups = [g for g in groups if g["params"]]
    if bf16:
        return MasterWeightAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), compile=compile,
                                 moments_dtype=torch.bfloat16 if cfg.moments == "bf16" else torch.float32,
                                 split_masters=cfg.masters == "split")
    if cfg.moments == "bf16":
        raise UserError("optim.moments=bf16 needs bf16 weights, and train.weights chose fp32 here "
                        "(auto: CUDA, bf16 autocast, no optim.ema_decay, 100M+ weights): set train.weights=bf16")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type == "cuda")


class WarmupCosine:
    """LR factor per step: linear warm-up over `warmup_fraction` of `total_steps`, then cosine
    down to `min_lr_ratio` at `total_steps`.

    A callable object rather than a closure, so `LambdaLR.state_dict()` saves `total_steps`
    (resume continues the same curve, shortened or not).
    """

    def __init__(self, warmup_fraction: float, total_steps: int, min_lr_ratio: float):
        self.warmup_fraction, self.total_steps, self.min_lr_ratio = warmup_fraction, total_steps, min_lr_ratio

    @property
    def warmup(self) -> int:
        return max(1, int(self.warmup_fraction * self.total_steps))

    def __call__(self, step: int) -> float:
        warmup = self.warmup
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, self.total_steps - warmup))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """Linear warm-up over warmup_fraction of the steps, then cosine down to min_lr_ratio."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(cfg.warmup_fraction, total_steps,
                                                                     cfg.min_lr_ratio))


def shorten_schedule(scheduler, total_steps: int) -> None:
    """End the cosine at `total_steps` instead, if that is sooner (a time budget cuts the run):
    the learning rate still decays fully before training stops."""
    for curve in scheduler.lr_lambdas:
        if isinstance(curve, WarmupCosine) and total_steps < curve.total_steps:
            curve.total_steps = max(total_steps, 2)  # the warm-up shrinks with it


def build_ema(model: nn.Module, decay: float) -> Optional[torch.optim.swa_utils.AveragedModel]:
    """An exponential moving average of `model`'s parameters (`optim.ema_decay`; None when 0).

    Call `update_parameters(model)` after each step; `.module` is the averaged model. Buffers are
    not averaged: the model's (position ids and the like) are constants.
    """
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
