"""Kernels against float64 numpy written here from the formulas (design.md, "The math")."""
import numpy as np
import pytest
import torch

from ooc_universal.kernels import comoments as cm
from ooc_universal.kernels import rotation as rot
from ooc_universal.kernels import tilemax as tm

F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64


# ---------------------------------------------------------------- float64 references

def ref_moments(x, y):
    """n, means, M2s, C and rho in float64 from the definitions."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    xc, yc = x - x.mean(0), y - y.mean(0)
    m2x, m2y = (xc * xc).sum(0), (yc * yc).sum(0)
    c = xc.T @ yc
    denom = np.sqrt(np.outer(m2x, m2y))
    rho = np.divide(c, denom, out=np.zeros_like(c), where=denom > 0)
    return {"n": len(x), "mean_x": x.mean(0), "mean_y": y.mean(0), "m2_x": m2x, "m2_y": m2y,
            "c": c, "rho": rho}


def planted(n=3000, seed=0):
    """fp16 blocks (as the store holds them) with known structure.

    x: 12 neurons, y: 10 neurons. rho(x0, y0) ~ 0.9, rho(x1, y1) ~ -0.7; x2 and y2
    constant; x3 zero except on 3 tokens, y3 zero except on 3 (other) tokens; the rest
    Gaussian with offsets and scales.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 12)) * rng.uniform(0.2, 3, 12) + rng.uniform(-2, 4, 12)
    y = rng.standard_normal((n, 10)) * rng.uniform(0.2, 3, 10) + rng.uniform(-2, 4, 10)
    z0, z1 = rng.standard_normal(n), rng.standard_normal(n)
    x[:, 0], y[:, 0] = z0 + 1.5, 0.9 * z0 + np.sqrt(1 - 0.81) * rng.standard_normal(n) - 0.5
    x[:, 1], y[:, 1] = 2 * z1, -0.7 * z1 + np.sqrt(1 - 0.49) * rng.standard_normal(n)
    x[:, 2], y[:, 2] = 3.5, -1.25
    x[:, 3] = 0.0
    x[[5, n // 2, n - 1], 3] = [1.0, 2.5, 0.75]
    y[:, 3] = 0.0
    y[[0, 7, n // 3], 3] = [0.5, 1.5, 4.0]
    return x.astype(np.float16), y.astype(np.float16)


def random_blocks(n=2000, na=40, nb=56, seed=1):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 8))
    x = z @ rng.standard_normal((8, na)) + rng.standard_normal((n, na)) + rng.uniform(-3, 3, na)
    y = z @ rng.standard_normal((8, nb)) + rng.standard_normal((n, nb)) + rng.uniform(-3, 3, nb)
    return x.astype(np.float16), y.astype(np.float16)


def t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def rho_of(s):
    return cm.correlation_from_comoments(s["c"], s["m2_x"], s["m2_y"]).numpy()


def assert_summary_close(got, ref, rtol):
    assert got["n"] == ref["n"]
    scale_c = np.abs(ref["c"]).max()
    np.testing.assert_allclose(got["c"].double().numpy(), ref["c"], rtol=0, atol=rtol * scale_c)
    for k in ("mean_x", "mean_y"):
        np.testing.assert_allclose(got[k].numpy(), ref[k], rtol=1e-6, atol=1e-6)
    for k in ("m2_x", "m2_y"):
        np.testing.assert_allclose(got[k].numpy(), ref[k], rtol=rtol, atol=1e-9)


@pytest.fixture(params=[None, 256], ids=["one-chunk", "many-chunks"])
def chunking(request, monkeypatch):
    """Centre in one chunk (as on a GPU for blocks under GPU_CHUNK_BYTES) or in many
    small row chunks (CPU path)."""
    if request.param is not None:
        monkeypatch.setattr(cm, "_CHUNK_BYTES", request.param)
    else:
        monkeypatch.setattr(cm, "_chunk_rows", lambda n, cols, device, itemsize=4: max(n, 1))


def test_gpu_centring_chunks_are_bounded():
    """On a GPU the centring's two scratch buffers per role hold at most GPU_CHUNK_BYTES
    each (the planner counts 4 of them), however wide the block; small blocks are one
    chunk."""
    gpu = torch.device("cuda")   # a device name only: nothing is allocated
    for n, cols, size in ((8192, 36864, 4), (8192, 36864, 8), (8192, 3072, 4), (1, 10**7, 4)):
        k = cm._chunk_rows(n, cols, gpu, size)
        assert 1 <= k <= n
        assert k == 1 or k * cols * size <= cm.GPU_CHUNK_BYTES
    assert cm._chunk_rows(100, 3072, gpu) == 100
    assert cm._chunk_rows(8192, 36864, torch.device("cpu")) * 36864 * 4 <= cm._CHUNK_BYTES


# ---------------------------------------------------------------- co-moments

@pytest.mark.parametrize("data", [planted, random_blocks])
@pytest.mark.parametrize("dtype,tol", [(F32, 1e-5), (F64, 1e-12)])
def test_chunk_matches_float64(data, dtype, tol, chunking):
    x, y = data()
    ref = ref_moments(x, y)
    got = cm.comoment_chunk(t(x), t(y), compute_dtype=dtype)
    assert got["c"].dtype == (F64 if dtype == F64 else F32)
    assert all(got[k].dtype == F64 for k in ("mean_x", "mean_y", "m2_x", "m2_y"))
    rho = rho_of(got)
    assert np.isfinite(rho).all()
    assert np.abs(rho - ref["rho"]).max() <= tol
    assert_summary_close(got, ref, rtol=1e-5 if dtype == F32 else 1e-12)
    # np.corrcoef as a second reference, on the neurons with variance
    live_x, live_y = ref["m2_x"] > 0, ref["m2_y"] > 0
    cc = np.corrcoef(x.astype(np.float64)[:, live_x], y.astype(np.float64)[:, live_y],
                     rowvar=False)[:live_x.sum(), live_x.sum():]
    assert np.abs(rho[np.ix_(live_x, live_y)] - cc).max() <= tol


def test_planted_structure_and_zero_variance():
    x, y = planted()
    got = cm.comoment_chunk(t(x), t(y))
    rho = rho_of(got)
    assert abs(rho[0, 0] - 0.9) < 0.03 and abs(rho[1, 1] + 0.7) < 0.03
    # constant neurons: exactly zero M2 (the centring is exact for them), rho exactly 0
    assert got["m2_x"][2].item() == 0.0 and got["m2_y"][2].item() == 0.0
    assert got["mean_x"][2].item() == 3.5 and got["mean_y"][2].item() == -1.25
    assert (rho[2] == 0).all() and (rho[:, 2] == 0).all()
    # the sparse neuron has variance and a finite correlation
    assert got["m2_x"][3].item() > 0 and np.isfinite(rho[3]).all()


def test_fp16_input_converted_once_equals_fp32_input():
    x, y = planted()
    a = cm.comoment_chunk(t(x), t(y))
    b = cm.comoment_chunk(t(x.astype(np.float32)), t(y.astype(np.float32)))
    for k in ("mean_x", "mean_y", "m2_x", "m2_y", "c"):
        assert torch.equal(a[k], b[k])


def test_bf16_error():
    """CPU bf16: one GEMM whose bf16 output is rounded (|d rho| <= 2^-8 |rho| + input
    rounding); merging many blocks averages the rounding down to the 2e-3 target."""
    x, y = random_blocks(n=4096, na=64, nb=64, seed=3)
    xp, yp = planted(n=4096, seed=4)
    x, y = np.hstack([x, xp]), np.hstack([y, yp])
    ref = ref_moments(x, y)
    one = cm.comoment_chunk(t(x), t(y), compute_dtype=BF16)
    assert one["c"].dtype == F32
    err = np.abs(rho_of(one) - ref["rho"])
    assert (err <= 2.0 ** -8 * np.abs(ref["rho"]) + 5e-4).all(), err.max()
    acc = cm.empty_comoments(x.shape[1], y.shape[1], "bf16")
    for a in range(0, len(x), 256):
        cm.comoment_update_(acc, t(x[a:a + 256]), t(y[a:a + 256]), compute_dtype=BF16)
    err = np.abs(rho_of(acc) - ref["rho"])
    assert err.max() <= 2e-3, err.max()
    # the means and M2 never pass through bf16
    np.testing.assert_allclose(acc["m2_x"].numpy(), ref["m2_x"], rtol=1e-5)


SPLITS = [0, 1, 1, 518, 1200, 1201, 2999, 3000]  # a 1-row block, an empty block, uneven


def blocks(x, y, bounds=SPLITS):
    return [(t(x[a:b]), t(y[a:b])) for a, b in zip(bounds[:-1], bounds[1:])]


@pytest.mark.parametrize("dtype,tol", [(F32, 1e-5), (F64, 1e-12)])
def test_chunk_and_combine_uneven_splits(dtype, tol, chunking):
    x, y = planted()
    ref = ref_moments(x, y)
    parts = [cm.comoment_chunk(a, b, compute_dtype=dtype) for a, b in blocks(x, y)]
    assert [p["n"] for p in parts].count(0) == 1

    pure = parts[0]
    for p in parts[1:]:
        pure = cm.comoment_combine(pure, p)
    inplace = cm.empty_comoments(12, 10, dtype)
    for p in parts:
        cm.comoment_merge_(inplace, p)
    fused = cm.empty_comoments(12, 10, dtype)
    for a, b in blocks(x, y):
        cm.comoment_update_(fused, a, b, compute_dtype=dtype)

    for got in (pure, inplace, fused):
        assert np.abs(rho_of(got) - ref["rho"]).max() <= tol
        assert_summary_close(got, ref, rtol=1e-5 if dtype == F32 else 1e-12)
        assert got["m2_x"][2].item() == 0.0 and got["m2_y"][2].item() == 0.0


def test_combine_is_pure_and_n0_is_identity():
    x, y = planted(n=500)
    a = cm.comoment_chunk(t(x[:200]), t(y[:200]))
    b = cm.comoment_chunk(t(x[200:]), t(y[200:]))
    snap = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
    cm.comoment_combine(a, b)
    for k, v in snap.items():
        assert torch.equal(a[k], v) if isinstance(v, torch.Tensor) else a[k] == v
    empty = cm.comoment_chunk(t(x[:0]), t(y[:0]))
    assert empty["n"] == 0
    for e in (cm.comoment_combine(a, empty), cm.comoment_combine(empty, a)):
        for k in ("mean_x", "mean_y", "m2_x", "m2_y", "c"):
            assert torch.equal(e[k], a[k])
        assert e["c"].data_ptr() != a["c"].data_ptr()  # a new record, not an alias


def test_merge_trees_agree():
    x, y = random_blocks(n=3000)
    bounds = [0, 7, 700, 701, 1650, 2400, 3000]
    parts = [cm.comoment_chunk(a, b) for a, b in blocks(x, y, bounds)]
    comb = cm.comoment_combine
    left = parts[0]
    for p in parts[1:]:
        left = comb(left, p)
    right = parts[-1]
    for p in reversed(parts[:-1]):
        right = comb(p, right)
    tree = comb(comb(comb(parts[0], parts[1]), parts[2]),
                comb(parts[3], comb(parts[4], parts[5])))
    shuffled = parts[3]
    for i in (0, 5, 1, 4, 2):
        shuffled = comb(shuffled, parts[i])
    for other in (right, tree, shuffled):
        for k in ("mean_x", "mean_y", "m2_x", "m2_y", "c"):
            a, b = left[k].double().numpy(), other[k].double().numpy()
            assert np.abs(a - b).max() <= 1e-6 * np.abs(a).max(), k


def test_self_comoments_match_per_layer_float64(chunking):
    rng = np.random.default_rng(5)
    n, layers, d = 1500, 3, 8
    y = (rng.standard_normal((n, layers * d)) @ rng.standard_normal((layers * d, layers * d))
         + rng.uniform(-2, 2, layers * d)).astype(np.float16)
    y[:, 4] = 0.5  # a dead neuron
    y64 = y.astype(np.float64)
    yc = y64 - y64.mean(0)
    ref_s = np.stack([yc[:, l * d:(l + 1) * d].T @ yc[:, l * d:(l + 1) * d]
                      for l in range(layers)])
    bounds = [0, 1, 1, 400, 1499, 1500]
    parts = [cm.self_comoment_chunk(t(y[a:b]), d) for a, b in zip(bounds[:-1], bounds[1:])]
    got = parts[0]
    for p in parts[1:]:
        got = cm.self_comoment_combine(got, p)
    assert got["n"] == n and got["s"].dtype == F64 and got["s"].shape == (layers, d, d)
    np.testing.assert_allclose(got["s"].numpy(), ref_s, rtol=0, atol=1e-5 * np.abs(ref_s).max())
    np.testing.assert_allclose(got["mean"].numpy(), y64.mean(0), atol=1e-6)
    np.testing.assert_allclose(got["m2"].numpy(), (yc ** 2).sum(0), rtol=1e-5)
    diag = np.stack([np.diag(s) for s in got["s"].numpy()]).ravel()
    np.testing.assert_allclose(diag, got["m2"].numpy(), rtol=1e-5)
    assert got["m2"][4].item() == 0.0 and (got["s"][0, 4] == 0).all()
    one = cm.self_comoment_chunk(t(y), d, compute_dtype=F64)
    np.testing.assert_allclose(one["s"].numpy(), ref_s, rtol=1e-12, atol=1e-9)


def _fold_strips(blocks_x, blocks_y, d, dtype):
    """The reduce's fold: each block's x centred once with a spare row, y one column
    strip of d at a time (the Chan term in the spare rows), moments once per block."""
    acc = cm.empty_comoments(blocks_x[0].shape[1], blocks_y[0].shape[1], dtype, zeroed=False)
    acc["c"].fill_(float("nan"))  # never read: the first block's strips overwrite it
    selfs = cm.empty_self_comoments(blocks_y[0].shape[1], d)
    ws = {}
    for xb, yb in zip(blocks_x, blocks_y):
        cx = cm.centre_block(t(xb), dtype, workspace=ws, role="x", spare_row=True)
        xt = cm.transpose_block(cx, ws) if dtype == BF16 else None  # the CPU bf16 layout
        mean_y, m2_y = torch.empty(yb.shape[1], dtype=F64), torch.empty(yb.shape[1], dtype=F64)
        for layer, c0 in enumerate(range(0, yb.shape[1], d)):
            cy = cm.centre_block(t(yb)[:, c0:c0 + d], dtype, workspace=ws, role="y",
                                 spare_row=True)
            assert cy[2].shape == (len(yb) + 1, d)
            cm.comoment_strip_update_(acc, cx, cy, c0, xt=xt)
            cm.self_comoment_strip_update_(selfs, cy, layer, workspace=ws)
            mean_y[c0:c0 + d], m2_y[c0:c0 + d] = cy[0], cy[1]
        cm.comoment_moments_update_(acc, len(xb), cx[0], cx[1], mean_y, m2_y)
        cm.self_moments_update_(selfs, len(yb), mean_y, m2_y)
    return acc, selfs


@pytest.mark.parametrize("dtype,tol", [(F32, 1e-5), (F64, 1e-12), (BF16, 1e-2)])
def test_strip_fold_with_spare_rows_matches_float64(dtype, tol):
    """Uneven blocks (1 row, then long ones), y strips of one layer each, strided
    (column-slice) inputs: the same co-moments and self co-moments as float64."""
    x, y = random_blocks(n=1500, na=20, nb=24)
    d = 8
    bounds = [0, 1, 300, 301, 1100, 1500]
    bx = [x[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    by = [y[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    acc, selfs = _fold_strips(bx, by, d, dtype)
    ref = ref_moments(x, y)
    assert_summary_close(acc, ref, tol)
    y64 = y.astype(np.float64)
    yc = y64 - y64.mean(0)
    for layer in range(3):
        sl = slice(layer * d, (layer + 1) * d)
        want = yc[:, sl].T @ yc[:, sl]
        np.testing.assert_allclose(selfs["s"][layer].numpy(), want, rtol=0,
                                   atol=tol * np.abs(want).max())
    np.testing.assert_allclose(selfs["m2"].numpy(), (yc ** 2).sum(0), rtol=max(tol, 1e-6))
    assert selfs["n"] == 1500 and selfs["s"].dtype == F64


def test_correlation_zero_variance_is_zero_numpy_and_torch():
    c = np.array([[2.0, 0.0], [1.0, -3.0]])
    m2x, m2y = np.array([4.0, 0.0]), np.array([1.0, 9.0])
    want = np.array([[1.0, 0.0], [0.0, 0.0]])
    np.testing.assert_array_equal(cm.correlation_from_comoments(c, m2x, m2y), want)
    got = cm.correlation_from_comoments(t(c), t(m2x), t(m2y))
    np.testing.assert_array_equal(got.numpy(), want)


def test_input_errors():
    x = torch.zeros(5, 3)
    with pytest.raises(ValueError, match="tokens"):
        cm.comoment_chunk(x, torch.zeros(4, 2))
    with pytest.raises(ValueError, match="compute_dtype"):
        cm.comoment_chunk(x, x, compute_dtype=torch.float16)
    with pytest.raises(ValueError, match="precision"):
        cm.empty_comoments(3, 3, "fp16")
    with pytest.raises(ValueError, match="whole number of layers"):
        cm.self_comoment_chunk(torch.zeros(5, 10), 3)


# ---------------------------------------------------------------- tile max

def ref_tile_max(c, m2x, m2y):
    """numpy argmax (first index on ties) of rho = c / sqrt(m2x m2y), zero variance -> 0."""
    c = np.asarray(c, np.float64)
    denom = np.sqrt(np.outer(m2x, m2y))
    rho = np.divide(c, denom, out=np.zeros_like(c), where=denom > 0)
    return rho.max(1), rho.argmax(1), rho.max(0), rho.argmax(0)


def tile_case(rows, cols, dtype, seed):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((rows, cols)).astype(dtype)
    m2x, m2y = rng.uniform(0.5, 2, rows), rng.uniform(0.5, 2, cols)
    if rows > 3 and cols > 5:
        c[:, 1] = np.abs(c[:, 1]) + 10  # columns 1 and 5 tie exactly, as every row's max
        c[:, 5] = c[:, 1]
        m2y[5] = m2y[1]
        c[0] = np.abs(c[0]) + 50        # rows 0 and 3 tie exactly, as every column's max
        c[3] = c[0]
        m2x[3] = m2x[0]
        m2x[2] = 0.0       # zero-variance row and column
        m2y[4] = 0.0
        c[2], c[:, 4] = 0.0, 0.0
    if rows > 1 and cols > 1:
        c[-1] = -np.abs(c[-1]) - 1  # a row of negative correlations (max < 0)
    return c, m2x, m2y


SHAPES = [(1, 1), (3, 17), (37, 100), (64, 48), (129, 33)]


@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tile_max_numba_vs_numpy(rows, cols, dtype):
    c, m2x, m2y = tile_case(rows, cols, dtype, seed=rows * 1000 + cols)
    got = tm.tile_max(c, m2x, m2y)
    ref = ref_tile_max(c, m2x, m2y)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-13, atol=0)
    np.testing.assert_array_equal(got[1], ref[1])
    np.testing.assert_allclose(got[2], ref[2], rtol=1e-13, atol=0)
    np.testing.assert_array_equal(got[3], ref[3])
    assert got[1].dtype == np.int64 and got[0].dtype == np.float64
    if rows > 3 and cols > 5:
        live = np.arange(4, rows - 1)  # rows 0, 3 (big), 2 (zero var), last (negative)
        assert (got[1][live] == 1).all()       # tie between columns 1 and 5 -> 1
        assert (np.delete(got[3], 4) == 0).all()  # tie between rows 0 and 3 -> 0
        assert got[0][2] == 0.0 and got[1][2] == 0  # zero-variance row: max 0, first j
        assert got[2][4] == 0.0 and not np.signbit(got[2][4])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows,cols", SHAPES)
def test_tile_max_torch_identical_to_numba(rows, cols, dtype, monkeypatch):
    """Bit for bit the numba path, and the co-moments are left as they were (the GPU's
    finalize and snapshots read an accumulator that is still folding; in fp64 a careless
    .double() would be the accumulator itself)."""
    c, m2x, m2y = tile_case(rows, cols, dtype, seed=7 + rows)
    want = tm.tile_max(c, m2x, m2y)
    monkeypatch.setattr(tm, "_TORCH_STRIP_BYTES", 8 * cols * 5)  # several row strips
    ct = t(c)
    before = ct.clone()
    got = tm.tile_max(ct, t(m2x), t(m2y))
    assert all(isinstance(g, torch.Tensor) for g in got)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.numpy(), w)
    assert torch.equal(ct, before)


def test_tile_max_same_for_any_thread_partition():
    c, m2x, m2y = tile_case(101, 70, np.float32, seed=11)
    ix, iy = tm.inv_sqrt(m2x, 0.0), tm.inv_sqrt(m2y, 0.0)
    want = tm._tile_max_numba(c, ix, iy, 1)
    for parts in (2, 3, 7, 101):
        got = tm._tile_max_numba(c, ix, iy, parts)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


def test_tile_max_zero_tol_and_empty():
    c = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    rm, ra, cmx, ca = tm.tile_max(c, np.array([1.0, 1e-20]), np.array([1.0, 1.0]),
                                  zero_tol=1e-12)
    assert rm[1] == 0.0 and cmx.tolist() == [1.0, 2.0] and ca.tolist() == [0, 0]
    rm, ra, cmx, ca = tm.tile_max(np.zeros((0, 3), np.float32), np.zeros(0), np.ones(3))
    assert rm.shape == (0,) and (cmx == -np.inf).all() and (ca == -1).all()
    with pytest.raises(ValueError, match="m2_y"):
        tm.tile_max(c, np.ones(2), np.ones(3))


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_merge_max(kind):
    ma, aa = np.array([1.0, 2.0, 3.0, -1.0]), np.array([0, 5, 9, 2])
    mb, ab = np.array([1.0, 2.5, 3.0, -1.0]), np.array([4, 1, 3, 7])
    conv = (lambda a: a) if kind == "numpy" else t
    m, a = tm.merge_max(conv(ma), conv(aa), conv(mb), conv(ab))
    np.testing.assert_array_equal(np.asarray(m), [1.0, 2.5, 3.0, -1.0])
    np.testing.assert_array_equal(np.asarray(a), [0, 1, 3, 2])  # ties -> smaller index


def test_tiles_merged_equal_whole():
    c, m2x, m2y = tile_case(60, 90, np.float32, seed=3)
    whole = tm.tile_max(c, m2x, m2y)
    # two column tiles: rows merge with merge_max, columns concatenate
    left, right = tm.tile_max(c[:, :41], m2x, m2y[:41]), tm.tile_max(c[:, 41:], m2x, m2y[41:])
    rm, ra = tm.merge_max(left[0], left[1], right[0], right[1] + 41)
    np.testing.assert_array_equal(rm, whole[0])
    np.testing.assert_array_equal(ra, whole[1])
    np.testing.assert_array_equal(np.concatenate([left[2], right[2]]), whole[2])
    # two row tiles: columns merge
    top, bot = tm.tile_max(c[:25], m2x[:25], m2y), tm.tile_max(c[25:], m2x[25:], m2y)
    cmx, carg = tm.merge_max(top[2], top[3], bot[2], bot[3] + 25)
    np.testing.assert_array_equal(cmx, whole[2])
    np.testing.assert_array_equal(carg, whole[3])


# ---------------------------------------------------------------- rotation baseline

def test_rotation_matrix_rows_unit_norm_and_seeded():
    r = rot.rotation_matrix(7, 2, 16)
    assert r.shape == (16, 16) and r.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(r, axis=1), 1.0, rtol=1e-14)
    g = np.random.default_rng([7, 2]).standard_normal((16, 16))
    np.testing.assert_array_equal(r, g / np.linalg.norm(g, axis=1, keepdims=True))
    np.testing.assert_array_equal(r, rot.rotation_matrix(7, 2, 16))
    assert not np.allclose(r, rot.rotation_matrix(7, 3, 16))
    assert not np.allclose(r, rot.rotation_matrix(8, 2, 16))


def rotation_case(seed=0):
    rng = np.random.default_rng(seed)
    n, na, layers, d = 1200, 9, 3, 6
    z = rng.standard_normal((n, 4))
    x = z @ rng.standard_normal((4, na)) + 0.5 * rng.standard_normal((n, na)) + 1.0
    y = z @ rng.standard_normal((4, layers * d)) + rng.standard_normal((n, layers * d)) - 0.5
    x[:, 4] = 2.0   # zero-variance reference neuron
    y[:, 7] = 0.25  # a dead neuron inside layer 1
    return x.astype(np.float16).astype(np.float64), y.astype(np.float16).astype(np.float64), d


def explicit_rotated_row_max(x, y_layer, r):
    """Rotate the activations, then float64 correlations, then the row max."""
    yr = rot.rotate_activations(y_layer, r)
    xc, yc = x - x.mean(0), yr - yr.mean(0)
    denom = np.sqrt(np.outer((xc ** 2).sum(0), (yc ** 2).sum(0)))
    rho = np.divide(xc.T @ yc, denom, out=np.zeros((x.shape[1], yr.shape[1])),
                    where=denom > 0)
    return rho.max(1)


def test_rotated_row_max_equals_explicit_rotation():
    x, y, d = rotation_case()
    ref = ref_moments(x, y)
    yc = y - y.mean(0)
    for layer in range(y.shape[1] // d):
        sl = slice(layer * d, (layer + 1) * d)
        r = rot.rotation_matrix(123, layer, d)
        want = explicit_rotated_row_max(x, y[:, sl], r)
        s_layer = yc[:, sl].T @ yc[:, sl]
        got = rot.rotated_row_max(ref["c"][:, sl], ref["m2_x"], s_layer, r)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        assert got[4] == 0.0
        got_t = rot.rotated_row_max(t(ref["c"][:, sl]), t(ref["m2_x"]), t(s_layer), t(r))
        np.testing.assert_allclose(got_t.numpy(), got, rtol=0, atol=1e-12)
        # float32 co-moments from the kernels themselves
        st = cm.comoment_chunk(t(x.astype(np.float16)), t(y.astype(np.float16)))
        ss = cm.self_comoment_chunk(t(y.astype(np.float16)), d)
        got32 = rot.rotated_row_max(st["c"][:, sl].numpy(), st["m2_x"].numpy(),
                                    ss["s"][layer].numpy(), r)
        np.testing.assert_allclose(got32, want, rtol=0, atol=1e-5)


def test_rotated_row_max_row_strips(monkeypatch):
    x, y, d = rotation_case(seed=2)
    ref = ref_moments(x, y[:, :d])
    yc = y[:, :d] - y[:, :d].mean(0)
    r = rot.rotation_matrix(1, 0, d)
    whole = rot.rotated_row_max(ref["c"], ref["m2_x"], yc.T @ yc, r)
    monkeypatch.setattr(rot, "_STRIP_BYTES", 8 * d * 2)  # 2 rows at a time
    np.testing.assert_array_equal(rot.rotated_row_max(ref["c"], ref["m2_x"], yc.T @ yc, r),
                                  whole)
    with pytest.raises(ValueError, match="s_layer"):
        rot.rotated_row_max(ref["c"], ref["m2_x"], np.eye(d + 1), r)


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-6), (np.float64, 1e-12)])
def test_scaled_baseline_matches_the_float64_baseline(dtype, tol):
    """rotation_baseline_scaled (precomputed rotated scales folded into R, one GEMM per
    strip in C's dtype) against rotation_baseline (float64 throughout) on the same C and
    S, with a zero-variance row, several draws and strips of 4 rows."""
    x, y, d = rotation_case(seed=3)
    ref = ref_moments(x, y)
    yc = y - y.mean(0)
    layers = y.shape[1] // d
    s = np.stack([yc[:, l * d:(l + 1) * d].T @ yc[:, l * d:(l + 1) * d] for l in range(layers)])
    seeds = [5, 6]
    want = rot.rotation_baseline(ref["c"], ref["m2_x"], s, seeds, d)
    rots = {(j, l): rot.rotation_matrix(seed, l, d).astype(dtype)
            for j, seed in enumerate(seeds) for l in range(layers)}
    iv = {k: rot.rotated_scales_fast(s[k[1]], r) for k, r in rots.items()}
    np.testing.assert_allclose(iv[(1, 2)], rot.rotated_scales(s[2], rots[(1, 2)]), rtol=1e-5)
    got = rot.rotation_baseline_scaled(
        ref["c"].astype(dtype), ref["m2_x"],
        lambda j, l: rot.scaled_rotation(torch.from_numpy(rots[(j, l)]), iv[(j, l)]),
        len(seeds), d, row_strip=4)
    assert got.shape == (2, x.shape[1]) and got[:, 4].tolist() == [0.0, 0.0]
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)


