"""Triton kernels: per-row softmax statistics and per-key attention sums, flash-attention style.

Two kernels, each reading every ``Q`` and ``K`` tile once per pass, with an online softmax and never an
``N x N`` map:

- :func:`row_statistics` (pass 1, one program per query tile and query head): over the keys each query
  row sees, the log-sum-exp of its logits (``mode="lse"``), or the entropy of its softmax restricted to
  keys of the *other* token group (``mode="entropy"``, MEDA's ``A_TV`` / ``A_VT``). The entropy comes
  from the same online pass: ``H = log Z - sum_j p_j s_j``, with ``Z`` and ``sum_j e^{s_j - m} s_j``
  rescaled as the running maximum ``m`` grows.
- :func:`column_sums` (pass 2, one program per key tile and KV head): ``sum_{g, i} exp(s_gij - lse_gi)``
  over the group's query heads ``g`` and the query rows ``i``, the attention each key receives (the
  cumulative H2O / MEDA score). It needs pass 1's ``lse``: two passes over ``Q K^T`` in all.

Conventions (as in :mod:`meda.kv.scoring`): ``query [B, Hq, Nq, D]`` are the last ``Nq`` of the
``N`` key positions, ``key [B, Hkv, N, D]``, ``valid [B, N]``; query row ``r`` sits at key position
``N - Nq + r`` and sees key ``j`` when ``j <= N - Nq + r`` and both are valid. ``rows [B, S]`` (int32,
ascending per batch row) are the query rows evaluated. Logits: ``s = scaling * q.k``, then
``softcap * tanh(s / softcap)`` when ``softcap`` is set. Dot products accumulate in float32 (exact
float32 products for float32 inputs: no TF32).
"""

from __future__ import annotations

from typing import Literal

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_Q = 64
BLOCK_K = 64


