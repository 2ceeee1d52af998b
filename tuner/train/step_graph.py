"""The whole training step as one CUDA graph (`train.step_graph`).

torch.compile's CUDA graphs (`train.compile_mode=reduce-overhead`) replay the compiled forward and
backward, but the host still runs the rest of every step itself: Dynamo's guards and the graph
trees' checks of their inputs and outputs, the gradient norm's launches, the optimizer's update
(the fused AdamW's launch, or the masters' compiled update with its own guards), zero_grad. On an
H200 the host took 2.1-3.1 ms to issue a 5M step against a 2.6-3.1 ms step, so a small model's
step waited on it on some machines (benchmarks/results/h200_session32/, `host_ms`).

Here the step is captured once, whole, as PyTorch's notes on CUDA semantics describe for "whole
network capture": after `WARMUP` steps run as usual on a side stream (they compile the step and
create the optimizer's state), one step is captured (forward, backward, clipping, the update,
zero_grad) and every step from then on replays it. A replay copies the batch into the graph's
input tensors, writes the scheduler's learning rates into the tensors the update reads, and
launches the graph. Dropout stays random: every draw is made on the device from the CUDA
generator, whose offsets move on at each replay. On an H200 the host then issued a step in
0.15-0.33 ms at every size, and the 85M and 5M steps took 0.84x and 0.87x the time; peak memory
grew by about 100 MB (benchmarks/results/h200_session33/, README's session 33).

Outside the graph: the scheduler (host arithmetic) and whatever the caller does between steps
(the weight average, evaluation). What it needs: fixed shapes (`train.static_shapes`), one
worker (DDP's all-reduces are not captured here), and an optimizer whose learning rate the graph
reads from a tensor: the fused AdamW (made `capturable`, its lr a device tensor while captured) or
`MasterWeightAdamW`. fp16's GradScaler is captured too (since session 37): with the fused AdamW
(every fp16 run on a GPU has it: bf16 weights need bf16 autocast) its unscaling, overflow check,
skipped update and scale update are all device work (`_step_supports_amp_scaling`: the scaler
hands the optimizer its `found_inf` tensor instead of reading it on the host). Loading an
optimizer state replaces the state tensors a graph would read, so it drops the graph; the next
step captures again.

Since session 34 this is the default wherever it applies (`resolve_step`): a trial on one GPU
worker gets the step graph and fixed batch shapes without settings, unless an epoch holds fewer
than MIN_BATCHES batches; `train.static_shapes=false` or `train.step_graph=off` keeps plain
compile.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from tuner.config import Config, TrainConfig
from tuner.data.collate import TrainBatch
from tuner.errors import UserError

# steps run as usual before the capture (PyTorch's whole-network example warms up 3 on a side
# stream): the first compiles the step, every kernel and the optimizer's state exist after it
WARMUP = 3

# a compile mode that replays CUDA graphs -> the same mode without them, for the objective inside
# the step's own graph (inductor's graph trees cannot be captured inside another capture)
WITHOUT_GRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


# train.static_shapes=auto fixes the shapes only where an epoch holds this many batches: the rows
# that fill up its last batch (users it trains twice, tuner.data.collate.train_batches) are then
# under 1/8 of the epoch
MIN_BATCHES = 8


def step_graph_blocker(train: TrainConfig, device: torch.device, world_size: int, compiled: bool) -> Optional[str]:
    """What keeps this run's step from being captured whole, as the end of "train.step_graph=on
    needs ...", or None."""
    if device.type != "cuda":
        return f"a CUDA device (this run is on {device.type})"
    if not compiled:
        return "train.compile on"
    if train.static_shapes == "false":
        return "fixed batch shapes (this run has train.static_shapes=false)"
    if world_size > 1:
        return f"one worker (this run has {world_size})"
    return None


def resolve_step(cfg: Config, device: torch.device, world_size: int, compiled: bool,
                 batches: Optional[int] = None) -> Config:
    """`cfg` with `train.step_graph` (on / off) and `train.static_shapes` (true / false) decided for
    this run; everything that follows the step's shape (the C++ wrapper, add_norm's kernels, the
    batches) reads them from there. `batches`: batches in an epoch (None: plenty).

    step_graph auto: on where `step_graph_blocker` finds nothing, the compile mode is not
    max-autotune-no-cudagraphs, and static shapes are asked for or (auto) an epoch holds at least
    MIN_BATCHES batches, so the users repeated to fill the last batch are a small share; on: a UserError
    naming what the run lacks. static_shapes auto: true where the step graph is on."""
    train = cfg.train
    graph = False
    if train.step_graph != "off":
        missing = step_graph_blocker(train, device, world_size, compiled)
        if train.step_graph == "on":
            if missing:
                raise UserError(f"train.step_graph=on needs {missing}")
            graph = True
        else:
            few = train.static_shapes == "auto" and batches is not None and batches < MIN_BATCHES
            graph = missing is None and not few and train.compile_mode != "max-autotune-no-cudagraphs"
    static = train.static_shapes == "true" or (train.static_shapes == "auto" and graph)
    resolved = dataclasses.replace(train, step_graph="on" if graph else "off",
                                   static_shapes="true" if static else "false")
    return dataclasses.replace(cfg, train=resolved)


