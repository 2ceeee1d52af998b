"""One optimizer step, shared by the training loop and `tuner bench` so both time the same thing.

`TrainStep` owns precision (bf16 autocast, or fp16 with a GradScaler that is unscaled before
clipping), optional `torch.compile` of the objective, and the optimizer/scheduler update.

Clipping by the global gradient norm needs the norm (one read of every gradient) and a rescale.
With a fused AdamW and no loss scaling, the rescale rides in the optimizer's own pass: the fused
kernel divides each gradient by the optimizer's `grad_scale` tensor (the hook GradScaler uses),
so the step reads and writes every gradient once less. The update is the same as
`clip_grad_norm_` followed by the step. `MasterWeightAdamW` (bf16 weights) takes the same hook;
the norm of its bf16 gradients is summed in fp32.
"""

from __future__ import annotations

import contextlib
import copyreg
from typing import Optional

import torch
from torch import nn

from tuner.config import TrainConfig
from tuner.data.collate import TrainBatch
from tuner.train.step_graph import WITHOUT_GRAPHS, StepGraph


# `train.cpp_wrapper=auto` turns the C++ wrapper on for a trial of at least this many optimizer
# steps: the break-even of its faster steps against any longer start on a warm cache (every trial
# after a machine's first). Before CUDA_CPP_WRAPPER skipped the CPU-ISA checks (below) a warm C++
# process took 58.1 s to the end of its first two steps against 25.6 s with the Python wrapper
# (H100, 130M), which set the bar at 20,000 steps. Without them, on an H200 in one run: 21.5 and
# 27.9 s against 32.6 and 25.1 s (with the checks given back: 66.0 and 61.5 s), so the C++ wrapper
# is ahead from the first step and the bar is 0 (`benchmarks/compile_start.py --summarize`;
# benchmarks/results/compile_start_cuda/summary.json). A machine's first trial, which compiles,
# still pays ~31 s more with it (84.2 against 53.3 s), once.
CPP_WRAPPER_MIN_STEPS = 0

# The C++ wrapper's settings on a GPU. torch 2.11's inductor picks a CPU vector ISA for every C++
# module it builds, the GPU wrapper's glue too, and checks each ISA the CPU lists by building a probe
# and loading it in a new Python process (which, in the 2.11-era source, imports torch); a process
# caches the answers only for itself, so every trial pays them again. In a cold 130M process on an
# H200 the checks took 16.5 s (`cpu_vec_isa.check_build`, cumulative;
# results/compile_start_cuda/h200/profile_130M_cpp_cold.txt).
# The glue has no vector code (torch 2.13 no longer checks for it): `vec_isa_ok=False` skips the
# checks and builds it without vector flags.
CUDA_CPP_WRAPPER = {"cpp_wrapper": True, "cpp.vec_isa_ok": False}

# AOTAutograd's on-disk cache passes over any graph with a custom autograd.Function in it unless
# told otherwise: the objective has one (tuner.losses.TiedItemTable), so every new process traced
# the step's joint graph again (2.5-3.6 s per warm 130M process on an H200,
# results/compile_start_cuda/summary.json, `details`). Dynamo traces the Function's forward and
# backward into the graph that keys the cache, so a changed Function misses it (PyTorch's own
# test_custom_autograd_function_miss); this lets the cache hold it.
AOT_CACHE_SETTINGS = {"autograd_cache_allow_custom_autograd_functions": True}

