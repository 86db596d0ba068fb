"""The universal step's tables and the persistence step's output; the only reader and writer.

Layout, table_version 2. Every table is tidy (one row per observation, one column per
variable), and every table follows the same conventions:

  scope, layer   scope "all" (the whole model: layer is null) or "layer" (layer 0..L-1).
                 layer is a nullable integer (pandas Int64, <NA>; null in JSON, an empty
                 cell in CSV), so `df[df.layer == 0]` is layer 0 and never an "all" row.
  aggregation    what a row is: "pair" (one reference/other pair; `other` names the other
                 model), "mean_over_pairs" (the mean of the pairs' values),
                 "pooled_over_pairs" (ratios of the counts summed over the pairs),
                 "pair_averaged" (Gurnee et al.: one set from the pair-averaged excess).
                 `other` is null on every row that is not a "pair".
  names          n_* counts, pct_* percentages (0..100), p_* fractions (0..1), is_* booleans;
                 is_universal_<tau> = excess > tau (strict) at draw 0, e.g. is_universal_0.5.
                 No column is named after a DataFrame method (count, mode, mean, ...).
  draws          draw j uses rotation-baseline draw j; draw 0 is the paper's single rotation
                 and defines the universal sets. Long tables hold one row per draw; the
                 draw-0 view (the main tables) carries the spread over draws beside it, and
                 the mean view (`table1_view(..., "mean")`, `neuron_view(..., "mean")`)
                 averages over the draws.

RUN/universal/ (with sets.json, which formats/sets.py owns):
  neurons.parquet, neurons.csv  draw-0 view, one row per (reference, aggregation, other,
                                checkpoint, neuron): NEURON_COLUMNS + is_universal_<tau>.
                                The parquet file carries the provenance and table_version
                                as JSON under the schema metadata key b"ooc_universal".
  neuron_draws.parquet          one row per (neuron row above, draw): NEURON_DRAW_COLUMNS
                                + is_universal_<tau> of that draw
  table1.json                   table_version, the provenance, "rows" (the draw-0 view,
                                TABLE1_COLUMNS) and "draws" (TABLE1_DRAW_COLUMNS)
  table1.csv, table1_draws.csv  the same two tables
RUN/persistence/:
  persistence.json              table_version, config, source, token_hash,
                                toolkit_version and "rows" (PERSISTENCE_COLUMNS)
  persistence.csv               the rows

sets.json and table1.json (persistence.json for its step) are the completion markers:
removed before the other files are rewritten, written last. Every file gets its
checksum sidecar. Files of another table_version are refused with one line (re-run the
step); there is no reader for the old layout.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ooc_universal.errors import OocError
from ooc_universal.formats.sets import Provenance, SetsFile, sets_path, write_sets
from ooc_universal.rundir import atomic_path, read_json_document, write_json_atomic

TABLE_VERSION = 2
NEURONS_PARQUET, NEURONS_CSV = "neurons.parquet", "neurons.csv"
NEURON_DRAWS_PARQUET = "neuron_draws.parquet"
TABLE1_JSON, TABLE1_CSV, TABLE1_DRAWS_CSV = "table1.json", "table1.csv", "table1_draws.csv"
PERSISTENCE_JSON, PERSISTENCE_CSV = "persistence.json", "persistence.csv"
UNIVERSAL_FILES = (NEURONS_PARQUET, NEURONS_CSV, NEURON_DRAWS_PARQUET, TABLE1_CSV,
                   TABLE1_DRAWS_CSV, TABLE1_JSON, "sets.json")
PERSISTENCE_FILES = (PERSISTENCE_CSV, PERSISTENCE_JSON)
PARQUET_META_KEY = b"ooc_universal"

# aggregation values, and how tables and legends write them
PAIR, MEAN_OVER_PAIRS, POOLED_OVER_PAIRS = "pair", "mean_over_pairs", "pooled_over_pairs"
PAIR_AVERAGED = "pair_averaged"
AGGREGATE_LABELS = {MEAN_OVER_PAIRS: "mean over pairs", POOLED_OVER_PAIRS: "pooled over pairs",
                    PAIR_AVERAGED: "pair-averaged"}
SCOPE_ALL, SCOPE_LAYER = "all", "layer"

NEURON_KEYS = ["reference", "aggregation", "other", "checkpoint", "layer", "neuron",
               "flat_index"]
NEURON_COLUMNS = NEURON_KEYS + ["max_corr", "match_layer", "match_neuron", "baseline_max",
                                "excess", "n_draws", "zero_var"]
NEURON_DRAW_COLUMNS = NEURON_KEYS + ["draw", "seed", "draw_source", "max_corr",
                                     "baseline_max", "excess"]
TABLE1_KEYS = ["reference", "definition", "aggregation", "other", "checkpoint", "threshold",
               "scope", "layer"]
TABLE1_DRAW_COLUMNS = TABLE1_KEYS + ["draw", "n_universal", "n_neurons", "pct_universal",
                                     "n_zero_var", "n_pairs"]
SPREAD_COLUMNS = ["n_draws", "pct_universal_draws_mean", "pct_universal_draws_std",
                  "pct_universal_draws_min", "pct_universal_draws_max"]
TABLE1_COLUMNS = TABLE1_KEYS + ["n_universal", "n_neurons", "pct_universal", "n_zero_var",
                                "n_pairs"] + SPREAD_COLUMNS
PERSISTENCE_COLUMNS = ["definition", "reference", "aggregation", "other", "threshold", "t1",
                       "t2", "scope", "layer", "n_t1", "n_t2", "n_both", "n_emerged",
                       "p_persist", "undefined", "jaccard", "n_pairs"]

# pandas dtypes: text as the string dtype, nullable integers where a value may be absent
_TEXT = {"reference", "aggregation", "other", "definition", "scope", "draw_source",
         "ablation_mode", "set"}
_NULLABLE_INT = {"layer", "match_layer", "match_neuron", "n_universal", "n_zero_var", "seed"}
_INT = {"checkpoint", "neuron", "flat_index", "n_draws", "draw", "n_neurons", "n_pairs",
        "t1", "t2", "n_t1", "n_t2", "n_both", "n_emerged", "n_positions"}
_BOOL = {"zero_var", "undefined"}
_FLOAT = {"threshold", "pct_universal", "p_persist", "jaccard", "max_corr", "baseline_max",
          "excess", "excess_draws_std", "vocab_kurtosis", "vocab_skew", *SPREAD_COLUMNS[1:],
          "kl", "kl_se", "kl_ci_low", "kl_ci_high", "delta_loss", "delta_loss_se",
          "delta_loss_ci_low", "delta_loss_ci_high"}


def universal_column(threshold) -> str:
    """The boolean column of one threshold: 0.5 -> "is_universal_0.5"."""
    return f"is_universal_{float(threshold):g}"


def share_column(threshold) -> str:
    """The mean view's fraction of draws universal at one threshold: "p_universal_0.5"."""
    return f"p_universal_{float(threshold):g}"


