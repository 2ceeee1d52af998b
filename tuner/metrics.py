"""Ranking metrics for next-item, leave-one-out evaluation.

Full ranking: each user's history with the mask token appended is encoded once; the catalog is
scored in chunks of `catalog_chunk` items, so memory stays bounded at million-item catalogs.
A target's rank is the number of items scoring strictly above it (items 1..V only: padding and
mask are never ranked; with `exclude_history` the user's own past items are skipped).
HR@k = [rank < k], NDCG@k = 1/log2(rank + 2) if rank < k, MRR = 1/(rank + 1).

Sampled metrics follow the original paper: the target ranked against 100 items the user has not
interacted with, drawn uniformly or by training popularity (`*_uni100_*`, `*_pop100_*`).
The popularity baseline ranks every item by its training count, on the same split.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np
import torch

from tuner.data.collate import eval_batches, pad_left
from tuner.data.dataset import EvalSplit, Sequences

CUTOFFS = (1, 5, 10, 20)


def rank_metrics(ranks: torch.Tensor, prefix: str = "", cutoffs: Iterable[int] = CUTOFFS) -> dict[str, float]:
    """Mean HR@k, NDCG@k and MRR from 0-based ranks."""
    ranks = ranks.double()
    out = {}
    for k in cutoffs:
        hit = ranks < k
        out[f"{prefix}hr_{k}"] = hit.double().mean().item()
        out[f"{prefix}ndcg_{k}"] = torch.where(hit, 1.0 / torch.log2(ranks + 2.0), 0.0).mean().item()
    out[f"{prefix}mrr"] = (1.0 / (ranks + 1.0)).mean().item()
    return out


def metric_sums(ranks: torch.Tensor, cutoffs: Iterable[int] = CUTOFFS) -> dict[str, float]:
    """Sums rather than means, so ranks from several workers can be all-reduced, then divided."""
    count = ranks.numel()
    return {k: v * count for k, v in rank_metrics(ranks, cutoffs=cutoffs).items()} | {"count": float(count)}


def _history_matrix(history: Sequences, rows: np.ndarray, device) -> torch.Tensor:
    """Sorted [B, Lmax] matrix of each row's past items (padded with a value above every id)."""
    lengths = history.lengths[rows]
    width = max(int(lengths.max()) if len(lengths) else 1, 1)
    ids = torch.from_numpy(pad_left(history, rows, width).astype(np.int64)).to(device)
    ids = torch.where(ids == 0, torch.iinfo(torch.int64).max, ids)
    return ids.sort(dim=1).values


