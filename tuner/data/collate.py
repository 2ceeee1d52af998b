"""Batches: padding and cloze masking on int32 arrays, vectorised (no per-item Python work).

A batch of histories becomes a left-padded [B, L] id matrix (the latest item sits at the last
position). Training batches mask items BERT-style: each real item is picked with `mask_prob`;
picked items become the mask token 80% of the time, a random item 10%, unchanged 10%. A share
`last_item_prob` of rows instead mask only their last item, the paper's alignment with next-item
prediction. Every row has at least one masked item. A history longer than the model's length is
cut to its latest `max_len` items, or, for a share `window_prob` of such histories each epoch, to
a window of `max_len` items at a uniformly random place (the older items are seen too). Labels
come out as flat indices into the [B*L] positions plus target ids, padded to a multiple of
`label_bucket` with index 0 / label -1 (ignored), so compiled code sees few distinct shapes.

Randomness comes from a NumPy Generator seeded per (seed, epoch, rank): a resumed run redraws
exactly the masks and order it would have drawn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from tuner.data.dataset import EvalSplit, Sequences

IGNORE = -1


def pad_left(seq: Sequences, rows: np.ndarray, length: int, ends: np.ndarray | None = None) -> np.ndarray:
    """[len(rows), length] int32: the last `length` items of each chosen history (of its items
    before `ends`, absolute offsets, where given), left-padded with 0."""
    ends = seq.offsets[rows + 1] if ends is None else ends
    starts = seq.offsets[rows]
    index = ends[:, None] - length + np.arange(length)[None, :]
    valid = index >= starts[:, None]
    return np.where(valid, seq.items[np.clip(index, 0, max(len(seq.items) - 1, 0))], 0).astype(np.int32)


@dataclass
class TrainBatch:
    items: torch.Tensor  # [B, L] int64 ids with masks applied
    positions: torch.Tensor  # [M] int64 flat indices into B*L of masked positions (padded)
    labels: torch.Tensor  # [M] int64 target item ids 1..V, IGNORE on padding
    num_samples: int

    def tensors(self) -> dict[str, torch.Tensor]:
        """The batch's tensors by field name (everything but `num_samples`)."""
        return {"items": self.items, "positions": self.positions, "labels": self.labels}

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "TrainBatch":
        """The same batch with `fn` applied to each of its tensors."""
        return TrainBatch(**{name: fn(value) for name, value in self.tensors().items()},
                          num_samples=self.num_samples)

    def to(self, device: torch.device) -> "TrainBatch":
        nb = device.type == "cuda"
        return self.map(lambda t: t.to(device, non_blocking=nb))