def aggregate_label(aggregation: str, other) -> str:
    """How a row is named in text: the other model for a pair, else the aggregation."""
    return str(other) if aggregation == PAIR else AGGREGATE_LABELS.get(aggregation, aggregation)


def typed(df):
    """The toolkit's dtypes on a frame built from records or read from CSV (in place)."""
    import pandas as pd
    for col in df.columns:
        if col in _TEXT:
            df[col] = df[col].astype("str")      # missing stays missing (pandas >= 3)
        elif col in _NULLABLE_INT:
            df[col] = _nullable_int(df[col])
        elif col in _INT:    # int64; Int64 when a value is missing (a model without steps)
            df[col] = (df[col].astype("int64") if df[col].notna().all()
                       else _nullable_int(df[col]))
        elif col in _BOOL:
            df[col] = df[col].astype(bool)
        elif col.startswith("is_universal_"):
            df[col] = df[col].astype(bool)
        elif col in _FLOAT:    # numbers that may be null (p_persist, jaccard, a std)
            df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    return df


def _nullable_int(column):
    """Int64 (<NA> for null); float64 when the values are not whole (the mean view's
    mean count)."""
    import pandas as pd
    try:
        return pd.array(column.tolist(), dtype="Int64")
    except TypeError:
        return pd.to_numeric(column, errors="coerce").astype("float64")


def records_frame(records: list[dict], columns: list[str]):
    """Records (JSON rows: None for null) as a typed DataFrame with `columns` first."""
    import pandas as pd
    extra = [c for c in (records[0] if records else {}) if c not in columns]
    return typed(pd.DataFrame(records, columns=columns + extra))


def universal_paths(run_dir) -> dict[str, Path]:
    """Where the universal step's files are, by the names the step returns them under."""
    out = Path(run_dir) / "universal"
    return {"neurons_parquet": out / NEURONS_PARQUET, "neurons_csv": out / NEURONS_CSV,
            "neuron_draws": out / NEURON_DRAWS_PARQUET, "table1_csv": out / TABLE1_CSV,
            "table1_draws_csv": out / TABLE1_DRAWS_CSV, "table1": out / TABLE1_JSON,
            "sets": sets_path(run_dir)}