def _in_sorted(sorted_rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    pos = torch.searchsorted(sorted_rows, values).clamp(max=sorted_rows.shape[1] - 1)
    return sorted_rows.gather(1, pos) == values


@torch.no_grad()
def evaluate(encode: Callable[[torch.Tensor], torch.Tensor], weight: torch.Tensor, bias: torch.Tensor,
             split: EvalSplit, num_items: int, max_len: int, device: torch.device, batch_size: int,
             catalog_chunk: int, popularity: np.ndarray | None = None, num_negatives: int = 100,
             exclude_history: bool = False, rows: np.ndarray | None = None, seed: int = 0,
             sampled: bool = True) -> dict[str, float]:
    """Metric sums (see `metric_sums`) over `rows` of `split`.

    `encode(ids [B, L]) -> [B, H]` is the hidden state at the last (mask) position; `weight`
    [V, H] and `bias` [V] score items 1..V (row i is item i + 1). Scores are computed in fp32.
    """
    weight, bias = weight.float(), bias.float()
    full_ranks, uni_ranks, pop_ranks = [], [], []
    gen = torch.Generator().manual_seed(seed)
    pop_probs = None
    if popularity is not None:
        pop_probs = torch.from_numpy(popularity[1:num_items + 1].astype(np.float64) + 1e-9)
    for chunk_rows, ids, targets in eval_batches(split, num_items, batch_size, max_len, rows):
        ids, targets = ids.to(device), targets.to(device)
        hidden = encode(ids).float()
        target_scores = (hidden * weight[targets - 1]).sum(1) + bias[targets - 1]
        seen = _history_matrix(split.history, chunk_rows, device) if (exclude_history or sampled) else None
        above = torch.zeros(len(targets), dtype=torch.int64, device=device)
        for start in range(0, num_items, catalog_chunk):
            stop = min(start + catalog_chunk, num_items)
            higher = (hidden @ weight[start:stop].t() + bias[start:stop]) > target_scores[:, None]
            if exclude_history:
                item_ids = torch.arange(start + 1, stop + 1, device=device).expand(len(targets), -1)
                higher &= ~_in_sorted(seen, item_ids.contiguous())
            above += higher.sum(1)
        full_ranks.append(above.cpu())
        if sampled:
            uni_ranks.append(_sampled_ranks(hidden, targets, target_scores, seen, weight, bias,
                                            num_items, num_negatives, None, gen))
            if pop_probs is not None:
                pop_ranks.append(_sampled_ranks(hidden, targets, target_scores, seen, weight, bias,
                                                num_items, num_negatives, pop_probs, gen))
    result = metric_sums(torch.cat(full_ranks) if full_ranks else torch.zeros(0))
    for name, ranks in (("uni100_", uni_ranks), ("pop100_", pop_ranks)):
        if ranks:
            sums = metric_sums(torch.cat(ranks), cutoffs=(10,))
            result |= {f"{name}{k}": v for k, v in sums.items() if k != "count"}
    return result


def _sampled_ranks(hidden, targets, target_scores, seen, weight, bias, num_items, num_negatives,
                   probs, gen) -> torch.Tensor:
    """Rank of the target among `num_negatives` items the user has not seen, drawn per row."""
    batch, device = len(targets), hidden.device
    draws = 2 * num_negatives + 16  # oversample, then keep the first valid draws
    if probs is None:
        cand = torch.randint(1, num_items + 1, (batch, draws), generator=gen)
    else:
        cand = torch.multinomial(probs, batch * draws, replacement=True, generator=gen).view(batch, draws) + 1
    cand = cand.to(device)
    invalid = _in_sorted(seen, cand) | (cand == targets[:, None])
    # negatives are distinct: a repeat of an earlier draw in the row is invalid
    ordered, index = cand.sort(dim=1, stable=True)
    repeat = torch.zeros_like(invalid)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    invalid |= torch.zeros_like(invalid).scatter(1, index, repeat)
    order = invalid.int().argsort(dim=1, stable=True)[:, :num_negatives]  # valid draws first
    cand, invalid = cand.gather(1, order), invalid.gather(1, order)
    neg_scores = torch.einsum("bh,bnh->bn", hidden, weight[cand - 1]) + bias[cand - 1]
    return ((neg_scores > target_scores[:, None]) & ~invalid).sum(1).cpu()


def popularity_counts(train: Sequences, num_items: int) -> np.ndarray:
    """Training interaction count per id (index 0 and V+1 stay 0)."""
    return np.bincount(train.items, minlength=num_items + 2).astype(np.int64)


def popularity_ranks(split: EvalSplit, counts: np.ndarray, num_items: int) -> torch.Tensor:
    """Rank of each target when every item is scored by its training count (ties count against)."""
    item_counts = np.sort(counts[1:num_items + 1])
    target_counts = counts[split.targets]
    above = num_items - np.searchsorted(item_counts, target_counts, side="right")
    return torch.from_numpy(above.astype(np.int64))


def finalize(sums: dict[str, float], prefix: str) -> dict[str, float]:
    """Divide all-reduced sums by the user count and add the split's prefix."""
    count = max(sums.get("count", 0.0), 1.0)
    return {f"{prefix}{k}": v / count for k, v in sums.items() if k != "count"}


def ndcg(rank: int, k: int) -> float:
    """NDCG@k of one 0-based rank (for hand-computed checks)."""
    return 1.0 / math.log2(rank + 2) if rank < k else 0.0
