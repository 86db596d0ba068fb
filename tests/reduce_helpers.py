"""Shared test helpers: write activation stores from arrays, and the float64 reference
of the reduce's statistics computed from the formulas (not from the toolkit)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ooc_universal.formats.store import PartialStore, StorePaths


def write_store(run_dir, label, acts, n_layers, d_mlp, token_hash="t" * 64,
                block_tokens=64, step=-1, name=None):
    """An activation store at RUN/stores/<label>.h5 holding `acts` (rounded to fp16)."""
    acts = np.ascontiguousarray(acts, dtype=np.float16)
    stores = Path(run_dir) / "stores"
    stores.mkdir(parents=True, exist_ok=True)
    attrs = {"model_id": f"test/{label}", "revision": "", "label": label,
             "name": name or label.split("@")[0], "step": step, "n_layers": n_layers,
             "d_mlp": d_mlp, "n_tokens": acts.shape[0], "token_hash": token_hash,
             "dtype": "float16", "layout_version": 1, "block_tokens": block_tokens,
             "compression": "none", "toolkit_version": "test"}
    ps = PartialStore.create(StorePaths.of(stores, label), attrs, acts.shape[0],
                             acts.shape[1], min(block_tokens, acts.shape[0]))
    for i in range(ps.n_blocks):
        s, e = ps.block_bounds(i)
        ps.write_block(i, np.ascontiguousarray(acts[s:e]))
    return ps.finalize()


def planted_acts(n=1000, seed=0):
    """Reference (2 layers x 16) and other (3 layers x 8) activations with planted structure:
    ref 5 ~ other 3 at rho ~0.9, ref 7 ~ other 10 at rho ~-0.7, constant neurons in both,
    a neuron that is zero except on 3 tokens."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 32)) * rng.uniform(0.2, 3.0, 32) + rng.uniform(-1, 1, 32)
    y = rng.standard_normal((n, 24)) * rng.uniform(0.2, 3.0, 24) + rng.uniform(-1, 1, 24)
    z = rng.standard_normal(n)
    x[:, 5] = z
    y[:, 3] = 0.9 * z + np.sqrt(1 - 0.81) * rng.standard_normal(n)
    w = rng.standard_normal(n)
    x[:, 7] = w
    y[:, 10] = -0.7 * w + np.sqrt(1 - 0.49) * rng.standard_normal(n)
    x[:, 12] = 0.25            # constant: zero variance
    y[:, 20] = -1.5            # constant in the other model
    x[:, 20] = 0.0
    x[[3, n // 2, n - 1], 20] = [2.0, -1.0, 4.0]  # zero except on three tokens
    return x.astype(np.float16), y.astype(np.float16)


def planted_triple(n=1000, mix=0.5):
    """planted_acts' (x, y) and a second other model y2 = noise + mix * y (3 layers x 8,
    fp16), with the generator that drew its noise (seed 9) for further draws."""
    x, y = planted_acts(n)
    rng = np.random.default_rng(9)
    y2 = (rng.standard_normal((n, 24)) + mix * y.astype(np.float64)).astype(np.float16)
    return x, y, y2, rng


def corr64(x, y):
    """Pearson rho in float64 from the definition; zero-variance rows/cols give 0."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    xc, yc = x - x.mean(0), y - y.mean(0)
    sx, sy = np.sqrt((xc ** 2).sum(0)), np.sqrt((yc ** 2).sum(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = (xc.T @ yc) / np.outer(sx, sy)
    rho[~np.isfinite(rho)] = 0.0
    rho[sx == 0, :] = 0.0
    rho[:, sy == 0] = 0.0
    return rho


def rotation64(seed, layer, d):
    r = np.random.default_rng([seed, layer]).standard_normal((d, d))
    return r / np.linalg.norm(r, axis=1, keepdims=True)


def reference_stats(x, y, d_other, seeds):
    """Everything the reduce file holds, from float64 numpy and the explicit rotation."""
    rho = corr64(x, y)
    y64 = np.asarray(y, np.float64)
    base = []
    for s in seeds:
        rot = np.concatenate([y64[:, l * d_other:(l + 1) * d_other]
                              @ rotation64(s, l, d_other).T
                              for l in range(y.shape[1] // d_other)], axis=1)
        base.append(corr64(x, rot).max(1))
    return {"rho": rho, "row_max": rho.max(1), "row_argmax": rho.argmax(1),
            "col_max": rho.max(0), "col_argmax": rho.argmax(0),
            "baseline": np.array(base),
            "mean_x": np.asarray(x, np.float64).mean(0),
            "var_x": np.asarray(x, np.float64).var(0),
            "mean_y": y64.mean(0), "var_y": y64.var(0)}
