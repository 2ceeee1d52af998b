"""Typed configuration: one dataclass per concern, one source of truth.

A run's configuration is a `Config` made of sections (`data`, `model`, `optim`, `train`,
`eval`, `tune`, `tracking`). It comes from defaults, then an optional YAML file (`--config`),
then dotted overrides (`--set optim.lr=3e-4`). Unknown keys and bad values are `UserError`s
that name the key and the valid choices; a typo never falls back to a default silently.

Every section validates itself in `__post_init__`, so a `Config` that exists is a valid one.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tuner.errors import UserError

_AMP_CHOICES = ("auto", "off", "bf16", "fp16")
_COMPILE_CHOICES = ("auto", "on", "off")
_DEVICE_CHOICES = ("auto", "cpu", "cuda")
_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the compile modes that replay CUDA graphs


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def _check_choice(name: str, value: str, choices: typing.Sequence[str]) -> None:
    _check(value in choices, f"{name}={value!r} is not one of: {', '.join(choices)}")


def _tristate(name: str, value: object) -> str:
    """auto, or the words a bool key accepts (`coerce`'s; YAML's true/false included) as "true" / "false"."""
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        return "true" if coerce(name, value, bool) else "false"
    except UserError:
        raise UserError(f"{name}={value!r} is not one of: auto, true, false") from None


def _check_prob(name: str, value: float, *, allow_one: bool = False) -> None:
    upper_ok = value <= 1.0 if allow_one else value < 1.0
    interval = "[0, 1]" if allow_one else "[0, 1)"
    _check(0.0 <= value and upper_ok and math.isfinite(value), f"{name}={value} must be in {interval}")


@dataclass
class DataConfig:
    """Where the interactions come from."""

    path: Optional[str] = None  # prepared dataset directory or raw file; None = synthetic
    synthetic_users: int = 3000  # used only when path is None
    synthetic_items: int = 1000
    synthetic_seed: int = 0

    def __post_init__(self) -> None:
        _check(self.synthetic_users >= 10, "data.synthetic_users must be at least 10")
        _check(self.synthetic_items >= 20, "data.synthetic_items must be at least 20")


@dataclass
class ModelConfig:
    """BERT4Rec architecture. `size` fills every field left unset (see tuner/model/sizes.py)."""

    size: str = "tiny"
    hidden: Optional[int] = None
    layers: Optional[int] = None
    heads: Optional[int] = None
    ffn: Optional[int] = None  # feed-forward width; default 4 x hidden
    max_len: Optional[int] = None  # longest history the model reads, mask token included
    dropout: float = 0.1
    attn_dropout: float = 0.1
    tied_head: bool = True  # output head shares the item embedding (paper); False = seed's untied head
    fused_qkv: bool = True  # Q, K and V projections as one GEMM (False: three, for A/B benchmarks)
    # triton (tuner/model/short_attention.py up to 128 positions, tiled_attention.py up to 512, on
    # sm80+; SDPA's efficient kernel otherwise) | efficient | cudnn | math | auto (PyTorch picks an
    # SDPA kernel); tuner/model/bert4rec.py
    attention: str = "triton"
    # the residual stream (embeddings, every block's sum, the layer norms' outputs) under bf16
    # autocast: bf16 (the norms still compute in fp32 but return bf16: half the bytes of every
    # elementwise pass over the stream) or fp32 (what autocast's layer norms return). No effect
    # without bf16 autocast (CPUs, fp16 GPUs). bf16 cut the 430M step 0.25-0.4 ms on an H100 and
    # lost nothing on ML-1M (README; benchmarks/results/ml1m_stream.json). half: as bf16, and under
    # fp16 autocast (V100s) the stream in fp16, on add_norm's kernels where they run; not yet
    # timed or checked for accuracy on a GPU (README, issue 5)
    residual: str = "bf16"
    # each residual add, its dropout and the LayerNorm after it as one Triton kernel each way
    # (tuner/model/add_norm.py; where short_attention's kernels run), else inductor's code.
    # auto = on under CUDA graphs (train.compile_mode reduce-overhead or max-autotune): there it
    # cut the 430M step by 0.5 ms on an H100; without graphs each call's host time (Python and
    # Triton's launcher, ~0.27 ms a forward and backward) made plain compile slower
    # (benchmarks/results/gpu_throughput_add_norm_430M.json, gpu_throughput_host_130M.json)
    fused_add_norm: str = "auto"
    # the last block's output projection, feed-forward and norms, and the head transform, only at
    # the positions that are scored (the masked ones in training, the last in evaluation); its
    # attention still reads every position. false: the whole block at every position, the scored
    # rows picked before the head transform (A/B benchmarks)
    prune_last_layer: bool = True

    def __post_init__(self) -> None:
        from tuner.model.bert4rec import ATTENTION_BACKENDS
        from tuner.model.sizes import SIZES

        _check_choice("model.attention", self.attention, list(ATTENTION_BACKENDS))
        _check_choice("model.residual", self.residual, ("fp32", "bf16", "half"))
        _check_choice("model.fused_add_norm", self.fused_add_norm, _COMPILE_CHOICES)
        _check_choice("model.size", self.size, list(SIZES))
        preset = SIZES[self.size]
        for name in ("hidden", "layers", "heads", "max_len"):
            if getattr(self, name) is None:
                setattr(self, name, preset[name])
        if self.ffn is None:
            self.ffn = 4 * self.hidden
        for name in ("hidden", "layers", "heads", "ffn", "max_len"):
            _check(getattr(self, name) >= 1, f"model.{name} must be positive")
        _check(self.max_len >= 2, "model.max_len must be at least 2")
        _check(self.hidden % self.heads == 0,
               f"model.hidden={self.hidden} must be divisible by model.heads={self.heads}")
        _check_prob("model.dropout", self.dropout)
        _check_prob("model.attn_dropout", self.attn_dropout)


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay."""

    lr: float = 3e-3  # tuned for the small sizes; search_spaces/ hold per-size ranges
    weight_decay: float = 0.01  # not applied to biases and LayerNorm
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_fraction: float = 0.05  # of all training steps
    min_lr_ratio: float = 0.05  # cosine floor as a fraction of lr
    embedding_lr_mult: float = 1.0  # learning-rate multiplier for the item and position embeddings
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    # with the fused AdamW (GPUs) and no fp16 loss scaling: apply the clipping factor inside the
    # optimizer's own pass (its grad_scale) instead of a separate pass over every gradient
    fused_clip: bool = True
    # validate, test and serve an exponential moving average of the weights, updated after every
    # step with this decay (e.g. 0.99; a second copy of the weights on the device); 0 = off
    ema_decay: float = 0.0
    # with bf16 weights (train.weights): AdamW's two moments in fp32, or in bf16 written back with
    # stochastic rounding (8 bytes fewer per weight and step; tuner/train/master_adamw.py). bf16
    # cut the 430M step 2% and its memory 1 GB, but lost 0.007-0.014 test NDCG@10 on ML-1M
    # (README, benchmarks/results/ml1m_moments.json), so fp32 is the default
    moments: str = "fp32"
    # with bf16 weights: each fp32 master kept whole (fp32), or as the bf16 weight plus its 16 low
    # bits (split: the same masters exactly, 2 bytes less per weight of memory and of writes)
    masters: str = "split"

    def __post_init__(self) -> None:
        _check_choice("optim.moments", self.moments, ("fp32", "bf16"))
        _check_choice("optim.masters", self.masters, ("split", "fp32"))
        _check(self.lr > 0 and math.isfinite(self.lr), f"optim.lr={self.lr} must be positive")
        _check(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay} must be >= 0")
        _check(self.embedding_lr_mult > 0, "optim.embedding_lr_mult must be positive")
        _check_prob("optim.beta1", self.beta1)
        _check_prob("optim.beta2", self.beta2)
        _check_prob("optim.warmup_fraction", self.warmup_fraction)
        _check_prob("optim.min_lr_ratio", self.min_lr_ratio, allow_one=True)
        _check(self.grad_clip >= 0, "optim.grad_clip must be >= 0")
        _check(0.0 <= self.ema_decay < 1.0, f"optim.ema_decay={self.ema_decay} must be in [0, 1)")


