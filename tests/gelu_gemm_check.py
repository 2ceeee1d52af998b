"""Run under TRITON_INTERPRET=1 by tests/test_gelu_gemm.py: `tuner.model.gelu_gemm`'s GEMMs with
GELU epilogues on CPU tensors against float64 PyTorch; prints one JSON object of relative errors
and facts. With `--cuda` (no interpreter) it checks the compiled kernels at the 430M and 130M
feed-forward shapes in bf16 on a GPU instead, and the model on the kernels under inductor."""

import json
import sys

import torch
import torch.nn.functional as F

from tests.triton_helpers import compare_models, rel
from tuner.model import gelu_gemm as gg
from tuner.model.bert4rec import Bert4Rec, Bert4RecConfig


def case(rows, hidden, ffn, dtype, seed=0, device="cpu"):
    """The op's output and its four gradients against float64 PyTorch, and against PyTorch's own
    computation in the op's dtype (`F.gelu(F.linear(...))` and its autograd), whose roundings the
    kernels copy."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=g).to(device, dtype).requires_grad_()
    up_w = (torch.randn(ffn, hidden, generator=g) / hidden ** 0.5).to(device, dtype).requires_grad_()
    up_b = (0.5 * torch.randn(ffn, generator=g)).to(device, dtype).requires_grad_()
    down_w = (torch.randn(hidden, ffn, generator=g) / ffn ** 0.5).to(device, dtype).requires_grad_()
    leaves = (x, up_w, up_b, down_w)
    out, pre, act = gg.gelu_ffn(*leaves)
    grad = torch.randn(out.shape, generator=g).to(device, dtype)
    got = torch.autograd.grad(out, leaves, grad)
    wide = [t.detach().double().requires_grad_() for t in leaves]
    out64 = F.linear(F.gelu(F.linear(wide[0], wide[1], wide[2])), wide[3])
    want = torch.autograd.grad(out64, wide, grad.double())
    same = [t.detach().requires_grad_() for t in leaves]  # PyTorch in the op's dtype
    out_same = F.linear(F.gelu(F.linear(same[0], same[1], same[2])), same[3])
    want_same = torch.autograd.grad(out_same, same, grad)
    names = ("x", "up_weight", "up_bias", "down_weight")
    return {"out": rel(out, out64), "out_vs_same_dtype": rel(out, out_same),
            "act": rel(act, F.gelu(pre.double())), "shapes": [list(pre.shape), list(act.shape)],
            "grads": {n: rel(a, b) for n, a, b in zip(names, got, want)},
            "grads_vs_same_dtype": {n: rel(a, b) for n, a, b in zip(names, got, want_same)},
            "grad_dtypes": [str(t.dtype) for t in got]}


def model_case(device="cpu", backend="aot_eager", fused_add_norm=False):
    """Bert4Rec with `fused_ffn` against the same weights without, no dropout: the same hidden
    states and gradients, eagerly and compiled (fullgraph), with the kernels run both ways; with
    `fused_add_norm` through `FeedForward.branch` (add_norm adds the bias), else `forward`."""
    cfg = dict(num_items=40, max_len=20, hidden=32, layers=2, heads=2, ffn=64, dropout=0.0, attn_dropout=0.0,
               attention="math", fused_add_norm=fused_add_norm)
    torch.manual_seed(0)
    ours = Bert4Rec(Bert4RecConfig(**cfg, fused_ffn=True)).to(device)
    theirs = Bert4Rec(Bert4RecConfig(**cfg, fused_ffn=False)).to(device)
    theirs.load_state_dict(ours.state_dict())
    items = torch.randint(1, 41, (4, 20))
    items[1, :7] = 0
    return compare_models(ours, theirs, items.to(device), device, backend)


def main():
    if sys.argv[1:] == ["--cuda"]:  # on a GPU, compiled by Triton
        print(json.dumps({"bf16_430M": case(6400, 1024, 4096, torch.bfloat16, device="cuda"),
                          "bf16_130M": case(12800, 384, 1536, torch.bfloat16, seed=1, device="cuda"),
                          "model": model_case("cuda", "inductor"),
                          "model_add_norm": model_case("cuda", "inductor", fused_add_norm=True)}))
        return
    print(json.dumps({
        "fp32": case(37, 32, 48, torch.float32),  # rows and columns that are not whole tiles
        "fp16": case(40, 48, 64, torch.float16, seed=1),
        "model": model_case(),
        "model_add_norm": model_case(fused_add_norm=True),
    }))


if __name__ == "__main__":
    main()
