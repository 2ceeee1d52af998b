"""Run under TRITON_INTERPRET=1 by tests/test_add_norm.py: `tuner.model.add_norm`'s kernels on CPU
tensors against PyTorch with the kernels' own dropout mask; prints one JSON object of relative
errors and facts. With `--cuda` (no interpreter) it checks the compiled kernels at the 430M and
130M shapes on a GPU instead."""

import json
import sys

import torch
import torch.nn.functional as F

from tuner.model import add_norm as an
from tests.triton_helpers import compare_models, excess_agreement, rel
from tuner.model.bert4rec import Bert4Rec, Bert4RecConfig


def case(rows, hidden, dtype, p, seed=0, branch_dtype=None, grad_s=True, branch_bias=True, device="cpu"):
    """The op against float64 PyTorch with the kernels' mask: outputs and all four gradients."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=g).to(device, dtype).requires_grad_()
    branch = torch.randn(rows, hidden, generator=g).to(device, branch_dtype or dtype).requires_grad_()
    weight = (1 + 0.5 * torch.randn(hidden, generator=g)).to(device, dtype).requires_grad_()
    bias = (0.1 * torch.randn(hidden, generator=g)).to(device, dtype).requires_grad_()
    bb = (0.3 * torch.randn(hidden, generator=g)).to(device, dtype).requires_grad_() if branch_bias else None
    seed_t = torch.tensor([77 + seed], dtype=torch.int32, device=device)
    rate = torch.tensor(p, dtype=torch.float32, device=device)
    s, y = an.dropout_add_norm(x, branch, bb, weight, bias, seed_t, rate, p > 0, 1e-5)
    dy = torch.randn(y.shape, generator=g).to(device, y.dtype)
    ds = torch.randn(s.shape, generator=g).to(device, s.dtype)
    outputs, grads_in = ((s, y), (ds, dy)) if grad_s else ((y,), (dy,))
    inputs = (x, branch, weight, bias) + ((bb,) if branch_bias else ())
    got = torch.autograd.grad(outputs, inputs, grads_in)
    keep = an.keep_mask(seed_t, rows, hidden, p) if p > 0 else torch.ones(rows, hidden, dtype=torch.bool, device=device)
    ref_s, ref_y = an.reference(x.detach(), branch.detach(), bb.detach() if branch_bias else None, weight.detach(),
                                bias.detach(), keep, p, 1e-5)
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    full = leaves[1] + leaves[4] if branch_bias else leaves[1]
    s64 = leaves[0] + (torch.where(keep, full / (1 - p), 0.0) if p > 0 else full)
    y64 = F.layer_norm(s64, (hidden,), leaves[2], leaves[3], 1e-5)
    want = torch.autograd.grad((s64, y64) if grad_s else (y64,), leaves,
                               tuple(t.double() for t in grads_in))
    r = {"s": rel(s, ref_s), "y": rel(y, ref_y), "dtypes": [str(s.dtype), str(y.dtype)],
         "grads": {name: rel(a, b) for name, a, b in zip(("x", "branch", "weight", "bias", "branch_bias"), got, want)},
         "grad_dtypes": [str(t.dtype) for t in got]}
    if p > 0:
        r["kept_fraction"] = float(keep.float().mean())
        r["mask_repeats"] = bool(torch.equal(keep, an.keep_mask(seed_t, rows, hidden, p)))
        other = an.keep_mask(seed_t + 1, rows, hidden, p)
        r["mask_differs_by_seed"] = not torch.equal(keep, other)
        again = an.dropout_add_norm(x, branch, bb, weight, bias, seed_t, rate, p > 0, 1e-5)[0]
        r["forward_repeats"] = bool(torch.equal(s, again))
        # the dropped elements are the mask's: s - x is zero exactly there
        r["dropped_where_masked"] = bool(((s.float() - x.float()).abs() < 1e-6).eq(~keep).float().mean() > 0.99)
        # independent draws across rows, columns (one Philox call decides four) and seeds
        r["excess_agreement"] = {"rows": excess_agreement(keep[:-1], keep[1:]),
                                 "columns": excess_agreement(keep[:, :-1], keep[:, 1:]),
                                 "seeds": excess_agreement(keep, other)}
    r["branch_bias"] = branch_bias
    return r


def model_case(device="cpu", backend="aot_eager"):
    """Bert4Rec on the kernels against the same weights on PyTorch's ops, no dropout: the same
    hidden states and gradients, eagerly and compiled (fullgraph: no breaks), and the kernels ran
    both ways. On a GPU both run under bf16 autocast."""
    cfg = dict(num_items=40, max_len=20, hidden=32, layers=3, heads=2, ffn=64, dropout=0.0, attn_dropout=0.0,
               attention="math")
    torch.manual_seed(0)
    ours = Bert4Rec(Bert4RecConfig(**cfg, fused_add_norm=True)).to(device)
    theirs = Bert4Rec(Bert4RecConfig(**cfg, fused_add_norm=False)).to(device)
    for module in ours.modules():  # LayerNorms that are not the identity, so their gradients mean something
        if isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.normal_(module.weight, 1.0, 0.3)
            torch.nn.init.normal_(module.bias, 0.0, 0.3)
    theirs.load_state_dict(ours.state_dict())
    items = torch.randint(1, 41, (4, 20))
    items[1, :7] = 0
    items = items.to(device)
    out = compare_models(ours, theirs, items, device, backend)
    # training mode with dropout: the kernels draw a new mask per call (a new seed each time)
    ours.cfg.dropout = 0.3
    for block in ours.blocks:
        block.ffn.dropout.p = block.attn.resid_dropout.p = 0.3
    ours.train()
    first, second = ours(items), ours(items)
    out["dropout_changes_outputs"] = not torch.equal(first, second)
    ours.eval()
    out["eval_repeats"] = bool(torch.equal(ours(items), ours(items)))
    return out


def rows_case(device="cpu", backend="aot_eager"):
    """`forward(rows=...)` on the kernels with the last block pruned to those rows, against PyTorch's
    ops over every position, picked after: the same hidden states and gradients."""
    cfg = dict(num_items=40, max_len=20, hidden=32, layers=2, heads=2, ffn=64, dropout=0.0, attn_dropout=0.0,
               attention="math")
    torch.manual_seed(1)
    ours = Bert4Rec(Bert4RecConfig(**cfg, fused_add_norm=True, prune_last_layer=True)).to(device)
    theirs = Bert4Rec(Bert4RecConfig(**cfg, fused_add_norm=False, prune_last_layer=False)).to(device)
    theirs.load_state_dict(ours.state_dict())
    items = torch.randint(1, 41, (4, 20))
    items[2, :9] = 0
    rows = torch.tensor([3, 19, 22, 39, 45, 59, 60, 79]).to(device)
    return compare_models(ours, theirs, items.to(device), device, backend, rows=rows)


def cache_case():
    """Two trials' models on the kernels, dropout 0.1 and 0.3, each compiled by inductor for a
    training forward and backward on one fresh cache directory: the inductor cache hits and misses
    of the second (the kernels read the rate from a tensor, so the graph is the same)."""
    import os
    import tempfile

    from torch._dynamo.utils import counters

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp()
    items = torch.randint(1, 41, (4, 20))
    stats = {}
    for p in (0.1, 0.3):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = Bert4Rec(Bert4RecConfig(num_items=40, max_len=20, hidden=32, layers=2, heads=2, ffn=64, dropout=p,
                                        attn_dropout=0.0, attention="math", fused_add_norm=True)).train()
        torch.compile(model)(items).sum().backward()
        stats[p] = (counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"])
    return {"on_kernels": an.usable(model.item_emb(items)), "second_hits": stats[0.3][0],
            "second_misses": stats[0.3][1]}


def main():
    if sys.argv[1:] == ["--cuda"]:  # on a GPU, compiled by Triton: the 430M and 130M shapes
        print(json.dumps({"bf16_430M": case(6400, 1024, torch.bfloat16, 0.1, device="cuda"),
                          "bf16_130M": case(12800, 384, torch.bfloat16, 0.1, seed=1, device="cuda"),
                          "fp32_stream_430M": case(6400, 1024, torch.float32, 0.1, seed=2,
                                                   branch_dtype=torch.bfloat16, device="cuda"),
                          "model": model_case("cuda", "inductor"), "rows": rows_case("cuda", "inductor")}))
        return
    result = {
        "fp32": case(37, 32, torch.float32, 0.0),
        "fp32_dropout": case(64, 32, torch.float32, 0.25, seed=1),
        "fp16_dropout": case(23, 48, torch.float16, 0.1, seed=2),  # a width that is not a power of two
        "mixed_no_grad_s": case(19, 40, torch.float32, 0.2, seed=3, branch_dtype=torch.float16, grad_s=False),
        "no_branch_bias": case(21, 32, torch.float32, 0.2, seed=4, branch_bias=False),
        "model": model_case(),
        "rows": rows_case(),
        "cache": cache_case(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
