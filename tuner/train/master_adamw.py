"""AdamW over bf16 weights that keeps fp32 master copies (`train.weights=bf16`).

The model's trainable weights are stored in bf16, so autocast uses them as they are: no per-step
cast of every weight to bf16 in the forward, and no cast of every bf16 weight gradient back to fp32
in the backward. The gradients stay bf16 (half the bytes to clip and read). The optimizer keeps,
per weight, an fp32 master copy and fp32 moments, updates the master exactly as `torch.optim.AdamW`
updates an fp32 weight from the same gradient, and writes the master's bf16 rounding back into the
model, so updates too small for bf16 still accumulate (the scheme of Micikevicius et al., "Mixed
Precision Training", 2018, and Megatron-LM's bf16 training).

Bytes per weight and step: about 30 (read the bf16 gradient twice, for the norm and the update;
read and write the fp32 master and moments; write the bf16 weight) against about 44 with fp32
weights under autocast (two casts, an fp32 gradient, the fused AdamW). Memory per weight: 2 + 4 + 8
bytes of weights and moments and 2 of gradient, against 4 + 8 and 4. Split masters (below) make
it 28 bytes per step and 2 + 2 + 8 bytes of memory.

`moments_dtype=torch.bfloat16` (`optim.moments=bf16`) keeps the two moments in bf16: 26 bytes per
weight and step instead of 34 with the masters. The update still runs in fp32; each new moment
is written back with stochastic rounding (`round_to_bf16`), because round-to-nearest would stall
the second moment: at beta2 = 0.999 a step moves it by 0.1% of the gap to g^2, under bf16's
relative spacing of 0.4-0.8%, so once it is within a factor of about 3 of g^2 it stops moving
(tests/test_master_adamw.py shows the stall and its absence).

`split_masters=True` (`optim.masters=split`, the default) stores each master as the bf16 weight
plus the 16 low bits of its fp32 pattern (int16): the fp32 master is exactly
`(weight bits << 16) + low` (`join_master`), with the weight rounded half away from zero
(`split_master`) so the split can be undone. Same arithmetic, same masters; 2 bytes less per
weight of memory and of writes each step (the weight is written anyway). Weights differ from
round-to-nearest-even only where a master lies exactly halfway between two bf16 values.

The update is written with foreach ops. With `compile=True` (CUDA) torch.compile fuses them into a
few horizontal kernels, one pass over each tensor; the learning rate and step counts live in
tensors, so a scheduler that changes the lr every step does not recompile. Gradient clipping uses
the fused AdamW's hook: a `grad_scale` tensor the gradients are divided by.
"""

from __future__ import annotations

from typing import Optional

import torch

# what each weight's optimizer state holds besides "step" (a 0-d float tensor, as in the fused
# AdamW): the fp32 master and the two moments (fp32 or bf16)
_MOMENTS = ("exp_avg", "exp_avg_sq")


