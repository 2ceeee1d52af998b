"""Losses: cut cross-entropy equals full CE in loss and gradients; sampled losses behave."""

import math

import pytest
import torch

from tuner.data.collate import IGNORE
from tuner.losses import LossConfig, catalog_logits, chunked_logsumexp, cut_ce, cut_sampled_ce, full_ce, sampled_ce


def _inputs(n=40, v=1000, h=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(1, v + 1, (n,), generator=g)
    labels[-5:] = IGNORE  # padding slots
    return hidden, weight, bias, labels


@pytest.mark.parametrize("chunk", [1, 7, 256, 5000])
def test_cut_ce_matches_full_ce_in_loss_and_gradients(chunk):
    hidden, weight, bias, labels = _inputs()
    cfg = LossConfig(name="cce", chunk=chunk)
    ref = full_ce(hidden, weight, bias, labels, cfg)
    ref_grads = torch.autograd.grad(ref, (hidden, weight, bias))
    cut = cut_ce(hidden, weight, bias, labels, cfg)
    cut_grads = torch.autograd.grad(cut, (hidden, weight, bias))
    assert cut.item() == pytest.approx(ref.item(), rel=1e-6)
    for a, b in zip(ref_grads, cut_grads):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager_gather", "compiled_one_hot"])
def test_full_ce_is_pytorchs_cross_entropy_in_loss_and_gradients(compiled):
    """full_ce computes lse - target logit (a backward without a row reduction; the target by a
    gather in eager code, by a one-hot row sum under compile): the same loss and gradients as
    F.cross_entropy over the logits, ignored rows included."""
    hidden, weight, bias, labels = _inputs()
    ours = (torch.compile(full_ce) if compiled else full_ce)(hidden, weight, bias, labels, LossConfig())
    ref = torch.nn.functional.cross_entropy(hidden @ weight.t() + bias, torch.where(labels == IGNORE, -100, labels - 1),
                                            ignore_index=-100)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12)
    inputs = (hidden, weight, bias)
    for a, b in zip(torch.autograd.grad(ours, inputs), torch.autograd.grad(ref, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_logits_padded_to_aligned_columns_change_neither_loss_nor_gradients():
    hidden, weight, bias, labels = _inputs(v=1000)  # 1,000 items: padded by 24 columns to 1,024
    targets = torch.where(labels == IGNORE, -100, labels - 1)
    results = []
    for align in (1, 64):
        logits = catalog_logits(hidden, weight, bias, align=align)
        assert logits.shape[1] == {1: 1000, 64: 1024}[align]
        loss = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100)
        results.append((loss, torch.autograd.grad(loss, (hidden, weight, bias))))
    (plain, plain_grads), (padded, padded_grads) = results
    assert padded.item() == pytest.approx(plain.item(), rel=1e-12)
    for a, b in zip(plain_grads, padded_grads):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_weight_padded_beforehand_gets_its_bias_padded_to_match():
    """TiedItemTable hands catalog_logits a head already padded to 1,024 rows with the 1,000-item
    bias: the logits are those of padding both inside catalog_logits."""
    hidden, weight, bias, _ = _inputs(v=1000)
    prepadded = torch.nn.functional.pad(weight, (0, 0, 0, 24))
    torch.testing.assert_close(catalog_logits(hidden, prepadded, bias, align=64),
                               catalog_logits(hidden, weight, bias, align=64), rtol=0, atol=0)


def test_chunked_logsumexp_gradcheck():
    hidden, weight, bias, _ = _inputs(n=5, v=23, h=4)
    assert torch.autograd.gradcheck(lambda h, w, b: chunked_logsumexp(h, w, b, 6), (hidden, weight, bias))


def test_sampled_losses_equal_full_ce_when_negatives_cover_a_uniform_catalog():
    # with every item as a (uniform, log-Q corrected) negative and hits masked, the sampled softmax
    # sees the whole catalog once: it equals full CE up to the constant log-Q shift
    torch.manual_seed(0)
    hidden, weight, bias, labels = _inputs(n=12, v=50, h=8)
    labels[-5:] = torch.tensor([3, 4, 5, 6, 7])
    ref = full_ce(hidden, weight, bias, labels, LossConfig())
    cfg = LossConfig(name="sampled_ce", num_negatives=50, shared_negatives=True)
    # draw exactly every item once
    import tuner.losses as losses

    original = losses._draw_negatives
    losses._draw_negatives = lambda cfg, shape, n, q, device: torch.arange(n).view(shape) if len(shape) == 1 \
        else torch.arange(n).expand(shape)
    try:
        shared = sampled_ce(hidden, weight, bias, labels, cfg)
        per_position = sampled_ce(hidden, weight, bias, labels, LossConfig(num_negatives=50, shared_negatives=False))
        cut = cut_sampled_ce(hidden, weight, bias, labels, LossConfig(num_negatives=50, chunk=7))
    finally:
        losses._draw_negatives = original
    assert shared.item() == pytest.approx(ref.item(), rel=1e-9)
    assert per_position.item() == pytest.approx(ref.item(), rel=1e-9)
    # CCE- keeps the target among the negatives too (no per-row hit masking): log(1 + p_target) above CE
    assert cut.item() >= ref.item() - 1e-9


def test_popularity_negatives_follow_the_counts():
    from tuner.losses import _draw_negatives

    logq = torch.tensor([0.7, 0.2, 0.1]).log()
    draws = _draw_negatives(LossConfig(sampling="popularity"), (20000,), 3, logq, "cpu")
    freq = torch.bincount(draws, minlength=3).double() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64), atol=0.02, rtol=0)
    assert math.isfinite(sampled_ce(*_inputs(v=3)[:3], torch.tensor([1, 2, 3] * 13 + [IGNORE]),
                                    LossConfig(num_negatives=4, sampling="popularity"), logq).item())


