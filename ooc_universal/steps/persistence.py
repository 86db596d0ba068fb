"""Persistence of universal sets across checkpoints, from RUN/universal/sets.json.

For every ordered pair of checkpoints t1 < t2 (adjacent and skipping: 100k->200k,
200k->300k and 100k->300k) and every (reference, other, threshold) with a set at both:

  P_persist = |U1 & U2| / |U1|        (the paper; "undefined" when U1 is empty:
                                       JSON null and undefined=true, never 0 or NaN)
  emerged   = |U2 - U1|               neurons universal at t2 but not at t1
  jaccard   = |U1 & U2| / |U1 | U2|   (null when both sets are empty)

overall (layer "all") and per layer of the reference model. Over a reference's pairs
(per-pair sets only) two averages, named apart:

  mean over pairs    the mean of the per-pair P (and Jaccard) over the pairs where it is
                     defined; n_pairs says how many
  pooled over pairs  sum of n_both / sum of n_t1 over the pairs (likewise Jaccard);
                     the counts are the sums

Writes RUN/persistence/persistence.json and persistence.csv (long format) through
formats/tables.py; reads the sets through formats/sets.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np

from ooc_universal import __version__
from ooc_universal.errors import OocError
from ooc_universal.formats.sets import UniversalSet, read_sets
from ooc_universal.formats.tables import (MEAN_OVER_PAIRS, POOLED_OVER_PAIRS, PersistenceFile,
                                          write_persistence)
from ooc_universal.rundir import config_hash, recorded_sha256, step_dir

MEASURES = {
    "p_persist": "|U(t1) & U(t2)| / |U(t1)|; null with undefined=true when U(t1) is empty",
    "emerged": "|U(t2) - U(t1)|",
    "jaccard": "|U(t1) & U(t2)| / |U(t1) | U(t2)|; null when both are empty",
    MEAN_OVER_PAIRS: "mean of the per-pair values over pairs where defined (n_pairs of "
                     "them); counts are sums",
    POOLED_OVER_PAIRS: "ratios of the counts summed over pairs"}


def _ratio(num: int, den: int):
    return num / den if den > 0 else None


def compare(u1, u2, n_layers: int, d_mlp: int) -> list[dict]:
    """Counts and ratios for two sets of flat indices, overall then per layer."""
    u1 = np.unique(np.asarray(u1, dtype=np.int64))
    u2 = np.unique(np.asarray(u2, dtype=np.int64))
    both = np.intersect1d(u1, u2, assume_unique=True)
    union = np.union1d(u1, u2)

    def row(layer, a, b, ab, aub):
        p = _ratio(ab, a)
        return {"layer": layer, "n_t1": a, "n_t2": b, "n_both": ab, "p_persist": p,
                "undefined": p is None, "emerged": b - ab, "jaccard": _ratio(ab, aub)}

    rows = [row("all", u1.size, u2.size, both.size, union.size)]
    per = [np.bincount(x // d_mlp, minlength=n_layers)[:n_layers]
           for x in (u1, u2, both, union)]
    for layer in range(n_layers):
        rows.append(row(layer, *(int(c[layer]) for c in per)))
    return rows


def _by_checkpoint(sets: list[UniversalSet]) -> dict:
    """{(definition, reference, other, threshold): {checkpoint: set}}, ordered steps only."""
    groups: dict = {}
    for s in sets:
        if s.checkpoint < 0:  # a model without a training step has no order
            continue
        key = (s.definition or "per-pair", s.reference, s.other, s.threshold)
        by_ckpt = groups.setdefault(key, {})
        if s.checkpoint in by_ckpt:
            raise OocError(f"sets.json has two sets for {key} at checkpoint "
                           f"{s.checkpoint}; run `ooc-universal universal` again")
        by_ckpt[s.checkpoint] = s
    return groups


def _pair_rows(sets: list[UniversalSet], progress: bool = False) -> list[dict]:
    from tqdm.auto import tqdm
    rows = []
    for (definition, ref, other, tau), by_ckpt in tqdm(
            sorted(_by_checkpoint(sets).items()), disable=not progress, desc="persistence",
            unit="set"):
        for t1, t2 in combinations(sorted(by_ckpt), 2):
            s1, s2 = by_ckpt[t1], by_ckpt[t2]
            shape = (s1.n_layers, s1.d_mlp)
            if shape != (s2.n_layers, s2.d_mlp):
                raise OocError(f"{ref} has {shape[0]}x{shape[1]} neurons at {t1} but "
                               f"{s2.n_layers}x{s2.d_mlp} at {t2}; flat indices do "
                               "not match: re-run reduce and universal")
            for r in compare(s1.neurons, s2.neurons, *shape):
                rows.append({"definition": definition, "reference": ref, "other": other,
                             "kind": "pair", "threshold": tau, "t1": t1, "t2": t2,
                             **r, "n_pairs": 1})
    return rows


def _averaged(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    groups: dict = {}
    for r in rows:
        if r["definition"] != "per-pair":  # pair-averaged sets: one per reference already
            continue
        key = (r["definition"], r["reference"], r["threshold"], r["t1"], r["t2"],
               str(r["layer"]))
        groups.setdefault(key, []).append(r)
    mean_rows, pooled_rows = [], []
    for key, group in groups.items():
        sums = {k: sum(r[k] for r in group) for k in ("n_t1", "n_t2", "n_both", "emerged")}
        union = sum(r["n_t1"] + r["n_t2"] - r["n_both"] for r in group)
        base = {"definition": key[0], "reference": key[1], "threshold": key[2],
                "t1": key[3], "t2": key[4], "layer": group[0]["layer"], **sums}
        ps = [r["p_persist"] for r in group if r["p_persist"] is not None]
        js = [r["jaccard"] for r in group if r["jaccard"] is not None]
        p_mean = float(np.mean(ps)) if ps else None
        mean_rows.append({**base, "other": MEAN_OVER_PAIRS, "kind": MEAN_OVER_PAIRS,
                          "p_persist": p_mean, "undefined": p_mean is None,
                          "jaccard": float(np.mean(js)) if js else None,
                          "n_pairs": len(ps)})
        p_pool = _ratio(sums["n_both"], sums["n_t1"])
        pooled_rows.append({**base, "other": POOLED_OVER_PAIRS, "kind": POOLED_OVER_PAIRS,
                            "p_persist": p_pool, "undefined": p_pool is None,
                            "jaccard": _ratio(sums["n_both"], union),
                            "n_pairs": len(group)})
    return mean_rows, pooled_rows


@dataclass
class PersistenceOutput:
    """What the step wrote: the paths (json, csv) and the result itself."""
    paths: dict[str, Path]
    result: PersistenceFile


def persistence(run_dir, *, progress: bool = True) -> PersistenceOutput:
    """P(universal at t2 | universal at t1), emergence and Jaccard from RUN/universal."""
    sets = read_sets(run_dir)
    ckpts = sorted({s.checkpoint for s in sets.sets if s.checkpoint >= 0})
    if len(ckpts) < 2:
        raise OocError(f"persistence needs universal sets at two or more checkpoints; "
                       f"sets.json has {ckpts or 'none with a training step'}: reduce and "
                       "run `ooc-universal universal` on more checkpoints")
    rows = _pair_rows(sets.sets, progress)
    mean_rows, pooled_rows = _averaged(rows)
    p = sets.provenance
    source = {"universal_id": p.universal_id, "token_hash": p.token_hash,
              "toolkit_version": p.toolkit_version, "config": p.config}
    result = PersistenceFile(
        config={"definitions": MEASURES, "checkpoints": ckpts}, source=source,
        token_hash=p.token_hash, toolkit_version=__version__, pairs=rows,
        mean_over_pairs=mean_rows, pooled_over_pairs=pooled_rows)
    step_dir(run_dir, "persistence")
    record = {"step": "persistence", "token_hash": p.token_hash,
              "config_hash": config_hash(result.config),
              "inputs": {"universal/sets.json": recorded_sha256(sets.path)}}
    return PersistenceOutput(write_persistence(run_dir, result, record), result)