def persistence_paths(run_dir) -> dict[str, Path]:
    out = Path(run_dir) / "persistence"
    return {"csv": out / PERSISTENCE_CSV, "json": out / PERSISTENCE_JSON}


def _read_json(path: Path, step: str) -> dict:
    doc = read_json_document(path, step)
    _check_version(path, doc.get("table_version", 1), step)
    return doc


def _check_version(path: Path, version, step: str) -> None:
    if version != TABLE_VERSION:
        raise OocError(f"{str(path)!r} has table_version {version}, this toolkit reads "
                       f"{TABLE_VERSION}; run `ooc-universal {step}` again to rewrite it")


# ---------------------------------------------------------------------------- Table 1

@dataclass
class Table1File:
    """table1.json: the provenance, the draw-0 view ("rows", TABLE1_COLUMNS) and the
    long table ("draws", TABLE1_DRAW_COLUMNS), each row a dict (None for null)."""
    rows: list[dict]
    draws: list[dict] = field(default_factory=list)
    provenance: Provenance = field(default_factory=Provenance)

    @property
    def definition(self) -> str:
        return (self.provenance.config or {}).get("definition", "per-pair")

    def frame(self, draw=0):
        """Table 1 as a DataFrame: draw 0 (the stored view), another draw j, "mean"
        (averaged over draws) or "all" (one row per draw)."""
        if draw == 0:
            return records_frame(self.rows, TABLE1_COLUMNS)
        if draw == "all":
            return records_frame(self.draws, TABLE1_DRAW_COLUMNS)
        return records_frame(table1_view(self.draws, draw), TABLE1_COLUMNS)

    def to_json(self) -> dict:
        return {"table_version": TABLE_VERSION, **self.provenance.to_json(),
                "rows": self.rows, "draws": self.draws}


def read_table1(run_dir) -> Table1File:
    doc = _read_json(universal_paths(run_dir)["table1"], "universal")
    return Table1File(list(doc.get("rows") or []), list(doc.get("draws") or []),
                      Provenance.from_json(doc))


def _spread(values: list) -> dict:
    """n_draws, mean, std (ddof=1; None for one draw), min, max of the draws' percents."""
    v = np.asarray(values, dtype=np.float64)
    return {"n_draws": int(v.size), "pct_universal_draws_mean": float(v.mean()),
            "pct_universal_draws_std": float(v.std(ddof=1)) if v.size > 1 else None,
            "pct_universal_draws_min": float(v.min()),
            "pct_universal_draws_max": float(v.max())}


def table1_view(draw_rows: list[dict], draw=0) -> list[dict]:
    """One row per TABLE1_KEYS of the long table: the value at `draw` (an int) or the
    mean over the draws ("mean"; n_universal then the mean count), with the spread
    over every draw beside it. Rows without that draw are left out."""
    groups: dict = {}
    for r in draw_rows:
        groups.setdefault(tuple(r[k] for k in TABLE1_KEYS), []).append(r)
    out = []
    for group in groups.values():
        group = sorted(group, key=lambda r: r["draw"])
        picked = _pick_draw(group, draw)
        if picked is None:
            continue
        row = {k: picked[k] for k in TABLE1_COLUMNS if k in picked}
        row.update(_spread([r["pct_universal"] for r in group]))
        out.append({k: row.get(k) for k in TABLE1_COLUMNS})
    return out


def _pick_draw(group: list[dict], draw) -> dict | None:
    if draw == "mean":
        counts = [r["n_universal"] for r in group]
        return {**group[0], "pct_universal": float(np.mean([r["pct_universal"] for r in group])),
                "n_universal": None if None in counts else float(np.mean(counts))}
    if not isinstance(draw, (int, np.integer)) or isinstance(draw, bool):
        raise OocError(f"draw {draw!r} is not a draw; give 0, 1, ... or 'mean' or 'all'")
    return next((r for r in group if r["draw"] == int(draw)), None)


# ---------------------------------------------------------------------------- neurons

@dataclass
class NeuronTable:
    """neurons.parquet (or, when that is unreadable, neurons.csv) as a DataFrame."""
    frame: object   # pandas.DataFrame
    path: Path      # the file it came from


