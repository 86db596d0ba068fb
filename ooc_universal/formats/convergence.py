"""RUN/reduce/<ref_label>__<other_label>.convergence.csv: token-count convergence of one
pair; the only reader and writer.

A tidy table, one row per (snapshot, threshold): what the pair's reduce gave on its first
n_tokens tokens, for the doubling counts of kernels/convergence.snapshot_counts (the
last row of a threshold is the whole token set: the reduce file's own numbers).

  reference, other          the models' names (as in Table 1); ref_label, other_label
  checkpoint                the reference's training step (-1 without one)
  n_tokens                  tokens folded when the snapshot was taken (exact)
  n_tokens_total            tokens of the whole reduce (n_tokens == n_tokens_total: final)
  threshold                 tau; universal: excess at draw 0 > tau (strict)
  n_universal, n_neurons    universal reference neurons (draw 0), of all reference neurons
  pct_universal             100 * n_universal / n_neurons (percent, 0-100)
  pct_universal_draws_mean, pct_universal_draws_std   over the baseline draws (std
                            ddof=1, empty with one draw)
  n_draws                   baseline draws
  row_max_mean, row_max_q05, row_max_q25, row_max_q50, row_max_q75, row_max_q95
                            the reference neurons' max correlation with the other model
  baseline_max_mean         the same max against the rotated model, draw 0
  excess_mean               mean excess, draw 0

Written atomically (temporary name, fsync, rename) with its checksum sidecar; the reduce
writes it before it renames the pair's .h5 into place, so a complete reduce file that
recorded snapshots has its convergence table beside it. `list_reduced` never lists it
(it is not a `*.h5`).
"""
from __future__ import annotations

import os
from pathlib import Path

from ooc_universal.errors import OocError
from ooc_universal.rundir import atomic_path

SUFFIX = ".convergence.csv"
REDUCE_DIR = "reduce"
KEYS = ["reference", "other", "ref_label", "other_label", "checkpoint", "n_tokens",
        "n_tokens_total", "threshold"]
VALUES = ["n_universal", "n_neurons", "pct_universal", "pct_universal_draws_mean",
          "pct_universal_draws_std", "n_draws", "row_max_mean", "row_max_q05",
          "row_max_q25", "row_max_q50", "row_max_q75", "row_max_q95", "baseline_max_mean",
          "excess_mean"]
COLUMNS = KEYS + VALUES
_INT = {"checkpoint", "n_tokens", "n_tokens_total", "n_universal", "n_neurons", "n_draws"}
_TEXT = {"reference", "other", "ref_label", "other_label"}


def convergence_path(run_dir, ref_label: str, other_label: str) -> Path:
    return Path(run_dir) / REDUCE_DIR / f"{ref_label}__{other_label}{SUFFIX}"


def list_convergence(run_dir) -> list[Path]:
    """The pairs' convergence tables, sorted by name ([] when there are none)."""
    folder = Path(run_dir) / REDUCE_DIR
    return sorted(p for p in folder.glob(f"*__*{SUFFIX}") if p.is_file()) \
        if folder.is_dir() else []


def snapshot_rows(pair: dict, n_tokens: int, n_tokens_total: int, summary: dict) -> list[dict]:
    """The rows of one snapshot: `pair` gives reference, other, ref_label, other_label
    and checkpoint; `summary` is kernels.convergence.summarize()'s dict."""
    common = {k: pair[k] for k in ("reference", "other", "ref_label", "other_label",
                                   "checkpoint")}
    stats = {k: summary[k] for k in VALUES if k in summary}
    rows = []
    for tau, counts in sorted(summary["per_threshold"].items()):
        rows.append({**common, "n_tokens": int(n_tokens), "n_tokens_total": int(n_tokens_total),
                     "threshold": float(tau), **stats, **counts,
                     "n_neurons": summary["n_neurons"], "n_draws": summary["n_draws"]})
    return rows


def write_convergence(path, rows: list[dict], record: dict | None = None) -> Path:
    """Write the table (COLUMNS, sorted by threshold then n_tokens) atomically; `record`
    (step, token_hash, config_hash, inputs) goes to the checksum sidecar."""
    import pandas as pd
    if not rows:
        raise OocError(f"no convergence snapshot to write to {str(path)!r}; the reduce "
                       "records at least the final token count")
    df = pd.DataFrame(rows)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"convergence rows lack the columns {missing}")
    df = df[COLUMNS].sort_values(["threshold", "n_tokens"], kind="stable")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, record, fault="convergence.write") as tmp:
        with open(tmp, "w", newline="") as f:
            df.to_csv(f, index=False, float_format="%.17g")
            f.flush()
            os.fsync(f.fileno())
    return path


def read_convergence(path):
    """One pair's table as a DataFrame (the dtypes of COLUMNS), or one OocError line."""
    import pandas as pd
    path = Path(path)
    if not path.is_file():
        raise OocError(f"no convergence table at {str(path)!r}; run `ooc-universal reduce` "
                       "(it records one per pair)")
    try:
        df = pd.read_csv(path, keep_default_na=True)
    except (OSError, ValueError) as exc:
        raise OocError(f"{str(path)!r} is not a readable convergence table ({exc}); run "
                       "`ooc-universal reduce --force` for that pair") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise OocError(f"{str(path)!r} lacks the columns {missing}; it was not written by "
                       "this toolkit's reduce: run `ooc-universal reduce --force` for that "
                       "pair")
    for col in COLUMNS:
        if col in _INT:
            df[col] = df[col].astype("int64")
        elif col in _TEXT:
            df[col] = df[col].astype(str)
        else:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    return df[COLUMNS]


def read_all_convergence(run_dir):
    """Every pair's table in one DataFrame, or None when no pair has one."""
    import pandas as pd
    frames = [read_convergence(p) for p in list_convergence(run_dir)]
    return pd.concat(frames, ignore_index=True) if frames else None
