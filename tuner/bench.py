"""`tuner bench`: time the real training step on random ids.

Batches come from the real collate path (`train_batches`: padding + cloze masking on int32
arrays) over random histories; the step is the loop's own `TrainStep` (forward, backward,
clipping, optimizer and scheduler update). Reports the median step time, the host's time to
issue a step, samples/s, peak memory
(GPU: max allocated; CPU: peak RSS growth), the first step's loss, model FLOPs per step and,
on a GPU, MFU against the bf16 matmul rate measured in the same process.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from tuner.config import load_config
from tuner.data.collate import train_batches
from tuner.data.dataset import Sequences
from tuner.errors import UserError
from tuner.losses import MaskedItemObjective, loss_config
from tuner.model.bert4rec import Bert4RecConfig, count_parameters
from tuner.model.build import build_model
from tuner.train.loop import resolve_precision
from tuner.train.optim import training_optimizer
from tuner.train.parallel import weights_digest
from tuner.train.step import TrainStep, compile_options
from tuner.train.step_graph import resolve_step


@dataclass
class BenchSpec:
    size: str = "tiny"
    num_items: int = 10_000
    hidden: Optional[int] = None
    batch_size: int = 256
    seq_len: int = 50
    steps: int = 20
    warmup: int = 5
    window: int = 5  # steps per timing window
    loss: str = "ce"
    amp: bool = True
    compile: bool = False
    compile_mode: str = "default"
    device: str = "cpu"
    seed: int = 0  # the data's (and, without model_seed, the weights')
    model_seed: Optional[int] = None  # DDP ranks (benchmarks/multigpu.py) share the weights, not the data
    tied_head: bool = True
    mask_prob: float = 0.2
    last_item_prob: float = 0.1
    static_shapes: bool = False
    ilora: bool = False  # freeze the model and train iLoRA experts (tuner.model.ilora)
    overrides: tuple[str, ...] = ()  # further config overrides, e.g. ("ilora.router=encoder",)
    # torch._inductor.config settings while the step compiles, e.g. (("triton.mix_order_reduction", False),)
    inductor: tuple[tuple[str, object], ...] = ()


def random_sequences(num_users: int, length: int, num_items: int, seed: int) -> Sequences:
    rng = np.random.default_rng(seed)
    items = rng.integers(1, num_items + 1, size=num_users * length, dtype=np.int32)
    return Sequences(items, np.arange(0, num_users * length + 1, length, dtype=np.int64))


def model_flops(cfg: Bert4RecConfig, batch: int, length: int, predicted: int) -> float:
    """Training FLOPs of one step (forward + backward = 3x forward matmul FLOPs).

    Encoder at every position: Q/K/V/O and FFN linears plus attention scores and values; head
    transform and catalog scores only where a prediction is trained. With `prune_last_layer` the
    last block's output projection and feed-forward count only there too: what the step runs.
    """
    tokens = batch * length
    per_token_layer = 2 * (4 * cfg.hidden ** 2 + 2 * cfg.hidden * cfg.ffn) + 2 * 2 * length * cfg.hidden
    encoder = tokens * cfg.layers * per_token_layer
    if cfg.prune_last_layer and cfg.layers:
        encoder -= (tokens - predicted) * 2 * (cfg.hidden ** 2 + 2 * cfg.hidden * cfg.ffn)
    head = predicted * (2 * cfg.hidden ** 2 + 2 * cfg.hidden * cfg.num_items)
    return 3.0 * (encoder + head)


def matmul_tflops(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    """Measured dense bf16 matmul rate (TFLOP/s): the denominator of MFU."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e12


@dataclass
class PreparedBench:
    """What `prepare_bench` built: the loop's step, and the batches (pinned on a GPU) to feed it."""

    step: TrainStep
    batches: list
    model_cfg: Bert4RecConfig
    trainable_params: int
    total_params: int
    dtype: Optional[torch.dtype]
    collate_samples_per_s: float


