"""bf16 weights with fp32 masters: the masters take torch.optim.AdamW's path, the weights are
their bf16 rounding, the state survives a checkpoint, and the tied table's bf16 gradient sums
repeated items in fp32."""

import copy

import pytest
import torch

from tuner.config import load_config
from tuner.losses import TiedItemTable
from tuner.train.master_adamw import MasterWeightAdamW, adamw_update, join_master, round_to_bf16, split_master
from tuner.train.optim import bf16_weights
from tuner.train.step import TrainStep


def _pair(seed: int = 0, split: bool = False):
    """An fp32 model under torch's AdamW and its copy under MasterWeightAdamW (bf16 weights), with
    the decayed / undecayed groups and learning rates the training loop builds; `split` masters."""
    torch.manual_seed(seed)
    reference = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8))
    mixed = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8))
    mixed.load_state_dict(reference.state_dict())

    def groups(model):
        weights = [model[0].weight, model[2].weight]
        rest = [model[0].bias, model[1].weight, model[1].bias, model[2].bias]
        return [{"params": weights, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0, "lr": 2e-2}]

    opt_ref = torch.optim.AdamW(groups(reference), lr=1e-2, betas=(0.9, 0.98))
    opt_mixed = MasterWeightAdamW(groups(mixed), lr=1e-2, betas=(0.9, 0.98), split_masters=split)
    return reference, opt_ref, mixed, opt_mixed


def _bf16_grads(model_a, model_b, step: int) -> None:
    """The same gradients, exactly representable in bf16, to both models (fp32 / bf16)."""
    gen = torch.Generator().manual_seed(step)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        grad = (torch.randn(a.shape, generator=gen) * 10 ** (step % 3 - 1)).to(torch.bfloat16)
        a.grad, b.grad = grad.to(a.dtype), grad.to(b.dtype)


def _masters(opt, model):
    return [opt.master(w) for w in model.parameters()]


@pytest.mark.parametrize("split", [False, True], ids=["fp32_masters", "split_masters"])
def test_masters_follow_torch_adamw_and_the_weights_are_their_bf16_rounding(split):
    reference, opt_ref, mixed, opt_mixed = _pair(split=split)
    assert all(p.dtype == torch.bfloat16 for p in mixed.parameters())
    for step in range(25):
        for opt in (opt_ref, opt_mixed):  # a scheduler's per-step learning rate
            for group, base in zip(opt.param_groups, (1e-2, 2e-2)):
                group["lr"] = base * (1 - step / 30)
        _bf16_grads(reference, mixed, step)
        opt_ref.step()
        opt_mixed.step()
    for ref, master, weight in zip(reference.parameters(), _masters(opt_mixed, mixed), mixed.parameters()):
        assert master.dtype == torch.float32
        torch.testing.assert_close(master, ref.detach(), rtol=1e-5, atol=1e-6)
        # round to nearest; split masters break ties away from zero (the split must be undone)
        assert torch.equal(weight, split_master(master)[0] if split else master.to(torch.bfloat16))
        assert ((weight.float() - master).abs() <= (master.to(torch.bfloat16).float() - master).abs()).all()
    if split:  # the state holds the low halves, not a second copy of the weights
        assert all(set(s) == {"master_low", "exp_avg", "exp_avg_sq", "step"} and s["master_low"].dtype == torch.int16
                   for s in opt_mixed.state.values())
    moved = [(ref.detach() - w.float()).abs().max() for ref, w in zip(reference.parameters(), mixed.parameters())]
    assert max(moved) > 0  # the bf16 weights are a rounding, not the masters themselves


def test_grad_scale_divides_the_gradients_as_clipping_needs():
    reference, opt_ref, mixed, opt_mixed = _pair()
    for step in range(5):
        _bf16_grads(reference, mixed, step)
        for p in reference.parameters():
            p.grad /= 4.0
        opt_mixed.grad_scale = torch.tensor(4.0)
        opt_ref.step()
        opt_mixed.step()
    for ref, master in zip(reference.parameters(), _masters(opt_mixed, mixed)):
        torch.testing.assert_close(master, ref.detach(), rtol=1e-5, atol=1e-6)
    step = TrainStep(mixed, list(mixed.parameters()), opt_mixed, None, torch.bfloat16, 1.0, torch.device("cpu"))
    assert step.fused_clip  # TrainStep hands it the clipping factor instead of clipping bf16 gradients