# Inductor specialises a graph's CPU C++ kernels on torch's thread count and keys its FX graph cache
# on that count (torch 2.13). A Ray worker runs with OMP_NUM_THREADS = its CPUs (1 by default) and a
# bare process with all of the machine's, so a Ray Train trial compiled the whole step again after
# `tuner train` or `tuner bench` had cached it: on a CPU the two processes' keys differ only in
# `cpp_runtime_thread_count` (benchmarks/results/cache_keys/cpu/). With threads read at run time the
# key leaves the count out, and the worker loads every graph (tests/test_cache_keys.py).
# On an H200 (torch 2.11) the worker still compiled again, for another reason (a bare process with
# OMP_NUM_THREADS=1 loaded every graph there): the memory formats' pickling, below.
#
# Where attention falls back to SDPA on a GPU (V100s, fp32, sequences over 512, `model.attention=
# efficient|cudnn|math`), the model pins SDPA's backend with `sdpa_kernel`, which Dynamo records in the
# graph as calls to two private functions of torch.nn.attention. AOTAutograd's cache passes over a
# graph that calls functions it does not know ("Unsupported call_function target
# _backend_from_string"), so every new process (every trial) traced the step's joint graph again.
# The calls' arguments, the backends, are constants of the graph that keys the cache, and they only
# set the flags that pick SDPA's kernel while AOTAutograd traces: marked cacheable (the value keys them
# on torch's version), the pinned step is cached as any other (tests/test_step.py shows it on a CPU).
SDPA_PIN_FUNCTIONS = ("torch.nn.attention._backend_from_string", "torch.nn.attention._sdpa_kernel")
SHARED_CACHE_SETTINGS = {"cpp.dynamic_threads": True,
                         "unsafe_marked_cacheable_functions": {name: torch.__version__ for name in SDPA_PIN_FUNCTIONS}}


def without_sdpa_marks(settings: dict) -> dict:
    """`settings` without the SDPA functions' marks: the step as before them, the control that
    tests/test_step.py and `benchmarks/compile_start.py --sdpa-unmarked` compare against."""
    return {k: v for k, v in settings.items() if k != "unsafe_marked_cacheable_functions"}


def memory_format_named(name: str) -> torch.memory_format:
    """The memory format `name` names ("torch.contiguous_format"): how one is rebuilt from a pickle."""
    return getattr(torch, name.rpartition(".")[2])


# A torch.memory_format pickles as its bare name, "torch.contiguous_format", which pickle resolves
# by scanning sys.modules, in the order the process imported them, for the first module that holds
# a `torch` attribute. So the bytes name whichever such module the process happened to import first
# (`torch._utils` in a bare `tuner train`). Inductor's FX graph cache and AOTAutograd's cache hash
# every static input's metadata, its memory format included, through pickle, so two processes that
# imported their modules in another order miss each other's compiled graphs. On an H200 (torch
# 2.11) a Ray Train worker's keys differed from the bare process's in exactly the inputs that carry
# a memory format, with the same printed metadata (benchmarks/results/cache_keys/h200/). Pickled by
# this function instead, the bytes are the same in every process; torch does the same for
# torch.layout (torch.serialization._get_layout). A pickle that holds a memory format then needs
# this package to load; every process that compiles the step imports it anyway.
copyreg.pickle(torch.memory_format, lambda fmt: (memory_format_named, (str(fmt),)))


def compile_options(train: TrainConfig, device: torch.device, world_size: int = 1,
                    total_steps: Optional[int] = None) -> Optional[dict]:
    """Inductor settings for whatever the step compiles (the objective, and the masters' update
    inside the optimizer step): the C++ wrapper (`CUDA_CPP_WRAPPER` on a GPU) where
    `train.cpp_wrapper` asks for it, else None. auto: one CUDA worker without CUDA graphs (a graph
    compile mode, or `train.step_graph=on`), where
    the host's launches are what the step waits on, and a trial of at least CPP_WRAPPER_MIN_STEPS
    optimizer steps (`total_steps`: the trial's plan; None = long, as for `tuner bench`'s steady
    step); DDP (`world_size` > 1) keeps the Python wrapper, as the C++ one has not been run across
    GPUs."""
    setting = train.cpp_wrapper
    wrapper = dict(CUDA_CPP_WRAPPER) if device.type == "cuda" else {"cpp_wrapper": True}
    if setting == "auto":
        single = device.type == "cuda" and world_size == 1
        long = total_steps is None or total_steps >= CPP_WRAPPER_MIN_STEPS
        return wrapper if single and long and not train.replays_graphs else None
    return wrapper if setting == "on" else None


