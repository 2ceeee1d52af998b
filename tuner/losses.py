"""Training objectives over masked positions, for catalogs up to millions of items.

`MaskedItemObjective` wraps the model so DDP and `torch.compile` see one module whose forward
returns the loss: it encodes the batch, picks the hidden states of the masked positions only
(never full-catalog logits for unmasked positions) and applies one of:

- `ce`: full softmax cross-entropy over the catalog (the reference). Materialises an
  [N, V] logit matrix: 102 GB in bf16 at 1M items and 51,200 positions.
- `focal`: the seed project's focal loss, (1 - p)^gamma x CE, on the masked positions only.
- `cce`: cut cross-entropy (Wijmans et al. 2024). On CUDA in bf16/fp16 (autocast), the Triton
  kernels of `tuner.cce_kernel`: the log-sum-exp is folded tile by tile in registers and the
  backward recomputes one [N, loss_chunk] block of logit gradients at a time. Elsewhere (CPU,
  fp32, or `kernel="torch"`) a chunked PyTorch function with the same memory bound: the
  log-sum-exp over the catalog is computed chunk by chunk and its backward recomputes each
  chunk's logits, so no more than one [N, loss_chunk] block of logits ever exists. Exact; it is
  the reference the kernels are tested against.
- `sampled_ce` (CE-): sampled softmax with log-Q correction over `num_negatives` negatives drawn
  uniformly or by training popularity, shared across the batch or drawn per position;
  negatives that equal the target are masked out.
- `cce_sampled` (CCE-, Zhelnin et al. 2025): the sampled softmax with shared negatives through the
  chunked log-sum-exp, so memory stays at one chunk even with many negatives.

Losses take hidden rows [N, H], the output embedding (weight [V, H], bias [V]) and labels
(item ids 1..V, IGNORE on padding) and return the mean over real labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from tuner import cce_kernel, ce_kernel
from tuner.data.collate import IGNORE
from tuner.model.bert4rec import Bert4Rec

LOSS_NAMES = ("ce", "focal", "cce", "sampled_ce", "cce_sampled")


@dataclass
class LossConfig:
    name: str = "ce"
    chunk: int = 8192  # catalog items per logit block (cce, cce_sampled)
    num_negatives: int = 1024  # sampled losses
    sampling: str = "uniform"  # uniform | popularity
    shared_negatives: bool = True  # one set of negatives for the whole batch (sampled_ce)
    focal_gamma: float = 2.0  # focal
    # auto = Triton kernels on CUDA in bf16/fp16 (cce, cce_sampled: tuner.cce_kernel; ce, focal: the
    # softmax passes of tuner.ce_kernel); torch = chunked PyTorch (cce) or inductor's code (ce)
    kernel: str = "auto"
    align: int = 8  # ce, focal on CUDA: logit columns rounded up to a multiple of this (1 = as many as items)
    fused_table: bool = True  # ce, focal, tied head: one autograd node for the item table's two uses
    # logit column of item 1: 1 when the head starts at the padding row (TiedItemTable's), whose
    # column the bias masks; the columns stay as the GEMM wrote them (a sliced-off first column
    # would misalign every row the softmax kernels read: 0.4 ms more per 430M step on an H100)
    head_offset: int = 0


def loss_config(train, name: Optional[str] = None) -> LossConfig:
    """The LossConfig a `TrainConfig` describes (its `loss`, unless `name` is given)."""
    return LossConfig(name=name or train.loss, chunk=train.loss_chunk, num_negatives=train.num_negatives,
                      sampling=train.negative_sampling, shared_negatives=train.shared_negatives,
                      focal_gamma=train.focal_gamma, kernel=train.loss_kernel, align=train.logit_align,
                      fused_table=train.fused_table)


class TiedItemTable(torch.autograd.Function):
    """The tied item table's two uses as one autograd node: the input rows of `items`, and the
    output head's weight: the whole table, row i scoring item i, cast to `dtype` and zero rows
    appended up to a multiple of `align`, as `catalog_logits` would pad it. The caller's bias masks
    the padding row's, the mask token's and the appended rows' logit columns with -inf.

    Autograd would otherwise give the table two gradients and add them: a dense [V, H] buffer
    for the input rows (zeros, then a scatter) and the head's, sliced back from its padding and
    cast to fp32, and a third pass to sum them. Here the head's gradient is the table's (rows 0
    and V+1 take no probability, so get none) and the input rows' gradients are added to it in place: one
    pass over the table's gradient instead of three, none with bf16 weights. The values are the
    same sums (the input rows' additions may come in another order); the padding row gets none,
    as `padding_idx` says.
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, items: torch.Tensor, align: int, dtype: torch.dtype):
        ctx.save_for_backward(items)
        ctx.table_shape, ctx.table_dtype = table.shape, table.dtype
        head = table.to(dtype)
        pad = -head.shape[0] % align
        if pad:
            head = F.pad(head, (0, 0, 0, pad))
        elif head.dtype == table.dtype:
            head = head.view_as(head)  # the table itself: no copy
        return F.embedding(items, table, padding_idx=0), head

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor, grad_head: torch.Tensor):
        (items,) = ctx.saved_tensors
        rows, dtype = ctx.table_shape[0], ctx.table_dtype
        grad = grad_head[:rows]
        if grad.dtype != dtype or not torch.compiler.is_compiling():
            grad = grad.to(dtype, copy=True)  # eager code never writes into the incoming gradient
        values = (grad_rows * (items != 0).unsqueeze(-1)).reshape(-1, grad.shape[1])  # padding_idx
        ids = items.reshape(-1)
        if dtype != torch.float32:
            # bf16 weights: each item's rows summed in fp32 and added to its head-gradient row in
            # fp32, one rounding per row. Written back by index (ids distinct but for the padding
            # row, whose writes are all zero): compiled, an index_add_ on bf16 falls back to
            # aten's out-of-place one, which first copies the whole gradient
            ids, sums = _sum_rows_by_id(ids, values)
            return grad.index_put_((ids,), (grad[ids].float() + sums).to(dtype)), None, None, None
        # index_add_, not index_put_(accumulate=True): on a CPU only the former sums in a fixed
        # order, which exact resumption needs (tests/test_train.py)
        return grad.index_add_(0, ids, values.to(dtype)), None, None, None


