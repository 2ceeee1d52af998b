"""AdamW (no decay on biases and LayerNorm) and warm-up + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from tuner.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
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
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type == "cuda")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """Linear warm-up over warmup_fraction of the steps, then cosine down to min_lr_ratio."""
    warmup = max(1, int(cfg.warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