@dataclass
class TrainConfig:
    """The loop: masking, batches, precision, compile, early stopping, checkpoints."""

    max_epochs: int = 30
    max_steps: int = 0  # stop after this many optimizer steps in total; 0 = no limit
    batch_size: int = 128
    # what batch_size counts with several workers (resources.workers): worker = each worker's batch,
    # so one optimizer step takes workers x batch_size samples; global = one optimizer step's batch
    # over all workers (each takes batch_size / workers), so a DDP trial makes the same steps as a
    # 1-worker trial and a learning rate tuned on one carries over
    batch_scope: str = "worker"
    mask_prob: float = 0.2  # cloze masking probability per item
    last_item_prob: float = 0.1  # share of samples with only the last item masked
    # share of histories longer than model.max_len trained, each epoch, on a window of max_len
    # items at a random place in the history rather than on its latest max_len items (0 = never:
    # everything before the latest max_len items is never seen)
    window_prob: float = 0.0
    patience: int = 10  # epochs without val_ndcg_10 improvement before stopping; 0 = never
    seed: int = 0
    device: str = "auto"  # auto = cuda when available
    amp: str = "auto"  # auto = bf16 on GPUs that have it, fp16 + GradScaler otherwise, off on CPU
    # how the trainable weights are stored: fp32, or bf16 with fp32 master copies and moments kept
    # by the optimizer (tuner.train.master_adamw; needs bf16 autocast, no optim.ema_decay); auto =
    # bf16 under bf16 autocast on CUDA with train.compile on, without a weight average, from 100M
    # trainable weights
    weights: str = "auto"
    compile: str = "auto"  # auto = on for cuda
    compile_mode: str = "default"  # reduce-overhead = CUDA graphs (use with static_shapes)
    # inductor's wrapper in C++ (torch.compile's `cpp_wrapper` option): the compiled graphs launch
    # their kernels from C++ instead of Python. Without CUDA graphs the step waits on the host's
    # launches, and on an H100 plain compile took 8.9-9.7 ms per 130M step with it against
    # 10.2-15.0 without (alternating rows; benchmarks/results/gpu_throughput_cpp_wrapper_130M.json).
    # A trial that finds the step in inductor's cache (trials that differ only in dropout, learning
    # rate or weight decay share it: tuner.model.rate_dropout, MasterWeightAdamW's decay tensor)
    # starts no later with it; a machine's first trial, which compiles, pays ~31 s more once.
    # auto = on for one CUDA worker without CUDA graphs (compile_mode default or
    # max-autotune-no-cudagraphs) whose trial plans at least tuner.train.step.CPP_WRAPPER_MIN_STEPS
    # optimizer steps (max_epochs x steps per epoch, or max_steps): 0 since the warm start is level
    # (the figures are there); DDP trials keep the Python wrapper (the C++ one is not yet run across GPUs)
    cpp_wrapper: str = "auto"
    # batches of one shape and a fixed number of prediction slots each (the last batch of an epoch
    # filled up with its first users again): true | false | auto = true where the step runs as one
    # CUDA graph (train.step_graph) and an epoch holds at least tuner.train.step_graph.MIN_BATCHES batches
    static_shapes: str = "auto"
    # the whole step (forward, backward, clipping, the optimizer's update) captured once as one CUDA
    # graph and replayed (tuner/train/step_graph.py), the objective then compiled without inductor's
    # own graphs. auto = on where the step can be captured whole: CUDA, train.compile on, static
    # shapes (not train.static_shapes=false), one worker, and a compile mode other than
    # max-autotune-no-cudagraphs; on = those needs, with any compile mode
    step_graph: str = "auto"
    loss: str = "ce"  # ce | focal | cce (cut cross-entropy) | sampled_ce (CE-) | cce_sampled (CCE-)
    focal_gamma: float = 2.0  # focal loss exponent
    release_memory: bool = False  # gc.collect() and empty the CUDA cache after every epoch
    loss_chunk: int = 8192  # catalog items per logit block for cce / cce_sampled (the CUDA kernel
    # widens it while the block stays under 1 GiB, so few rows take few, large launches)
    # auto = Triton kernels on CUDA (cce / cce_sampled: tuner/cce_kernel.py; ce / focal: the softmax
    # passes over the logits, tuner/ce_kernel.py); torch = chunked PyTorch (cce) or inductor's code (ce)
    loss_kernel: str = "auto"
    # ce / focal on CUDA: the logit matrix's columns are rounded up to a multiple of this (the
    # extra ones masked), so cuBLAS keeps its fast kernels for any catalog size; 1 = no rounding
    # 8: 16-byte bf16 rows, all cuBLAS's Hopper kernels need; where V + 2 is a multiple of 8 (the
    # seed's 159,750 items) the tied head needs no padding and is the bf16 table itself (430M
    # step: 16.5 against 17.3 ms at 64, benchmarks/results/gpu_throughput_head_430M_130M.json)
    logit_align: int = 8
    # ce / focal with the tied head: the item table's input rows and output head share one autograd
    # node, whose backward writes the table's gradient in one pass (tuner.losses.TiedItemTable)
    fused_table: bool = True
    num_negatives: int = 1024  # sampled_ce / cce_sampled
    negative_sampling: str = "uniform"  # uniform | popularity (training counts, log-Q corrected)
    shared_negatives: bool = True  # sampled_ce: one negative set per batch, else per position
    checkpoint_dir: Optional[str] = None  # resume from here if a checkpoint exists
    checkpoint_every: int = 1  # epochs between checkpoints (the last epoch always gets one)
    # the largest share of the time that writing checkpoints may take: a checkpoint due by
    # checkpoint_every is put off until the time since the last one is at least the last write's
    # duration / this share (0 = every due checkpoint). Under Ray Train each write runs beside the
    # next epoch's training and slows it: on an H200 a 130M Train run's two-epoch turns took 1.342x
    # (1.625x with CUDA graphs) the bare loop's with a write every epoch, and 0.993x (1.011x) at
    # 0.05 (benchmarks/ray_turns.py, benchmarks/results/ray_turns_h200/). A run that stops itself
    # (max_epochs, patience, a time budget) always writes its last epoch; a resume after a crash
    # loses at most about write time / share of training
    checkpoint_share: float = 0.05
    # one process (`tuner train --checkpoint-dir`): background = the state is copied off the model
    # and written on a thread while the next epoch trains, as Ray Train writes its checkpoints (with
    # checkpoint_share > 0 a checkpoint is not due while the last one is still being written);
    # inline = written before the next epoch starts (no copy of the state); auto = background on a
    # GPU, where the training thread mostly waits for the device (the same thread-written snapshots
    # made Ray Train's 130M turns 0.83-0.88x the in-line bare loop's on an H200,
    # benchmarks/results/ray_turns_h200/*both_ckpt*), inline on a CPU, where a write on a thread
    # shares the cores training needs: on the 2-core machine no gain within the noise, and the
    # state's copy added 97 and 148 MB of peak memory (benchmarks/results/checkpoint_writer_cpu.json)
    checkpoint_writer: str = "auto"
    log_every: int = 0  # also print train loss every N steps; 0 = once per epoch
    time_budget_s: float = 0.0  # stop before an epoch that would end past this; 0 = no limit
    # under a time budget (this one or tune's), end the cosine learning-rate decay at the last
    # epoch that fits rather than at max_epochs, so a trial cut by the budget still anneals
    anneal_to_deadline: bool = True
    init_from: Optional[str] = None  # start from these weights: a checkpoint or an MLflow model URI
    # train on the validation targets too, for exactly max_epochs, and test the final weights: the
    # last step for a tuned configuration (take max_epochs from its best epoch); nothing is
    # validated, so no early stopping and no use in tuning
    refit: bool = False
    # profile this epoch's training with the PyTorch profiler (0 = never); rank 0 writes a summary
    # (wall time, time the device was busy, the top operators) to profile_out
    profile_epoch: int = 0
    profile_out: Optional[str] = None

    @property
    def fixed_shapes(self) -> bool:
        """`static_shapes` as resolved for a run (`tuner.train.step_graph.resolve_step`); auto counts
        as false until then."""
        return self.static_shapes == "true"

    @property
    def replays_graphs(self) -> bool:
        """Whether the compiled step (train.compile on) replays CUDA graphs: a graph compile mode, or
        `step_graph=on` (the C++ wrapper's and add_norm's auto choices follow this)."""
        return self.compile_mode in GRAPH_MODES or self.step_graph == "on"

    def __post_init__(self) -> None:
        _check(self.max_epochs >= 1, "train.max_epochs must be at least 1")
        _check(self.profile_epoch >= 0, "train.profile_epoch must be >= 0")
        _check(not self.profile_epoch or bool(self.profile_out),
               "train.profile_epoch needs train.profile_out (a file for the summary)")
        _check(self.max_steps >= 0, "train.max_steps must be >= 0")
        _check(self.batch_size >= 1, "train.batch_size must be at least 1")
        _check(0.0 < self.mask_prob < 1.0, f"train.mask_prob={self.mask_prob} must be in (0, 1)")
        _check_prob("train.last_item_prob", self.last_item_prob, allow_one=True)
        _check_prob("train.window_prob", self.window_prob, allow_one=True)
        _check(self.patience >= 0, "train.patience must be >= 0")
        _check_choice("train.device", self.device, _DEVICE_CHOICES)
        _check_choice("train.amp", self.amp, _AMP_CHOICES)
        _check_choice("train.weights", self.weights, ("auto", "fp32", "bf16"))
        _check_choice("train.batch_scope", self.batch_scope, ("worker", "global"))
        _check(self.weights != "bf16" or self.amp in ("auto", "bf16"),
               f"train.weights=bf16 needs bf16 autocast, not train.amp={self.amp}")
        _check_choice("train.compile", self.compile, _COMPILE_CHOICES)
        _check_choice("train.compile_mode", self.compile_mode, _COMPILE_MODES)
        _check_choice("train.cpp_wrapper", self.cpp_wrapper, _COMPILE_CHOICES)
        _check_choice("train.step_graph", self.step_graph, _COMPILE_CHOICES)
        self.static_shapes = _tristate("train.static_shapes", self.static_shapes)
        _check_choice("train.loss", self.loss, ("ce", "focal", "cce", "sampled_ce", "cce_sampled"))
        _check(self.focal_gamma >= 0, "train.focal_gamma must be >= 0")
        _check(self.logit_align >= 1, "train.logit_align must be at least 1")
        _check(self.loss_chunk >= 1, "train.loss_chunk must be at least 1")
        _check_choice("train.loss_kernel", self.loss_kernel, ("auto", "torch"))
        _check(self.num_negatives >= 1, "train.num_negatives must be at least 1")
        _check_choice("train.negative_sampling", self.negative_sampling, ("uniform", "popularity"))
        _check(self.time_budget_s >= 0, "train.time_budget_s must be >= 0")
        _check(self.checkpoint_every >= 1, "train.checkpoint_every must be at least 1")
        _check_choice("train.checkpoint_writer", self.checkpoint_writer, ("auto", "background", "inline"))
        _check(0.0 <= self.checkpoint_share < 1.0,
               f"train.checkpoint_share={self.checkpoint_share} must be in [0, 1)")