@pytest.mark.parametrize("saved_split, loaded_split", [(False, False), (True, True), (True, False), (False, True)])
def test_a_reloaded_optimizer_continues_exactly_with_fp32_state(saved_split, loaded_split):
    """Checkpoints hold fp32 masters whether or not they are split in memory, so a run resumes
    exactly, also with the other setting."""
    _, _, mixed, opt_mixed = _pair(split=saved_split)
    for step in range(3):
        _bf16_grads(mixed, mixed, step)
        opt_mixed.step()
    saved_model, saved_opt = copy.deepcopy(mixed.state_dict()), copy.deepcopy(opt_mixed.state_dict())  # as on disk
    assert all(s["master"].dtype == torch.float32 for s in saved_opt["state"].values())
    _, _, resumed, opt_resumed = _pair(seed=1, split=loaded_split)  # other initial weights, overwritten by the load
    resumed.load_state_dict(saved_model)
    opt_resumed.load_state_dict(saved_opt)
    for weight in resumed.parameters():
        state = opt_resumed.state[weight]
        assert all(state[k].dtype == torch.float32 for k in ("exp_avg", "exp_avg_sq"))
        assert opt_resumed.master(weight).dtype == torch.float32
    for step in range(3, 6):
        for model in (mixed, resumed):
            _bf16_grads(model, model, step)
        opt_mixed.step()
        opt_resumed.step()
    for a, b in zip(_masters(opt_mixed, mixed), _masters(opt_resumed, resumed)):
        assert torch.equal(a, b)
    if saved_split == loaded_split:  # else the weights differ where a master is a tie
        for a, b in zip(mixed.parameters(), resumed.parameters()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("split", [False, True], ids=["fp32_masters", "split_masters"])
def test_the_compiled_update_is_the_eager_one(split):
    torch.manual_seed(0)
    shapes = [(64, 16), (16,), (3, 5)]
    weights = [torch.randn(s).to(torch.bfloat16) for s in shapes]
    state = {k: [torch.randn(s).abs() for s in shapes] for k in ("master", "exp_avg", "exp_avg_sq")}
    if split:  # the masters as bf16 weights and their low halves
        weights, state["master"] = map(list, zip(*(split_master(m) for m in state["master"])))
    steps = [torch.tensor(3.0) for _ in shapes]
    grads = [torch.randn(s).to(torch.bfloat16) for s in shapes]
    copies = [[t.clone() for t in group] for group in (weights, *state.values(), steps)]
    decays = [torch.tensor(0.05)] * 2 + [torch.tensor(0.0)]
    args = ([torch.tensor(1e-2)] * 2 + [torch.tensor(2e-2)], decays, torch.tensor(2.0), 0.9, 0.999, 1e-8)
    before = [join_master(w, low) for w, low in zip(weights, state["master"])] if split else None
    adamw_update(weights, grads, *state.values(), steps, *args)
    torch.compile(adamw_update, fullgraph=True, dynamic=False)(copies[0], grads, *copies[1:], *args)
    if split:  # compare the masters the halves make
        after = [join_master(w, low) for w, low in zip(weights, state["master"])]
        assert all((a - b).abs().max() > 0 for a, b in zip(after, before))  # the update moved them
        weights[:], state["master"] = [w.float() for w in weights], after
        copies[0], copies[1] = ([w.float() for w in copies[0]],
                                [join_master(w, lo) for w, lo in zip(copies[0], copies[1])])
    for eager, compiled in zip([weights, *state.values(), steps], copies):
        for a, b in zip(eager, compiled):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype, compiled, align", [(torch.bfloat16, False, 1), (torch.bfloat16, True, 1),
                                                    (torch.bfloat16, True, 16), (torch.float32, False, 16)])
def test_the_tied_tables_gradient_sums_a_popular_items_rows_at_full_precision(dtype, compiled, align):
    torch.manual_seed(0)
    table = torch.randn(12, 8).to(dtype).requires_grad_()
    items = torch.tensor([[3] * 500 + [0, 5, 7, 5]] * 4)  # item 3 fills 2,000 positions, 0 is padding
    grad_rows = torch.full((*items.shape, 8), 0.01).to(dtype)
    grad_head = torch.randn(-12 % align + 12, 8).to(dtype)
    grad_head[0] = grad_head[11:] = 0  # the rows the bias masks (padding, mask token, alignment) get none

    def loss(table):
        rows, head = TiedItemTable.apply(table, items, align, dtype)
        return (rows * grad_rows).sum() + (head * grad_head).sum()

    (torch.compile(loss, fullgraph=True) if compiled else loss)(table).backward()
    expected = grad_head[:12].float()
    expected.index_add_(0, items[items != 0], grad_rows.float()[items != 0])
    # within a bf16 step of the fp32 sum; adding 2,000 rows to a bf16 gradient one by one stalls near 4
    torch.testing.assert_close(table.grad.float(), expected.to(dtype).float(), rtol=2 ** -7, atol=1e-6)
    assert table.grad.dtype == dtype and not table.grad[0].any()