def read_neurons(run_dir, columns=None) -> NeuronTable:
    """The per-neuron table (draw-0 view): the parquet file, else the CSV; OocError
    when neither reads or when it is of another table_version."""
    import pandas as pd
    paths = universal_paths(run_dir)
    for key in ("neurons_parquet", "neurons_csv"):
        path = paths[key]
        if not path.is_file():
            continue
        try:
            if key == "neurons_parquet":
                _check_version(path, _parquet_version(path), "universal")
                frame = pd.read_parquet(path, columns=columns)
            else:
                frame = typed(pd.read_csv(path, usecols=columns))
        except OocError:
            raise
        except Exception:  # noqa: BLE001 - unreadable or other columns: try the next one
            continue
        if "aggregation" not in frame.columns and (columns is None or "aggregation" in columns):
            raise OocError(f"{str(path)!r} has the layout of an older ooc-universal; run "
                           "`ooc-universal universal` again to rewrite it")
        return NeuronTable(frame, path)
    raise OocError(f"no readable neurons table in {str(paths['neurons_csv'].parent)!r}; "
                   "run `ooc-universal universal` again")


def read_neuron_draws(run_dir, columns=None):
    """neuron_draws.parquet (one row per neuron and draw) as a DataFrame."""
    import pandas as pd
    path = universal_paths(run_dir)["neuron_draws"]
    if not path.is_file():
        raise OocError(f"no {path.name} at {str(path)!r}; run `ooc-universal universal` "
                       "again (this toolkit writes it)")
    _check_version(path, _parquet_version(path), "universal")
    return pd.read_parquet(path, columns=columns)


def _parquet_version(path: Path):
    import pyarrow.parquet as pq
    meta = (pq.read_schema(path).metadata or {}).get(PARQUET_META_KEY)
    return json.loads(meta).get("table_version", 1) if meta else 1


def neuron_view(draws, view="mean", thresholds=()):
    """The mean view of the long per-neuron table: per neuron row, baseline_max and
    excess averaged over the draws, excess_draws_std (ddof=1), n_draws, and for each
    threshold p_universal_<tau>, the fraction of draws in which it is universal."""
    if view != "mean":
        raise OocError(f"neuron view {view!r} is not known; give 'mean'")
    grouped = draws.groupby(NEURON_KEYS, dropna=False, sort=False)
    out = grouped.agg(max_corr=("max_corr", "first"), baseline_max=("baseline_max", "mean"),
                      excess=("excess", "mean"), excess_draws_std=("excess", "std"),
                      n_draws=("draw", "size")).reset_index()
    for tau in thresholds:
        shares = grouped[universal_column(tau)].mean().reset_index(drop=True)
        out[share_column(tau)] = shares.to_numpy(dtype=np.float64)
    return typed(out)


def _write_parquet(df, path: Path, provenance: dict, record: dict | None = None) -> None:
    """Parquet with the provenance and table_version in the schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[PARQUET_META_KEY] = json.dumps({"table_version": TABLE_VERSION, **provenance},
                                        sort_keys=True, default=str).encode()
    table = table.replace_schema_metadata(meta)
    with atomic_path(path, record) as tmp:
        pq.write_table(table, tmp)


def _write_csv(df, path: Path, record: dict | None) -> None:
    with atomic_path(path, record) as tmp:
        df.to_csv(tmp, index=False)


def write_universal(run_dir, neurons, neuron_draws, table1: Table1File, sets: SetsFile,
                    record: dict | None = None) -> dict[str, Path]:
    """Write every file of RUN/universal (the completion markers last); returns the paths.

    `neurons`, `neuron_draws`: the per-neuron DataFrames (draw-0 view, long);
    `record`: the checksum sidecars' provenance."""
    paths = universal_paths(run_dir)
    for key in ("sets", "table1"):  # the completion markers go first and come back last
        paths[key].unlink(missing_ok=True)
    provenance = table1.provenance.to_json()
    _write_parquet(neurons, paths["neurons_parquet"], provenance, record)
    _write_csv(neurons, paths["neurons_csv"], record)
    _write_parquet(neuron_draws, paths["neuron_draws"], provenance, record)
    _write_csv(table1.frame(0), paths["table1_csv"], record)
    _write_csv(table1.frame("all"), paths["table1_draws_csv"], record)
    write_json_atomic(paths["table1"], table1.to_json(), record)
    write_sets(run_dir, sets, record)
    return paths


# ---------------------------------------------------------------------------- Table 1 as text

