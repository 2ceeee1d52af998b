"""How the package's Triton kernels become PyTorch ops (`tuner.model.short_attention`,
`tuner.model.add_norm`).

On a GPU an op is a `torch.library.triton_op`: under `torch.compile` inductor traces into it, sees
the Triton kernels (`launch` wraps them with `wrap_triton`) and launches them from its generated
code as it launches its own, a few microseconds each. As opaque `custom_op`s every call went
through Python and Triton's launcher instead, 0.1-0.3 ms of host time per call, which plain
compile (no CUDA graphs, the service's default) paid on every layer of every step
(benchmarks/results/gpu_throughput_host_130M.json).

Under Triton's interpreter (`TRITON_INTERPRET=1`, how the CPU tests run the kernels) kernels
cannot be traced, so there the ops are opaque `custom_op`s and `fake` registers their fake
implementations; the `--cuda` check scripts in tests/ exercise the traced ops on a GPU.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch.library import triton_op, wrap_triton

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"  # read once: torch.compile traces code that asks


def op(name: str) -> Callable:
    """Decorator: the function (a body of torch ops and `launch(kernel)[grid](...)` calls) as the
    op `name`, with no mutated arguments."""
    if INTERPRETING:
        return torch.library.custom_op(name, mutates_args=())
    return triton_op(name, mutates_args=())


def launch(kernel):
    """`kernel` as an op body calls it: traced by inductor on a GPU, called as is under the interpreter."""
    return kernel if INTERPRETING else wrap_triton(kernel)


def fake(op_def) -> Callable:
    """Decorator: `op_def`'s fake implementation, registered where ops are opaque (the
    interpreter); a traced op's fake is its own body."""
    def register(fn: Callable) -> Callable:
        if INTERPRETING:
            op_def.register_fake(fn)
        return fn
    return register
