"""Metrics against hand-computed values; chunking and history exclusion do not change ranks."""

import math

import numpy as np
import pytest
import torch

from tuner.data.dataset import EvalSplit, Sequences
from tuner.metrics import evaluate, finalize, popularity_ranks, rank_metrics

# 2 users, 5 items; with identity output weights the hidden state *is* the score vector
SCORES = torch.tensor([[0.1, 0.5, 0.3, 0.9, 0.2],   # target item 2 (0.5): one item above -> rank 1
                       [0.8, 0.1, 0.7, 0.6, 0.9]])  # target item 4 (0.6): three above -> rank 3
HISTORY = Sequences(np.array([1, 4, 5, 1], dtype=np.int32), np.array([0, 2, 4]))  # u0: 1,4  u1: 5,1
SPLIT = EvalSplit(HISTORY, np.array([2, 4], dtype=np.int32), np.array([0, 1]))


def _evaluate(**kwargs):
    sums = evaluate(lambda ids: SCORES, torch.eye(5), torch.zeros(5), SPLIT, num_items=5, max_len=4,
                    device=torch.device("cpu"), batch_size=8, sampled=False, **kwargs)
    return finalize(sums, "")


def test_full_ranking_matches_hand_computation():
    m = _evaluate(catalog_chunk=5)
    assert m["hr_1"] == 0.0 and m["hr_5"] == 1.0 and m["hr_10"] == 1.0
    assert m["ndcg_5"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / 2)
    assert m["mrr"] == pytest.approx((1 / 2 + 1 / 4) / 2)


def test_catalog_chunks_do_not_change_ranks():
    assert _evaluate(catalog_chunk=2) == _evaluate(catalog_chunk=5)


def test_exclude_history_skips_seen_items():
    # u0 has seen item 4 (0.9, above its target) -> rank 0; u1 has seen items 5 and 1 -> rank 1
    m = _evaluate(catalog_chunk=2, exclude_history=True)
    assert m["hr_1"] == 0.5 and m["mrr"] == pytest.approx((1 + 1 / 2) / 2)


def test_sampled_metrics_never_draw_seen_items_or_target():
    sums = evaluate(lambda ids: SCORES, torch.eye(5), torch.zeros(5), SPLIT, num_items=5, max_len=4,
                    device=torch.device("cpu"), batch_size=8, catalog_chunk=5, num_negatives=100,
                    popularity=np.array([0, 5, 1, 1, 5, 5, 0]))
    m = finalize(sums, "")
    # u0 may only meet items 3 and 5 (both below its target) -> rank 0;
    # u1 may only meet items 2 (0.1) and 3 (0.7 > 0.6) -> rank 1, however many draws
    assert m["uni100_hr_10"] == 1.0
    assert m["uni100_mrr"] == pytest.approx(0.75) and m["pop100_mrr"] == pytest.approx(0.75)


def test_rank_metrics_and_popularity_baseline():
    m = rank_metrics(torch.tensor([0, 9, 10]))
    assert m["hr_10"] == pytest.approx(2 / 3)
    assert m["ndcg_10"] == pytest.approx((1 + 1 / math.log2(11)) / 3)
    counts = np.array([0, 10, 3, 3, 1, 7, 0])  # items 1..5
    ranks = popularity_ranks(SPLIT, counts, num_items=5)
    assert ranks.tolist() == [2, 4]  # item 2 (3): 10 and 7 above; item 4 (1): all four above
