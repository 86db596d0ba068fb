"""Recipe search for the tiny demo zoo: train two models, measure universality in RAM.

    python bench/zoo_search.py --out /tmp/zs/r1 --set n_layer=2 --set d_mlp=1024 --set steps=6000

Trains models 0 and 1 of the recipe (ZooRecipe defaults + --set overrides, n_models=2)
on one thread, then, per checkpoint, in float64 numpy (independent of the toolkit's
out-of-core code):
  acts    post-GELU MLP activations (input of transformer.h[l].mlp.c_proj) over held-out
          windows (BOS + context-1 bytes), positions whose token is BOS or newline dropped;
  rho     Pearson correlation of every neuron of model 0 with every neuron of model 1
          (all layers); max_corr = row max;
  base    the same with model 1's layer l rotated by R_l (rows of
          default_rng([seed, l]).standard_normal((d, d)) scaled to unit norm);
  excess  max_corr - baseline max; % universal = share of model 0's neurons > 0.4/0.5/0.6.
At the last checkpoint, zeroing the universal (excess > 0.5) neurons of model 0 is
compared with zeroing per-layer matched random non-universal neurons:
KL(P_orig || Q_ablated) averaged over the same valid positions.
Prints one JSON line per recipe (and appends it to --results).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ooc_universal.zoo import (BOS, NEWLINE, ZooRecipe, load_checkpoint, load_corpus,
                               train_zoo)

THRESHOLDS = (0.4, 0.5, 0.6)


def parse_sets(items) -> dict:
    """["steps=6000", "checkpoint_fracs=[0.25,0.5,0.75]"] -> typed recipe overrides."""
    defaults = ZooRecipe().to_json()
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in defaults:
            sys.exit(f"unknown recipe field {key!r}; fields: {sorted(defaults)}")
        kind = type(defaults[key])
        out[key] = json.loads(value) if kind in (tuple, list) else kind(value)
    return out


def windows(heldout: np.ndarray, context: int, n_bytes: int) -> np.ndarray:
    w = context - 1
    n = min(n_bytes, len(heldout)) // w
    out = np.full((n, context), BOS, dtype=np.int64)
    out[:, 1:] = heldout[: n * w].reshape(n, w)
    return out


def activations(model, ids: np.ndarray, batch: int = 64):
    """(n_valid, L*d) float64 post-GELU acts, and (n_windows, context) logits per batch."""
    layers = model.transformer.h
    store = [[] for _ in layers]
    hooks = [blk.mlp.c_proj.register_forward_pre_hook(
        lambda mod, args, l=l: store[l].append(args[0].detach().reshape(-1, args[0].shape[-1])))
        for l, blk in enumerate(layers)]
    with torch.no_grad():
        for i in range(0, len(ids), batch):
            model(input_ids=torch.from_numpy(ids[i:i + batch]))
    for h in hooks:
        h.remove()
    keep = valid_mask(ids).reshape(-1)
    return np.concatenate([torch.cat(s).double().numpy()[keep] for s in store], axis=1)


def valid_mask(ids: np.ndarray) -> np.ndarray:
    return (ids != BOS) & (ids != NEWLINE)


def standardise(x: np.ndarray) -> np.ndarray:
    """Columns centred and scaled to unit population std; zero-variance columns -> 0."""
    x = x - x.mean(axis=0)
    sd = np.sqrt((x * x).mean(axis=0))
    return np.divide(x, sd, out=np.zeros_like(x), where=sd > 0)


def rotate(y: np.ndarray, n_layers: int, d: int, seed: int) -> np.ndarray:
    out = np.empty_like(y)
    for l in range(n_layers):
        r = np.random.default_rng([seed, l]).standard_normal((d, d))
        r /= np.linalg.norm(r, axis=1, keepdims=True)
        out[:, l * d:(l + 1) * d] = y[:, l * d:(l + 1) * d] @ r.T      # (R b)_m = sum_i R[m,i] b_i
    return out


def universality(x, y, n_layers, d, seed=0) -> dict:
    n = len(x)
    xz = standardise(x)
    max_corr = (xz.T @ standardise(y) / n).max(axis=1)
    base = (xz.T @ standardise(rotate(y, n_layers, d, seed)) / n).max(axis=1)
    excess = max_corr - base
    per_layer = excess.reshape(n_layers, d)
    return {
        "excess": excess,
        "pct": {str(t): 100.0 * float((excess > t).mean()) for t in THRESHOLDS},
        "pct_by_layer_0.5": [100.0 * float((e > 0.5).mean()) for e in per_layer],
        "median_max_corr": float(np.median(max_corr)),
        "median_baseline": float(np.median(base)),
        "n_zero_var": int((x.std(axis=0) == 0).sum()),
    }


def ablation_kl(model, ids, flat, d, batch=64) -> tuple:
    """Mean KL(P_orig || Q_ablated) and delta loss over valid positions, flat neurons zeroed."""
    by_layer = {}
    for f in flat:
        by_layer.setdefault(int(f) // d, []).append(int(f) % d)
    hooks = []

    def run(ablate):
        if ablate:
            for l, idx in by_layer.items():
                idx_t = torch.tensor(idx)

                def hook(mod, args, idx_t=idx_t):
                    a = args[0].clone()
                    a[..., idx_t] = 0.0
                    return (a,)
                hooks.append(model.transformer.h[l].mlp.c_proj.register_forward_pre_hook(hook))
        out = []
        with torch.no_grad():
            for i in range(0, len(ids), batch):
                out.append(torch.log_softmax(
                    model(input_ids=torch.from_numpy(ids[i:i + batch])).logits.double(), -1))
        for h in hooks:
            h.remove()
        hooks.clear()
        return torch.cat(out)

    logp = run(False)
    logq = run(True)
    mask = torch.from_numpy(valid_mask(ids))
    kl = (logp.exp() * (logp - logq)).sum(-1)[mask].mean()
    tgt = torch.from_numpy(ids[:, 1:])
    m2 = mask[:, :-1]
    ce = lambda lp: -lp[:, :-1].gather(-1, tgt[..., None])[..., 0][m2].mean()
    return float(kl), float(ce(logq) - ce(logp))


def measure(recipe, out: Path, n_bytes: int, kl_bytes: int, n_controls: int) -> dict:
    corpus = load_corpus(recipe.corpus, recipe.heldout_fraction)
    ids = windows(corpus.heldout, recipe.context, n_bytes)
    names = recipe.model_names()
    L, d = recipe.n_layer, recipe.d_mlp
    res = {"checkpoints": {}, "n_positions": int(valid_mask(ids).sum())}
    for step in recipe.checkpoints():
        m0 = load_checkpoint(out / names[0] / f"checkpoint-{step}")
        m1 = load_checkpoint(out / names[1] / f"checkpoint-{step}")
        u = universality(activations(m0, ids), activations(m1, ids), L, d)
        excess = u.pop("excess")
        res["checkpoints"][str(step)] = u
    # Ablation at the last checkpoint: universal (excess > 0.5) vs matched random control.
    kl_ids = ids[: max(1, kl_bytes // (recipe.context - 1))]
    uni = np.flatnonzero(excess > 0.5)
    res["n_universal_last"] = int(len(uni))
    if len(uni):
        kl_u, dl_u = ablation_kl(m0, kl_ids, uni, d)
        rng = np.random.default_rng(12345)
        ctrl = []
        for _ in range(n_controls):
            pick = []
            for l in range(L):
                k = int(((uni // d) == l).sum())
                pool = np.setdiff1d(np.arange(l * d, (l + 1) * d), uni)
                pick.extend(rng.choice(pool, size=k, replace=False).tolist())
            ctrl.append(ablation_kl(m0, kl_ids, np.array(pick), d))
        kl_c = float(np.mean([c[0] for c in ctrl]))
        res["ablation"] = {"kl_universal": kl_u, "dloss_universal": dl_u,
                           "kl_control_mean": kl_c,
                           "dloss_control_mean": float(np.mean([c[1] for c in ctrl])),
                           "kl_control_draws": [c[0] for c in ctrl],
                           "kl_ratio": kl_u / kl_c if kl_c > 0 else None}
    zoo = json.loads((out / "zoo.json").read_text())
    res["heldout_loss"] = {s: [m["checkpoints"][s]["heldout_loss"] for m in zoo["models"]]
                           for s in map(str, recipe.checkpoints())}
    res["unigram_loss"] = zoo["unigram_heldout_loss"]
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="directory for the 2 models")
    ap.add_argument("--set", action="append", default=[], help="recipe field=value")
    ap.add_argument("--label", default="", help="name of the recipe in the JSON line")
    ap.add_argument("--bytes", type=int, default=60000, help="held-out bytes correlated")
    ap.add_argument("--kl-bytes", type=int, default=30000, help="held-out bytes for the KL")
    ap.add_argument("--controls", type=int, default=5, help="random control draws")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", type=Path, default=None, help="append the JSON line here")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = dataclasses.replace(ZooRecipe(), **{"n_models": 2, **parse_sets(args.set)})
    t0 = time.time()
    train_zoo(recipe, args.out, device="cpu", progress=not args.quiet)
    t_train = time.time() - t0
    t1 = time.time()
    res = measure(recipe, args.out, args.bytes, args.kl_bytes, args.controls)
    line = {"label": args.label, "recipe": recipe.to_json(), "n_params": recipe.n_params(),
            "train_s_2_models": round(t_train, 1), "measure_s": round(time.time() - t1, 1),
            "threads": args.threads, **res}
    text = json.dumps(line)
    print(text, flush=True)
    if args.results:
        with open(args.results, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
