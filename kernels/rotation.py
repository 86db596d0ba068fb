"""The rotation baseline: seeded random rotations of a layer, applied to co-moments.

For layer l of the other model (d neurons) and seed s, R = rotation_matrix(s, l, d) is a
d x d standard-normal matrix with each ROW scaled to unit L2 norm (not orthogonal; this
is what the original authors' code does), and (R b)_m = sum_i R[m, i] b_i.

From the cross co-moment C (ref neurons x layer l) and the layer's self co-moment S
(both sums over tokens of centred products), exactly:

    cov((R b)_m, a_k) sums = (C R^T)[k, m]      var sums of (R b)_m = R[m] S R[m]^T

so rho(a_k, (R b)_m) = (C R^T)[k, m] / sqrt(m2_x[k] * (R S R^T)[m, m]), with no second pass
over the activations. A zero variance on either side gives 0.

Two drivers share the chunk / combine / finalize below:
  rotation_baseline         float64 throughout, R S R^T per (draw, layer) from S (the
                            universal step's extra draws from a kept cross co-moment);
  rotation_baseline_scaled  the reduce's: the rotated scales iv = 1/sqrt(diag(R S R^T))
                            come precomputed (once per draw and layer for the whole
                            reduce, rotated_scales_fast), folded into the rotation
                            R' = diag(iv) R, and each strip is one GEMM C_strip R'^T in
                            the run's compute dtype and a row max, times 1/sqrt(m2_x).
                            Measured against the float64 driver on the same C at
                            d = 3072 (8,192 tokens, isotropic and low-rank layers): max
                            |difference| 2.6e-7 in fp32. A bf16 run forms the strips'
                            GEMMs (and R S) in bf16 too, at the bf16 GEMM rate: the
                            strips are cast from the fp32 C, oneDNN accumulates in fp32
                            and rounds the product to bf16 (2^-9 relative), the max and
                            the scales' row sums stay float64.
"""
from __future__ import annotations

import numba
import numpy as np

from ooc_universal.kernels.tilemax import inv_sqrt

_STRIP_BYTES = 64 << 20  # rows of C R^T handled at a time (f64)
ROW_STRIP = 4096  # reference rows per baseline strip read from C: bounds the temporaries


def rotation_matrix(seed: int, layer: int, d: int) -> np.ndarray:
    """(d, d) float64: default_rng([seed, layer]).standard_normal((d, d)), rows unit norm."""
    g = np.random.default_rng([int(seed), int(layer)]).standard_normal((d, d))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    return g


def rotate_activations(y_layer, r):
    """Explicit rotation of one layer's activations: (n, d) @ R^T -> (n, d)."""
    if _is_torch(y_layer):
        import torch
        r = torch.as_tensor(r, device=y_layer.device)
        return y_layer.to(torch.float64) @ r.to(torch.float64).T
    return np.asarray(y_layer, dtype=np.float64) @ np.asarray(r, dtype=np.float64).T


def rotated_variance(s_layer, r):
    """Co-moment sums of the rotated neurons: diag(R S R^T), (d,) float64."""
    if _is_torch(s_layer):
        import torch
        r = torch.as_tensor(r, device=s_layer.device).to(torch.float64)
        return ((r @ s_layer.to(torch.float64)) * r).sum(1)
    r = np.asarray(r, dtype=np.float64)
    return ((r @ np.asarray(s_layer, dtype=np.float64)) * r).sum(1)


def rotated_scales(s_layer, r, zero_tol: float = 0.0) -> np.ndarray:
    """1 / sqrt(diag(R S R^T)) (d,) float64 on the host, 0 for a zero variance: the
    rotated neurons' scales, computed once per (draw, layer)."""
    return inv_sqrt(rotated_variance(s_layer, r), zero_tol)


