"""The seed project's training step, rebuilt from its published architecture, as the peer.

Post-LN `nn.TransformerEncoderLayer`, sinusoidal positions, an untied two-layer output head
(Linear -> GELU -> Linear over the catalog), focal loss (gamma 2) over every non-padding
position, fp16 autocast with a GradScaler, Adam. Timed on the same batches as ours.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn


class SeedBert4Rec(nn.Module):
    def __init__(self, num_items: int, hidden: int, layers: int, heads: int, max_len: int, dropout: float = 0.1):
        super().__init__()
        self.item_emb = nn.Embedding(num_items + 2, hidden, padding_idx=0)
        position = torch.arange(max_len)[:, None]
        div = torch.exp(torch.arange(0, hidden, 2) * (-math.log(10000.0) / hidden))
        pe = torch.zeros(max_len, hidden)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(position * div), torch.cos(position * div)
        self.register_buffer("pos", pe)
        layer = nn.TransformerEncoderLayer(hidden, heads, 4 * hidden, dropout, activation="gelu",
                                           batch_first=True, norm_first=False)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, num_items + 2))

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        x = self.item_emb(items) + self.pos[: items.shape[1]]
        x = self.encoder(x, src_key_padding_mask=items == 0)
        return self.head(x)


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")
    pt = torch.exp(-ce)
    return (((1 - pt) ** gamma) * ce)[keep.reshape(-1)].mean()


def bench_seed(batches, originals, num_items: int, hidden: int, layers: int, heads: int, max_len: int,
               device: torch.device, variant: str, warmup: int, window: int = 5) -> dict:
    """variant: fp32 | amp (fp16 + GradScaler) | amp_compile."""
    torch.manual_seed(0)
    torch.cuda.reset_peak_memory_stats(device)
    model = SeedBert4Rec(num_items, hidden, layers, heads, max_len).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    amp = variant != "fp32"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    forward = torch.compile(model) if variant == "amp_compile" else model

    def step(items, target):
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            logits = forward(items)
        loss = focal_loss(logits, target, target != 0)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    pairs = [(b.items.to(device, non_blocking=True), t.to(device, non_blocking=True))
             for b, t in zip(batches, originals)]
    for items, target in pairs[:warmup]:
        step(items, target)
    times = []  # same timing as tuner.bench: windows of back-to-back steps, median per-step time
    timed = pairs[warmup:]
    for start in range(0, len(timed) - window + 1, window):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for items, target in timed[start:start + window]:
            step(items, target)
        torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) / window)
    step_s = statistics.median(times)
    batch_size = batches[0].items.shape[0]
    return {"step_ms": step_s * 1e3, "samples_per_s": batch_size / step_s,
            "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20}
