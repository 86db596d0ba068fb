"""Persistence of universal sets across checkpoints, from RUN/universal/sets.json.

For every ordered pair of checkpoints t1 < t2 (adjacent and skipping: 100k->200k,
200k->300k and 100k->300k) and every (reference, other, threshold) with a set at both:

  p_persist = |U1 & U2| / |U1|        a fraction in [0, 1] (the paper; "undefined" when
                                       U1 is empty: JSON null and undefined=true, never
                                       0 or NaN)
  n_emerged = |U2 - U1|               neurons universal at t2 but not at t1
  jaccard   = |U1 & U2| / |U1 | U2|   (null when both sets are empty)

for the whole model (scope "all", layer null) and per layer of the reference model
(scope "layer"). Over a reference's pairs (per-pair sets only) two aggregations, each
in its own rows (column `aggregation`, `other` null):

  mean_over_pairs    the mean of the per-pair p_persist (and Jaccard) over the pairs
                     where it is defined; n_pairs says how many
  pooled_over_pairs  sum of n_both / sum of n_t1 over the pairs (likewise Jaccard);
                     the counts are the sums
A pair-averaged set (Gurnee et al.) gives rows of aggregation "pair_averaged".

Writes RUN/persistence/persistence.json and persistence.csv (one long table,
formats.tables.PERSISTENCE_COLUMNS) through formats/tables.py; reads the sets through
formats/sets.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np

from ooc_universal import __version__
from ooc_universal.errors import OocError
from ooc_universal.formats.sets import UniversalSet, read_sets
from ooc_universal.formats.tables import (MEAN_OVER_PAIRS, PAIR, PAIR_AVERAGED,
                                          PERSISTENCE_COLUMNS, POOLED_OVER_PAIRS,
                                          SCOPE_ALL, SCOPE_LAYER, PersistenceFile,
                                          write_persistence)
from ooc_universal.rundir import (config_hash, file_lock, recorded_sha256,
                                  refuse_if_run_in_progress, remove_dead_temporaries,
                                  step_dir)

MEASURES = {
    "p_persist": "|U(t1) & U(t2)| / |U(t1)|, a fraction in [0, 1]; null with "
                 "undefined=true when U(t1) is empty",
    "n_emerged": "|U(t2) - U(t1)|",
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
        return {"scope": SCOPE_ALL if layer is None else SCOPE_LAYER, "layer": layer,
                "n_t1": a, "n_t2": b, "n_both": ab, "n_emerged": b - ab, "p_persist": p,
                "undefined": p is None, "jaccard": _ratio(ab, aub)}

    rows = [row(None, u1.size, u2.size, both.size, union.size)]
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
            averaged = definition == "pair-averaged"
            ident = {"definition": definition, "reference": ref,
                     "aggregation": PAIR_AVERAGED if averaged else PAIR,
                     "other": None if averaged else other, "threshold": tau, "t1": t1,
                     "t2": t2}
            n_pairs = len(s1.others or ()) if averaged else 1
            rows += [_ordered({**ident, **r, "n_pairs": n_pairs})
                     for r in compare(s1.neurons, s2.neurons, *shape)]
    return rows


def _ordered(row: dict) -> dict:
    """A row with its keys in the table's column order (persistence.json reads so)."""
    return {k: row.get(k) for k in PERSISTENCE_COLUMNS}


def _averaged(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(mean_over_pairs rows, pooled_over_pairs rows) of the per-pair rows."""
    groups: dict = {}
    for r in rows:
        if r["aggregation"] != PAIR:  # pair-averaged sets: one per reference already
            continue
        key = (r["definition"], r["reference"], r["threshold"], r["t1"], r["t2"],
               r["scope"], r["layer"])
        groups.setdefault(key, []).append(r)
    mean_rows, pooled_rows = [], []
    for key, group in groups.items():
        sums = {k: sum(r[k] for r in group) for k in ("n_t1", "n_t2", "n_both", "n_emerged")}
        union = sum(r["n_t1"] + r["n_t2"] - r["n_both"] for r in group)
        base = {"definition": key[0], "reference": key[1], "other": None,
                "threshold": key[2], "t1": key[3], "t2": key[4], "scope": key[5],
                "layer": key[6], **sums}
        ps = [r["p_persist"] for r in group if r["p_persist"] is not None]
        js = [r["jaccard"] for r in group if r["jaccard"] is not None]
        p_mean = float(np.mean(ps)) if ps else None
        mean_rows.append(_ordered({
            **base, "aggregation": MEAN_OVER_PAIRS, "p_persist": p_mean,
            "undefined": p_mean is None, "jaccard": float(np.mean(js)) if js else None,
            "n_pairs": len(ps)}))
        p_pool = _ratio(sums["n_both"], sums["n_t1"])
        pooled_rows.append(_ordered({
            **base, "aggregation": POOLED_OVER_PAIRS, "p_persist": p_pool,
            "undefined": p_pool is None, "jaccard": _ratio(sums["n_both"], union),
            "n_pairs": len(group)}))
    return mean_rows, pooled_rows


@dataclass
class PersistenceOutput:
    """What the step wrote: the paths (json, csv) and the result itself."""
    paths: dict[str, Path]
    result: PersistenceFile


def persistence(run_dir, *, progress: bool = True) -> PersistenceOutput:
    """P(universal at t2 | universal at t1), emergence and Jaccard from RUN/universal."""
    refuse_if_run_in_progress(run_dir, "persistence")
    sets = read_sets(run_dir)  # verified against its checksum sidecar
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
        token_hash=p.token_hash, toolkit_version=__version__,
        rows=rows + mean_rows + pooled_rows)
    out = step_dir(run_dir, "persistence")
    record = {"step": "persistence", "token_hash": p.token_hash,
              "config_hash": config_hash(result.config),
              "inputs": {"universal/sets.json": recorded_sha256(sets.path)}}
    with file_lock(out / ".lock", f"persistence outputs {str(out)!r}",
                   busy="are being written by"):
        remove_dead_temporaries(out)  # what a killed persistence left (`*.tmp-<pid>`)
        return PersistenceOutput(write_persistence(run_dir, result, record), result)
