"""BERT4Rec: named sizes match their parameter counts, ids behave, attention ignores padding."""

import pytest
import torch

from tuner.model.bert4rec import Bert4Rec, Bert4RecConfig, count_parameters, last_rows
from tuner.model.sizes import SIZES


def _model(size, num_items, tied, device="meta"):
    s = SIZES[size]
    with torch.device(device):
        return Bert4Rec(Bert4RecConfig(num_items=num_items, hidden=s["hidden"], layers=s["layers"],
                                       heads=s["heads"], ffn=4 * s["hidden"], max_len=s["max_len"],
                                       tied_head=tied))


@pytest.mark.parametrize("size, num_items, millions", [
    ("5M", 18_345, 5), ("85M", 159_750, 85), ("130M", 159_750, 130), ("430M", 159_750, 430)])
def test_size_names_are_untied_parameter_counts(size, num_items, millions):
    _, total = count_parameters(_model(size, num_items, tied=False))
    assert abs(total / 1e6 - millions) / millions < 0.03
    _, tied_total = count_parameters(_model(size, num_items, tied=True))
    assert tied_total < total  # the tied head drops the V x H output matrix


def test_scores_cover_items_only_and_padding_is_ignored():
    torch.manual_seed(0)
    model = _model("tiny", 50, tied=True, device="cpu").eval()
    weight, bias = model.output_embedding()
    assert weight.shape == (50, 32) and bias.shape == (50,)
    seq = torch.tensor([[0, 0, 0, 5, 7, 51]])  # left padding, two items, mask token
    longer_pad = torch.tensor([[0, 0, 0, 0, 0, 0, 5, 7, 51]])
    with torch.no_grad():
        a = model(seq)[:, -1]
        b = model(longer_pad)[:, -1]
    # the same history gives the same state whatever the amount of padding
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_attention_uses_explicit_linears():
    model = _model("tiny", 20, tied=True, device="cpu")
    names = {n for n, _ in model.named_modules()}
    assert {"blocks.0.attn.q_proj", "blocks.0.attn.k_proj", "blocks.0.attn.v_proj",
            "blocks.0.attn.o_proj", "blocks.0.ffn.up_proj"} <= names
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in model.modules())


def test_fused_qkv_projection_is_the_three_linears():
    """Plain Q/K/V linears run as one GEMM; outputs and weight gradients are those of each linear."""
    torch.manual_seed(0)
    attn = _model("tiny", 20, tied=True, device="cpu").blocks[0].attn
    linears = (attn.q_proj, attn.k_proj, attn.v_proj)
    x = torch.randn(3, 7, 32)
    fused = attn._qkv(x, None).chunk(3, dim=-1)  # one [B, L, 3H] tensor, Q, K and V side by side
    separate = [linear(x) for linear in linears]
    upstream = [torch.randn_like(t) for t in separate]
    grads = []
    for outputs in (fused, separate):
        attn.zero_grad()
        torch.autograd.backward(outputs, upstream)
        grads.append([p.grad.clone() for linear in linears for p in (linear.weight, linear.bias)])
    for a, b in zip(fused, separate):
        torch.testing.assert_close(a, b)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def _residual_pair(weights_dtype, device="cpu", residual="bf16"):
    """The same tiny model with an fp32 residual stream and one set by `residual` (weights in
    `weights_dtype`), on PyTorch's add and LayerNorm ops: on a GPU add_norm's kernels would run the
    blocks through `Block.forward_fused`, which the blocks' forward hooks (`_stream_dtypes`) do not see."""
    torch.manual_seed(0)
    cfg = dict(num_items=40, hidden=32, layers=2, heads=2, ffn=64, max_len=16, dropout=0.0, attn_dropout=0.0,
               fused_add_norm=False)
    fp32 = Bert4Rec(Bert4RecConfig(**cfg)).to(device, weights_dtype)
    half = Bert4Rec(Bert4RecConfig(**cfg, residual=residual)).to(device, weights_dtype)
    half.load_state_dict(fp32.state_dict())
    return fp32, half