def test_auto_stores_bf16_weights_only_for_large_compiled_models_under_bf16_autocast_on_cuda():
    cfg, cuda, bf16 = load_config(), torch.device("cuda"), torch.bfloat16
    large = torch.nn.Linear(10_000, 10_000, device="meta")  # 100M weights, no memory
    small = torch.nn.Linear(1_000, 1_000)
    assert bf16_weights(cfg, bf16, cuda, large)
    assert not bf16_weights(cfg, bf16, cuda, small)  # the compiled update's host work would cost more
    assert not bf16_weights(cfg, bf16, cuda, large, compiled=False)  # foreach passes: slower than the fused AdamW
    assert not bf16_weights(cfg, torch.float16, cuda, large)
    assert not bf16_weights(cfg, bf16, torch.device("cpu"), large)
    assert not bf16_weights(load_config(overrides=["optim.ema_decay=0.9"]), bf16, cuda, large)
    assert not bf16_weights(load_config(overrides=["train.weights=fp32"]), bf16, cuda, large)
    assert bf16_weights(load_config(overrides=["train.weights=bf16"]), bf16, torch.device("cpu"), small)
    assert bf16_weights(load_config(overrides=["train.weights=bf16"]), bf16, cuda, large, compiled=False)


def _moments_pair(moments_dtype):
    reference, opt_ref, mixed, _ = _pair()
    groups = [{"params": [mixed[0].weight, mixed[2].weight], "weight_decay": 0.1},
              {"params": [mixed[0].bias, mixed[1].weight, mixed[1].bias, mixed[2].bias], "weight_decay": 0.0,
               "lr": 2e-2}]
    return reference, opt_ref, mixed, MasterWeightAdamW(groups, lr=1e-2, betas=(0.9, 0.98), moments_dtype=moments_dtype)


def test_stochastic_rounding_to_bf16_is_unbiased_where_rounding_to_nearest_is_not():
    torch.manual_seed(0)
    value = 1.0 + 2 ** -7 * 0.25  # a quarter of the way from 1 to the next bf16 value, 1 + 2^-7
    values = torch.full((200_000,), value)
    rounded = round_to_bf16(values)
    assert rounded.dtype == torch.bfloat16
    assert set(rounded.float().unique().tolist()) == {1.0, 1.0 + 2 ** -7}  # only the two neighbours
    assert abs(rounded.float().mean().item() - value) < 2 ** -7 * 0.01  # exact in expectation
    assert values.to(torch.bfloat16).float().mean().item() == 1.0  # nearest: always down
    negative = round_to_bf16(-values).float()
    assert abs(negative.mean().item() + value) < 2 ** -7 * 0.01  # rounds the magnitude, both signs


def test_a_bf16_second_moment_keeps_growing_with_stochastic_rounding_and_stalls_without():
    """A constant gradient of 1: v_t = 1 - 0.999^t (0.95 after 3,000 steps) in exact arithmetic."""
    shape, steps = (4096,), 3000
    weight = [torch.zeros(shape, dtype=torch.bfloat16)]
    state = [torch.zeros(shape), torch.zeros(shape, dtype=torch.bfloat16), torch.zeros(shape, dtype=torch.bfloat16)]
    count = [torch.tensor(0.0)]
    grad = [torch.ones(shape, dtype=torch.bfloat16)]
    nearest = torch.zeros(shape, dtype=torch.bfloat16)
    torch.manual_seed(0)
    for _ in range(steps):
        adamw_update(weight, grad, *[[t] for t in state], count, [torch.tensor(1e-3)], [torch.tensor(0.0)], None,
                     0.9, 0.999, 1e-8)
        nearest = (nearest.float() * 0.999 + 0.001).to(torch.bfloat16)  # the same moment, rounded to nearest
    exact = 1 - 0.999 ** steps
    assert abs(state[2].float().mean().item() - exact) < 0.01 * exact
    assert nearest.float().max().item() < 0.5  # stalled where 0.1% of the gap is under half a bf16 step


