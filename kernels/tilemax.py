"""Fused normalise + row/column max and argmax over a co-moment tile.

rho[i, j] = (c[i, j] * ix[i]) * iy[j] with ix = 1/sqrt(m2_x), iy = 1/sqrt(m2_y) in
float64, and ix (iy) = 0 for a row (column) whose m2 <= zero_tol, so rho involving a
zero-variance neuron is exactly 0, never NaN. The normalised tile is never materialised
(numba path) or only in row strips (torch path). Both paths evaluate that same
expression in float64 with IEEE rounding, so they agree bit for bit.

Ties go to the smallest index: row_arg[i] is the first j attaining row_max[i], col_arg[j]
the first i attaining col_max[j]. A row of all zeros (e.g. a zero-variance neuron) has
max 0 and arg 0; the caller marks zero-variance neurons (-1) itself. An empty axis gives
max -inf and arg -1. Inputs must be finite (a NaN in c is not ranked).
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

_TORCH_STRIP_BYTES = 64 << 20  # torch path: f64 row strips of at most this size


_LANES = 16  # independent running row maxima per row, so the j loop vectorises
_ROWS = 4    # rows per pass over the column partials (4x fewer loads/stores of them)


@njit(parallel=True, fastmath=False, cache=True)
def _tile_max_numba(c, ix, iy, nparts):
    n_rows, n_cols = c.shape
    W = _LANES
    row_max = np.empty(n_rows)
    row_arg = np.empty(n_rows, dtype=np.int64)
    part_max = np.empty((nparts, n_cols))
    part_arg = np.empty((nparts, n_cols), dtype=np.int64)
    per = (n_rows + nparts - 1) // nparts
    for p in prange(nparts):  # part p owns rows [i0, i1) and one column partial
        cm = part_max[p]
        ca = part_arg[p]
        for j in range(n_cols):
            cm[j] = -np.inf
            ca[j] = -1
        lm = np.empty((_ROWS, W))
        la = np.empty((_ROWS, W), dtype=np.int64)
        i0 = p * per
        i1 = min(n_rows, i0 + per)
        n_full = n_cols - n_cols % W  # here, not above prange: hoisted, 3x slower (numba 0.68)
        for ib in range(i0, i1, _ROWS):
            nr = min(_ROWS, i1 - ib)
            for r in range(_ROWS):
                for w in range(W):
                    lm[r, w] = -np.inf
                    la[r, w] = -1
            if nr == _ROWS:
                a0, a1, a2, a3 = ix[ib], ix[ib + 1], ix[ib + 2], ix[ib + 3]
                for j0 in range(0, n_full, W):
                    for w in range(W):
                        j = j0 + w
                        y = iy[j]
                        v0 = (np.float64(c[ib, j]) * a0) * y
                        v1 = (np.float64(c[ib + 1, j]) * a1) * y
                        v2 = (np.float64(c[ib + 2, j]) * a2) * y
                        v3 = (np.float64(c[ib + 3, j]) * a3) * y
                        # column: best of the 4 rows, ties to the earlier row
                        b01 = v1 > v0
                        m01 = v1 if b01 else v0
                        i01 = ib + 1 if b01 else ib
                        b23 = v3 > v2
                        m23 = v3 if b23 else v2
                        i23 = ib + 3 if b23 else ib + 2
                        b = m23 > m01
                        m = m23 if b else m01
                        mi = i23 if b else i01
                        b = m > cm[j]
                        cm[j] = m if b else cm[j]
                        ca[j] = mi if b else ca[j]
                        # rows: lane w sees columns j = w (mod W), in increasing order
                        b = v0 > lm[0, w]
                        lm[0, w] = v0 if b else lm[0, w]
                        la[0, w] = j if b else la[0, w]
                        b = v1 > lm[1, w]
                        lm[1, w] = v1 if b else lm[1, w]
                        la[1, w] = j if b else la[1, w]
                        b = v2 > lm[2, w]
                        lm[2, w] = v2 if b else lm[2, w]
                        la[2, w] = j if b else la[2, w]
                        b = v3 > lm[3, w]
                        lm[3, w] = v3 if b else lm[3, w]
                        la[3, w] = j if b else la[3, w]
                tail = n_full
            else:
                tail = 0
            for r in range(nr):  # lanes -> row result, then the columns not yet seen
                i = ib + r
                best = -np.inf
                arg = -1
                for w in range(W):
                    if lm[r, w] > best or (lm[r, w] == best and la[r, w] < arg):
                        best = lm[r, w]
                        arg = la[r, w]
                a = ix[i]
                for j in range(tail, n_cols):
                    v = (np.float64(c[i, j]) * a) * iy[j]
                    if v > cm[j]:
                        cm[j] = v
                        ca[j] = i
                    if v > best:
                        best = v
                        arg = j
                row_max[i] = best + 0.0  # -0.0 -> 0.0
                row_arg[i] = arg
    col_max = np.empty(n_cols)
    col_arg = np.empty(n_cols, dtype=np.int64)
    for j in range(n_cols):  # parts hold increasing rows: strict > keeps the first
        best = part_max[0, j]
        arg = part_arg[0, j]
        for p in range(1, nparts):
            if part_max[p, j] > best:
                best = part_max[p, j]
                arg = part_arg[p, j]
        col_max[j] = best + 0.0
        col_arg[j] = arg
    return row_max, row_arg, col_max, col_arg


def inv_sqrt(m2, zero_tol: float = 0.0) -> np.ndarray:
    """1/sqrt(m2) in float64 on the host, 0 where m2 <= zero_tol (zero variance), never
    inf or NaN. The one scale every kernel uses (tile max, rotation baseline,
    correlation_from_comoments), so their correlations agree bit for bit. numpy or torch
    input (copied to the host); a numpy array out."""
    if type(m2).__module__.startswith("torch"):
        m2 = m2.detach().cpu().numpy()
    m2 = np.asarray(m2, dtype=np.float64)
    ok = m2 > zero_tol
    return np.where(ok, 1.0 / np.sqrt(np.where(ok, m2, 1.0)), 0.0)


def _check(shape, m2_x, m2_y):
    if len(shape) != 2:
        raise ValueError(f"c must be 2-D (rows, cols), got shape {tuple(shape)}")
    if tuple(m2_x.shape) != (shape[0],) or tuple(m2_y.shape) != (shape[1],):
        raise ValueError(f"m2_x {tuple(m2_x.shape)} and m2_y {tuple(m2_y.shape)} do not "
                         f"match c {tuple(shape)}: expected ({shape[0]},) and ({shape[1]},)")


def tile_max(c, m2_x, m2_y, zero_tol: float = 0.0):
    """(row_max, row_arg, col_max, col_arg) of rho over a tile c (I, J) of co-moments.

    c: float32/float64 numpy array (numba, parallel over row parts) or torch tensor
    (torch, CPU or CUDA, in f64 row strips). m2_x (I,), m2_y (J,): co-moment sums
    (variance * n). m2 <= zero_tol counts as zero variance (default: exactly zero, which
    the centring guarantees for a constant column). Indices are local (0..J-1, 0..I-1);
    maxima are float64. Returns numpy arrays for numpy input, torch tensors for torch.
    """
    if _is_torch(c):
        return _tile_max_torch(c, m2_x, m2_y, zero_tol)
    c = np.asarray(c)
    if c.dtype not in (np.float32, np.float64):
        c = c.astype(np.float32)
    m2_x, m2_y = np.asarray(m2_x), np.asarray(m2_y)
    _check(c.shape, m2_x, m2_y)
    nparts = max(1, min(numba.get_num_threads(), c.shape[0]))
    return _tile_max_numba(c, inv_sqrt(m2_x, zero_tol), inv_sqrt(m2_y, zero_tol), nparts)


def _is_torch(a) -> bool:
    return type(a).__module__.startswith("torch")


def _tile_max_torch(c, m2_x, m2_y, zero_tol):
    import torch
    dev = c.device
    m2_x = torch.as_tensor(m2_x, device=dev).double()
    m2_y = torch.as_tensor(m2_y, device=dev).double()
    _check(c.shape, m2_x, m2_y)
    n_rows, n_cols = c.shape

    # scales from numpy on the host: torch's 1/sqrt can differ from it in the last bit
    ix = torch.from_numpy(inv_sqrt(m2_x, zero_tol)).to(dev)
    iy = torch.from_numpy(inv_sqrt(m2_y, zero_tol)).to(dev)
    row_max = torch.full((n_rows,), -torch.inf, dtype=torch.float64, device=dev)
    row_arg = torch.full((n_rows,), -1, dtype=torch.int64, device=dev)
    col_max = torch.full((n_cols,), -torch.inf, dtype=torch.float64, device=dev)
    col_arg = torch.full((n_cols,), -1, dtype=torch.int64, device=dev)
    if n_rows == 0 or n_cols == 0:
        return row_max, row_arg, col_max, col_arg
    strip = max(1, _TORCH_STRIP_BYTES // (8 * n_cols))
    for a in range(0, n_rows, strip):
        b = min(n_rows, a + strip)
        # a copy: .double() of a float64 c is c itself, and mul_ would scale the caller's
        # co-moments in place (an accumulator that is still folding)
        rho = c[a:b].to(torch.float64, copy=True).mul_(ix[a:b, None]).mul_(iy[None, :])
        arg = rho.argmax(1)  # first index of the maximum
        row_arg[a:b] = arg
        row_max[a:b] = rho.gather(1, arg[:, None])[:, 0]
        carg = rho.argmax(0)
        cmax = rho.gather(0, carg[None, :])[0]
        better = cmax > col_max  # later strips hold larger rows: strict > keeps the first
        col_max = torch.where(better, cmax, col_max)
        col_arg = torch.where(better, carg + a, col_arg)
    return row_max + 0.0, row_arg, col_max + 0.0, col_arg


def merge_max(max_a, arg_a, max_b, arg_b):
    """Elementwise best of two (max, arg) pairs; a tie goes to the smaller index.

    Args must already be global indices. numpy or torch (returns the same kind).
    """
    if _is_torch(max_a):
        import torch
        take_b = (max_b > max_a) | ((max_b == max_a) & (arg_b < arg_a))
        return torch.where(take_b, max_b, max_a), torch.where(take_b, arg_b, arg_a)
    max_a, arg_a = np.asarray(max_a), np.asarray(arg_a)
    max_b, arg_b = np.asarray(max_b), np.asarray(arg_b)
    take_b = (max_b > max_a) | ((max_b == max_a) & (arg_b < arg_a))
    return np.where(take_b, max_b, max_a), np.where(take_b, arg_b, arg_a)
