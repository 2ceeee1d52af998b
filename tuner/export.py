"""An inference graph with `torch.export` (the seed used `torch.jit.trace`, no longer developed).

`export_scorer` exports "history ids [B, max_len] (mask token last) -> catalog scores [B, V]" for
the model's fixed maximum length with a dynamic batch dimension; `save`/`load` round-trip it as a
`.pt2` file that needs no Python model code to run.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tuner.model import short_attention
from tuner.model.bert4rec import Bert4Rec, last_rows


class CatalogScorer(nn.Module):
    """Scores of every item for the position of the trailing mask token."""

    def __init__(self, model: Bert4Rec):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.model(ids, rows=last_rows(ids))
        weight, bias = self.model.output_embedding()
        return hidden @ weight.t() + bias


def export_scorer(model: Bert4Rec, max_batch: int = 4096) -> torch.export.ExportedProgram:
    model = model.eval()
    cfg = model.cfg
    # on the model's device: export bakes tensors it creates (positions) onto the example's device
    example = torch.zeros(2, cfg.max_len, dtype=torch.long, device=next(model.parameters()).device)
    example[:, -2] = 1
    example[:, -1] = cfg.mask_token
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with short_attention.portable():  # SDPA, not the Triton kernel's custom op: plain ATen ops only
        return torch.export.export(CatalogScorer(model), (example,), dynamic_shapes={"ids": {0: batch}})


def save(program: torch.export.ExportedProgram, path: str | Path) -> Path:
    torch.export.save(program, str(path))
    return Path(path)


def load(path: str | Path) -> torch.export.ExportedProgram:
    return torch.export.load(str(path))