@triton.jit
def _logits(q, k, scaling, softcap, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """``[BQ, D] x [BK, D] -> [BQ, BK]`` float32 logits, scaled and optionally soft-capped."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scaling
    if SOFTCAP:
        # tanh(x) = 1 - 2 / (exp(2x) + 1): exact limits at +-inf, no libdevice needed (the interpreter runs it)
        s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
    return s


@triton.jit
def _row_stats_kernel(
    Q, K, VALID, VISION, ROWS, OUT,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n,
    n_keys, n_rows, offset, q_heads, group, scaling, softcap,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
    ENTROPY: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // q_heads
    h = pid_bh % q_heads
    hk = h // group
    offs_q = pid_q * BQ + tl.arange(0, BQ)
    in_rows = offs_q < n_rows
    rows = tl.load(ROWS + b * n_rows + offs_q, mask=in_rows, other=0)
    pos = rows + offset
    q_valid = (tl.load(VALID + b * n_keys + pos, mask=in_rows, other=0) != 0) & in_rows
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q = tl.load(
        Q + b * sq_b + h * sq_h + rows[:, None] * sq_n + offs_d[None, :],
        mask=in_rows[:, None] & d_mask[None, :],
        other=0.0,
    )
    if ENTROPY:
        q_vis = tl.load(VISION + b * n_keys + pos, mask=in_rows, other=0) != 0
    m = tl.full([BQ], float("-inf"), tl.float32)
    z = tl.zeros([BQ], tl.float32)
    t = tl.zeros([BQ], tl.float32)
    offs_k = tl.arange(0, BK)
    # rows ascend: keys after the tile's last query are never visible
    hi = tl.load(ROWS + b * n_rows + tl.minimum(pid_q * BQ + BQ, n_rows) - 1) + offset + 1
    k_base = K + b * sk_b + hk * sk_h
    for start in range(0, hi, BK):
        kpos = start + offs_k
        in_keys = kpos < n_keys
        k = tl.load(k_base + kpos[:, None] * sk_n + offs_d[None, :], mask=in_keys[:, None] & d_mask[None, :], other=0.0)
        s = _logits(q, k, scaling, softcap, SOFTCAP, PRECISION)
        k_valid = tl.load(VALID + b * n_keys + kpos, mask=in_keys, other=0) != 0
        visible = (kpos[None, :] <= pos[:, None]) & k_valid[None, :] & q_valid[:, None]
        if ENTROPY:
            k_vis = tl.load(VISION + b * n_keys + kpos, mask=in_keys, other=0) != 0
            visible = visible & (k_vis[None, :] != q_vis[:, None])
        s2 = tl.where(visible, s * 1.4426950408889634, float("-inf"))
        m_new = tl.maximum(m, tl.max(s2, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s2 - m_safe[:, None])
        z = z * alpha + tl.sum(p, 1)
        if ENTROPY:
            t = t * alpha + tl.sum(p * tl.where(visible, s, 0.0), 1)
        m = m_new
    seen = z > 0.0
    lse2 = tl.where(seen, m + tl.log2(tl.where(seen, z, 1.0)), float("-inf"))  # base-2 log-sum-exp
    if ENTROPY:  # noqa: SIM108 (a constexpr branch of the kernel)
        out = tl.where(seen, lse2 * 0.6931471805599453 - t / tl.where(seen, z, 1.0), 0.0)
    else:
        out = lse2
    tl.store(OUT + pid_bh * n_rows + offs_q, out, mask=in_rows)


@triton.jit
def _column_sums_kernel(
    Q, K, VALID, ROWS, LSE2, FIRST_TILE, OUT,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n,
    n_keys, n_rows, offset, kv_heads, group, n_key_tiles, scaling, softcap,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
    SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_k = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // kv_heads
    hk = pid_bh % kv_heads
    kpos = pid_k * BK + tl.arange(0, BK)
    in_keys = kpos < n_keys
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    k = tl.load(
        K + b * sk_b + hk * sk_h + kpos[:, None] * sk_n + offs_d[None, :],
        mask=in_keys[:, None] & d_mask[None, :],
        other=0.0,
    )
    k_valid = (tl.load(VALID + b * n_keys + kpos, mask=in_keys, other=0) != 0) & in_keys
    acc = tl.zeros([BK], tl.float32)
    first = tl.load(FIRST_TILE + b * n_key_tiles + pid_k)  # first query tile that can see this key tile
    offs_q = tl.arange(0, BQ)
    for g in range(0, group):
        h = hk * group + g
        for qt in range(first, tl.cdiv(n_rows, BQ)):
            r_idx = qt * BQ + offs_q
            in_rows = r_idx < n_rows
            rows = tl.load(ROWS + b * n_rows + r_idx, mask=in_rows, other=0)
            pos = rows + offset
            q_valid = (tl.load(VALID + b * n_keys + pos, mask=in_rows, other=0) != 0) & in_rows
            q = tl.load(
                Q + b * sq_b + h * sq_h + rows[:, None] * sq_n + offs_d[None, :],
                mask=in_rows[:, None] & d_mask[None, :],
                other=0.0,
            )
            lse2 = tl.load(LSE2 + (b * kv_heads * group + h) * n_rows + r_idx, mask=in_rows, other=float("-inf"))
            s = _logits(q, k, scaling, softcap, SOFTCAP, PRECISION)
            visible = (kpos[None, :] <= pos[:, None]) & k_valid[None, :] & (q_valid & (lse2 > float("-inf")))[:, None]
            lse_safe = tl.where(lse2 > float("-inf"), lse2, 0.0)
            p = tl.where(visible, tl.exp2(s * 1.4426950408889634 - lse_safe[:, None]), 0.0)
            acc += tl.sum(p, 0)
    tl.store(OUT + pid_bh * n_keys + kpos, acc, mask=in_keys)


def _prepare(query: Tensor, key: Tensor, valid: Tensor, rows: Tensor) -> dict:
    """Shared launch arguments; makes the last dimension contiguous and the masks int8."""
    if query.stride(-1) != 1:
        query = query.contiguous()
    if key.stride(-1) != 1:
        key = key.contiguous()
    batch, q_heads, n_queries, dim = query.shape
    kv_heads, n_keys = key.shape[1], key.shape[2]
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    return {
        "query": query,
        "key": key,
        "valid": valid.to(torch.int8).contiguous(),
        "rows": rows.to(torch.int32).contiguous(),
        "batch": batch,
        "q_heads": q_heads,
        "kv_heads": kv_heads,
        "group": q_heads // kv_heads,
        "n_keys": n_keys,
        "offset": n_keys - n_queries,
        "dim": dim,
        "block_d": max(16, triton.next_power_of_2(dim)),
        "precision": precision,
    }


def row_statistics(
    query: Tensor,
    key: Tensor,
    valid: Tensor,
    rows: Tensor,
    *,
    scaling: float,
    softcap: float | None = None,
    mode: Literal["lse", "entropy"] = "lse",
    vision: Tensor | None = None,
) -> Tensor:
    """Pass 1: a float32 ``[B, Hq, S]`` statistic per query head and evaluated row.

    ``mode="lse"``: base-2 log-sum-exp of the row's logits over its visible keys (``-inf`` for a row
    that sees none, e.g. a padded query). ``mode="entropy"``: natural-log entropy of the row's softmax
    over visible keys of the other group (``vision [B, N]`` bool), 0 for a row that sees none.
    """
    if mode == "entropy" and vision is None:
        raise ValueError("mode='entropy' needs the vision (group) mask")
    a = _prepare(query, key, valid, rows)
    n_rows = a["rows"].shape[1]
    out = torch.empty(a["batch"], a["q_heads"], n_rows, device=query.device, dtype=torch.float32)
    if n_rows == 0:
        return out
    vis = (vision if vision is not None else valid).to(torch.int8).contiguous()
    q, k = a["query"], a["key"]
    grid = (triton.cdiv(n_rows, BLOCK_Q), a["batch"] * a["q_heads"])
    _row_stats_kernel[grid](
        q, k, a["valid"], vis, a["rows"], out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        a["n_keys"], n_rows, a["offset"], a["q_heads"], a["group"], float(scaling), float(softcap or 1.0),
        D=a["dim"], BLOCK_D=a["block_d"], BQ=BLOCK_Q, BK=BLOCK_K,
        ENTROPY=mode == "entropy", SOFTCAP=softcap is not None, PRECISION=a["precision"],
    )  # fmt: skip
    return out


def column_sums(
    query: Tensor,
    key: Tensor,
    valid: Tensor,
    rows: Tensor,
    lse2: Tensor,
    *,
    scaling: float,
    softcap: float | None = None,
) -> Tensor:
    """Pass 2: float32 ``[B, Hkv, N]``, the softmax attention each key receives from the evaluated rows,
    summed over rows and the group's query heads (``lse2`` from :func:`row_statistics`, mode ``"lse"``)."""
    a = _prepare(query, key, valid, rows)
    n_rows, n_keys = a["rows"].shape[1], a["n_keys"]
    out = torch.zeros(a["batch"], a["kv_heads"], n_keys, device=query.device, dtype=torch.float32)
    if n_rows == 0 or n_keys == 0:
        return out
    n_key_tiles = triton.cdiv(n_keys, BLOCK_K)
    # rows are ascending: the first query tile whose last row can see key tile t starts at the first row
    # at or after the tile's first key position
    tile_starts = torch.arange(n_key_tiles, device=query.device, dtype=torch.int32) * BLOCK_K
    positions = a["rows"] + a["offset"]
    first_row = torch.searchsorted(positions, tile_starts.expand(a["batch"], -1).contiguous())
    first_tile = (first_row // BLOCK_Q).to(torch.int32).contiguous()
    q, k = a["query"], a["key"]
    grid = (n_key_tiles, a["batch"] * a["kv_heads"])
    _column_sums_kernel[grid](
        q, k, a["valid"], a["rows"], lse2.contiguous(), first_tile, out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        n_keys, n_rows, a["offset"], a["kv_heads"], a["group"], n_key_tiles, float(scaling), float(softcap or 1.0),
        D=a["dim"], BLOCK_D=a["block_d"], BQ=BLOCK_Q, BK=BLOCK_K,
        SOFTCAP=softcap is not None, PRECISION=a["precision"],
    )  # fmt: skip
    return out