def _cell_rows(table: Table1File, reference: str) -> dict:
    """(aggregation label, threshold, checkpoint, layer or None) -> draw-0 row."""
    return {(aggregate_label(r["aggregation"], r["other"]), r["threshold"], r["checkpoint"],
             r["layer"]): r for r in table.rows if r["reference"] == reference}


def format_table1(table: Table1File) -> str:
    """Table 1 as text: the summary row, draw spread, per-pair values, per layer."""
    lines = []
    for ref in sorted({r["reference"] for r in table.rows}):
        lines += _table1_lines(table, ref)
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _summary_name(rows: list[dict]) -> str:
    kinds = {r["aggregation"] for r in rows}
    return AGGREGATE_LABELS[PAIR_AVERAGED if PAIR_AVERAGED in kinds else MEAN_OVER_PAIRS]


def _table1_lines(table: Table1File, ref: str) -> list[str]:
    mine = [r for r in table.rows if r["reference"] == ref]
    cells = _cell_rows(table, ref)
    ckpts = sorted({r["checkpoint"] for r in mine})
    taus = sorted({r["threshold"] for r in mine})
    summary = _summary_name(mine)
    top = [r for r in mine if aggregate_label(r["aggregation"], r["other"]) == summary]
    n_pairs = max(r["n_pairs"] for r in top)
    what = ("mean over pairs" if summary == "mean over pairs"
            else "pair-averaged excess, one set per checkpoint")
    lines = [f"Table 1: % universal neurons (excess > tau, draw 0) of {ref}, {what} "
             f"({n_pairs} pair(s))",
             "threshold".ljust(12) + "".join(f"{_ckpt(c):>14}" for c in ckpts)]
    for tau in taus:
        lines.append(f"{tau:<12g}" + "".join(
            f"{cells[(summary, tau, c, None)]['pct_universal']:>14.2f}"
            if (summary, tau, c, None) in cells else f"{'-':>14}" for c in ckpts))
    n_draws = max(r["n_draws"] for r in top)
    if n_draws > 1:
        lines += _draw_spread_lines(cells, summary, taus, ckpts, n_draws)
    if summary == "mean over pairs":
        lines += _per_pair_lines(mine, cells, taus, ckpts, n_draws)
    lines.append(f"per layer ({summary}):")
    n_layers = len({r["layer"] for r in mine if r["scope"] == SCOPE_LAYER})
    lines += _per_layer_lines(cells, summary, taus, ckpts, n_layers)
    return lines


def _draw_spread_lines(cells, summary, taus, ckpts, n_draws) -> list[str]:
    lines = [f"spread over {n_draws} baseline draws of the value above "
             "(mean +- std [min, max]):"]
    for tau in taus:
        shown = []
        for c in ckpts:
            r = cells.get((summary, tau, c, None))
            shown.append("-" if r is None else _spread_cell(r))
        lines.append(f"  {tau:<10g}" + "  ".join(f"{x:>26}" for x in shown))
    return lines


def _spread_cell(r: dict) -> str:
    std = r["pct_universal_draws_std"]
    return (f"{r['pct_universal_draws_mean']:.2f}+-{0.0 if std is None else std:.2f} "
            f"[{r['pct_universal_draws_min']:.2f}, {r['pct_universal_draws_max']:.2f}]")


def _per_pair_lines(rows, cells, taus, ckpts, n_draws) -> list[str]:
    lines = ["per pair (draw 0" + (", +- std over draws)" if n_draws > 1 else ")") + ":",
             f"  {'other':<28} {'tau':<6}" + " ".join(f"{_ckpt(c):>17}" for c in ckpts)]
    for other in sorted({r["other"] for r in rows if r["aggregation"] == PAIR}):
        for tau in taus:
            shown = [_pair_cell(cells.get((other, tau, c, None))) for c in ckpts]
            lines.append(f"  {other[:28]:<28} {tau:<6g}" + " ".join(shown))
    return lines


def _pair_cell(r: dict | None) -> str:
    if r is None:
        return f"{'-':>17}"
    if r["n_draws"] > 1:
        return f"{r['pct_universal']:>7.2f} (+-{r['pct_universal_draws_std']:5.2f})"
    return f"{r['pct_universal']:>17.2f}"


def _per_layer_lines(cells, summary, taus, ckpts, n_layers) -> list[str]:
    lines = []
    for tau in taus:
        lines.append(f"  tau={tau:g}: layer " + " ".join(f"{c:>{8}}" for c in
                                                       map(_ckpt, ckpts)))
        for layer in range(n_layers):
            lines.append(f"  {'':8}{layer:>6} " + " ".join(
                f"{cells[(summary, tau, c, layer)]['pct_universal']:>8.2f}"
                if (summary, tau, c, layer) in cells else f"{'-':>8}" for c in ckpts))
    return lines


