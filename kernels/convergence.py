"""Token-count convergence: does the universal fraction still move when the tokens double?

The original authors ran the correlations at 100k ... 100M tokens as seven separate runs.
Co-moments are mergeable, so the reduce can finalize a copy of its running accumulators
at doubling token counts within its one pass (the row max and the rotation baseline of
the first n tokens), and this module turns each snapshot into the numbers the report
plots:

  snapshot_counts(n_tokens_total, first, block_tokens=None)
      the token counts at which to snapshot: first, 2 first, 4 first, ... below the
      total, then the total itself; with block_tokens each is rounded UP to a multiple of
      it (the reduce folds whole blocks, so a snapshot falls on a block end and its count
      is exact), duplicates dropped.
  crossed(counts, n_before, n_after)
      the counts c with n_before < c <= n_after: the snapshots due after a block that
      took the running count from n_before to n_after.
  universal_mask(row_max, baseline_max, threshold)
      the universal rule of steps/universal.py (per pair, draw 0): excess = row_max -
      baseline_max[0] > threshold, strict. (A step may not be imported from kernels; the
      rule is this one line, and tests/test_convergence.py checks it against the
      universal step's own tables.)
  summarize(row_max, baseline_max, thresholds)
      row-max mean and quantiles, the baseline mean, and per threshold the number and
      percentage (0-100) of universal neurons at draw 0, with the mean and std over
      baseline draws. The denominator is every reference neuron, zero-variance ones
      included (their row max and baseline are 0, so their excess is 0), as in Table 1.

Pure numpy, no files, no globals.
"""
from __future__ import annotations

import numpy as np

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def snapshot_counts(n_tokens_total: int, first: int, block_tokens: int | None = None
                    ) -> list[int]:
    """Doubling token counts from `first` up to the total (the total always last)."""
    n_tokens_total, first = int(n_tokens_total), int(first)
    if n_tokens_total < 1 or first < 1:
        raise ValueError(f"snapshot counts need n_tokens_total >= 1 and first >= 1, not "
                         f"{n_tokens_total} and {first}")
    counts, c = [], first
    while c < n_tokens_total:
        counts.append(c)
        c *= 2
    counts.append(n_tokens_total)
    if block_tokens:
        b = int(block_tokens)
        counts = [min(n_tokens_total, -(-c // b) * b) for c in counts]
    return sorted(set(counts))


def crossed(counts, n_before: int, n_after: int) -> list[int]:
    """The snapshot counts reached by a block from n_before to n_after tokens."""
    return [int(c) for c in counts if n_before < c <= n_after]


def _baseline_draws(baseline_max, n: int) -> np.ndarray:
    base = np.asarray(baseline_max, np.float64)
    base = base[None, :] if base.ndim == 1 else base
    if base.ndim != 2 or base.shape[1] != n or base.shape[0] < 1:
        raise ValueError(f"baseline_max must be (n,) or (draws, n) with n = {n}, not shape "
                         f"{np.shape(baseline_max)}")
    return base


def universal_mask(row_max, baseline_max, threshold: float) -> np.ndarray:
    """(n,) bool: excess at draw 0 above the threshold (strict), as steps/universal.py."""
    row = np.asarray(row_max, np.float64)
    return (row - _baseline_draws(baseline_max, row.size)[0]) > float(threshold)


def summarize(row_max, baseline_max, thresholds) -> dict:
    """One snapshot's numbers (module docstring); "per_threshold" is keyed by the
    threshold as given (floats)."""
    row = np.asarray(row_max, np.float64)
    if row.ndim != 1 or row.size == 0:
        raise ValueError(f"row_max must be a non-empty (n,) array, not shape {row.shape}")
    base = _baseline_draws(baseline_max, row.size)
    excess = row[None, :] - base                                   # (draws, n)
    quantiles = np.quantile(row, QUANTILES)
    out = {"n_neurons": int(row.size), "n_draws": int(base.shape[0]),
           "row_max_mean": float(row.mean()),
           **{f"row_max_q{round(q * 100):02d}": float(v) for q, v in zip(QUANTILES, quantiles)},
           "baseline_max_mean": float(base[0].mean()),
           "baseline_max_draws_mean": float(base.mean()),
           "excess_mean": float(excess[0].mean()), "per_threshold": {}}
    for tau in thresholds:
        counts = (excess > float(tau)).sum(axis=1)                 # per draw
        pct = 100.0 * counts / row.size
        out["per_threshold"][float(tau)] = {
            "n_universal": int(counts[0]), "pct_universal": float(pct[0]),
            "pct_universal_draws_mean": float(pct.mean()),
            "pct_universal_draws_std": float(pct.std(ddof=1)) if pct.size > 1 else None}
    return out