def rotated_strip_max(c_strip, ix, iv, r) -> np.ndarray:
    """max_m (C R^T)[k, m] * ix[k] * iv[m] over a strip of reference rows: (rows,) f64.

    The baseline's chunk. c_strip (rows, d) co-moment sums, ix (rows,) and iv (d,) the
    two sides' inverse scales, r (d, d) the rotation. The (rows, d) product is formed in
    row pieces of at most _STRIP_BYTES."""
    c_strip = np.asarray(c_strip)
    n_rows, d = c_strip.shape
    out = np.empty(n_rows)
    step = max(1, _STRIP_BYTES // (8 * max(d, 1)))
    for a in range(0, n_rows, step):
        b = min(n_rows, a + step)
        cov = c_strip[a:b].astype(np.float64) @ r.T  # (rows, d)
        rho = (cov * ix[a:b, None]) * iv[None, :]
        out[a:b] = rho.max(1) if d else -np.inf
    return out + 0.0


def rotated_row_max(c_layer, m2_x, s_layer, r, zero_tol: float = 0.0):
    """Row max over m of rho(a_k, (R b)_m) for one layer of the other model: (I,) f64.

    c_layer (I, d): cross co-moment sums of the I reference neurons with this layer
    (float32 or float64); m2_x (I,): the reference neurons' m2; s_layer (d, d): the
    layer's self co-moment sums; r (d, d): rotation_matrix(seed, layer, d). numpy
    arrays, or torch tensors (any device; the result is then a torch tensor).
    """
    if _is_torch(c_layer):
        return _rotated_row_max_torch(c_layer, m2_x, s_layer, r, zero_tol)
    c_layer = np.asarray(c_layer)
    r = np.asarray(r, dtype=np.float64)
    _check(c_layer.shape, np.shape(m2_x), np.shape(s_layer), r.shape)
    return rotated_strip_max(c_layer, inv_sqrt(m2_x, zero_tol),
                             rotated_scales(s_layer, r, zero_tol), r)


def _rotated_row_max_torch(c_layer, m2_x, s_layer, r, zero_tol):
    import torch
    dev = c_layer.device
    r = torch.as_tensor(r, device=dev).to(torch.float64)
    m2_x = torch.as_tensor(m2_x, device=dev)
    s_layer = torch.as_tensor(s_layer, device=dev)
    _check(tuple(c_layer.shape), tuple(m2_x.shape), tuple(s_layer.shape), tuple(r.shape))
    ix = torch.from_numpy(inv_sqrt(m2_x.double(), zero_tol)).to(dev)
    iv = torch.from_numpy(inv_sqrt(rotated_variance(s_layer, r), zero_tol)).to(dev)
    n_rows, d = c_layer.shape
    out = torch.empty(n_rows, dtype=torch.float64, device=dev)
    step = max(1, _STRIP_BYTES // (8 * max(d, 1)))
    for a in range(0, n_rows, step):
        b = min(n_rows, a + step)
        rho = (c_layer[a:b].double() @ r.T).mul_(ix[a:b, None]).mul_(iv[None, :])
        out[a:b] = rho.amax(1) if d else -torch.inf
    return out + 0.0


# ------------------------------------------------------------- the baseline, all draws
# chunk: rotated_strip_max (one strip of rows, one layer, one draw); combine: the
# elementwise max over layers (baseline_combine_); finalize: a correlation that is not
# finite (an empty layer) counts as 0 (baseline_finalize). rotation_baseline runs the
# three over every draw, layer and strip; callers only say where C comes from.

def baseline_init(n_draws: int, n_rows: int) -> np.ndarray:
    """(n_draws, n_rows) float64 of -inf: the identity of baseline_combine_."""
    return np.full((n_draws, n_rows), -np.inf)


def baseline_combine_(acc: np.ndarray, part: np.ndarray) -> np.ndarray:
    """acc = max(acc, part) in place (row maxima over more layers or strips)."""
    return np.maximum(acc, part, out=acc)


def baseline_finalize(acc: np.ndarray, zero_rows=None) -> np.ndarray:
    """Non-finite maxima (no neuron to compare with) and zero-variance rows become 0."""
    acc[~np.isfinite(acc)] = 0.0
    if zero_rows is not None:
        acc[:, np.asarray(zero_rows, bool)] = 0.0
    return acc


def rotation_baseline(c, m2_x, self_comoment, seeds, d: int, *, row_strip: int = ROW_STRIP,
                      zero_tol: float = 0.0, zero_rows=None, on_layer=None) -> np.ndarray:
    """Baseline row maxima (len(seeds), I) float64 of I reference rows against the other
    model rotated layer by layer, for each seed: max over layers l and neurons m of
    rho(a_k, (R_l b)_m), R_l = rotation_matrix(seed, l, d).

    c (I, L * d): cross co-moment sums, anything sliced as c[a:b, l*d:(l+1)*d] (a numpy
    array, an h5py dataset or a memmap: only one (row_strip, d) strip is read at a time);
    m2_x (I,): the reference rows' m2; self_comoment: indexable by layer, [l] -> (d, d)
    sums (read once per layer and draw); zero_rows (I,) bool: rows set to 0 at the end.
    R_l S_l R_l^T is formed once per (draw, layer), whatever the number of strips.
    on_layer(): called after each (draw, layer), e.g. to advance a progress bar.
    """
    n_rows, n_cols = c.shape
    n_layers = _layer_count(c.shape, m2_x, d)
    ix = inv_sqrt(m2_x, zero_tol)
    acc = baseline_init(len(seeds), n_rows)
    for j, seed in enumerate(seeds):
        for layer in range(n_layers):
            r = rotation_matrix(int(seed), layer, d)
            iv = rotated_scales(np.asarray(self_comoment[layer]), r, zero_tol)
            cols = slice(layer * d, (layer + 1) * d)
            for a in range(0, n_rows, row_strip):
                b = min(n_rows, a + row_strip)
                part = rotated_strip_max(c[a:b, cols], ix[a:b], iv, r)
                baseline_combine_(acc[j, a:b], part)
            if on_layer is not None:
                on_layer()
    return baseline_finalize(acc, zero_rows)


# ------------------------------------------------- the reduce's baseline (scaled rotations)

def rotated_scales_fast(s_layer, r32, zero_tol: float = 0.0, dtype=None) -> np.ndarray:
    """1/sqrt(diag(R S R^T)) (d,) float64 from a (d, d) float32 rotation: one GEMM
    R S in `dtype` (default the rotation's; torch.bfloat16 in a bf16 run), the
    products with R and the row sums in float64. s_layer: (d, d) numpy or torch (any
    device); r32: rotation_matrix(...).astype(float32) (or float64)."""
    import torch
    r = torch.as_tensor(r32)
    dtype = dtype or r.dtype
    s = torch.as_tensor(s_layer).to(device=r.device, dtype=dtype)
    # the GEMM in `dtype`; a low-precision product is widened exactly, times the exact R
    prod = torch.mm(r if dtype == r.dtype else r.to(dtype), s)
    if r.device.type == "cpu" and r.dtype in (torch.float32, torch.float64) \
            and prod.dtype in (r.dtype, torch.bfloat16):
        # widen, multiply and sum in one pass (torch's three passes over the (d, d)
        # product took about a third of the scales' CPU time at d = 3072)
        rn = r.contiguous().numpy()
        var = (_row_dots_bf16(prod.view(torch.int16).numpy().view(np.uint16), rn)
               if prod.dtype == torch.bfloat16 else _row_dots(prod.numpy(), rn))
    else:
        var = prod.to(r.dtype).mul_(r).sum(1, dtype=torch.float64)
    return inv_sqrt(var, zero_tol)


@numba.njit(parallel=True, cache=True)
def _row_dots(p, r):
    """sum_k float64(p[i, k] * r[i, k]) per row i: each product in p's dtype (as torch's
    p.mul_(r)), the sum in float64."""
    n, m = p.shape
    out = np.empty(n)
    for i in numba.prange(n):
        acc = 0.0
        for k in range(m):
            acc += np.float64(p[i, k] * r[i, k])
        out[i] = acc
    return out


@numba.njit(parallel=True, cache=True)
def _row_dots_bf16(bits, r):
    """_row_dots of the bf16 values whose bit patterns are `bits` (uint16), widened
    exactly to float32 (a bf16 is the upper half of an fp32's bits) before the product."""
    n, m = bits.shape
    out = np.empty(n)
    for i in numba.prange(n):
        acc = 0.0
        for k in range(m):
            p = np.uint32(np.uint32(bits[i, k]) << np.uint32(16)).view(np.float32)
            acc += np.float64(p * r[i, k])
        out[i] = acc
    return out


def scaled_rotation(r, iv, out=None):
    """R' = diag(iv) R in R's dtype (torch), so that C R'^T is the rotated covariance
    already divided by the rotated neurons' standard deviations; into `out` (a reused
    (d, d) buffer) when given."""
    import torch
    r = torch.as_tensor(r)
    scale = torch.as_tensor(np.asarray(iv, np.float64)).to(device=r.device, dtype=r.dtype)
    return torch.mul(r, scale[:, None], out=out)


def scaled_strip_max(c_strip, r_scaled, ix, out=None) -> np.ndarray:
    """max_m (C_strip R'^T)[k, m] * ix[k]: (rows,) float64 on the host.

    The chunk of rotation_baseline_scaled: c_strip (rows, d) torch (a strided view of
    C is fine), r_scaled (d, d) of its dtype, ix (rows,) the reference rows' inverse
    scales (>= 0, so the max commutes with them); `out` a reusable (rows, d) buffer."""
    import torch
    prod = torch.mm(c_strip, r_scaled.T, out=out) if out is not None \
        else c_strip @ r_scaled.T
    best = prod.amax(1) if prod.shape[1] else torch.full((prod.shape[0],), -torch.inf)
    return best.double().cpu().numpy() * ix


def rotation_baseline_scaled(c, m2_x, scaled_rotations, n_draws: int, d: int, *,
                             row_strip: int = ROW_STRIP, zero_tol: float = 0.0,
                             zero_rows=None, dtype=None) -> np.ndarray:
    """Baseline row maxima (n_draws, I) float64, as rotation_baseline, from scaled
    rotations: scaled_rotations(j, layer) -> R'_{j,l} = scaled_rotation(R, iv) (torch,
    C's dtype). c: (I, L * d) numpy array or torch tensor of co-moment sums; only a
    (row_strip, d) product is formed at a time. `dtype` (torch; default C's): the
    GEMMs' dtype; another one (bf16 in a bf16 run) casts each strip into one reused
    buffer and each R' once, R'^T made contiguous (row-major operands)."""
    import torch
    c = torch.as_tensor(c)
    dtype = dtype or c.dtype
    n_rows, n_cols = c.shape
    n_layers = _layer_count(c.shape, m2_x, d)
    ix = inv_sqrt(m2_x, zero_tol)
    acc = baseline_init(n_draws, n_rows)
    rows = min(row_strip, max(n_rows, 1))
    out = torch.empty(rows, d, dtype=dtype, device=c.device)
    cast = torch.empty(rows, d, dtype=dtype, device=c.device) if dtype != c.dtype else None
    for j in range(n_draws):
        for layer in range(n_layers):
            rp = scaled_rotations(j, layer)
            if cast is not None:
                rp = rp.to(dtype).T.contiguous().T
            cols = slice(layer * d, (layer + 1) * d)
            for a in range(0, n_rows, row_strip):
                b = min(n_rows, a + row_strip)
                strip = c[a:b, cols]
                if cast is not None:
                    strip = cast[:b - a].copy_(strip)
                part = scaled_strip_max(strip, rp, ix[a:b], out[:b - a])
                baseline_combine_(acc[j, a:b], part)
    return baseline_finalize(acc, zero_rows)


def _check(c_shape, m2_shape, s_shape, r_shape):
    if len(c_shape) != 2:
        raise ValueError(f"c_layer must be 2-D (ref neurons, d), got shape {tuple(c_shape)}")
    n_rows, d = c_shape
    want = {"m2_x": (tuple(m2_shape), (n_rows,)), "s_layer": (tuple(s_shape), (d, d)),
            "r": (tuple(r_shape), (d, d))}
    for name, (got, exp) in want.items():
        if got != exp:
            raise ValueError(f"{name} has shape {got}; c_layer {tuple(c_shape)} needs {exp}")


def _is_torch(a) -> bool:
    return type(a).__module__.startswith("torch")


def _layer_count(c_shape, m2_x, d: int) -> int:
    """L for a C of shape (I, L * d) and an m2_x of shape (I,); ValueError otherwise."""
    n_rows, n_cols = c_shape
    n_layers = n_cols // d if d else 0
    if n_layers * d != n_cols or np.shape(m2_x) != (n_rows,):
        raise ValueError(f"c has shape {tuple(c_shape)}, m2_x {np.shape(m2_x)}: expected "
                         f"(I, L * {d}) and (I,)")
    return n_layers