def _ckpt(c: int) -> str:
    return "no step" if c < 0 else str(c)


# ---------------------------------------------------------------------------- persistence

@dataclass
class PersistenceFile:
    """persistence.json: config, source, token_hash, toolkit_version and the rows
    (PERSISTENCE_COLUMNS; p_persist and jaccard None when undefined)."""
    config: dict
    source: dict
    token_hash: str | None
    toolkit_version: str
    rows: list[dict]

    def frame(self):
        """The rows as a typed DataFrame."""
        return records_frame(self.rows, PERSISTENCE_COLUMNS)

    def to_json(self) -> dict:
        return {"table_version": TABLE_VERSION, "config": self.config, "source": self.source,
                "token_hash": self.token_hash, "toolkit_version": self.toolkit_version,
                "rows": self.rows}


def read_persistence(run_dir) -> PersistenceFile:
    doc = _read_json(persistence_paths(run_dir)["json"], "persistence")
    return PersistenceFile(
        config=doc.get("config") or {}, source=doc.get("source") or {},
        token_hash=doc.get("token_hash"), toolkit_version=doc.get("toolkit_version", ""),
        rows=list(doc.get("rows") or []))


def write_persistence(run_dir, result: PersistenceFile,
                      record: dict | None = None) -> dict[str, Path]:
    """Write RUN/persistence (persistence.json, the completion marker, last)."""
    paths = persistence_paths(run_dir)
    paths["json"].unlink(missing_ok=True)
    _write_csv(result.frame(), paths["csv"], record)
    write_json_atomic(paths["json"], result.to_json(), record)
    return paths


def format_persistence(result: PersistenceFile) -> str:
    """The persistence table as text: per pair and averaged, overall then per layer."""
    rows = result.rows
    lines = []
    for key in sorted({(r["definition"], r["reference"], r["threshold"]) for r in rows}):
        lines += _persistence_lines(key, [r for r in rows if (
            r["definition"], r["reference"], r["threshold"]) == key])
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _persistence_lines(key, rows: list[dict]) -> list[str]:
    definition, ref, tau = key
    intervals = sorted({(r["t1"], r["t2"]) for r in rows}, key=lambda t: (t[1] - t[0], t))
    names = sorted({r["other"] for r in rows if r["aggregation"] == PAIR})
    names += [AGGREGATE_LABELS[k] for k in (PAIR_AVERAGED, MEAN_OVER_PAIRS, POOLED_OVER_PAIRS)
              if any(r["aggregation"] == k for r in rows)]
    by_cell = {(aggregate_label(r["aggregation"], r["other"]), r["t1"], r["t2"], r["layer"]): r
               for r in rows}
    lines = [f"P(universal at t2 | universal at t1) as a fraction, {ref}, threshold "
             f"{tau:g}, {definition}:",
             f"  {'other':<30}" + "".join(f"{f'{a}->{b}':>22}" for a, b in intervals)]
    for name in names:
        lines.append(f"  {name[:30]:<30}" + "".join(
            f"{_persistence_cell(by_cell.get((name, a, b, None))):>22}" for a, b in intervals))
    summary = next((n for n in ("mean over pairs", "pair-averaged") if n in names), names[0])
    lines.append(f"  per layer ({summary}; +N = n_emerged, |U(t2) - U(t1)|"
                 + (" summed over pairs" if summary == "mean over pairs" else "") + "):")
    for layer in sorted({r["layer"] for r in rows if r["scope"] == SCOPE_LAYER}):
        cells = []
        for a, b in intervals:
            r = by_cell.get((summary, a, b, layer))
            cells.append(f"{_persistence_cell(r)} +{r['n_emerged']}" if r else "-")
        lines.append(f"  {'layer ' + str(layer):<30}" + "".join(f"{c:>22}" for c in cells))
    return lines


def _persistence_cell(r) -> str:
    if r is None:
        return "-"
    if r["p_persist"] is None:
        return "undef (0/0)" if r["aggregation"] != MEAN_OVER_PAIRS else "undef"
    if r["aggregation"] == MEAN_OVER_PAIRS:
        return f"{r['p_persist']:.3f} ({r['n_pairs']}p)"
    return f"{r['p_persist']:.3f} ({r['n_both']}/{r['n_t1']})"
