"""Cut cross-entropy on CUDA: Triton kernels that never hold the logits of a whole batch.

`cut_ce_rows(hidden, weight, bias, index, chunk, with_target)` returns, per row of `hidden`
[N, H], the cross-entropy lse(hidden @ weight.T + bias) - logit[index] (0 where index < 0), or the
log-sum-exp alone when `with_target` is false, and its log-sum-exp. It is a `torch.library`
custom op with its own autograd formula, so `torch.compile` treats it as one opaque call and DDP
sees ordinary gradients.

- Forward, `_lse_kernel`: each program takes a block of rows and a range of catalog tiles,
  computes each tile's logits on the tensor cores and folds them into a running max and sum of
  exponentials held in registers (the flash-attention softmax); a logsumexp over the programs'
  partial results finishes the job. Nothing of size N x V is written.
- Backward: the catalog is walked in chunks of `chunk` items (a multiple of 64), widened while a
  chunk of gradients stays under `BLOCK_BYTES` (few rows, as in a training step, then take one or two
  chunks rather than many small launches). `_dlogits_kernel` recomputes a
  chunk's logits and writes d loss / d logits = g * (softmax - one_hot(target)) in the compute
  dtype (the only [N, chunk] buffer) and adds its column sums to the bias gradient; two cuBLAS
  products then give that chunk's weight gradient and add its share of the hidden gradient.

Inputs must share one floating dtype (bf16 or fp16 on the GPU: the caller casts under autocast).
The kernels also run on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`), which is
how the tests check them against the chunked PyTorch implementation without a GPU.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: `usable_on()` is False and the PyTorch path is used
    triton = None


BLOCK_BYTES = 1 << 30  # the backward widens `chunk` up to a [N, chunk] block of this size


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def usable_on(tensor: torch.Tensor) -> bool:
    """True when the kernels can run on `tensor`'s device: CUDA, or any device under the interpreter."""
    return triton is not None and (tensor.is_cuda or _interpreting())