class StepGraph:
    """Runs `update` (one optimizer step's device work on a batch, returning its loss as a tensor)
    as usual `warmup` times, then captures it as one CUDA graph and replays that. `optimizer` is
    the one `update` steps: its learning rates are written into tensors before every replay."""

    def __init__(self, update: Callable[[TrainBatch], torch.Tensor], optimizer: torch.optim.Optimizer,
                 device: torch.device, warmup: int = WARMUP):
        self.update, self.optimizer, self.device, self.warmup = update, optimizer, device, warmup
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.calls = 0  # steps run as usual so far
        self.inputs: Optional[TrainBatch] = None  # the tensors the graph reads its batch from
        self.loss: Optional[torch.Tensor] = None  # the tensor the graph writes the loss into
        self.lrs: list[tuple[dict, torch.Tensor]] = []  # the fused AdamW's groups and their lr tensors
        # MasterWeightAdamW writes its learning rates into tensors of its own; torch's AdamW gets ours
        self.prepare: Optional[Callable[[], None]] = getattr(optimizer, "prepare_step", None)
        self.side = torch.cuda.Stream(device)
        optimizer.register_load_state_dict_post_hook(lambda _: self.drop())

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def drop(self) -> None:
        """Forget the graph (its memory goes back to the allocator); the next step captures again."""
        self.graph = self.inputs = self.loss = None
        self.lrs = []

    def __call__(self, batch: TrainBatch) -> torch.Tensor:
        if self.graph is None:
            if self.calls < self.warmup:
                self.calls += 1
                return self._on_side_stream(batch)
            self._capture(batch)
        return self._replay(batch)

    def _on_side_stream(self, batch: TrainBatch) -> torch.Tensor:
        current = torch.cuda.current_stream(self.device)
        self.side.wait_stream(current)
        with torch.cuda.stream(self.side):
            loss = self.update(batch)
        current.wait_stream(self.side)
        return loss

    def _capture(self, batch: TrainBatch) -> None:
        self.inputs = batch.map(torch.Tensor.clone)
        # torch's AdamW reads its lr from a device tensor while captured (a float otherwise);
        # MasterWeightAdamW has tensors of its own (made anew after a loaded state drops them)
        if self.prepare is None:
            self.lrs = [(group, torch.zeros((), dtype=torch.float32, device=self.device))
                        for group in self.optimizer.param_groups]
        self._write_lrs()
        self.optimizer.zero_grad(set_to_none=True)  # the gradients come from the graph's memory
        graph = torch.cuda.CUDAGraph()
        saved = [(group["lr"], group.get("capturable", False)) for group, _ in self.lrs]
        try:
            for group, lr in self.lrs:
                group["lr"], group["capturable"] = lr, True  # capturable: torch's check before a capture
            torch.cuda.synchronize(self.device)
            with torch.cuda.graph(graph):
                self.loss = self.update(self.inputs)
        finally:  # the groups as they were: a float lr for the scheduler and the state dict
            for (group, _), (lr, capturable) in zip(self.lrs, saved):
                group["lr"], group["capturable"] = lr, capturable
        self.graph = graph

    def _replay(self, batch: TrainBatch) -> torch.Tensor:
        targets = self.inputs.tensors()
        for name, source in batch.tensors().items():
            target = targets[name]
            if source.shape != target.shape:
                raise RuntimeError(f"train.step_graph: a batch's {name} has shape {tuple(source.shape)}, "
                                   f"the captured step's {tuple(target.shape)} (train.static_shapes keeps them fixed)")
            target.copy_(source, non_blocking=True)
        self._write_lrs()
        self.graph.replay()
        return self.loss.clone()  # the next replay overwrites the graph's own

    def _write_lrs(self) -> None:
        """The scheduler's learning rates of this step into the tensors the captured update reads:
        MasterWeightAdamW's own (`prepare_step`), or the lr tensors standing in for torch's AdamW's."""
        if self.prepare is not None:
            self.prepare()
        for group, lr in self.lrs:
            lr.fill_(float(group["lr"]))
