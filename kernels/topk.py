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
  start(k, n) / fold(state, block, row_offset) / finish(state)
                                the same summary folded block by block in place: after
                                the first k rows only entries at or above each neuron's
                                k-th best are keyed (what extract uses: cheap per block)
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
    values, rows_out = _decode(np.ascontiguousarray(_chunk_keys(block, row_offset, k).T))
    return values, rows_out


def _chunk_keys(block: np.ndarray, row_offset: int, k: int, ordered: bool = True):
    """(n, k) int64: each column's k best keys (largest first when `ordered`), padded."""
    n_rows, n_neurons = block.shape
    rows = np.arange(row_offset, row_offset + n_rows, dtype=np.int64)[None, :]
    best = np.full((n_neurons, k), _PAD_KEY, np.int64)
    for c0 in range(0, n_neurons, STRIP):       # (neurons, rows) strips: contiguous rows
        strip = np.ascontiguousarray(block[:, c0:c0 + STRIP].T, dtype=np.float32)
        keys = _keys(strip, rows)
        if ordered:
            top = _best(keys, k, axis=1)
        else:
            top = keys if n_rows <= k else np.partition(keys, n_rows - k, axis=1)[:, n_rows - k:]
        best[c0:c0 + STRIP, :top.shape[1]] = top
    return best


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


class Running:
    """A top-k summary being folded block by block, cheaply: the state of fold().

    keys (n, k) int64: each neuron's k best keys so far, in no particular order (padding
    _PAD_KEY); floors: the smallest of them as an ordinal in the blocks' own integer
    view (int16 for fp16 blocks, int32 for fp32), rounded down, so that every entry that
    could still enter the top k compares >= it (-0.0 == +0.0), or > it when the block's
    rows all come after every row seen (an equal value then loses: the lower row wins).
    max_row: the highest row folded in. Plain arrays, no I/O: start() / fold() /
    finish() are chunk()/combine() in another form and give exactly their result
    (tests/test_topk.py).
    """

    def __init__(self, k: int, n_neurons: int):
        _check_k(k)
        self.k, self.n = int(k), int(n_neurons)
        self.keys = np.full((self.n, self.k), _PAD_KEY, np.int64)
        self.full = False          # every neuron holds k real entries (all see every row)
        self.floor: dict = {}      # (block dtype, strict) -> (n,) ordinal floor
        self.seen = 0              # rows folded in
        self.max_row = -1

    def summary(self) -> tuple[np.ndarray, np.ndarray]:
        return _decode(np.ascontiguousarray(np.sort(self.keys, axis=1)[:, ::-1].T))

    def _set(self, keys: np.ndarray, cols=None) -> None:
        """Replace the keys of `cols` (all when None) and their floors."""
        if cols is None:
            self.keys, self.floor = np.ascontiguousarray(keys), {}
            self.full = bool((self.keys != _PAD_KEY).all())
            return
        self.keys[cols] = keys
        low = keys.min(axis=1)
        for (dtype, strict), floor in self.floor.items():
            floor[cols] = _ordinal_floor(low, dtype, strict)

    def floor_of(self, dtype: np.dtype, strict: bool) -> np.ndarray:
        if (dtype, strict) not in self.floor:
            self.floor[dtype, strict] = _ordinal_floor(self.keys.min(axis=1), dtype, strict)
        return self.floor[dtype, strict]


def start(k: int, n_neurons: int) -> Running:
    """A running summary of no rows (fold() blocks into it; finish() reads it)."""
    return Running(k, n_neurons)


FOLD_STRIP_ENTRIES = 1 << 23     # entries per row strip of fold(): bounds its temporaries
_FALLBACK = 4                    # more than 1/_FALLBACK of a strip candidates: plain merge
_ORD = {np.dtype(np.float16): (np.int16, 0x7FFF, 15), np.dtype(np.float32):
        (np.int32, 0x7FFFFFFF, 31)}