def test_bf16_moments_keep_the_masters_on_torch_adamws_path():
    reference, opt_ref, mixed, opt_mixed = _moments_pair(torch.bfloat16)
    start = [p.detach().clone() for p in reference.parameters()]
    for step in range(25):
        _bf16_grads(reference, mixed, step)
        opt_ref.step()
        opt_mixed.step()
    for weight, state in opt_mixed.state.items():
        assert opt_mixed.master(weight).dtype == torch.float32
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    for ref, master, first in zip(reference.parameters(), _masters(opt_mixed, mixed), start):
        moved = (ref.detach() - first).abs().max()
        # the moments' rounding noise (0.4% at most per value, unbiased) moves each weight by under
        # 2% of what 25 AdamW steps moved it
        assert (master - ref.detach()).abs().max() < 0.02 * moved


def test_a_state_saved_with_fp32_moments_loads_into_bf16_moments():
    _, _, mixed, opt_fp32 = _moments_pair(torch.float32)
    _bf16_grads(mixed, mixed, 0)
    opt_fp32.step()
    saved = copy.deepcopy(opt_fp32.state_dict())
    _, _, other, opt_bf16 = _moments_pair(torch.bfloat16)
    opt_bf16.load_state_dict(saved)
    for (w_before, before), (w_after, after) in zip(opt_fp32.state.items(), opt_bf16.state.items()):
        assert torch.equal(opt_bf16.master(w_after), opt_fp32.master(w_before))
        assert after["exp_avg_sq"].dtype == torch.bfloat16
        torch.testing.assert_close(after["exp_avg_sq"].float(), before["exp_avg_sq"], rtol=2 ** -8, atol=0)


def test_the_compiled_update_with_bf16_moments_matches_eager_up_to_the_rounding():
    torch.manual_seed(0)
    shapes = [(64, 16), (16,)]
    weights = [torch.randn(s).to(torch.bfloat16) for s in shapes]
    masters = [w.float() for w in weights]
    moments = [[torch.randn(s).abs().to(torch.bfloat16) for s in shapes] for _ in range(2)]
    grads = [torch.randn(s).to(torch.bfloat16) for s in shapes]
    steps = [torch.tensor(3.0) for _ in shapes]
    copies = [[t.clone() for t in group] for group in (weights, masters, *moments, steps)]
    args = ([torch.tensor(1e-2)] * 2, [torch.tensor(0.05), torch.tensor(0.0)], None, 0.9, 0.999, 1e-8)
    adamw_update(weights, grads, masters, *moments, steps, *args)
    torch.compile(adamw_update, fullgraph=True, dynamic=False)(copies[0], grads, *copies[1:], *args)
    for a, b in zip(masters, copies[1]):  # the masters use the fp32 moments before their rounding
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for eager, compiled in zip(moments, copies[2:4]):  # each rounding is one of two neighbours
        for a, b in zip(eager, compiled):
            torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7, atol=0)


def test_bf16_moments_need_bf16_weights():
    from tuner.errors import UserError
    from tuner.train.optim import build_optimizer

    model = torch.nn.Linear(4, 4)
    with pytest.raises(UserError, match="optim.moments=bf16 needs bf16 weights"):
        build_optimizer(model, load_config(overrides=["optim.moments=bf16"]).optim, torch.device("cpu"))
    optimizer = build_optimizer(model, load_config(overrides=["optim.moments=bf16"]).optim, torch.device("cpu"),
                                bf16=True)
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in optimizer.state.values())


def test_optimizers_with_another_weight_decay_share_the_compiled_update(tmp_path, monkeypatch):
    """A trial with another optim.weight_decay loads the compiled update from inductor's cache:
    the decay reaches it as a tensor (a float was a constant of the graph, and every new decay
    compiled it again). It still decays by the group's value, and follows a changed one."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))

    def step(decay: float, change_to: float | None = None):
        torch.manual_seed(0)
        layer = torch.nn.Linear(8, 4)
        opt = MasterWeightAdamW(layer.parameters(), lr=0.0, weight_decay=decay, compile=True)
        if change_to is not None:
            opt.param_groups[0]["weight_decay"] = change_to
            decay = change_to
        before = [opt.master(w).clone() for w in layer.parameters()]
        for w in layer.parameters():
            w.grad = torch.zeros_like(w)
        opt.param_groups[0]["lr"] = 0.1
        opt.step()
        for b, w in zip(before, layer.parameters()):  # zero gradients: the step is the decay alone
            torch.testing.assert_close(opt.master(w), b * (1 - 0.1 * decay))

    torch._dynamo.reset()
    step(0.01)
    torch._dynamo.reset()
    counters.clear()
    step(0.2)
    assert counters["inductor"]["fxgraph_cache_hit"] >= 1 and counters["inductor"]["fxgraph_cache_miss"] == 0
    step(0.01, change_to=0.3)
    torch._dynamo.reset()