def prepare_bench(spec: BenchSpec, device: torch.device, wrap=None) -> PreparedBench:
    """The model, optimizer and `TrainStep` of `spec` on `device`, and `max(warmup, 1) + steps`
    batches from the real collate path. `wrap` (e.g. DDP) wraps the objective before compile."""
    overrides = [f"model.size={spec.size}", f"model.max_len={spec.seq_len}", f"model.tied_head={spec.tied_head}"]
    if spec.hidden:
        overrides += [f"model.hidden={spec.hidden}", f"model.ffn={4 * spec.hidden}"]
    # the step's compile settings, which the model's choices follow (model.fused_add_norm=auto)
    overrides += [f"train.compile={'on' if spec.compile else 'off'}", f"train.compile_mode={spec.compile_mode}",
                  f"train.static_shapes={spec.static_shapes}"]
    overrides += [f"ilora.enabled={spec.ilora}", *spec.overrides]
    cfg = load_config(overrides=overrides)
    dtype = None
    if spec.amp and cfg.train.amp != "auto":  # named (--set train.amp=fp16: a V100's step on any GPU)
        dtype = resolve_precision(cfg.train.amp, device)
    elif spec.amp:
        dtype = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()  # multigpu.py's workers
    world = torch.distributed.get_world_size() if distributed else 1
    cfg = resolve_step(cfg, device, world, spec.compile)
    torch.manual_seed(spec.seed if spec.model_seed is None else spec.model_seed)
    model = build_model(cfg, spec.num_items, pretrained=False).to(device)
    objective = MaskedItemObjective(model, loss_config(cfg.train, spec.loss)).to(device)
    options = compile_options(cfg.train, device, world) if spec.compile else None
    optimizer = training_optimizer(model, cfg, dtype, device, spec.compile)
    params = [p for p in model.parameters() if p.requires_grad]
    step = TrainStep(objective, params, optimizer, None, dtype, cfg.optim.grad_clip, device,
                     spec.compile_mode if spec.compile else None, wrap=wrap or (lambda m: m),
                     fused_clip=cfg.optim.fused_clip, compile_options=options,
                     step_graph=cfg.train.step_graph == "on")
    total = max(spec.warmup, 1) + spec.steps
    data = random_sequences(spec.batch_size * total, spec.seq_len, spec.num_items, spec.seed)
    t0 = time.perf_counter()
    batches = list(train_batches(data, spec.num_items, spec.batch_size, spec.seq_len, spec.mask_prob,
                                 spec.last_item_prob, spec.seed, 0, pin_memory=device.type == "cuda",
                                 static_shapes=cfg.train.fixed_shapes))
    collate_samples_per_s = spec.batch_size * len(batches) / (time.perf_counter() - t0)
    trainable, total_params = count_parameters(model)
    return PreparedBench(step, batches, model.cfg, trainable, total_params, dtype, collate_samples_per_s)


def run_bench(spec: BenchSpec, peak_tflops: Optional[float] = None, device: Optional[torch.device] = None,
              wrap=None) -> dict:
    """Time `spec.steps` training steps. `device` and `wrap` (e.g. DDP) come from Ray Train when
    the benchmark runs on several workers (benchmarks/multigpu.py); by default `spec.device`.
    With `wrap` the result also holds `weights_digest` (tuner.train.parallel) of the trained
    weights, for the ranks to compare."""
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is available")
    device = device or torch.device(spec.device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bench = prepare_bench(spec, device, wrap)
    step, batches, mcfg, dtype = bench.step, bench.batches, bench.model_cfg, bench.dtype
    predicted = statistics.mean(int((b.labels >= 0).sum()) for b in batches)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    spec_warmup = max(spec.warmup, 1)
    started = time.perf_counter()
    with torch._inductor.config.patch(dict(spec.inductor)):  # compilation and autotuning happen here
        first_loss = float(step(batches[0].to(device)))
        for batch in batches[1:spec_warmup]:
            step(batch.to(device))
    sync()
    warmup_s = time.perf_counter() - started
    # steps run back to back as in training (no sync inside a window, so the host's launch work
    # overlaps the GPU's); a window's wall time / its steps is one sample, the median is reported
    timed = batches[spec_warmup:]
    window = max(1, min(spec.window, len(timed)))
    # and the host's share of it: the time to issue the window's steps, before waiting for the
    # GPU. Well under the step time, the GPU is the bound. Near it, the host is, or the driver's
    # launch queue filled and held the host back (a step of hundreds of kernels without CUDA
    # graphs can fill it within a window; a CUDA-graph step queues a few launches)
    times, issued = [], []
    for start in range(0, len(timed) - window + 1, window):
        sync()
        t0 = time.perf_counter()
        for batch in timed[start:start + window]:
            step(batch.to(device))
        issued.append((time.perf_counter() - t0) / window)
        sync()
        times.append((time.perf_counter() - t0) / window)
    step_s = statistics.median(times)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    flops = model_flops(mcfg, spec.batch_size, spec.seq_len, predicted)
    trainable, total_params = bench.trainable_params, bench.total_params
    result = {
        "size": spec.size, "num_items": spec.num_items, "hidden": mcfg.hidden, "batch_size": spec.batch_size,
        "seq_len": spec.seq_len, "loss": spec.loss, "amp": str(dtype).replace("torch.", "") if dtype else "fp32",
        "compile": spec.compile_mode if spec.compile else "off", "device": spec.device,
        "step_ms": step_s * 1e3, "window_ms": [t * 1e3 for t in times], "samples_per_s": spec.batch_size / step_s,
        "host_ms": statistics.median(issued) * 1e3,  # the host's time to issue a step (median window)
        "warmup_s": warmup_s,  # the warm-up steps, compilation included
        "peak_mem_mb": peak_mb,
        "loss_first_step": first_loss, "total_params": total_params, "trainable_params": trainable,
        "predicted_positions": predicted, "model_tflop_per_step": flops / 1e12,
        "achieved_tflops": flops / step_s / 1e12, "collate_samples_per_s": bench.collate_samples_per_s,
    }
    if wrap is not None:
        result["weights_digest"] = weights_digest(step.params)
    if device.type == "cuda":
        peak = peak_tflops or matmul_tflops(device)
        result["matmul_tflops"] = peak
        result["mfu"] = result["achieved_tflops"] / peak
    return result
