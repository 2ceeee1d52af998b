"""Run under TRITON_INTERPRET=1 by tests/test_cce_kernel.py: the Triton cut cross-entropy kernels on
CPU tensors against the chunked PyTorch reference; prints one JSON object of relative errors."""

import json

import torch

from tuner import cce_kernel
from tuner.data.collate import IGNORE
from tuner.losses import ChunkedCrossEntropy, ChunkedLogSumExp, LossConfig, cut_ce, cut_sampled_ce


def rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def op_case(n, v, h, dtype, chunk, seed):
    """cut_ce_rows (both modes) against the reference, with ignored rows and weighted rows."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, h, generator=g) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(v, h, generator=g) * 0.3).to(dtype).requires_grad_()
    b = (torch.randn(v, generator=g) * 0.1).to(dtype).requires_grad_()
    index = torch.randint(0, v, (n,), generator=g)
    index[::5] = -1
    scale = torch.linspace(0.5, 1.5, n)
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    out = {}
    rows, lse = cce_kernel.cut_ce_rows(x, w, b, index, chunk, True)
    ref = ChunkedCrossEntropy.apply(xr, wr, br, index, 64)
    grads = torch.autograd.grad((rows * scale).sum(), (x, w, b))
    ref_grads = torch.autograd.grad((ref * scale.double()).sum(), (xr, wr, br))
    out["rows"] = rel(rows, ref)
    out["ignored_rows_zero"] = bool((rows[index < 0] == 0).all())
    out["lse"] = rel(lse, torch.logsumexp(xr.detach() @ wr.detach().t() + br.detach(), 1))
    for name, a, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        out["grad_" + name] = rel(a, r)
    lse_only, _ = cce_kernel.cut_ce_rows(x, w, b, index, chunk, False)
    ref_lse = ChunkedLogSumExp.apply(xr, wr, br, 64)
    grads = torch.autograd.grad((lse_only * scale).sum(), (x, w, b))
    ref_grads = torch.autograd.grad((ref_lse * scale.double()).sum(), (xr, wr, br))
    out["lse_only"] = rel(lse_only, ref_lse)
    out["lse_only_grad"] = max(rel(a, r) for a, r in zip(grads, ref_grads))
    return out


def loss_case(compile_it):
    """The `cce` and `cce_sampled` losses route fp16 inputs to the kernels, also under torch.compile."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(48, 32, generator=g) * 0.5).half().requires_grad_()
    w = (torch.randn(500, 32, generator=g) * 0.3).half().requires_grad_()
    b = torch.zeros(500).half().requires_grad_()
    labels = torch.randint(1, 501, (48,), generator=g)
    labels[-6:] = IGNORE
    out = {}
    for name, fn in (("cce", cut_ce), ("cce_sampled", cut_sampled_ce)):
        kernel_cfg = LossConfig(name=name, chunk=96, num_negatives=64)
        torch_cfg = LossConfig(name=name, chunk=96, num_negatives=64, kernel="torch")
        call = torch.compile(fn, backend="aot_eager") if compile_it else fn
        torch.manual_seed(0)  # same negatives for both
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            kernel = call(x, w, b, labels, kernel_cfg)
            kgrad = torch.autograd.grad(kernel, (x, w))
        ops = {event.name for event in prof.events()}
        out[name + "_ops"] = sorted(op for op in ops if op.startswith("tuner::"))
        torch.manual_seed(0)
        ref = fn(x.float(), w.float(), b.float(), labels, torch_cfg)
        rgrad = torch.autograd.grad(ref, (x, w))
        out[name] = rel(kernel, ref)
        out[name + "_grad"] = max(rel(a, r) for a, r in zip(kgrad, rgrad))
    return out


if __name__ == "__main__":
    cce_kernel.BLOCK_BYTES = 0  # keep the chunks asked for, so the tiny cases take several
    result = {
        "preload_fp16": op_case(50, 300, 32, torch.float16, chunk=64, seed=0),  # H <= 256: one K tile
        "kloop_fp16": op_case(20, 200, 300, torch.float16, chunk=77, seed=1),  # H > 256: K loop
        "fp32": op_case(37, 129, 48, torch.float32, chunk=1000, seed=2),  # one chunk larger than V
        "loss": loss_case(compile_it=False),
        "loss_compiled": loss_case(compile_it=True),
    }
    cce_kernel.BLOCK_BYTES = 40 * 2 * 256  # widens chunk 64 to 256 items at 40 fp16 rows: 3 chunks of 700
    result["widened_fp16"] = op_case(40, 700, 32, torch.float16, chunk=64, seed=4)
    print(json.dumps(result))
