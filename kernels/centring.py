"""Block centring on the CPU in two fused numba passes (comoments.centre_block's CPU path).

Same arithmetic as the torch path in comoments.centre_block, fewer passes over memory:
  pass 1  s[j] = sum_i (x[i, j] - x[0, j])                  (reads x once)
  pass 2  v = x[i, j] - mu[j] (mu = x[0] + s / n, in the working precision);
          xg[i, j] = v (rounded once to the compute dtype); r[j] += v; q[j] += v * v
Rows are split over numba's threads, each with its own float64 partial sums (summed in
thread order, so the result does not depend on scheduling). fp16 input (the store's
dtype) is read as its bit patterns through a 65,536-entry float32 table (numba has no
float16 on the CPU): exact, and it spares the separate fp16 -> fp32 conversion pass. A
bf16 output is written as the round-to-nearest-even upper half of the fp32 bits, as
torch rounds. Pure functions of arrays: no I/O, no globals beyond the constant table.
"""
from __future__ import annotations

import numba
import numpy as np
from numba.core import types
from numba.extending import overload

# float16 bit pattern -> float32 value (exact: every fp16 is an fp32)
_F16_TABLE = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


def _load(x, i, j, table):
    """x[i, j] as a number: through the table when x holds float16 bit patterns."""


@overload(_load, inline="always")
def _load_impl(x, i, j, table):
    if x.dtype == types.uint16:
        def load_f16(x, i, j, table):
            # fp16 bits -> fp32 by arithmetic (vectorises, unlike a table gather):
            # shift exponent+mantissa into place, rescale by 2^112 (also right for
            # subnormals), restore Inf/NaN exponents, then the sign
            h = np.uint32(x[i, j])
            f = (np.uint32((h & np.uint32(0x7FFF)) << np.uint32(13))).view(np.float32) \
                * np.float32(5.192296858534828e+33)
            b = np.float32(f).view(np.uint32)
            if f >= np.float32(65536.0):
                b = np.uint32(b | np.uint32(0x7F800000))
            return np.uint32(b | ((h & np.uint32(0x8000)) << np.uint32(16))).view(np.float32)
        return load_f16
    return lambda x, i, j, table: x[i, j]


def _store(out, i, j, v):
    """out[i, j] = v; as round-to-nearest-even bf16 bits when out is uint16."""


@overload(_store, inline="always")
def _store_impl(out, i, j, v):
    if out.dtype == types.uint16:
        def store_bf16(out, i, j, v):
            b = np.float32(v).view(np.uint32)
            if (b & np.uint32(0x7F800000)) == np.uint32(0x7F800000) and \
                    (b & np.uint32(0x7FFFFF)) != 0:
                out[i, j] = np.uint16((b >> np.uint32(16)) | np.uint32(0x40))  # NaN stays NaN
            else:
                b = b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))
                out[i, j] = np.uint16(b >> np.uint32(16))
        return store_bf16

    def store(out, i, j, v):
        out[i, j] = v
    return store


@numba.njit(parallel=True, cache=True)
def _shifted_sums(x, table, x0, parts):
    """parts[p, j] = sum over thread p's rows of (x[i, j] - x0[j]), float64."""
    n, m = x.shape
    n_parts = parts.shape[0]
    for p in numba.prange(n_parts):
        lo, hi = p * n // n_parts, (p + 1) * n // n_parts
        acc = parts[p]
        for i in range(lo, hi):
            for j in range(m):
                acc[j] += np.float64(_load(x, i, j, table) - x0[j])


@numba.njit(parallel=True, cache=True)
def _centre_write(x, table, mu, out, r_parts, q_parts):
    """out = x - mu (rounded once to out's type); per-thread sums of v and v^2."""
    n, m = x.shape
    n_parts = r_parts.shape[0]
    for p in numba.prange(n_parts):
        lo, hi = p * n // n_parts, (p + 1) * n // n_parts
        r, q = r_parts[p], q_parts[p]
        for i in range(lo, hi):
            for j in range(m):
                v = _load(x, i, j, table) - mu[j]
                _store(out, i, j, v)
                r[j] += np.float64(v)
                q[j] += np.float64(v) * np.float64(v)


def centre_numpy(x: np.ndarray, out: np.ndarray, work_dtype) -> tuple:
    """Centre x (n, N) of float16/float32/float64 into `out` (n, N): the work dtype, or
    uint16 for bf16 bit patterns. Returns (mean f64, m2 f64), as centre_block."""
    n, cols = x.shape
    work = np.dtype(work_dtype)
    src = x.view(np.uint16) if x.dtype == np.float16 else x
    n_parts = max(1, min(numba.get_num_threads(), n))
    x0 = np.ascontiguousarray(x[0]).astype(work)
    s = np.zeros((n_parts, cols))
    _shifted_sums(src, _F16_TABLE, x0, s)
    mu = (x0.astype(np.float64) + s.sum(0) / n).astype(work)
    r = np.zeros((n_parts, cols))
    q = np.zeros((n_parts, cols))
    _centre_write(src, _F16_TABLE, mu, out, r, q)
    r, q = r.sum(0), q.sum(0)
    mean = mu.astype(np.float64) + r / n
    m2 = np.maximum(q - r * r / n, 0.0)
    return mean, m2
