"""Training objectives over masked positions.

`MaskedItemObjective` wraps the model so DDP and `torch.compile` see one module whose forward
returns the loss: it encodes the batch, picks the hidden states of the masked positions only
(never full-catalog logits for unmasked ones), and scores them against the catalog.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tuner.data.collate import IGNORE
from tuner.model.bert4rec import Bert4Rec


def full_ce(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over the whole catalog. labels: item ids 1..V, IGNORE on padding."""
    logits = hidden @ weight.t() + bias
    targets = torch.where(labels == IGNORE, -100, labels - 1)
    return F.cross_entropy(logits.float(), targets, ignore_index=-100)


LOSSES = {"ce": full_ce}


class MaskedItemObjective(nn.Module):
    """forward(items, positions, labels) -> mean loss over the masked positions."""

    def __init__(self, model: Bert4Rec, loss: str = "ce"):
        super().__init__()
        self.model = model
        self.loss_fn = LOSSES[loss]

    def forward(self, items: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = self.model(items)
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        weight, bias = self.model.output_embedding()
        return self.loss_fn(rows, weight, bias, labels)