def test_scaled_baseline_in_bf16_is_a_bf16_computation_within_its_bound():
    """A bf16 reduce's baseline: the fp32 C and rotations, GEMMs (R S and C_strip R'^T)
    in bf16. Against rotation_baseline (float64 throughout): within 2e-3 (the bf16
    correlation bound), and not the fp32 result (so the bf16 GEMMs really ran). Layers
    of 384 neurons with a weak shared factor, as real layers are wide and their
    baseline correlations small (each product is rounded to bf16: 2^-9 relative)."""
    rng = np.random.default_rng(4)
    n, na, layers, d = 1024, 40, 2, 384
    z = rng.standard_normal((n, 3))
    x = (z @ rng.standard_normal((3, na)) * 0.3 + rng.standard_normal((n, na)))
    y = (z @ rng.standard_normal((3, layers * d)) * 0.3
         + rng.standard_normal((n, layers * d)))
    x, y = (np.maximum(v, -0.17).astype(np.float16).astype(np.float64) for v in (x, y))
    ref = ref_moments(x, y)
    yc = y - y.mean(0)
    layers = y.shape[1] // d
    s = np.stack([yc[:, l * d:(l + 1) * d].T @ yc[:, l * d:(l + 1) * d] for l in range(layers)])
    want = rot.rotation_baseline(ref["c"], ref["m2_x"], s, [7], d)
    r32 = {l: rot.rotation_matrix(7, l, d).astype(np.float32) for l in range(layers)}
    out = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        iv = {l: rot.rotated_scales_fast(s[l], r32[l], dtype=dtype) for l in range(layers)}
        out[name] = rot.rotation_baseline_scaled(
            ref["c"].astype(np.float32), ref["m2_x"],
            lambda j, l: rot.scaled_rotation(torch.from_numpy(r32[l]), iv[l]),
            1, d, row_strip=3, dtype=dtype)
    np.testing.assert_allclose(out["fp32"], want, rtol=0, atol=1e-6)
    err = np.abs(out["bf16"] - want).max()
    assert 1e-6 < err <= 2e-3, err


