"""kernels/topk.py against a plain numpy sort of all rows at once: random data, heavy
ties, blocks merged in shuffled orders and trees, fewer rows than k."""
from __future__ import annotations

import numpy as np
import pytest

from ooc_universal.kernels import topk


def reference_topk(data: np.ndarray, k: int, row_offset: int = 0):
    """Per column, a stable argsort of -value (numpy's stable sort keeps row order among
    equal values, so the lower row comes first), first k; padding past the rows."""
    order = np.argsort(-data.astype(np.float64), axis=0, kind="stable")[:k]
    values = np.take_along_axis(data.astype(np.float32), order, axis=0)
    rows = order.astype(np.int64) + row_offset
    missing = k - values.shape[0]
    if missing > 0:
        values = np.vstack([values, np.full((missing, data.shape[1]), -np.inf, np.float32)])
        rows = np.vstack([rows, np.full((missing, data.shape[1]), -1, np.int64)])
    return values, rows


def _data(rng, n_rows, n_neurons, ties: bool, dtype=np.float16):
    if ties:   # a handful of distinct values: most of the k-th place is a tie; zeros of
        # both signs (equal, so a tie too)
        data = rng.integers(-2, 3, size=(n_rows, n_neurons)).astype(dtype)
        return np.where(rng.random(data.shape) < 0.5, data, -data)
    return rng.standard_normal((n_rows, n_neurons)).astype(dtype)


def _blocks(n_rows, rng, max_block=37):
    cuts = np.sort(rng.choice(np.arange(1, n_rows), size=min(n_rows - 1, n_rows // max_block
                                                          + 3), replace=False))
    bounds = np.concatenate([[0], cuts, [n_rows]])
    return list(zip(bounds[:-1], bounds[1:]))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_chunk_equals_a_stable_sort(ties, dtype):
    rng = np.random.default_rng(1)
    data = _data(rng, 300, 17, ties, dtype)
    for k in (1, 5, 20):
        values, rows = topk.chunk(data, 1000, k)
        ref_values, ref_rows = reference_topk(data, k, 1000)
        np.testing.assert_array_equal(rows, ref_rows)
        np.testing.assert_array_equal(values, ref_values)
        assert values.dtype == np.float32 and rows.dtype == np.int64
        assert values.shape == rows.shape == (k, 17)


@pytest.mark.parametrize("ties", [False, True])
def test_merging_blocks_in_any_order_gives_the_same_top_k(ties):
    rng = np.random.default_rng(2)
    data = _data(rng, 500, 23, ties)
    k = 12
    expected = reference_topk(data, k)
    for trial in range(4):
        parts = [topk.chunk(data[s:e], s, k) for s, e in _blocks(len(data), rng)]
        rng.shuffle(parts)
        if trial % 2:                 # a left fold from the identity
            acc = topk.empty(k, data.shape[1])
            for part in parts:
                acc = topk.combine(acc, part)
        else:                         # a random tree
            while len(parts) > 1:
                i, j = sorted(rng.choice(len(parts), size=2, replace=False))
                merged = topk.combine(parts[j], parts[i])
                parts = [p for n, p in enumerate(parts) if n not in (i, j)] + [merged]
            acc = parts[0]
        np.testing.assert_array_equal(acc[1], expected[1])
        np.testing.assert_array_equal(acc[0], expected[0])


def test_fewer_rows_than_k_pads_and_padding_loses_to_real_minus_inf():
    data = np.array([[1.0, -np.inf], [3.0, -np.inf]], np.float32)
    values, rows = topk.chunk(data, 7, 4)
    np.testing.assert_array_equal(rows, [[8, 7], [7, 8], [-1, -1], [-1, -1]])
    np.testing.assert_array_equal(values[:2], [[3.0, -np.inf], [1.0, -np.inf]])
    assert np.all(np.isneginf(values[2:]))
    np.testing.assert_array_equal(topk.n_found((values, rows)), [2, 2])
    more = topk.combine(topk.chunk(np.array([[2.0, 0.0]], np.float32), 0, 4), (values, rows))
    np.testing.assert_array_equal(more[1][:3], [[8, 0], [0, 7], [7, 8]])


def test_columns_and_bad_input():
    rng = np.random.default_rng(3)
    data = _data(rng, 50, 8, False)
    full = topk.chunk(data, 0, 3)
    part = topk.chunk(data[:, 2:5], 0, 3)
    for a, b in zip(topk.columns(full, slice(2, 5)), part):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="k >= 1"):
        topk.chunk(data, 0, 0)
    with pytest.raises(ValueError, match="different shapes"):
        topk.combine(topk.chunk(data, 0, 3), topk.chunk(data, 0, 4))


@pytest.mark.parametrize("ties", [False, True])
def test_torch_chunk_equals_numpy_chunk(ties):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    data = _data(rng, 200, 11, ties)
    for k in (1, 7, 250):                      # 250 > rows: padding
        want = topk.chunk(data, 300, k)
        got = topk.chunk_torch(torch.from_numpy(data), 300, k)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("data_kind", ["normal", "ties", "rising"])
def test_running_fold_equals_a_stable_sort_in_any_block_order(dtype, data_kind, monkeypatch):
    """start/fold/finish over shuffled blocks (row strips of 3 rows, so the candidate
    filter, its plain-merge fallback and the first-k phase all run) == the float64 sort."""
    monkeypatch.setattr(topk, "FOLD_STRIP_ENTRIES", 3 * 19)
    rng = np.random.default_rng(5)
    n_rows = 400
    if data_kind == "rising":     # later rows beat earlier ones: many candidates per block
        data = (np.arange(n_rows)[:, None] * 0.01 + rng.standard_normal((n_rows, 19))
                ).astype(dtype)
        data[:, 3] = np.inf       # a column of +inf ties; and one with -0.0 / +0.0 ties
        data[:, 4] = np.where(rng.random(n_rows) < 0.5, -0.0, 0.0).astype(dtype)
    else:
        data = _data(rng, n_rows, 19, data_kind == "ties", dtype)
    for k in (1, 6, 30):
        expected = reference_topk(data, k)
        for trial in range(3):
            parts = _blocks(n_rows, rng)
            if trial:
                rng.shuffle(parts)
            state = topk.start(k, 19)
            for s, e in parts:
                topk.fold(state, data[s:e], int(s))
            values, rows = topk.finish(state)
            np.testing.assert_array_equal(rows, expected[1])
            np.testing.assert_array_equal(values, expected[0])


def test_running_fold_with_fewer_rows_than_k_pads():
    data = np.array([[1.0, 2.0], [3.0, -np.inf]], np.float16)
    state = topk.fold(topk.start(4, 2), data, 5)
    values, rows = topk.finish(state)
    np.testing.assert_array_equal(rows, [[6, 5], [5, 6], [-1, -1], [-1, -1]])
    assert not state.full
    with pytest.raises(ValueError, match="block"):
        topk.fold(state, np.zeros((2, 3), np.float16), 0)