def _sum_rows_by_id(ids: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids', sums) with each distinct id of `ids` once and the fp32 sum of its `values` rows.

    An item that fills many positions of a batch would otherwise have its rows added one by one to
    a bf16 gradient, rounding after every addition. Shapes stay static (no host sync, compiles):
    ids' has as many entries as ids; the spare ones are id 0 with zero sums (the padding row, which
    the caller's values leave at zero)."""
    # 32-bit keys: a radix sort makes 4 passes over them instead of 8 (catalogs stay far below 2^31)
    sorted_ids, order = ids.to(torch.int32).sort()
    first = torch.cat([sorted_ids.new_ones(1, dtype=torch.bool), sorted_ids[1:] != sorted_ids[:-1]])  # an id starts
    group = first.cumsum(0) - 1
    sums = values.new_zeros(values.shape, dtype=torch.float32).index_add_(0, group, values[order].float())
    unique = torch.zeros_like(ids).scatter_(0, group, sorted_ids.to(ids.dtype))  # every write of a group is its id
    return unique, sums


class ChunkedLogSumExp(torch.autograd.Function):
    """logsumexp(hidden @ weight.T + bias, dim=1) without holding more than one chunk of logits."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, chunk: int) -> torch.Tensor:
        acc = torch.promote_types(hidden.dtype, torch.float32)  # accumulate in fp32 at least
        lse = torch.full((hidden.shape[0],), -math.inf, device=hidden.device, dtype=acc)
        for start in range(0, weight.shape[0], chunk):
            logits = (hidden @ weight[start:start + chunk].t()).to(acc) + bias[start:start + chunk].to(acc)
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
        ctx.save_for_backward(hidden, weight, bias, lse)
        ctx.chunk = chunk
        return lse

    @staticmethod
    def backward(ctx, grad_lse: torch.Tensor):
        hidden, weight, bias, lse = ctx.saved_tensors
        chunk, acc = ctx.chunk, lse.dtype
        grad_hidden = torch.zeros(hidden.shape, device=hidden.device, dtype=acc)
        grad_weight = torch.empty(weight.shape, device=weight.device, dtype=acc)
        grad_bias = torch.empty(bias.shape, device=bias.device, dtype=acc)
        scale = grad_lse.to(acc)[:, None]
        for start in range(0, weight.shape[0], chunk):
            block = weight[start:start + chunk]
            logits = (hidden @ block.t()).to(acc) + bias[start:start + chunk].to(acc)
            probs = torch.exp(logits - lse[:, None]) * scale  # d lse / d logits, times upstream grad
            grad_hidden += (probs.to(block.dtype) @ block).to(acc)
            grad_weight[start:start + chunk] = (probs.t().to(hidden.dtype) @ hidden).to(acc)
            grad_bias[start:start + chunk] = probs.sum(0)
        return grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), grad_bias.to(bias.dtype), None


class ChunkedCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy lse(logits) - logit[target] (0 on ignored rows), one logit chunk at a time.

    The target term lives inside the function so the weight gradient is a single dense buffer
    (the target rows are subtracted in place), not three summed by autograd.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, index, chunk):
        lse = ChunkedLogSumExp.forward(ctx, hidden, weight, bias, chunk)
        valid = index >= 0
        safe = index.clamp(min=0)
        target = (hidden * weight[safe]).sum(-1).to(lse.dtype) + bias[safe].to(lse.dtype)
        ctx.save_for_backward(hidden, weight, bias, lse, index)
        return torch.where(valid, lse - target, torch.zeros_like(lse))

    @staticmethod
    def backward(ctx, grad_rows):
        hidden, weight, bias, lse, index = ctx.saved_tensors
        acc = lse.dtype
        valid = index >= 0
        scale = torch.where(valid, grad_rows.to(acc), torch.zeros_like(lse))
        grad_hidden = torch.zeros(hidden.shape, device=hidden.device, dtype=acc)
        grad_weight = torch.empty(weight.shape, device=weight.device, dtype=acc)
        grad_bias = torch.empty(bias.shape, device=bias.device, dtype=acc)
        for start in range(0, weight.shape[0], ctx.chunk):
            block = weight[start:start + ctx.chunk]
            logits = (hidden @ block.t()).to(acc) + bias[start:start + ctx.chunk].to(acc)
            probs = torch.exp(logits - lse[:, None]) * scale[:, None]
            grad_hidden += (probs.to(block.dtype) @ block).to(acc)
            grad_weight[start:start + ctx.chunk] = (probs.t().to(hidden.dtype) @ hidden).to(acc)
            grad_bias[start:start + ctx.chunk] = probs.sum(0)
        safe = index.clamp(min=0)  # minus the one-hot of the target
        grad_hidden -= scale[:, None] * weight[safe].to(acc)
        grad_weight.index_add_(0, safe, -scale[:, None] * hidden.to(acc))
        grad_bias.index_add_(0, safe, -scale)
        return grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), grad_bias.to(bias.dtype), None, None


def chunked_logsumexp(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, chunk: int) -> torch.Tensor:
    return ChunkedLogSumExp.apply(hidden, weight, bias, chunk)


def _kernel_dtype(hidden: torch.Tensor, cfg: LossConfig) -> Optional[torch.dtype]:
    """The dtype the Triton kernels compute in, or None for the chunked PyTorch path.

    Under autocast the kernels take its dtype (as a matmul would); without it, half-precision
    inputs as they are; fp32 without autocast stays on the exact PyTorch path. CPU tensors reach
    the kernels only under Triton's interpreter (the tests).
    """
    if cfg.kernel == "torch" or not cce_kernel.usable_on(hidden):
        return None
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return hidden.dtype if hidden.dtype in (torch.bfloat16, torch.float16) else None


def _cut_rows(hidden, weight, bias, index, cfg: LossConfig, with_target: bool) -> torch.Tensor:
    """Per row: lse - target logit (0 where index < 0) if with_target, else the lse alone."""
    dtype = _kernel_dtype(hidden, cfg)
    if dtype is not None:
        return cce_kernel.cut_ce_rows(hidden.to(dtype), weight.to(dtype), bias.to(dtype), index, cfg.chunk,
                                      with_target)[0]
    if with_target:
        return ChunkedCrossEntropy.apply(hidden, weight, bias, index, cfg.chunk)
    return ChunkedLogSumExp.apply(hidden, weight, bias, cfg.chunk)


def _target_logits(hidden, weight, bias, labels):
    index = (labels.clamp(min=1) - 1)
    acc = torch.promote_types(hidden.dtype, torch.float32)
    return (hidden * weight[index]).sum(-1).to(acc) + bias[index].to(acc), labels != IGNORE


def _masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return (values * valid).sum() / valid.sum().clamp(min=1)


def catalog_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, align: int = 1) -> torch.Tensor:
    """[N, V'] logits of hidden rows against the whole catalog, V rounded up to a multiple of
    `align` columns. The extra columns score zero rows with a -inf bias, so they take no
    probability and no gradient, and item i's logit stays at column i - 1. Aligned rows let cuBLAS
    use its Hopper kernels (16-byte-aligned rows); with an odd catalog such as 159,750 items it
    falls back to slower ones. A weight that comes padded already (`TiedItemTable`) keeps its rows;
    the bias is padded to match it."""
    weight, bias = _aligned_head(weight, bias, align)
    return hidden @ weight.t() + bias


def _aligned_head(weight: torch.Tensor, bias: torch.Tensor, align: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`catalog_logits`'s weight and bias, padded to a multiple of `align` rows (-inf bias)."""
    pad = -weight.shape[0] % align
    if pad:
        weight = F.pad(weight, (0, 0, 0, pad))
    if weight.shape[0] > bias.shape[0]:
        bias = F.pad(bias, (0, weight.shape[0] - bias.shape[0]), value=float("-inf"))
    return weight, bias


def _align(cfg: LossConfig, tensor: torch.Tensor) -> int:
    """The logit column multiple for tensors on `tensor`'s device: cfg.align on CUDA, else 1."""
    return cfg.align if tensor.is_cuda else 1


def _aligned_logits(hidden, weight, bias, cfg: LossConfig) -> torch.Tensor:
    return catalog_logits(hidden, weight, bias, _align(cfg, hidden))


def _row_ce(hidden, weight, bias, labels, cfg: LossConfig) -> torch.Tensor:
    """Per row: log-sum-exp of the catalog logits (fp32) minus the target's logit.

    Written as logsumexp - gather rather than log_softmax + nll_loss: the backward of log_softmax
    needs a row sum of its incoming gradient, so the compiled backward reads the [N, V] logits
    twice (a reduction, then the gradient); logsumexp saves its result, and its backward,
    softmax minus the one-hot target, is one pointwise pass (benchmarks/ce_backward.py).
    Ignored rows give lse minus item 1's logit, which the callers mask out.

    Under torch.compile the target logit is picked by a one-hot compare and a row sum instead of
    a gather: the sum joins the logsumexp's pass over the logits, and its gradient joins the
    softmax's, where a gather's backward would scatter into a zeroed [N, V] buffer of its own.
    Eager code keeps the gather, which builds no [N, V] temporaries.

    On CUDA in bf16/fp16 (`cfg.kernel` auto) the bias-free GEMM output goes to `ce_kernel.catalog_ce`'s
    Triton passes instead, which read the logits once each way (0.85 against 0.4 ms per 430M step)."""
    index = (labels.clamp(min=1) - 1 + cfg.head_offset)[:, None]
    if cfg.kernel == "auto" and ce_kernel.usable(hidden):
        weight, bias = _aligned_head(weight, bias, _align(cfg, hidden))
        return ce_kernel.catalog_ce(hidden @ weight.t(), bias, index.squeeze(1))[0]
    logits = _aligned_logits(hidden, weight, bias, cfg)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if torch.compiler.is_compiling():
        hit = torch.arange(logits.shape[1], device=logits.device)[None, :] == index
        target = torch.where(hit, logits, 0.0).sum(1)
    else:
        target = logits.gather(1, index).squeeze(1)
    return torch.logsumexp(logits, dim=1) - target


def full_ce(hidden, weight, bias, labels, cfg: LossConfig, item_logq=None) -> torch.Tensor:
    return _masked_mean(_row_ce(hidden, weight, bias, labels, cfg), labels != IGNORE)


def cut_ce(hidden, weight, bias, labels, cfg: LossConfig, item_logq=None) -> torch.Tensor:
    valid = labels != IGNORE
    rows = _cut_rows(hidden, weight, bias, torch.where(valid, labels - 1, -1), cfg, with_target=True)
    return rows.sum() / valid.sum().clamp(min=1)


def _draw_negatives(cfg: LossConfig, shape, num_items: int, item_logq: Optional[torch.Tensor], device):
    if cfg.sampling == "popularity":
        flat = torch.multinomial(item_logq.exp(), math.prod(shape), replacement=True)
        return flat.view(shape)
    return torch.randint(0, num_items, shape, device=device)


def _logq(cfg: LossConfig, index: torch.Tensor, num_items: int, item_logq: Optional[torch.Tensor]) -> torch.Tensor:
    if cfg.sampling == "popularity":
        return item_logq[index] + math.log(cfg.num_negatives)
    return torch.full(index.shape, math.log(cfg.num_negatives / num_items), device=index.device)


def sampled_ce(hidden, weight, bias, labels, cfg: LossConfig, item_logq=None) -> torch.Tensor:
    """Sampled softmax with log-Q correction; accidental hits of the target are masked."""
    num_items = weight.shape[0]
    target, valid = _target_logits(hidden, weight, bias, labels)
    target_index = labels.clamp(min=1) - 1
    target = target - _logq(cfg, target_index, num_items, item_logq)
    if cfg.shared_negatives:
        negatives = _draw_negatives(cfg, (cfg.num_negatives,), num_items, item_logq, hidden.device)
        neg = (hidden @ weight[negatives].t()).to(target.dtype) + bias[negatives].to(target.dtype)
        neg = neg - _logq(cfg, negatives, num_items, item_logq)[None, :]
        hits = negatives[None, :] == target_index[:, None]
    else:
        negatives = _draw_negatives(cfg, (hidden.shape[0], cfg.num_negatives), num_items, item_logq, hidden.device)
        neg = torch.einsum("nh,nkh->nk", hidden, weight[negatives]).to(target.dtype) + bias[negatives].to(target.dtype)
        neg = neg - _logq(cfg, negatives, num_items, item_logq)
        hits = negatives == target_index[:, None]
    neg = neg.masked_fill(hits, -math.inf)
    lse = torch.logsumexp(torch.cat([target[:, None], neg], dim=1), dim=1)
    return _masked_mean(lse - target, valid)


def cut_sampled_ce(hidden, weight, bias, labels, cfg: LossConfig, item_logq=None) -> torch.Tensor:
    """CCE-: shared negatives, log-Q corrected, log-sum-exp over them in chunks."""
    num_items = weight.shape[0]
    target, valid = _target_logits(hidden, weight, bias, labels)
    target_index = labels.clamp(min=1) - 1
    target = target - _logq(cfg, target_index, num_items, item_logq)
    negatives = _draw_negatives(cfg, (cfg.num_negatives,), num_items, item_logq, hidden.device)
    neg_bias = bias[negatives].to(target.dtype) - _logq(cfg, negatives, num_items, item_logq)
    lse_neg = _cut_rows(hidden, weight[negatives], neg_bias.to(bias.dtype), target_index, cfg, with_target=False)
    lse = torch.logaddexp(target, lse_neg)
    return _masked_mean(lse - target, valid)


def focal(hidden, weight, bias, labels, cfg: LossConfig, item_logq=None) -> torch.Tensor:
    """The seed's "improved loss": focal loss (1 - p)^gamma * CE, on masked positions only."""
    ce = _row_ce(hidden, weight, bias, labels, cfg)
    weight_focal = (1 - torch.exp(-ce)) ** cfg.focal_gamma
    return _masked_mean(weight_focal * ce, labels != IGNORE)


LOSSES = {"ce": full_ce, "focal": focal, "cce": cut_ce, "sampled_ce": sampled_ce, "cce_sampled": cut_sampled_ce}


class MaskedItemObjective(nn.Module):
    """forward(items, positions, labels) -> mean loss over the masked positions."""

    def __init__(self, model: Bert4Rec, loss: str | LossConfig = "ce", item_counts: Optional[torch.Tensor] = None):
        super().__init__()
        self.model = model
        self.loss_cfg = loss if isinstance(loss, LossConfig) else LossConfig(name=loss)
        self.loss_fn = LOSSES[self.loss_cfg.name]
        self.tied_loss_cfg = replace(self.loss_cfg, head_offset=1)  # TiedItemTable's head: row i is item i
        counts = item_counts if item_counts is not None else torch.ones(model.cfg.num_items)
        probs = counts.double().clamp(min=0) + 1e-3  # every item may be drawn
        self.register_buffer("item_logq", (probs / probs.sum()).log().float(), persistent=False)

    def forward(self, items: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self._fused_table():
            rows, weight, bias = self._tied_forward(items, positions)
            cfg = self.tied_loss_cfg
        else:
            rows = self.model(items, rows=positions)
            weight, bias = self.model.output_embedding()
            cfg = self.loss_cfg
        return self.loss_fn(rows, weight, bias, labels, cfg, self.item_logq)

    def _fused_table(self) -> bool:
        model = self.model
        return (self.loss_cfg.fused_table and self.loss_cfg.name in ("ce", "focal") and model.cfg.tied_head
                and model.router is None and model.item_emb.weight.requires_grad)

    def _tied_forward(self, items: torch.Tensor, positions: torch.Tensor):
        """The hidden states at `positions`, the padded head through `TiedItemTable` (the whole
        table: row i is item i, so item 1's logit is column 1, `head_offset`) and its bias: -inf for
        the padding row here, for the mask token's row and the alignment rows in `catalog_logits`."""
        table = self.model.item_emb.weight
        device = table.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else table.dtype
        item_vectors, weight = TiedItemTable.apply(table, items, _align(self.loss_cfg, table), dtype)
        bias = F.pad(self.model.out_bias, (1, 0), value=float("-inf"))  # the padding row's column
        return self.model(items, item_vectors, positions), weight, bias
