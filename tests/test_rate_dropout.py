"""RateDropout: nn.Dropout's numbers in eager mode, and one compiled graph for every rate, so
trials that differ in dropout find each other's compile in inductor's cache."""

import pytest
import torch
from torch import nn

from tuner.config import load_config
from tuner.data.collate import train_batches
from tuner.data.synthetic import generate
from tuner.losses import MaskedItemObjective
from tuner.model.bert4rec import Bert4Rec
from tuner.model.build import model_config
from tuner.model.rate_dropout import RateDropout


def test_eager_rate_dropout_is_nn_dropout():
    x = torch.randn(64, 32)
    for p in (0.0, 0.1, 0.5):
        ours, theirs = RateDropout(p), nn.Dropout(p)
        torch.manual_seed(3)
        got = ours(x)
        torch.manual_seed(3)
        torch.testing.assert_close(got, theirs(x), rtol=0, atol=0)
        assert torch.equal(ours.eval()(x), x)
    assert "rate" not in RateDropout(0.1).state_dict()  # checkpoints are unchanged
    drop = RateDropout(0.1)
    drop.p = 0.4  # as code that sets nn.Dropout.p: the compiled path's buffer follows
    assert drop.rate.item() == pytest.approx(0.4) and drop.p == 0.4
    with pytest.raises(ValueError, match="dropout rate"):
        RateDropout(1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_rate_dropout_drops_at_the_rate_and_rescales_once(dtype):
    """Under compile: about p of the elements are zeroed; the rest are x / (1 - p), computed in
    fp32 and rounded once to x's dtype."""
    drop = RateDropout(0.3)
    x = (torch.rand(256, 1024) + 0.5).to(dtype)
    y = torch.compile(drop)(x)
    zeros = (y == 0).float().mean().item()
    assert zeros == pytest.approx(0.3, abs=0.01)
    kept = y != 0
    scale = 1.0 / (1.0 - torch.tensor(0.3))  # fp32, as the kernel computes it
    torch.testing.assert_close(y[kept], (x.float() * scale).to(dtype)[kept], rtol=0, atol=0)


def compiled_step(*overrides: str, length: int = 16):
    """A tiny model's objective under torch.compile, with config `overrides`, and one batch of
    `length` positions: a function that runs forward and backward on the batch (its first call
    compiles, or loads from the cache). tests/short_attention_check.py's attention-dropout cache
    check uses it too."""
    torch.manual_seed(0)
    cfg = load_config(overrides=["model.size=tiny", f"model.max_len={length}", *overrides])
    data = generate(64, 40, seed=0)
    model = Bert4Rec(model_config(cfg, data.num_items))
    objective = torch.compile(MaskedItemObjective(model))
    batch = next(iter(train_batches(data.sequences, data.num_items, 16, length, 0.3, 0.1, seed=0, epoch=0)))
    return lambda: objective(batch.items, batch.positions, batch.labels).backward()


@pytest.mark.parametrize("setting, first, second", [("model.dropout", 0.1, 0.35), ("model.attn_dropout", 0.1, 0.25)])
def test_trials_with_another_dropout_share_the_compiled_graph(tmp_path, monkeypatch, setting, first, second):
    """The second trial of a search (another dropout rate) loads the first one's compiled forward
    and backward from the on-disk cache instead of compiling them again. With nn.Dropout the rate
    was a constant of the graph and every new rate missed; so did the attention dropout on a CPU,
    where attention falls back to SDPA (its dropout_p a float) until `dropout_attention` took the
    rate as an input."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    compiled_step(f"{setting}={first}")()
    torch._dynamo.reset()
    counters.clear()
    compiled_step(f"{setting}={second}")()
    assert counters["inductor"]["fxgraph_cache_hit"] >= 2  # forward and backward
    assert counters["inductor"]["fxgraph_cache_miss"] == 0
    torch._dynamo.reset()


def test_dropout_attention_is_sdpa_math_without_dropout_and_drops_at_the_rate():
    """`dropout_attention` at rate 0 gives SDPA's output under a key-padding mask; at rate 0.3
    about 30% of the attention weights are dropped and the kept are scaled by 1 / 0.7 (with v the
    identity, the output is the dropped weights themselves)."""
    import torch.nn.functional as F

    from tuner.model.rate_dropout import dropout_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 2, 12, 8, generator=gen) for _ in range(3))
    # left padding of 0, 3, 7 and all 12 positions (a sequence without an item: zeros, as SDPA's)
    keep = (torch.arange(12)[None, :] >= torch.tensor([0, 3, 7, 12])[:, None])[:, None, None, :]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    torch.testing.assert_close(dropout_attention(q, k, v, keep, torch.tensor(0.0)), expected)
    assert not expected[3].any()

    q, k = torch.zeros(64, 2, 12, 8), torch.zeros(64, 2, 12, 8)  # uniform weights over the real keys
    full = torch.ones(64, 1, 1, 12, dtype=torch.bool)
    weights = dropout_attention(q, k, torch.eye(12).expand(64, 2, 12, 12), full, torch.tensor(0.3))
    assert (weights == 0).float().mean().item() == pytest.approx(0.3, abs=0.02)
    torch.testing.assert_close(weights[weights != 0], torch.full_like(weights[weights != 0], 1 / 12 / 0.7))
