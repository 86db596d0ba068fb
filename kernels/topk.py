"""A mergeable top-k of activations per neuron: where each neuron fires most.

A top-k summary of some token rows is a pair (values, rows), both (k, n_neurons):
column j holds neuron j's k largest activations (float32, highest first) and the store
rows (int64) they sit at. Ranking: larger value first; among equal values the LOWER row
wins. That rule is a total order on (value, row), so the k best entries of a set of rows
do not depend on how the rows were cut into blocks or in which order the blocks were
merged: chunk() of any block and combine() of any two summaries of disjoint rows give,
in any order and any tree, exactly the top k of all the rows (tests/test_topk.py).

A summary of fewer than k rows is padded with EMPTY_VALUE (-inf) at row EMPTY_ROW (-1);
padding ranks below every real entry (even a real -inf), so it only remains where fewer
than k rows were seen. empty(k, n) is the identity of combine().

  chunk(block, row_offset, k)   block (rows, n) fp16/fp32 -> the summary of its rows
                                (store rows row_offset .. row_offset + rows - 1)
  combine(a, b)                 the summary of both (rows of a and b must be disjoint)
  empty(k, n)                   no rows yet
  columns(summary, cols)        the summary of some neurons only (a panel's columns)
  chunk_torch(block, row_offset, k)   chunk() of a torch tensor on its own device (a GPU
                                the reduce's block is already on): the same keys,
                                torch.topk over them; keys are unique, so the result is
                                chunk()'s exactly, returned as numpy

fp16 -> float32 is exact, so values are the store's own numbers (-0.0 comes back as
0.0, which compares equal). Inputs must not hold NaN (a NaN has no rank; the reduce and
extract refuse non-finite activations anyway); rows must be below MAX_ROWS (2^32 - 1).
Cost: one int64 key per entry and a partition (no sort of the block), in strips of
STRIP neurons: about 0.7 s for a 1024 x 36,864 fp16 block on 2 busy cores, a tenth of
that block's co-moment GEMM for one pair. Pure numpy, no files, no globals.
"""
from __future__ import annotations

import numpy as np

EMPTY_VALUE = -np.inf
EMPTY_ROW = -1
MAX_ROWS = 2**32 - 1                # rows are kept in the low 32 bits of a sort key
STRIP = 4096                        # neurons per strip: bounds chunk()'s temporaries
_LOW = np.int64(0xFFFFFFFF)
_PAD_KEY = np.iinfo(np.int64).min   # below every real entry's key


def empty(k: int, n_neurons: int) -> tuple[np.ndarray, np.ndarray]:
    """The summary of no rows: every slot padding."""
    _check_k(k)
    return (np.full((k, n_neurons), EMPTY_VALUE, np.float32),
            np.full((k, n_neurons), EMPTY_ROW, np.int64))


# One int64 key per entry orders (value desc, row asc) with no ties: the float32's bits
# mapped to an order-preserving int32 in the high half, MAX_ROWS - row in the low half.
# So a partition of keys (O(rows) per neuron, no sort of the block) picks exactly the
# k best entries, and equal values can never make the choice depend on the algorithm.

def _keys(values_t: np.ndarray, rows) -> np.ndarray:
    """int64 keys of float32 values (any shape) at int64 rows (broadcast)."""
    bits = (values_t + np.float32(0.0)).view(np.int32).astype(np.int64)   # -0.0 -> +0.0
    ordinal = bits ^ ((bits >> 31) & 0x7FFFFFFF)       # monotonic in the float's value
    return (ordinal << 32) | (_LOW - rows)


