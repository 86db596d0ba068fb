"""The rotation baseline: seeded random rotations of a layer, applied to co-moments.

For layer l of the other model (d neurons) and seed s, R = rotation_matrix(s, l, d) is a
d x d standard-normal matrix with each ROW scaled to unit L2 norm (not orthogonal; this
is what the original authors' code does), and (R b)_m = sum_i R[m, i] b_i.

From the cross co-moment C (ref neurons x layer l) and the layer's self co-moment S
(both sums over tokens of centred products), exactly:

    cov((R b)_m, a_k) sums = (C R^T)[k, m]      var sums of (R b)_m = R[m] S R[m]^T

so rho(a_k, (R b)_m) = (C R^T)[k, m] / sqrt(m2_x[k] * (R S R^T)[m, m]), with no second pass
over the activations. All arithmetic is float64; a zero variance on either side gives 0.
"""
from __future__ import annotations

import numpy as np

_STRIP_BYTES = 64 << 20  # rows of C R^T handled at a time (f64)


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
    ix = _inv_sqrt(np.asarray(m2_x), zero_tol)
    iv = _inv_sqrt(rotated_variance(s_layer, r), zero_tol)
    n_rows, d = c_layer.shape
    out = np.empty(n_rows)
    step = max(1, _STRIP_BYTES // (8 * max(d, 1)))
    for a in range(0, n_rows, step):
        b = min(n_rows, a + step)
        cov = c_layer[a:b].astype(np.float64) @ r.T  # (rows, d)
        rho = (cov * ix[a:b, None]) * iv[None, :]
        out[a:b] = rho.max(1) if d else -np.inf
    return out + 0.0


def _rotated_row_max_torch(c_layer, m2_x, s_layer, r, zero_tol):
    import torch
    dev = c_layer.device
    r = torch.as_tensor(r, device=dev).to(torch.float64)
    m2_x = torch.as_tensor(m2_x, device=dev)
    s_layer = torch.as_tensor(s_layer, device=dev)
    _check(tuple(c_layer.shape), tuple(m2_x.shape), tuple(s_layer.shape), tuple(r.shape))
    ix = torch.from_numpy(_inv_sqrt(m2_x.double().cpu().numpy(), zero_tol)).to(dev)
    var = rotated_variance(s_layer, r)
    iv = torch.from_numpy(_inv_sqrt(var.cpu().numpy(), zero_tol)).to(dev)
    n_rows, d = c_layer.shape
    out = torch.empty(n_rows, dtype=torch.float64, device=dev)
    step = max(1, _STRIP_BYTES // (8 * max(d, 1)))
    for a in range(0, n_rows, step):
        b = min(n_rows, a + step)
        rho = (c_layer[a:b].double() @ r.T).mul_(ix[a:b, None]).mul_(iv[None, :])
        out[a:b] = rho.amax(1) if d else -torch.inf
    return out + 0.0


def _check(c_shape, m2_shape, s_shape, r_shape):
    if len(c_shape) != 2:
        raise ValueError(f"c_layer must be 2-D (ref neurons, d), got shape {tuple(c_shape)}")
    n_rows, d = c_shape
    want = {"m2_x": (tuple(m2_shape), (n_rows,)), "s_layer": (tuple(s_shape), (d, d)),
            "r": (tuple(r_shape), (d, d))}
    for name, (got, exp) in want.items():
        if got != exp:
            raise ValueError(f"{name} has shape {got}; c_layer {tuple(c_shape)} needs {exp}")


def _inv_sqrt(m2, zero_tol):
    m2 = np.asarray(m2, dtype=np.float64)
    ok = m2 > zero_tol
    return np.where(ok, 1.0 / np.sqrt(np.where(ok, m2, 1.0)), 0.0)


def _is_torch(a) -> bool:
    return type(a).__module__.startswith("torch")
