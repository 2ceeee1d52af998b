"""Sequences in memory and the leave-one-out split.

All users' histories live in two arrays, Arrow's list layout: `items` (int32, ids 1..V) and
`offsets` (int64, user u owns items[offsets[u]:offsets[u+1]]). Nothing here loops per item.

Split (leave-one-out): the last item is the test target, the second-to-last the validation
target, the rest is training. Validation reads the history before its target, test the history
before its target (validation item included). Users with fewer than 3 items only train.
`split(include_val=True)` trains on the validation targets too (everything but the test item),
for a final model refitted at a fixed number of epochs (`train.refit`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from tuner.data import prepare as prep
from tuner.errors import UserError


@dataclass
class Sequences:
    """Ragged int32 histories in Arrow's list layout."""

    items: np.ndarray  # int32 [N]
    offsets: np.ndarray  # int64 [U + 1]

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def select(self, users: np.ndarray) -> "Sequences":
        starts, ends = self.offsets[users], self.offsets[users + 1]
        lengths = ends - starts
        offsets = np.zeros(len(users) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        index = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return Sequences(self.items[index], offsets)


@dataclass
class EvalSplit:
    """Histories to read and the item each must predict."""

    history: Sequences
    targets: np.ndarray  # int32 [U]
    users: np.ndarray  # dataset user ids, for reporting


@dataclass
class Dataset:
    num_items: int
    sequences: Sequences
    name: str
    meta: dict = field(default_factory=dict)
    item_raw_ids: list | None = None  # raw id of internal item i at [i - 1]; None: the ids are the raw ids

    def split(self, include_val: bool = False) -> tuple[Sequences, EvalSplit, EvalSplit]:
        """(train, validation, test) by leave-one-out; `include_val` trains on validation targets."""
        seq = self.sequences
        lengths = seq.lengths
        evaluable = lengths >= 3
        # train: everything but the last two (include_val: the last) items of evaluable users;
        # all of the others
        train_len = np.where(evaluable, lengths - (1 if include_val else 2), lengths)
        train_offsets = np.zeros(seq.num_users + 1, dtype=np.int64)
        np.cumsum(train_len, out=train_offsets[1:])
        index = np.repeat(seq.offsets[:-1] - train_offsets[:-1], train_len) + np.arange(train_offsets[-1])
        train = Sequences(seq.items[index], train_offsets)
        users = np.flatnonzero(evaluable)
        ends = seq.offsets[users + 1]
        val_history = Sequences(*_prefix(seq, users, ends - 2))
        test_history = Sequences(*_prefix(seq, users, ends - 1))
        val = EvalSplit(val_history, seq.items[ends - 2], users)
        test = EvalSplit(test_history, seq.items[ends - 1], users)
        return train, val, test


def _prefix(seq: Sequences, users: np.ndarray, stops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    starts = seq.offsets[users]
    lengths = stops - starts
    offsets = np.zeros(len(users) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    index = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
    return seq.items[index], offsets


def load_prepared(directory: str | Path) -> Dataset:
    """Load a directory written by `tuner prepare`, checking it is whole and consistent."""
    path = Path(directory)
    meta_path = path / prep.META_FILE
    if not path.is_dir():
        raise UserError(f"{path}: no such dataset directory")
    if not meta_path.is_file():
        raise UserError(f"{path}: not a prepared dataset (no {prep.META_FILE}; run `tuner prepare`)")
    try:
        meta = json.loads(meta_path.read_text())
        num_items, num_users = int(meta["num_items"]), int(meta["num_users"])
        num_interactions = int(meta["num_interactions"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{meta_path}: malformed ({exc.__class__.__name__}: {exc})") from None
    seq_path = path / prep.SEQUENCES_FILE
    try:
        column = pq.read_table(seq_path, columns=["items"]).column("items").combine_chunks()
    except (OSError, KeyError, ValueError) as exc:
        raise UserError(f"{seq_path}: cannot be read ({str(exc).splitlines()[0][:160]})") from None
    items = column.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    offsets = column.offsets.to_numpy().astype(np.int64)
    if len(offsets) - 1 != num_users or len(items) != num_interactions:
        raise UserError(f"{path}: {prep.META_FILE} does not match {prep.SEQUENCES_FILE} "
                        f"({num_users} users/{num_interactions} interactions in meta, "
                        f"{len(offsets) - 1}/{len(items)} in the data)")
    if len(items) and (items.min() < 1 or items.max() > num_items):
        raise UserError(f"{path}: item ids outside 1..{num_items} in {prep.SEQUENCES_FILE}")
    raw_ids = None
    if (path / prep.ITEMS_FILE).is_file():
        raw_ids = pq.read_table(path / prep.ITEMS_FILE, columns=["raw_id"]).column("raw_id").to_pylist()
    return Dataset(num_items, Sequences(items, offsets), name=path.name, meta=meta, item_raw_ids=raw_ids)


def load_dataset(data_cfg) -> Dataset:
    """The dataset a config asks for: prepared directory, raw file (prepared in memory), or synthetic."""
    if data_cfg.path is None:
        from tuner.data.synthetic import generate

        return generate(data_cfg.synthetic_users, data_cfg.synthetic_items, seed=data_cfg.synthetic_seed)
    path = Path(data_cfg.path)
    if path.is_dir():
        return load_prepared(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or dataset directory")
    prepared = prep.prepare(str(path), None)
    meta = prepared["meta"]
    return Dataset(meta["num_items"], Sequences(prepared["items"], prepared["offsets"]),
                   name=path.name.split(".")[0], meta=meta,
                   item_raw_ids=[str(r) for r in prepared["item_raw"].to_pylist()])
