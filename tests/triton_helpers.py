"""Run a check script of the Triton kernels under Triton's interpreter, in a process of its own:
TRITON_INTERPRET must be set before the kernels are defined, so it cannot share pytest's."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def interpreted(script: str) -> dict:
    """The JSON object that tests/`script` prints last, run with TRITON_INTERPRET=1 on the CPU."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / script)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rel(a, b, floor=1e-30):
    """Largest difference over the reference's largest magnitude (at least `floor`)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=floor))


def excess_agreement(a, b) -> float:
    """How much more often two bool masks agree element by element than two independent masks of
    their kept shares would (0 for independent draws, about 0.375 at p = 0.25 for a copied mask):
    a kernel that repeats one draw across heads, rows or columns shows here, not in its kept share."""
    a, b = a.bool(), b.bool()
    ka, kb = float(a.float().mean()), float(b.float().mean())
    return float((a == b).float().mean()) - (ka * kb + (1 - ka) * (1 - kb))


def compare_models(ours, theirs, items, device, backend, rows=None):
    """`ours` (the kernels) against `theirs` (PyTorch's ops) with the same weights, eagerly and
    under torch.compile (fullgraph: no breaks), bf16 autocast on a GPU: per mode the hidden
    states' and the worst trainable gradient's relative error, how many gradients were compared,
    and the `tuner::` ops that ran (forward and backward). `rows`: both return those positions'
    hidden states alone (`Bert4Rec.forward`'s `rows`)."""
    import torch

    params = lambda model: [p for p in model.parameters() if p.requires_grad]  # noqa: E731
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda")
    out = {}
    for name, compile_it in (("eager", False), ("compiled", True)):
        fn = torch.compile(ours, backend=backend, fullgraph=True) if compile_it else ours
        if compile_it:  # compiling runs the ops on fake tensors: keep that out of the profile
            with autocast:
                fn(items, rows=rows)
        with torch.profiler.profile() as prof:
            with autocast:
                h = fn(items, rows=rows)
            g = torch.autograd.grad(h.float().square().sum(), params(ours), allow_unused=True)
        ops = sorted({e.name for e in prof.events() if e.name.startswith("tuner::")})
        with autocast:
            ref = theirs(items, rows=rows)
        rg = torch.autograd.grad(ref.float().square().sum(), params(theirs), allow_unused=True)
        pairs = [(a, b) for a, b in zip(g, rg) if b is not None]
        # floor: the key bias's true gradient is 0 (softmax ignores a shift), so its rounding has
        # no scale of its own; it is measured against the largest gradient's
        floor = 1e-6 * max(float(b.abs().max()) for _, b in pairs)
        out[name] = {"hidden": rel(h, ref), "grad": max(rel(a, b, floor=floor) for a, b in pairs if a is not None),
                     "ops": ops, "grads": len(pairs), "missing": sum(a is None for a, _ in pairs)}
    return out