def _decode(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values float32, rows int64) of keys; padding keys give (-inf, -1)."""
    pad = keys == _PAD_KEY
    ordinal = keys >> 32
    bits = (ordinal ^ ((ordinal >> 31) & 0x7FFFFFFF)).astype(np.int32)
    values = bits.view(np.float32).copy()
    rows = _LOW - (keys & _LOW)
    values[pad], rows[pad] = EMPTY_VALUE, EMPTY_ROW
    return values, rows


def _summary_keys(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    keys = _keys(np.asarray(values, np.float32), np.where(rows < 0, 0, rows))
    keys[rows < 0] = _PAD_KEY
    return keys


def _best(keys: np.ndarray, k: int, axis: int) -> np.ndarray:
    """The k largest keys along `axis`, largest first."""
    n = keys.shape[axis]
    if n > k:
        keys = np.partition(keys, n - k, axis=axis)
        keys = keys[n - k:] if axis == 0 else keys[:, n - k:]
    keys = np.sort(keys, axis=axis)
    return keys[::-1] if axis == 0 else keys[:, ::-1]


def chunk(block, row_offset: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, rows), each (k, n): the k largest entries of every column of `block`
    (ties: lower row first), highest first; rows are row_offset + the block's row."""
    _check_k(k)
    block = np.asarray(block)
    if block.ndim != 2:
        raise ValueError(f"top-k chunk takes a 2-d block (rows x neurons), not shape "
                         f"{block.shape}")
    n_rows, n_neurons = block.shape
    if row_offset < 0 or row_offset + n_rows > MAX_ROWS:
        raise ValueError(f"top-k rows must lie in [0, {MAX_ROWS}), not [{row_offset}, "
                         f"{row_offset + n_rows})")
    rows = np.arange(row_offset, row_offset + n_rows, dtype=np.int64)[None, :]
    best = np.full((n_neurons, k), _PAD_KEY, np.int64)
    for c0 in range(0, n_neurons, STRIP):       # (neurons, rows) strips: contiguous rows
        strip = np.ascontiguousarray(block[:, c0:c0 + STRIP].T, dtype=np.float32)
        top = _best(_keys(strip, rows), k, axis=1)
        best[c0:c0 + STRIP, :top.shape[1]] = top
    values, rows_out = _decode(np.ascontiguousarray(best.T))
    return values, rows_out


def chunk_torch(block, row_offset: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """chunk() of a (rows, n) torch tensor, computed where the tensor lives."""
    import torch
    _check_k(k)
    n_rows, n_neurons = block.shape
    if row_offset < 0 or row_offset + n_rows > MAX_ROWS:
        raise ValueError(f"top-k rows must lie in [0, {MAX_ROWS}), not [{row_offset}, "
                         f"{row_offset + n_rows})")
    rows = torch.arange(row_offset, row_offset + n_rows, device=block.device,
                        dtype=torch.int64)[:, None]
    best = np.full((k, n_neurons), _PAD_KEY, np.int64)
    take = min(k, n_rows)
    for c0 in range(0, n_neurons, STRIP):
        strip = block[:, c0:c0 + STRIP].to(torch.float32) + 0.0           # -0.0 -> +0.0
        bits = strip.contiguous().view(torch.int32).to(torch.int64)
        keys = ((bits ^ ((bits >> 31) & 0x7FFFFFFF)) << 32) | (int(_LOW) - rows)
        top = torch.topk(keys, take, dim=0, largest=True, sorted=True).values
        best[:take, c0:c0 + STRIP] = top.cpu().numpy()
    return _decode(best)


def combine(a, b) -> tuple[np.ndarray, np.ndarray]:
    """The top k of two summaries of disjoint rows (same k, same neurons)."""
    (va, ra), (vb, rb) = a, b
    if va.shape != vb.shape or ra.shape != va.shape or rb.shape != vb.shape:
        raise ValueError(f"top-k summaries of different shapes: {va.shape} and {vb.shape}; "
                         "merge summaries of the same k and neurons")
    keys = np.concatenate([_summary_keys(va, ra), _summary_keys(vb, rb)])
    return _decode(np.ascontiguousarray(_best(keys, va.shape[0], axis=0)))


def columns(summary, cols) -> tuple[np.ndarray, np.ndarray]:
    """The summary restricted to some neurons (an index array or a slice)."""
    values, rows = summary
    return values[:, cols], rows[:, cols]


def n_found(summary) -> np.ndarray:
    """(n,) how many real (non-padding) entries each neuron's column holds."""
    return (summary[1] >= 0).sum(axis=0)


def _check_k(k: int) -> None:
    if int(k) != k or k < 1:
        raise ValueError(f"top-k needs k >= 1, not {k!r}")