def _stream_dtypes(model, items, dtype=torch.bfloat16):
    """The dtype each block receives and returns, and the hidden states', under `dtype` autocast."""
    seen = []
    hooks = [b.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
             for b in model.blocks]
    with torch.autocast(items.device.type, dtype=dtype):
        hidden = model(items)
    for h in hooks:
        h.remove()
    return seen, hidden


def _items(device):
    items = torch.randint(1, 41, (4, 16), device=device)
    items[0, :5] = 0
    return items


def _assert_half_stream(fp32, half, items, dtype):
    """Under `dtype` autocast `half`'s blocks read and return `dtype` and its hidden states match
    the fp32 stream's to that rounding; gradients reach its weights; without autocast the two
    models agree exactly."""
    _, reference = _stream_dtypes(fp32, items, dtype)
    seen, hidden = _stream_dtypes(half, items, dtype)
    assert set(seen) == {(dtype, dtype)} and hidden.dtype == dtype
    error = (hidden.float() - reference.float()).norm() / reference.float().norm()
    assert error < 0.02
    scale = 2.0 ** 16 if dtype == torch.float16 else 1.0  # as GradScaler: Q and K's gradients underflow fp16
    (hidden.float().square().mean() * scale).backward()
    assert all(p.grad.abs().sum() > 0 for n, p in half.named_parameters() if n not in ("out_bias", "item_emb.weight"))
    assert all(p.grad.isfinite().all() for p in half.parameters() if p.grad is not None)
    with torch.no_grad():  # without autocast the option changes nothing
        torch.testing.assert_close(half(items), fp32(items), atol=0, rtol=0)


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("weights_dtype", [torch.float32, torch.bfloat16])
def test_bf16_residual_stream_under_autocast(weights_dtype, device):
    """model.residual=bf16: every block reads and returns bf16, whatever the weights' dtype (CUDA's
    autocast runs layer norms in fp32 and returns fp32), and the hidden states match the default
    stream's to bf16 rounding; gradients reach the weights. The default keeps fp32 weights' stream
    in fp32."""
    fp32, bf16 = _residual_pair(weights_dtype, device)
    items = _items(device)
    seen, _ = _stream_dtypes(fp32, items)
    assert len(seen) == len(fp32.blocks)  # every block ran as a module, under the hooks
    if weights_dtype == torch.float32 or device == "cuda":
        assert set(seen) == {(torch.float32, torch.float32)}
    _assert_half_stream(fp32, bf16, items, torch.bfloat16)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_half_residual_stream_under_fp16_autocast(device):
    """model.residual=half: under fp16 autocast (fp32 weights, as every fp16 run has) every block
    reads and returns fp16, close to the fp32 stream; bf16 leaves an fp16 run's stream in fp32."""
    items = _items(device)
    fp32, half = _residual_pair(torch.float32, device, residual="half")
    seen, _ = _stream_dtypes(fp32, items, torch.float16)
    assert set(seen) == {(torch.float32, torch.float32)}
    _assert_half_stream(fp32, half, items, torch.float16)
    fp32, bf16 = _residual_pair(torch.float32, device, residual="bf16")
    with torch.no_grad():
        seen, hidden = _stream_dtypes(bf16, items, torch.float16)
        _, reference = _stream_dtypes(fp32, items, torch.float16)
    assert set(seen) == {(torch.float32, torch.float32)}
    torch.testing.assert_close(hidden, reference, atol=0, rtol=0)


@pytest.mark.parametrize("weights_dtype", [torch.float32, torch.bfloat16])
def test_half_residual_stream_is_bf16_under_bf16_autocast(weights_dtype):
    """model.residual=half under bf16 autocast is model.residual=bf16, to the bit."""
    _, bf16 = _residual_pair(weights_dtype, residual="bf16")
    _, half = _residual_pair(weights_dtype, residual="half")
    items = _items("cpu")
    with torch.no_grad():
        torch.testing.assert_close(_stream_dtypes(half, items)[1], _stream_dtypes(bf16, items)[1], atol=0, rtol=0)


@pytest.mark.parametrize("weights_dtype, residual, dtype", [(torch.bfloat16, "bf16", torch.bfloat16),
                                                             (torch.float32, "half", torch.float16)])
