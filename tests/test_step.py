"""The optimizer step: clipping inside the fused AdamW is the same update as clip_grad_norm_."""

import torch

from tuner.config import load_config
from tuner.data.collate import train_batches
from tuner.data.synthetic import generate
from tuner.losses import MaskedItemObjective
from tuner.model.bert4rec import Bert4Rec
from tuner.model.build import model_config
from tuner.train.optim import build_optimizer
from tuner.train.step import TrainStep


def _train(fused_clip: bool, grad_clip: float, steps: int = 4) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    cfg = load_config(overrides=["model.max_len=16"])
    data = generate(200, 60, seed=0)
    model = Bert4Rec(model_config(cfg, data.num_items))
    groups = [{k: g[k] for k in ("params", "lr", "weight_decay")}
              for g in build_optimizer(model, cfg.optim, torch.device("cpu")).param_groups]
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, fused=True)  # as on a GPU
    step = TrainStep(MaskedItemObjective(model), list(model.parameters()), optimizer, None, None, grad_clip,
                     torch.device("cpu"), fused_clip=fused_clip)
    assert step.fused_clip == fused_clip
    for batch in list(train_batches(data.sequences, data.num_items, 32, 16, 0.3, 0.1, seed=0, epoch=0))[:steps]:
        step(batch)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_clipping_inside_the_fused_optimizer_matches_a_separate_clip():
    separate = _train(fused_clip=False, grad_clip=0.05)  # far below the gradients' norm: clipping acts
    fused = _train(fused_clip=True, grad_clip=0.05)
    unclipped = _train(fused_clip=True, grad_clip=0.0)
    for name, p in separate.items():
        torch.testing.assert_close(fused[name], p, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(unclipped[n], p, rtol=1e-3, atol=1e-5) for n, p in separate.items())


def test_fp16_loss_scaling_keeps_the_separate_clip():
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    step = TrainStep(model, list(model.parameters()), optimizer, None, torch.float16, 1.0, torch.device("cpu"))
    assert step.scaler.is_enabled()  # fp16: the loss is scaled, so the clip is unscaled first
    assert step.fused_clip is False