def fold(state: Running, block, row_offset: int) -> Running:
    """Fold a (rows, n) fp16/fp32 block (store rows row_offset ..) into `state`, in place;
    returns it. The same result as combine(summary, chunk(block, row_offset, k)), but
    once every neuron holds k entries, only the entries at or above its k-th best value
    (a compare in the block's own integer view: no float conversion of the block) are
    keyed and merged, so a block costs little more than one read of it. Any order of
    blocks, as long as their rows are disjoint."""
    block = np.asarray(block)
    if block.ndim != 2 or block.shape[1] != state.n:
        raise ValueError(f"top-k fold takes a (rows, {state.n}) block, not shape "
                         f"{block.shape}")
    n_rows = block.shape[0]
    if row_offset < 0 or row_offset + n_rows > MAX_ROWS:
        raise ValueError(f"top-k rows must lie in [0, {MAX_ROWS}), not [{row_offset}, "
                         f"{row_offset + n_rows})")
    if block.dtype not in _ORD:
        block = block.astype(np.float32)
    r0, cap = 0, max(1, FOLD_STRIP_ENTRIES // max(1, state.n))
    while r0 < n_rows:
        # until every neuron holds k entries, just enough rows to fill them; then strips
        # that double (the floor rises with the rows seen, so candidates stay few) up to cap
        step = state.k if not state.full else min(cap, max(state.k, state.seen))
        _fold_strip(state, block[r0:r0 + step], row_offset + r0)
        state.seen += min(step, n_rows - r0)
        state.max_row = max(state.max_row, row_offset + min(n_rows, r0 + step) - 1)
        r0 += step
    return state


def finish(state: Running) -> tuple[np.ndarray, np.ndarray]:
    """(values, rows), each (k, n): the summary of every row folded in."""
    return state.summary()


def _ordinal_floor(low_keys: np.ndarray, dtype: np.dtype, strict: bool) -> np.ndarray:
    """(n,) the ordinal (in dtype's integer view) an entry must reach (>=), or pass (>,
    `strict`: for rows after the k-th best's), to compete with the entry of key low_keys
    (the k-th best)."""
    itype, mask, shift = _ORD[dtype]
    values, _ = _decode(low_keys)                            # float32
    low = values.astype(dtype)
    low = np.where(low.astype(np.float32) > values, np.nextafter(low, dtype.type(-np.inf)),
                   low)                                      # round down, never up
    bits = low.view(itype)
    ordinal = bits ^ ((bits >> shift) & mask)
    if strict:      # v > low; for low == +-0.0: v > 0 (ordinal(+0.0) = 0)
        return np.where(low == 0, itype(0), ordinal).astype(itype)
    return np.where(low == 0, itype(-1), ordinal).astype(itype)   # -0.0 ties +0.0


def _plain_merge(state: Running, strip: np.ndarray, row_offset: int) -> None:
    """Every entry of the strip keyed; the k largest of them and the state's, unordered."""
    k = state.k
    both = np.concatenate([state.keys, _chunk_keys(strip, row_offset, k, ordered=False)],
                          axis=1)
    state._set(np.partition(both, k, axis=1)[:, k:])


def _fold_strip(state: Running, strip: np.ndarray, row_offset: int) -> None:
    k, n = state.k, state.n
    if not state.full:
        return _plain_merge(state, strip, row_offset)
    itype, mask, shift = _ORD[strip.dtype]
    bits = np.ascontiguousarray(strip).view(itype)
    strict = row_offset > state.max_row     # ties at the floor lose to the rows seen
    floor = state.floor_of(strip.dtype, strict)
    compare = np.greater if strict else np.greater_equal
    # A k-th best > 0 (the usual case): positive floats' bits are ordered as signed
    # integers and negatives' are < 0, so one compare of the raw bits. The few columns
    # whose k-th best is <= 0 are compared as ordinals, on their own.
    low = np.flatnonzero(floor <= 0)
    if low.size * 4 > n:
        idx = np.flatnonzero(compare(bits ^ ((bits >> shift) & mask), floor))
    else:
        idx = np.flatnonzero(compare(bits, floor if not low.size else
                                     np.where(floor > 0, floor, np.iinfo(itype).max)))
        if low.size:        # (the largest value's bits are NaN's: never a candidate)
            sub = bits[:, low]
            sel = np.flatnonzero(compare(sub ^ ((sub >> shift) & mask), floor[low]))
            r, j = np.divmod(sel, low.size)
            idx = np.concatenate([idx, r * n + low[j]])
    if idx.size == 0:
        return
    if idx.size > strip.size // _FALLBACK:      # many candidates: the plain merge is cheaper
        return _plain_merge(state, strip, row_offset)
    rows, cols = np.divmod(idx, n)
    keys = _keys(strip.reshape(-1)[idx].astype(np.float32), rows + row_offset)
    # group the candidates by column (a radix sort when columns fit in 16 bits)
    order = np.argsort(cols.astype(np.uint16) if n <= 1 << 16 else cols, kind="stable")
    cols, keys = cols[order], keys[order]
    which, first, counts = _groups(cols, n)
    heavy = counts > 3 * k      # a column with many candidates: all its strip rows keyed
    if heavy.any():
        hc = which[heavy]
        both = np.concatenate([state.keys[hc], _chunk_keys(strip[:, hc], row_offset, k,
                                                           ordered=False)], axis=1)
        state._set(np.partition(both, k, axis=1)[:, k:], hc)
        light = np.repeat(~heavy, counts)
        cols, keys = cols[light], keys[light]
        which, first, counts = _groups(cols, n)
        if not which.size:
            return
    extra = int(counts.max())
    dense = np.full((which.size, k + extra), _PAD_KEY, np.int64)
    dense[:, :k] = state.keys[which]
    slot = np.arange(cols.size) - np.repeat(first, counts)
    dense[np.repeat(np.arange(which.size), counts), k + slot] = keys
    state._set(np.partition(dense, extra, axis=1)[:, extra:], which)   # the k largest


def _groups(sorted_cols: np.ndarray, n: int):
    """(columns present, index of each one's first entry, its count) of sorted columns."""
    counts = np.bincount(sorted_cols, minlength=n)
    which = np.flatnonzero(counts)
    counts = counts[which]
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return which, first, counts


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
