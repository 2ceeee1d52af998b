"""Run under TRITON_INTERPRET=1 by tests/test_short_attention.py: the Triton short-sequence attention
kernels on CPU tensors against PyTorch attention with the kernels' own dropout mask; prints one JSON
object of relative errors and facts. With `--cuda` (no interpreter) it checks the compiled kernels
at the seed's shapes on a GPU instead."""

import json
import sys

import torch

from tuner.model import short_attention as sa
from tuner.model import tiled_attention as ta
from tests.triton_helpers import compare_models, excess_agreement, rel
from tuner.model.bert4rec import Bert4Rec, Bert4RecConfig


def reference(qkv, keep, mask, heads, p):
    """Attention in float64 with the given dropout mask (bool [B, heads, L, L] or None)."""
    batch, length, width = qkv.shape
    split = lambda t: t.view(batch, length, heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = (split(t) for t in qkv.double().chunk(3, dim=-1))
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num()  # a sequence of padding only: zeros
    if mask is not None:
        probs = probs * mask / (1 - p)
    return (probs @ v).transpose(1, 2).reshape(batch, length, width // 3)


def case(batch, length, heads, head_dim, dtype, p, seed=0, device="cpu"):
    """The model's entry (`attend`: the one-program kernels up to 128 positions, the tiled ones
    beyond) against float64 attention with the kernels' own dropout mask."""
    g = torch.Generator().manual_seed(seed)
    width = 3 * heads * head_dim
    # a strided view, as the fused projection's output is when the model pads it: the kernels
    # read the strides they are given
    qkv = torch.randn(batch, length, width + 8, generator=g).to(device)[..., :width].to(dtype).requires_grad_()
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    lengths[0] = 0  # a sequence of padding only
    lengths[-1] = length
    keep = (torch.arange(length)[None, :] >= (length - lengths)[:, None]).to(device)
    seed_t = torch.tensor([1234 + seed], dtype=torch.int32, device=device)
    rate = torch.tensor(p, dtype=torch.float32, device=device)
    out = sa.attend(qkv, keep, seed_t, rate, heads, p > 0)
    grad = torch.randn(out.shape, generator=g).to(device, dtype)
    (dqkv,) = torch.autograd.grad(out, qkv, grad)
    mask = sa.dropout_keep_mask(seed_t, batch, heads, length, p) if p > 0 else None
    ref_in = qkv.detach().double().requires_grad_()
    ref = reference(ref_in, keep, mask, heads, p)
    (ref_grad,) = torch.autograd.grad(ref, ref_in, grad.double())
    r = {"out": rel(out, ref), "grad": rel(dqkv, ref_grad),
         "padding_only_zero": bool((out[0] == 0).all() and (dqkv[0] == 0).all())}
    if mask is not None:
        real = keep[:, None, :, None] & keep[:, None, None, :]
        r["kept_fraction"] = float(mask[real.expand_as(mask)].float().mean())
        r["weights"] = int(real.expand_as(mask).sum())
        again = sa.dropout_keep_mask(seed_t, batch, heads, length, p)
        other = sa.dropout_keep_mask(seed_t + 1, batch, heads, length, p)
        r["mask_repeats"] = bool(torch.equal(mask, again))
        r["mask_differs_by_seed"] = not torch.equal(mask, other)
        again_out = sa.attend(qkv, keep, seed_t, rate, heads, p > 0)
        r["forward_repeats"] = bool(torch.equal(out, again_out))
        # independent draws across the batch, the heads, the query rows, the key columns and seeds
        r["excess_agreement"] = {
            "batch": excess_agreement(mask[0], mask[1]),
            "heads": excess_agreement(mask[:, 0], mask[:, -1]) if heads > 1 else 0.0,
            "rows": excess_agreement(mask[..., :-1, :], mask[..., 1:, :]),
            "columns": excess_agreement(mask[..., :-1], mask[..., 1:]),
            "seeds": excess_agreement(mask, other)}
    return r


def model_case(device="cpu", backend="aot_eager", reference="math", ilora=False, length=20):
    """Bert4Rec with attention=triton against an SDPA kernel, weights shared, no dropout: the
    same hidden states and gradients, eagerly and under torch.compile (fullgraph: no breaks). On
    a GPU both run under bf16 autocast. `ilora`: with iLoRA experts on the projections, which
    run one by one (the kernel gets their outputs concatenated). `length` over 128: the tiled
    kernels."""
    cfg = dict(num_items=40, max_len=length, hidden=32, layers=2, heads=2, ffn=64, dropout=0.0, attn_dropout=0.0,
               fused_add_norm=False)  # add_norm has its own check
    torch.manual_seed(0)
    ours = Bert4Rec(Bert4RecConfig(**cfg, attention="triton")).to(device)
    theirs = Bert4Rec(Bert4RecConfig(**cfg, attention=reference)).to(device)
    if ilora:
        from tuner.model.ilora import IloraSpec, apply_ilora

        spec = IloraSpec(rank=4, experts=2, dropout=0.0)
        apply_ilora(ours, spec)
        apply_ilora(theirs, spec)
        for name, param in ours.named_parameters():
            if "lora_B" in name:  # zero at the start: give the experts a say in the outputs
                torch.nn.init.normal_(param, std=0.5)
    theirs.load_state_dict(ours.state_dict())
    items = torch.randint(1, 41, (4, length))
    items[1, :7] = 0
    items[2, :length - 1] = 0
    items = items.to(device)
    return compare_models(ours, theirs, items, device, backend)


def export_case():
    """`export_scorer` exports the model on SDPA (no custom op in the graph) even where the
    kernels would run, and the exported scores match the model's."""
    from tuner.export import export_scorer

    torch.manual_seed(0)
    model = Bert4Rec(Bert4RecConfig(num_items=40, max_len=20, hidden=32, layers=2, heads=2, ffn=64,
                                    attention="triton")).eval()
    items = torch.randint(1, 41, (3, 20))
    items[1, :5] = 0
    with torch.profiler.profile() as prof:
        hidden = model(items)
    program = export_scorer(model)
    graph_ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    weight, bias = model.output_embedding()
    return {"eager_ops": sorted({e.name for e in prof.events() if e.name.startswith("tuner::")}),
            "exported_custom_ops": sorted(op for op in graph_ops if "tuner" in op),
            "exported_sdpa": any("scaled_dot_product" in op for op in graph_ops),
            "scores": rel(program.module()(items), hidden[:, -1] @ weight.t() + bias)}


def cache_case(length=16):
    """Two trials that differ only in `model.attn_dropout`, each compiled by inductor in a fresh
    dynamo state on one on-disk cache: the second loads the first one's forward and backward
    (the kernels read the rate from a buffer, so it is no constant of the graph). Returns the
    second trial's cache counters and the `tuner::` ops that its second step ran (after the
    compile, whose tracing calls the ops too)."""
    import os
    import tempfile

    from torch._dynamo.utils import counters

    from tests.test_rate_dropout import compiled_step

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
    ops = []
    for rate in (0.1, 0.3):
        torch._dynamo.reset()
        counters.clear()
        step = compiled_step("model.attention=triton", f"model.attn_dropout={rate}", length=length)
        step()  # compiles, or loads the compiled graphs
        with torch.profiler.profile() as prof:
            step()
        ops = sorted({e.name for e in prof.events() if e.name.startswith("tuner::") and "attention" in e.name})
    return {"hits": counters["inductor"]["fxgraph_cache_hit"], "misses": counters["inductor"]["fxgraph_cache_miss"],
            "ops": ops}


def mixed_tiles_case():
    """`case` with the forward, dQ and dK/dV kernels each on other tiles than LAUNCH's."""
    default = ta.LAUNCH
    ta.LAUNCH = {"forward": (64, 32, 4), "dq": (32, 64, 4), "dkdv": (64, 64, 4)}
    try:
        return case(3, 150, 2, 16, torch.float32, 0.25, seed=4)
    finally:
        ta.LAUNCH = default


def main():
    if sys.argv[1:] == ["--cuda"]:  # on a GPU, compiled by Triton: the seed's shapes in bf16 and fp16
        print(json.dumps({"bf16_430M": case(128, 50, 16, 64, torch.bfloat16, 0.1, device="cuda"),
                          "fp16_130M": case(256, 50, 6, 64, torch.float16, 0.1, seed=1, device="cuda"),
                          "model": model_case("cuda", "inductor", "efficient"),
                          # benchmarks/ml1m.yaml's shape: the tiled kernels
                          "bf16_ml1m_tiled": case(128, 200, 4, 64, torch.bfloat16, 0.1, seed=2, device="cuda"),
                          # past 256 positions: tiled_attention.LAUNCHES's second setting
                          "bf16_512_tiled": case(16, 512, 4, 64, torch.bfloat16, 0.1, seed=2, device="cuda"),
                          "model_tiled": model_case("cuda", "inductor", "efficient", length=200)}))
        return
    result = {
        "fp32": case(3, 50, 2, 16, torch.float32, 0.0),
        "fp32_dropout": case(3, 50, 2, 16, torch.float32, 0.25, seed=1),
        "fp16_dropout": case(2, 37, 2, 32, torch.float16, 0.1, seed=2),
        "short": case(2, 9, 1, 16, torch.float32, 0.1, seed=3),
        "model": model_case(),
        "model_ilora": model_case(ilora=True),
        "export": export_case(),
        "cache": cache_case(),
        # over 128 positions: the tiled kernels
        "tiled_fp32": case(3, 150, 2, 16, torch.float32, 0.0),
        "tiled_fp32_dropout": case(3, 200, 2, 16, torch.float32, 0.25, seed=1),
        "tiled_fp16_dropout": case(2, 131, 2, 32, torch.float16, 0.1, seed=2),
        # each kernel on its own tiles: the mask (keep_mask's, on 64-position tiles) is the same
        "tiled_mixed_tiles": mixed_tiles_case(),
        "tiled_model": model_case(length=140),
        "tiled_cache": cache_case(length=140),
        # which lengths the kernels take (a 16-wide head of a [1, L, 96] projection)
        "usable": {length: sa.usable(torch.empty(1, length, 96), 16) for length in (128, 129, 512, 513)},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