def test_a_half_residual_stream_compiles_to_one_graph(weights_dtype, residual, dtype):
    _, model = _residual_pair(weights_dtype, residual=residual)
    items = torch.randint(1, 41, (4, 16))
    with torch.autocast("cpu", dtype=dtype):
        eager = model(items)
        compiled = torch.compile(model, fullgraph=True)(items)
    assert compiled.dtype == dtype
    torch.testing.assert_close(compiled.float(), eager.float(), atol=0.03, rtol=0.03)


def _pruned_pair(ilora: bool = False):
    """The same tiny model with the last block pruned to the scored rows and without."""
    torch.manual_seed(0)
    cfg = dict(num_items=40, hidden=32, layers=2, heads=2, ffn=64, max_len=16, dropout=0.0, attn_dropout=0.0)
    pruned, full = (Bert4Rec(Bert4RecConfig(**cfg, prune_last_layer=p)) for p in (True, False))
    if ilora:
        from tuner.model.ilora import IloraSpec, apply_ilora

        for model in (pruned, full):
            apply_ilora(model, IloraSpec(rank=4, experts=2, dropout=0.0))
        for name, param in pruned.named_parameters():  # experts that change the output
            if "lora_B" in name or name.startswith("router."):
                torch.nn.init.normal_(param, std=0.2)
    full.load_state_dict(pruned.state_dict())
    return pruned, full


@pytest.mark.parametrize("ilora", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_last_block_pruned_to_the_scored_rows_gives_their_states_and_gradients(ilora, compiled):
    """forward(rows=...): the last block's feed-forward sees the scored rows only, and the rows'
    states and every trainable gradient are those of the whole model picked after (iLoRA's
    per-sequence gates follow each row's sequence)."""
    pruned, full = _pruned_pair(ilora)
    items = torch.randint(1, 41, (3, 16))
    items[1, :6] = 0
    rows = torch.tensor([2, 15, 16, 20, 31, 47])
    seen = []
    pruned.blocks[-1].ffn.up_proj.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    run = torch.compile(pruned, fullgraph=True, backend="aot_eager") if compiled else pruned
    out = run(items, rows=rows)
    ref = full(items, rows=rows)
    assert out.shape == ref.shape == (6, 32)
    if not compiled:  # hooks do not fire inside a compiled graph
        assert seen == [(6, 1, 32)]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref, full(items).reshape(-1, 32)[rows], atol=1e-6, rtol=1e-6)
    weights = torch.randn(6, 32)
    grads = [torch.autograd.grad((h * weights).sum(), [p for p in m.parameters() if p.requires_grad],
                                 allow_unused=True) for h, m in ((out, pruned), (ref, full))]
    assert sum(g is not None for g in grads[1]) > 4
    for a, b in zip(*grads):
        assert (a is None) == (b is None)  # the item bias scores items, not hidden states
        if b is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_last_rows_are_each_sequences_last_position():
    model = _pruned_pair()[0].eval()
    items = torch.randint(1, 41, (5, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(items, rows=last_rows(items)), model(items)[:, -1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("prune", [True, False])
def test_model_flops_is_what_the_training_forward_multiplies(prune):
    """tuner.bench.model_flops (the MFU's numerator) against PyTorch's FLOP counter over one
    training forward: the encoder, the pruned last block where it is, the head at the scored rows."""
    from torch.utils.flop_counter import FlopCounterMode

    from tuner.bench import model_flops
    from tuner.losses import MaskedItemObjective

    cfg = Bert4RecConfig(num_items=300, hidden=32, layers=3, heads=2, ffn=128, max_len=16, attention="math",
                         prune_last_layer=prune)
    objective = MaskedItemObjective(Bert4Rec(cfg), "ce")
    positions = torch.tensor([1, 5, 17, 30, 40, 63])
    with FlopCounterMode(display=False) as counter:
        objective(torch.randint(1, 301, (4, 16)), positions, torch.randint(1, 301, (6,)))
    assert counter.get_total_flops() == pytest.approx(model_flops(cfg, 4, 16, 6) / 3, rel=1e-3)
