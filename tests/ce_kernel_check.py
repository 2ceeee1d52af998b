"""Check tuner.ce_kernel against the PyTorch cross-entropy it replaces; prints one JSON object.

Run by tests/test_ce_kernel.py under TRITON_INTERPRET=1 (CPU), or on a GPU with `--cuda`
(bf16 at the 430M step's shape: 1,280 rows, 159,752 columns).
"""

from __future__ import annotations

import json
import sys

import torch

from tuner.data.collate import IGNORE
from tuner.losses import LOSSES, LossConfig


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def compare(n: int, items: int, hidden: int, dtype: torch.dtype, device: str, loss: str = "ce",
            compiled: bool = False) -> dict:
    """The loss and its gradients (hidden, weight, bias) on the kernels and on PyTorch's code, with
    ignored rows, -inf bias columns and an unaligned catalog."""
    torch.manual_seed(0)
    h = torch.randn(n, hidden, device=device, dtype=dtype)
    # the tied head's layout: row 0 the padding row, with a -inf bias; item i at row i (head_offset)
    w = (torch.randn(items + 1, hidden, device=device) * 0.3).to(dtype)
    b = torch.randn(items + 1, device=device).to(dtype)
    b[0] = float("-inf")
    labels = torch.randint(1, items + 1, (n,), device=device)
    labels[::5] = IGNORE  # ignored rows (padding slots): no loss, no gradient
    fn = LOSSES[loss]
    results = {}
    for kernel in ("auto", "torch"):
        cfg = LossConfig(name=loss, kernel=kernel, align=8, head_offset=1)
        hh, ww, bb = (t.clone().requires_grad_() for t in (h, w, b))
        run = torch.compile(fn, fullgraph=True) if compiled else fn
        out = run(hh, ww, bb, labels, cfg)
        out.backward()
        results[kernel] = (out.detach(), hh.grad, ww.grad, bb.grad)
    (lk, hk, wk, bk), (lt, ht, wt, bt) = results["auto"], results["torch"]
    finite = torch.isfinite(bt)
    return {"loss": _rel(lk, lt), "grad_hidden": _rel(hk, ht), "grad_weight": _rel(wk, wt),
            "grad_bias": _rel(bk[finite], bt[finite]), "padding_bias_grad": float(bk[0].float().abs()),
            "ignored_rows_grad": float(hk[labels == IGNORE].float().abs().max()),
            "loss_value": float(lt)}


def rows_against_float64(device: str, n: int = 70, v: int = 300) -> dict:
    """The op's rows against float64 arithmetic on the same fp32 logits, which come with padded
    rows (inductor pads a GEMM's output rows; the op takes them as they are)."""
    from tuner.ce_kernel import catalog_ce

    torch.manual_seed(1)
    logits = (torch.randn(n, v + 20, device=device) * 4)[:, :v]
    bias = torch.randn(v, device=device)
    bias[-5:] = float("-inf")
    target = torch.randint(0, v - 5, (n,), device=device)
    rows, lse = catalog_ce(logits, bias, target)
    full = logits.double() + bias.double()
    ref_lse = torch.logsumexp(full, 1)
    ref = ref_lse - full.gather(1, target[:, None]).squeeze(1)
    return {"rows": _rel(rows, ref), "lse": _rel(lse, ref_lse)}


def ops_traced(device: str) -> list[str]:
    """The custom ops a compiled `ce` forward and backward call."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    backend = AotEagerAndRecordGraphs()
    h = torch.randn(20, 16, device=device, requires_grad=True)
    w = torch.randn(50, 16, device=device, requires_grad=True)
    b = torch.zeros(50, device=device, requires_grad=True)
    labels = torch.randint(1, 50, (20,), device=device)
    torch.compile(LOSSES["ce"], backend=backend, fullgraph=True)(h, w, b, labels, LossConfig(kernel="auto")).backward()
    names = []
    for graph in backend.fw_graphs + backend.bw_graphs:
        names += [str(node.target) for node in graph.graph.nodes
                  if node.op == "call_function" and str(node.target).startswith("tuner.")]
    return names


def main() -> None:
    if "--cuda" in sys.argv:
        out = {"device": torch.cuda.get_device_name(),
               "bf16_430M_shape": compare(1280, 159_750, 1024, torch.bfloat16, "cuda"),
               "bf16_430M_shape_compiled": compare(1280, 159_750, 1024, torch.bfloat16, "cuda", compiled=True)}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out["autocast_fp32_inputs"] = compare(300, 5000, 64, torch.float32, "cuda")
        print(json.dumps(out))
        return
    from tuner import ce_kernel

    default = dict(ce_kernel.FORWARD), dict(ce_kernel.BACKWARD)
    # the other design the launch settings choose: one forward program per row, no split to
    # combine, and one backward tile per program, without pipelined loops (session 14's kernels)
    ce_kernel.FORWARD.update(BLOCK_R=1, SPLIT=1, STAGES=1)
    ce_kernel.BACKWARD.update(COLUMN_PROGRAMS=0, STAGES=1)
    unsplit = {"float64": rows_against_float64("cpu"), "fp32": compare(70, 300, 16, torch.float32, "cpu")}
    ce_kernel.FORWARD.update(default[0])
    ce_kernel.BACKWARD.update(default[1])
    out = {"float64": rows_against_float64("cpu"), "float64_unsplit": unsplit["float64"],
           "fp32_unsplit": unsplit["fp32"],
           # fewer rows than a program takes and fewer columns than one block: most programs of
           # the split forward and the backward find nothing to do
           "float64_tiny": rows_against_float64("cpu", 3, 37), "fp32_tiny": compare(3, 37, 8, torch.float32, "cpu"),
           "fp32": compare(70, 300, 16, torch.float32, "cpu"),
           "bf16": compare(70, 300, 16, torch.bfloat16, "cpu"),
           "focal_fp32": compare(70, 300, 16, torch.float32, "cpu", loss="focal"),
           "compiled_fp32": compare(70, 300, 16, torch.float32, "cpu", compiled=True),
           "ops": ops_traced("cpu")}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