def test_focal_loss_is_ce_at_gamma_zero_and_down_weights_easy_positions():
    from tuner.losses import focal

    hidden, weight, bias, labels = _inputs()
    ce = full_ce(hidden, weight, bias, labels, LossConfig())
    assert focal(hidden, weight, bias, labels, LossConfig(focal_gamma=0.0)).item() == pytest.approx(ce.item())
    assert focal(hidden, weight, bias, labels, LossConfig(focal_gamma=2.0)).item() < ce.item()


def test_embedding_learning_rate_multiplier():
    from tuner.config import load_config
    from tuner.model.bert4rec import Bert4Rec, Bert4RecConfig
    from tuner.train.optim import build_optimizer

    cfg = load_config(overrides=["optim.lr=1e-3", "optim.embedding_lr_mult=10"])
    model = Bert4Rec(Bert4RecConfig(num_items=30, hidden=8, heads=2, ffn=16, max_len=6))
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lrs[id(model.item_emb.weight)] == pytest.approx(1e-2)
    assert lrs[id(model.blocks[0].attn.q_proj.weight)] == pytest.approx(1e-3)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


@pytest.mark.parametrize("loss, autocast, compiled, align", [
    ("ce", False, False, 1), ("ce", True, False, 1), ("ce", False, True, 1), ("focal", False, False, 1),
    ("focal", True, False, 1), ("ce", True, False, 16), ("focal", False, True, 16)])
def test_fused_item_table_gives_the_same_loss_and_gradients(loss, autocast, compiled, align, monkeypatch):
    """TiedItemTable (the table's input rows and output head in one autograd node) against
    autograd summing the two uses: the same loss and the same gradient for every parameter,
    padding and mask-token rows included; align > 1 pads the logit columns as on a GPU."""
    import tuner.losses as losses
    from tuner.losses import MaskedItemObjective
    from tuner.model.bert4rec import Bert4Rec, Bert4RecConfig

    monkeypatch.setattr(losses, "_align", lambda cfg, tensor: align)
    torch.manual_seed(0)
    model = Bert4Rec(Bert4RecConfig(num_items=50, max_len=12, hidden=16, layers=1, heads=2, ffn=32,
                                    dropout=0.0, attn_dropout=0.0))
    items = torch.randint(1, 51, (6, 12))
    items[:, :3] = 0  # left padding
    items[:, 5] = 51  # mask tokens
    items[0, 7] = items[1, 8] = 9  # an item seen twice
    positions = torch.arange(5, 72, 12)
    labels = torch.randint(1, 51, (6,))
    labels[-1] = IGNORE
    results = []
    for fused in (False, True):
        objective = MaskedItemObjective(model, LossConfig(name=loss, fused_table=fused))
        assert objective._fused_table() is fused
        run = torch.compile(objective, fullgraph=True) if compiled else objective  # no graph breaks
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            value = run(items, positions, labels)
        value.backward()
        results.append((value.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain, plain_grads), (fused_value, fused_grads) = results
    torch.testing.assert_close(fused_value, plain)
    assert plain_grads["item_emb.weight"][0].abs().sum() == 0 == fused_grads["item_emb.weight"][0].abs().sum()
    assert fused_grads["item_emb.weight"][-1].abs().sum() > 0  # the mask token's input row learns
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, msg=name)
