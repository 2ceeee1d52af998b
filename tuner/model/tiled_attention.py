"""Self-attention for sequences longer than `short_attention` takes: Triton kernels tiled over
positions (FlashAttention-2's scheme, Dao 2023), with a key-padding mask and attention dropout
whose rate is a tensor.

`short_attention` holds a whole head's scores in one program, which stops at 128 positions.
BERT4Rec's paper setting is 200 (ML-1M, `search_spaces/bert4rec.yaml`), where the model fell back
to SDPA, whose `dropout_p` is a float: a constant of the compiled graph, so every trial of a
search over `model.attn_dropout` compiled its own. These kernels read the rate from the
`RateDropout` buffer, as `short_attention`'s do, so one compiled graph serves every rate there too.

- Forward, `_tiled_forward_kernel`, one program per (sequence and head, block of queries): walks
  the key blocks with an online softmax, drops each unnormalised weight with the tile's share of
  one Philox mask, and writes the output in the [B, L, H] layout the output projection reads, plus
  each row's log-sum-exp (base 2) and the mask as bits (a byte per 8 weights: 3.3 MB a layer at
  benchmarks/ml1m.yaml's batch of 128 x 4 heads x 200 positions) for the backward. Each Philox
  call decides eight weights (four 32-bit draws, two 16-bit uniforms each); `keep_tile` lays
  them out as the tile and, from the same draws, as the stored bytes (session 24's version packed
  the tile into bytes with a reshape and a sum). Q, K and V are read straight out of the fused
  [B, L, 3H] projection, as in `short_attention`.
- Backward: `_tiled_dq_kernel` (per query block: each row's sum dO . O, then dQ over the key
  blocks) and `_tiled_dkdv_kernel` (per key block: dK and dV over the query blocks), each
  recomputing the weights from the log-sum-exp and reading the mask's bits. Drawing the mask
  again in both (Philox's integer work, three times a step) made the first version's forward and
  backward take 1.94x their time without dropout at ML-1M's shape on an H200 (341 against 176
  us). Both write into one [B, L, 3H] gradient; no atomics, so the gradient repeats exactly.

The dropout mask is a function of the seed, the sequence and head, the row and the column, given
`MASK_TILE` and `ROUNDS` (not the kernels' tiles): `keep_mask` returns it for the tests. A
sequence of padding only gets zeros.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: short_attention.usable is False, so nothing calls these
    triton = None

# Per kernel: (query positions, key positions) per tile and warps per program; the forward and
# the two backward kernels each take their own. The dropout mask does not depend on them: its rows
# are padded to a multiple of MASK_TILE, which every tile's key positions divide.
# LAUNCHES: (longest length, settings), the first that takes a length applies. They are the
# fastest combinations of benchmarks/tiled_attention_tiles.py's sweep on an H200 (session 25) at
# 200 positions (ML-1M's shape) and at 512 (430M's); 32 x 128 dK/dV tiles were faster at 200
# and slower at 512. LAUNCH, when set (the benchmarks), applies at every length.
LAUNCHES = ((256, {"forward": (128, 64, 4), "dq": (64, 32, 4), "dkdv": (32, 128, 4)}),
            (None, {"forward": (128, 64, 4), "dq": (64, 64, 4), "dkdv": (64, 64, 4)}))
LAUNCH: dict | None = None
MASK_TILE = 128


def launch_settings(length: int) -> dict:
    """Each kernel's (query positions, key positions, warps) at `length` positions."""
    if LAUNCH is not None:
        return LAUNCH
    return next(settings for longest, settings in LAUNCHES if longest is None or length <= longest)


# Philox rounds per dropout draw, here and in short_attention. Seven, as PyTorch's FlashAttention
# kernels use: Philox4x32-7 passes TestU01's BigCrush (Salmon et al. 2011); 10, Triton's default,
# adds a safety margin at 10/7 of the integer work, which dominates these kernels' forward with
# dropout. benchmarks/attention_backends.py --rounds and tiled_attention_tiles.py time both.
ROUNDS = 7