# ------------------------------------------------- centring: numba (CPU) vs torch (CUDA)

def test_numba_fp16_decode_is_exact_for_every_bit_pattern():
    from ooc_universal.kernels.centring import _F16_TABLE, _centre_write
    bits = np.arange(1 << 16, dtype=np.uint16).reshape(1, -1)
    out = np.empty(bits.shape, np.float32)
    r, q = np.zeros((1, bits.shape[1])), np.zeros((1, bits.shape[1]))
    _centre_write(bits, _F16_TABLE, np.zeros(bits.shape[1], np.float32), out, r, q)
    want = bits.view(np.float16).astype(np.float32)     # numpy's own conversion
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(out), nan)
    assert np.array_equal(out.view(np.uint32)[~nan], want.view(np.uint32)[~nan])


@pytest.mark.parametrize("dtype", [F32, BF16, F64])
@pytest.mark.parametrize("src", [torch.float16, torch.float32])
def test_numba_and_torch_centring_agree_with_float64(dtype, src):
    """The CPU (numba) and CUDA (torch, run here on the CPU) paths of centre_block:
    means and m2 against float64 numpy, centred blocks against each other (the two
    may round the shift mu differently by one ulp)."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(777, 96, generator=g) * 0.3 + 2.0)
    x[:, 5] = 1.25                                   # a constant neuron centres to 0
    x[::50, 7] += 40.0                               # a sparse spike
    x = x.to(src)
    ref = x.double().numpy()
    got = {impl: cm.centre_block(x, dtype, impl=impl) for impl in ("numba", "torch")}
    for impl, (mean, m2, xg) in got.items():
        assert xg.dtype == dtype and xg.shape == x.shape
        assert np.abs(mean.numpy() - ref.mean(0)).max() <= 1e-12 * 40 + (
            0 if dtype == F64 else 1e-6), impl
        want_m2 = ((ref - ref.mean(0)) ** 2).sum(0)
        assert np.allclose(m2.numpy(), want_m2, rtol=1e-5 if dtype != F64 else 1e-12,
                           atol=1e-9), impl
        assert m2[5] == 0.0 and torch.all(xg[:, 5] == 0), impl
    a, b = got["numba"][2].double(), got["torch"][2].double()
    ulp = {F32: 2 ** -20, BF16: 2 ** -5, F64: 2 ** -45}[dtype]
    assert (a - b).abs().max() <= ulp * (1 + b.abs().max())


def test_huge_page_advice_only_on_large_untouched_cpu_tensors():
    import os

    import torch

    from ooc_universal.kernels.comoments import advise_huge_pages, empty_comoments
    assert advise_huge_pages(torch.empty(16, 16)) is False  # small: nothing asked
    big = torch.empty(4096, 4097)  # 64 MiB and more
    thp = os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp:  # Linux with transparent huge pages: the advice is taken
        assert advise_huge_pages(big) is True
    acc = empty_comoments(4096, 4097)  # advised, then zeroed: the values are zeros
    assert acc["c"].shape == (4096, 4097) and not acc["c"].any()


def test_rotated_scales_one_pass_epilogue_matches_the_definition():
    """rotated_scales_fast widens, multiplies and row-sums R S in one numba pass on the
    CPU: against diag(R S R^T) in float64 numpy (fp32 and float64 rotations), and in
    bf16 against the same bf16 product widened, times R and summed in float64 by numpy
    (so only the epilogue is under test), with a zero-variance neuron giving 0."""
    rng = np.random.default_rng(11)
    d = 96
    a = rng.standard_normal((d, 40))
    s = a @ a.T
    s[7, :] = s[:, 7] = 0.0
    r64 = rot.rotation_matrix(3, 0, d)
    r64[5] = 0.0  # a rotated neuron of zero variance
    want = np.einsum("mi,ij,mj->m", r64, s, r64)
    want_iv = np.where(want > 0, 1 / np.sqrt(np.where(want > 0, want, 1)), 0.0)
    np.testing.assert_allclose(rot.rotated_scales_fast(s, r64), want_iv, rtol=1e-12)
    r32 = r64.astype(np.float32)
    np.testing.assert_allclose(rot.rotated_scales_fast(s, r32), want_iv, rtol=1e-5)
    prod = torch.mm(torch.from_numpy(r32).to(torch.bfloat16),
                    torch.from_numpy(s).to(torch.bfloat16)).float().numpy()
    var = (prod * r32).astype(np.float64).sum(1)
    got = rot.rotated_scales_fast(s, r32, dtype=torch.bfloat16)
    assert got[5] == 0.0
    ok = var > 0
    np.testing.assert_allclose(got[ok], 1 / np.sqrt(var[ok]), rtol=1e-12)
    assert 1e-6 < np.abs(got[ok] / want_iv[ok] - 1).max() < 2e-2  # it is a bf16 product
