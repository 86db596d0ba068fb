"""The universal step's tables and the persistence step's output; the only reader and writer.

RUN/universal/ (with sets.json, which formats/sets.py owns):
  neurons.parquet, neurons.csv  one row per (reference, other, checkpoint, ref neuron):
                                reference, other, checkpoint, layer, neuron, flat_index,
                                max_corr, match_layer, match_neuron, baseline_max_<j>...,
                                excess_<j>..., excess (= excess_0), zero_var. The parquet
                                file carries the provenance as JSON under the schema
                                metadata key b"ooc_universal".
  table1.json                   provenance + "table1": one entry per (reference,
                                checkpoint, threshold), with its per-pair values
  table1.csv                    the same in long format (table1_frame)
RUN/persistence/:
  persistence.json              config, source, token_hash, toolkit_version and the rows:
                                "pairs", "mean_over_pairs", "pooled_over_pairs"
  persistence.csv               every row in long format (COLUMNS)

sets.json and table1.json (persistence.json for its step) are the completion markers:
removed before the other files are rewritten, written last. Every file gets its
checksum sidecar.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ooc_universal.errors import OocError
from ooc_universal.formats.sets import Provenance, SetsFile, sets_path, write_sets
from ooc_universal.rundir import atomic_path, write_json_atomic

NEURONS_PARQUET, NEURONS_CSV = "neurons.parquet", "neurons.csv"
TABLE1_JSON, TABLE1_CSV = "table1.json", "table1.csv"
PERSISTENCE_JSON, PERSISTENCE_CSV = "persistence.json", "persistence.csv"
UNIVERSAL_FILES = (NEURONS_PARQUET, NEURONS_CSV, TABLE1_CSV, TABLE1_JSON, "sets.json")
PERSISTENCE_FILES = (PERSISTENCE_CSV, PERSISTENCE_JSON)
PARQUET_META_KEY = b"ooc_universal"
MEAN_OVER_PAIRS = "mean over pairs"      # table1.csv / persistence: the mean over pairs
POOLED_OVER_PAIRS = "pooled over pairs"  # persistence: ratios of the summed counts
COLUMNS = ["definition", "reference", "other", "kind", "threshold", "t1", "t2", "layer",
           "n_t1", "n_t2", "n_both", "p_persist", "undefined", "emerged", "jaccard",
           "n_pairs"]


def universal_paths(run_dir) -> dict[str, Path]:
    """Where the universal step's files are, by the names the step returns them under."""
    out = Path(run_dir) / "universal"
    return {"neurons_parquet": out / NEURONS_PARQUET, "neurons_csv": out / NEURONS_CSV,
            "table1_csv": out / TABLE1_CSV, "table1": out / TABLE1_JSON,
            "sets": sets_path(run_dir)}


def persistence_paths(run_dir) -> dict[str, Path]:
    out = Path(run_dir) / "persistence"
    return {"csv": out / PERSISTENCE_CSV, "json": out / PERSISTENCE_JSON}


def _read_json(path: Path, step: str) -> dict:
    if not path.is_file():
        raise OocError(f"no {path.name} at {str(path)!r}; run `ooc-universal {step}` first")
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise OocError(f"{str(path)!r} is unreadable ({exc}); run `ooc-universal {step}` "
                       "again") from None
    if not isinstance(doc, dict):
        raise OocError(f"{str(path)!r} is not a file written by `ooc-universal {step}`; "
                       "run that step again")
    return doc


# ---------------------------------------------------------------------------- Table 1

@dataclass
class Table1File:
    """table1.json: the provenance and one entry per (reference, checkpoint, threshold).

    entry: reference, checkpoint, threshold, n_pairs, n_neurons, n_layers, d_mlp,
    percent, per_layer_percent, draws, per_layer_draws (spreads: n_draws, percent, mean,
    std, min, max), pairs (per pair: other, others, count, percent, n_zero_var,
    per_layer_count, per_layer_percent, draws, per_layer_draws)."""
    entries: list[dict]
    provenance: Provenance = field(default_factory=Provenance)

    @property
    def definition(self) -> str:
        return (self.provenance.config or {}).get("definition", "per-pair")

    def to_json(self) -> dict:
        return {**self.provenance.to_json(), "table1": self.entries}