def static_predictions(batch_size: int, max_len: int, mask_prob: float, last_item_prob: float,
                       lengths: np.ndarray | None = None) -> int:
    """A fixed number of predicted positions per batch: the expected count plus four standard
    deviations and 5% of a row each, rounded up to 64. Fixed shapes let CUDA graphs replay the step.

    `lengths`: the training histories' lengths, whose visible part (up to `max_len`) sets each
    row's expected count; the spread between users adds to the masking's own in the deviation.
    Without them every row counts as full-length (the seed's benchmark batches are). On ML-1M, where
    the median history shows 92 of 200 positions, full-length rows would give 8,256 slots a batch of
    128 for 4,205 predictions on average (benchmarks/static_slots.py)."""
    visible = np.full(1, float(max_len)) if lengths is None else np.minimum(lengths[lengths >= 1], max_len)
    visible = visible.astype(np.float64)
    per_row = (1 - last_item_prob) * np.maximum(1.0, visible * mask_prob) + last_item_prob
    variance = float(np.mean(visible * mask_prob * (1 - mask_prob)) + np.var(per_row))
    mean = batch_size * float(np.mean(per_row))
    std = (batch_size * variance) ** 0.5
    return int(-(-(mean + 4 * std + batch_size * 0.05) // 64) * 64)


def mask_batch(ids: np.ndarray, num_items: int, mask_prob: float, last_item_prob: float,
               rng: np.random.Generator, label_bucket: int = 64,
               max_predictions: int | None = None) -> TrainBatch:
    """Apply cloze masking to a left-padded id matrix.

    With `max_predictions`, exactly that many prediction slots come out (padded with IGNORE); in
    the rare batch that picks more, a random surplus is left unmasked (as BERT's
    max_predictions_per_seq does), so shapes never change.
    """
    real = ids != 0
    picked = (rng.random(ids.shape) < mask_prob) & real
    last_only = rng.random(ids.shape[0]) < last_item_prob
    picked[last_only] = False
    picked[:, -1] |= last_only | ~picked.any(axis=1)  # last position is always real
    if max_predictions is not None:
        flat = np.flatnonzero(picked)
        if len(flat) > max_predictions:
            picked.reshape(-1)[rng.choice(flat, len(flat) - max_predictions, replace=False)] = False
    roll = rng.random(ids.shape)
    masked = ids.copy()
    to_mask = picked & (roll < 0.8)
    to_random = picked & (roll >= 0.8) & (roll < 0.9)
    masked[to_mask] = num_items + 1
    masked[to_random] = rng.integers(1, num_items + 1, size=int(to_random.sum()), dtype=np.int32)
    positions = np.flatnonzero(picked)
    labels = ids.reshape(-1)[positions]
    padded = max_predictions if max_predictions is not None else -(-len(positions) // label_bucket) * label_bucket
    positions = np.pad(positions, (0, padded - len(positions)))
    labels = np.pad(labels.astype(np.int64), (0, padded - len(labels)), constant_values=IGNORE)
    return TrainBatch(torch.from_numpy(masked.astype(np.int64)), torch.from_numpy(positions.astype(np.int64)),
                      torch.from_numpy(labels), ids.shape[0])


def train_batches(train: Sequences, num_items: int, batch_size: int, max_len: int, mask_prob: float,
                  last_item_prob: float, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                  pin_memory: bool = False, static_shapes: bool = False,
                  window_prob: float = 0.0) -> Iterator[TrainBatch]:
    """One epoch of masked batches for this rank; every rank gets the same number of batches.

    `static_shapes`: every batch has the same shape (`batch_size` rows, a fixed number of
    prediction slots), as CUDA graphs need. The last batch is filled up with the epoch's first
    users again (each masked anew), so every user still trains every epoch and an epoch takes as
    many steps as without fixed shapes. `window_prob`: see the module's docstring."""
    ends = window_ends(train, max_len, window_prob, seed, epoch)
    rng = np.random.default_rng([seed, epoch, 7919])
    users = np.flatnonzero(train.lengths >= 1)
    order = rng.permutation(users)
    # equal shards: drop the remainder so no rank waits in an all-reduce the others never reach
    per_rank = len(order) // world_size
    mine = order[rank * per_rank:(rank + 1) * per_rank]
    mask_rng = np.random.default_rng([seed, epoch, rank])
    max_predictions = (static_predictions(batch_size, max_len, mask_prob, last_item_prob, train.lengths)
                       if static_shapes else None)
    if static_shapes:  # up to whole batches, cyclically: a rank with fewer users than a batch repeats them all
        mine = np.resize(mine, -(-len(mine) // batch_size) * batch_size)
    for start in range(0, len(mine), batch_size):
        rows = mine[start:start + batch_size]
        batch = mask_batch(pad_left(train, rows, max_len, ends[rows]), num_items, mask_prob, last_item_prob,
                           mask_rng, max_predictions=max_predictions)
        if pin_memory:
            batch = batch.map(torch.Tensor.pin_memory)
        yield batch


def window_ends(train: Sequences, max_len: int, window_prob: float, seed: int, epoch: int) -> np.ndarray:
    """[U] int64 absolute end offsets of each history's training window this epoch: the history's
    end, or for a share `window_prob` of those longer than `max_len`, the end of a window placed
    uniformly among its len - max_len + 1 places. The same on every rank (seeded per epoch)."""
    ends = train.offsets[1:].copy()
    if window_prob <= 0:
        return ends
    rng = np.random.default_rng([seed, epoch, 104729])
    lengths = train.lengths
    moved = (lengths > max_len) & (rng.random(len(lengths)) < window_prob)
    shift = np.floor(rng.random(len(lengths)) * (lengths - max_len + 1)).astype(np.int64)
    ends[moved] -= shift[moved]
    return ends


def num_train_batches(train: Sequences, batch_size: int, world_size: int = 1) -> int:
    """Batches in an epoch of each rank (`train_batches`' count, fixed shapes or not)."""
    per_rank = int((train.lengths >= 1).sum()) // world_size
    return -(-per_rank // batch_size)


def eval_batches(split: EvalSplit, num_items: int, batch_size: int, max_len: int,
                 rows: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """(row indices, [B, L] ids ending in the mask token, [B] targets) for next-item evaluation."""
    rows = np.arange(len(split.targets)) if rows is None else rows
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        ids = pad_left(split.history, chunk, max_len - 1)
        ids = np.concatenate([ids, np.full((len(chunk), 1), num_items + 1, dtype=np.int32)], axis=1)
        yield chunk, torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(split.targets[chunk].astype(np.int64))
