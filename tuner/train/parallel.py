"""Distribution in one place: the loop asks a `WorkerContext`, never `torch.distributed`.

`WorkerContext` answers: which rank am I, on which device, how do I sum metrics across ranks,
how is the model wrapped, where do I resume from and where do checkpoints go.
`local_context` is the single-process answer; `tuner.train.driver.ray_context` the Ray Train one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from tuner.config import TrainConfig
from tuner.errors import UserError


def pick_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("train.device=cuda but no CUDA device is available")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass
class WorkerContext:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    resume_dir: Optional[str] = None  # a checkpoint directory to continue from, if any
    resume_fallbacks: tuple[str, ...] = ()  # older checkpoint directories if resume_dir is unreadable
    checkpoint_root: Optional[str] = None  # one process: where its epoch checkpoints are written
    all_reduce_fn: Optional[Callable[[torch.Tensor], None]] = None
    wrap_fn: Optional[Callable[[nn.Module], nn.Module]] = None
    reports_checkpoints: bool = False  # Ray Train: checkpoints go to the reporter, which writes them

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Sum a dict of floats over ranks (identity on one process); every rank gets the result."""
        if self.all_reduce_fn is None or self.world_size == 1:
            return dict(values)
        keys = sorted(values)
        tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        self.all_reduce_fn(tensor)
        return dict(zip(keys, tensor.tolist()))

    def wrap(self, module: nn.Module) -> nn.Module:
        return module if self.wrap_fn is None else self.wrap_fn(module)

    def agree(self, value: int) -> bool:
        """Whether every rank holds the same `value` (an integer in [0, 2^31)); True on one process.
        Each rank checks the all-reduced sum against world_size x its own value (exact in float64)."""
        return self.sum({"v": float(value)})["v"] == self.world_size * float(value)


def weights_digest(tensors: Iterable[torch.Tensor]) -> int:
    """A fingerprint of floating-point tensors (a state dict's values, a parameter list), in
    [0, 2^31): each tensor's bit pattern summed as integers (exact, so the same on any device and
    in any reduction order), combined in the given order. Ranks whose weights differ in any bit
    get different digests, but for collisions as unlikely as 2^-31."""
    digest = 0
    for index, tensor in enumerate(tensors):
        if not tensor.is_floating_point():
            continue
        bits = tensor.detach().contiguous().view({1: torch.int8, 2: torch.int16, 4: torch.int32,
                                                  8: torch.int64}[tensor.element_size()])
        total = int(bits.sum(dtype=torch.int64)) if bits.numel() else 0
        digest = (digest * 1_000_003 + (index + 1) * total) % 2_147_483_647
    return digest


def local_context(cfg: TrainConfig) -> WorkerContext:
    """One process: checkpoints in train.checkpoint_dir, resumed from there when present."""
    return WorkerContext(device=pick_device(cfg), resume_dir=cfg.checkpoint_dir,
                         checkpoint_root=cfg.checkpoint_dir)