@dataclass
class IloraConfig:
    """Instance-wise LoRA (tuner.model.ilora): frozen base, K gated LoRA experts per linear."""

    enabled: bool = False
    rank: int = 8  # total rank, split over the experts
    experts: int = 4
    alpha: float = 32.0
    dropout: float = 0.1
    router: str = "history"  # history: mean frozen item embedding | encoder: mean frozen encoder output

    def __post_init__(self) -> None:
        _check(self.experts >= 1, "ilora.experts must be at least 1")
        _check(self.rank >= 1 and self.rank % self.experts == 0,
               f"ilora.rank={self.rank} must be a positive multiple of ilora.experts={self.experts}")
        _check(self.alpha > 0, "ilora.alpha must be positive")
        _check_prob("ilora.dropout", self.dropout)
        _check_choice("ilora.router", self.router, ("history", "encoder"))


@dataclass
class EvalConfig:
    """Full-ranking leave-one-out evaluation plus the paper's sampled metrics."""

    batch_size: int = 256
    catalog_chunk: int = 65536  # items scored at once; bounds memory at huge catalogs
    num_negatives: int = 100  # for the sampled metrics
    exclude_history: bool = False  # rank only items the user has not interacted with
    max_val_users: int = 0  # validate on a fixed random subset of users; 0 = all

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "eval.batch_size must be at least 1")
        _check(self.catalog_chunk >= 1, "eval.catalog_chunk must be at least 1")
        _check(self.num_negatives >= 1, "eval.num_negatives must be at least 1")
        _check(self.max_val_users >= 0, "eval.max_val_users must be >= 0")