def _padded(length: int) -> int:
    """The mask's row length: `length` rounded up to a multiple of MASK_TILE."""
    return -(-length // MASK_TILE) * MASK_TILE


if triton is not None:

    @triton.jit
    def threshold16(p):
        """The 16-bit uniforms' threshold for dropout rate p: a weight is kept where its uniform u
        has u >= ceil(2^16 p), so the kept share is within 2^-16 of 1 - p."""
        return tl.math.ceil(p * 65536.0).to(tl.uint32)

    @triton.jit
    def _pair_bits(draw, threshold):
        """Bits 0 and 1: whether the low and the high 16 bits of a 32-bit draw are kept."""
        return ((draw & 0xFFFF) >= threshold).to(tl.int32) | (((draw >> 16) >= threshold).to(tl.int32) << 1)

    @triton.jit
    def keep_tile(seed, offsets, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROUNDS: tl.constexpr):
        """The dropout mask [BLOCK_M, BLOCK_N], True where a weight is kept, from one Philox call per
        eight neighbouring weights (`offsets`: [BLOCK_M, BLOCK_N // 8] counters): four 32-bit
        draws, each two 16-bit uniforms. Also the same decisions as bytes [BLOCK_M, BLOCK_N // 8],
        straight from the draws (`unpack_bits` turns them back into the tile), for a backward to
        read instead of drawing again."""
        r0, r1, r2, r3 = tl.randint4x(seed, offsets, ROUNDS)
        draws = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BLOCK_M, BLOCK_N // 8, 4))
        kept = tl.reshape(tl.join(draws & 0xFFFF, draws >> 16), (BLOCK_M, BLOCK_N)) >= threshold
        # the tile's column order within each group of 8 (tl.join's): r0 low, r0 high, r2 low,
        # r2 high, r1 low, r1 high, r3 low, r3 high
        byte = _pair_bits(r0, threshold) | (_pair_bits(r2, threshold) << 2)
        return kept, byte | (_pair_bits(r1, threshold) << 4) | (_pair_bits(r3, threshold) << 6)

    @triton.jit
    def unpack_bits(packed, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """[BLOCK_M, BLOCK_N // 8] bytes -> [BLOCK_M, BLOCK_N] bool, True where a weight is kept."""
        bits = (packed.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
        return tl.reshape(bits, (BLOCK_M, BLOCK_N)) != 0

    @triton.jit
    def _keep_at(seed, bh, rows, col0, padded, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 ROUNDS: tl.constexpr):
        """`keep_tile` at rows x [col0, col0 + BLOCK_N) of head `bh`: a Philox counter per (head,
        row, group of 8 columns)."""
        group = col0 // 8 + tl.arange(0, BLOCK_N // 8)
        offsets = (bh * padded + rows[:, None]) * (padded // 8) + group[None, :]
        return keep_tile(seed, offsets, threshold, BLOCK_M, BLOCK_N, ROUNDS)

    @triton.jit
    def _bits_ptrs(BITS, bh, rows, col0, L, padded, BLOCK_N: tl.constexpr):
        byte = col0 // 8 + tl.arange(0, BLOCK_N // 8)
        return BITS + (bh * L + rows[:, None]) * (padded // 8) + byte[None, :]

    @triton.jit
    def _load_bits(BITS, bh, rows, col0, L, padded, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """The tile of the mask the forward stored: True where a weight is kept."""
        packed = tl.load(_bits_ptrs(BITS, bh, rows, col0, L, padded, BLOCK_N), mask=(rows < L)[:, None], other=0)
        return unpack_bits(packed, BLOCK_M, BLOCK_N)

    @triton.jit
    def _load_rows(PTR, rows, dims, L, stride_l):
        return tl.load(PTR + rows[:, None] * stride_l + dims[None, :], mask=(rows < L)[:, None], other=0.0)

    @triton.jit
    def _scores(q, k, KEEP, cols, L, scale):
        """q k^T in base-2 units, -inf at padded keys and past the end."""
        key_ok = tl.load(KEEP + cols, mask=cols < L, other=0) != 0
        s = tl.dot(q, tl.trans(k)) * (scale * 1.4426950408889634)
        return tl.where(key_ok[None, :], s, float("-inf"))

    @triton.jit
    def _program(QKV, KEEP, heads, stride_b, stride_keep, D: tl.constexpr):
        """This program's (sequence and head, block), its head's columns in QKV and its sequence's
        key mask."""
        bh, block = tl.program_id(0), tl.program_id(1)
        b, h = bh // heads, bh % heads
        return bh, block, b, h, QKV + b * stride_b + h * D, KEEP + b * stride_keep

    @triton.jit
    def _tiled_forward_kernel(QKV, KEEP, SEED, RATE, OUT, LSE, BITS, L, padded, heads, stride_b, stride_l, stride_keep,
                              stride_ob, stride_ol, scale, H: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr, ROUNDS: tl.constexpr):
        bh, block, b, h, base, keep = _program(QKV, KEEP, heads, stride_b, stride_keep, D)
        rows, dims = block * BLOCK_M + tl.arange(0, BLOCK_M), tl.arange(0, D)
        q = _load_rows(base, rows, dims, L, stride_l)
        top = tl.full([BLOCK_M], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        if DROPOUT:
            p, seed = tl.load(RATE), tl.load(SEED)
            threshold = threshold16(p)
        for col0 in range(0, L, BLOCK_N):
            cols = col0 + tl.arange(0, BLOCK_N)
            k = _load_rows(base + H, cols, dims, L, stride_l)
            v = _load_rows(base + 2 * H, cols, dims, L, stride_l)
            s = _scores(q, k, keep, cols, L, scale)
            new_top = tl.maximum(top, tl.max(s, axis=1))
            shift = tl.where(new_top == float("-inf"), 0.0, new_top)  # no real key yet: nothing to rescale
            e = tl.exp2(s - shift[:, None])
            carry = tl.exp2(top - shift)
            total = total * carry + tl.sum(e, axis=1)
            if DROPOUT:
                kept, packed = _keep_at(seed, bh, rows, col0, padded, threshold, BLOCK_M, BLOCK_N, ROUNDS)
                tl.store(_bits_ptrs(BITS, bh, rows, col0, L, padded, BLOCK_N), packed.to(tl.uint8),
                         mask=(rows < L)[:, None])
                e = tl.where(kept, e, 0.0)
            acc = acc * carry[:, None] + tl.dot(e.to(v.dtype), v)
            top = new_top
        empty = total == 0.0  # a sequence of padding only: zeros out, and weights of 0 in the backward
        out = acc / tl.where(empty, 1.0, total)[:, None]
        if DROPOUT:
            out = out / (1.0 - p)
        tl.store(OUT + b * stride_ob + h * D + rows[:, None] * stride_ol + dims[None, :], out.to(OUT.dtype.element_ty),
                 mask=(rows < L)[:, None])
        lse = tl.where(empty, float("inf"), top + tl.log2(tl.where(empty, 1.0, total)))
        tl.store(LSE + bh * L + rows, lse, mask=rows < L)

    @triton.jit
    def _tiled_dq_kernel(QKV, KEEP, BITS, RATE, OUT, GRAD, LSE, DELTA, DQKV, L, padded, heads, stride_b, stride_l,
                         stride_keep, stride_ob, stride_ol, stride_gb, stride_gl, stride_db, stride_dl, scale,
                         H: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         DROPOUT: tl.constexpr):
        bh, block, b, h, base, keep = _program(QKV, KEEP, heads, stride_b, stride_keep, D)
        rows, dims = block * BLOCK_M + tl.arange(0, BLOCK_M), tl.arange(0, D)
        q = _load_rows(base, rows, dims, L, stride_l)
        grad = _load_rows(GRAD + b * stride_gb + h * D, rows, dims, L, stride_gl)
        out = _load_rows(OUT + b * stride_ob + h * D, rows, dims, L, stride_ol)
        # sum_j P_ij dP_ij = dO_i . O_i, with or without dropout (O holds the dropped weights)
        delta = tl.sum(grad.to(tl.float32) * out.to(tl.float32), axis=1)
        tl.store(DELTA + bh * L + rows, delta, mask=rows < L)
        lse = tl.load(LSE + bh * L + rows, mask=rows < L, other=float("inf"))
        dq = tl.zeros([BLOCK_M, D], tl.float32)
        if DROPOUT:
            p = tl.load(RATE)
        for col0 in range(0, L, BLOCK_N):
            cols = col0 + tl.arange(0, BLOCK_N)
            k = _load_rows(base + H, cols, dims, L, stride_l)
            v = _load_rows(base + 2 * H, cols, dims, L, stride_l)
            probs = tl.exp2(_scores(q, k, keep, cols, L, scale) - lse[:, None])
            probs_grad = tl.dot(grad, tl.trans(v))
            if DROPOUT:
                kept = _load_bits(BITS, bh, rows, col0, L, padded, BLOCK_M, BLOCK_N)
                probs_grad = tl.where(kept, probs_grad / (1.0 - p), 0.0)
            ds = probs * (probs_grad - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)
        tl.store(DQKV + b * stride_db + h * D + rows[:, None] * stride_dl + dims[None, :],
                 (dq * scale).to(DQKV.dtype.element_ty), mask=(rows < L)[:, None])

    @triton.jit
    def _tiled_dkdv_kernel(QKV, KEEP, BITS, RATE, GRAD, LSE, DELTA, DQKV, L, padded, heads, stride_b, stride_l,
                           stride_keep, stride_gb, stride_gl, stride_db, stride_dl, scale,
                           H: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           DROPOUT: tl.constexpr):
        bh, block, b, h, base, keep = _program(QKV, KEEP, heads, stride_b, stride_keep, D)
        cols, dims = block * BLOCK_N + tl.arange(0, BLOCK_N), tl.arange(0, D)
        k = _load_rows(base + H, cols, dims, L, stride_l)
        v = _load_rows(base + 2 * H, cols, dims, L, stride_l)
        dk = tl.zeros([BLOCK_N, D], tl.float32)
        dv = tl.zeros([BLOCK_N, D], tl.float32)
        if DROPOUT:
            p = tl.load(RATE)
        for row0 in range(0, L, BLOCK_M):
            rows = row0 + tl.arange(0, BLOCK_M)
            q = _load_rows(base, rows, dims, L, stride_l)
            grad = _load_rows(GRAD + b * stride_gb + h * D, rows, dims, L, stride_gl)
            lse = tl.load(LSE + bh * L + rows, mask=rows < L, other=float("inf"))
            delta = tl.load(DELTA + bh * L + rows, mask=rows < L, other=0.0)
            probs = tl.exp2(_scores(q, k, keep, cols, L, scale) - lse[:, None])
            probs_grad = tl.dot(grad, tl.trans(v))
            dropped = probs
            if DROPOUT:
                kept = _load_bits(BITS, bh, rows, block * BLOCK_N, L, padded, BLOCK_M, BLOCK_N)
                dropped = tl.where(kept, probs / (1.0 - p), 0.0)
                probs_grad = tl.where(kept, probs_grad / (1.0 - p), 0.0)
            dv += tl.dot(tl.trans(dropped.to(grad.dtype)), grad)
            ds = probs * (probs_grad - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        ptrs = DQKV + b * stride_db + h * D + cols[:, None] * stride_dl + dims[None, :]
        out_ty = DQKV.dtype.element_ty
        tl.store(ptrs + H, (dk * scale).to(out_ty), mask=(cols < L)[:, None])
        tl.store(ptrs + 2 * H, dv.to(out_ty), mask=(cols < L)[:, None])

    @triton.jit
    def _tiled_mask_kernel(SEED, RATE, OUT, L, padded, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           ROUNDS: tl.constexpr):
        bh, block_m, block_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
        kept, _ = _keep_at(tl.load(SEED), bh, rows, block_n * BLOCK_N, padded, threshold16(tl.load(RATE)), BLOCK_M,
                             BLOCK_N, ROUNDS)
        ok = (rows < L)[:, None] & (cols < L)[None, :]
        tl.store(OUT + bh * L * L + rows[:, None] * L + cols[None, :], kept.to(tl.int8), mask=ok)


def _scale(qkv: torch.Tensor, heads: int) -> float:
    """The softmax scale, 1 / sqrt(head size)."""
    return 1.0 / math.sqrt(qkv.shape[2] // 3 // heads)


def _launch(kernel: str, qkv: torch.Tensor, heads: int, dropout: bool, rows: str = "M") -> tuple[tuple, dict]:
    """(grid, kernel constants) of `kernel` ("forward", "dq" or "dkdv") for qkv [B, L, 3H]: a
    program per sequence and head and block of `rows` ("M": queries, "N": keys)."""
    batch, length, width = qkv.shape
    block_m, block_n, warps = launch_settings(length)[kernel]
    if MASK_TILE % block_n:
        raise ValueError(f"tiled_attention {kernel!r}: {block_n} key positions do not divide {MASK_TILE}")
    meta = dict(H=width // 3, D=width // 3 // heads, BLOCK_M=block_m, BLOCK_N=block_n, DROPOUT=dropout,
                num_warps=warps)
    return (batch * heads, triton.cdiv(length, block_m if rows == "M" else block_n)), meta


@torch.library.custom_op("tuner::tiled_attention", mutates_args=())
def tiled_attention(qkv: torch.Tensor, keep: torch.Tensor, seed: torch.Tensor, rate: torch.Tensor, heads: int,
                    dropout: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`short_attention.short_attention`'s contract for any length: qkv [B, L, 3H], keep [B, L]
    bool -> (out [B, L, H]; for the backward, each row's log-sum-exp [B * heads, L] in fp32 and
    the dropout mask as bits [B * heads, L, padded length / 8], uint8, empty without dropout)."""
    out, lse, bits = _tiled_attention_fake(qkv, keep, seed, rate, heads, dropout)
    if out.numel():
        grid, meta = _launch("forward", qkv, heads, dropout)
        keep8 = keep.view(torch.int8)
        _tiled_forward_kernel[grid](qkv, keep8, seed, rate, out, lse, bits, qkv.shape[1], _padded(qkv.shape[1]),
                                    heads, qkv.stride(0), qkv.stride(1), keep8.stride(0), out.stride(0),
                                    out.stride(1), _scale(qkv, heads), ROUNDS=ROUNDS, **meta)
    return out, lse, bits


@tiled_attention.register_fake
def _tiled_attention_fake(qkv, keep, seed, rate, heads, dropout):
    batch, length, width = qkv.shape
    mask_shape = (batch * heads, length, _padded(length) // 8) if dropout else (0,)
    return (qkv.new_empty(batch, length, width // 3),
            torch.empty(batch * heads, length, dtype=torch.float32, device=qkv.device),
            torch.empty(mask_shape, dtype=torch.uint8, device=qkv.device))


@torch.library.custom_op("tuner::tiled_attention_backward", mutates_args=())
def tiled_attention_backward(grad: torch.Tensor, qkv: torch.Tensor, keep: torch.Tensor, bits: torch.Tensor,
                             rate: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, heads: int,
                             dropout: bool) -> torch.Tensor:
    """d loss / d qkv [B, L, 3H] from d loss / d out [B, L, H]."""
    length = qkv.shape[1]
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    if dqkv.numel():
        keep8 = keep.view(torch.int8)
        delta = torch.empty_like(lse)
        common = (length, _padded(length), heads, qkv.stride(0), qkv.stride(1), keep8.stride(0))
        scale = _scale(qkv, heads)
        grid, meta = _launch("dq", qkv, heads, dropout)
        _tiled_dq_kernel[grid](qkv, keep8, bits, rate, out, grad, lse, delta, dqkv, *common, out.stride(0),
                               out.stride(1), grad.stride(0), grad.stride(1), dqkv.stride(0), dqkv.stride(1), scale,
                               **meta)
        grid, meta = _launch("dkdv", qkv, heads, dropout, rows="N")
        _tiled_dkdv_kernel[grid](qkv, keep8, bits, rate, grad, lse, delta, dqkv, *common, grad.stride(0),
                                 grad.stride(1), dqkv.stride(0), dqkv.stride(1), scale, **meta)
    return dqkv


@tiled_attention_backward.register_fake
def _tiled_attention_backward_fake(grad, qkv, keep, bits, rate, out, lse, heads, dropout):
    return torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)


def _setup_context(ctx, inputs, output):
    qkv, keep, seed, rate, heads, dropout = inputs
    out, lse, bits = output
    ctx.save_for_backward(qkv, keep, bits, rate, out, lse)
    ctx.heads, ctx.dropout = heads, dropout


def _backward(ctx, grad, _lse_grad, _bits_grad):
    qkv, keep, bits, rate, out, lse = ctx.saved_tensors
    return (tiled_attention_backward(grad.contiguous(), qkv, keep, bits, rate, out, lse, ctx.heads, ctx.dropout),
            None, None, None, None, None)


tiled_attention.register_autograd(_backward, setup_context=_setup_context)


def keep_mask(seed: torch.Tensor, batch: int, heads: int, length: int, dropout_p: float) -> torch.Tensor:
    """The kernels' dropout mask for `seed` at rate `dropout_p`: bool [B, heads, L, L], True where a
    weight is kept."""
    out = torch.empty(batch * heads, length, length, dtype=torch.int8, device=seed.device)
    rate = torch.full((), dropout_p, dtype=torch.float32, device=seed.device)
    blocks = triton.cdiv(length, 64)
    _tiled_mask_kernel[(batch * heads, blocks, blocks)](seed, rate, out, length, _padded(length),
                                                         BLOCK_M=64, BLOCK_N=64, ROUNDS=ROUNDS)
    return out.view(batch, heads, length, length).bool()