def bind_backward_context(device: torch.device) -> None:
    """Runs one CUDA kernel on autograd's backward thread for `device`, which binds the device's
    context to that thread. Inductor's C++ wrapper launches kernels through the driver API, which
    needs a current context. When the compiled backward comes from the on-disk cache (every
    process after the first on a machine: the next trial, a resumed run), nothing has run on that
    thread before it, and its first launch fails with "CUDA driver error: invalid device context"
    (pytorch/pytorch#144609; seen on an H100 with torch 2.11)."""
    if device.type == "cuda":
        x = torch.ones(1, device=device, requires_grad=True)
        (x * 2).sum().backward()


class TrainStep:
    """`step(batch)` -> the batch's loss (a device tensor): one optimizer step. With `step_graph`
    (`train.step_graph`, as `tuner.train.step_graph.resolve_step` decides) the step's device work
    runs as one CUDA graph after its first steps, and `compile_mode` loses its own CUDA graphs
    (reduce-overhead -> default)."""

    def __init__(self, objective: nn.Module, params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                 scheduler, dtype: Optional[torch.dtype], grad_clip: float, device: torch.device,
                 compile_mode: Optional[str] = None, wrap=lambda m: m, fused_clip: bool = True,
                 compile_options: Optional[dict] = None, step_graph: bool = False):
        self.module = wrap(objective)
        if compile_mode is not None and step_graph:
            compile_mode = WITHOUT_GRAPHS.get(compile_mode, compile_mode)
        if compile_mode is not None:
            self.module = torch.compile(self.module, mode=None if compile_mode == "default" else compile_mode)
        # every call runs under the inductor settings, so every compile gets them (the first steps,
        # a recompile for a new shape, the optimizer's update). Passed as torch.compile's `options`
        # instead, the C++ wrapper failed on an H100 (torch 2.11: "CudaKernelParamCache not
        # populated" for a backward kernel). One patch object, reused: ~8 us a step on a 2-core CPU
        self.inductor = self.aot_cache = contextlib.nullcontext()
        if compile_mode is not None:
            import torch._functorch.config as functorch_config
            import torch._inductor.config as inductor_config

            self.aot_cache = functorch_config.patch(AOT_CACHE_SETTINGS)
            self.inductor = inductor_config.patch({**SHARED_CACHE_SETTINGS, **(compile_options or {})})
            if compile_options and compile_options.get("cpp_wrapper"):
                bind_backward_context(device)
        self.params, self.optimizer, self.scheduler = params, optimizer, scheduler
        self.dtype, self.grad_clip, self.device = dtype, grad_clip, device
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        # PyTorch's fused optimizers divide by `grad_scale`; others declare it (MasterWeightAdamW)
        takes_scale = bool(optimizer.defaults.get("fused")) or getattr(optimizer, "takes_grad_scale", False)
        self.fused_clip = fused_clip and takes_scale and not self.scaler.is_enabled()
        if step_graph and self.scaler.is_enabled() and not getattr(optimizer, "_step_supports_amp_scaling", False):
            # GradScaler would read the overflow check on the host, which a capture cannot do
            raise RuntimeError(f"train.step_graph with fp16 loss scaling needs an optimizer that takes the scaler's "
                               f"found_inf (the fused AdamW), not {type(optimizer).__name__}")
        self.graph = StepGraph(self._update, optimizer, device) if step_graph else None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()

    def __call__(self, batch: TrainBatch) -> torch.Tensor:
        """Forward, backward, clip, update, the scheduler's step; returns the (detached) loss
        without syncing."""
        with self.aot_cache, self.inductor:
            loss = self.graph(batch) if self.graph is not None else self._update(batch)
        if self.scheduler is not None:
            self.scheduler.step()
        return loss

    def _update(self, batch: TrainBatch) -> torch.Tensor:
        """The step's device work (what a step graph captures): forward, backward, clip, update."""
        with self.autocast():
            loss = self.module(batch.items, batch.positions, batch.labels)
        self.scaler.scale(loss).backward()
        if self.grad_clip > 0 and self.fused_clip:
            grads = [p.grad for p in self.params if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))
            # clip_grad_norm_ multiplies by min(1, clip / (norm + 1e-6)); the fused step divides
            self.optimizer.grad_scale = ((norm + 1e-6) / self.grad_clip).clamp(min=1.0).float()
        elif self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach().clone()  # a CUDA-graph output is overwritten by the next replay