@dataclass
class ResourcesConfig:
    """What one trial asks Ray for."""

    workers: int = 1  # DDP workers per trial
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # fractional values let trials share a GPU
    accelerator_type: Optional[str] = None  # pin workers to a GPU type (Ray's accelerator_type:<T>)

    def __post_init__(self) -> None:
        _check(self.workers >= 1, "resources.workers must be at least 1")
        _check(self.cpus_per_worker > 0, "resources.cpus_per_worker must be positive")
        _check(self.gpus_per_worker >= 0, "resources.gpus_per_worker must be >= 0")


@dataclass
class TuneConfig:
    """The search: Optuna TPE or random, ASHA or no early stopping."""

    num_samples: int = 8
    search: str = "optuna"
    scheduler: str = "asha"
    metric: str = "val_ndcg_10"
    grace_period: int = 2  # epochs before ASHA may stop a trial
    reduction_factor: int = 2
    max_concurrent: int = 0  # 0 = as many as the resources allow
    max_failures: int = 2  # retries of a crashed trial, from its last checkpoint
    seed: int = 0
    startup_trials: int = 10  # TPE: random trials before the model of good and bad ones is used
    # wall-clock budget of one `tuner tune` invocation; 0 = none. Running trials stop at the end
    # of the epoch that would overrun it and still test their best weights; no new trial starts
    # in its last `final_fraction`
    time_budget_s: float = 0.0
    final_fraction: float = 0.15
    # after the search, retrain the winner on the validation targets too (train.refit) for its
    # best epoch count, test it, and register that model; runs after the time budget
    refit: bool = False

    def __post_init__(self) -> None:
        _check(self.num_samples >= 1, "tune.num_samples must be at least 1")
        _check_choice("tune.search", self.search, ("optuna", "random"))
        _check_choice("tune.scheduler", self.scheduler, ("asha", "none"))
        _check(self.grace_period >= 1, "tune.grace_period must be at least 1")
        _check(self.reduction_factor >= 2, "tune.reduction_factor must be at least 2")
        _check(self.max_concurrent >= 0, "tune.max_concurrent must be >= 0")
        _check(self.startup_trials >= 1, "tune.startup_trials must be at least 1")
        _check(self.max_failures >= 0, "tune.max_failures must be >= 0")
        _check(self.time_budget_s >= 0, "tune.time_budget_s must be >= 0")
        _check(0 <= self.final_fraction < 1, "tune.final_fraction must be in [0, 1)")