def read_table1(run_dir) -> Table1File:
    doc = _read_json(universal_paths(run_dir)["table1"], "universal")
    return Table1File(list(doc.get("table1") or []), Provenance.from_json(doc))


def table1_frame(entries: list[dict]):
    """table1.json entries in long format (other = name or "mean over pairs")."""
    import pandas as pd
    rows = []

    def add(e, other, layer, percent, count, n, spread):
        rows.append({"reference": e["reference"], "threshold": e["threshold"],
                     "checkpoint": e["checkpoint"], "other": other, "layer": layer,
                     "percent": percent, "count": count, "n_neurons": n,
                     "n_draws": spread["n_draws"], "draws_mean": spread["mean"],
                     "draws_std": spread["std"], "draws_min": spread["min"],
                     "draws_max": spread["max"]})

    for e in entries:
        add(e, MEAN_OVER_PAIRS, "all", e["percent"], None, e["n_neurons"], e["draws"])
        for layer in range(e["n_layers"]):
            add(e, MEAN_OVER_PAIRS, str(layer), e["per_layer_percent"][layer], None,
                e["d_mlp"], e["per_layer_draws"][layer])
        for p in e["pairs"]:
            add(e, p["other"], "all", p["percent"], p["count"], e["n_neurons"], p["draws"])
            for layer in range(e["n_layers"]):
                add(e, p["other"], str(layer), p["per_layer_percent"][layer],
                    p["per_layer_count"][layer], e["d_mlp"], p["per_layer_draws"][layer])
    df = pd.DataFrame(rows)
    df["count"] = df["count"].astype("Int64")
    return df


# ---------------------------------------------------------------------------- neurons

@dataclass
class NeuronTable:
    """neurons.parquet (or, when that is unreadable, neurons.csv) as a DataFrame."""
    frame: object   # pandas.DataFrame
    path: Path      # the file it came from


def read_neurons(run_dir, columns=None) -> NeuronTable:
    """The per-neuron table: the parquet file, else the CSV; OocError when neither reads."""
    import pandas as pd
    paths = universal_paths(run_dir)
    for key in ("neurons_parquet", "neurons_csv"):
        path = paths[key]
        if not path.is_file():
            continue
        try:
            frame = (pd.read_parquet(path, columns=columns) if key == "neurons_parquet"
                     else pd.read_csv(path, usecols=columns))
        except Exception:  # noqa: BLE001 - unreadable or other columns: try the next one
            continue
        return NeuronTable(frame, path)
    raise OocError(f"no readable neurons table in {str(paths['neurons_csv'].parent)!r}; "
                   "run `ooc-universal universal` again")


def _write_parquet(df, path: Path, provenance: dict, record: dict | None = None) -> None:
    """Parquet with the provenance in the schema metadata (key PARQUET_META_KEY)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[PARQUET_META_KEY] = json.dumps(provenance, sort_keys=True, default=str).encode()
    table = table.replace_schema_metadata(meta)
    with atomic_path(path, record) as tmp:
        pq.write_table(table, tmp)


def _write_csv(df, path: Path, record: dict | None) -> None:
    with atomic_path(path, record) as tmp:
        df.to_csv(tmp, index=False)


def write_universal(run_dir, neurons, table1: Table1File, sets: SetsFile,
                    record: dict | None = None) -> dict[str, Path]:
    """Write every file of RUN/universal (the completion markers last); returns the paths.

    `neurons`: the per-neuron DataFrame; `record`: the checksum sidecars' provenance."""
    paths = universal_paths(run_dir)
    for key in ("sets", "table1"):  # the completion markers go first and come back last
        paths[key].unlink(missing_ok=True)
    _write_parquet(neurons, paths["neurons_parquet"], table1.provenance.to_json(), record)
    _write_csv(neurons, paths["neurons_csv"], record)
    _write_csv(table1_frame(table1.entries), paths["table1_csv"], record)
    write_json_atomic(paths["table1"], table1.to_json(), record)
    write_sets(run_dir, sets, record)
    return paths