def round_to_bf16(values: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp32 -> bf16 with stochastic rounding: up to the next bf16 value (in magnitude) with
    probability equal to the distance covered, so the rounding is exact in expectation. A random
    16-bit integer (`noise`, int32 in [0, 2^16), drawn here if not given) is added to the fp32 bits,
    then the low 16 bits are dropped (bf16 is fp32's top half)."""
    bits = values.view(torch.int32)
    if noise is None:
        noise = torch.randint_like(bits, 0, 1 << 16)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def split_master(master: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 -> (bf16 weight rounded half away from zero, int16 low bits), exactly invertible by
    `join_master`: adding 0x8000 to the bits carries into the top half where the low half is
    0x8000 or more, which is also what `join_master` subtracts back."""
    bits = master.view(torch.int32)
    return ((bits + 0x8000) >> 16).to(torch.int16).view(torch.bfloat16), bits.to(torch.int16)


def join_master(weight: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """(bf16 weight, int16 low bits) -> the fp32 master they split: the low half's sign extension
    takes back the carry `split_master` rounded into the weight."""
    return ((weight.view(torch.int16).to(torch.int32) << 16) + low.to(torch.int32)).view(torch.float32)


def adamw_update(weights: list[torch.Tensor], grads: list[torch.Tensor], masters: list[torch.Tensor],
                 exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor],
                 lrs: list[torch.Tensor], weight_decays: list[torch.Tensor], grad_scale: Optional[torch.Tensor],
                 beta1: float, beta2: float, eps: float) -> None:
    """One AdamW step on the fp32 `masters` from `grads` (any float dtype, divided by
    `grad_scale` if given), then `weights` <- masters (cast to the weights' dtype). In place.
    Per tensor: its step count, learning rate and weight decay (0-d tensors). The moments are
    all fp32 or all bf16 (computed in fp32, stored with `round_to_bf16`). int16 `masters` are the
    low halves of split masters (`split_master`): joined with the weights, updated, split again."""
    split = masters[0].dtype == torch.int16
    lows = masters
    if split:
        masters = [join_master(w, low) for w, low in zip(weights, lows)]
    torch._foreach_add_(steps, 1)
    grads = [g.to(torch.float32) for g in grads]
    if grad_scale is not None:
        grads = torch._foreach_div(grads, grad_scale)
    # decoupled decay, as torch.optim.AdamW
    torch._foreach_mul_(masters, [1 - lr * decay for lr, decay in zip(lrs, weight_decays)])
    rounded = exp_avgs[0].dtype != torch.float32  # bf16 moments: update in fp32, round stochastically
    first = [m.to(torch.float32) for m in exp_avgs] if rounded else exp_avgs
    second = [v.to(torch.float32) for v in exp_avg_sqs] if rounded else exp_avg_sqs
    torch._foreach_lerp_(first, grads, 1 - beta1)
    torch._foreach_mul_(second, beta2)
    torch._foreach_addcmul_(second, grads, grads, 1 - beta2)
    denom = torch._foreach_sqrt(second)
    torch._foreach_div_(denom, [(1 - beta2 ** step).sqrt() for step in steps])
    torch._foreach_add_(denom, eps)
    updates = torch._foreach_div(first, denom)
    torch._foreach_mul_(updates, [lr / (1 - beta1 ** step) for lr, step in zip(lrs, steps)])
    torch._foreach_sub_(masters, updates)
    if split:
        halves = [split_master(m) for m in masters]
        torch._foreach_copy_([w.view(torch.int16) for w in weights], [w.view(torch.int16) for w, _ in halves])
        torch._foreach_copy_(lows, [low for _, low in halves])
    else:
        torch._foreach_copy_(weights, masters)
    if rounded:  # one 32-bit draw per weight: its low half rounds the first moment, its high half the second
        draws = [torch.randint_like(m, -(2**31), 2**31 - 1, dtype=torch.int32) for m in first]
        torch._foreach_copy_(exp_avgs, [round_to_bf16(m, d & 0xFFFF) for m, d in zip(first, draws)])
        torch._foreach_copy_(exp_avg_sqs, [round_to_bf16(v, (d >> 16) & 0xFFFF) for v, d in zip(second, draws)])


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW (the same param groups and hyperparameters as `torch.optim.AdamW`) that turns its
    weights into `dtype` on construction and keeps their fp32 masters and moments.

    Build it before DDP wraps the model and before torch.compile traces it (both see the new
    dtype). Its state dict holds the masters, so a resumed run continues exactly.
    """

    takes_grad_scale = True  # divides the gradients by `grad_scale` (TrainStep's clipping) as the fused AdamW does

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, dtype: torch.dtype = torch.bfloat16, compile: bool = False,
                 moments_dtype: torch.dtype = torch.float32, split_masters: bool = False):
        self.dtype, self.moments_dtype = dtype, moments_dtype
        self.split_masters = split_masters and dtype == torch.bfloat16
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.grad_scale: Optional[torch.Tensor] = None  # set per step by the caller, as for the fused AdamW
        self._update = torch.compile(adamw_update, fullgraph=True, dynamic=False) if compile else adamw_update

    def add_param_group(self, param_group: dict) -> None:
        """As `torch.optim.Optimizer`'s, and the group's weights get their fp32 state and turn bf16."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["lr_tensor"] = None  # device copy of group["lr"], made on the first step
        # device copy of the weight decay: a tensor, so the compiled update does not bake the decay
        # in and trials that differ in optim.weight_decay share one compiled graph
        group["decay_tensor"] = group["decay_written"] = None
        for weight in group["params"]:
            state = self.state[weight]
            master = weight.detach().to(torch.float32, copy=True)
            for key in _MOMENTS:
                state[key] = torch.zeros_like(master, dtype=self.moments_dtype)
            state["step"] = torch.zeros((), dtype=torch.float32, device=weight.device)
            self._set_master(weight, master)

    def _set_master(self, weight: torch.Tensor, master: torch.Tensor) -> None:
        """Make `master` (fp32) the weight's master and the weight its rounding."""
        state = self.state[weight]
        if self.split_masters:
            rounded, state["master_low"] = split_master(master.contiguous())
            state.pop("master", None)
        else:
            state["master"] = master
            rounded = master.to(self.dtype)
        if weight.dtype == rounded.dtype:
            weight.data.copy_(rounded)  # in place: a compiled or graph-captured model keeps its addresses
        else:
            weight.data = rounded

    def master(self, weight: torch.Tensor) -> torch.Tensor:
        """The fp32 master of `weight` (a copy when the masters are split)."""
        state = self.state[weight]
        return join_master(weight.detach(), state["master_low"]) if self.split_masters else state["master"]

    @torch.no_grad()
    def prepare_step(self) -> None:
        """Write each group's learning rate and weight decay into the device tensors the update
        reads (made on the first call, then written in place: a captured step keeps reading them;
        tuner.train.step_graph calls this before every replay). A fill is a kernel argument, not a
        host-to-device copy: no sync."""
        for group in self.param_groups:
            if group["lr_tensor"] is None:
                device = group["params"][0].device
                group["lr_tensor"] = torch.zeros((), dtype=torch.float32, device=device)
                group["decay_tensor"], group["decay_written"] = torch.zeros_like(group["lr_tensor"]), None
            group["lr_tensor"].fill_(group["lr"])
            if group["decay_written"] != group["weight_decay"]:  # one fill, not one a step
                group["decay_tensor"].fill_(group["weight_decay"])
                group["decay_written"] = group["weight_decay"]

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MasterWeightAdamW.step takes no closure")
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if not capturing:  # a captured step (tuner.train.step_graph) has them written before each replay
            self.prepare_step()
        # one update call for all groups that share betas and eps (the loop's groups all do):
        # each call costs host time (guards, launches) that a small model's step would feel
        calls: dict[tuple, list] = {}
        for group in self.param_groups:
            live = [w for w in group["params"] if w.grad is not None]
            if live:
                calls.setdefault((*group["betas"], group["eps"]), []).extend(
                    (w, group["lr_tensor"], group["decay_tensor"]) for w in live)
        for (beta1, beta2, eps), entries in calls.items():
            states = [self.state[w] for w, _, _ in entries]
            self._update([w for w, _, _ in entries], [w.grad for w, _, _ in entries],
                         [s["master_low" if self.split_masters else "master"] for s in states],
                         [s["exp_avg"] for s in states],
                         [s["exp_avg_sq"] for s in states], [s["step"] for s in states],
                         [lr for _, lr, _ in entries], [decay for _, _, decay in entries], self.grad_scale,
                         beta1, beta2, eps)

    def state_dict(self):
        """As `torch.optim.Optimizer`'s, with each weight's fp32 "master" whether or not the
        masters are split in memory, so checkpoints read the same either way."""
        saved = super().state_dict()
        for group in saved["param_groups"]:
            for key in ("lr_tensor", "decay_tensor", "decay_written"):  # per-device caches, rebuilt on the next step
                group.pop(key, None)
        if self.split_masters:
            weights = [w for group in self.param_groups for w in group["params"]]
            ids = [i for group in saved["param_groups"] for i in group["params"]]
            for index, weight in zip(ids, weights):
                if index in saved["state"]:
                    state = dict(saved["state"][index])
                    del state["master_low"]
                    saved["state"][index] = {"master": self.master(weight), **state}
        return saved

    def load_state_dict(self, state_dict) -> None:
        """Load as `torch.optim.Optimizer` does, but keep the masters in fp32 and the moments in
        `moments_dtype` (the base class casts every saved tensor to its weight's dtype, which would
        round the masters to bf16). A state saved with the other moment dtype loads converted."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        weights = [w for group in self.param_groups for w in group["params"]]
        for index, weight in zip(ids, weights):
            state = self.state[weight]
            # the weight becomes the master's rounding (it is already, if the model was saved with it)
            self._set_master(weight, saved[index]["master"].to(device=weight.device, dtype=torch.float32))
            for key in _MOMENTS:
                state[key] = saved[index][key].to(device=weight.device, dtype=self.moments_dtype)
        for group in self.param_groups:
            group["lr_tensor"] = group["decay_tensor"] = group["decay_written"] = None