@dataclass
class TrackingConfig:
    """MLflow: where runs go and what the experiment is called."""

    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    experiment: str = "bert4rec"
    register_model: bool = True

    def __post_init__(self) -> None:
        _check(bool(self.experiment.strip()), "tracking.experiment must not be empty")


@dataclass
class Config:
    """A whole run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ilora: IloraConfig = field(default_factory=IloraConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        _check(not (self.train.weights == "bf16" and self.optim.ema_decay),
               "train.weights=bf16 cannot be combined with optim.ema_decay (the average would be bf16 "
               "too); set train.weights=fp32")
        _check(not (self.optim.moments == "bf16" and self.train.weights == "fp32"),
               "optim.moments=bf16 needs bf16 weights: set train.weights=bf16 (or auto)")
        _check(self.train.batch_scope == "worker" or self.train.batch_size % self.resources.workers == 0,
               f"train.batch_size={self.train.batch_size} with train.batch_scope=global must be a multiple of "
               f"resources.workers={self.resources.workers}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """`{"optim.lr": 0.001, ...}`: the shape MLflow params and search spaces use."""
        return {f"{section}.{key}": value
                for section, values in self.to_dict().items() for key, value in values.items()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Config":
        _check(isinstance(raw, dict), "a config must be a mapping of sections")
        sections = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(sections))
        _check(not unknown, f"unknown config section(s) {', '.join(map(repr, unknown))}; "
                            f"valid: {', '.join(sections)}")
        built = {}
        for name, f in sections.items():
            section_cls = f.default_factory  # type: ignore[misc]
            values = raw.get(name) or {}
            _check(isinstance(values, dict), f"config section {name!r} must be a mapping")
            known = section_keys(name)
            bad = sorted(set(values) - set(known))
            _check(not bad, f"unknown key(s) {', '.join(f'{name}.{k}' for k in bad)}; "
                            f"valid: {', '.join(f'{name}.{k}' for k in known)}")
            coerced = {k: coerce(f"{name}.{k}", v, known[k]) for k, v in values.items()}
            built[name] = section_cls(**coerced)
        return cls(**built)


def section_keys(section: str) -> dict[str, Any]:
    """Field name -> type for one config section."""
    section_cls = {f.name: f.default_factory for f in dataclasses.fields(Config)}[section]
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def all_keys() -> dict[str, Any]:
    """Every dotted key (`optim.lr`) with its type."""
    return {f"{s}.{k}": t for s in (f.name for f in dataclasses.fields(Config))
            for k, t in section_keys(s).items()}


def coerce(key: str, value: Any, annotation: Any) -> Any:
    """Turn a YAML value or a `--set` string into the field's type, or raise UserError."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), annotation) if args else annotation
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null")):
        _check(optional, f"{key} may not be empty")
        return None
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            return int(str(value).strip())
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            result = float(value)
            if not math.isfinite(result):
                raise ValueError
            return result
        if base is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise UserError(f"{key}={value!r} is not a valid {base.__name__}") from None
    raise UserError(f"{key} has unsupported type {annotation}")


