"""BERT4Rec: named sizes match their parameter counts, ids behave, attention ignores padding."""

import pytest
import torch

from tuner.model.bert4rec import Bert4Rec, Bert4RecConfig, count_parameters
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
