"""AdamW's update as one Triton kernel launch per parameter group.

The update is bound by memory traffic: for each fp32 parameter it reads the parameter, its
gradient and both moments and writes three of them back, 28 bytes. At 430M (265M parameters)
PyTorch's fused AdamW moves those bytes at about 2.3 TB/s on an H100
(benchmarks/results/profile_430M_amp_compile.txt). This kernel makes the same update with wide
blocks over every tensor of a group in one launch. Each block looks up its tensor's addresses
in a small table, so tensors of any sizes share the launch.

The arithmetic is PyTorch's fused AdamW's, in the same order (decoupled weight decay, moments,
bias corrections), so the two agree to fp32 rounding. The state is kept as `torch.optim.AdamW`
keeps it (`step`, `exp_avg`, `exp_avg_sq` per parameter), so checkpoints move freely between
the two. `grad_scale` (a tensor the gradients are divided by, as the fused AdamW takes it) carries
the clipping factor of `optim.fused_clip`.

Used for fp32 CUDA parameters with dense, contiguous gradients; anything else takes PyTorch's
own step. The kernel also runs on CPU tensors under Triton's interpreter (the tests).
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton comes with CUDA builds of torch
    triton = None

BLOCK = 4096  # elements per program: 16 KB of each of the four streams


def available(param: torch.Tensor) -> bool:
    """True when the kernel can update `param`: CUDA (or Triton's interpreter), fp32."""
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    return triton is not None and (param.is_cuda or interpreting) and param.dtype == torch.float32


if triton is not None:

    @triton.jit
    def _adamw_kernel(fixed_ptr, grads_ptr, numel_ptr, block_tensor_ptr, block_start_ptr, scale_ptr,
                      lr, weight_decay, beta1, beta2, eps, step_size, bias_correction2_sqrt,
                      HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        tensor = tl.load(block_tensor_ptr + pid).to(tl.int64)
        start = tl.load(block_start_ptr + pid)
        numel = tl.load(numel_ptr + tensor)
        param_ptr = tl.load(fixed_ptr + 3 * tensor).to(tl.pointer_type(tl.float32))
        exp_avg_ptr = tl.load(fixed_ptr + 3 * tensor + 1).to(tl.pointer_type(tl.float32))
        exp_avg_sq_ptr = tl.load(fixed_ptr + 3 * tensor + 2).to(tl.pointer_type(tl.float32))
        grad_ptr = tl.load(grads_ptr + tensor).to(tl.pointer_type(tl.float32))
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < numel
        param = tl.load(param_ptr + offsets, mask=mask)
        grad = tl.load(grad_ptr + offsets, mask=mask)
        exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask)
        exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask)
        if HAS_SCALE:
            grad = grad / tl.load(scale_ptr)
        param = param - lr * weight_decay * param
        exp_avg = beta1 * exp_avg + (1 - beta1) * grad
        exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
        denom = tl.sqrt(exp_avg_sq) / bias_correction2_sqrt + eps
        param = param - step_size * exp_avg / denom
        tl.store(param_ptr + offsets, param, mask=mask)
        tl.store(exp_avg_ptr + offsets, exp_avg, mask=mask)
        tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq, mask=mask)


class _GroupPlan:
    """The address table and block map of one parameter group (built once; the moments and
    parameters never move, only the gradients do)."""

    def __init__(self, params: list[torch.Tensor], states: list[dict], device: torch.device):
        addresses = [[p.data_ptr(), s["exp_avg"].data_ptr(), s["exp_avg_sq"].data_ptr()] for p, s in zip(params, states)]
        self.fixed = torch.tensor(addresses, dtype=torch.int64).to(device)
        self.numel = torch.tensor([p.numel() for p in params], dtype=torch.int64).to(device)
        blocks = [(i, start) for i, p in enumerate(params) for start in range(0, p.numel(), BLOCK)]
        self.block_tensor = torch.tensor([i for i, _ in blocks], dtype=torch.int32).to(device)
        self.block_start = torch.tensor([s for _, s in blocks], dtype=torch.int64).to(device)
        self.key = tuple(addresses)


class TritonAdamW(torch.optim.AdamW):
    """`torch.optim.AdamW` whose step runs the Triton kernel where it can (see the module doc)."""

    def __init__(self, params, **kwargs):
        kwargs.pop("fused", None)
        super().__init__(params, **kwargs)
        self.grad_scale: Optional[torch.Tensor] = None  # set per step by TrainStep (fused clipping)
        self._plans: dict[int, _GroupPlan] = {}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if not self._fits(group, params):
                self._torch_step(group)
                continue
            self._kernel_step(index, group, params)
        return loss

    def _fits(self, group: dict, params: list[torch.Tensor]) -> bool:
        return (not group["amsgrad"] and not group["maximize"] and not torch.is_complex(params[0])
                and not isinstance(group["lr"], torch.Tensor)
                and all(available(p) and p.is_contiguous() and not p.grad.is_sparse and p.grad.is_contiguous()
                        and p.grad.dtype == p.dtype and p.device == params[0].device for p in params))

    def _torch_step(self, group: dict) -> None:
        """PyTorch's own AdamW step for one group (the gradients divided by grad_scale first)."""
        if self.grad_scale is not None:
            torch._foreach_div_([p.grad for p in group["params"] if p.grad is not None], self.grad_scale)
        saved, self.param_groups = self.param_groups, [group]
        try:
            super().step()
        finally:
            self.param_groups = saved

    def _kernel_step(self, index: int, group: dict, params: list[torch.Tensor]) -> None:
        states = [self._state(p) for p in params]
        plan = self._plans.get(index)
        if plan is None or plan.key != tuple((p.data_ptr(), s["exp_avg"].data_ptr(), s["exp_avg_sq"].data_ptr())
                                             for p, s in zip(params, states)):
            plan = self._plans[index] = _GroupPlan(params, states, params[0].device)
        grads = torch.tensor([p.grad.data_ptr() for p in params], dtype=torch.int64)
        if params[0].is_cuda:
            grads = grads.pin_memory().to(params[0].device, non_blocking=True)
        steps = [state["step"] for state in states]
        torch._foreach_add_(steps, 1)
        step = float(steps[0])  # every parameter of a group steps together
        beta1, beta2 = group["betas"]
        scale = self.grad_scale
        _adamw_kernel[(plan.block_tensor.numel(),)](
            plan.fixed, grads, plan.numel, plan.block_tensor, plan.block_start,
            scale if scale is not None else plan.numel,
            group["lr"], group["weight_decay"], beta1, beta2, group["eps"],
            group["lr"] / (1 - beta1 ** step), math.sqrt(1 - beta2 ** step),
            HAS_SCALE=scale is not None, BLOCK=BLOCK, num_warps=8)

    def _state(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0)  # on the host: the kernel takes the bias corrections as numbers
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        elif state["step"].device.type != "cpu":  # loaded from the fused AdamW, which keeps it on the GPU
            state["step"] = state["step"].cpu()
        return state