def parse_overrides(pairs: typing.Iterable[str]) -> dict[str, dict[str, str]]:
    """`["optim.lr=3e-4"]` -> `{"optim": {"lr": "3e-4"}}`, rejecting unknown keys."""
    keys = all_keys()
    nested: dict[str, dict[str, str]] = {}
    for pair in pairs:
        _check("=" in pair, f"--set {pair!r} must look like section.key=value")
        key, value = pair.split("=", 1)
        key = key.strip()
        if key not in keys:
            import difflib

            close = difflib.get_close_matches(key, keys, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"valid: {', '.join(keys)}"
            raise UserError(f"unknown config key {key!r}; {hint}")
        section, name = key.split(".", 1)
        nested.setdefault(section, {})[name] = value
    return nested


def load_config(path: Optional[str] = None, overrides: typing.Iterable[str] = (),
                base: Optional[dict[str, Any]] = None) -> Config:
    """Defaults <- `base` <- YAML file <- `--set` overrides, validated once at the end."""
    raw: dict[str, Any] = {}
    for layer in (base or {}, _read_yaml(path) if path else {}, parse_overrides(overrides)):
        for section, values in layer.items():
            if isinstance(values, dict) and isinstance(raw.get(section), dict):
                raw[section] = {**raw[section], **values}
            else:
                raw[section] = values
    return Config.from_dict(raw)


def _read_yaml(path: str) -> dict[str, Any]:
    import yaml

    file = Path(path)
    _check(file.is_file(), f"config file {path}: not found")
    try:
        loaded = yaml.safe_load(file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"config file {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    _check(isinstance(loaded, dict), f"config file {path}: must be a mapping of sections")
    return loaded