if triton is not None:

    def _configs(tiles):
        """(BLOCK_N, BLOCK_V, BLOCK_K, warps, stages) tuples; BLOCK_K >= H preloads the row block once."""
        if _interpreting():  # no benchmarking without a GPU; small tiles test the loops
            tiles = [(32, 32, 32, 4, 2)]
        return [triton.Config({"BLOCK_N": n, "BLOCK_V": v, "BLOCK_K": k}, num_warps=w, num_stages=s)
                for n, v, k, w, s in tiles]

    def _prune(configs, named_args, **kwargs):
        """Drop reduction tiles wider than the hidden size needs."""
        limit = max(16, triton.next_power_of_2(kwargs["H"]))
        return [c for c in configs if c.kwargs["BLOCK_K"] <= limit] or configs[:1]

    # autotuned per hidden size, dtype and power-of-two bucket of rows on first use (timings kept
    # on disk for later processes): K-loop tiles, whose operands stream through shared memory,
    # against preloading the whole row block (BLOCK_K 256)
    _LSE_CONFIGS = _configs([(128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 4),
                             (128, 128, 128, 8, 3), (64, 64, 256, 4, 2)])
    _DLOGITS_CONFIGS = _configs([(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
                                 (64, 64, 64, 4, 2), (64, 64, 256, 4, 2)])

    @triton.jit
    def _tile_logits(x, X, W, rows, cols, row_ok, col_ok, stride_x, stride_w,
                     H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
        """fp32 [BLOCK_N, BLOCK_V] logits without bias; `x` is the preloaded row block when BLOCK_K >= H."""
        ks = tl.arange(0, BLOCK_K)
        if BLOCK_K >= H:
            w = tl.load(W + cols[:, None] * stride_w + ks[None, :], mask=col_ok[:, None] & (ks < H)[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w))
        else:
            acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
            for k0 in range(0, H, BLOCK_K):
                kk = k0 + ks
                xk = tl.load(X + rows[:, None] * stride_x + kk[None, :], mask=row_ok[:, None] & (kk < H)[None, :],
                             other=0.0)
                wk = tl.load(W + cols[:, None] * stride_w + kk[None, :], mask=col_ok[:, None] & (kk < H)[None, :],
                             other=0.0)
                acc = tl.dot(xk, tl.trans(wk), acc)
        return acc

    @triton.jit
    def _row_block(X, rows, row_ok, stride_x, H: tl.constexpr, BLOCK_K: tl.constexpr):
        """The rows' whole hidden vectors when one K tile holds them (BLOCK_K >= H), loaded once for
        every catalog tile; else a placeholder, and `_tile_logits` streams K tiles itself."""
        if BLOCK_K >= H:
            ks = tl.arange(0, BLOCK_K)
            return tl.load(X + rows[:, None] * stride_x + ks[None, :], mask=row_ok[:, None] & (ks < H)[None, :],
                           other=0.0)
        else:
            return rows[:, None] * 0.0

    @triton.autotune(configs=_LSE_CONFIGS, key=["H", "ROWS"], prune_configs_by={"early_config_prune": _prune},
                     cache_results=True)
    @triton.jit
    def _lse_kernel(X, W, B, PART, N, V, stride_x, stride_w, ROWS,
                    H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
        """PART[pid_v, rows] = logsumexp of the rows' logits over this program's range of catalog tiles."""
        pid_n = tl.program_id(0)
        pid_v = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        n_tiles = tl.cdiv(V, BLOCK_V)
        per_program = tl.cdiv(n_tiles, tl.num_programs(1))
        first = pid_v * per_program
        last = tl.minimum(first + per_program, n_tiles)
        x = _row_block(X, rows, row_ok, stride_x, H, BLOCK_K)
        m = tl.full([BLOCK_N], -1e30, dtype=tl.float32)  # finite: empty ranges give exp(-inf) = 0, not nan
        s = tl.zeros([BLOCK_N], dtype=tl.float32)
        for t in range(first, last):
            cols = t * BLOCK_V + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            logits = _tile_logits(x, X, W, rows, cols, row_ok, col_ok, stride_x, stride_w, H, BLOCK_N, BLOCK_V, BLOCK_K)
            logits += tl.load(B + cols, mask=col_ok, other=float("-inf")).to(tl.float32)[None, :]
            m_new = tl.maximum(m, tl.max(logits, 1))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), 1)
            m = m_new
        tl.store(PART + pid_v * N + rows, m + tl.log(s), mask=row_ok)

    @triton.autotune(configs=_DLOGITS_CONFIGS, key=["H", "ROWS"], reset_to_zero=["DB"],
                     prune_configs_by={"early_config_prune": _prune}, cache_results=True)
    @triton.jit
    def _dlogits_kernel(X, W, B, LSE, GS, GT, T, DS, DB, N, V, v0, vc, stride_x, stride_w, stride_ds, ROWS,
                        H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
        """DS[rows, local] = GS * softmax - GT * one_hot(T) for catalog items v0 + local; DB[local] += column sums."""
        pid_n = tl.program_id(0)
        pid_v = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        cols = v0 + local
        row_ok = rows < N
        col_ok = local < vc  # (v0 + vc <= V) a mask on vc alone keeps stores vectorized when 16 | vc
        x = _row_block(X, rows, row_ok, stride_x, H, BLOCK_K)
        logits = _tile_logits(x, X, W, rows, cols, row_ok, col_ok, stride_x, stride_w, H, BLOCK_N, BLOCK_V, BLOCK_K)
        logits += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
        gs = tl.load(GS + rows, mask=row_ok, other=0.0)
        gt = tl.load(GT + rows, mask=row_ok, other=0.0)
        target = tl.load(T + rows, mask=row_ok, other=-1)
        ok = row_ok[:, None] & col_ok[None, :]
        grad = tl.exp(tl.where(ok, logits - lse[:, None], float("-inf"))) * gs[:, None]
        grad -= tl.where(cols[None, :] == target[:, None], gt[:, None], 0.0)
        grad = tl.where(ok, grad, 0.0)
        tl.store(DS + rows[:, None] * stride_ds + local[None, :], grad.to(DS.dtype.element_ty), mask=ok)
        tl.atomic_add(DB + local, tl.sum(grad, 0), mask=col_ok)


def _rows_bucket(n: int) -> int:
    """Autotuning key for the number of rows (a training step's masked positions vary per batch)."""
    return min(triton.next_power_of_2(max(n, 1)), 1 << 16)


def _num_programs_wanted(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    if not (hidden.dtype == weight.dtype == bias.dtype):
        raise TypeError(f"cut_ce_rows needs one dtype, got hidden {hidden.dtype}, weight {weight.dtype}, "
                        f"bias {bias.dtype}")
    if hidden.shape[1] != weight.shape[1] or bias.shape[0] != weight.shape[0]:
        raise ValueError(f"cut_ce_rows: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and bias "
                         f"{tuple(bias.shape)} do not fit together")


def logsumexp_rows(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """fp32 [N]: logsumexp(hidden @ weight.T + bias, dim=1), computed tile by tile on the tensor cores."""
    _check_inputs(hidden, weight, bias)
    hidden, weight, bias = hidden.contiguous(), weight.contiguous(), bias.contiguous()
    n, h = hidden.shape
    v = weight.shape[0]
    if n == 0:
        return hidden.new_empty(0, dtype=torch.float32)
    # split the catalog so the grid has a few programs per SM even when rows are few
    splits = max(1, min(triton.cdiv(v, 256), triton.cdiv(_num_programs_wanted(hidden.device), triton.cdiv(n, 128))))
    part = torch.empty(splits, n, device=hidden.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)  # noqa: E731
    _lse_kernel[grid](hidden, weight, bias, part, n, v, hidden.stride(0), weight.stride(0), _rows_bucket(n), H=h)
    return torch.logsumexp(part, dim=0)


def _target_logits(hidden, weight, bias, index):
    safe = index.clamp(min=0)
    return (hidden.float() * weight[safe].float()).sum(-1) + bias[safe].float()


@torch.library.custom_op("tuner::cut_ce_rows", mutates_args=())
def cut_ce_rows(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, index: torch.Tensor,
                chunk: int, with_target: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, lse): rows = lse - target logit (0 where index < 0) if with_target, else lse."""
    lse = logsumexp_rows(hidden, weight, bias)
    if not with_target:
        return lse.clone(), lse
    rows = torch.where(index >= 0, lse - _target_logits(hidden, weight, bias, index), 0.0)
    return rows, lse


@cut_ce_rows.register_fake
def _cut_ce_rows_fake(hidden, weight, bias, index, chunk, with_target):
    n = hidden.shape[0]
    return hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("tuner::cut_ce_rows_backward", mutates_args=())
def cut_ce_rows_backward(grad_rows: torch.Tensor, grad_lse: torch.Tensor, hidden: torch.Tensor,
                         weight: torch.Tensor, bias: torch.Tensor, index: torch.Tensor, lse: torch.Tensor,
                         chunk: int, with_target: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum(grad_rows * rows + grad_lse * lse) for hidden, weight and bias."""
    hidden, weight, bias = hidden.contiguous(), weight.contiguous(), bias.contiguous()
    n, h = hidden.shape
    v = weight.shape[0]
    g_target = torch.where(index >= 0, grad_rows.float(), 0.0) if with_target else torch.zeros_like(lse)
    g_softmax = (g_target if with_target else grad_rows.float()) + grad_lse.float()
    target = index.to(torch.int32) if with_target else torch.full_like(index, -1, dtype=torch.int32)
    grad_hidden = torch.zeros(n, h, device=hidden.device, dtype=torch.float32)
    grad_weight = torch.empty_like(weight)
    grad_bias = torch.zeros(v, device=bias.device, dtype=torch.float32)
    chunk = min(v, max(chunk, BLOCK_BYTES // (max(n, 1) * hidden.element_size())))
    if chunk < v:  # whole multiples of 64 items: aligned GEMM shapes, vectorized stores
        chunk = max(64, chunk // 64 * 64)
    # rows of the block start on 128-byte boundaries whatever the chunk: cuBLAS's fast kernels and
    # vector stores need aligned leading dimensions (an odd one fell back to sm75 GEMMs, 2x slower)
    dlogits = torch.empty(n, triton.cdiv(chunk, 64) * 64, device=hidden.device, dtype=hidden.dtype)
    for v0 in range(0, v, chunk):
        vc = min(chunk, v - v0)
        block = dlogits[:, :vc]
        if n:
            grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(vc, meta["BLOCK_V"]))  # noqa: E731
            _dlogits_kernel[grid](hidden, weight, bias, lse, g_softmax, g_target, target, block,
                                  grad_bias[v0:v0 + vc], n, v, v0, vc, hidden.stride(0), weight.stride(0),
                                  block.stride(0), _rows_bucket(n), H=h)
        grad_hidden += (block @ weight[v0:v0 + vc]).float()
        torch.mm(block.t(), hidden, out=grad_weight[v0:v0 + vc])
    return grad_hidden.to(hidden.dtype), grad_weight, grad_bias.to(bias.dtype)


@cut_ce_rows_backward.register_fake
def _cut_ce_rows_backward_fake(grad_rows, grad_lse, hidden, weight, bias, index, lse, chunk, with_target):
    return torch.empty_like(hidden), torch.empty_like(weight), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, index, chunk, with_target = inputs
    ctx.save_for_backward(hidden, weight, bias, index, output[1])
    ctx.chunk, ctx.with_target = chunk, with_target


def _backward(ctx, grad_rows, grad_lse):
    hidden, weight, bias, index, lse = ctx.saved_tensors
    grad_rows = grad_rows if grad_rows is not None else torch.zeros_like(lse)
    grad_lse = grad_lse if grad_lse is not None else torch.zeros_like(lse)
    grads = cut_ce_rows_backward(grad_rows, grad_lse, hidden, weight, bias, index, lse, ctx.chunk, ctx.with_target)
    return (*grads, None, None, None)


cut_ce_rows.register_autograd(_backward, setup_context=_setup_context)


def tuned_configs() -> dict:
    """The autotuner's choice per kernel (for benchmark reports), once the kernels have run."""
    return {name: str(getattr(kernel, "best_config", None))
            for name, kernel in (("lse", _lse_kernel), ("dlogits", _dlogits_kernel))}


def flops(rows: int, items: int, hidden: int) -> float:
    """Matrix FLOPs of one forward + backward: logits twice (forward, recompute) and two gradient products."""
    return 4 * 2.0 * rows * items * hidden