def format_table1(table: Table1File) -> str:
    """Table 1 as text: mean over pairs, draw spread, per-pair values, per layer."""
    lines = []
    for ref in sorted({e["reference"] for e in table.entries}):
        lines += _table1_lines([e for e in table.entries if e["reference"] == ref],
                               ref, table.definition)
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _table1_lines(entries: list[dict], ref: str, definition: str) -> list[str]:
    ckpts = sorted({e["checkpoint"] for e in entries})
    taus = sorted({e["threshold"] for e in entries})
    by_cell = {(e["threshold"], e["checkpoint"]): e for e in entries}
    n_pairs = max(e["n_pairs"] for e in entries)
    what = ("mean over pairs" if definition == "per-pair"
            else "pair-averaged excess, one set per checkpoint")
    lines = [f"Table 1: % universal neurons (excess > tau, draw 0) of {ref}, {what} "
             f"({n_pairs} pair(s))",
             "threshold".ljust(12) + "".join(f"{_ckpt(c):>14}" for c in ckpts)]
    for tau in taus:
        lines.append(f"{tau:<12g}" + "".join(
            f"{by_cell[(tau, c)]['percent']:>14.2f}" if (tau, c) in by_cell else f"{'-':>14}"
            for c in ckpts))
    n_draws = max(e["draws"]["n_draws"] for e in entries)
    if n_draws > 1:
        lines += _draw_spread_lines(by_cell, taus, ckpts, n_draws)
    if definition == "per-pair":
        lines += _per_pair_lines(entries, by_cell, taus, ckpts, n_draws)
    lines.append("per layer (" + ("mean over pairs" if definition == "per-pair"
                                  else "pair-averaged") + "):")
    lines += _per_layer_lines(by_cell, taus, ckpts, entries[0]["n_layers"])
    return lines


def _draw_spread_lines(by_cell, taus, ckpts, n_draws) -> list[str]:
    lines = [f"spread over {n_draws} baseline draws of the value above "
             "(mean +- std [min, max]):"]
    for tau in taus:
        cells = []
        for c in ckpts:
            s = by_cell[(tau, c)]["draws"] if (tau, c) in by_cell else None
            cells.append(f"{s['mean']:.2f}+-{s['std']:.2f} [{s['min']:.2f}, "
                         f"{s['max']:.2f}]" if s else "-")
        lines.append(f"  {tau:<10g}" + "  ".join(f"{x:>26}" for x in cells))
    return lines


def _per_pair_lines(entries, by_cell, taus, ckpts, n_draws) -> list[str]:
    lines = ["per pair (draw 0" + (", +- std over draws)" if n_draws > 1 else ")") + ":",
             f"  {'other':<28} {'tau':<6}" + " ".join(f"{_ckpt(c):>17}" for c in ckpts)]
    for other in sorted({p["other"] for e in entries for p in e["pairs"]}):
        for tau in taus:
            cells = [_pair_cell(by_cell.get((tau, c)), other) for c in ckpts]
            lines.append(f"  {other[:28]:<28} {tau:<6g}" + " ".join(cells))
    return lines


def _pair_cell(entry: dict | None, other: str) -> str:
    p = next((p for p in (entry or {}).get("pairs", []) if p["other"] == other), None)
    if p is None:
        return f"{'-':>17}"
    if p["draws"]["n_draws"] > 1:
        return f"{p['percent']:>7.2f} (+-{p['draws']['std']:5.2f})"
    return f"{p['percent']:>17.2f}"


def _per_layer_lines(by_cell, taus, ckpts, n_layers) -> list[str]:
    lines = []
    for tau in taus:
        lines.append(f"  tau={tau:g}: layer " + " ".join(f"{c:>{8}}" for c in
                                                       map(_ckpt, ckpts)))
        for layer in range(n_layers):
            lines.append(f"  {'':8}{layer:>6} " + " ".join(
                f"{by_cell[(tau, c)]['per_layer_percent'][layer]:>8.2f}"
                if (tau, c) in by_cell else f"{'-':>8}" for c in ckpts))
    return lines


def _ckpt(c: int) -> str:
    return "no step" if c < 0 else str(c)


# ---------------------------------------------------------------------------- persistence

