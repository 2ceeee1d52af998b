"""iLoRA: instance-wise LoRA (Kong et al., NeurIPS 2024) on a frozen BERT4Rec.

A LoRA of total rank r is split into K experts of rank r/K. A router reads one representation
per sequence and gives softmax weights g over the experts; every adapted linear adds
`alpha / r * sum_k g_k B_k A_k dropout(x)` to its frozen output. Stacking the experts,
that is `B_cat (g expanded over each expert's rank  *  A_cat dropout(x))`: two thin matmuls and one
multiply, the same shapes for every batch and no Python branching on data, so `torch.compile`
traces it once.

Adapted: Q/K/V/O and both feed-forward linears of every block (the model's explicit linears).
Everything else is frozen: embeddings, LayerNorms, the head.

Router input (`ilora.router`):
- `history` (default): the mean of the frozen item embeddings over the visible history (padding
  and mask tokens excluded). Free: the embedding lookup is already done for the encoder, and the
  gate for a request depends only on what the user did, so it is identical in training
  (masked positions are hidden from it) and serving.
- `encoder`: the mean of the frozen encoder's output over the same positions, closer to the
  paper's (which reads a pretrained SASRec's sequence representation); it costs one extra
  forward pass without gradients per step (`tuner bench --ilora --set ilora.router=encoder`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tuner.model.rate_dropout import RateDropout

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")


@dataclass
class IloraSpec:
    rank: int = 8
    experts: int = 4
    alpha: float = 32.0
    dropout: float = 0.1
    router: str = "history"


class MoELoRALinear(nn.Module):
    """A frozen `nn.Linear` plus K gated LoRA experts of rank r/K each."""

    def __init__(self, base: nn.Linear, spec: IloraSpec):
        super().__init__()
        self.base = base
        self.experts, self.expert_rank = spec.experts, spec.rank // spec.experts
        self.scaling = spec.alpha / spec.rank
        rank = self.experts * self.expert_rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))  # zero: starts as the base model
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = RateDropout(spec.dropout)  # tuned per trial: a graph input, not a constant

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, in], gate [B, K] (None: the frozen base alone)."""
        out = self.base(x)
        if gate is None:
            return out
        low = F.linear(self.dropout(x), self.lora_A)  # [B, L, K * r/K]
        weights = gate.repeat_interleave(self.expert_rank, dim=-1)[:, None, :].to(low.dtype)
        return out + F.linear(low * weights, self.lora_B) * self.scaling


class Router(nn.Module):
    """Per-sequence softmax weights over the experts."""

    def __init__(self, hidden: int, experts: int, source: str):
        super().__init__()
        self.source = source
        self.proj = nn.Linear(hidden, experts)
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, model, items: torch.Tensor) -> torch.Tensor:
        visible = ((items != 0) & (items != model.cfg.mask_token)).unsqueeze(-1)
        if self.source == "encoder":
            with torch.no_grad():
                states = model.encode(items, gate=None)
        else:
            states = model.item_emb(items)
        states = states.detach().float() * visible
        pooled = states.sum(1) / visible.sum(1).clamp(min=1)
        return torch.softmax(self.proj(pooled), dim=-1)


def apply_ilora(model: nn.Module, spec: IloraSpec) -> nn.Module:
    """Freeze `model` and add the experts and the router in place; returns the model."""
    if spec.rank % spec.experts:
        raise ValueError(f"ilora.rank={spec.rank} must be a multiple of ilora.experts={spec.experts}")
    for param in model.parameters():
        param.requires_grad_(False)
    for block in model.blocks:
        for parent in (block.attn, block.ffn):
            for name in TARGETS:
                if isinstance(getattr(parent, name, None), nn.Linear):
                    setattr(parent, name, MoELoRALinear(getattr(parent, name), spec))
    model.router = Router(model.cfg.hidden, spec.experts, spec.router)
    return model


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable iLoRA parameters by name (experts and router)."""
    return {n: p for n, p in model.named_parameters() if "lora_" in n or n.startswith("router.")}