@dataclass
class PersistenceFile:
    """persistence.json. A row: definition, reference, other, kind ("pair", "mean over
    pairs", "pooled over pairs"), threshold, t1, t2, layer ("all" or the layer index),
    n_t1, n_t2, n_both, p_persist (None when undefined), undefined, emerged, jaccard,
    n_pairs."""
    config: dict
    source: dict
    token_hash: str | None
    toolkit_version: str
    pairs: list[dict]
    mean_over_pairs: list[dict]
    pooled_over_pairs: list[dict]

    @property
    def rows(self) -> list[dict]:
        return self.pairs + self.mean_over_pairs + self.pooled_over_pairs

    def to_json(self) -> dict:
        return {"config": self.config, "source": self.source, "token_hash": self.token_hash,
                "toolkit_version": self.toolkit_version, "pairs": self.pairs,
                "mean_over_pairs": self.mean_over_pairs,
                "pooled_over_pairs": self.pooled_over_pairs}


def read_persistence(run_dir) -> PersistenceFile:
    doc = _read_json(persistence_paths(run_dir)["json"], "persistence")
    return PersistenceFile(
        config=doc.get("config") or {}, source=doc.get("source") or {},
        token_hash=doc.get("token_hash"), toolkit_version=doc.get("toolkit_version", ""),
        **{k: list(doc.get(k) or []) for k in ("pairs", "mean_over_pairs",
                                               "pooled_over_pairs")})


def persistence_frame(result: PersistenceFile):
    """All rows as one long DataFrame (layer as text: "all", "0", ...)."""
    import pandas as pd
    df = pd.DataFrame(result.rows, columns=COLUMNS)
    df["layer"] = df["layer"].astype(str)
    df["p_persist"] = df["p_persist"].astype("float64")
    df["jaccard"] = df["jaccard"].astype("float64")
    return df


def write_persistence(run_dir, result: PersistenceFile,
                      record: dict | None = None) -> dict[str, Path]:
    """Write RUN/persistence (persistence.json, the completion marker, last)."""
    paths = persistence_paths(run_dir)
    paths["json"].unlink(missing_ok=True)
    _write_csv(persistence_frame(result), paths["csv"], record)
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
    others = sorted({r["other"] for r in rows if r["kind"] == "pair"})
    others += [k for k in (MEAN_OVER_PAIRS, POOLED_OVER_PAIRS)
               if any(r["other"] == k for r in rows)]
    by_cell = {(r["other"], r["t1"], r["t2"], str(r["layer"])): r for r in rows}
    lines = [f"P(universal at t2 | universal at t1), {ref}, threshold {tau:g}, "
             f"{definition}:",
             f"  {'other':<30}" + "".join(f"{f'{a}->{b}':>22}" for a, b in intervals)]
    for other in others:
        lines.append(f"  {other[:30]:<30}" + "".join(
            f"{_persistence_cell(by_cell.get((other, a, b, 'all'))):>22}"
            for a, b in intervals))
    summary = MEAN_OVER_PAIRS if MEAN_OVER_PAIRS in others else others[0]
    lines.append(f"  per layer ({summary}; +N = emerged, |U(t2) - U(t1)|"
                 + (" summed over pairs" if summary == MEAN_OVER_PAIRS else "") + "):")
    for layer in sorted({int(r["layer"]) for r in rows if r["layer"] != "all"}):
        cells = []
        for a, b in intervals:
            r = by_cell.get((summary, a, b, str(layer)))
            cells.append(f"{_persistence_cell(r)} +{r['emerged']}" if r else "-")
        lines.append(f"  {'layer ' + str(layer):<30}" + "".join(f"{c:>22}" for c in cells))
    return lines


def _persistence_cell(r) -> str:
    if r is None:
        return "-"
    if r["p_persist"] is None:
        return "undef (0/0)" if r["kind"] != MEAN_OVER_PAIRS else "undef"
    if r["kind"] == MEAN_OVER_PAIRS:
        return f"{100 * r['p_persist']:.1f}% ({r['n_pairs']}p)"
    return f"{100 * r['p_persist']:.1f}% ({r['n_both']}/{r['n_t1']})"
